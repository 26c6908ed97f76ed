"""
The kernel manager: the one owner of every kernel's lifecycle.

It keeps the registry (the kernels by id, the operation in progress on each,
the listeners told of lifecycle events) and delegates each job to a part of
its own module: L{egateway.kernels.admission} decides whether a kernel may
start and with what, L{egateway.kernels.launching} starts processes and
probes them until ready, L{egateway.kernels.restarts} restarts them, and
L{egateway.kernels.shutdown} stops them.

Launches, restarts and shutdowns run as L{Operation}s owned here; requests
observe them.  Each launch is independent: it awaits only its own launcher
and its own kernel, so a slow or failing launch never delays another request.
Admission is decided synchronously when a launch is registered, so
concurrent requests cannot overshoot a limit.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Mapping

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from egateway.clusters.interface import ExitStatus, Phase
from egateway.clusters.registry import LauncherRegistry
from egateway.config import KernelsConfig
from egateway.errors import NotFound
from egateway.kernels.admission import Admission, AdmissionControl
from egateway.kernels.interfaces import (
    IKernelPersistence,
    IKernelPools,
    IKernelSharing,
    PersistenceFactory,
    SharingFactory,
)
from egateway.kernels.journal import JournalLimits
from egateway.kernels.kernel import Kernel
from egateway.kernels.launching import TIMEOUTS, LaunchFailed, Launching
from egateway.kernels.policy import Acl, Caller, TenancyPolicy, may_access
from egateway.kernels.restarts import RestartPolicy
from egateway.kernels.sharing import LEASED_OPERATIONS
from egateway.kernels.shutdown import Stopping
from egateway.kernels.specs import KernelSpecCatalog
from egateway.kernels.state import KernelState
from egateway.observe import Operation
from egateway.wire.channels import IChannelFactory

_log = Logger()

SESSION_SWEEP = 60.0
"""
Seconds between sweeps for expired parked sessions.
"""

RESTORE_WAIT = 10.0
"""
Seconds a kernel listing or lookup waits for the store's kernels to be
restored after a start, before answering with the kernels known so far.
"""


class KernelManager(Service):
    """
    @ivar kernels: every kernel this gateway holds, by id, launching ones
        included.
    @ivar admission: decides which kernels start.
    @ivar launching: starts kernels' processes.
    @ivar restarts: the restart policy.
    @ivar stopping: shuts kernels down and interrupts them.
    """

    name = "kernels"

    def __init__(
        self,
        *,
        clock: IReactorTime,
        specs: KernelSpecCatalog,
        launchers: LauncherRegistry,
        channels: Callable[[], IChannelFactory],
        settings: KernelsConfig,
        gateway_env: Mapping[str, str],
        default_username: str | None = None,
        journal_entries: int = 20000,
        journal_bytes: int = 64 << 20,
        journal_total_bytes: int = 0,
        policy: TenancyPolicy | None = None,
        persistence: PersistenceFactory | None = None,
        sharing: SharingFactory | None = None,
    ) -> None:
        """
        @param policy: ownership, authorization, profiles and quotas
            (default: no rules beyond ownership).
        @param persistence: builds the persistence of this manager's
            kernels (default: none, kernels end with the gateway).
        @param sharing: builds the sharing of its kernels with other
            gateways over that persistence (default: none; unused without
            persistence).
        """
        self._clock = clock
        self.specs = specs
        self.launchers = launchers
        self._make_channels = channels
        self._channels: IChannelFactory | None = None
        self.settings = settings
        self.policy = policy if policy is not None else TenancyPolicy()
        self.kernels: dict[str, Kernel] = {}
        self._operations: dict[str, Operation[Any]] = {}
        self.listeners: list[Callable[[str, Kernel], None]] = []
        self.change_listeners: list[Callable[[Kernel], None]] = []
        """
        Told of every kernel's state transitions, launch phases and client
        connections (see L{Kernel.on_change}); L{listeners} hear of launches
        and removals only.
        """
        self._housekeeping: LoopingCall | None = None
        self.journal_limits = JournalLimits(journal_entries, journal_bytes, journal_total_bytes)
        self.last_exit: dict[str, ExitStatus] = {}
        self.launches_started: Counter[str] = Counter()
        self.admission = AdmissionControl(
            manager=self, clock=clock, gateway_env=gateway_env, default_username=default_username
        )
        self.launching = Launching(manager=self, clock=clock)
        self.stopping = Stopping(manager=self, clock=clock, launching=self.launching)
        self.restarts = RestartPolicy(
            manager=self, clock=clock, launching=self.launching, admission=self.admission, stopping=self.stopping
        )
        self._persistence: IKernelPersistence | None = None
        self._sharing: IKernelSharing | None = None
        self.pools: IKernelPools | None = None
        """
        Warm pools a start request may be served from (set by them).
        """
        if persistence is not None:
            self._persistence = persistence(self)
            if sharing is not None:
                self._sharing = sharing(self, self._persistence)

    @property
    def persistence(self) -> IKernelPersistence | None:
        """
        The kernels' records in a store, if they are kept.
        """
        return self._persistence

    @property
    def sharing(self) -> IKernelSharing | None:
        """
        The sharing of kernels with other gateways, if the store is shared.
        """
        return self._sharing

    @property
    def admission_checks(self) -> list[Callable[[], None]]:
        """
        Called before each new kernel is admitted; one raising a
        L{GatewayError} refuses it (a draining gateway does).
        """
        return self.admission.checks

    # -- service -------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._channels = self._make_channels()
        self._housekeeping = LoopingCall(self._expire_sessions)
        self._housekeeping.clock = self._clock
        self._housekeeping.start(SESSION_SWEEP, now=False)

    async def _restored(self) -> None:
        """
        Wait, at most L{RESTORE_WAIT} seconds, until the kernels recorded in
        the store are restored.  A gateway answers HTTP a moment before it
        has registered them, and jupyter_server's gateway client drops a
        kernel missing from the list (and the notebook open on it loses
        it): so nothing is said about kernels before they are known.  The
        persistence service (started before this one) restores them.
        """
        restoring = self.persistence.restoring if self.persistence is not None else None
        if restoring is None or restoring.done:
            return
        waiting = restoring.observe()
        waiting.addTimeout(RESTORE_WAIT, self._clock)
        try:
            await waiting
        except TIMEOUTS:
            _log.warn(
                "the store's kernels are still being restored after {wait:g} s; answering with "
                "the kernels known so far",
                wait=RESTORE_WAIT,
            )

    def _expire_sessions(self) -> None:
        for kernel in list(self.kernels.values()):
            try:
                kernel.expire_sessions(self.settings.session_retention)
            except Exception:
                _log.failure("expiring sessions of kernel {kernel_id}", kernel_id=kernel.id)

    def stopService(self) -> Deferred[None]:
        """
        Shut down every kernel, gracefully, in parallel; or, when kernels
        are kept across restarts, leave them running with their records
        saved.  The store, the launchers and the response listener are
        services stopped after this one (see L{egateway.tap}).
        """
        super().stopService()
        if self._housekeeping is not None and self._housekeeping.running:
            self._housekeeping.stop()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.pools is not None:
            # Pooled kernels belong to no user: never kept for a next gateway.
            await self.pools.drain()
        persistence = self.persistence
        if persistence is not None and persistence.keeps_kernels:
            # A launch or an automatic restart under way would leave a
            # process this gateway no longer watches: the next gateway finds
            # the kernel as its record says.
            for kernel_id, operation in list(self._operations.items()):
                if operation.name in ("launch", "auto-restart"):
                    operation.cancel()
            await persistence.keep_all()
            for kernel in list(self.kernels.values()):
                kernel.close_clients("the gateway is restarting; reconnect")
                kernel.set_link(None)
            # They belong to the next gateway now.
            self.kernels.clear()
        else:
            await DeferredList(
                [
                    self.shutdown(kernel_id, reason="the gateway is stopping").addErrback(
                        lambda f, kid=kernel_id: _log.failure("stopping kernel {kid}", f, kid=kid)
                    )
                    for kernel_id in list(self.kernels)
                ]
            )
        if self._channels is not None:
            self._channels.close()

    @property
    def channels(self) -> IChannelFactory:
        if self._channels is None:
            self._channels = self._make_channels()
        return self._channels

    # -- queries -------------------------------------------------------

    def get(self, kernel_id: str) -> Kernel:
        """
        @raise NotFound: if no kernel has that id.
        """
        kernel = self.kernels.get(kernel_id)
        if kernel is None:
            raise NotFound(f"Kernel does not exist: {kernel_id}")
        return kernel

    async def find(self, kernel_id: str) -> Kernel:
        """
        The kernel with this id, attaching on demand to one another gateway
        started when the store is shared.

        @raise NotFound: no such kernel.
        @raise Unavailable: it is not here and the store cannot be asked.
        """
        kernel = self.kernels.get(kernel_id)
        if kernel is None or kernel.state == KernelState.LAUNCHING:
            # Unknown yet, or registered but still being restored (its
            # model would say launching): known once restored.
            await self._restored()
            kernel = self.kernels.get(kernel_id)
        if kernel is not None and not getattr(kernel, "pooled", False):
            return kernel
        if kernel is not None or self.sharing is None:
            raise NotFound(f"Kernel does not exist: {kernel_id}")
        return await self.sharing.attach(kernel_id)

    async def list_models(self, caller: Caller | None = None) -> list[dict[str, Any]]:
        """
        The model of every kernel C{caller} may see (all without one): this
        gateway's, from memory, and with a shared store the others' too
        (from their records; the records of the kernels held here are not
        read).  Kernels are chosen before their models are made: a user's
        listing costs what their own kernels cost, not what all do.
        """
        await self._restored()
        held = [kernel for kernel in self.kernels.values() if not getattr(kernel, "pooled", False)]
        models = {
            kernel.id: kernel.model()
            for kernel in held
            if caller is None or may_access(caller, kernel.owner, kernel.acl)
        }
        if self.sharing is not None:
            known = frozenset(kernel.id for kernel in held)
            for record in await self.sharing.records(skip=known):
                if record.kernel_id not in known:
                    model = record_model(record)
                    if caller is None or may_access(caller, model["owner"], Acl.from_json(model["acl"])):
                        models[record.kernel_id] = model
        return list(models.values())

    async def relink(self, kernel: Kernel, record: Any) -> None:
        """
        Another gateway relaunched C{kernel}: connect to the new process.
        """
        if record.state == KernelState.DEAD.value:
            if kernel.state != KernelState.DEAD:
                kernel.reason = record.reason
                kernel.transition(KernelState.DEAD, record.reason)
                kernel.broadcast_status("dead", record.reason)
            return
        old = kernel.process
        if old is not None:
            old.detach()
        kernel.set_link(None)
        launcher = self.launchers.get(record.launcher)
        try:
            process = await launcher.restore(kernel.id, record.snapshot)
            status = await self.launching.connect(kernel, process, self._clock.seconds() + self.settings.launch_timeout)
        except Exception as e:
            status = ExitStatus(reason=str(e))
        if status is not None:
            kernel.reason = f"could not reattach after another gateway restarted it: {status.describe()}"
            if kernel.state != KernelState.DEAD:
                kernel.transition(KernelState.DEAD, kernel.reason)
            kernel.broadcast_status("dead", kernel.reason)
            return
        process.ready()
        kernel.restart_count = record.restarts
        kernel.go_live()
        self.restarts.watch(kernel, process)
        _log.info("kernel {kernel_id}: relinked after a restart elsewhere", kernel_id=kernel.id)
        # Tell this gateway's clients what the other gateway's were told:
        # an automatic restart keeps its reason in the record, a requested
        # one clears it.
        if record.reason:
            kernel.broadcast_status("restarting", record.reason)
        else:
            kernel.broadcast_status("starting", "restarted through another gateway")
        kernel.broadcast_status("idle")

    def forget_elsewhere(self, kernel: Kernel, reason: str) -> None:
        """
        Another gateway removed C{kernel}: drop it here too.
        """
        kernel.close_clients(reason)
        if kernel.process is not None:
            kernel.process.detach()
        kernel.set_link(None)
        if self.kernels.get(kernel.id) is kernel:
            del self.kernels[kernel.id]
            self.emit("removed", kernel)

    def _changed(self, kernel: Kernel) -> None:
        for listener in self.change_listeners:
            try:
                listener(kernel)
            except Exception:
                _log.failure("kernel change listener failed on kernel {kernel_id}", kernel_id=kernel.id)

    def emit(self, event: str, kernel: Kernel) -> None:
        """
        Tell the L{listeners} of C{event} (C{started}, C{failed}, C{restarted},
        C{auto-restarted}, C{dead}, C{removed}, C{restored}, C{shared}) on
        C{kernel}.
        """
        for listener in self.listeners:
            try:
                listener(event, kernel)
            except Exception:
                _log.failure("kernel event listener failed on {event}", event=event)

    # -- the registry's operations --------------------------------------

    def current_operation(self, kernel_id: str) -> Operation[Any] | None:
        """
        The operation under way on kernel C{kernel_id}, if any.
        """
        return self._operations.get(kernel_id)

    def start_operation(
        self, kernel: Kernel, name: str, step: Callable[..., Any], *args: Any, observed: bool = True
    ) -> Operation[Any]:
        """
        Start operation C{name} on C{kernel}: C{step(kernel, *args)} runs once
        the operation in progress (if any) has ended, so operations on one
        kernel never overlap.  With a shared store, the operations that
        change a kernel run holding its lease.

        @param observed: C{False} when nobody will wait on it (an automatic
            restart): its failure is then logged.
        """
        previous = self._operations.get(kernel.id)

        async def body() -> Any:
            if previous is not None and not previous.done:
                # Its outcome is its observers'; this one only waits its
                # turn (and its own cancellation still stops it here).
                await previous.finished()
            if self._sharing is not None and name in LEASED_OPERATIONS:
                return await self._sharing.leased(name, kernel, step, *args)
            return await step(kernel, *args)

        operation: Operation[Any] = Operation(name, body(), subject=f"kernel {kernel.id}", observed=observed)
        if not operation.done:
            self._operations[kernel.id] = operation

        def forget(result: Any) -> Any:
            if self._operations.get(kernel.id) is operation:
                del self._operations[kernel.id]
            return result

        operation.running.addBoth(forget)
        return operation

    def remove(self, kernel: Kernel) -> None:
        """
        C{kernel} is gone: drop it, and tell the listeners.
        """
        self.kernels.pop(kernel.id, None)
        self.restarts.forget(kernel.id)
        self.emit("removed", kernel)

    # -- start ---------------------------------------------------------

    async def start_kernel(
        self,
        spec_name: str | None = None,
        env: Any = None,
        username: str | None = None,
        caller: Caller | None = None,
        profile: Any = None,
    ) -> Kernel:
        """
        Launch a kernel and wait until it answers C{kernel_info}.

        @param caller: the verified user asking (C{None}: none; the kernel's
            owner is then the user it runs for).
        @param profile: the profile the request names (its body's
            C{profile}; C{KERNEL_PROFILE} in C{env} works too).
        @raise BadRequest: malformed inputs, or a profile's policy refuses
            the environment.
        @raise NotFound: unknown kernelspec.
        @raise Forbidden: not authorized for the kernelspec or the profile,
            or not allowed to choose C{KERNEL_ID}.
        @raise LimitReached: C{max_kernels} or a quota reached (launches in
            progress count).
        @raise TooManyRequests: too many launches in progress for the user.
        @raise LaunchFailed: the launch failed or timed out; the message
            names the cause and the last phase reached.
        """
        request = self.admission.check_request(spec_name, env, username, caller)
        spec = await self.admission.kernelspec(request)
        if self.pools is not None:
            pooled = await self.pools.serve(request, spec, caller, profile)
            if pooled is not None:
                return pooled
        # No waiting from here until the kernel is registered: the quotas
        # count registered kernels.
        kernel = self.register(self.admission.decide(request, spec, caller, profile))
        # The launch, its first record included, belongs to the manager: a
        # client that goes away cancels only its observer.
        operation = self.start_operation(kernel, "launch", self._admit_and_launch)
        await operation.observe()
        return kernel

    def register(self, admission: Admission) -> Kernel:
        """
        The kernel C{admission} decided on, registered, queued for its
        launcher.
        """
        kernel = Kernel(
            admission.kernel_id,
            admission.spec,
            admission.username,
            dict(admission.env),
            self._clock,
            admission.launcher_name,
            self.journal_limits,
        )
        kernel.on_change = self._changed
        kernel.owner = admission.owner
        kernel.owner_groups = admission.owner_groups
        kernel.profile = admission.profile
        kernel.launcher_config = admission.launcher_config
        if self._sharing is not None:
            self._sharing.equip(kernel)
        kernel.report(Phase.QUEUED, f"launcher {admission.launcher_name}")
        self.kernels[kernel.id] = kernel
        return kernel

    async def _admit_and_launch(self, kernel: Kernel) -> Kernel:
        if self._persistence is not None:
            try:
                await self._persistence.admit(kernel)
            except BaseException as e:
                # Never launched: nothing to record as failed.
                self.kernels.pop(kernel.id, None)
                if isinstance(e, CancelledError):
                    raise LaunchFailed(f"kernel {kernel.id} was shut down while launching") from None
                raise
        self.launches_started[kernel.launcher_name] += 1
        return await self._launch_new(kernel)

    async def _launch_new(self, kernel: Kernel) -> Kernel:
        try:
            await self.launching.launch(kernel)
        except BaseException as e:
            kernel.reason = str(e) if not isinstance(e, CancelledError) else "launch cancelled"
            kernel.launch_failure = "cancelled" if isinstance(e, CancelledError) else getattr(e, "failure", "error")
            if kernel.state == KernelState.LAUNCHING:
                kernel.transition(KernelState.FAILED, kernel.reason)
                kernel.transition(KernelState.GONE)
                self.kernels.pop(kernel.id, None)
                self.emit("failed", kernel)
            if isinstance(e, CancelledError):
                raise LaunchFailed(f"kernel {kernel.id} was shut down while launching") from None
            raise
        kernel.transition(KernelState.RUNNING, "ready")
        self.emit("started", kernel)
        return kernel

    # -- restore -------------------------------------------------------

    async def restore_kernel(self, record: Any, spec: Any) -> Kernel:
        """
        Reattach to a kernel recorded by an earlier gateway process (or by
        another gateway sharing the store).  A kernel that is gone is listed
        as dead, with the reason.
        """
        kernel = Kernel(
            record.kernel_id,
            spec,
            record.username,
            dict(record.env),
            self._clock,
            record.launcher,
            self.journal_limits,
        )
        kernel.on_change = self._changed
        kernel.started = record.created
        kernel.last_activity = record.updated
        kernel.restart_count = record.restarts
        kernel.reason = record.reason
        kernel.owner = getattr(record, "owner", "") or record.username
        kernel.owner_groups = frozenset(getattr(record, "owner_groups", None) or ())
        kernel.acl = Acl.from_json(getattr(record, "acl", None))
        kernel.profile = getattr(record, "profile", "") or None
        kernel.launcher_config = self.policy.launcher_config(spec, kernel.profile, kernel.env)
        if self._sharing is not None:
            self._sharing.equip(kernel)
        kernel.report(Phase.QUEUED, "restoring")
        self.kernels[kernel.id] = kernel
        await self.start_operation(kernel, "restore", self._restore, record).observe()
        return kernel

    async def _restore(self, kernel: Kernel, record: Any) -> None:
        if record.state in (KernelState.DEAD.value, KernelState.FAILED.value):
            kernel.transition(KernelState.DEAD, record.reason)
            return
        timeout = self.settings.launch_timeout
        try:
            launcher = self.launchers.get(record.launcher)
            restoring = launcher.restore(kernel.id, record.snapshot)
            restoring.addTimeout(timeout, self._clock)
            process = await restoring
        except Exception as e:
            why = "it did not answer in time" if isinstance(e, TIMEOUTS) else str(e)
            await self.restarts.declare_dead(kernel, f"the kernel ended while the gateway was away: {why}")
            return
        kernel.report(Phase.PLACED, process.placement.host)
        try:
            # It may be running a cell (a gateway that died mid-cell, or one
            # attaching on demand): ready once control answers.
            status = await self.launching.connect(kernel, process, self._clock.seconds() + timeout, may_be_busy=True)
        except Exception as e:
            status = ExitStatus(reason=f"it did not answer kernel_info ({e})")
        if status is not None:
            await self.restarts.declare_dead(
                kernel, f"the kernel ended while the gateway was away: {status.describe()}"
            )
            return
        process.ready()
        kernel.report(Phase.READY, "restored")
        kernel.go_live()
        self.restarts.watch(kernel, process)
        kernel.transition(KernelState.RUNNING, "restored")
        self.emit("restored", kernel)

    # -- operations on running kernels ---------------------------------

    async def interrupt(self, kernel_id: str) -> None:
        """
        Interrupt per the kernelspec's C{interrupt_mode}.

        @raise NotFound: no such kernel.
        @raise Conflict: if the kernel is not running.
        """
        await self.stopping.interrupt(self.get(kernel_id))

    def restart(self, kernel_id: str) -> Deferred[Kernel]:
        """
        Restart keeping the kernel id (see L{RestartPolicy.restart}).
        """
        return self.restarts.restart(kernel_id)

    def shutdown(self, kernel_id: str, reason: str = "shutdown requested") -> Deferred[None]:
        """
        Shut a kernel down and remove it (see L{Stopping.shutdown}).
        """
        return self.stopping.shutdown(kernel_id, reason)

    def set_acl(self, kernel: Kernel, acl: Acl) -> None:
        """
        Replace whom C{kernel} is shared with, and save it.
        """
        kernel.acl = acl
        _log.info(
            "kernel {kernel_id}: shared with users {users} and groups {groups}",
            kernel_id=kernel.id,
            users=",".join(acl.users) or "-",
            groups=",".join(acl.groups) or "-",
        )
        self.emit("shared", kernel)

    def snapshot_models(self) -> list[dict[str, Any]]:
        return [kernel.model() for kernel in self.kernels.values()]


def record_model(record: Any) -> dict[str, Any]:
    """
    The REST model of a kernel known only from its record (held by another
    gateway).
    """
    from egateway.kernels.kernel import iso

    model: dict[str, Any] = {
        "id": record.kernel_id,
        "name": record.spec_name,
        "last_activity": iso(record.updated),
        "execution_state": record.execution_state,
        "connections": 0,
        "started": iso(record.created),
        "state": record.state,
        "username": record.username,
        "owner": getattr(record, "owner", "") or record.username,
        "acl": Acl.from_json(getattr(record, "acl", None)).to_json(),
        "profile": getattr(record, "profile", "") or None,
        "launcher": record.launcher,
        "restarts": record.restarts,
        "gateway": record.gateway_id,
    }
    if record.reason:
        model["reason"] = record.reason
    return model
