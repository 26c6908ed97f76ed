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

A client session outlives its gateway too: the journal is written ahead
to the store, and a gateway taking a session over continues it from there
and from its own ring of the kernel's iopub (L{egateway.kernels.failover}
argues the design).
"""

from __future__ import annotations

from typing import Any, Collection

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from egateway.errors import Conflict, NotFound, Unavailable
from egateway.kernels.failover import CURSOR_WINDOW, IopubRing, is_kernel_iopub, shared_session_key
from egateway.kernels.kernel import Kernel
from egateway.kernels.journal import decode_entry, encode_entry
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
    Writes resumable sessions' messages to the shared store before their
    clients get them (write-ahead, see L{egateway.kernels.failover}), so a
    client can resume its session on another gateway from any number it
    has seen.  One append per session is in flight at a time; what arrives
    meanwhile goes in the next one.  A batch the store cannot take is
    released to the client all the same, with a warning: the local journal
    still serves a client that comes back here.  A batch refused because
    another gateway has claimed the session closes it here.

    The appends of every session ready in one reactor turn go to the store
    as one request (L{IKernelStore.journal_append_many}): under load
    (hundreds of sessions each getting a message a turn) one request per
    session cost the gateway more than relaying the messages did, and the
    store a script call each.
    """

    BATCH = 500
    """
    Entries of one session in one append.
    """

    REQUEST_ENTRIES = 2000
    """
    Entries in one request to the store (at least one session's batch):
    Redis runs a request as one script, during which it serves nobody else.
    """

    def __init__(self, persistence: Any, clock: Any, max_entries: int) -> None:
        self._persistence = persistence
        self._clock = clock
        self._max_entries = max_entries
        self._pending: dict[Any, list[tuple[int, bytes]]] = {}
        self._in_flight: dict[Any, Deferred[None]] = {}
        self._scheduled: Any = None
        self._failing = False

    def start(self) -> None:
        """
        Nothing to start: appends go out as messages arrive.
        """

    def stop(self) -> Deferred[None]:
        """
        Write what is pending.  Fires once the store has answered for all.
        """
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        while self._pending or self._in_flight:
            self._send_ready()
            await DeferredList(list(set(self._in_flight.values())))

    def __call__(self, session: Any, seq: int, channel: str, message: Any) -> None:
        """
        Journal message C{seq} of C{session}; C{session.commit} is called
        once the store has it.
        """
        self._pending.setdefault(session, []).append((seq, encode_entry(channel, message)))
        if session not in self._in_flight and self._scheduled is None:
            # Next turn: what this turn's reads of every kernel's socket
            # brought goes in one request.
            self._scheduled = self._clock.callLater(0, self._send_ready)

    def _send_ready(self) -> None:
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        request: list[tuple[Any, list[tuple[int, bytes]]]] = []
        entries = 0
        for session in [s for s in self._pending if s not in self._in_flight]:
            pending = self._pending.pop(session)
            batch, rest = pending[: self.BATCH], pending[self.BATCH :]
            if rest:
                self._pending[session] = rest
            if request and entries + len(batch) > self.REQUEST_ENTRIES:
                self._send(request)
                request, entries = [], 0
            request.append((session, batch))
            entries += len(batch)
        if request:
            self._send(request)

    def _send(self, request: list[tuple[Any, list[tuple[int, bytes]]]]) -> None:
        """
        One request to the store with each session's batch of C{request}.
        """

        def failed(failure: Any) -> list[None]:
            # Whatever went wrong, the messages go to the clients (below):
            # holding them would stall the sessions for good.
            if not failure.check(StoreError):
                _log.failure("journal of {count} sessions", failure, count=len(request))
            elif not self._failing:
                # Once per outage: during one, every request fails.
                self._failing = True
                _log.warn(
                    "journal of {count} sessions ({entries} entries) not shared: {error}; clients get their "
                    "messages all the same, but sessions cannot move to another gateway without loss until the "
                    "store takes journal writes again",
                    count=len(request),
                    entries=sum(len(batch) for _, batch in request),
                    error=str(failure.value),
                )
            return [None] * len(request)

        def written(results: list[bool | None]) -> None:
            if results and results[0] is not None and self._failing:
                self._failing = False
                _log.info("the shared store takes journal writes again")
            for (session, batch), appended in zip(request, results):
                self._written(session, batch[-1][0], appended)
            if self._pending and self._scheduled is None:
                self._send_ready()

        appending = self._persistence.store.journal_append_many(
            [(session.kernel.id, session.shared_key, batch) for session, batch in request],
            self._max_entries,
            self._persistence.instance_id,
        )
        for session, _ in request:
            self._in_flight[session] = appending
        appending.addErrback(failed)
        appending.addCallback(written)
        appending.addErrback(lambda f: _log.failure("releasing journaled messages", f))

    def _written(self, session: Any, upto: int, appended: bool | None) -> None:
        """
        The store took (C{True}), refused (C{False}: another gateway claimed
        the session) or could not take (C{None}) C{session}'s messages up to
        C{upto}.
        """
        self._in_flight.pop(session, None)
        if appended is False:
            # Claimed by the gateway the client moved to, which continues
            # from what the store has.
            self._pending.pop(session, None)
            _log.info(
                "kernel {kernel_id} session {session}: another gateway serves it now",
                kernel_id=session.kernel.id,
                session=session.id,
            )
            session.kernel.hand_over(session)
            return
        session.commit(upto)


class SharedKernels(Service):
    """
    The on-demand attachment, leases and following for one gateway.

    The C{sharing} service of the gateway's tree: it stops after the kernel
    manager (whose kernels' last messages it still journals) and before the
    store closes, so the journal's pending appends reach the store.
    """

    name = "sharing"

    def __init__(
        self, manager: Any, persistence: Any, clock: Any, lease_ttl: float, journal_entries: int = 20000
    ) -> None:
        self._manager = manager
        self._persistence = persistence
        self._clock = clock
        self.lease_ttl = lease_ttl
        self.sink = JournalSink(persistence, clock, journal_entries) if journal_entries > 0 else None

    def startService(self) -> None:
        super().startService()
        if self.sink is not None:
            self.sink.start()

    def stopService(self) -> Deferred[None]:
        """
        Fires once the journal's pending appends are written (or refused).
        """
        super().stopService()
        if self.sink is None:
            return succeed(None)
        return self.sink.stop().addErrback(lambda f: _log.failure("writing the last journal entries", f))

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

    def equip(self, kernel: Kernel) -> None:
        """
        Give a kernel this gateway holds what failover needs: the
        write-ahead journal and the ring of its iopub.
        """
        if self.sink is not None:
            kernel.journal_sink = self.sink
            kernel.iopub_ring = IopubRing(kernel.journal_limits)

    async def take_over_session(
        self, kernel: Kernel, session_id: str, resume_after: int | None, user: str = ""
    ) -> None:
        """
        A client (of C{user}) reconnects here with a session another gateway served
        (or served last): continue it from what that gateway wrote to the
        store, then from this gateway's ring of the kernel's iopub, so the
        client gets what it missed once (see L{egateway.kernels.failover}).
        """
        if not session_id:
            return
        try:
            shared_key = shared_session_key(session_id, user)
            previous = await self._store.claim_session(kernel.id, shared_key, self.holder)
        except StoreError as e:
            _log.warn("cannot claim session {session}: {error}", session=session_id, error=str(e))
            return
        here = kernel.sessions.get(session_id)
        if previous in (None, self.holder) and (here is not None or resume_after is None):
            return  # served here (or new)
        known = resume_after or 0
        after = max(0, known - CURSOR_WINDOW) if resume_after is not None else 0
        try:
            stored = await self._store.journal_read(kernel.id, shared_key, after)
            if after and not any(self._iopub_entry(kernel, data) for _, data in stored):
                stored = await self._store.journal_read(kernel.id, shared_key, 0)
        except StoreError as e:
            _log.warn("cannot read the journal of session {session}: {error}", session=session_id, error=str(e))
            return
        if not stored and resume_after is None and here is None:
            return
        if kernel.sessions.get(session_id) is not here:
            return  # another connection to this gateway took it over meanwhile
        entries = []
        for seq, data in stored:
            try:
                channel, message = decode_entry(data)
            except ValueError:
                continue
            entries.append((seq, channel, message))
        journaled = [m for _, c, m in entries if is_kernel_iopub(kernel.id, c, m)]
        cursor = journaled[-1] if journaled else None
        if here is not None:
            kernel.hand_over(here)  # a copy from before the client moved away
        unseen = [entry for entry in entries if entry[0] > known]
        session = kernel.adopt_session(session_id, unseen, known, user)
        ring = kernel.iopub_ring
        missed, found = ring.after([m.msg_id for m in journaled]) if ring is not None else ([], False)
        if not found and cursor is not None and _was_busy(cursor):
            session.note_gap(
                "[egateway] this session moved to another gateway: output the kernel sent while no "
                "gateway was attached may be missing."
            )
        for message in missed:
            session.deliver("iopub", message)
        _log.info(
            "kernel {kernel_id} session {session}: taken over with {count} journaled and {missed} unjournaled "
            "messages",
            kernel_id=kernel.id,
            session=session_id,
            count=len(unseen),
            missed=len(missed),
        )

    @staticmethod
    def _iopub_entry(kernel: Kernel, data: bytes) -> bool:
        try:
            channel, message = decode_entry(data)
        except ValueError:
            return False
        return is_kernel_iopub(kernel.id, channel, message)

    async def records(self, skip: Collection[str] = ()) -> list[KernelRecord]:
        """
        The store's kernel records, but for those of the kernels in C{skip}.
        """
        try:
            return await self._store.load_kernels(skip=skip)
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
                    return await manager.restarts.auto_restart(kernel, manager.last_exit.get(kernel.id))
                finally:
                    await lease.release()
            await deferLater(self._clock, FOLLOW_INTERVAL, lambda: None)
        _log.warn("kernel {kernel_id}: no gateway relaunched it in time", kernel_id=kernel.id)


def _was_busy(message: Any) -> bool:
    """
    Whether the kernel was busy after C{message}: the last kernel message a
    session journaled, so whether output may have followed unseen.
    """
    try:
        return not (message.msg_type == "status" and message.content().get("execution_state") == "idle")
    except ValueError:
        return True
