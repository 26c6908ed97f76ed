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
"""

from __future__ import annotations

import getpass
import socket
from typing import Any, Mapping

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from egateway.clusters.balancing import HostHealth, balancer
from egateway.clusters.interface import (
    ILauncher,
    IKernelProcess,
    LaunchError,
    LaunchRequest,
    LauncherContext,
    Liveness,
    Phase,
    Placement,
)
from egateway.clusters.remote import (
    RemoteKernelProcess,
    _int,
    await_connection_info,
    connection_info,
    launcher_argv,
    response_listener,
)
from egateway.clusters.sshclient import SSHError, SSHPool, SSHSettings, shell_command
from egateway.kernels.env import NAME

_log = Logger()

START_SCRIPT = (
    'IFS= read -r token || true; '
    'if [ -n "$token" ]; then EG_LAUNCH_TOKEN="$token"; export EG_LAUNCH_TOKEN; fi; '
    'log="$1"; shift; '
    'setsid nohup "$@" </dev/null >>"$log" 2>&1 & echo "$!"'
)
"""
Run on the host with C{sh -c}: read the launch token from stdin, start the
rest of the arguments detached in a new session with output to the log
file, and print the pid.  No user-supplied value is part of this text.
"""


def _split_hosts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [h.strip() for h in value.split(",") if h.strip()]
    if isinstance(value, list):
        return [str(h).strip() for h in value if str(h).strip()]
    return []


class SSHKernelProcess(RemoteKernelProcess):
    def __init__(self, *, launcher: "SSHLauncher", host: str, **kw: Any) -> None:
        super().__init__(**kw)
        self._launcher = launcher
        self.host = host

    async def _check_alive(self) -> Liveness:
        result = await self._launcher.pool.run(
            self.host, shell_command(["kill", "-0", str(self.placement.pid)]), timeout=15
        )
        if result.ok:
            return Liveness(True)
        return Liveness(False, f"the kernel process {self.placement.pid} on {self.host} is gone")

    async def _signal_directly(self, signum: int) -> None:
        target = f"-{self.placement.pgid}" if self.placement.pgid else str(self.placement.pid)
        try:
            result = await self._launcher.pool.run(
                self.host, shell_command(["kill", f"-{int(signum)}", "--", target]), timeout=15
            )
        except SSHError as e:
            raise LaunchError(f"cannot signal the kernel on {self.host}: {e}") from None
        if not result.ok and b"No such process" not in result.stderr:
            raise LaunchError(f"kill on {self.host} failed: {result.describe()}")

    async def _release(self) -> None:
        self._launcher.released(self.host)

    def snapshot(self) -> dict:
        return {**super().snapshot(), "launcher": "ssh"}


@implementer(ILauncher)
class SSHLauncher:
    name = "ssh"

    def __init__(self, context: LauncherContext) -> None:
        config = context.settings["config"]
        self._context = context
        self._reactor = context.reactor
        self._settings = config.ssh
        self._kernels = config.kernels
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
        )
        self.balancer = balancer(settings.load_balancing_algorithm)
        self.health = HostHealth(context.reactor, settings.host_backoff, settings.host_backoff_max)
        self._addresses: dict[str, str] = {}

    def released(self, host: str) -> None:
        self.balancer.released(host)

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
        listener = response_listener(self._context)
        pending = listener.expect(request.kernel_id)
        started: tuple[str, int] | None = None
        try:
            host, pid = await self._start_somewhere(request, hosts, listener, pending.token)
            started = (host, pid)
            self.balancer.placed(host)
            request.report(Phase.PLACED, f"{host} pid {pid}")
            info = await await_connection_info(
                pending, self._reactor, lambda: self._launch_ended(host, pid, request.kernel_id)
            )
            address = await self._address(host)
            conn = connection_info(info, address)
            request.report(Phase.CONNECTION_INFO, f"{address} (payload v{pending.version})")
            pgid = _int(info.get("pgid")) or pid
            return SSHKernelProcess(
                launcher=self,
                host=host,
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
                await self._kill_quietly(*started)
            raise

    async def _start_somewhere(
        self, request: LaunchRequest, hosts: list[str], listener: Any, token: str
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
                pid = await self._start_on(host, request, listener, token)
            except SSHError as e:
                failures.append(f"{host}: {e}")
                self.health.failed(host, str(e))
                continue
            self.health.succeeded(host)
            return host, pid

    async def _start_on(self, host: str, request: LaunchRequest, listener: Any, token: str) -> int:
        argv = launcher_argv(
            request.spec,
            request.kernel_id,
            listener,
            str(request.config.get("port_range") or self._kernels.port_range),
            self._settings.remote_python,
        )
        env = {name: value for name, value in request.env.items() if NAME.match(name)}
        log = f"{self._settings.kernel_log_dir.rstrip('/')}/kernel-{request.kernel_id}.log"
        command = shell_command(
            ["sh", "-c", START_SCRIPT, "egateway-launch", log, "env", *(f"{k}={v}" for k, v in env.items()), *argv]
        )
        result = await self.pool.run(host, command, stdin=token.encode() + b"\n", timeout=30)
        if not result.ok:
            raise SSHError(f"starting the kernel failed: {result.describe()}")
        try:
            return int(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise SSHError(f"the host did not report a pid: {result.describe()}") from None

    async def _launch_ended(self, host: str, pid: int, kernel_id: str) -> str | None:
        """
        C{None} while the launcher runs on C{host}; otherwise how it ended,
        with the end of its log.
        """
        try:
            result = await self.pool.run(host, shell_command(["kill", "-0", str(pid)]), timeout=15)
        except SSHError:
            return None
        if result.ok:
            return None
        log = f"{self._settings.kernel_log_dir.rstrip('/')}/kernel-{kernel_id}.log"
        tail = await self.pool.run(host, shell_command(["tail", "-n", "5", log]), timeout=15)
        text = " | ".join(tail.stdout.decode("utf-8", "replace").strip().splitlines())
        explanation = f"the kernel launcher on {host} exited before sending connection info"
        return explanation + (f"; its log {host}:{log} ends: {text}" if text else "")

    async def _kill_quietly(self, host: str, pid: int) -> None:
        for signum in (15, 9):
            try:
                await self.pool.run(host, shell_command(["kill", f"-{signum}", "--", f"-{pid}"]), timeout=10)
            except SSHError:
                return

    def restore(self, kernel_id: str, snapshot: Mapping[str, Any]) -> Deferred[IKernelProcess]:
        return Deferred.fromCoroutine(self._restore(kernel_id, snapshot))

    async def _restore(self, kernel_id: str, snapshot: Mapping[str, Any]) -> IKernelProcess:
        try:
            host = str(snapshot["host"])
            info = connection_info(snapshot["connection_info"], str(snapshot["ip"]))
            pid = int(snapshot["pid"])
        except (KeyError, TypeError, ValueError) as e:
            raise LaunchError(f"bad ssh snapshot: {e}") from None
        process = SSHKernelProcess(
            launcher=self,
            host=host,
            kernel_id=kernel_id,
            info=info,
            placement=Placement(host=host, ip=info.ip, pid=pid, pgid=_int(snapshot.get("pgid")) or pid),
            reactor=self._reactor,
            poll_interval=self._kernels.poll_interval,
            comm_port=_int(snapshot.get("comm_port")),
            comm_token=snapshot.get("comm_token"),
        )
        liveness = await process.poll()
        if not liveness.alive:
            await process.cleanup()
            raise LaunchError(f"kernel {kernel_id} on {host} is no longer running")
        self.balancer.placed(host)
        return process

    def stop(self) -> None:
        self.pool.close()
