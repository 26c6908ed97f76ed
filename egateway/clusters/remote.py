"""
What every launcher of remote kernels shares: the response listener that
receives connection info, the argv and environment a kernel-side launcher
gets, waiting for connection info while watching the launch for an early
death, and L{RemoteKernelProcess}, the kernel as a remote launcher controls
it (comm port first, the cluster's own means as a fallback, liveness by
polling).

A concrete launcher (SSH, Slurm, ...) writes only its steps: subclassing
L{RemoteLauncher}, how to start the kernel-side launcher, where it landed,
whether it died first, the kernel it became and what to remove when a launch
fails (C{_prepare}, C{_submit}, C{_await_placement}, C{_launch_ended},
C{_kernel}, C{_abandon}), how to rebuild a kernel from its record
(C{_restore}) and, for the inventory, how to find its leftovers (C{_find});
subclassing L{RemoteKernelProcess}, how to check liveness, how to signal
without the comm port, how to stop the kernel for good.  The rest (the
sequence, the handshake, the settings every launcher reads, the snapshot's
common fields, the inventory's checks, waiting with a deadline, log paths
and their quotes, resolving a node's address) is here.
"""

from __future__ import annotations

import signal as signals
import socket
import sys
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, Mapping, Sequence

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from zope.interface import implementer

from egateway.clusters.comm import CommClient, CommError
from egateway.clusters.impersonation import Impersonation
from egateway.clusters.interface import (
    ExitStatus,
    Found,
    IKernelProcess,
    LaunchError,
    LaunchRequest,
    LauncherContext,
    Liveness,
    Phase,
    Placement,
    check_gateway_id,
    substitute_argv,
)
from egateway.clusters.local import PYTHON_NAMES
from egateway.clusters.response import PendingLaunch, ResponseListener
from egateway.observe import OneShotObserver, Operation, first
from egateway.wire.channels import ConnectionInfo

_log = Logger()

UNKEYED_LAUNCHER = (
    "the kernel's launcher provided no CurveZMQ key (Enterprise Gateway's launchers and version 1 launches "
    "never do; egateway's launcher does with a launch token and ipykernel 7.4 or newer)"
)
"""
Why a remote kernel is not encrypted when its launcher did not say.
"""

TERMINATE_POLL = 0.25
"""
Seconds between liveness checks while a kernel is being stopped.
"""


def response_listener(context: LauncherContext) -> ResponseListener:
    """
    The gateway's response listener, bound on first use: a gateway that
    only runs local kernels never opens the port.

    @raise LaunchError: the port cannot be bound.
    """
    listener = context.services.get("response")
    if listener is None:
        listener = ResponseListener.from_config(context.reactor, context.shared.response)
        context.services["response"] = listener
    if not listener.running:
        try:
            listener.startService()
        except Exception as e:
            raise LaunchError(
                f"cannot open the response listener for remote kernels: {e}; "
                "set response_port (EG_RESPONSE_PORT) or response_ip (EG_RESPONSE_IP)"
            ) from None
    return listener


ENTERPRISE_GATEWAY_LAUNCHER = "enterprise-gateway"
"""
The value of a kernelspec's C{kernel_launcher} (in its launcher config)
saying that its argv runs Enterprise Gateway's own kernel launcher, which
can only send version 1 connection info.
"""


def declared_kernel_launcher(spec: Any) -> str:
    """
    The kernelspec's own C{kernel_launcher} value (normalised), or C{""}.
    Only the kernelspec (the operator's file) can say which launcher its
    argv runs: neither a client nor a profile's defaults are asked.
    """
    config = getattr(spec, "launcher_config", None) or {}
    return str(config.get("kernel_launcher") or "").strip().lower().replace("_", "-")


def runs_enterprise_gateway_launcher(spec: Any) -> bool:
    """
    Whether the kernelspec declares that it runs Enterprise Gateway's
    kernel launcher.
    """
    return declared_kernel_launcher(spec) == ENTERPRISE_GATEWAY_LAUNCHER


def in_enterprise_gateway_form(spec: Any) -> bool:
    """
    Whether the kernelspec is written in Enterprise Gateway's dialect
    (C{metadata.process_proxy}) without saying which launcher it runs: an
    Enterprise Gateway kernelspec copied unchanged, whose argv most likely
    runs Enterprise Gateway's own launcher.
    """
    metadata = getattr(spec, "metadata", None) or {}
    return (
        isinstance(metadata.get("process_proxy"), dict)
        and not isinstance(metadata.get("egateway"), dict)
        and not declared_kernel_launcher(spec)
    )


def expect_launch(listener: ResponseListener, request: Any) -> PendingLaunch:
    """
    Register C{request}'s launch with the response listener.  Version 1
    (unauthenticated) connection info is allowed only for a kernelspec
    that runs Enterprise Gateway's launcher, and only when the operator
    turned C{response_accept_v1} on; every other launch must prove the
    launch token (version 2).

    @raise LaunchError: the kernelspec runs Enterprise Gateway's launcher
        but version 1 is off, so the launch could only time out.
    """
    accept_v1 = bool(getattr(listener, "accept_v1", False))
    legacy = runs_enterprise_gateway_launcher(request.spec)
    if legacy and not accept_v1:
        raise LaunchError(
            f"kernelspec {getattr(request.spec, 'name', '')!r} runs Enterprise Gateway's kernel launcher "
            f"(kernel_launcher = {ENTERPRISE_GATEWAY_LAUNCHER!r}), which sends unauthenticated version 1 "
            "connection info; the gateway refuses that unless response_accept_v1 (EG_RESPONSE_ACCEPT_V1) is "
            "on: see the README's security section before turning it on"
        )
    # An unchanged Enterprise Gateway kernelspec may answer in version 1
    # once the operator turned it on; with version 1 off it is not refused
    # here, because its argv may run egateway's launcher (version 2).
    legacy = legacy or (accept_v1 and in_enterprise_gateway_form(request.spec))
    return listener.expect(request.kernel_id, accept_v1=legacy)


def launcher_argv(
    spec: Any,
    request_kernel_id: str,
    listener: ResponseListener,
    port_range: str,
    python: str,
    extra: Mapping[str, str] | None = None,
) -> list[str]:
    """
    The kernelspec's argv for a remote kernel-side launcher, placeholders
    substituted (each stays one argument) and C{python} replaced by the
    remote interpreter.
    """
    values = {
        "kernel_id": request_kernel_id,
        "response_address": listener.response_address,
        "public_key": listener.public_key,
        "port_range": port_range,
        "resource_dir": spec.resource_dir,
        "prefix": sys.prefix,
        **(extra or {}),
    }
    argv = substitute_argv(spec.argv, values)
    if argv and argv[0] in PYTHON_NAMES:
        argv[0] = python or sys.executable
    return argv


async def await_connection_info(
    pending: PendingLaunch,
    clock: Any,
    still_running: Callable[[], Awaitable[str | None]],
    interval: float = 1.0,
) -> dict[str, Any]:
    """
    Wait for the kernel-side launcher's connection info, checking every
    C{interval} seconds that the launch is still alive.

    @param still_running: returns C{None} while the launch lives, or a
        sentence saying how it ended (with whatever log it left).
    @raise LaunchError: the launch ended before reporting.
    """
    waiting: Operation[dict[str, Any]] = Operation("connection info", _await(pending.received))
    while True:
        tick = deferLater(clock, interval, lambda: None)
        index, result = await first([waiting.observe(), tick])
        if index == 0:
            return result
        ended = await still_running()
        if ended is not None:
            raise LaunchError(ended)


async def _await(d: Deferred[Any]) -> Any:
    return await d


def connection_info(info: Mapping[str, Any], ip: str) -> ConnectionInfo:
    """
    The kernel's connection info with the address the gateway reaches it
    at (launchers report 0.0.0.0).

    @raise LaunchError: the launcher sent malformed connection info.
    """
    try:
        parsed = ConnectionInfo.from_dict({**info, "ip": ip})
    except ValueError as e:
        raise LaunchError(f"the kernel launcher sent bad connection info: {e}") from None
    if not parsed.encrypted and not parsed.encryption_reason:
        parsed = replace(parsed, encryption_reason=UNKEYED_LAUNCHER)
    return parsed


def as_int(value: Any) -> int:
    """
    C{value} as an int, 0 when it is none (a field a payload, snapshot or
    engine answer may lack or garble).
    """
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def reported_id(value: Any) -> int:
    """
    A pid or process group id a launcher or a record reports, or 0 when
    it is none: 0, 1 and negative numbers name no single kernel
    (C{kill -- -1} signals every process the user may signal).
    """
    number = as_int(value)
    return number if number > 1 else 0


def signal_name(signum: int) -> str:
    """
    The signal's name without C{SIG} (C{"INT"}), as C{kill -s} and
    C{scancel --signal} take it, or its number when it has no name (0).
    """
    try:
        return signals.Signals(signum).name.removeprefix("SIG")
    except ValueError:
        return str(int(signum))


def kernel_log(directory: str, kernel_id: str) -> str:
    """
    Where a kernel-side launcher's output goes on its host (or shared file
    system): C{<directory>/kernel-<id>.log}.
    """
    return f"{directory.rstrip('/')}/kernel-{kernel_id}.log"


def with_log_tail(explanation: str, where: str, text: str, lines: int = 5) -> str:
    """
    C{explanation}, then the last C{lines} lines of a log (C{text}) on one
    line: C{"...; its <where> ends: a | b"}, so a launch that died says why.
    """
    tail = " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])
    return explanation + (f"; its {where} ends: {tail}" if tail else "")


async def resolve_address(reactor: Any, name: str) -> str:
    """
    C{name} if it is an IPv4 or IPv6 address, else what it resolves to.

    @raise twisted.internet.error.DNSLookupError: it does not resolve.
    """
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in name else socket.AF_INET, name)
        return name
    except OSError:
        return await reactor.resolve(name)


async def wait_until(clock: Any, done: Callable[[], Awaitable[bool]], timeout: float, interval: float) -> bool:
    """
    Ask C{done} now and every C{interval} seconds until it says yes or
    C{timeout} seconds have passed: whether it said yes.  (Stopping what a
    cluster runs is asynchronous: a kill or a cancel is followed by this.)
    """
    deadline = clock.seconds() + timeout
    while not await done():
        if clock.seconds() >= deadline:
            return False
        await deferLater(clock, interval, lambda: None)
    return True


@dataclass
class RemoteLaunch:
    """
    One launch in progress, as the skeleton (L{RemoteLauncher}) hands it
    to a launcher's steps: the request, the response listener and the
    pending handshake, and C{state}, whatever the launcher's own steps keep
    (the result of L{RemoteLauncher._prepare}; the steps add to it).
    """

    request: LaunchRequest
    listener: ResponseListener
    pending: PendingLaunch
    state: Any


@dataclass(frozen=True)
class Placed:
    """
    Where a submitted kernel landed: the host (node) name, the address the
    gateway reaches it at (the only one version 1 connection info is taken
    from), and the C{placed} phase's detail.
    """

    host: str
    address: str
    detail: str


class RemoteLauncher:
    """
    The launch sequence every remote launcher shares; a launcher supplies
    only its steps.

    L{launch} runs: C{_prepare} (checks and reservations that need no
    handshake: status 400/403 failures come before anything starts), the
    response listener and the pending handshake, C{_submit} (start the
    kernel-side launcher; reports C{submitted} itself, once per attempt or
    pending reason), C{_await_placement}, then, with version 1 connection
    info allowed from the placement's address only, the C{placed} phase, the
    connection info (C{_launch_ended} is asked every C{_poll_interval}
    seconds whether the launch died first), the C{connection-info} phase and
    C{_kernel}.  On any failure or cancellation the handshake is cancelled
    and C{_abandon} removes whatever the steps started.

    L{restore} runs C{_restore} (L{_restored_arguments} reads what every
    snapshot holds); L{inventory} checks the gateway id and runs C{_find}
    (each entry made by L{_found}).  A launcher without an inventory leaves
    C{_find} out and does not declare C{ILauncherInventory}.
    """

    name: str

    def __init__(self, context: LauncherContext) -> None:
        """
        The settings every launcher reads: the gateway id, the kernels'
        settings, impersonation.  A launcher reads its own section after.
        """
        self._context = context
        self._reactor = context.reactor
        self._gateway_id = context.shared.gateway_id
        self._kernels = context.shared.kernels
        self.impersonation = Impersonation(context.shared.impersonation)

    # -- the steps ---------------------------------------------------------

    async def _prepare(self, request: LaunchRequest) -> Any:
        """
        Check the request before anything starts; the launch's C{state}.
        """
        raise NotImplementedError()

    async def _submit(self, launch: RemoteLaunch) -> None:
        """
        Start the kernel-side launcher (C{launcher_argv}) on the cluster.
        """
        raise NotImplementedError()

    async def _await_placement(self, launch: RemoteLaunch) -> Placed:
        """
        Wait until the cluster says where the kernel runs.
        """
        raise NotImplementedError()

    async def _launch_ended(self, launch: RemoteLaunch) -> str | None:
        """
        C{None} while the launch lives, else how it ended (with its log).
        """
        raise NotImplementedError()

    def _kernel(
        self, launch: RemoteLaunch, placed: Placed, info: ConnectionInfo, payload: Mapping[str, Any]
    ) -> IKernelProcess:
        """
        The launched kernel, from its connection info and raw payload.
        """
        raise NotImplementedError()

    async def _abandon(self, launch: RemoteLaunch) -> None:
        """
        The launch failed or was cancelled: remove what the steps started.
        """

    async def _restore(self, kernel_id: str, snapshot: Mapping[str, Any]) -> IKernelProcess:
        """
        The kernel a snapshot (L{RemoteKernelProcess.snapshot}) describes,
        once the cluster confirms it still runs (L{_restored_arguments}
        reads the common fields).

        @raise LaunchError: a bad snapshot, or the kernel is gone.
        """
        raise NotImplementedError()

    async def _find(self, gateway_id: str, hints: Sequence[Mapping[str, Any]]) -> list[Found]:
        """
        For the inventory: what of this gateway (C{gateway_id}, checked)
        runs on the cluster, each with a way to reap it (L{_found}).
        C{hints} are the launcher configs of the kernelspecs that name this
        launcher.
        """
        raise NotImplementedError()

    _poll_interval: float = 1.0

    def _kernel_arguments(
        self, launch: RemoteLaunch, info: ConnectionInfo, payload: Mapping[str, Any]
    ) -> dict[str, Any]:
        """
        What every step's L{RemoteKernelProcess} is built with: the
        connection info, the comm port the payload names and the comm token
        the handshake agreed, and the pending handshake it releases.
        """
        return {
            "kernel_id": launch.request.kernel_id,
            "info": info,
            "reactor": self._reactor,
            "poll_interval": self._kernels.poll_interval,
            "comm_port": as_int(payload.get("comm_port")),
            "comm_token": launch.pending.comm_token,
            "pending": launch.pending,
        }

    def _restored_arguments(self, kernel_id: str, snapshot: Mapping[str, Any]) -> dict[str, Any]:
        """
        What a restored L{RemoteKernelProcess} is built with: the recorded
        connection info at the recorded address, the comm port and token.

        @raise LaunchError: the snapshot lacks them.
        """
        try:
            info = connection_info(snapshot["connection_info"], str(snapshot["ip"]))
        except (KeyError, TypeError) as e:
            why = f"missing {e}" if isinstance(e, KeyError) else str(e)
            raise LaunchError(f"bad {self.name} snapshot: {why}") from None
        return {
            "kernel_id": kernel_id,
            "info": info,
            "reactor": self._reactor,
            "poll_interval": self._kernels.poll_interval,
            "comm_port": as_int(snapshot.get("comm_port")),
            "comm_token": snapshot.get("comm_token"),
        }

    def _snapshot_fields(self, snapshot: Mapping[str, Any], *keys: str) -> list[str]:
        """
        The launcher's own fields of a snapshot (job id, container id, pod
        name...), as text.

        @raise LaunchError: one is missing.
        """
        try:
            return [str(snapshot[key]) for key in keys]
        except KeyError as e:
            raise LaunchError(f"bad {self.name} snapshot: missing {e}") from None

    def _launcher_argv(self, request: LaunchRequest, listener: ResponseListener, python: str) -> list[str]:
        """
        The kernelspec's argv for the kernel-side launcher (L{launcher_argv})
        with the kernelspec's or the gateway's port range.
        """
        port_range = str(request.config.get("port_range") or self._kernels.port_range)
        return launcher_argv(request.spec, request.kernel_id, listener, port_range, python)

    def _found(
        self, kernel_id: str, description: str, reap: Callable[[], Awaitable[None]], spec_name: str = ""
    ) -> Found:
        """
        An inventory entry of this launcher that C{reap} stops.
        """
        return Found(
            kernel_id=kernel_id,
            launcher=self.name,
            description=description,
            reap=lambda: Deferred.fromCoroutine(reap()),
            spec_name=spec_name,
        )

    # -- the sequence ------------------------------------------------------

    def launch(self, request: LaunchRequest) -> Deferred[IKernelProcess]:
        return Deferred.fromCoroutine(self._launch(request))

    def restore(self, kernel_id: str, snapshot: Mapping[str, Any]) -> Deferred[IKernelProcess]:
        return Deferred.fromCoroutine(self._restore(kernel_id, snapshot))

    def inventory(self, gateway_id: str, hints: Sequence[Mapping[str, Any]] = ()) -> Deferred[list[Found]]:
        return Deferred.fromCoroutine(self._inventory(gateway_id, hints))

    async def _inventory(self, gateway_id: str, hints: Sequence[Mapping[str, Any]]) -> list[Found]:
        try:
            check_gateway_id(gateway_id)
        except ValueError as e:
            raise LaunchError(str(e)) from None
        return await self._find(gateway_id, hints)

    async def _launch(self, request: LaunchRequest) -> IKernelProcess:
        state = await self._prepare(request)
        listener = response_listener(self._context)
        pending = expect_launch(listener, request)
        launch = RemoteLaunch(request, listener, pending, state)
        try:
            await self._submit(launch)
            placed = await self._await_placement(launch)
            pending.expect_from([placed.address])
            request.report(Phase.PLACED, placed.detail)
            payload = await await_connection_info(
                pending, self._reactor, lambda: self._launch_ended(launch), interval=self._poll_interval
            )
            info = connection_info(payload, placed.address)
            request.report(Phase.CONNECTION_INFO, f"{placed.address} (payload v{pending.version})")
            return self._kernel(launch, placed, info, payload)
        except BaseException:
            pending.cancel()
            await self._abandon(launch)
            raise


@implementer(IKernelProcess)
class RemoteKernelProcess:
    """
    A kernel started by a kernel-side launcher on another host.

    Subclasses implement L{_check_alive}, L{_signal_directly} and may extend
    L{_release} and L{snapshot}.
    """

    def __init__(
        self,
        *,
        kernel_id: str,
        info: ConnectionInfo,
        placement: Placement,
        reactor: Any,
        poll_interval: float,
        comm_port: int = 0,
        comm_token: str | None = None,
        pending: PendingLaunch | None = None,
    ) -> None:
        self.kernel_id = kernel_id
        self.connection_info = info
        self.placement = placement
        self._reactor = reactor
        self.comm_port = comm_port
        self.comm_token = comm_token
        self._pending = pending
        self.comm: CommClient | None = (
            CommClient(reactor, info.ip, comm_port, kernel_id=kernel_id, token=comm_token, timeout=5.0)
            if comm_port
            else None
        )
        self._exit: ExitStatus | None = None
        self._exited: OneShotObserver[ExitStatus] = OneShotObserver()
        self._watch = LoopingCall(self._poll_once)
        self._watch.clock = reactor
        self._watch.start(poll_interval, now=False).addErrback(
            lambda f: _log.failure("kernel {kernel_id}: liveness polling failed", f, kernel_id=kernel_id)
        )
        self._cleaned = False

    # -- for subclasses ------------------------------------------------

    async def _check_alive(self) -> Liveness:
        """
        Ask the cluster (not the launcher) whether the kernel lives.
        """
        raise NotImplementedError()

    async def _signal_directly(self, signum: int) -> None:
        """
        Signal the kernel without the comm port (over SSH, through the
        scheduler ...).
        """
        raise NotImplementedError()

    async def _release(self) -> None:
        """
        Give back what the launch holds (scheduler jobs, host slots).
        """

    # -- IKernelProcess --------------------------------------------------

    def _ended(self, status: ExitStatus) -> None:
        if self._exit is not None:
            return
        self._exit = status
        if self._watch.running:
            self._watch.stop()
        self._exited.fire(status)

    async def _poll_once(self) -> None:
        liveness = await self._liveness()
        if not liveness.alive:
            self._ended(
                ExitStatus(reason=liveness.reason or "the kernel is gone", decision=liveness.decision)
            )

    async def _liveness(self) -> Liveness:
        if self._exit is not None:
            return Liveness(False, self._exit.describe())
        if self.comm is not None and self.comm.version == 2:
            try:
                if await self.comm.alive():
                    return Liveness(True)
            except CommError:
                pass
        try:
            return await self._check_alive()
        except CancelledError:
            raise
        except Exception as e:
            # Cannot tell (host unreachable): a network problem is not a
            # dead kernel.
            _log.warn(
                "kernel {kernel_id}: liveness unknown: {error}", kernel_id=self.kernel_id, error=str(e)
            )
            return Liveness(True, f"unknown: {e}")

    def when_exited(self) -> Deferred[ExitStatus]:
        return self._exited.when_fired()

    def poll(self) -> Deferred[Liveness]:
        return Deferred.fromCoroutine(self._liveness())

    def signal(self, signum: int) -> Deferred[None]:
        return Deferred.fromCoroutine(self._signal(signum))

    async def _signal(self, signum: int) -> None:
        if self._exit is not None:
            return
        if self.comm is not None:
            try:
                await self.comm.signal(signum)
                return
            except CommError as e:
                _log.info(
                    "kernel {kernel_id}: comm port did not take signal {signum} ({error}); "
                    "signalling directly",
                    kernel_id=self.kernel_id,
                    signum=signum,
                    error=str(e),
                )
        await self._signal_directly(signum)

    def terminate(self, grace: float) -> Deferred[ExitStatus]:
        return Deferred.fromCoroutine(self._terminate(grace))

    async def _terminate(self, grace: float) -> ExitStatus:
        for signum, wait in ((signals.SIGTERM, grace), (signals.SIGKILL, max(grace, 5.0))):
            if self._exit is not None:
                break
            try:
                if signum == signals.SIGKILL:
                    await self._signal_directly(signum)
                else:
                    await self._signal(signum)
            except Exception as e:
                _log.warn(
                    "kernel {kernel_id}: signal {signum} failed: {error}",
                    kernel_id=self.kernel_id,
                    signum=signum,
                    error=str(e),
                )
            deadline = self._reactor.seconds() + wait
            while self._exit is None and self._reactor.seconds() < deadline:
                await deferLater(self._reactor, TERMINATE_POLL, lambda: None)
                await self._poll_once()
        if self._exit is not None:
            await self._reap_group()
        return self._exit or ExitStatus(reason="could not be confirmed stopped")

    async def _group_alive(self) -> bool:
        """
        Whether anything the kernel started (its process group on the host)
        still runs once the kernel itself has ended.
        """
        return False

    async def _reap_group(self, wait: float = 5.0) -> None:
        """
        The kernel has ended: wait until its helpers (the launcher's comm
        listener, processes it forked) have gone too, killing them if they
        linger, so a stopped kernel leaves nothing on its host.
        """
        killed = False
        deadline = self._reactor.seconds() + wait
        try:
            while await self._group_alive():
                if self._reactor.seconds() >= deadline:
                    if killed:
                        _log.warn(
                            "kernel {kernel_id}: processes of its group outlived SIGKILL",
                            kernel_id=self.kernel_id,
                        )
                        return
                    await self._signal_directly(signals.SIGKILL)
                    killed = True
                    deadline = self._reactor.seconds() + wait
                await deferLater(self._reactor, TERMINATE_POLL, lambda: None)
        except Exception as e:
            _log.warn(
                "kernel {kernel_id}: could not check its process group: {error}",
                kernel_id=self.kernel_id,
                error=str(e),
            )

    def ready(self) -> None:
        pass

    def cleanup(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._cleanup())

    async def _cleanup(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        if self._watch.running:
            self._watch.stop()
        if self.comm is not None:
            try:
                await self.comm.shutdown()
            except CommError:
                pass
        if self._pending is not None:
            self._pending.cancel()
        await self._release()

    def detach(self) -> None:
        if self._watch.running:
            self._watch.stop()

    def snapshot(self) -> dict:
        return {
            "connection_info": self.connection_info.snapshot(),
            "host": self.placement.host,
            "ip": self.placement.ip,
            "pid": self.placement.pid,
            "pgid": self.placement.pgid,
            "comm_port": self.comm_port,
            "comm_token": self.comm_token,
        }


__all__ = [
    "ENTERPRISE_GATEWAY_LAUNCHER",
    "Placed",
    "RemoteLaunch",
    "RemoteLauncher",
    "RemoteKernelProcess",
    "expect_launch",
    "runs_enterprise_gateway_launcher",
    "await_connection_info",
    "connection_info",
    "kernel_log",
    "launcher_argv",
    "reported_id",
    "resolve_address",
    "signal_name",
    "response_listener",
    "wait_until",
    "with_log_tail",
    "CancelledError",
    "as_int",
]
