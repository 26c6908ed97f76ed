"""
Kernels on a pool of hosts reached over SSH (Enterprise Gateway's
C{DistributedProcessProxy}).

A launch picks a host with the load balancer, skipping hosts that are
backed off, and starts the kernelspec's kernel-side launcher there, detached
(its own session, output to C{kernel_log_dir/kernel-<id>.log}).  A host that
cannot be reached is marked down and the launch moves to the next one, at
most once per host.  The launcher reports connection info to the response
listener; meanwhile the gateway checks every second that the launcher still
runs, and quotes its log if it dies first.

Every value reaches the remote shell quoted: the remote command is a
constant script followed by quoted arguments (the log file, then the argv).
The launch token and the kernel's environment travel on the channel's
stdin, so neither appears in a process listing; the token reaches the
kernel-side launcher on its own stdin (with C{EG_LAUNCH_TOKEN_STDIN=1}), so
it is not in the kernel's environment either (C{/proc/<pid>/environ} keeps a
process's initial environment for ever).

The gateway signals only what it started: the process the start script
reports (detached with C{setsid}, so it leads its own session and process
group), whose start time (C{/proc/<pid>/stat}) the script reports too.
Every signal, liveness check and group check first checks on the host that
the process under that pid still has that start time (a record without one:
that its environment carries the kernel's C{KERNEL_ID}), so a pid reused
after the kernel ended is never signalled.  The C{pid} and C{pgid} a
launcher puts in its connection info are not used for any of this: anyone
who can forge a payload could name another process group (or C{-1}).

With impersonation the kernel runs as its user (L{RunAs}): in "sudo" mode
the gateway logs in as C{remote_user} and the whole start script runs
behind C{sudo_command} for the user (the user name one quoted argument,
after validation), so the log file, the launcher and the kernel are the
user's; in "login" mode the gateway logs in as the user with the key from
C{ssh_user_key_file} (one pooled connection per host and user).  Before
starting, C{id} on the host must show an account that may be impersonated
(uid 0, gid 0 and uids below C{min_uid} are refused with 403).  Signals,
liveness checks and the cleanup kill run the same way.  The gateway's
C{HOME}, C{USER} and C{LOGNAME} are not passed on: sudo or sshd set the
account's own.

Every kernel started here carries the gateway installation's id in its
environment (C{EGATEWAY_ID}).  The inventory (L{ILauncherInventory}) runs
one fixed Python script on each host (the gateway id its only argument,
checked first) that lists the processes in the login's network namespace
whose environment carries that id, by C{KERNEL_ID}.  What it finds can be
reaped (its process groups are killed, its log removed) but not adopted:
the kernel's connection key is known only to the gateway that started it.
It sees the processes the login user may read: with impersonation, only
a root login sees the users' kernels.
"""

from __future__ import annotations

import getpass
import signal as signals
import socket
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from twisted.conch.ssh import keys
from twisted.internet.defer import Deferred
from twisted.internet.error import DNSLookupError
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from egateway.clusters.balancing import HostHealth, balancer
from egateway.clusters.impersonation import Impersonation, ids_from_id_output
from egateway.clusters.interface import (
    GATEWAY_ID_ENV,
    Found,
    ILauncher,
    ILauncherInventory,
    IKernelProcess,
    LaunchError,
    LaunchRequest,
    LauncherContext,
    Liveness,
    Phase,
    Placement,
    check_gateway_id,
)
from egateway.clusters.remote import (
    Placed,
    RemoteKernelProcess,
    RemoteLaunch,
    RemoteLauncher,
    _int,
    connection_info,
    launcher_argv,
    reported_id,
)
from egateway.clusters.response import PendingLaunch
from egateway.clusters.sshclient import SSHAuthError, SSHError, SSHPool, SSHSettings, load_keys, shell_command
from egateway.wire.channels import ConnectionInfo
from egateway.clusters.interface import ENV_NAME as NAME
from egateway.clusters.ssh_host import (
    CHECKED_KILL_SCRIPT,
    INVENTORY_SCRIPT,
    NOT_THE_KERNEL,
    START_SCRIPT,
    RemoteKernelFound,
    RunAs,
    StartedProcess,
    _split_hosts,
    checked_kill_argv,
    kill_argv,
    parse_inventory,
    start_input,
)

_log = Logger()


class SSHKernelProcess(RemoteKernelProcess):
    """
    A kernel the gateway started on an SSH host.  C{placement.pid} and
    C{placement.pgid} are the start script's report (one number, the
    session's leader), never the payload's.
    """

    def __init__(
        self, *, launcher: "SSHLauncher", host: str, run_as: RunAs = RunAs(), start_time: str = "", **kw: Any
    ) -> None:
        super().__init__(**kw)
        self._launcher = launcher
        self.host = host
        self.run_as = run_as
        self.start_time = start_time

    async def _kill(self, signum: int, group: bool) -> Any:
        """
        Run L{checked_kill_argv} on the host.  With a group target the
        group leader is the one checked.
        """
        pid = self.placement.pgid if group and self.placement.pgid else self.placement.pid
        argv = checked_kill_argv(signum, pid, self.kernel_id, self.start_time if pid == self.placement.pid else "", group)
        return await self._launcher.pool.run(
            self.host, self.run_as.command(argv), timeout=15, user=self.run_as.login
        )

    async def _check_alive(self) -> Liveness:
        result = await self._kill(0, group=False)
        if result.ok:
            return Liveness(True)
        if result.code == NOT_THE_KERNEL:
            return Liveness(False, f"the kernel process {self.placement.pid} on {self.host} is gone (pid reused)")
        return Liveness(False, f"the kernel process {self.placement.pid} on {self.host} is gone")

    async def _group_alive(self) -> bool:
        if not self.placement.pgid:
            return False
        return (await self._kill(0, group=True)).ok

    async def _signal_directly(self, signum: int) -> None:
        try:
            result = await self._kill(signum, group=bool(self.placement.pgid))
        except SSHError as e:
            raise LaunchError(f"cannot signal the kernel on {self.host}: {e}") from None
        if result.code == NOT_THE_KERNEL:
            _log.warn(
                "kernel {kernel_id}: not signalling {pid} on {host}: {error}",
                kernel_id=self.kernel_id,
                pid=self.placement.pid,
                host=self.host,
                error=result.stderr.decode("utf-8", "replace").strip(),
            )
            return
        if not result.ok and b"No such process" not in result.stderr:
            raise LaunchError(f"kill on {self.host} failed: {result.describe()}")

    async def _release(self) -> None:
        self._launcher.released(self.host)

    def snapshot(self) -> dict:
        return {**super().snapshot(), "launcher": "ssh", "user": self.run_as.user, "start_time": self.start_time}


@dataclass
class _HostLaunch:
    """
    What an SSH launch's steps keep: the candidate hosts and whom to run
    as, then the host and the process the start script reported.
    """

    hosts: list[str]
    run_as: RunAs
    host: str = ""
    process: StartedProcess | None = None


@implementer(ILauncher, ILauncherInventory)
class SSHLauncher(RemoteLauncher):
    name = "ssh"

    def __init__(self, context: LauncherContext) -> None:
        config = context.settings["config"]
        self._context = context
        self._reactor = context.reactor
        self._gateway_id = str(context.settings.get("gateway_id") or "")
        self._hosts_used: set[str] = set()
        self._stopped = False
        self._settings = config.ssh
        self._kernels = config.kernels
        self.impersonation = Impersonation.from_config(config)
        settings = config.ssh
        self.pool = SSHPool(
            context.reactor,
            SSHSettings(
                user=settings.remote_user or getpass.getuser(),
                port=settings.ssh_port,
                key_files=tuple(settings.ssh_key_files) or SSHSettings.key_files,
                known_hosts=settings.ssh_known_hosts,
                host_key_checking=settings.ssh_host_key_checking,
                connect_timeout=settings.ssh_connect_timeout,
            ),
            user_keys=self._user_keys,
            run_blocking=context.run_blocking,
        )
        self.balancer = balancer(settings.load_balancing_algorithm)
        self.health = HostHealth(context.reactor, settings.host_backoff, settings.host_backoff_max)
        self._addresses: dict[str, str] = {}

    def released(self, host: str) -> None:
        self.balancer.released(host)

    async def _user_keys(self, user: str) -> list[keys.Key]:
        """
        The key to log in as C{user} ("login" impersonation), read in a
        thread (C{~user} is an account lookup).
        """
        path = self.impersonation.key_file(user)
        return await self._context.run_blocking(load_keys, [path])

    def hosts_for(self, request: LaunchRequest) -> list[str]:
        """
        The spec's C{remote_hosts}, else the configured ones; a client's
        C{KERNEL_REMOTE_HOST} may pin one of them (never another host).

        @raise LaunchError: a pinned host outside the allowed list.
        """
        hosts = _split_hosts(request.config.get("remote_hosts")) or list(self._settings.remote_hosts)
        pinned = request.env.get("KERNEL_REMOTE_HOST")
        if pinned:
            if pinned not in hosts:
                raise LaunchError(
                    f"KERNEL_REMOTE_HOST {pinned!r} is not one of this kernelspec's hosts", status=400
                )
            hosts = [pinned]
        if not hosts:
            raise LaunchError("no remote hosts are configured (remote_hosts, EG_REMOTE_HOSTS)")
        return hosts

    async def _address(self, host: str) -> str:
        address = self._addresses.get(host)
        if address is None:
            try:
                socket.inet_aton(host)
                address = host
            except OSError:
                address = await self._reactor.resolve(host)
            self._addresses[host] = address
        return address

    # -- the launch's steps (the sequence is RemoteLauncher's) ---------------

    async def _prepare(self, request: LaunchRequest) -> "_HostLaunch":
        return _HostLaunch(self.hosts_for(request), RunAs.for_user(self.impersonation, request.username))

    async def _submit(self, launch: RemoteLaunch) -> None:
        state = launch.state
        host, process = await self._start_somewhere(
            launch.request, state.hosts, launch.listener, launch.pending, state.run_as
        )
        state.host, state.process = host, process
        self._hosts_used.add(host)
        self.balancer.placed(host)

    async def _await_placement(self, launch: RemoteLaunch) -> Placed:
        state = launch.state
        detail = f"{state.host} pid {state.process.pid}" + (f" as {state.run_as.user}" if state.run_as.user else "")
        return Placed(state.host, await self._address(state.host), detail)

    async def _launch_ended(self, launch: RemoteLaunch) -> str | None:
        state = launch.state
        return await self._launcher_exited(state.host, state.process, launch.request.kernel_id, state.run_as)

    def _kernel(
        self, launch: RemoteLaunch, placed: Placed, info: ConnectionInfo, payload: Mapping[str, Any]
    ) -> IKernelProcess:
        state = launch.state
        pid = state.process.pid
        return SSHKernelProcess(
            launcher=self,
            host=placed.host,
            run_as=state.run_as,
            start_time=state.process.start_time,
            # What the gateway started, never the payload's pid/pgid.
            placement=Placement(host=placed.host, ip=placed.address, pid=pid, pgid=pid),
            **self._kernel_arguments(launch, info, payload, self._kernels.poll_interval),
        )

    async def _abandon(self, launch: RemoteLaunch) -> None:
        state = launch.state
        if state.process is not None:
            self.balancer.released(state.host)
            await self._kill_quietly(state.host, state.process, launch.request.kernel_id, state.run_as)

    async def _start_somewhere(
        self, request: LaunchRequest, hosts: list[str], listener: Any, pending: PendingLaunch, run_as: RunAs
    ) -> tuple[str, StartedProcess]:
        """
        Start the kernel-side launcher on the first host that works.
        """
        tried: list[str] = []
        failures: list[str] = []
        while True:
            candidates = [h for h in self.health.up(hosts) if h not in tried]
            if not candidates:
                down = [h for h in hosts if h not in tried and self.health.is_down(h)]
                detail = "; ".join(failures + [f"{h}: backed off after earlier failures" for h in down])
                raise LaunchError(f"no remote host could start the kernel ({detail})", status=503)
            host = self.balancer.choose(candidates)
            tried.append(host)
            request.report(Phase.SUBMITTED, f"ssh {host}")
            try:
                # Only this host may answer with version 1 connection info.
                pending.expect_from([await self._address(host)])
                process = await self._start_on(host, request, listener, pending, run_as)
            except (SSHError, DNSLookupError) as e:
                if isinstance(e, SSHAuthError) and run_as.login is not None:
                    # The user's key is at fault, not the host.
                    raise LaunchError(f"cannot log in to {host} as {run_as.login}: {e}", status=403) from None
                failures.append(f"{host}: {e}")
                self.health.failed(host, str(e))
                continue
            self.health.succeeded(host)
            return host, process

    async def _check_account(self, host: str, run_as: RunAs) -> None:
        """
        The kernel's user must have an account on C{host} that may be
        impersonated.

        @raise LaunchError: 403, no such account or a refused uid/gid.
        @raise SSHError: the host cannot be asked.
        """
        result = await self.pool.run(
            host, shell_command(["id", "--", run_as.user]), timeout=15, user=run_as.login
        )
        ids = ids_from_id_output(result.stdout.decode("utf-8", "replace")) if result.ok else None
        if ids is None:
            raise LaunchError(
                f"cannot run the kernel as {run_as.user!r} on {host}: the host has no such account "
                f"({result.describe()})",
                status=403,
            )
        self.impersonation.check_ids(run_as.user, ids[0], ids[1], where=f" on {host}")

    async def _start_on(
        self, host: str, request: LaunchRequest, listener: Any, pending: PendingLaunch, run_as: RunAs
    ) -> StartedProcess:
        if run_as.user:
            await self._check_account(host, run_as)
        argv = launcher_argv(
            request.spec,
            request.kernel_id,
            listener,
            str(request.config.get("port_range") or self._kernels.port_range),
            self._settings.remote_python,
        )
        env = self.impersonation.remote_env({name: value for name, value in request.env.items() if NAME.match(name)})
        if self._gateway_id:
            env[GATEWAY_ID_ENV] = self._gateway_id
        log = f"{self._settings.kernel_log_dir.rstrip('/')}/kernel-{request.kernel_id}.log"
        command = run_as.command(["sh", "-c", START_SCRIPT, "egateway-launch", log, *argv])
        # Enterprise Gateway's launcher cannot use the token: it is not sent.
        token = "" if pending.accept_v1 else pending.token
        result = await self.pool.run(
            host, command, stdin=start_input(token, env), timeout=30, user=run_as.login
        )
        if not result.ok:
            raise SSHError(f"starting the kernel failed: {result.describe()}")
        try:
            return StartedProcess.parse(result.stdout)
        except (ValueError, IndexError):
            raise SSHError(f"the host did not report a pid: {result.describe()}") from None

    async def _launcher_exited(
        self, host: str, process: StartedProcess, kernel_id: str, run_as: RunAs = RunAs()
    ) -> str | None:
        """
        C{None} while the launcher runs on C{host}; otherwise how it ended,
        with the end of its log.
        """
        argv = checked_kill_argv(0, process.pid, kernel_id, process.start_time, group=False)
        try:
            result = await self.pool.run(host, run_as.command(argv), timeout=15, user=run_as.login)
        except SSHError:
            return None
        if result.ok:
            return None
        log = f"{self._settings.kernel_log_dir.rstrip('/')}/kernel-{kernel_id}.log"
        tail = await self.pool.run(host, run_as.command(["tail", "-n", "5", log]), timeout=15, user=run_as.login)
        text = " | ".join(tail.stdout.decode("utf-8", "replace").strip().splitlines())
        explanation = f"the kernel launcher on {host} exited before sending connection info"
        return explanation + (f"; its log {host}:{log} ends: {text}" if text else "")

    async def _kill_quietly(
        self, host: str, process: StartedProcess, kernel_id: str, run_as: RunAs = RunAs()
    ) -> None:
        for signum in (15, 9):
            argv = checked_kill_argv(signum, process.pid, kernel_id, process.start_time)
            try:
                await self.pool.run(host, run_as.command(argv), timeout=10, user=run_as.login)
            except SSHError:
                return

    def restore(self, kernel_id: str, snapshot: Mapping[str, Any]) -> Deferred[IKernelProcess]:
        return Deferred.fromCoroutine(self._restore(kernel_id, snapshot))

    async def _restore(self, kernel_id: str, snapshot: Mapping[str, Any]) -> IKernelProcess:
        try:
            host = str(snapshot["host"])
            info = connection_info(snapshot["connection_info"], str(snapshot["ip"]))
            pid = reported_id(snapshot["pid"])
            if not pid:
                raise ValueError(f"pid {snapshot['pid']!r} names no single kernel")
            user = str(snapshot.get("user") or "")
            start_time = str(snapshot.get("start_time") or "")
            run_as = RunAs.for_user(self.impersonation, user) if user else RunAs()
        except (KeyError, TypeError, ValueError) as e:
            raise LaunchError(f"bad ssh snapshot: {e}") from None
        process = SSHKernelProcess(
            launcher=self,
            host=host,
            run_as=run_as,
            start_time=start_time,
            kernel_id=kernel_id,
            info=info,
            placement=Placement(host=host, ip=info.ip, pid=pid, pgid=reported_id(snapshot.get("pgid")) or pid),
            reactor=self._reactor,
            poll_interval=self._kernels.poll_interval,
            comm_port=_int(snapshot.get("comm_port")),
            comm_token=snapshot.get("comm_token"),
        )
        self._hosts_used.add(host)
        liveness = await process.poll()
        if not liveness.alive:
            await process.cleanup()
            raise LaunchError(f"kernel {kernel_id} on {host} is no longer running")
        self.balancer.placed(host)
        return process

    # -- inventory ---------------------------------------------------------

    def inventory(self, gateway_id: str, hints: Sequence[Mapping[str, Any]] = ()) -> Deferred[list[Found]]:
        return Deferred.fromCoroutine(self._inventory(gateway_id, hints))

    def inventory_hosts(self, hints: Sequence[Mapping[str, Any]] = ()) -> list[str]:
        """
        Where kernels of this gateway may run: the hosts of each kernelspec
        (C{hints}; the configured ones for a kernelspec naming none, or
        when no kernelspec names this launcher), and any this launcher has
        used.
        """
        hosts: list[str] = []
        for config in hints or [{}]:
            hosts += _split_hosts(config.get("remote_hosts")) or list(self._settings.remote_hosts)
        hosts += sorted(self._hosts_used)
        return list(dict.fromkeys(hosts))

    async def _inventory(self, gateway_id: str, hints: Sequence[Mapping[str, Any]]) -> list[Found]:
        try:
            check_gateway_id(gateway_id)
        except ValueError as e:
            raise LaunchError(str(e)) from None
        python = self._settings.remote_python or sys.executable
        command = shell_command([python, "-c", INVENTORY_SCRIPT, gateway_id])
        found: list[Found] = []
        for host in self.inventory_hosts(hints):
            if self._stopped:
                # The pool is closed: asking would open a connection again.
                break
            try:
                result = await self.pool.run(host, command, timeout=30)
            except SSHError as e:
                _log.warn(
                    "cannot list this gateway's kernels on {host}: {error}; trying again at the next reconciliation",
                    host=host,
                    error=str(e),
                )
                continue
            if not result.ok:
                _log.warn(
                    "cannot list this gateway's kernels on {host}: {error}", host=host, error=result.describe()
                )
                continue
            for kernel in parse_inventory(host, result.stdout):
                found.append(
                    Found(
                        kernel_id=kernel.kernel_id,
                        launcher=self.name,
                        description=f"processes {', '.join(map(str, kernel.pids))} on {host}",
                        reap=lambda kernel=kernel: Deferred.fromCoroutine(self._reap(kernel)),
                    )
                )
        return found

    async def _reap(self, kernel: RemoteKernelFound) -> None:
        """
        SIGTERM to the kernel's process groups, SIGKILL after
        C{terminate_wait} to what is left, then its log file goes.

        @raise LaunchError: the host could not be reached, or processes
            outlived SIGKILL.
        """
        host = kernel.host
        try:
            remaining = list(kernel.pgids)
            for signum, wait in ((signals.SIGTERM, self._kernels.terminate_wait), (signals.SIGKILL, 5.0)):
                for pgid in remaining:
                    await self.pool.run(host, shell_command(kill_argv(signum, f"-{pgid}")), timeout=15)
                deadline = self._reactor.seconds() + wait
                while True:
                    remaining = [pgid for pgid in remaining if await self._group_alive(host, pgid)]
                    if not remaining or self._reactor.seconds() >= deadline:
                        break
                    await deferLater(self._reactor, 0.25, lambda: None)
                if not remaining:
                    break
            if remaining:
                raise LaunchError(
                    f"processes of kernel {kernel.kernel_id} on {host} outlived SIGKILL (groups {remaining})"
                )
            log = f"{self._settings.kernel_log_dir.rstrip('/')}/kernel-{kernel.kernel_id}.log"
            await self.pool.run(host, shell_command(["rm", "-f", "--", log]), timeout=15)
        except SSHError as e:
            raise LaunchError(f"cannot reach {host} to stop kernel {kernel.kernel_id}: {e}") from None

    async def _group_alive(self, host: str, pgid: int) -> bool:
        result = await self.pool.run(host, shell_command(kill_argv(0, f"-{pgid}")), timeout=15)
        return result.ok

    def stop(self) -> None:
        self._stopped = True
        self.pool.close()
