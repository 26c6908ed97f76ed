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
without FIN, continuation frames, the last with FIN) of L{FRAGMENT_SIZE}
payload bytes each, while it is the transport's streaming producer.

Through a TCP transport the fragments are sent straight through the socket
with C{sendmsg}, from the payload's own buffers (the frame header and the
small chunks around the content are separate pieces of the same call), as
much as the socket takes per call, once the transport has sent what it
holds; when the socket is full, Twisted's C{doWrite} tells us it takes data
again.  Nothing of the payload is copied in this process.  Through any
other transport each fragment is one copy out of the payload's own buffers,
written when the transport has drained the previous one.

A message may be sent ahead (L{FrameWriter.send_ahead}): streamed but for
its last fragment, which waits for L{FrameWriter.release}; a client does
not see a fragmented message before its last fragment.  The gateway sends
a large kernel output that way while it checks its signature
(L{egateway.wire.link.KernelLink.verifies_signatures}).

Messages to the same client that come meanwhile wait, in order, behind the
streamed one; Autobahn's own frames (pings, close: L{FrameWriter.control})
wait for the next boundary between fragments, where the RFC allows control
frames.
"""

from __future__ import annotations

import errno
import itertools
import struct
from collections import deque
from typing import Any, Callable, Iterator, Sequence

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IPushProducer, ISSLTransport
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


IOV_MAX = 1024
"""
Pieces handed to one C{sendmsg} call at most (Linux's C{UIO_MAXIOV}).
"""


def _direct(transport: Any) -> bool:
    """
    Whether a streamed message may be sent straight through C{transport}'s
    socket: a Twisted file descriptor (TCP) whose C{sendmsg} takes the
    payload's own buffers, where C{write} accepts only C{bytes} (a copy of
    each fragment) and then sends at most C{SEND_LIMIT} (128 kB) per
    reactor turn.  Never through TLS: a TCP connection that started TLS
    (C{startTLS}) is still a file descriptor, whose socket carries the TLS
    records, not our bytes.
    """
    # Every attribute used here is Twisted's own, not its interface: should
    # a release rename one, the fragments are joined and written as before
    # (tests/test_wire_zero_copy.py then says so) instead of failing.
    return (
        isinstance(transport, FileDescriptor)
        and not ISSLTransport.providedBy(transport)
        and not getattr(transport, "TLS", False)
        and all(
            hasattr(transport, name)
            for name in ("dataBuffer", "offset", "_tempDataLen", "_writeDisconnected", "connected", "socket")
        )
        and hasattr(transport.socket, "sendmsg")
    )


def _buffered(transport: Any) -> bool:
    """
    Whether C{transport} still holds data it has not sent.
    """
    return bool(transport._tempDataLen) or transport.offset < len(transport.dataBuffer)


def send_some(sock: Any, pieces: deque[memoryview]) -> int | None:
    """
    Send as much of C{pieces} as C{sock} (non-blocking) takes now, in one
    C{sendmsg} (no copy in this process), and drop what was sent from
    C{pieces}.

    @return: the bytes sent (0 when the socket is full), or C{None} when
        the connection is broken.
    """
    try:
        sent = sock.sendmsg(list(itertools.islice(pieces, IOV_MAX)))
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError as e:
        if e.errno == errno.ENOBUFS:
            return 0
        return None
    left = sent
    while left:
        first = pieces[0]
        if len(first) <= left:
            left -= len(first)
            pieces.popleft()
        else:
            pieces[0] = first[left:]
            left = 0
    return sent


_NOT_STREAMED: deque[Any] = deque()
"""
The fragment and waiting queues of a writer that has not streamed yet:
empty, and never added to, since both are filled only while a message is
streamed; a writer gets its own when it starts streaming (most connections
never do, and an empty deque takes 760 bytes: two per connection add up
to 1.5 MB at 1,000 kernels).
"""


@implementer(IPushProducer)
class FrameWriter:
    """
    Writes one connection's server frames, in order.

    While a message is streamed, the frames Autobahn writes itself (ping,
    pong, close: L{control}) are held and written at the next boundary
    between fragments, which RFC 6455 (section 5.4) allows for control
    frames; written at once, they could land inside a fragment whose bytes
    are only partly sent.

    @param transport: the connection's transport.
    @param is_open: whether data frames may still be sent (the WebSocket is
        open: no close frame sent or received).
    """

    def __init__(self, transport: Any, is_open: Callable[[], bool]) -> None:
        self._transport = transport
        self._is_open = is_open
        self._waiting: deque[tuple[Sequence[Any], int, bool]] = _NOT_STREAMED
        self._stream: Iterator[list[Any]] | None = None
        self._direct = False
        self._fragment: deque[memoryview] = _NOT_STREAMED
        self._control: list[bytes] = []
        self._paused = False
        self._previous: tuple[Any, bool] | None = None

    # Set on the instance only once a message is sent ahead.
    _ahead = False
    _last: list[Any] | None = None
    """
    The last fragment of a message sent ahead, until L{release}.
    """

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
        if length >= STREAM_SIZE and self._start(fragment_pieces(chunks, length, binary)):
            return
        header = frame_header(OP_BINARY if binary else OP_TEXT, length)
        self._transport.write(b"".join([header, *chunks]))

    def send_ahead(self, chunks: Sequence[Any], length: int, binary: bool) -> bool:
        """
        Stream a large message but for its last fragment, which is written
        only after L{release}; a close (L{control}, once the connection is
        no longer open) abandons it.

        @return: whether the message is on its way; if not (a message is
            being streamed already, C{length} is below L{STREAM_SIZE}, or
            the transport cannot stream), nothing was written: L{send} it
            when it may go.
        """
        if self._stream is not None or length < STREAM_SIZE:
            return False
        self._ahead = True
        if self._start(fragment_pieces(chunks, length, binary)):
            return True
        self._ahead = False
        return False

    def release(self) -> None:
        """
        The message sent ahead may end: write its last fragment.
        """
        self._ahead = False
        if self._stream is not None and not self._paused and not self._fragment:
            self._write_next()

    def control(self, data: bytes) -> None:
        """
        Write C{data} (whole frames of Autobahn's own) now, or, while a
        message is streamed, at the next boundary between its fragments.
        """
        if self._stream is None:
            self._transport.write(data)
            return
        self._control.append(data)
        if not self._paused and not self._fragment:
            self._write_next()

    def _start(self, stream: Iterator[list[Any]]) -> bool:
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
        # says it has sent all it held, or that its socket takes data
        # again), and hand the place back after; whoever held it (Twisted's
        # HTTP channel, which pauses reading while output backs up) is told
        # of pauses meanwhile.
        producer = transport.producer
        if producer is not None:
            self._previous = (producer, bool(getattr(transport, "streamingProducer", True)))
            transport.unregisterProducer()
        self._stream = stream
        if self._fragment is _NOT_STREAMED:
            self._fragment, self._waiting = deque(), deque()
        self._direct = _direct(transport)
        self._paused = False
        transport.registerProducer(self, True)
        self._write_next()
        return True

    def _write_next(self) -> None:
        """
        Write until the transport says to pause, the message is done, or
        the connection may no longer carry data.  The connection's state
        and the held control frames are looked at only between fragments.
        """
        write_fragment = self._send_fragment if self._direct else self._write_fragment
        while self._stream is not None and not self._paused:
            if self._fragment:
                write_fragment()
                continue
            if self._control:
                self._write_control()
                continue
            if not self._is_open():
                self._finish(send_waiting=False)
                return
            pieces, self._last = self._last or next(self._stream, None), None
            if pieces is None:
                self._finish(send_waiting=True)
                return
            if self._ahead and pieces[0][0] & 0x80:
                # The last fragment (FIN) of a message sent ahead: not yet.
                self._last = pieces
                return
            self._fragment.extend(memoryview(piece).cast("B") for piece in pieces if len(piece))

    def _write_control(self) -> None:
        """
        Write the control frames held while a fragment was in flight.
        """
        if self._control:
            control, self._control = self._control, []
            self._transport.write(b"".join(control))

    def _write_fragment(self) -> None:
        """
        The current fragment joined into one C{bytes} and written: through
        a transport other than TCP, one copy out of the payload's buffers.
        """
        data = b"".join(self._fragment)
        self._fragment.clear()
        self._transport.write(data)

    def _send_fragment(self) -> None:
        """
        Send the current fragment straight through the socket once the
        transport has sent what it holds, as much as the socket takes per
        C{sendmsg}, from the payload's own buffers.  Twisted's C{write}
        would take only C{bytes} (a copy of each fragment, or of its pieces
        joined with what else waits), and its C{doWrite} sends at most
        C{SEND_LIMIT} (128 kB) per reactor turn: 160 turns and as many
        wake-ups for a 20 MB output, against a few C{sendmsg} calls each
        taking what the socket buffer has room for.  When the socket is
        full, the transport is left writing nothing but marked as having
        paused us, so that it resumes us once the socket takes data again.
        """
        transport = self._transport
        if not transport.connected or transport._writeDisconnected:
            # A connection that no longer writes drops data, as write does.
            self._fragment.clear()
            return
        if _buffered(transport):
            self._wait(start_writing=False)
            return
        sent = send_some(transport.socket, self._fragment)
        if sent is None:
            # Broken: the rest is dropped; the transport finds out on its
            # next write or read and stops us as its producer.
            self._fragment.clear()
            self._control.clear()
            self._wait(start_writing=True)
            return
        if self._fragment:
            self._wait(start_writing=True)

    def _wait(self, start_writing: bool) -> None:
        """
        Pause until the transport resumes us: once it has sent what it
        holds, or (C{start_writing}, with nothing to send) once its socket
        is writable again.
        """
        transport = self._transport
        transport.producerPaused = True
        self.pauseProducing()
        if start_writing:
            transport.startWriting()

    def _finish(self, send_waiting: bool) -> None:
        self._stream = None
        self._ahead, self._last = False, None
        self._fragment.clear()
        self._paused = False
        transport = self._transport
        self._write_control()
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
        self._ahead, self._last = False, None
        self._fragment.clear()
        self._control.clear()
        self._previous = None
        self._waiting.clear()
