"""
The kernel channels WebSocket, C{/api/kernels/{id}/channels}.

Both encodings are served: the legacy JSON protocol (what jupyter_server's
gateway client speaks) and C{v1.kernel.websocket.jupyter.org}, chosen by
C{Sec-WebSocket-Protocol}.  The route checks a request and reads it, once,
into a L{ChannelRequest}; the connection it upgrades to is one
L{ChannelsProtocol} serving that request, attached to its kernel; messages
pass through as bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import parse_qs, urlsplit

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import encode_truncate
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from egateway.api.cors import CorsPolicy
from egateway.api.ws_acks import ACK_DELAY, Acknowledgements
from egateway.api.ws_limits import client_limit, fit
from egateway.api.ws_writer import FrameWriter
from egateway.api.authenticators.interface import presented_token
from egateway.api.identity import Identity
from egateway.errors import BadRequest, Forbidden
from egateway.kernels.kernel import Kernel, SessionTaken
from egateway.kernels.journal import KernelSession
from egateway.kernels.manager import KernelManager
from egateway.kernels.policy import Caller, caller_of, may_access
from egateway.kernels.state import KernelState
from egateway.ops import audit
from egateway.ops.metrics import RelayCounts
from egateway.ops import turns
from egateway.wire.protocol import Message, WireError
from egateway.wire.ws_formats import V1_PROTOCOL, legacy_chunks, legacy_decode, v1_chunks, v1_decode

_log = Logger()

CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011

CLOSE_REPLACED = 4001
CLOSE_REVOKED = 4003
"""
The client may no longer use this kernel (its access or credentials were
revoked), or the session it named belongs to another user.
"""


ACCESS_EVENTS = frozenset({"shared"})
"""
Kernel manager events after which a kernel's connections are checked again
(against its owner and ACL as they are then): its ACL changed.
"""


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


MAX_SESSION_ID = 128
"""
Longest C{session_id} a channels request may name (Jupyter clients send
UUIDs): a longer one is refused rather than cut, so that the session the
route checks and takes over is the one the WebSocket attaches to.
"""


def channel_query(uri: bytes) -> tuple[str, int | None]:
    """
    The C{session_id} and C{resume_after} of a channels request, read once,
    by the route, for its L{ChannelRequest}.  C{parse_qs} reads them (C{&}
    separates, C{;} does not: Twisted's C{request.args} would also split on
    C{;}, and a cut id would name another session).

    @raise BadRequest: C{resume_after} is not a whole number, or
        C{session_id} is longer than L{MAX_SESSION_ID}.
    """
    params = parse_qs(urlsplit(uri.decode("latin-1")).query)
    session = (params.get("session_id") or [""])[0]
    if len(session) > MAX_SESSION_ID:
        raise BadRequest(f"session_id is longer than {MAX_SESSION_ID} characters")
    try:
        return session, parse_resume_after(params)
    except ValueError as e:
        raise BadRequest(str(e)) from None


def offers_v1(request: IRequest) -> bool:
    """
    Whether the client offers the v1 protocol in C{Sec-WebSocket-Protocol},
    read as Autobahn reads it (its values joined with C{,}, split on C{,},
    stripped), so that the choice made here is one Autobahn accepts.
    """
    offered = b",".join(request.requestHeaders.getRawHeaders(b"sec-websocket-protocol", []))
    return V1_PROTOCOL in (p.strip() for p in offered.decode("latin-1").split(","))


@dataclass(frozen=True)
class ChannelRequest:
    """
    A channels request as the route accepted it, before the upgrade: the
    kernel it found (its caller's access checked), the query parsed, the
    subprotocol chosen.  The WebSocket protocol takes all of it from here
    rather than look the kernel up or read the URL again, so that what was
    checked is what it serves.

    @ivar session_id: the client's session (empty: an anonymous one).
    @ivar resume_after: the last message the client has, or C{None}.
    @ivar v1: speak C{v1.kernel.websocket.jupyter.org} (else legacy JSON).
    @ivar identity: who asked (C{None}: no authentication ran).
    @ivar token: the credential presented, kept to check it again later.
    @ivar message_limit: the largest message to send it in one WebSocket
        message, or C{None} (see L{egateway.api.ws_limits}).
    """

    kernel: Kernel
    session_id: str
    resume_after: int | None
    v1: bool
    identity: Identity | None
    token: str | None
    message_limit: int | None = None


class ChannelsProtocol(WebSocketServerProtocol):
    """
    One client connection to one kernel, as its L{ChannelRequest} says.

    @ivar channel_request: what the route accepted (C{None} only for a
        protocol built without the route, which refuses to connect).
    @ivar identity: who opened it, refreshed when credentials are checked
        again (C{None}: treated as a caller with no verified user).
    """

    channel_request: ChannelRequest | None = None
    session: KernelSession | None = None
    identity: Identity | None = None
    v1 = False
    """
    The request's C{v1}, as a plain attribute: it is read for every
    message relayed.
    """

    CONFIG_ATTRS: tuple[str, ...] = ()
    """
    None for Autobahn's own loop: L{_connectionMade} copies the options.
    """

    def _connectionMade(self) -> None:
        """
        Copy the factory's options onto the connection as Autobahn does
        (an option set on the protocol itself wins), then let Autobahn
        start.  Autobahn's own copy also builds, for every connection, a
        C{pformat} of all its options for a debug line that is never
        written: about a third of the reactor's time in a handshake
        (bench/scale.py, 1,000 connections).  With L{CONFIG_ATTRS} empty
        its loop has nothing to format.
        """
        for name in WebSocketServerProtocol.CONFIG_ATTRS:
            if not hasattr(self, name):
                setattr(self, name, getattr(self.factory, name))
        # Kernel traffic from now on: no precedence over other connections
        # in the reactor's turns (egateway.ops.turns).
        turns.release(self.transport)
        super()._connectionMade()

    def _accepted(self) -> ChannelRequest:
        if self.channel_request is None:
            raise RuntimeError("a channels protocol built without its route's ChannelRequest")
        return self.channel_request

    @property
    def kernel(self) -> Kernel:
        return self._accepted().kernel

    @property
    def session_id(self) -> str:
        return self._accepted().session_id

    @property
    def resume_after(self) -> int | None:
        return self._accepted().resume_after

    @property
    def token(self) -> str | None:
        """
        The credential it was opened with (see
        L{ChannelsEndpoint.recheck_credentials}).
        """
        return self._accepted().token

    @property
    def caller(self) -> Caller | None:
        return caller_of(self.identity)

    @property
    def user(self) -> str:
        """
        The user its sessions belong to (empty for a caller naming nobody).
        """
        caller = self.caller
        return caller.username if caller is not None else ""

    def onConnect(self, request: ConnectionRequest) -> str | None:
        """
        Accept what the route accepted: the client's errors (unknown
        kernel, access, query) were answered before the upgrade, so any
        refusal here is our own bug.
        """
        try:
            return V1_PROTOCOL if self._accepted().v1 else None
        except Exception:
            # Our bug, not the client's: say so (never as a 404, which
            # would hide it), and leave a trace.
            _log.failure("accepting a channels connection to {path}", path=request.path)
            raise ConnectionDeny(ConnectionDeny.INTERNAL_SERVER_ERROR, "internal error")

    def onOpen(self) -> None:
        try:
            if ITCPTransport.providedBy(self.transport):
                self.transport.setTcpNoDelay(True)
            if self.kernel.state in (KernelState.GONE, KernelState.SHUTTING_DOWN):
                self.sendClose(CLOSE_GOING_AWAY, "the kernel has been shut down")
                return
            if not may_access(self.caller, self.kernel.owner, self.kernel.acl):
                # Its access was revoked between the route's check and now.
                self.sendClose(CLOSE_REVOKED, "access to this kernel was revoked")
                return
            try:
                self.session = self.kernel.attach(self, self.session_id or None, self.resume_after, self.user)
            except SessionTaken as e:
                self.sendClose(CLOSE_REVOKED, str(e)[:120])
                return
            self.factory.connections.setdefault(self.kernel.id, set()).add(self)
            if self.factory.ack_delay > 0 and self.session.journaling:
                self._acks = Acknowledgements(
                    self.factory.clock, self.factory.ack_delay, self._ack_ping, self._acknowledged
                )
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
    _acks: Acknowledgements | None = None
    _auto_pings_before_ack = 0

    def dataReceived(self, data: bytes) -> None:
        """
        Hand the bytes to Autobahn's frame parser, as its own
        C{dataReceived} does, without its debug log call: that call
        formats its fields (three C{hltype}/C{hlval} colourings) before the
        logger looks at the level, on every read of every client message
        (about 3 % of the gateway's CPU per execute round trip in a
        cProfile of bench/run.py).
        """
        self._dataReceived(data)

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

    _ahead: tuple[Message, int, int] | None = None
    """
    The message sent ahead (L{deliver_ahead}), its number and its length.
    """

    def deliver(self, channel: str, message: Message, seq: int = 0) -> None:
        """
        Send a kernel message, numbered C{seq} in this session, to this
        client.
        """
        if self.state != self.STATE_OPEN:
            return
        if self._ahead is not None:
            self._end_ahead(channel, message, seq)
            return
        try:
            chunks, binary, length = self._encode(channel, message, seq)
            limit = self.channel_request.message_limit
            if limit is not None and length > limit:
                self._deliver_cut(channel, message, seq, length, limit)
                return
            self._send_frame(chunks, length, binary)
            self._delivered(channel, seq, length)
        except WireError as e:
            _log.warn(
                "kernel {kernel_id}: could not relay a {channel} message: {error}",
                kernel_id=self.kernel.id,
                channel=channel,
                error=str(e),
            )

    def _encode(self, channel: str, message: Message, seq: int) -> tuple[list[Any], bool, int]:
        """
        C{message}'s payload for this client's protocol, as chunks; whether
        it is binary; its length.

        @raise WireError: a part is not what the protocol needs.
        """
        if self.v1:
            chunks, binary = v1_chunks(message, channel, seq), True
        else:
            chunks, binary = legacy_chunks(message, channel, seq)
        return chunks, binary, sum(len(chunk) for chunk in chunks)

    def _delivered(self, channel: str, seq: int, length: int) -> None:
        tally = self.factory.relay.to_client[channel]
        tally[0] += 1
        tally[1] += length
        if seq and self._acks is not None:
            self._acks.delivered(seq, length)

    def deliver_ahead(self, channel: str, message: Message, seq: int) -> None:
        """
        Stream a large kernel message whose signature is being checked,
        all but its last fragment (L{FrameWriter.send_ahead}), as
        L{deliver} would send it numbered C{seq}; L{deliver} of it under
        that number ends it.  Not while another message streams, nor when
        it would be cut to this client's limit: it then goes in its turn.
        """
        if self.state != self.STATE_OPEN or self._ahead is not None:
            return
        try:
            chunks, binary, length = self._encode(channel, message, seq)
        except WireError:
            return  # deliver will say so, if it comes
        limit = self.channel_request.message_limit
        if limit is not None and length > limit:
            return
        if self._frame_writer().send_ahead(chunks, length, binary):
            self._ahead = (message, seq, length)

    def withdraw(self, message: Message) -> None:
        """
        C{message} will not be delivered (its signature failed): if part of
        it was sent ahead, abandon it.
        """
        if self._ahead is not None and self._ahead[0] is message:
            self._abandon_ahead("it did not pass the gateway's checks")

    def _end_ahead(self, channel: str, message: Message, seq: int) -> None:
        """
        C{message} numbered C{seq} is to be delivered while a message sent
        ahead waits for its end: write that end if it is this message
        under the same number.  Anything else coming first (a status the
        gateway sends, another numbering) means what was sent ahead is not
        what this client must see next, and the only way to abandon part
        of a WebSocket message is to close the connection; the client
        resumes from its journal and loses nothing.
        """
        ahead, self._ahead = self._ahead, None
        assert ahead is not None and self._writer is not None
        if ahead[0] is message and ahead[1] == seq:
            self._writer.release()
            self._delivered(channel, seq, ahead[2])
        else:
            self._abandon_ahead("the gateway had to send another message first")

    def _abandon_ahead(self, why: str) -> None:
        self._ahead = None
        if self.state != self.STATE_OPEN:
            return
        _log.warn(
            "kernel {kernel_id}: closed a client's connection in the middle of a large message: {why}",
            kernel_id=self.kernel.id,
            why=why,
        )
        self.sendClose(CLOSE_INTERNAL_ERROR, "a message was abandoned midway; reconnect to resume")

    def _deliver_cut(self, channel: str, message: Message, seq: int, length: int, limit: int) -> None:
        """
        Send C{message}, larger than this client takes in one WebSocket
        message, cut to fit; only the last piece carries C{seq}, so a client
        that resumes after a piece it got still receives the rest.
        """
        pieces = list(fit(message, length, limit))
        if pieces[-1].msg_type != message.msg_type:
            _log.warn(
                "kernel {kernel_id}: a {msg_type} message of {size} bytes was not sent to a client that takes "
                "at most {limit} bytes per message (a notice was sent in its place)",
                kernel_id=self.kernel.id,
                msg_type=message.msg_type,
                size=length,
                limit=limit,
            )
        for number, piece in enumerate(pieces, 1):
            self.deliver(channel, piece, seq if number == len(pieces) else 0)

    _writer: FrameWriter | None = None

    def _send_frame(self, chunks: list[Any], length: int, binary: bool) -> None:
        """
        Write one message's frame(s) straight to the transport, through the
        connection's L{FrameWriter}: a small payload as one unmasked,
        uncompressed frame made by one join, a large one streamed as
        fragments from the buffers it arrived in (see
        L{egateway.api.ws_writer}).  This is the relay's hot path:
        Autobahn's C{sendMessage} costs several Python calls per frame for
        features unused here (compression, tracing), and for a large output
        it would copy the payload three times.
        """
        (self._writer or self._frame_writer()).send(chunks, length, binary)

    def _frame_writer(self) -> FrameWriter:
        """
        This connection's L{FrameWriter}, made on first use.
        """
        if self._writer is None:
            self._writer = FrameWriter(self.transport, lambda: self.state == self.STATE_OPEN)
        return self._writer

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """
        Autobahn's own writes (handshake, ping, pong, close) go through the
        L{FrameWriter} while it streams a message, which holds them until
        the fragment being sent is complete: written to the transport at
        once, they could land inside it.
        """
        writer = self._writer
        if writer is not None and writer.streaming:
            # Whole, at the boundary: Autobahn's C{sync} and C{chopsize}
            # only pace writes, which the stream does meanwhile.
            writer.control(data)
            return
        super().sendData(data, sync, chopsize)

    # -- acknowledgements (egateway.api.ws_acks) -------------------------------

    def _ack_ping(self, payload: bytes) -> bool:
        """
        Ping to acknowledge what was written so far, unless a message is
        being streamed (the ping would go between its fragments) or
        Autobahn's keep-alive ping awaits its pong (a client may answer only
        the later of two pings, and Autobahn drops a connection whose
        keep-alive pong does not come).
        """
        writer = self._writer
        if (writer is not None and writer.streaming) or self.autoPingPending:
            return False
        self._auto_pings_before_ack = self.autoPingPendingSeq
        self.sendPing(payload)
        return True

    def _acknowledged(self, upto: int) -> None:
        if self.session is not None:
            self.session.acknowledge(self, upto)

    def processControlFrame(self) -> bool:
        """
        Take the pong of an acknowledgement ping before Autobahn, which
        would warn of a pong it did not ask for.
        """
        acks = self._acks
        if acks is not None and acks.pending is not None and self.current_frame.opcode == 10:
            if acks.pong(b"".join(self.control_frame_data)):
                self.control_frame_data = None
                return True
        return super().processControlFrame()

    def onAutoPong(self, ping_sent: int, ping_seq: int, pong_received: int, pong_rtt: int, payload: bytes) -> None:
        """
        A keep-alive ping sent after the acknowledgement ping was answered,
        so the client read the acknowledgement ping too.
        """
        acks = self._acks
        if acks is not None and ping_seq > self._auto_pings_before_ack:
            acks.settled()

    def sendClose(self, code: int | None = None, reason: str | None = None) -> None:
        """
        Close, with any code RFC 6455 lets a server send.  Autobahn's
        C{sendClose} takes only 1000 and 3000 to 4999 (the codes it lets
        an application choose) and raises on RFC 6455's own 1001 (going
        away) and 1011 (internal error), which the gateway sends: a close
        with them used to raise instead, and the client was never told.
        """
        if code in (CLOSE_GOING_AWAY, CLOSE_INTERNAL_ERROR):
            self.sendCloseFrame(code=code, reasonUtf8=encode_truncate(reason or "", 123), isReply=False)
            return
        super().sendClose(code, reason)

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

    def revoke(self, reason: str) -> None:
        """
        This client may no longer use the kernel: close it, saying why, and
        drop its session, so that no journal of it is left to resume.
        """
        session, self.session = self.session, None
        if session is not None:
            self.kernel.drop_session(session, self)
        if self.state != self.STATE_OPEN:
            return
        audit.event(
            "websocket.revoked",
            user=self.identity.display_name if self.identity is not None else "anonymous",
            kernel_id=self.kernel.id,
            owner=self.kernel.owner,
            session=self.session_id,
            reason=reason,
        )
        self.sendClose(CLOSE_REVOKED, reason[:120])

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._ready_check is not None and self._ready_check.active():
            self._ready_check.cancel()
        if self._acks is not None:
            self._acks.stop()
        if self.channel_request is not None:
            kernel = self.channel_request.kernel
            open_here = self.factory.connections.get(kernel.id)
            if open_here is not None:
                open_here.discard(self)
                if not open_here:
                    del self.factory.connections[kernel.id]
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
        client_message_limit: int = 0,
        ack_delay: float = ACK_DELAY,
    ) -> None:
        """
        @param client_message_limit: the largest message sent to any client
            in one WebSocket message; 0: Tornado's limit for Tornado
            clients, none for others (L{egateway.api.ws_limits}).
        @param ack_delay: seconds from a message to the ping whose pong
            lets its session stop holding it (L{egateway.api.ws_acks}); 0:
            no such pings.
        """
        self._cors = cors
        self._client_message_limit = client_message_limit
        factory = WebSocketServerFactory(server=None)
        factory.protocol = ChannelsProtocol
        factory.kernel_info_timeout = kernel_info_timeout
        factory.ack_delay = ack_delay
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
        factory.connections = {}
        self._factory = factory
        self._authentication: Any = None
        manager.listeners.append(self._kernel_event)

    @property
    def connections(self) -> dict[str, set[ChannelsProtocol]]:
        """
        The open connections, by kernel id.
        """
        return self._factory.connections

    # -- revocation ----------------------------------------------------------

    def _kernel_event(self, event: str, kernel: Kernel) -> None:
        if event in ACCESS_EVENTS:
            self.recheck_kernel(kernel)

    def recheck_kernel(self, kernel: Kernel) -> None:
        """
        Close the connections to C{kernel} whose users may no longer see it
        (its ACL or owner changed).
        """
        for connection in list(self.connections.get(kernel.id, ())):
            if not may_access(connection.caller, kernel.owner, kernel.acl):
                connection.revoke(f"access to kernel {kernel.id} was revoked")

    def watch_credentials(self, authentication: Any) -> None:
        """
        Check open connections' credentials again whenever
        C{authentication} (an L{AuthenticatorChain}) says they may have
        changed: a token file reloaded, a token found revoked.
        """
        self._authentication = authentication
        authentication.on_change.append(self.recheck_credentials)

    def recheck_credentials(self) -> None:
        """
        Close every connection whose credentials no longer hold, or no
        longer let its user see the kernel (groups or admin rights
        removed); the others carry on with their refreshed identity.
        """
        for connections in list(self.connections.values()):
            for connection in list(connections):
                if connection.identity is None or not connection.identity.authenticated:
                    continue
                d = maybeDeferred(self._authentication.recheck, connection.identity, connection.token)
                d.addCallbacks(
                    lambda identity, c=connection: self._rechecked(c, identity),
                    lambda failure, c=connection: self._recheck_failed(c, failure),
                )

    def _rechecked(self, connection: ChannelsProtocol, identity: Identity | None) -> None:
        if identity is None:
            connection.revoke("your credentials were revoked")
            return
        connection.identity = identity
        kernel = connection.kernel
        if not may_access(connection.caller, kernel.owner, kernel.acl):
            connection.revoke(f"access to kernel {kernel.id} was revoked")

    def _recheck_failed(self, connection: ChannelsProtocol, failure: Failure) -> None:
        # An authenticator that cannot tell now (a JupyterHub down) leaves
        # the connection as it is; the next check decides.
        _log.warn(
            "kernel {kernel_id}: could not check the credentials of {user} again: {error}",
            kernel_id=connection.kernel.id,
            user=connection.user or "(no user)",
            error=failure.getErrorMessage(),
        )

    def accept(self, request: IRequest, kernel: Kernel) -> ChannelRequest:
        """
        Check a channels request for C{kernel} (which the route found, and
        whose access it checked) and read it, once, into the
        L{ChannelRequest} its WebSocket will serve.  Refusals are JSON
        errors, answered before the upgrade.

        @raise BadRequest: not a WebSocket upgrade, or a bad query.
        @raise Forbidden: a cross-origin page not allowed by C{allow_origin}.
        """
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if upgrade != b"websocket":
            raise BadRequest("this endpoint needs a WebSocket upgrade request")
        session_id, resume_after = channel_query(request.uri)
        if not self._cors.origin_allowed(request):
            raise Forbidden("WebSocket from a foreign origin refused; see allow_origin")
        return ChannelRequest(
            kernel=kernel,
            session_id=session_id,
            resume_after=resume_after,
            v1=offers_v1(request),
            identity=getattr(request, "gateway_user", None),
            token=presented_token(request),
            message_limit=client_limit(request.getHeader(b"user-agent"), self._client_message_limit),
        )

    def resource_for(self, channel: ChannelRequest) -> WebSocketResource:
        """
        The resource that upgrades the accepted request to its WebSocket.
        """
        return WebSocketResource(_ForRequest(self._factory, channel))


class _ForRequest:
    """
    The channels factory, as seen by one request's upgrade: the protocol it
    builds serves what the route accepted.
    """

    def __init__(self, factory: WebSocketServerFactory, channel: ChannelRequest) -> None:
        self._factory = factory
        self._channel = channel

    def buildProtocol(self, addr: Any) -> ChannelsProtocol | None:
        protocol = self._factory.buildProtocol(addr)
        if protocol is not None:
            protocol.channel_request = self._channel
            protocol.identity = self._channel.identity
            protocol.v1 = self._channel.v1
        return protocol
