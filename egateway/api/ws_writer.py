"""
Server-to-client WebSocket frames written straight to the transport, large
payloads streamed from the buffers they are held in.

A kernel's 20 MB output arrives as a view of ZMQ's buffer
(L{egateway.wire.zmq.receive}).  Written as one frame it would be copied
twice more: once to make the C{bytes} Twisted's C{write} insists on, and
again when the transport joins it with whatever small frames wait in its
buffer (measured: the two joins were the gateway's largest cost for such an
output).  L{FrameWriter} sends a payload of L{STREAM_SIZE} or more as a
fragmented message instead (RFC 6455 section 5.4: a text or binary frame
without FIN, continuation frames, the last with FIN), one fragment of
L{FRAGMENT_SIZE} at a time, the next written only when the transport has
drained the previous one (it is the transport's streaming producer for the
while).  Each fragment is one small copy out of the payload's own buffers;
the transport sends it as it is.  Messages to the same client that come
meanwhile wait, in order, behind the streamed one.  Autobahn's own frames
(pings, close) may fall between fragments, which the RFC allows for
control frames.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any, Callable, Iterator, Sequence

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

STREAM_SIZE = 1 << 20
"""
Payloads this large are streamed as fragments; smaller ones are one frame,
made by one join.
"""

FRAGMENT_SIZE = 1 << 20
"""
Payload bytes per fragment of a streamed message.
"""

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2


def frame_header(opcode: int, length: int, fin: bool = True) -> bytes:
    """
    The header of an unmasked server frame of C{length} payload bytes.
    """
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        return struct.pack("!BB", first, length)
    if length < 65536:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


def fragments(chunks: Sequence[Any], length: int, binary: bool, size: int = FRAGMENT_SIZE) -> Iterator[bytes]:
    """
    The frames of a message whose payload is the concatenation of
    C{chunks} (C{length} bytes), as fragments of up to C{size} payload
    bytes, each one C{bytes} ready to write.
    """
    views = deque(memoryview(chunk).cast("B") for chunk in chunks if len(chunk))
    opcode = OP_BINARY if binary else OP_TEXT
    left = length
    while True:
        take = min(size, left)
        left -= take
        pieces: list[Any] = [frame_header(opcode, take, fin=not left)]
        while take:
            view = views[0]
            if len(view) <= take:
                pieces.append(view)
                take -= len(view)
                views.popleft()
            else:
                pieces.append(view[:take])
                views[0] = view[take:]
                take = 0
        yield b"".join(pieces)
        if not left:
            return
        opcode = OP_CONTINUATION


@implementer(IPushProducer)
class FrameWriter:
    """
    Writes one connection's server frames, in order.

    @param transport: the connection's transport.
    @param is_open: whether data frames may still be sent (the WebSocket is
        open: no close frame sent or received).
    """

    def __init__(self, transport: Any, is_open: Callable[[], bool]) -> None:
        self._transport = transport
        self._is_open = is_open
        self._waiting: deque[tuple[Sequence[Any], int, bool]] = deque()
        self._stream: Iterator[bytes] | None = None
        self._paused = False
        self._previous: tuple[Any, bool] | None = None

    @property
    def streaming(self) -> bool:
        return self._stream is not None

    def send(self, chunks: Sequence[Any], length: int, binary: bool) -> None:
        """
        Send one message whose payload is the concatenation of C{chunks}.
        """
        if self._stream is not None:
            self._waiting.append((chunks, length, binary))
            return
        if length < STREAM_SIZE or not self._start(fragments(chunks, length, binary)):
            header = frame_header(OP_BINARY if binary else OP_TEXT, length)
            self._transport.write(b"".join([header, *chunks]))

    def _start(self, stream: Iterator[bytes]) -> bool:
        """
        Stream a message's fragments, if the transport lets us be its
        producer; whether it does.
        """
        transport = self._transport
        # A TCP transport names its producer; a TLS one hides it behind its
        # own, which cannot be swapped: such a message goes as one frame.
        if not hasattr(transport, "producer"):
            return False
        # Be the transport's producer while streaming (its resumeProducing
        # says the previous fragment is sent), and hand the place back
        # after; whoever held it (Twisted's HTTP channel, which pauses
        # reading while output backs up) is told of pauses meanwhile.
        producer = transport.producer
        if producer is not None:
            self._previous = (producer, bool(getattr(transport, "streamingProducer", True)))
            transport.unregisterProducer()
        self._stream = stream
        self._paused = False
        transport.registerProducer(self, True)
        self._write_next()
        return True

    def _write_next(self) -> None:
        """
        Write fragments until the transport says to pause, the message is
        done, or the connection may no longer carry data.
        """
        while self._stream is not None and not self._paused:
            if not self._is_open():
                self._finish(send_waiting=False)
                return
            fragment = next(self._stream, None)
            if fragment is None:
                self._finish(send_waiting=True)
                return
            self._transport.write(fragment)

    def _finish(self, send_waiting: bool) -> None:
        self._stream = None
        self._paused = False
        transport = self._transport
        if getattr(transport, "producer", None) is self:
            transport.unregisterProducer()
        previous, self._previous = self._previous, None
        if previous is not None and getattr(transport, "producer", None) is None and getattr(transport, "connected", True):
            transport.registerProducer(*previous)
        if not send_waiting:
            self._waiting.clear()
            return
        while self._waiting and self._stream is None:
            self.send(*self._waiting.popleft())

    # -- IPushProducer (registered only while streaming) ---------------

    def pauseProducing(self) -> None:
        self._paused = True
        if self._previous is not None:
            self._previous[0].pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._previous is not None:
            self._previous[0].resumeProducing()
        self._write_next()

    def stopProducing(self) -> None:
        """
        The connection is gone: drop the rest.
        """
        self._stream = None
        self._previous = None
        self._waiting.clear()
