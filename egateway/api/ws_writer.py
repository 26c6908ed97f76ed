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
while).  Through a TCP transport a fragment's large pieces are not copied at
all: each is handed over, once the transport's buffer is empty, as the
buffer Twisted sends from (L{_hand_over}); only the frame header with the
small chunks around it, and the last bytes of each piece that Twisted joins
with what follows (under its C{SEND_LIMIT}), are copied.  Through any other
transport each fragment is one copy out of the payload's own buffers.
Messages to the same client that come
meanwhile wait, in order, behind the streamed one.  Autobahn's own frames
(pings, close) may fall between fragments, which the RFC allows for
control frames.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any, Callable, Iterator, Sequence

from twisted.internet.abstract import FileDescriptor
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

DIRECT_SIZE = 64 * 1024
"""
Pieces of a streamed payload this large are handed to a TCP transport as
they are (L{_hand_over}); smaller ones are joined with the frame header.
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


def fragment_pieces(
    chunks: Sequence[Any], length: int, binary: bool, size: int = FRAGMENT_SIZE
) -> Iterator[list[Any]]:
    """
    The frames of a message whose payload is the concatenation of
    C{chunks} (C{length} bytes), as fragments of up to C{size} payload
    bytes, each one a list of its header and views of the chunks (nothing
    copied).
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
        yield pieces
        if not left:
            return
        opcode = OP_CONTINUATION


def fragments(chunks: Sequence[Any], length: int, binary: bool, size: int = FRAGMENT_SIZE) -> Iterator[bytes]:
    """
    L{fragment_pieces}, each fragment joined into one C{bytes} ready to
    write.
    """
    for pieces in fragment_pieces(chunks, length, binary, size):
        yield b"".join(pieces)


def direct_pieces(chunks: Sequence[Any], length: int, binary: bool) -> Iterator[bytes | memoryview]:
    """
    L{fragment_pieces} for L{_hand_over}: runs of small pieces (the frame
    headers and the JSON around a content) joined into C{bytes}, pieces of
    L{DIRECT_SIZE} or more as the views they are.
    """
    for pieces in fragment_pieces(chunks, length, binary):
        small: list[Any] = []
        for piece in pieces:
            if len(piece) < DIRECT_SIZE:
                small.append(piece)
                continue
            if small:
                yield b"".join(small)
                small = []
            yield piece
        if small:
            yield b"".join(small)


def _direct(transport: Any) -> bool:
    """
    Whether large pieces may be handed to C{transport} without a copy: a
    Twisted file descriptor (TCP) sends from its C{dataBuffer} through
    C{memoryview} slices, so that buffer may be a view.  Its C{write}
    accepts only C{bytes}, which would have meant a copy of each fragment.
    """
    # Every attribute _hand_over uses is Twisted's own, not its interface:
    # should a release rename one, the fragments are joined as before
    # (tests/test_wire_zero_copy.py then says so) instead of failing.
    return isinstance(transport, FileDescriptor) and all(
        hasattr(transport, name) for name in ("dataBuffer", "offset", "_tempDataLen", "_writeDisconnected", "connected")
    )


def _hand_over(transport: Any, piece: memoryview) -> bool:
    """
    Make C{piece} the buffer C{transport} sends from, if it has sent all it
    had; whether it did.  Twisted's C{doWrite} sends C{dataBuffer} in
    C{SEND_LIMIT} slices of a C{memoryview} and, once less than that
    remains, joins the rest with what was written meanwhile: only that
    tail is copied.  On a connection that no longer writes, the piece is
    dropped, as C{write} drops data then.
    """
    if not transport.connected or transport._writeDisconnected:
        return True
    if transport._tempDataLen or transport.offset < len(transport.dataBuffer):
        return False
    transport.dataBuffer = piece
    transport.offset = 0
    transport.startWriting()
    return True


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
        self._stream: Iterator[bytes | memoryview] | None = None
        self._held: bytes | memoryview | None = None
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
        if length >= STREAM_SIZE:
            stream = direct_pieces if _direct(self._transport) else fragments
            if self._start(stream(chunks, length, binary)):
                return
        header = frame_header(OP_BINARY if binary else OP_TEXT, length)
        self._transport.write(b"".join([header, *chunks]))

    def _start(self, stream: Iterator[bytes | memoryview]) -> bool:
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
        done, or the connection may no longer carry data.  A view
        (L{direct_pieces}) waits until the transport has sent all it holds,
        and is then handed over as it is; either way the transport is left
        marked as having paused us, so that it resumes us once it has sent
        everything (which C{write} would have done for a large fragment).
        """
        transport = self._transport
        while self._stream is not None and not self._paused:
            if not self._is_open():
                self._finish(send_waiting=False)
                return
            piece = self._held if self._held is not None else next(self._stream, None)
            self._held = None
            if piece is None:
                self._finish(send_waiting=True)
                return
            if isinstance(piece, bytes):
                transport.write(piece)
                continue
            if not _hand_over(transport, piece):
                self._held = piece
            transport.producerPaused = True
            self.pauseProducing()

    def _finish(self, send_waiting: bool) -> None:
        self._stream = None
        self._held = None
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
        self._held = None
        self._previous = None
        self._waiting.clear()
