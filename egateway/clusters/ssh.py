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
constant script followed by quoted arguments (the environment as
C{NAME=value} arguments to C{env}, then the argv).  The launch token travels
on the channel's stdin, so it never appears in a process listing.

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
import json
import signal as signals
import socket
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from twisted.conch.ssh import keys
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
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
    RemoteKernelProcess,
    _int,
    await_connection_info,
    connection_info,
    launcher_argv,
    response_listener,
)
from egateway.clusters.sshclient import SSHAuthError, SSHError, SSHPool, SSHSettings, load_keys, shell_command
from egateway.kernels.env import NAME

_log = Logger()

START_SCRIPT = (
    'IFS= read -r token || true; '
    'if [ -n "$token" ]; then EG_LAUNCH_TOKEN="$token"; export EG_LAUNCH_TOKEN; fi; '
    'log="$1"; shift; '
    'mask=$(umask); umask 077; : >>"$log"; umask "$mask"; '
    'setsid nohup "$@" </dev/null >>"$log" 2>&1 & echo "$!"'
)
"""
Run on the host with C{sh -c}: read the launch token from stdin, create
the log file readable by its owner only, start the rest of the arguments
detached in a new session with output to the log file, and print the pid.
No user-supplied value is part of this text.
"""


INVENTORY_SCRIPT = r"""
import json, os, sys
tag = ("EGATEWAY_ID=" + sys.argv[1]).encode()
def netns(pid):
    try:
        return os.readlink("/proc/%s/ns/net" % pid)
    except OSError:
        return None
here = netns("self")
for name in os.listdir("/proc"):
    if not name.isdigit() or int(name) == os.getpid():
        continue
    try:
        with open("/proc/%s/environ" % name, "rb") as f:
            env = f.read().split(b"\0")
        if tag not in env or netns(name) != here:
            continue
        with open("/proc/%s/stat" % name, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        if fields[0] == b"Z":
            continue
        kernel = [e[10:].decode("ascii", "replace") for e in env if e.startswith(b"KERNEL_ID=")]
        print(json.dumps({"pid": int(name), "pgid": int(fields[2]), "kernel_id": kernel[0] if kernel else ""}))
    except (OSError, IndexError, ValueError):
        continue
"""
"""
Run on a host with C{python -c}, the gateway id as its one argument: one
JSON line per live process whose environment holds C{EGATEWAY_ID=<id>}, in
the same network namespace as the script (the host's, not a container's,
nor another test host's sharing the machine).
"""


@dataclass(frozen=True)
class RemoteKernelFound:
    """
    The processes of one kernel found on a host, with their process groups.
    """

    kernel_id: str
    host: str
    pids: tuple[int, ...]
    pgids: tuple[int, ...]


def parse_inventory(host: str, output: bytes) -> list[RemoteKernelFound]:
    """
    L{INVENTORY_SCRIPT}'s output, grouped by kernel.  Lines that are not
    what the script prints, and kernel ids that are not UUIDs, are
    skipped: what a host says reaches a kill command and a file name.
    """
    pids: dict[str, set[int]] = {}
    pgids: dict[str, set[int]] = {}
    for line in output.decode("utf-8", "replace").splitlines():
        try:
            item = json.loads(line)
            pid, pgid, kernel_id = int(item["pid"]), int(item["pgid"]), str(item["kernel_id"])
        except (ValueError, TypeError, KeyError):
            continue
        if pid <= 1 or pgid <= 1 or not _is_uuid(kernel_id):
            continue
        pids.setdefault(kernel_id, set()).add(pid)
        pgids.setdefault(kernel_id, set()).add(pgid)
    return [
        RemoteKernelFound(kernel_id, host, tuple(sorted(pids[kernel_id])), tuple(sorted(pgids[kernel_id])))
        for kernel_id in sorted(pids)
    ]


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def kill_argv(signum: int, target: str) -> list[str]:
    """
    C{kill} in the one form that dash's, bash's and procps' C{kill} all
    take (C{kill -s NAME -- target}; dash refuses C{kill -N -- target}):
    the command runs under the login user's shell, or behind sudo.
    """
    if signum == 0:
        name = "0"
    else:
        try:
            name = signals.Signals(signum).name.removeprefix("SIG")
        except ValueError:
            name = str(int(signum))
    return ["kill", "-s", name, "--", target]


@dataclass(frozen=True)
class RunAs:
    """
    Whom a kernel's commands run as on its host.

    @ivar login: the user to log in as (C{None}: C{remote_user}).
    @ivar prefix: the command (C{sudo_command}) that runs the rest as the
        kernel's user, or nothing.
    @ivar user: the kernel's user when impersonated, else empty.
    """

    login: str | None = None
    prefix: tuple[str, ...] = ()
    user: str = ""

    def command(self, argv: list[str]) -> str:
        """
        One shell command line running C{argv} as this user, every
        argument quoted.
        """
        return shell_command([*self.prefix, *argv])

    @classmethod
    def for_user(cls, impersonation: Impersonation, username: str) -> "RunAs":
        """
        How to run as C{username} under the impersonation settings.

        @raise LaunchError: 403, a user who may not be impersonated.
        """
        if not impersonation.enabled:
            return cls()
        user = impersonation.check_name(username)
        if impersonation.ssh_mode == "login":
            return cls(login=user, user=user)
        return cls(prefix=tuple(impersonation.sudo_argv(user)), user=user)


def _split_hosts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [h.strip() for h in value.split(",") if h.strip()]
    if isinstance(value, list):
        return [str(h).strip() for h in value if str(h).strip()]
    return []


class SSHKernelProcess(RemoteKernelProcess):
    def __init__(self, *, launcher: "SSHLauncher", host: str, run_as: RunAs = RunAs(), **kw: Any) -> None:
        super().__init__(**kw)
        self._launcher = launcher
        self.host = host
        self.run_as = run_as

    async def _check_alive(self) -> Liveness:
        result = await self._launcher.pool.run(
            self.host, self.run_as.command(kill_argv(0, str(self.placement.pid))), timeout=15,
            user=self.run_as.login,
        )
        if result.ok:
            return Liveness(True)
        return Liveness(False, f"the kernel process {self.placement.pid} on {self.host} is gone")

    async def _group_alive(self) -> bool:
        if not self.placement.pgid:
            return False
        result = await self._launcher.pool.run(
            self.host, self.run_as.command(kill_argv(0, f"-{self.placement.pgid}")), timeout=15,
            user=self.run_as.login,
        )
        return result.ok

    async def _signal_directly(self, signum: int) -> None:
        target = f"-{self.placement.pgid}" if self.placement.pgid else str(self.placement.pid)
        try:
            result = await self._launcher.pool.run(
                self.host, self.run_as.command(kill_argv(signum, target)), timeout=15,
                user=self.run_as.login,
            )
        except SSHError as e:
            raise LaunchError(f"cannot signal the kernel on {self.host}: {e}") from None
        if not result.ok and b"No such process" not in result.stderr:
            raise LaunchError(f"kill on {self.host} failed: {result.describe()}")

    async def _release(self) -> None:
        self._launcher.released(self.host)

    def snapshot(self) -> dict:
        return {**super().snapshot(), "launcher": "ssh", "user": self.run_as.user}


@implementer(ILauncher, ILauncherInventory)
class SSHLauncher:
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
        return await deferToThreadPool(self._reactor, self._reactor.getThreadPool(), load_keys, [path])

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

    def launch(self, request: LaunchRequest) -> Deferred[IKernelProcess]:
        return Deferred.fromCoroutine(self._launch(request))

    async def _launch(self, request: LaunchRequest) -> IKernelProcess:
        hosts = self.hosts_for(request)
        run_as = RunAs.for_user(self.impersonation, request.username)
        listener = response_listener(self._context)
        pending = listener.expect(request.kernel_id)
        started: tuple[str, int] | None = None
        try:
            host, pid = await self._start_somewhere(request, hosts, listener, pending.token, run_as)
            started = (host, pid)
            self._hosts_used.add(host)
            self.balancer.placed(host)
            request.report(Phase.PLACED, f"{host} pid {pid}" + (f" as {run_as.user}" if run_as.user else ""))
            info = await await_connection_info(
                pending, self._reactor, lambda: self._launch_ended(host, pid, request.kernel_id, run_as)
            )
            address = await self._address(host)
            conn = connection_info(info, address)
            request.report(Phase.CONNECTION_INFO, f"{address} (payload v{pending.version})")
            pgid = _int(info.get("pgid")) or pid
            return SSHKernelProcess(
                launcher=self,
                host=host,
                run_as=run_as,
                kernel_id=request.kernel_id,
                info=conn,
                placement=Placement(host=host, ip=address, pid=_int(info.get("pid")) or pid, pgid=pgid),
                reactor=self._reactor,
                poll_interval=self._kernels.poll_interval,
                comm_port=_int(info.get("comm_port")),
                comm_token=pending.comm_token,
                pending=pending,
            )
        except BaseException:
            pending.cancel()
            if started is not None:
                self.balancer.released(started[0])
                await self._kill_quietly(*started, run_as)
            raise

    async def _start_somewhere(
        self, request: LaunchRequest, hosts: list[str], listener: Any, token: str, run_as: RunAs
    ) -> tuple[str, int]:
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
                pid = await self._start_on(host, request, listener, token, run_as)
            except SSHError as e:
                if isinstance(e, SSHAuthError) and run_as.login is not None:
                    # The user's key is at fault, not the host.
                    raise LaunchError(f"cannot log in to {host} as {run_as.login}: {e}", status=403) from None
                failures.append(f"{host}: {e}")
                self.health.failed(host, str(e))
                continue
            self.health.succeeded(host)
            return host, pid

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

    async def _start_on(self, host: str, request: LaunchRequest, listener: Any, token: str, run_as: RunAs) -> int:
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
        command = run_as.command(
            ["sh", "-c", START_SCRIPT, "egateway-launch", log, "env", *(f"{k}={v}" for k, v in env.items()), *argv]
        )
        result = await self.pool.run(host, command, stdin=token.encode() + b"\n", timeout=30, user=run_as.login)
        if not result.ok:
            raise SSHError(f"starting the kernel failed: {result.describe()}")
        try:
            return int(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise SSHError(f"the host did not report a pid: {result.describe()}") from None

    async def _launch_ended(self, host: str, pid: int, kernel_id: str, run_as: RunAs = RunAs()) -> str | None:
        """
        C{None} while the launcher runs on C{host}; otherwise how it ended,
        with the end of its log.
        """
        try:
            result = await self.pool.run(
                host, run_as.command(kill_argv(0, str(pid))), timeout=15, user=run_as.login
            )
        except SSHError:
            return None
        if result.ok:
            return None
        log = f"{self._settings.kernel_log_dir.rstrip('/')}/kernel-{kernel_id}.log"
        tail = await self.pool.run(host, run_as.command(["tail", "-n", "5", log]), timeout=15, user=run_as.login)
        text = " | ".join(tail.stdout.decode("utf-8", "replace").strip().splitlines())
        explanation = f"the kernel launcher on {host} exited before sending connection info"
        return explanation + (f"; its log {host}:{log} ends: {text}" if text else "")

    async def _kill_quietly(self, host: str, pid: int, run_as: RunAs = RunAs()) -> None:
        for signum in (15, 9):
            try:
                await self.pool.run(
                    host, run_as.command(kill_argv(signum, f"-{pid}")), timeout=10, user=run_as.login
                )
            except SSHError:
                return

    def restore(self, kernel_id: str, snapshot: Mapping[str, Any]) -> Deferred[IKernelProcess]:
        return Deferred.fromCoroutine(self._restore(kernel_id, snapshot))

    async def _restore(self, kernel_id: str, snapshot: Mapping[str, Any]) -> IKernelProcess:
        try:
            host = str(snapshot["host"])
            info = connection_info(snapshot["connection_info"], str(snapshot["ip"]))
            pid = int(snapshot["pid"])
            user = str(snapshot.get("user") or "")
            run_as = RunAs.for_user(self.impersonation, user) if user else RunAs()
        except (KeyError, TypeError, ValueError) as e:
            raise LaunchError(f"bad ssh snapshot: {e}") from None
        process = SSHKernelProcess(
            launcher=self,
            host=host,
            run_as=run_as,
            kernel_id=kernel_id,
            info=info,
            placement=Placement(host=host, ip=info.ip, pid=pid, pgid=_int(snapshot.get("pgid")) or pid),
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
