"""
The kernel channels WebSocket, C{/api/kernels/{id}/channels}.

Both encodings are served: the legacy JSON protocol (what jupyter_server's
gateway client speaks) and C{v1.kernel.websocket.jupyter.org}, chosen by
C{Sec-WebSocket-Protocol}.  Each connection is one L{ChannelsProtocol},
attached to its kernel; messages pass through as bytes.
"""

from __future__ import annotations

import struct
from typing import Any, Mapping
from urllib.parse import parse_qs, urlsplit

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.interfaces import ITCPTransport
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from egateway.api.auth import CorsPolicy
from egateway.errors import BadRequest, Forbidden
from egateway.kernels.kernel import Kernel
from egateway.kernels.session import KernelSession
from egateway.kernels.manager import KernelManager
from egateway.kernels.state import KernelState
from egateway.ops.metrics import RelayCounts
from egateway.wire.protocol import Message, WireError
from egateway.wire.ws_formats import V1_PROTOCOL, legacy_chunks, legacy_decode, v1_chunks, v1_decode

_log = Logger()

CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011

DIRECT_FRAME_SIZE = 256 * 1024
"""
Payloads this large are written as their chunks, without being joined.
"""
CLOSE_REPLACED = 4001


def parse_resume_after(params: Mapping[str, list[str]]) -> int | None:
    """
    The C{resume_after} query parameter (negative numbers count as 0), or
    C{None} when absent.

    @raise ValueError: it is not a whole number.
    """
    value = (params.get("resume_after") or [""])[0]
    if not value:
        return None
    try:
        return max(0, int(value))
    except ValueError:
        raise ValueError("resume_after must be a message number") from None


class ChannelsProtocol(WebSocketServerProtocol):
    """
    One client connection to one kernel.
    """

    kernel: Kernel
    session: KernelSession | None = None
    session_id = ""
    resume_after: int | None = None
    v1 = False

    def onConnect(self, request: ConnectionRequest) -> str | None:
        try:
            kernel_id = request.path.rstrip("/").split("/")[-2]
            self.kernel = self.factory.manager.get(kernel_id)
        except Exception:
            raise ConnectionDeny(404, "no such kernel")
        self.session_id = (request.params.get("session_id") or [""])[0]
        try:
            self.resume_after = parse_resume_after(request.params)
        except ValueError as e:
            raise ConnectionDeny(400, str(e))
        self.v1 = V1_PROTOCOL in request.protocols
        return V1_PROTOCOL if self.v1 else None

    def onOpen(self) -> None:
        try:
            if ITCPTransport.providedBy(self.transport):
                self.transport.setTcpNoDelay(True)
            if self.kernel.state in (KernelState.GONE, KernelState.SHUTTING_DOWN):
                self.sendClose(CLOSE_GOING_AWAY, "the kernel has been shut down")
                return
            self.session = self.kernel.attach(self, self.session_id or None, self.resume_after)
            self.factory.relay.opened["v1" if self.v1 else "legacy"] += 1
            if not self.kernel.live:
                self._ready_check = self.factory.clock.callLater(
                    self.factory.kernel_info_timeout, self._give_up_waiting
                )
            _log.info(
                "kernel {kernel_id}: client connected (session {session}, {protocol})",
                kernel_id=self.kernel.id,
                session=self.session_id or "none",
                protocol="v1" if self.v1 else "legacy",
            )
        except Exception:
            _log.failure("opening a channels connection")
            self.sendClose(CLOSE_INTERNAL_ERROR, "internal error")

    _ready_check: Any = None

    def _give_up_waiting(self) -> None:
        """
        The kernel did not become ready in time: say so rather than hold the
        client's messages forever.
        """
        self._ready_check = None
        if not self.kernel.live and self.state == self.STATE_OPEN:
            self.sendClose(CLOSE_INTERNAL_ERROR, "the kernel did not become ready in time")

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.session is None:
            return
        try:
            if self.v1:
                if not isBinary:
                    raise WireError("the v1 protocol sends binary frames only")
                channel, message = v1_decode(payload)
            else:
                channel, message = legacy_decode(payload, isBinary)
        except WireError as e:
            _log.warn(
                "kernel {kernel_id}: dropped a malformed client message: {error}",
                kernel_id=self.kernel.id,
                error=str(e),
            )
            return
        tally = self.factory.relay.from_client[channel]
        tally[0] += 1
        tally[1] += len(payload)
        try:
            self.session.send(channel, message)
        except Exception:
            _log.failure("forwarding a client message")
            self.sendClose(CLOSE_INTERNAL_ERROR, "internal error")

    def deliver(self, channel: str, message: Message, seq: int = 0) -> None:
        """
        Send a kernel message, numbered C{seq} in this session, to this
        client.
        """
        if self.state != self.STATE_OPEN:
            return
        try:
            if self.v1:
                chunks, binary = v1_chunks(message, channel, seq), True
            else:
                chunks, binary = legacy_chunks(message, channel, seq)
            length = sum(len(chunk) for chunk in chunks)
            tally = self.factory.relay.to_client[channel]
            tally[0] += 1
            tally[1] += length
            self._send_frame(chunks, length, binary)
        except WireError as e:
            _log.warn(
                "kernel {kernel_id}: could not relay a {channel} message: {error}",
                kernel_id=self.kernel.id,
                channel=channel,
                error=str(e),
            )

    def _send_frame(self, chunks: list[bytes], length: int, binary: bool) -> None:
        """
        Write one unfragmented, unmasked, uncompressed frame (what a server
        sends) straight to the transport.  This is the relay's hot path:
        Autobahn's C{sendMessage} costs several Python calls per frame for
        features unused here (compression, fragmentation, tracing), and for a
        large output it would copy the payload three times; here a small
        frame is one join, a large one goes to the transport as its chunks.
        Autobahn writes whole frames too, so frames never interleave.
        """
        first = 0x80 | (0x2 if binary else 0x1)
        if length < 126:
            header = struct.pack("!BB", first, length)
        elif length < 65536:
            header = struct.pack("!BBH", first, 126, length)
        else:
            header = struct.pack("!BBQ", first, 127, length)
        if length < DIRECT_FRAME_SIZE:
            self.transport.write(b"".join([header, *chunks]))
        else:
            self.transport.writeSequence([header, *chunks])

    def kernel_gone(self, reason: str) -> None:
        self.session = None
        if self.state == self.STATE_OPEN:
            self.sendClose(1000, reason[:100])

    def replaced(self) -> None:
        """
        A new connection resumed this session; this one is stale.
        """
        self.session = None
        if self.state == self.STATE_OPEN:
            self.sendClose(CLOSE_REPLACED, "replaced by a newer connection to the same session")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._ready_check is not None and self._ready_check.active():
            self._ready_check.cancel()
        if self.session is not None:
            self.kernel.detach(self.session, self)
            self.session = None
            _log.info(
                "kernel {kernel_id}: client disconnected (session {session})",
                kernel_id=self.kernel.id,
                session=self.session_id or "none",
            )


class ChannelsEndpoint:
    """
    Checks a channels request before it is upgraded, then hands it to
    Autobahn.  Errors before the upgrade are ordinary JSON responses.
    """

    def __init__(
        self,
        manager: KernelManager,
        cors: CorsPolicy,
        max_message_size: int,
        ping_interval: float,
        kernel_info_timeout: float = 60.0,
        clock: Any = None,
    ) -> None:
        self._cors = cors
        factory = WebSocketServerFactory(server=None)
        factory.protocol = ChannelsProtocol
        factory.manager = manager
        factory.kernel_info_timeout = kernel_info_timeout
        factory.relay = self.relay = RelayCounts()
        if clock is None:
            from twisted.internet import reactor as clock
        factory.clock = clock
        options: dict[str, Any] = dict(
            maxMessagePayloadSize=max_message_size,
            maxFramePayloadSize=max_message_size,
            webStatus=False,
            utf8validateIncoming=True,
            openHandshakeTimeout=30,
            closeHandshakeTimeout=5,
            # Close with a code (1009 for a message over the limit, 1002,
            # 1007) rather than drop the TCP connection, so the client
            # learns why.
            failByDrop=False,
            perMessageCompressionAccept=lambda offers: None,
        )
        if ping_interval > 0:
            options.update(autoPingInterval=ping_interval, autoPingTimeout=max(3 * ping_interval, 30))
        factory.setProtocolOptions(**options)
        self._factory = factory
        self._manager = manager

    def resource_for(self, request: IRequest, kernel_id: str) -> WebSocketResource:
        """
        @raise NotFound: unknown kernel.
        @raise BadRequest: not a WebSocket upgrade.
        @raise Forbidden: a cross-origin page not allowed by C{allow_origin}.
        """
        self._manager.get(kernel_id)
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if upgrade != b"websocket":
            raise BadRequest("this endpoint needs a WebSocket upgrade request")
        # Checked here, as Autobahn will parse the query for onConnect, so
        # that a bad value is a JSON error rather than Autobahn's bare status
        # line (Twisted's request.args also splits on ';', Autobahn not).
        try:
            parse_resume_after(parse_qs(urlsplit(request.uri.decode("latin-1")).query))
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if not self._cors.origin_allowed(request):
            raise Forbidden("WebSocket from a foreign origin refused; see allow_origin")
        return WebSocketResource(self._factory)
