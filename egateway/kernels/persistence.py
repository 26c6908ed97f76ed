"""
Kernels that outlive the gateway process.

L{KernelPersistence} writes a record of every kernel to the store at each
lifecycle change (launching, running, restarted, dead, removed), restores
every record when the gateway starts (reattaching through the launcher's
snapshot, or reporting the kernel dead with the reason and cleaning up its
leftovers), and on a graceful stop lets kernels run on when C{on_stop} is
C{keep}.

Writes that fail because the store is down are retried every few seconds;
attached kernels keep working meanwhile.  Starting a kernel needs the store:
if its first record cannot be written the start fails with 503 rather than
create a kernel a restart would lose.

L{KernelPersistence} is the C{persistence} service of the gateway's tree:
started before the kernel manager and stopped after it (so the kernels'
final records are written before the store closes).  Starting, it opens the
store and restores its kernels; a shared store that is down is tried again
with exponential back-off until it answers or the gateway stops.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from egateway.errors import Unavailable
from egateway.kernels.kernel import Kernel
from egateway.kernels.specs import KernelSpec, NoSuchKernelSpec
from egateway.kernels.state import KernelState
from egateway.observe import Operation
from egateway.store.interface import IKernelStore, KernelRecord, SessionRecord, StoreError, StoreRefused

_log = Logger()

RETRY_INTERVAL = 5.0
"""
Seconds between retries of writes the store refused.
"""

OPEN_RETRY = backoffPolicy(initialDelay=1.0, maxDelay=30.0, factor=2.0)
"""
Seconds before the next attempt to open a shared store that is down, by the
number of failed attempts: 2, 4, 8 ... up to 30, plus up to a second of
jitter so gateways restarted together do not knock in step.
"""

T = TypeVar("T")

RESTORE_SLICE = 50
"""
Kernels whose restore starts in one reactor turn.  A restore runs without
waiting up to its first request to the kernel (a launcher's liveness check
often answers at once), so a thousand started in one turn held the reactor
for a second or more: no request answered, no message relayed.
"""

LAUNCH_POLL = 0.5
"""
Seconds between reads of a shared record whose kernel another gateway is
still launching.
"""


def record_of(kernel: Kernel, gateway_id: str) -> KernelRecord:
    process = kernel.process
    return KernelRecord(
        kernel_id=kernel.id,
        spec_name=kernel.spec.name,
        username=kernel.username,
        launcher=kernel.launcher_name,
        snapshot=process.snapshot() if process is not None else {},
        env=dict(kernel.env),
        state=kernel.state.value,
        execution_state=kernel.execution_state,
        created=kernel.started,
        updated=kernel.last_activity,
        restarts=kernel.restart_count,
        reason=kernel.reason,
        gateway_id=gateway_id,
        owner=kernel.owner,
        owner_groups=sorted(kernel.owner_groups),
        acl=kernel.acl.to_json(),
        profile=kernel.profile or "",
    )


def placeholder_spec(name: str) -> KernelSpec:
    """
    A stand-in for a kernelspec that no longer exists, so a running kernel
    started from it can still be reattached (and shut down).
    """
    return KernelSpec.from_json(
        name, "", {"argv": ["(removed kernelspec)"], "display_name": name, "language": ""}
    )


class KernelPersistence(Service):
    """
    @ivar on_stop: C{"keep"} (kernels outlive a graceful stop) or
        C{"shutdown"}.
    @ivar gateway_id: the installation's id, in every record it writes.
    @ivar instance_id: this gateway process's own id, unique to it (the
        holder of its leases in a shared store).
    @ivar restoring: the start-up (opening the store, restoring its
        kernels), once started; what a listing waits on.
    @ivar on_fatal: told why the gateway cannot run (a store of its own
        that cannot be opened).
    """

    name = "persistence"

    def __init__(
        self,
        open_store: Any,
        shared: bool,
        manager: Any,
        clock: Any,
        gateway_id: str,
        on_stop: str,
        instance_id: str = "",
        retry_policy: Callable[[int], float] = OPEN_RETRY,
    ) -> None:
        """
        @param open_store: returns (a Deferred of) the L{IKernelStore}, not
            yet started; called once, at start, because finding the store's
            key reads a file.
        @param shared: whether the store is one several gateways share.
        @param instance_id: default: C{gateway_id} (enough for a store
            only one gateway process opens).
        @param retry_policy: seconds to wait after the n-th failed attempt
            to open a shared store.
        """
        self._open_store = open_store
        self.store: IKernelStore = _NotOpen()
        self.shared = shared
        self._manager = manager
        self._clock = clock
        self.gateway_id = gateway_id
        self.instance_id = instance_id or gateway_id
        self.on_stop = on_stop
        self._unsaved: set[str] = set()
        self._undeleted: set[str] = set()
        self._published: dict[str, float] = {}
        self.opened = False
        self._opening: Deferred[None] | None = None
        self.restored: list[Any] = []
        """
        Coroutine functions run after kernels are restored (sessions).
        """
        self._retry = LoopingCall(self._flush)
        self._retry.clock = clock
        self._retry_policy = retry_policy
        self.restoring: Operation[None] | None = None
        self._backoff: Deferred[None] | None = None
        self.on_fatal: Callable[[str], None] = lambda message: _log.critical(message)
        manager.listeners.append(self._event)

    # -- service -----------------------------------------------------------

    def startService(self) -> None:
        """
        Open the store and restore its kernels, in the background (twistd
        does not wait); L{restoring} says when that is done.
        """
        super().startService()
        self.restoring = Operation("restore", self._start_until_open(), subject="the kernel store")

    async def _start_until_open(self) -> None:
        """
        L{start}; with a shared store, again after a back-off while the
        store is unavailable.  A store of this gateway's own that cannot
        be opened, or one that refuses it (L{StoreRefused}), is fatal.
        """
        failures = 0
        while self.running:
            try:
                await self.start()
                return
            except CancelledError:
                raise
            except Exception as e:
                if not self.running:
                    # Stopped while opening: the store was closed under it.
                    return
                if not self.shared or isinstance(e, StoreRefused):
                    self.on_fatal(f"cannot open the kernel store: {e}")
                    return
                failures += 1
                delay = self._retry_policy(failures)
                _log.error(
                    "the kernel store is unavailable ({error}); trying again in {delay:.1f}s, and kernels "
                    "will be restored when it returns",
                    error=str(e),
                    delay=delay,
                )
                self._backoff = deferLater(self._clock, delay, lambda: None)
                try:
                    await self._backoff
                except CancelledError:
                    return
                finally:
                    self._backoff = None

    def stopService(self) -> Deferred[None]:
        """
        Stop retrying to open the store; write what is unsaved and close it.
        An attempt in progress (opening, restoring) is not cancelled
        half-way but waited for, so what it opens is closed, not left
        behind.
        """
        super().stopService()
        if self._backoff is not None:
            self._backoff.cancel()
        return Deferred.fromCoroutine(self._stop_after_start()).addErrback(
            lambda f: _log.failure("closing the kernel store", f)
        )

    async def _stop_after_start(self) -> None:
        restoring = self.restoring
        if restoring is not None and not restoring.done:
            await restoring.finished()
        await self.stop()

    @property
    def keeps_kernels(self) -> bool:
        """
        Whether a graceful stop leaves kernels running: when configured, and
        always with a shared store (other gateways may serve them).
        """
        return self.on_stop == "keep" or self.shared

    async def start(self) -> None:
        """
        Open the store and restore every kernel it records.
        """
        self._opening = Deferred.fromCoroutine(self._open())
        try:
            await self._opening
        finally:
            self._opening = None
        if not self._retry.running:
            self._retry.start(RETRY_INTERVAL, now=False)
        await self.restore_all()
        for after in self.restored:
            try:
                await after()
            except Exception:
                _log.failure("restoring after kernels")

    async def _open(self) -> None:
        if isinstance(self.store, _NotOpen):
            self.store = await self._open_store()
        await self.store.start()
        self.opened = True

    async def stop(self) -> None:
        if self._retry.running:
            self._retry.stop()
        if isinstance(self.store, _NotOpen):
            return
        try:
            await self._flush()
        finally:
            await self.store.stop()

    # -- writing -------------------------------------------------------

    async def admit(self, kernel: Kernel) -> None:
        """
        Record a kernel about to launch.

        @raise Unavailable: the store cannot take the record (503).
        """
        if not self.opened and self._opening is not None:
            # The gateway is starting: wait (briefly) for the store to open.
            waiting: Deferred[None] = Deferred()
            self._opening.addBoth(lambda r: waiting.callback(None) if not waiting.called else None)
            waiting.addTimeout(10, self._clock)
            try:
                await waiting
            except TimeoutError:
                # Still not open: the write below fails with the reason.
                _log.warn("kernel {kernel_id}: the kernel store is still opening", kernel_id=kernel.id)
        try:
            await self.store.save_kernel(record_of(kernel, self.gateway_id))
        except StoreError as e:
            raise Unavailable(f"the kernel store is unavailable, so no kernel can start: {e}") from None

    def _event(self, event: str, kernel: Kernel) -> None:
        if event in ("removed", "failed"):
            self._unsaved.discard(kernel.id)
            self._delete(kernel.id)
        else:
            self.save(kernel)

    def save(self, kernel: Kernel) -> Deferred[None]:
        """
        Write C{kernel}'s record now; if the store refuses, retry later.
        """
        d = self.store.save_kernel(record_of(kernel, self.gateway_id))

        def failed(failure: Any) -> None:
            failure.trap(StoreError)
            self._unsaved.add(kernel.id)
            _log.warn(
                "kernel {kernel_id}: record not saved, will retry: {error}",
                kernel_id=kernel.id,
                error=str(failure.value),
            )

        return d.addErrback(failed)

    def _delete(self, kernel_id: str) -> None:
        def failed(failure: Any) -> None:
            failure.trap(StoreError)
            self._undeleted.add(kernel_id)

        self.store.delete_kernel(kernel_id).addErrback(failed)
        self.store.journal_delete(kernel_id).addErrback(lambda f: f.trap(StoreError) and None)

    async def _flush(self) -> None:
        """
        Retry the writes the store refused earlier; with a shared store, also
        publish each kernel's latest activity (the others cull by it).
        """
        if self.shared:
            for kernel in list(self._manager.kernels.values()):
                if kernel.pooled:
                    # A warm pool's: recorded once bound (see egateway.kernels.pools).
                    continue
                if kernel.last_activity > self._published.get(kernel.id, 0.0) and kernel.state == KernelState.RUNNING:
                    self._published[kernel.id] = kernel.last_activity
                    self._unsaved.add(kernel.id)
        for kernel_id in list(self._undeleted):
            try:
                await self.store.delete_kernel(kernel_id)
                self._undeleted.discard(kernel_id)
            except StoreError:
                return
        for kernel_id in list(self._unsaved):
            kernel = self._manager.kernels.get(kernel_id)
            self._unsaved.discard(kernel_id)
            if kernel is None:
                continue
            try:
                await self.store.save_kernel(record_of(kernel, self.gateway_id))
            except StoreError:
                self._unsaved.add(kernel_id)
                return

    # -- restoring -------------------------------------------------------

    async def restore_all(self) -> None:
        records = await self.store.load_kernels()
        if records:
            _log.info("restoring {count} kernels from the store", count=len(records))
        await in_slices(self._clock, records, lambda record: Deferred.fromCoroutine(self.restore(record)))

    async def restore(self, record: KernelRecord) -> Kernel | None:
        """
        Reattach to one recorded kernel.  A kernel that is gone is listed as
        dead with the reason (until culled or deleted).
        """
        if record.kernel_id in self._manager.kernels:
            return self._manager.kernels[record.kernel_id]
        if self.shared and record.state == KernelState.LAUNCHING.value:
            launched = await self._launched_elsewhere(record)
            if launched is None:
                return None
            if record.kernel_id in self._manager.kernels:
                return self._manager.kernels[record.kernel_id]
            record = launched
        try:
            spec = await self._manager.specs.get(record.spec_name)
        except NoSuchKernelSpec:
            spec = placeholder_spec(record.spec_name)
        try:
            return await self._manager.restore_kernel(record, spec)
        except Exception:
            _log.failure("restoring kernel {kernel_id}", kernel_id=record.kernel_id)
            return None

    async def _launched_elsewhere(self, record: KernelRecord) -> KernelRecord | None:
        """
        A shared record of a kernel still launching (on another gateway: it
        has no snapshot to reattach with yet): reread it until the launch
        ends, for at most the launch timeout and a margin.  C{None} when the
        kernel was removed meanwhile; the last record read when the launch
        outlasts the wait (restored as usual: dead, with the reason).
        """
        deadline = self._clock.seconds() + self._manager.settings.launch_timeout + 10
        while record.state == KernelState.LAUNCHING.value and self._clock.seconds() < deadline:
            await deferLater(self._clock, LAUNCH_POLL, lambda: None)
            try:
                fresh = await self.store.load_kernel(record.kernel_id)
            except StoreError:
                continue
            if fresh is None:
                return None
            record = fresh
        return record

    async def keep_all(self) -> None:
        """
        The gateway is stopping and kernels stay: detach from each and save
        its final record.
        """
        kernels = [k for k in self._manager.kernels.values() if k.state != KernelState.LAUNCHING]
        if self.shared:
            kernels = [k for k in kernels if await self._still_recorded(k)]
        saves = []
        for kernel in kernels:
            if kernel.process is not None:
                kernel.process.detach()
            saves.append(self.save(kernel))
        await DeferredList(saves, consumeErrors=True)

    async def _still_recorded(self, kernel: Kernel) -> bool:
        """
        Whether the shared store still has C{kernel}: another gateway may
        have shut it down a moment ago, before this one heard of it, and
        saving this gateway's copy would bring the removed kernel back.
        """
        try:
            return await self.store.load_kernel(kernel.id) is not None
        except StoreError:
            # Unknown: keep it (a lost record is worse than a stale one the
            # reconciler can reap).
            return True

    # -- sessions --------------------------------------------------------

    def save_session(self, record: SessionRecord) -> None:
        self.store.save_session(record).addErrback(
            lambda f: _log.warn("session {id} not saved: {error}", id=record.id, error=str(f.value))
        )

    def delete_session(self, session_id: str) -> None:
        self.store.delete_session(session_id).addErrback(
            lambda f: _log.warn("session {id} not deleted: {error}", id=session_id, error=str(f.value))
        )

    async def load_sessions(self) -> list[SessionRecord]:
        return await self.store.load_sessions()


class _NotOpen:
    """
    The store before start: every operation fails as unavailable.
    """

    shared = False

    def __getattr__(self, name: str) -> Any:
        def unavailable(*args: Any, **kwargs: Any) -> Deferred[Any]:
            from twisted.internet.defer import fail

            from egateway.store.interface import StoreUnavailable

            return fail(StoreUnavailable("the kernel store is not open yet"))

        return unavailable


async def in_slices(clock: Any, items: Sequence[T], start: Callable[[T], Deferred[Any]], size: int = RESTORE_SLICE) -> None:
    """
    C{start(item)} for each of C{items}, C{size} per reactor turn, then wait
    for all: they run concurrently as before, and the reactor serves what
    else is waiting between two slices.  Their failures are theirs to log.
    """
    started: list[Deferred[Any]] = []
    for offset in range(0, len(items), size):
        if offset:
            await deferLater(clock, 0, lambda: None)
        started += [start(item) for item in items[offset : offset + size]]
    await DeferredList(started, consumeErrors=True)
