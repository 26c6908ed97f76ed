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
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any, Protocol

from twisted.logger import Logger

from egateway.wire.link import ClientLink, KernelLink
from egateway.wire.protocol import Message

_log = Logger()

HELD_WHILE_NOT_LIVE = 1000
"""
Client messages held while a kernel (re)starts, sent once it is ready.
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


class JournalLimits:
    """
    Bounds of a session's journal.
    """

    def __init__(self, entries: int = 20000, size: int = 64 << 20) -> None:
        self.entries = entries
        self.size = size
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
    """

    def __init__(
        self,
        session_id: str,
        kernel: Any,
        limits: JournalLimits,
        resumable: bool = True,
    ) -> None:
        self.id = session_id
        self.kernel = kernel
        self.limits = limits
        self.resumable = resumable
        self.client: KernelClient | None = None
        self.seq = 0
        self.sent = 0
        self.journal: deque[tuple[int, str, Message, int]] = deque()
        """
        (number, channel, message, its size in bytes): the size is kept so
        that trimming never measures a message twice.
        """
        self._journal_bytes = 0
        self.parked_at: float | None = None
        self._link: ClientLink | None = None
        self._held: deque[tuple[str, Message]] = deque(maxlen=HELD_WHILE_NOT_LIVE)

    # -- kernel side -------------------------------------------------------

    def relink(self, link: KernelLink | None) -> None:
        """
        Move this session's sockets to C{link} (a new launch), or close them
        (C{None}: messages are held until the next link).
        """
        if self._link is not None:
            self._link.close()
            self._link = None
        if link is not None:
            self._link = link.client(self.deliver)
            held, self._held = self._held, deque(maxlen=HELD_WHILE_NOT_LIVE)
            for channel, message in held:
                self._link.send(channel, message)

    def deliver(self, channel: str, message: Message) -> None:
        """
        Number, journal and (if connected) send one message to the client.
        """
        self.seq += 1
        if self.resumable and self.limits.entries > 0:
            self._record(self.seq, channel, message)
        if self.client is not None:
            self.sent = self.seq
            self.client.deliver(channel, message, self.seq)

    def _record(self, seq: int, channel: str, message: Message) -> None:
        sink = self.kernel.journal_sink
        if sink is not None:
            sink(self.kernel.id, self.id, seq, channel, message)
        journal = self.journal
        size = _size(message)
        journal.append((seq, channel, message, size))
        self._journal_bytes += size
        limits = self.limits
        while len(journal) > limits.entries or (self._journal_bytes > limits.size and len(journal) > 1):
            self._journal_bytes -= journal.popleft()[3]
            limits.dropped += 1

    # -- client side -------------------------------------------------------

    def send(self, channel: str, message: Message) -> None:
        """
        A message from the client to the kernel (held while not live).
        """
        self.kernel.touch()
        if self._link is not None:
            self._link.send(channel, message)
        else:
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
        first_kept = self.journal[0][0] if self.journal else self.seq + 1
        missing = max(0, first_kept - start - 1) if start < self.seq else 0
        replay = [entry for entry in self.journal if entry[0] > start]
        if missing:
            self._notify_dropped(client, missing)
        for seq, channel, message, _ in replay:
            client.deliver(channel, message, seq)
        self.sent = self.seq
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
        status = Message.build(
            "status",
            {"execution_state": self.kernel.execution_state, "reason": text},
            session=f"egateway-{self.kernel.id}",
        )
        stream = Message.build("stream", {"name": "stderr", "text": text + "\n"}, session=f"egateway-{self.kernel.id}")
        client.deliver("iopub", status, 0)
        client.deliver("iopub", stream, 0)

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
        self._journal_bytes = 0

    def preload(self, entries: list[tuple[int, str, Message]], known: int) -> None:
        """
        Take over a session another gateway served: its journaled messages,
        and the numbering after the last message the client may have seen
        (C{known}), so numbers never repeat.
        """
        for seq, channel, message in entries:
            size = _size(message)
            self.journal.append((seq, channel, message, size))
            self._journal_bytes += size
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


def _size(message: Message) -> int:
    parts = message.parts
    size = len(parts[0]) + len(parts[1]) + len(parts[2]) + len(parts[3])
    for buffer in message.buffers:
        size += len(buffer)
    return size
