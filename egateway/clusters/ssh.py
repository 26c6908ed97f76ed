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

The gateway signals only what it started, and only while the pid is still
that process (L{egateway.clusters.ssh_process}); the C{pid} and C{pgid} a
launcher puts in its connection info are not used for it.  Which host a
kernel goes to, and the next one when a host fails, is
L{egateway.clusters.ssh_placement}'s; the scripts run on the hosts are in
L{egateway.clusters.ssh_host}.

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
environment (C{EGATEWAY_ID}), by which the inventory (L{ILauncherInventory})
finds this gateway's processes on each host, to be reaped, not adopted.
"""

from __future__ import annotations

import getpass
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from twisted.conch.ssh import keys
from twisted.logger import Logger
from zope.interface import implementer

from egateway.clusters.interface import (
    ENV_NAME as NAME,
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
)
from egateway.clusters.remote import Placed, RemoteKernelProcess, RemoteLaunch, RemoteLauncher, reported_id
from egateway.clusters.response import PendingLaunch
from egateway.clusters.ssh_host import NOT_THE_KERNEL, RunAs, StartedProcess
from egateway.clusters.ssh_placement import HostPlacement
from egateway.clusters.ssh_process import HostProcesses
from egateway.clusters.sshclient import SSHError, SSHPool, SSHSettings, load_keys
from egateway.wire.channels import ConnectionInfo

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
        The checked kill on the host.  With a group target the group
        leader is the one checked.
        """
        pid = self.placement.pgid if group and self.placement.pgid else self.placement.pid
        start_time = self.start_time if pid == self.placement.pid else ""
        return await self._launcher.processes.kill(
            self.host, self.run_as, self.kernel_id, pid, start_time, signum, group
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
        self._launcher.hosts.released(self.host)

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
        super().__init__(context)
        self._stopped = False
        self._settings = settings = context.section
        pool = SSHPool(
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
        self.hosts = HostPlacement(context.reactor, settings)
        self.processes = HostProcesses(pool, context.reactor, self.impersonation, settings.kernel_log_dir)

    @property
    def pool(self) -> SSHPool:
        return self.processes.pool

    @property
    def health(self) -> Any:
        """
        The hosts' health and back-off (the dashboard shows it).
        """
        return self.hosts.health

    async def _user_keys(self, user: str) -> list[keys.Key]:
        """
        The key to log in as C{user} ("login" impersonation), read in a
        thread (C{~user} is an account lookup).
        """
        path = self.impersonation.key_file(user)
        return await self._context.run_blocking(load_keys, [path])

    # -- the launch's steps (the sequence is RemoteLauncher's) ---------------

    async def _prepare(self, request: LaunchRequest) -> "_HostLaunch":
        return _HostLaunch(self.hosts.hosts_for(request), RunAs.for_user(self.impersonation, request.username))

    async def _submit(self, launch: RemoteLaunch) -> None:
        state = launch.state

        async def start(host: str) -> StartedProcess:
            launch.request.report(Phase.SUBMITTED, f"ssh {host}")
            # Only this host may answer with version 1 connection info.
            launch.pending.expect_from([await self.hosts.address(host)])
            return await self._start_on(host, launch.request, launch.listener, launch.pending, state.run_as)

        state.host, state.process = await self.hosts.first_working(state.hosts, start)
        self.hosts.placed(state.host)

    async def _await_placement(self, launch: RemoteLaunch) -> Placed:
        state = launch.state
        detail = f"{state.host} pid {state.process.pid}" + (f" as {state.run_as.user}" if state.run_as.user else "")
        return Placed(state.host, await self.hosts.address(state.host), detail)

    async def _launch_ended(self, launch: RemoteLaunch) -> str | None:
        state = launch.state
        return await self.processes.exited(state.host, state.run_as, launch.request.kernel_id, state.process)

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
            **self._kernel_arguments(launch, info, payload),
        )

    async def _abandon(self, launch: RemoteLaunch) -> None:
        state = launch.state
        if state.process is not None:
            self.hosts.released(state.host)
            await self.processes.kill_quietly(state.host, state.run_as, launch.request.kernel_id, state.process)

    async def _start_on(
        self, host: str, request: LaunchRequest, listener: Any, pending: PendingLaunch, run_as: RunAs
    ) -> StartedProcess:
        """
        Start the kernel-side launcher on C{host}, with the kernel's
        environment (and this gateway's id) and, unless Enterprise
        Gateway's launcher runs (it cannot use it), the launch token.
        """
        argv = self._launcher_argv(request, listener, self._settings.remote_python)
        env = self.impersonation.remote_env({name: value for name, value in request.env.items() if NAME.match(name)})
        if self._gateway_id:
            env[GATEWAY_ID_ENV] = self._gateway_id
        token = "" if pending.accept_v1 else pending.token
        return await self.processes.start(host, run_as, request.kernel_id, argv, token, env)

    async def _restore(self, kernel_id: str, snapshot: Mapping[str, Any]) -> IKernelProcess:
        arguments = self._restored_arguments(kernel_id, snapshot)
        try:
            host = str(snapshot["host"])
            pid = reported_id(snapshot["pid"])
            if not pid:
                raise ValueError(f"pid {snapshot['pid']!r} names no single kernel")
            user = str(snapshot.get("user") or "")
            run_as = RunAs.for_user(self.impersonation, user) if user else RunAs()
        except (KeyError, TypeError, ValueError) as e:
            raise LaunchError(f"bad ssh snapshot: {e}") from None
        process = SSHKernelProcess(
            launcher=self,
            host=host,
            run_as=run_as,
            start_time=str(snapshot.get("start_time") or ""),
            placement=Placement(
                host=host, ip=arguments["info"].ip, pid=pid, pgid=reported_id(snapshot.get("pgid")) or pid
            ),
            **arguments,
        )
        self.hosts.used(host)
        liveness = await process.poll()
        if not liveness.alive:
            await process.cleanup()
            raise LaunchError(f"kernel {kernel_id} on {host} is no longer running")
        self.hosts.placed(host)
        return process

    async def _find(self, gateway_id: str, hints: Sequence[Mapping[str, Any]]) -> list[Found]:
        kernels = await self.processes.find(
            self.hosts.inventory_hosts(hints),
            gateway_id,
            self._settings.remote_python or sys.executable,
            lambda: self._stopped,
        )
        return [
            self._found(
                kernel.kernel_id,
                f"processes {', '.join(map(str, kernel.pids))} on {kernel.host}",
                lambda kernel=kernel: self.processes.reap(kernel, self._kernels.terminate_wait),
            )
            for kernel in kernels
        ]

    def stop(self) -> None:
        self._stopped = True
        self.pool.close()
