"""
Several gateways sharing one store (Redis): any of them serves any kernel.

A gateway that gets a request for a kernel it does not hold reads the
kernel's record and attaches on demand (its own ZMQ link; the kernel runs
wherever it runs).  Every gateway attached to a kernel watches it, but only
one at a time may change it: restart, automatic restart, culling and
shutdown each take the kernel's lease in the store first.  A gateway that
loses the race for an automatic restart follows instead: it rereads the
record until the winner has relaunched the kernel (then relinks to the new
process), removed it, or declared it dead.  A gateway that dies releases its
leases by expiry.

With a shared store a gateway's graceful stop always keeps kernels: other
gateways may be serving them.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from egateway.errors import Conflict, NotFound, Unavailable
from egateway.kernels.kernel import Kernel
from egateway.kernels.session import decode_entry, encode_entry
from egateway.kernels.state import KernelState
from egateway.store.interface import KernelRecord, StoreError

_log = Logger()

LEASED_OPERATIONS = frozenset({"restart", "auto-restart", "shutdown"})
"""
Operations that change a kernel for every gateway, so need its lease.
"""

LEASE_WAIT = 10.0
"""
Seconds an explicit request waits for another gateway's lease to end.
"""

FOLLOW_INTERVAL = 0.5


class Lease:
    """
    A held lease, renewed every third of its ttl until released.
    """

    def __init__(self, store: Any, kernel_id: str, holder: str, ttl: float, clock: Any) -> None:
        self._store = store
        self.kernel_id = kernel_id
        self._holder = holder
        self._ttl = ttl
        self._renew = LoopingCall(self._renew_once)
        self._renew.clock = clock
        self._renew.start(ttl / 3, now=False)

    async def _renew_once(self) -> None:
        try:
            if not await self._store.acquire_lease(self.kernel_id, self._holder, self._ttl):
                _log.warn("lost the lease of kernel {kernel_id}", kernel_id=self.kernel_id)
        except StoreError as e:
            _log.warn("renewing the lease of kernel {kernel_id}: {error}", kernel_id=self.kernel_id, error=str(e))

    async def release(self) -> None:
        if self._renew.running:
            self._renew.stop()
        try:
            await self._store.release_lease(self.kernel_id, self._holder)
        except StoreError:
            pass


class JournalSink:
    """
    Copies journaled messages to the shared store in batches, so a client
    can resume its session on another gateway.  Best effort: a batch the
    store refuses is dropped with a warning (the local journal still
    serves clients that come back here).
    """

    FLUSH_INTERVAL = 0.1
    BATCH = 500

    def __init__(self, persistence: Any, clock: Any, max_entries: int) -> None:
        self._persistence = persistence
        self._max_entries = max_entries
        self._pending: dict[tuple[str, str], list[tuple[int, bytes]]] = {}
        self._loop = LoopingCall(self.flush)
        self._loop.clock = clock

    def start(self) -> None:
        if not self._loop.running:
            self._loop.start(self.FLUSH_INTERVAL, now=False)

    def stop(self) -> Any:
        if self._loop.running:
            self._loop.stop()
        return self.flush()

    def __call__(self, kernel_id: str, session_id: str, seq: int, channel: str, message: Any) -> None:
        batch = self._pending.setdefault((kernel_id, session_id), [])
        batch.append((seq, encode_entry(channel, message)))
        if len(batch) >= self.BATCH:
            self._send(kernel_id, session_id, self._pending.pop((kernel_id, session_id)))

    def flush(self) -> Any:
        pending, self._pending = self._pending, {}
        from twisted.internet.defer import DeferredList

        return DeferredList(
            [self._send(kid, sid, batch) for (kid, sid), batch in pending.items()], consumeErrors=True
        )

    def _send(self, kernel_id: str, session_id: str, batch: list[tuple[int, bytes]]) -> Any:
        def failed(failure: Any) -> None:
            failure.trap(StoreError)
            _log.warn(
                "journal of kernel {kernel_id} session {session}: {count} entries not shared: {error}",
                kernel_id=kernel_id,
                session=session_id,
                count=len(batch),
                error=str(failure.value),
            )

        store = self._persistence.store
        return store.journal_append(kernel_id, session_id, batch, self._max_entries).addErrback(failed)


class SharedKernels:
    """
    The on-demand attachment, leases and following for one gateway.
    """

    def __init__(
        self, manager: Any, persistence: Any, clock: Any, lease_ttl: float, journal_entries: int = 20000
    ) -> None:
        self._manager = manager
        self._persistence = persistence
        self._clock = clock
        self.lease_ttl = lease_ttl
        self.sink = JournalSink(persistence, clock, journal_entries) if journal_entries > 0 else None

    @property
    def _store(self) -> Any:
        return self._persistence.store

    @property
    def holder(self) -> str:
        # The process, not the installation: two gateways given one
        # gateway_id must still hold leases apart.
        return self._persistence.instance_id

    # -- attaching ---------------------------------------------------------

    async def attach(self, kernel_id: str) -> Kernel:
        """
        Attach to a kernel another gateway started.

        @raise NotFound: no such kernel in the store.
        @raise Unavailable: the store cannot be reached.
        """
        try:
            record = await self._store.load_kernel(kernel_id)
        except StoreError as e:
            raise Unavailable(f"cannot look kernel {kernel_id} up: the kernel store is unavailable ({e})") from None
        if record is None:
            raise NotFound(f"Kernel does not exist: {kernel_id}")
        existing = self._manager.kernels.get(kernel_id)
        if existing is not None:
            return existing
        _log.info("attaching to kernel {kernel_id} on demand", kernel_id=kernel_id)
        kernel = await self._persistence.restore(record)
        if kernel is None:
            raise NotFound(f"Kernel does not exist: {kernel_id}")
        return kernel

    async def take_over_session(
        self, kernel: Kernel, session_id: str, resume_after: int | None, user: str = ""
    ) -> None:
        """
        A client (of C{user}) reconnects here with a session another gateway
        served: load what that gateway journaled, so the client gets what
        it missed.
        """
        if not session_id or session_id in kernel.sessions:
            return
        try:
            stored = await self._store.journal_read(kernel.id, session_id, resume_after or 0)
        except StoreError as e:
            _log.warn("cannot read the journal of session {session}: {error}", session=session_id, error=str(e))
            return
        if not stored and resume_after is None:
            return
        entries = []
        for seq, data in stored:
            try:
                channel, message = decode_entry(data)
            except ValueError:
                continue
            entries.append((seq, channel, message))
        kernel.adopt_session(session_id, entries, resume_after or 0, user)
        _log.info(
            "kernel {kernel_id} session {session}: taken over with {count} journaled messages",
            kernel_id=kernel.id,
            session=session_id,
            count=len(entries),
        )

    async def records(self) -> list[KernelRecord]:
        try:
            return await self._store.load_kernels()
        except StoreError as e:
            raise Unavailable(f"cannot list kernels: the kernel store is unavailable ({e})") from None

    # -- leases ------------------------------------------------------------

    async def acquire(self, kernel: Kernel, wait: float = LEASE_WAIT) -> Lease | None:
        """
        Take C{kernel}'s lease, waiting up to C{wait} seconds for another
        gateway to finish with it.

        @return: the lease, or C{None} if another gateway kept it.
        @raise Unavailable: the store cannot be reached.
        """
        deadline = self._clock.seconds() + wait
        while True:
            try:
                if await self._store.acquire_lease(kernel.id, self.holder, self.lease_ttl):
                    return Lease(self._store, kernel.id, self.holder, self.lease_ttl, self._clock)
            except StoreError as e:
                raise Unavailable(f"cannot change kernel {kernel.id}: the kernel store is unavailable ({e})") from None
            if self._clock.seconds() >= deadline:
                return None
            await deferLater(self._clock, FOLLOW_INTERVAL, lambda: None)

    async def leased(self, name: str, kernel: Kernel, step: Any, *args: Any) -> Any:
        """
        Run operation C{name}'s step holding the kernel's lease.  An
        automatic restart that another gateway is already doing is followed
        instead.
        """
        lease = await self.acquire(kernel, wait=0 if name == "auto-restart" else LEASE_WAIT)
        if lease is None:
            if name == "auto-restart":
                return await self.follow(kernel)
            raise Conflict(f"another gateway is changing kernel {kernel.id}; try again")
        try:
            if name == "auto-restart" and await self._changed_elsewhere(kernel):
                return await self.follow(kernel)
            return await step(kernel, *args)
        finally:
            await lease.release()

    async def _changed_elsewhere(self, kernel: Kernel) -> bool:
        record = await self._store.load_kernel(kernel.id)
        return record is None or self._differs(kernel, record)

    def _differs(self, kernel: Kernel, record: KernelRecord) -> bool:
        process = kernel.process
        return (
            record.restarts != kernel.restart_count
            or record.state == KernelState.DEAD.value
            or (process is not None and record.snapshot != process.snapshot())
        )

    # -- following ---------------------------------------------------------

    async def follow(self, kernel: Kernel) -> None:
        """
        Another gateway holds the kernel's lease while it died: wait for that
        gateway's outcome and adopt it.
        """
        manager = self._manager
        deadline = self._clock.seconds() + manager.settings.launch_timeout * 2 + 10
        while self._clock.seconds() < deadline:
            try:
                record = await self._store.load_kernel(kernel.id)
            except StoreError:
                record = kernel  # unknown: keep waiting
            if record is None:
                manager.forget_elsewhere(kernel, "shut down through another gateway")
                return
            if isinstance(record, KernelRecord) and self._differs(kernel, record):
                await manager.relink(kernel, record)
                return
            lease = await self.acquire(kernel, wait=0)
            if lease is not None:
                # The other gateway is gone: restart here.
                try:
                    return await manager._auto_restart(kernel, manager.last_exit.get(kernel.id))
                finally:
                    await lease.release()
            await deferLater(self._clock, FOLLOW_INTERVAL, lambda: None)
        _log.warn("kernel {kernel_id}: no gateway relaunched it in time", kernel_id=kernel.id)
