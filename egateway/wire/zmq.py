"""
L{IChannelFactory} on txzmq: the only module that imports txzmq.

txzmq installs the default reactor when imported, so this module must only be
imported once the reactor has been chosen (from C{startService}, not from the
plugin or C{makeService}).

Receive high-water marks are unlimited: a kernel's iopub PUB socket silently
drops messages once its own queue and ours are full, so we take everything
the kernel sends into our process as fast as ZMQ delivers it.  Reading is
done in batches so that one chatty kernel cannot starve the reactor.

A kernel with CurveZMQ keys (JEP 145; ipykernel 7.4 binds its sockets as
CurveZMQ servers) is reached as a CurveZMQ client: the kernel's public key
as the server key and a fresh key pair per socket, which only encrypts (the
kernel authenticates nobody by key; the message HMAC still does that).  With
C{require_encryption}, a socket to a kernel over TCP without keys is refused,
so no kernel traffic leaves the gateway in clear text.
"""

from __future__ import annotations

import resource
from collections import deque
from typing import Sequence

import zmq
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.logger import Logger
from txzmq import ZmqEndpoint, ZmqEndpointType, ZmqFactory
from txzmq.connection import ZmqConnection
from zope.interface import implementer

from egateway.errors import GatewayError
from egateway.wire.channels import FramesHandler, IChannelFactory, IChannelSocket
from egateway.wire.protocol import DELIMITER

_log = Logger()

RESEND_DELAY = 0.01
"""
Seconds before retrying a message ZMQ could not queue yet.
"""

BATCH = 256
"""
Messages read from one socket before yielding to the reactor.
"""

ZERO_COPY_SIZE = 64 * 1024
"""
Content and buffer frames this large are received without copying: the
message holds a C{memoryview} of ZMQ's own buffer, which the journal and
the WebSocket write share (a 20 MB output is never copied in this process
before it is framed).  Smaller frames are copied into C{bytes}, which costs
less than keeping a ZMQ frame alive for them.
"""

_COPIED_AFTER_DELIMITER = 4
"""
Frames after C{<IDS|MSG>} that are always small (signature, header, parent
header, metadata) and always copied.
"""

# pyzmq's flags are enum members; a plain int costs nothing to pass.
_NOBLOCK = int(zmq.NOBLOCK)


def receive(sock: zmq.Socket) -> list[bytes | memoryview]:
    """
    One multipart message from C{sock}, without blocking: identities, the
    delimiter and the small parts as C{bytes}; the content and the buffers
    as C{bytes} when small, else as a C{memoryview} of the received frame
    (L{ZERO_COPY_SIZE}).

    Every frame is received as a C{zmq.Frame}, whose C{more} pyzmq reads
    in C as it receives it: asking the socket for C{RCVMORE} instead looks
    the option up in a Python enum first, which took about as many
    instructions as receiving the frame (callgrind: 78,000 instructions
    per six-frame message that way, about 40,000 this way).

    @raise zmq.Again: no message is waiting.
    """
    recv = sock.recv
    frame = recv(_NOBLOCK, copy=False)
    data = frame.bytes
    frames: list[bytes | memoryview] = [data]
    # -1: the delimiter not seen yet (a DEALER's messages start with it)
    to_copy = _COPIED_AFTER_DELIMITER if data == DELIMITER else -1
    while frame.more:
        frame = recv(0, copy=False)
        if to_copy:
            data = frame.bytes
            frames.append(data)
            if to_copy > 0:
                to_copy -= 1
            elif data == DELIMITER:
                to_copy = _COPIED_AFTER_DELIMITER
        else:
            frames.append(frame.buffer if len(frame) >= ZERO_COPY_SIZE else frame.bytes)
    return frames


@implementer(IChannelSocket)
class _Socket(ZmqConnection):
    highWaterMark = 0
    reconnectInterval = 100
    # No exponential back-off: a kernel binds its ports a few hundred ms
    # after it is spawned, and with back-off (100, 200, 400 ms...) the first
    # connection waited ~0.25 s longer than jupyter_client's (bench/).
    reconnectIntervalMax = 0

    def __init__(
        self,
        factory: ZmqFactory,
        url: str,
        on_frames: FramesHandler,
        identity: bytes | None = None,
        curve_serverkey: bytes | None = None,
    ) -> None:
        self._on_frames = on_frames
        self._closed = False
        self._curve_serverkey = curve_serverkey
        super().__init__(factory, None, identity)
        # txzmq's own send queue, which our send never uses (it keeps what
        # ZMQ cannot take yet in _unsent, made only then): an empty deque
        # takes 760 bytes, 2.2 MB for the three sockets of 1,000 kernels.
        self.queue = None
        self.configure()
        self.addEndpoints([ZmqEndpoint(ZmqEndpointType.connect, url)])

    def configure(self) -> None:
        self.socket.set(zmq.LINGER, 0)
        if self._curve_serverkey is not None:
            # Before connecting: the mechanism is chosen per connection.
            public, secret = zmq.curve_keypair()
            self.socket.set(zmq.CURVE_SERVERKEY, self._curve_serverkey)
            self.socket.set(zmq.CURVE_PUBLICKEY, public)
            self.socket.set(zmq.CURVE_SECRETKEY, secret)

    def doRead(self) -> None:
        if self.read_scheduled is not None:
            if not self.read_scheduled.called:
                self.read_scheduled.cancel()
            self.read_scheduled = None
        sock = self.socket
        for _ in range(BATCH):
            if self.factory is None or sock is None:
                return
            # Read until ZMQ says there is nothing more (which, like asking
            # for EVENTS, processes its pending commands and re-arms the
            # FD), rather than asking EVENTS before each message: pyzmq
            # looks every option up in a Python enum, 9,400 instructions a
            # time, against 3,600 for the one Again at the end.
            try:
                frames = receive(sock)
            except zmq.Again:
                return
            try:
                self._on_frames(frames)
            except Exception:
                _log.failure("handling a message from {url}", url=self.endpoints)
        # More may be waiting: the FD is edge-triggered, so come back soon
        # rather than waiting for a notification that will not arrive.
        if self.factory is not None:
            self.read_scheduled = self.factory.reactor.callLater(0, self.doRead)

    _unsent: deque[Sequence[bytes]] | None = None

    def send(self, frames: Sequence[bytes]) -> None:
        if self._closed:
            return
        if self._unsent:
            self._unsent.append(frames)
            return
        try:
            self.socket.send_multipart(frames, zmq.NOBLOCK, copy=len(frames[-1]) < 65536)
        except zmq.Again:
            # No peer to queue for yet (or its queue is full): keep the
            # message, in order, and try again shortly rather than lose it.
            self._unsent = deque([frames])
            self.factory.reactor.callLater(RESEND_DELAY, self._resend)
        self._read_soon()

    def _read_soon(self) -> None:
        """
        Any call on a ZMQ socket, a send included, may process its pending
        events and so consume the edge of its FD that says a message
        arrived: look for messages on the next turn rather than wait for a
        notification that will not come.
        """
        if self.read_scheduled is None and self.factory is not None:
            self.read_scheduled = self.factory.reactor.callLater(0, self.doRead)

    def _resend(self) -> None:
        unsent = self._unsent
        if self._closed or not unsent:
            return
        try:
            while unsent:
                try:
                    self.socket.send_multipart(unsent[0], zmq.NOBLOCK)
                except zmq.Again:
                    self.factory.reactor.callLater(RESEND_DELAY, self._resend)
                    return
                unsent.popleft()
            self._unsent = None
        finally:
            self._read_soon()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.shutdown()


class _Dealer(_Socket):
    socketType = zmq.DEALER


class _Subscriber(_Socket):
    socketType = zmq.SUB

    def configure(self) -> None:
        super().configure()
        self.socket.set(zmq.SUBSCRIBE, b"")


def max_sockets() -> int:
    """
    How many ZMQ sockets the gateway's context may hold: as many as the
    process may open files (each socket holds at least one descriptor, so
    that limit binds anyway), and never fewer than libzmq's default of 1023.
    With the default, a gateway held at most 341 kernels (3 sockets each),
    170 with a client each, whatever its C{LimitNOFILE}: the next kernel's
    link failed with "Too many open files" (bench/scale.py).
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1023, soft)


@implementer(IChannelFactory)
class ZmqChannelFactory:
    """
    Sockets on one shared ZMQ context driven by C{reactor}.

    @ivar require_encryption: refuse TCP sockets without a CurveZMQ key
        (C{kernel_encryption = "required"}).
    """

    def __init__(self, reactor: IReactorCore | IReactorTime, require_encryption: bool = False) -> None:
        self._factory = ZmqFactory()
        self._factory.reactor = reactor
        self._factory.context.set(zmq.MAX_SOCKETS, max_sockets())
        self.require_encryption = require_encryption

    def _check(self, url: str, curve_serverkey: bytes | None) -> None:
        if curve_serverkey is not None:
            if not zmq.has("curve"):
                raise GatewayError(
                    "the kernel uses CurveZMQ encryption but this gateway's libzmq cannot (it lacks libsodium)"
                )
        elif self.require_encryption and url.startswith("tcp://"):
            raise GatewayError(
                "kernel_encryption is required, but the kernel offers no CurveZMQ key: use a kernel that "
                "supports encryption (ipykernel 7.4 or newer, kernelspec metadata supported_encryption "
                "curve, egateway's launcher for remote kernels) or set kernel_encryption to auto",
                status=403,
            )

    def dealer(
        self, url: str, identity: bytes, on_frames: FramesHandler, curve_serverkey: bytes | None = None
    ) -> IChannelSocket:
        self._check(url, curve_serverkey)
        return _Dealer(self._factory, url, on_frames, identity, curve_serverkey)

    def subscriber(
        self, url: str, on_frames: FramesHandler, curve_serverkey: bytes | None = None
    ) -> IChannelSocket:
        self._check(url, curve_serverkey)
        return _Subscriber(self._factory, url, on_frames, curve_serverkey=curve_serverkey)

    def close(self) -> None:
        if self._factory.connections is not None:
            self._factory.shutdown()
