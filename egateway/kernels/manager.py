"""
The kernel manager: the one owner of every kernel's lifecycle.

Launches, restarts and shutdowns run as L{Operation}s owned here; requests
observe them.  Each launch is independent: it awaits only its own launcher
and its own kernel, so a slow or failing launch never delays another request.
Admission (the C{max_kernels} limit, and the quotas, authorization and
profile of L{egateway.kernels.policy}) is decided synchronously when a launch
is registered, so concurrent requests cannot overshoot it.
"""

from __future__ import annotations

import getpass
import signal as signals
import uuid
from collections import Counter
from typing import Any, Callable, Mapping

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from egateway.clusters.interface import (
    ExitStatus,
    IKernelProcess,
    LaunchError,
    LaunchRequest,
    Phase,
)
from egateway.clusters.registry import LauncherRegistry
from egateway.config import KernelsConfig
from egateway.errors import BadRequest, Conflict, GatewayError, LimitReached, NotFound
from egateway.kernels.env import BadEnvironment, accepted_client_names, build_kernel_env, validate_client_env
from egateway.kernels.kernel import Kernel
from egateway.kernels.policy import ENDED, Acl, Caller, TenancyPolicy
from egateway.kernels.journal import JournalLimits
from egateway.kernels.sharing import LEASED_OPERATIONS
from egateway.observe import Operation, first
from egateway.kernels.specs import KernelSpecCatalog, NoSuchKernelSpec
from egateway.kernels.state import KernelState
from egateway.wire.channels import ConnectionInfo, IChannelFactory
from egateway.wire.link import KernelLink
from egateway.wire.protocol import Message

_log = Logger()

READY_PROBE_INTERVAL = 1.0
"""
Seconds before an unanswered C{kernel_info_request} is sent again while a
kernel starts.
"""

STABLE_AFTER = 30.0
"""
Seconds a restarted kernel must stay up before its failures are forgiven.
"""

RETRYABLE_ATTEMPTS = 3

SESSION_SWEEP = 60.0

RESTORE_WAIT = 10.0
"""
Seconds a kernel listing or lookup waits for the store's kernels to be
restored after a start, before answering with the kernels known so far.
"""
"""
Seconds between sweeps for expired parked sessions.
"""

TIMEOUTS = (TimeoutError, defer.TimeoutError)
"""
C{Deferred.addTimeout} raises Twisted's own C{TimeoutError}, not the builtin.
"""


class LaunchFailed(GatewayError):
    status = 500
    failure = "launcher"
    """
    The cause a launch failure is counted under (the metrics' C{reason}).
    """


class LaunchTimedOut(LaunchFailed):
    status = 504
    failure = "timeout"


class KernelExitedEarly(LaunchFailed):
    failure = "exited"


def _canonical_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


class KernelManager(Service):
    """
    @ivar kernels: every kernel this gateway holds, by id, launching ones
        included.
    """

    name = "kernels"

    def __init__(
        self,
        *,
        clock: Any,
        specs: KernelSpecCatalog,
        launchers: LauncherRegistry,
        channels: Callable[[], IChannelFactory],
        settings: KernelsConfig,
        gateway_env: Mapping[str, str],
        default_username: str | None = None,
        journal_entries: int = 20000,
        journal_bytes: int = 64 << 20,
        policy: TenancyPolicy | None = None,
    ) -> None:
        """
        @param policy: ownership, authorization, profiles and quotas
            (default: no rules beyond ownership).
        """
        self._clock = clock
        self.specs = specs
        self.launchers = launchers
        self._make_channels = channels
        self._channels: IChannelFactory | None = None
        self.settings = settings
        self.policy = policy if policy is not None else TenancyPolicy()
        self._gateway_env = dict(gateway_env)
        self._default_username = default_username or getpass.getuser()
        self.kernels: dict[str, Kernel] = {}
        self._operations: dict[str, Operation[Any]] = {}
        self._recent_failures: dict[str, list[float]] = {}
        self.listeners: list[Callable[[str, Kernel], None]] = []
        self.change_listeners: list[Callable[[Kernel], None]] = []
        """
        Told of every kernel's state transitions, launch phases and client
        connections (see L{Kernel.on_change}); L{listeners} hear of launches
        and removals only.
        """
        self._housekeeping: LoopingCall | None = None
        self.journal_limits = JournalLimits(journal_entries, journal_bytes)
        self.persistence: Any = None
        self.sharing: Any = None
        self.last_exit: dict[str, ExitStatus] = {}
        self.launches_started: Counter[str] = Counter()
        self.on_fatal: Callable[[str], None] = lambda message: _log.critical(message)
        self.admission_checks: list[Callable[[], None]] = []
        """
        Called before each new kernel is admitted; one raising a
        L{GatewayError} refuses it (a draining gateway does).
        """

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
        persistence = self.persistence
        if persistence is not None and persistence.keeps_kernels:
            for kernel_id, operation in list(self._operations.items()):
                if operation.name == "launch":
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
        if kernel is None:
            await self._restored()
            kernel = self.kernels.get(kernel_id)
        if kernel is not None:
            return kernel
        if self.sharing is None:
            raise NotFound(f"Kernel does not exist: {kernel_id}")
        return await self.sharing.attach(kernel_id)

    async def list_models(self) -> list[dict[str, Any]]:
        """
        Every kernel's model: this gateway's, and with a shared store the
        others' too (from their records).
        """
        await self._restored()
        models = {kernel.id: kernel.model() for kernel in self.kernels.values()}
        if self.sharing is not None:
            for record in await self.sharing.records():
                if record.kernel_id not in models:
                    models[record.kernel_id] = record_model(record)
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
            status = await self._connect(kernel, process, self._clock.seconds() + self.settings.launch_timeout)
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
        self._watch(kernel, process)
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
            self._emit("removed", kernel)

    def _changed(self, kernel: Kernel) -> None:
        for listener in self.change_listeners:
            try:
                listener(kernel)
            except Exception:
                _log.failure("kernel change listener failed on kernel {kernel_id}", kernel_id=kernel.id)

    def _emit(self, event: str, kernel: Kernel) -> None:
        for listener in self.listeners:
            try:
                listener(event, kernel)
            except Exception:
                _log.failure("kernel event listener failed on {event}", event=event)

    # -- start ---------------------------------------------------------

    def admit(
        self,
        spec_name: str | None,
        env: Any,
        username: str | None = None,
        caller: Caller | None = None,
    ) -> dict[str, Any]:
        """
        Validate a start request's inputs; raises L{BadRequest} for
        malformed ones, L{Forbidden} for a C{KERNEL_ID} C{caller} may not
        choose (see L{TenancyPolicy.check_kernel_id}).
        """
        for check in self.admission_checks:
            check()
        try:
            client_env = validate_client_env(env)
        except BadEnvironment as e:
            raise BadRequest(str(e)) from None
        if spec_name is not None and not isinstance(spec_name, str):
            raise BadRequest("'name' must be a string")
        kernel_id = client_env.get("KERNEL_ID")
        if kernel_id is not None:
            if not _canonical_uuid(kernel_id):
                raise BadRequest("KERNEL_ID must be a lower-case UUID like 8a3f...-...")
            self.policy.check_kernel_id(caller)
            if kernel_id in self.kernels:
                raise Conflict(f"a kernel with id {kernel_id} already exists")
        return {
            "spec_name": spec_name or self.specs.default_name,
            "client_env": client_env,
            "username": username or client_env.get("KERNEL_USERNAME") or self._default_username,
            "kernel_id": kernel_id or str(uuid.uuid4()),
        }

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
        request = self.admit(spec_name, env, username, caller)
        try:
            spec = await self.specs.get(request["spec_name"])
        except NoSuchKernelSpec:
            raise NotFound(f"No such kernel spec: {request['spec_name']}") from None
        kernel_id = request["kernel_id"]
        if kernel_id in self.kernels:
            raise Conflict(f"a kernel with id {kernel_id} already exists")
        self._check_max_kernels()
        # No waiting from here until the kernel is registered: the quotas
        # count registered kernels.
        accepted = accepted_client_names(request["client_env"], self.settings.client_envs)
        plan = self.policy.plan(caller, request["username"], spec, request["client_env"], accepted, profile)
        self.policy.check_quotas(
            self.kernels.values(), plan, self._clock.seconds(), self.settings.launch_timeout
        )
        kernel_env = build_kernel_env(
            gateway_env=self._gateway_env,
            inherited_envs=self.settings.inherited_envs,
            spec_env=spec.env,
            client_env=request["client_env"],
            client_envs=self.settings.client_envs,
            kernel_id=kernel_id,
            username=request["username"],
            language=spec.language,
        )
        plan.apply_env(kernel_env, accepted)
        self.launch_timeout(kernel_env)
        try:
            launcher_name = spec.launcher_name
            self.launchers.get(launcher_name)
        except LaunchError as e:
            origin = f" (its {spec.launcher_origin})" if spec.launcher_origin else ""
            raise LaunchFailed(f"kernelspec {spec.name}{origin}: {e}", status=e.status) from None
        kernel = Kernel(
            kernel_id,
            spec,
            request["username"],
            kernel_env,
            self._clock,
            launcher_name,
            self.journal_limits,
        )
        kernel.on_change = self._changed
        kernel.owner = plan.owner
        kernel.owner_groups = plan.groups
        kernel.profile = plan.profile.name if plan.profile is not None else None
        kernel.launcher_config = plan.launcher_config
        if self.sharing is not None:
            self.sharing.equip(kernel)
        kernel.report(Phase.QUEUED, f"launcher {launcher_name}")
        self.kernels[kernel_id] = kernel
        # The launch, its first record included, belongs to the manager: a
        # client that goes away cancels only its observer.
        operation = self._run(kernel, "launch", self._admit_and_launch)
        await operation.observe()
        return kernel

    async def _admit_and_launch(self, kernel: Kernel) -> Kernel:
        if self.persistence is not None:
            try:
                await self.persistence.admit(kernel)
            except BaseException as e:
                # Never launched: nothing to record as failed.
                self.kernels.pop(kernel.id, None)
                if isinstance(e, CancelledError):
                    raise LaunchFailed(f"kernel {kernel.id} was shut down while launching") from None
                raise
        self.launches_started[kernel.launcher_name] += 1
        return await self._launch_new(kernel)

    def _check_max_kernels(self) -> None:
        """
        @raise LimitReached: C{max_kernels} kernels are running or starting
            (dead ones hold nothing and do not count, so nobody can fill the
            gateway with them).
        """
        limit = self.settings.max_kernels
        if not limit:
            return
        live = sum(1 for kernel in self.kernels.values() if kernel.state not in ENDED)
        if live >= limit:
            raise LimitReached(
                f"A max kernels limit of {limit} is set and there are {live} running or starting kernels"
            )

    def _admit_revival(self, kernel: Kernel) -> None:
        """
        Reviving a dead kernel starts a new process: it passes the admission
        a start does (C{max_kernels}, the owner's authorization for the
        kernelspec, the quotas), since a dead kernel counts against none of
        them.  The caller changes the kernel's state with no wait after
        this, so the decision holds.

        @raise LimitReached: a limit is reached.
        @raise Forbidden: the owner may no longer launch the kernelspec.
        """
        self._check_max_kernels()
        plan = self.policy.revival_plan(kernel)
        others = [k for k in self.kernels.values() if k is not kernel]
        self.policy.check_quotas(others, plan, self._clock.seconds(), self.settings.launch_timeout)

    def _run(
        self, kernel: Kernel, name: str, step: Callable[..., Any], *args: Any, observed: bool = True
    ) -> Operation[Any]:
        """
        Start operation C{name} on C{kernel}: C{step(kernel, *args)} runs once
        the operation in progress (if any) has ended, so operations on one
        kernel never overlap.

        @param observed: C{False} when nobody will wait on it (an automatic
            restart): its failure is then logged.
        """
        previous = self._operations.get(kernel.id)

        async def body() -> Any:
            if previous is not None and not previous.done:
                # Its outcome is its observers'; this one only waits its
                # turn (and its own cancellation still stops it here).
                await previous.finished()
            if self.sharing is not None and name in LEASED_OPERATIONS:
                return await self.sharing.leased(name, kernel, step, *args)
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
        if self.sharing is not None:
            self.sharing.equip(kernel)
        kernel.report(Phase.QUEUED, "restoring")
        self.kernels[kernel.id] = kernel
        await self._run(kernel, "restore", self._restore, record).observe()
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
            await self._declare_dead(kernel, f"the kernel ended while the gateway was away: {why}")
            return
        kernel.report(Phase.PLACED, process.placement.host)
        try:
            status = await self._connect(kernel, process, self._clock.seconds() + timeout)
        except Exception as e:
            status = ExitStatus(reason=f"it did not answer kernel_info ({e})")
        if status is not None:
            await self._declare_dead(
                kernel, f"the kernel ended while the gateway was away: {status.describe()}"
            )
            return
        process.ready()
        kernel.report(Phase.READY, "restored")
        kernel.go_live()
        self._watch(kernel, process)
        kernel.transition(KernelState.RUNNING, "restored")
        self._emit("restored", kernel)

    async def _launch_new(self, kernel: Kernel) -> Kernel:
        try:
            await self._launch(kernel)
        except BaseException as e:
            kernel.reason = str(e) if not isinstance(e, CancelledError) else "launch cancelled"
            kernel.launch_failure = "cancelled" if isinstance(e, CancelledError) else getattr(e, "failure", "error")
            if kernel.state == KernelState.LAUNCHING:
                kernel.transition(KernelState.FAILED, kernel.reason)
                kernel.transition(KernelState.GONE)
                self.kernels.pop(kernel.id, None)
                self._emit("failed", kernel)
            if isinstance(e, CancelledError):
                raise LaunchFailed(f"kernel {kernel.id} was shut down while launching") from None
            raise
        kernel.transition(KernelState.RUNNING, "ready")
        self._emit("started", kernel)
        return kernel

    def launch_timeout(self, env: Mapping[str, str]) -> float:
        """
        The launch timeout for a kernel with environment C{env}: its
        C{KERNEL_LAUNCH_TIMEOUT} (a client's, as Enterprise Gateway honours
        it) cut to C{max_launch_timeout}, else C{launch_timeout}.

        @raise BadRequest: C{KERNEL_LAUNCH_TIMEOUT} is not a positive number.
        """
        text = env.get("KERNEL_LAUNCH_TIMEOUT")
        if text is None or text == "":
            return self.settings.launch_timeout
        try:
            asked = float(text)
        except ValueError:
            asked = float("nan")
        if not asked > 0 or asked == float("inf"):
            raise BadRequest(f"KERNEL_LAUNCH_TIMEOUT must be a positive number of seconds, not {text[:40]!r}")
        return min(asked, self.settings.max_launch_timeout)

    async def _launch(self, kernel: Kernel) -> None:
        """
        Launch (or relaunch) C{kernel}'s process and wait until it is ready.
        On any failure everything started is removed before raising.
        """
        launcher = self.launchers.get(kernel.launcher_name)
        timeout = self.launch_timeout(kernel.env)
        for attempt in range(1, RETRYABLE_ATTEMPTS + 1):
            deadline = self._clock.seconds() + timeout
            request = LaunchRequest(
                kernel_id=kernel.id,
                spec=kernel.spec,
                env=kernel.env,
                config=kernel.launcher_config,
                username=kernel.username,
                report=kernel.report,
                timeout=timeout,
            )
            launching = launcher.launch(request)
            launching.addTimeout(timeout, self._clock)
            try:
                process: IKernelProcess = await launching
            except TIMEOUTS:
                raise LaunchTimedOut(self._timeout_message(kernel, timeout)) from None
            except GatewayError as e:
                raise LaunchFailed(
                    f"{e}; last phase: {self._last_phase(kernel)}",
                    status=e.status,
                ) from None
            try:
                status = await self._connect(kernel, process, deadline, timeout)
            except BaseException:
                await self._discard(kernel, process)
                raise
            if status is None:
                process.ready()
                kernel.report(Phase.READY)
                kernel.go_live()
                self._watch(kernel, process)
                return
            await self._discard(kernel, process)
            if status.retryable and attempt < RETRYABLE_ATTEMPTS:
                _log.warn(
                    "kernel {kernel_id}: {status}; launching again",
                    kernel_id=kernel.id,
                    status=status.describe(),
                )
                continue
            raise KernelExitedEarly(
                f"the kernel {status.describe()} before answering kernel_info; "
                f"last phase: {self._last_phase(kernel)}"
            )

    def _last_phase(self, kernel: Kernel) -> str:
        last = kernel.last_phase
        return last.describe() if last else "none"

    def _timeout_message(self, kernel: Kernel, timeout: float) -> str:
        last = kernel.last_phase
        waiting_for = {
            Phase.QUEUED: "the launcher to start the kernel",
            Phase.SUBMITTED: "the kernel to be placed",
            Phase.PLACED: "connection info",
            Phase.CONNECTION_INFO: "the kernel to answer kernel_info",
            Phase.CONNECTED: "the kernel to answer kernel_info",
        }.get(last.phase if last else Phase.QUEUED, "the kernel")
        return (
            f"timed out after {timeout:g} s waiting for {waiting_for}; "
            f"last phase: {self._last_phase(kernel)}"
        )

    async def _connect(
        self, kernel: Kernel, process: IKernelProcess, deadline: float, timeout: float | None = None
    ) -> ExitStatus | None:
        """
        Link to the kernel and wait for it to be ready.

        @return: C{None} when ready, or how the kernel ended if it exited
            first.
        @raise LaunchTimedOut: at the deadline.
        """
        self._check_encryption(kernel, process.connection_info)
        kernel.process = process
        link = KernelLink(
            process.connection_info, self.channels, self._clock, kernel.on_iopub, kernel.id
        )
        kernel.set_link(link)
        kernel.report(Phase.CONNECTED, process.connection_info.ip)
        ready = Deferred.fromCoroutine(self._wait_ready(kernel, link, deadline))
        exited = process.when_exited()
        try:
            index, result = await first([ready, exited])
        except TIMEOUTS:
            raise LaunchTimedOut(
                self._timeout_message(kernel, timeout or self.settings.launch_timeout)
            ) from None
        return None if index == 0 else result

    def _check_encryption(self, kernel: Kernel, info: ConnectionInfo) -> None:
        """
        A kernel reached over TCP without CurveZMQ: refused when
        C{kernel_encryption} is required (before any socket is opened, with
        the reason its launcher gave), otherwise a warning, since anyone on
        its network can read its traffic.

        @raise LaunchFailed: 403, encryption is required.
        """
        if info.encrypted or info.transport != "tcp":
            return
        reason = info.cleartext_reason
        if self.settings.kernel_encryption == "required":
            raise LaunchFailed(
                f"kernel_encryption is required, but kernel {kernel.id}'s channels are not encrypted: {reason}",
                status=403,
            )
        _log.warn(
            "kernel {kernel_id}: channels not encrypted (messages signed only, readable on its network): "
            "{reason}",
            kernel_id=kernel.id,
            reason=reason,
        )

    async def _wait_ready(self, kernel: Kernel, link: KernelLink, deadline: float) -> None:
        """
        Send C{kernel_info_request} until a reply arrives and iopub has
        delivered the status the kernel published for one of them, so no
        output from the kernel can be lost to a subscription that is not
        live yet, and what it published before (its own C{starting}) has
        been relayed: the C{idle} that ends a restart must come after it
        (JupyterLab shows the last status it tracks).  Any iopub message
        would not do: ipykernel 7 welcomes a subscriber on iopub at once,
        and the reply, on shell, can overtake what iopub still carries.
        """
        answered: set[str] = set()

        def observe(message: Message) -> None:
            if message.msg_type == "status":
                answered.add(str(message.parent_header().get("msg_id")))

        kernel.on_iopub_observers.append(observe)
        probes: set[str] = set()
        try:
            while True:
                remaining = deadline - self._clock.seconds()
                if remaining <= 0:
                    raise TimeoutError()
                try:
                    reply = await link.request(
                        "shell", "kernel_info_request", {}, min(READY_PROBE_INTERVAL, remaining)
                    )
                except TIMEOUTS:
                    continue
                probes.add(str(reply.parent_header().get("msg_id")))
                if probes & answered:
                    return
                await deferLater(self._clock, min(0.05, max(remaining, 0)))
                if probes & answered:
                    return
        finally:
            kernel.on_iopub_observers.remove(observe)

    async def _discard(self, kernel: Kernel, process: IKernelProcess) -> None:
        """
        Remove a launched process that will not be used.
        """
        if kernel.link is not None:
            kernel.set_link(None)
        try:
            await process.terminate(self.settings.terminate_wait)
        except Exception:
            _log.failure("kernel {kernel_id}: terminating failed", kernel_id=kernel.id)
        try:
            await process.cleanup()
        except Exception:
            _log.failure("kernel {kernel_id}: cleanup failed", kernel_id=kernel.id)

    # -- deaths and automatic restarts ---------------------------------

    def _watch(self, kernel: Kernel, process: IKernelProcess) -> None:
        def exited(status: ExitStatus) -> None:
            if kernel.process is not process or kernel.state != KernelState.RUNNING:
                return
            if not self.running or self.kernels.get(kernel.id) is not kernel:
                # Kept for the next gateway, or no longer ours.
                return
            if kernel.id in self._operations:
                return
            self.last_exit[kernel.id] = status
            self._run(kernel, "auto-restart", self._auto_restart, status, observed=False)

        process.when_exited().addCallback(exited)

    async def _auto_restart(self, kernel: Kernel, status: ExitStatus | None) -> None:
        why = (status or ExitStatus(reason="ended")).describe()
        if status is not None and status.decision:
            # Cancelled or deleted on purpose by the cluster's operator:
            # restarting would undo their decision.
            _log.warn(
                "kernel {kernel_id} was ended outside the gateway: {why}; not restarting it",
                kernel_id=kernel.id,
                why=why,
            )
            await self._declare_dead(kernel, f"kernel {why}; not restarted (ended on purpose, not a crash)")
            return
        now = self._clock.seconds()
        failures = [t for t in self._recent_failures.get(kernel.id, []) if now - t < STABLE_AFTER]
        failures.append(now)
        self._recent_failures[kernel.id] = failures
        limit = self.settings.restart_limit
        _log.warn(
            "kernel {kernel_id} died: {why} ({n} of {limit} restarts)",
            kernel_id=kernel.id,
            why=why,
            n=len(failures),
            limit=limit,
        )
        if len(failures) > limit:
            await self._declare_dead(kernel, f"kernel {why}; restart limit ({limit}) reached")
            return
        kernel.reason = f"kernel {why}"
        kernel.transition(KernelState.RESTARTING, why)
        kernel.broadcast_status(
            "restarting", f"kernel {why}; restarting ({len(failures)} of {limit})"
        )
        old = kernel.process
        if old is not None:
            await self._discard(kernel, old)
        try:
            await self._launch(kernel)
        except Exception as e:
            await self._declare_dead(kernel, f"kernel {why}; restart failed: {e}")
            return
        self._restarted(kernel, "auto-restarted")

    def _restarted(self, kernel: Kernel, event: str) -> None:
        """
        A relaunched kernel is ready: running again, and its clients told
        it is C{idle}.  Jupyter clients ignore the statuses that answer
        C{kernel_info_request}s (jupyter_server's C{untracked_message_types}),
        and the new kernel's C{starting} comes before anyone's request, so
        without this JupyterLab shows C{Starting} until a cell runs.

        @param event: what to tell the manager's watchers: C{restarted}
            (requested) or C{auto-restarted} (after a death).
        """
        kernel.restart_count += 1
        kernel.transition(KernelState.RUNNING, "restarted")
        kernel.broadcast_status("idle")
        self._emit(event, kernel)

    async def _declare_dead(self, kernel: Kernel, reason: str) -> None:
        kernel.reason = reason
        kernel.transition(KernelState.DEAD, reason)
        kernel.broadcast_status("dead", reason)
        if kernel.process is not None:
            await self._discard(kernel, kernel.process)
        self._emit("dead", kernel)

    # -- operations on running kernels ---------------------------------

    async def interrupt(self, kernel_id: str) -> None:
        """
        Interrupt per the kernelspec's C{interrupt_mode}.

        @raise Conflict: if the kernel is not running.
        """
        kernel = self.get(kernel_id)
        if kernel.state != KernelState.RUNNING or kernel.process is None:
            raise Conflict(f"kernel {kernel_id} is {kernel.state.value}, not running")
        if kernel.spec.interrupt_mode == "message" and kernel.link is not None:
            kernel.link.send(
                "control", Message.build("interrupt_request", {}, kernel.link.session)
            )
            return
        signum = _interrupt_signal(kernel.spec.env)
        await kernel.process.signal(signum)

    def restart(self, kernel_id: str) -> Deferred[Kernel]:
        """
        Restart keeping the kernel id; connected clients stay connected and
        see C{starting}, then the new kernel's C{idle} (no C{restarting}:
        see L{_restart}).

        A restart requested while one is in progress waits on that one.
        """
        kernel = self.get(kernel_id)
        current = self._operations.get(kernel_id)
        if current is not None and current.name in ("restart", "auto-restart"):
            return current.observe().addCallback(lambda _: kernel)
        if kernel.state in (KernelState.SHUTTING_DOWN, KernelState.GONE):
            raise Conflict(f"kernel {kernel_id} is shutting down")
        return self._run(kernel, "restart", self._restart).observe()

    async def _restart(self, kernel: Kernel) -> Kernel:
        if kernel.state == KernelState.LAUNCHING or kernel.id not in self.kernels:
            raise Conflict(f"kernel {kernel.id} is not running")
        if kernel.state in ENDED:
            self._admit_revival(kernel)
        kernel.transition(KernelState.RESTARTING, "restart requested")
        # Not "restarting": Jupyter clients (JupyterLab, jupyter_server) read
        # that as "the server auto-restarted a kernel that died", and
        # JupyterLab then shows its "appears to have died" dialog.  A
        # requested restart looks like jupyter_server's: the new kernel
        # starting, then idle.
        kernel.broadcast_status("starting", "restart requested")
        if kernel.process is not None:
            await self._stop_process(kernel, restart=True)
        try:
            await self._launch(kernel)
        except Exception as e:
            await self._declare_dead(kernel, f"restart failed: {e}")
            raise
        kernel.reason = ""
        self._restarted(kernel, "restarted")
        return kernel

    def shutdown(self, kernel_id: str, reason: str = "shutdown requested") -> Deferred[None]:
        """
        Shut a kernel down: C{shutdown_request}, then SIGTERM, then SIGKILL,
        each after its grace period; then remove it.  A launch in progress
        is cancelled, and removes what it started.
        """
        kernel = self.get(kernel_id)
        current = self._operations.get(kernel_id)
        if current is not None and current.name == "shutdown":
            return current.observe()
        if current is not None and current.name == "launch":
            current.cancel()
        return self._run(kernel, "shutdown", self._shutdown, reason).observe()

    async def _shutdown(self, kernel: Kernel, reason: str) -> None:
        if kernel.id not in self.kernels:
            return
        kernel.transition(KernelState.SHUTTING_DOWN, reason)
        kernel.reason = reason
        kernel.close_clients(reason)
        if kernel.process is not None:
            await self._stop_process(kernel, restart=False)
        kernel.transition(KernelState.GONE)
        self.kernels.pop(kernel.id, None)
        self._recent_failures.pop(kernel.id, None)
        self._emit("removed", kernel)

    async def _stop_process(self, kernel: Kernel, restart: bool) -> None:
        """
        Stop the kernel's process politely, then firmly, and clean up.
        """
        process = kernel.process
        assert process is not None
        exited = process.when_exited()
        link = kernel.link
        if link is not None:
            link.send("control", Message.build("shutdown_request", {"restart": restart}, link.session))
        exited.addTimeout(self.settings.shutdown_wait, self._clock)
        try:
            await exited
        except (*TIMEOUTS, CancelledError):
            pass
        await self._discard(kernel, process)

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
        self._emit("shared", kernel)

    def snapshot_models(self) -> list[dict[str, Any]]:
        return [kernel.model() for kernel in self.kernels.values()]


def _interrupt_signal(spec_env: Mapping[str, str]) -> int:
    """
    SIGINT, or the signal a kernelspec names in C{EG_ALTERNATE_SIGINT}.
    """
    name = spec_env.get("EG_ALTERNATE_SIGINT", "")
    if name:
        try:
            return int(getattr(signals, name if name.startswith("SIG") else f"SIG{name}"))
        except AttributeError:
            _log.warn("unknown EG_ALTERNATE_SIGINT {name}; using SIGINT", name=name)
    return signals.SIGINT


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
