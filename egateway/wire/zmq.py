"""
L{IChannelFactory} on txzmq: the only module that imports txzmq.

txzmq installs the default reactor when imported, so this module must only be
imported once the reactor has been chosen (from C{startService}, not from the
plugin or C{makeService}).

Receive high-water marks are unlimited: a kernel's iopub PUB socket silently
drops messages once its own queue and ours are full, so we take everything
the kernel sends into our process as fast as ZMQ delivers it.  Reading is
done in batches so that one chatty kernel cannot starve the reactor.
"""

from __future__ import annotations

from typing import Sequence

import zmq
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.logger import Logger
from txzmq import ZmqEndpoint, ZmqEndpointType, ZmqFactory
from txzmq.connection import ZmqConnection
from zope.interface import implementer

from egateway.wire.connection import FramesHandler, IChannelFactory, IChannelSocket

_log = Logger()

BATCH = 256
"""
Messages read from one socket before yielding to the reactor.
"""


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
    ) -> None:
        self._on_frames = on_frames
        self._closed = False
        super().__init__(factory, None, identity)
        self.configure()
        self.addEndpoints([ZmqEndpoint(ZmqEndpointType.connect, url)])

    def configure(self) -> None:
        self.socket.set(zmq.LINGER, 0)

    def doRead(self) -> None:
        if self.read_scheduled is not None:
            if not self.read_scheduled.called:
                self.read_scheduled.cancel()
            self.read_scheduled = None
        sock = self.socket
        for _ in range(BATCH):
            if self.factory is None or sock is None:
                return
            if not sock.get(zmq.EVENTS) & zmq.POLLIN:
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                continue
            try:
                self._on_frames(frames)
            except Exception:
                _log.failure("handling a message from {url}", url=self.endpoints)
        # More may be waiting: the FD is edge-triggered, so come back soon
        # rather than waiting for a notification that will not arrive.
        if self.factory is not None:
            self.read_scheduled = self.factory.reactor.callLater(0, self.doRead)

    def send(self, frames: Sequence[bytes]) -> None:
        if self._closed:
            return
        self.socket.send_multipart(frames, zmq.NOBLOCK, copy=len(frames[-1]) < 65536)
        if self.read_scheduled is None:
            self.read_scheduled = self.factory.reactor.callLater(0, self.doRead)

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


@implementer(IChannelFactory)
class ZmqChannelFactory:
    """
    Sockets on one shared ZMQ context driven by C{reactor}.
    """

    def __init__(self, reactor: IReactorCore | IReactorTime) -> None:
        self._factory = ZmqFactory()
        self._factory.reactor = reactor

    def dealer(self, url: str, identity: bytes, on_frames: FramesHandler) -> IChannelSocket:
        return _Dealer(self._factory, url, on_frames, identity)

    def subscriber(self, url: str, on_frames: FramesHandler) -> IChannelSocket:
        return _Subscriber(self._factory, url, on_frames)

    def close(self) -> None:
        if self._factory.connections is not None:
            self._factory.shutdown()
