"""
Client sessions of a kernel, and their journals: what makes a WebSocket
resumable.

A WebSocket names its session (C{?session_id=}, as jupyter_server's gateway
client and JupyterLab do).  The session owns the client's ZMQ sockets (so
replies and C{input_request}s keep arriving while the client is away) and a
bounded journal of every message sent to it, each numbered.  When the
client drops, the session is parked: messages keep being journaled.  A
client that reconnects with the same session id gets what it missed, once,
in order:

  - from the number it names in C{?resume_after=<n>} (each message it got
    carried its number: C{"egateway_seq"} in legacy JSON frames, in the
    metadata of v1 frames), which is exact;
  - otherwise from the first message sent after the gateway noticed the
    drop (what jupyter_server does; messages lost in flight at the moment
    of the drop cannot be known).

If what it missed has fallen off the journal, it is told how many messages
were dropped (an iopub C{status} with a reason, and a C{stream} on stderr)
before the rest is replayed.  Parked sessions expire after a retention
period.

With a store shared by gateways, a session's messages go to the store
before its client gets them, and a named session's sockets have an
identity every gateway derives alike, so another gateway can continue the
session when this one dies (L{egateway.kernels.failover}).
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any, Protocol

from twisted.logger import Logger

from egateway.kernels.failover import gateway_session, message_size, session_identity, shared_session_key
from egateway.kernels.held import HeldMessages
from egateway.wire.link import ClientLink, KernelLink
from egateway.wire.protocol import Message

_log = Logger()

HELD_WHILE_NOT_LIVE = 1000
"""
Client messages held while a kernel (re)starts, sent once it is ready.
"""

CONNECTED_ENTRIES = 256
CONNECTED_BYTES = 4 << 20
"""
While its client is connected, a session's journal keeps only what the
client has not acknowledged (L{KernelSession.acknowledge}: a pong, see
L{egateway.api.ws_acks}), and at most the newest messages within these
bounds (and within its L{JournalLimits}), for a client that answers no
pings: what may still be in flight when the connection drops, which
C{resume_after} replays.  Holding more (up to 20,000 messages or 64 MiB per
session, for as long as the client stays) only cost memory per kernel.
Once the client is gone the full limits apply again, to what arrives
meanwhile.
"""


class KernelClient(Protocol):
    """
    What a connected client (a WebSocket) offers the kernel.
    """

    def deliver(self, channel: str, message: Message, seq: int) -> None:
        """
        A message for this client, with its number in the session.
        """

    def kernel_gone(self, reason: str) -> None:
        """
        The kernel was shut down; the client should close.
        """

    def replaced(self) -> None:
        """
        Another connection took over this session; close this one.
        """

    def deliver_ahead(self, channel: str, message: Message, seq: int) -> None:
        """
        A large message whose signature is still being checked, to be
        numbered C{seq} if it passes: the client may send all of it but
        the end of its WebSocket message now.  L{deliver} of the same
        message and number releases the end; anything else first, or
        L{withdraw}, abandons it.
        """

    def withdraw(self, message: Message) -> None:
        """
        C{message}, given to L{deliver_ahead}, will not be delivered: if the
        client holds part of it, it must drop it.
        """


class JournalLimits:
    """
    Bounds of a session's journal.
    """

    def __init__(self, entries: int = 20000, size: int = 64 << 20, total: int = 0) -> None:
        self.entries = entries
        self.size = size
        self.held = HeldMessages(total)
        """
        What every journal and iopub ring under these limits holds, bounded
        together by C{total} bytes (0: no bound beyond each one's own).
        """
        self.dropped = 0
        """
        Messages trimmed off journals with these bounds (for the metrics).
        """
        self.lost = 0
        """
        Messages reconnecting clients missed because they had been trimmed.
        """


class KernelSession:
    """
    @ivar seq: the number of the last message sent to this session.
    @ivar sent: the number of the last message handed to a connected client.
    @ivar parked_at: when the last client left (C{None} while connected).
    @ivar user: who opened it (empty: a caller naming no user); only they
        may resume it.
    """

    def __init__(
        self,
        session_id: str,
        kernel: Any,
        limits: JournalLimits,
        resumable: bool = True,
        user: str = "",
    ) -> None:
        self.id = session_id
        self.user = user
        self.kernel = kernel
        self.limits = limits
        self.resumable = resumable
        self.client: KernelClient | None = None
        self.seq = 0
        self.sent = 0
        self.journal: deque[tuple[int, str, tuple[bytes, ...], tuple[bytes, ...], int]] = deque()
        """
        (number, channel, parts, buffers, size in bytes) per message.  The
        size is kept so that trimming never measures a message twice.  A
        message's parts rather than the L{Message}, because a tuple of plain
        values leaves the garbage collector's view once a collection has
        seen it and a L{Message} never does.  With 1,000 kernels the
        journals and iopub rings held 226,000 messages, three quarters of
        what each full collection walked while the reactor waited (467 ms,
        bench/scale.py with EGW_BENCH_GC_HEAP).
        """
        self._journal_bytes = 0
        self.parked_at: float | None = None
        self._link: ClientLink | None = None
        self._kernel_link: KernelLink | None = None
        self.shared_key = shared_session_key(session_id, user)
        """
        What the session is called in the shared store, for its user.
        """
        self.identity = session_identity(kernel.id, self.shared_key) if resumable else None
        """
        The routing identity of this session's sockets: for a named
        session the same on every gateway, so replies follow it when
        another gateway takes it over (see L{egateway.kernels.failover}).
        """
        self._uncommitted: deque[tuple[int, str, Message]] | None = None
        """
        Messages numbered and journaled but not yet in the shared store,
        held from the client until they are (write-ahead).  Made on first
        use, as is L{_held}: most sessions need neither, and an empty deque
        takes 760 bytes (1.5 MB for both at 1,000 kernels).
        """
        self._held: deque[tuple[str, Message]] | None = None
        limits.held.add(self)

    @property
    def journaling(self) -> bool:
        """
        Whether messages sent to this session are journaled for a resume.
        """
        return self.resumable and self.limits.entries > 0

    @property
    def held_bytes(self) -> int:
        return self._journal_bytes

    def shed_to(self, most: int) -> int:
        """
        Drop the journal's oldest messages down to C{most} bytes, keeping
        the newest (L{egateway.kernels.held.IHolder}).
        """
        journal, dropped = self.journal, 0
        while self._journal_bytes > most and len(journal) > 1:
            self._journal_bytes -= journal.popleft()[4]
            dropped += 1
        if self.client is None:
            self.limits.dropped += dropped
        return dropped

    # -- kernel side -------------------------------------------------------

    def relink(self, link: KernelLink | None, claim: bool = False) -> None:
        """
        Move this session's sockets to C{link} (a new launch), or close them
        (C{None}: messages are held until the next link).

        A parked named session on a store shared by gateways opens them
        only when its client comes back (or with C{claim}): its client may
        have moved to another gateway, whose sockets have the same identity
        and must keep the kernel's replies.
        """
        if self._link is not None:
            self._link.close()
            self._link = None
        self._kernel_link = link
        if link is not None and (claim or self.client is not None or self._held or not self._shared):
            self._open()

    @property
    def _shared(self) -> bool:
        return self.identity is not None and self.kernel.journal_sink is not None

    def _open(self) -> None:
        assert self._kernel_link is not None
        self._link = self._kernel_link.client(self.deliver, self.identity)
        held, self._held = self._held, None
        for channel, message in held or ():
            self._link.send(channel, message)

    def deliver(self, channel: str, message: Message) -> None:
        """
        Number, journal and (if connected) send one message to the client.
        """
        self.seq += 1
        seq = self.seq
        if self.journaling and self._record(seq, channel, message):
            if self._uncommitted is None:
                self._uncommitted = deque()
            self._uncommitted.append((seq, channel, message))
            return
        if self.client is not None:
            self.sent = seq
            self.client.deliver(channel, message, seq)

    def deliver_ahead(self, channel: str, message: Message) -> None:
        """
        A large message whose signature is being checked
        (L{Kernel.on_iopub_ahead}): a connected client may start receiving
        it, under the number it will get, if this session journals what it
        delivers (a client whose message had to be abandoned, closing its
        connection, resumes and loses nothing) and L{deliver} would hand it
        over at once (no shared store to write it to first).
        """
        if self.client is not None and self.journaling and self.kernel.journal_sink is None:
            self.client.deliver_ahead(channel, message, self.seq + 1)

    def withdraw(self, message: Message) -> None:
        if self.client is not None:
            self.client.withdraw(message)

    @property
    def committed(self) -> int:
        """
        The number of the last message the client may be given: every
        earlier one is in the shared store (or there is none).
        """
        return self._uncommitted[0][0] - 1 if self._uncommitted else self.seq

    def commit(self, upto: int) -> None:
        """
        The shared store holds (or refused) every message up to C{upto}:
        hand them to the client.
        """
        uncommitted = self._uncommitted
        while uncommitted and uncommitted[0][0] <= upto:
            seq, channel, message = uncommitted.popleft()
            if self.client is not None and seq > self.sent:
                self.sent = seq
                self.client.deliver(channel, message, seq)

    def _record(self, seq: int, channel: str, message: Message) -> bool:
        """
        Journal one message.

        @return: whether it went to a shared store first (write-ahead), so
            the client must wait for L{commit}.
        """
        sink = self.kernel.journal_sink
        if sink is not None:
            sink(self, seq, channel, message)
        journal = self.journal
        size = message_size(message)
        journal.append((seq, channel, message.parts, message.buffers, size))
        self._journal_bytes += size
        limits = self.limits
        entries, most = limits.entries, limits.size
        if self.client is not None:
            entries, most = min(entries, CONNECTED_ENTRIES), min(most, CONNECTED_BYTES)
        trimmed = 0
        while len(journal) > entries or (self._journal_bytes - trimmed > most and len(journal) > 1):
            trimmed += journal.popleft()[4]
            if self.client is None:
                # (Trimmed while connected: it was sent to the client.)
                limits.dropped += 1
        self._journal_bytes -= trimmed
        limits.held.grew(size - trimmed)
        return sink is not None

    def acknowledge(self, client: KernelClient, upto: int) -> None:
        """
        C{client} has read every message up to number C{upto}: stop holding
        them (a client resuming after one of them gets what follows; one
        naming an earlier number is told what it lost).
        """
        if client is not self.client:
            return
        upto = min(upto, self.sent)
        journal, freed = self.journal, 0
        while journal and journal[0][0] <= upto:
            freed += journal.popleft()[4]
        if freed:
            self._journal_bytes -= freed
            self.limits.held.shrank(freed)

    # -- client side -------------------------------------------------------

    def send(self, channel: str, message: Message) -> None:
        """
        A message from the client to the kernel (held while not live).
        """
        self.kernel.touch()
        if self._link is None and self._kernel_link is not None:
            self._open()
        if self._link is not None:
            self._link.send(channel, message)
        else:
            if self._held is None:
                self._held = deque(maxlen=HELD_WHILE_NOT_LIVE)
            self._held.append((channel, message))

    def connect(self, client: KernelClient, resume_after: int | None) -> int:
        """
        Attach C{client}, replacing a previous one, and replay what it
        missed.

        @return: the number of messages replayed.
        """
        previous = self.client
        if previous is not None and previous is not client:
            self.client = None
            previous.replaced()
        start = self.sent if resume_after is None else max(0, min(resume_after, self.seq))
        self.client = client
        self.parked_at = None
        if self._link is None and self._kernel_link is not None:
            self._open()
        first_kept = self.journal[0][0] if self.journal else self.seq + 1
        missing = max(0, first_kept - start - 1) if start < self.seq else 0
        upto = self.committed
        replay = [entry for entry in self.journal if start < entry[0] <= upto]
        if missing:
            self._notify_dropped(client, missing)
        for seq, channel, parts, buffers, _ in replay:
            client.deliver(channel, Message(parts, buffers), seq)
        # What is not yet in the shared store follows on commit.
        self.sent = max(start, upto)
        return len(replay)

    def _notify_dropped(self, client: KernelClient, missing: int) -> None:
        text = (
            f"[egateway] {missing} message(s) of output were dropped while you were "
            f"disconnected (the journal keeps the last {self.limits.entries} messages)."
        )
        self.limits.lost += missing
        _log.warn(
            "kernel {kernel_id} session {session}: {missing} messages dropped past the journal bound",
            kernel_id=self.kernel.id,
            session=self.id,
            missing=missing,
        )
        for notice in self._notices(text):
            client.deliver("iopub", notice, 0)

    def note_gap(self, text: str) -> None:
        """
        Tell the client, in order with its messages, that some may be
        missing here (L{egateway.kernels.failover}).
        """
        _log.warn("kernel {kernel_id} session {session}: {text}", kernel_id=self.kernel.id, session=self.id, text=text)
        for notice in self._notices(text):
            self.deliver("iopub", notice)

    def _notices(self, text: str) -> list[Message]:
        """
        An iopub C{status} whose C{reason} is C{text}, and C{text} on stderr.
        """
        session = gateway_session(self.kernel.id)
        status = Message.build(
            "status", {"execution_state": self.kernel.execution_state, "reason": text}, session=session
        )
        stream = Message.build("stream", {"name": "stderr", "text": text + "\n"}, session=session)
        return [status, stream]

    def disconnect(self, client: KernelClient, now: float) -> None:
        """
        The client left; keep journaling until it returns or the session
        expires.
        """
        if self.client is client:
            self.client = None
            self.parked_at = now

    def close(self) -> None:
        self.relink(None)
        self.journal.clear()
        self._uncommitted = None
        self.limits.held.shrank(self._journal_bytes)
        self.limits.held.remove(self)
        self._journal_bytes = 0

    def preload(self, entries: list[tuple[int, str, Message]], known: int) -> None:
        """
        Take over a session another gateway served: its journaled messages,
        and the numbering after the last message the client may have seen
        (C{known}), so numbers never repeat.
        """
        for seq, channel, message in entries:
            size = message_size(message)
            self.journal.append((seq, channel, message.parts, message.buffers, size))
            self._journal_bytes += size
            self.limits.held.grew(size)
        last = entries[-1][0] if entries else 0
        self.seq = self.sent = max(last, known)
        self.parked_at = None


def encode_entry(channel: str, message: Message) -> bytes:
    """
    One journaled message as bytes, for a store shared by gateways: the
    channel, then each part and buffer, length-prefixed.
    """
    parts = [channel.encode("ascii"), *message.parts, *message.buffers]
    # One join, so a large output is copied once.
    return b"".join([struct.pack(f"!I{len(parts)}I", len(parts), *(len(p) for p in parts)), *parts])


def decode_entry(data: bytes) -> tuple[str, Message]:
    """
    @raise ValueError: not an entry L{encode_entry} wrote.
    """
    try:
        (count,) = struct.unpack_from("!I", data)
        lengths = struct.unpack_from(f"!{count}I", data, 4)
        offset = 4 + 4 * count
        parts = []
        for length in lengths:
            parts.append(data[offset : offset + length])
            offset += length
        if offset != len(data) or count < 5:
            raise ValueError("entry length mismatch")
        return parts[0].decode("ascii"), Message(parts[1:5], parts[5:])
    except (struct.error, UnicodeDecodeError) as e:
        raise ValueError(f"not a journal entry: {e}") from None

