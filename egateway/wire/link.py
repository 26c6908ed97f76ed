"""
The gateway's connections to one kernel.

A L{KernelLink} holds the kernel's single iopub subscription (shared by every
client, so activity tracking and fan-out see each message once) and the
gateway's own shell and control sockets, used for C{kernel_info},
C{interrupt_request} and C{shutdown_request}.

Each WebSocket client gets a L{ClientLink}: its own shell, control and stdin
DEALER sockets under one routing identity.  The kernel's ROUTER sockets then
deliver every reply, and every C{input_request}, to the client that asked,
without the gateway parsing anything to route them.  A named session's
identity is derived from its id, so that the gateway that takes it over
gets its replies (L{egateway.kernels.failover}).
"""

from __future__ import annotations

import uuid
from collections import deque
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from egateway.wire.channels import ConnectionInfo, IChannelFactory, IChannelSocket
from egateway.wire.protocol import Message, SliceCheck, Signer, WireError, join_frames, split_frames, split_unchecked

_log = Logger()

MessageHandler = Callable[[str, Message], None]

CHECK_AHEAD_SIZE = 1 << 20
"""
An iopub message whose signed parts take this many bytes or more has its
signature checked while clients receive it (L{KernelLink}).
"""

CONTROL_REMEMBERED = 64
"""
How many of the last requests sent on control (the gateway's and its
clients') a link remembers, to tell the kernel's statuses about them from
those about shell: they come within moments of the request.
"""


class KernelLink:
    """
    @ivar info: the connection information in use.
    @ivar session: the session id the gateway signs its own requests with.
    """

    # Set on the instance only while a large message is checked.
    _held: deque[tuple[Callable[..., None], tuple[Any, ...]]] | None = None
    """
    What the kernel's sockets delivered while a large message's signature
    was being checked, in order, to be handled after it.
    """
    _checking: tuple[Any, Message] | None = None
    """
    The next step of a large message's check (an C{IDelayedCall}) and the
    message.
    """

    def __init__(
        self,
        info: ConnectionInfo,
        channels: IChannelFactory,
        clock: IReactorTime,
        on_iopub: Callable[[Message], None],
        kernel_id: str = "",
        on_iopub_ahead: Callable[[Message], None] | None = None,
        on_iopub_checked: Callable[[Message], None] | None = None,
    ) -> None:
        """
        @param on_iopub: called with each iopub message, once its signature
            is checked (where it is checked: L{verifies_signatures}).
        @param on_iopub_ahead: called with a large iopub message
            (L{CHECK_AHEAD_SIZE}) as its signature check starts, for its
            clients to receive all of it but its last fragment meanwhile;
            C{None}: large messages are checked before anything else.
        @param on_iopub_checked: called with that message once its check is
            over, after C{on_iopub} if it passed: what a client still holds
            of it, undelivered, must be withdrawn.
        """
        self.info = info
        self.signer = Signer(info.key, info.signature_scheme)
        self.session = uuid.uuid4().hex
        self.kernel_id = kernel_id
        self._channels = channels
        self._clock = clock
        self._on_iopub = on_iopub
        self._on_iopub_ahead = on_iopub_ahead
        self._on_iopub_checked = on_iopub_checked
        self._pending: dict[str, Deferred[Message]] = {}
        self._control: deque[str] = deque(maxlen=CONTROL_REMEMBERED)
        self._private: deque[str] = deque(maxlen=CONTROL_REMEMBERED)
        self._closed = False
        self.iopub_seen = False
        self.verifies_signatures = info.curve_publickey is None
        """
        Whether messages from the kernel have their HMAC checked.  Not when
        its channels are CurveZMQ, because the channel already proves what
        the signature would, for every message, at no extra pass:

          - Our sockets are CurveZMQ clients holding the kernel's public key
            as the server key.  The handshake completes only with a peer
            holding the matching secret key, and every message after it is
            encrypted and authenticated (Poly1305, with nonces that forbid
            replay and reordering) on that connection.  A message received
            on such a socket was sent, unaltered, by the secret key's holder.
          - The secret key is known to the same parties as the HMAC key: the
            kernel reads both from one connection file, which the gateway
            writes (local kernels) or receives in one payload with the HMAC
            key, ports and address (remote launchers).  Whoever could forge
            a CurveZMQ message could read the HMAC key and sign anything; no
            one else can forge either.  Checking the HMAC too authenticates
            the same sender a second time.
          - Signatures are not forwarded: clients of the gateway never see
            them, so nothing downstream relies on this check.

        Messages the gateway sends are still signed (the kernel checks
        them), and without CurveZMQ (clear text, C{kernel_encryption =
        "off"}, ipc) every message's signature is checked, and a bad one is
        dropped.  The check is one HMAC pass over a message's four parts
        (C{hmac.update} on the views ZMQ received, no copy); for a 20 MB
        output 12 to 35 ms on the 2-core benchmark machine, which in
        series with the relay was the largest cost the gateway added to
        such an output (bench/run.py, curve off).

        So a large message (L{CHECK_AHEAD_SIZE}) is checked a slice per
        reactor turn while its connected clients receive it
        (C{on_iopub_ahead}), all of it but the last fragment of its
        WebSocket message, which waits for the verdict
        (L{egateway.api.ws_writer.FrameWriter.send_ahead}).  This is
        sound:

          - A WebSocket client hands a fragmented message to its
            application only with its final fragment (RFC 6455 section
            5.4), so no client acts on, shows or stores a byte of a
            message before its signature is known good.
          - Nothing in the gateway acts on it either: until the check
            only the encoders that frame it for its clients read it, and
            it reaches the kernel's state, its iopub ring, journals, the
            shared store and observers only through C{on_iopub}, after
            the check.  What the kernel's sockets
            deliver meanwhile is held and handled after it, in order.
          - A bad signature costs its clients their connection (the only
            way to abandon a fragmented message is to close it); they
            resume from their journals and lose nothing, since the message
            was never journaled.  Only a sender on the gateway's iopub
            connection can cause that: one on the path to the kernel, or
            one bound to its port before it.  Either could already keep
            every iopub message from the gateway, which is worse.
        """
        self._iopub = channels.subscriber(
            info.url("iopub"), self._iopub_frames, curve_serverkey=info.curve_publickey
        )
        self._own: dict[str, IChannelSocket] = {}
        # The shell socket proves the kernel ready (kernel_info); the
        # control socket is made on first use (an interrupt, a shutdown):
        # most kernels never need it, and each socket is a TCP connection
        # and ZMQ buffers held for the kernel's lifetime.
        self._own_socket("shell")

    def _own_socket(self, name: str) -> IChannelSocket:
        sock = self._own.get(name)
        if sock is None:
            # A routing identity of its own each time it is opened: one
            # released a moment ago may still hold the old one at the
            # kernel's ROUTER, which would refuse a second peer under it.
            sock = self._own[name] = self._channels.dealer(
                self.info.url(name),
                uuid.uuid4().hex.encode("ascii"),
                lambda frames: self._reply_frames(name, frames),
                curve_serverkey=self.info.curve_publickey,
            )
        return sock

    def release(self, channel: str) -> None:
        """
        Close the gateway's own C{channel} socket until its next use (a
        request opens it again).  The gateway's shell socket is needed
        while a kernel starts (the readiness probe) and when a warm pool
        binds it, and idle for the rest of its life; each costs the gateway
        a TCP connection, two descriptors and libzmq's buffers, about 35 kB
        (a fifth of a connected kernel's cost: bench/scale.py).  Replies
        to requests still pending on it are lost: release it when none is.
        """
        sock = self._own.pop(channel, None)
        if sock is not None:
            sock.close()

    def split(self, frames: Any) -> Message:
        """
        The message in C{frames} received from the kernel (its signature
        checked unless L{verifies_signatures} is false).

        @raise WireError: malformed, or a bad signature.
        """
        return split_frames(frames, self.signer, self.verifies_signatures)[1]

    def hold(self, handler: Callable[..., None], *args: Any) -> bool:
        """
        While a large message's signature is checked, keep the call
        C{handler(*args)} (a message from one of the kernel's sockets) for
        after it, in order.

        @return: whether the call was kept; if not, make it now.
        """
        if self._held is None:
            return False
        self._held.append((handler, args))
        return True

    def _iopub_frames(self, frames: Any) -> None:
        if self.hold(self._iopub_frames, frames):
            return
        try:
            _, signature, message = split_unchecked(frames)
            if self.verifies_signatures:
                if self._on_iopub_ahead is not None and sum(map(len, message.parts)) >= CHECK_AHEAD_SIZE:
                    self._check_ahead(message, self.signer.check_in_slices(signature, message.parts))
                    return
                if not self.signer.verify(signature, message.parts):
                    raise WireError("invalid signature")
        except WireError as e:
            self._dropped(str(e))
            return
        self.iopub_seen = True
        self._on_iopub(message)

    def _dropped(self, why: str) -> None:
        _log.warn("kernel {kernel_id}: dropped an iopub message: {error}", kernel_id=self.kernel_id, error=why)

    def _check_ahead(self, message: Message, check: SliceCheck) -> None:
        """
        Check C{message}'s signature a slice per reactor turn, its clients
        receiving it meanwhile (see L{verifies_signatures}).
        """
        assert self._on_iopub_ahead is not None
        self._held = deque()
        self._checking = (self._clock.callLater(0, self._check_slice, message, check), message)
        self._call(self._on_iopub_ahead, message)

    def _check_slice(self, message: Message, check: SliceCheck) -> None:
        verdict = check.step()
        if verdict is None:
            self._checking = (self._clock.callLater(0, self._check_slice, message, check), message)
            return
        self._checking = None
        held, self._held = self._held, None
        assert held is not None  # set by _check_ahead; close() cancels this call
        if verdict:
            self.iopub_seen = True
            self._call(self._on_iopub, message)
        else:
            self._dropped("invalid signature")
        if self._on_iopub_checked is not None:
            self._call(self._on_iopub_checked, message)
        self._handle_held(held)

    def _call(self, handler: Callable[..., None], *args: Any) -> None:
        """
        What a socket's reader does for each message: a failure is logged,
        and the next message is still handled.
        """
        try:
            handler(*args)
        except Exception:
            _log.failure("kernel {kernel_id}: handling a message", kernel_id=self.kernel_id)

    def _handle_held(self, held: deque[tuple[Callable[..., None], tuple[Any, ...]]]) -> None:
        """
        Handle what came during a check, in order, until one of them starts
        another check (the rest then wait for that one).
        """
        while held and not self._closed:
            if self._held is not None:
                self._held.extend(held)
                return
            handler, args = held.popleft()
            self._call(handler, *args)

    def _reply_frames(self, channel: str, frames: Any) -> None:
        try:
            message = self.split(frames)
            parent_id = message.parent_header().get("msg_id")
        except WireError as e:
            _log.warn(
                "kernel {kernel_id}: dropped a {channel} reply: {error}",
                kernel_id=self.kernel_id,
                channel=channel,
                error=str(e),
            )
            return
        waiting = self._pending.pop(str(parent_id), None)
        if waiting is not None:
            waiting.callback(message)

    def request(
        self, channel: str, msg_type: str, content: dict[str, Any], timeout: float, private: bool = False
    ) -> Deferred[Message]:
        """
        Send a request of the gateway's own on C{shell} or C{control}.

        @param private: on control, the kernel's iopub statuses about it are
            for the gateway only (L{about_private}): a readiness probe's.
        @return: fires with the reply; fails with C{TimeoutError} after
            C{timeout} seconds, or with C{ConnectionError} if the link is
            closed first.
        """
        message = Message.build(msg_type, content, self.session)
        msg_id = message.msg_id
        if channel == "control":
            self.sent_on_control(msg_id)
            if private:
                self._private.append(msg_id)

        def forget(result: Any) -> Any:
            self._pending.pop(msg_id, None)
            return result

        waiting: Deferred[Message] = Deferred(lambda d: self._pending.pop(msg_id, None))
        if self._closed:
            waiting.errback(ConnectionError("kernel link is closed"))
            return waiting
        self._pending[msg_id] = waiting
        self._own_socket(channel).send(join_frames(message, self.signer))
        waiting.addTimeout(timeout, self._clock, onTimeoutCancel=_timed_out(msg_type, timeout))
        waiting.addBoth(forget)
        return waiting

    def sent_on_control(self, msg_id: str) -> None:
        """
        Remember a request sent on control (see L{about_control}).
        """
        self._control.append(msg_id)

    def about_control(self, message: Message) -> bool:
        """
        Whether C{message} (an iopub C{status}) is about one of the last
        requests sent on control.  ipykernel 6 and newer handle control in
        a thread of their own, and publish C{busy} then C{idle} for a
        control request even while a cell runs on shell: that C{idle} is
        not the kernel's state, and the culler (or a client shown the
        model) taking it for that would believe the running cell ended.

        @raise WireError: its parent header is malformed.
        """
        return bool(self._control) and message.parent_header().get("msg_id") in self._control

    def asked_by_gateway(self, message: Message) -> bool:
        """
        Whether C{message} (iopub) is about a request of the gateway's own
        (a readiness probe, a warm pool's binding): its parent was signed
        under this link's session.

        @raise WireError: its parent header is malformed.
        """
        return message.parent_header().get("session") == self.session

    def about_private(self, message: Message) -> bool:
        """
        Whether C{message} (an iopub C{status}) is about one of the
        gateway's private requests (L{request}): no client asked for it.

        @raise WireError: its parent header is malformed.
        """
        return bool(self._private) and message.parent_header().get("msg_id") in self._private

    def send(self, channel: str, message: Message) -> None:
        """
        Send a message of the gateway's own without waiting for a reply.
        """
        if channel == "control":
            self.sent_on_control(message.msg_id)
        if not self._closed:
            self._own_socket(channel).send(join_frames(message, self.signer))

    def client(self, on_message: MessageHandler, identity: bytes | None = None) -> "ClientLink":
        """
        Sockets for one WebSocket client, under C{identity} (default: a
        fresh one).
        """
        return ClientLink(self, on_message, identity)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._iopub.close()
        for sock in self._own.values():
            sock.close()
        checking, self._checking = self._checking, None
        if checking is not None:
            # Its clients are told it will not come (its verdict will not
            # either); what was held with it is dropped with the sockets.
            checking[0].cancel()
            self._held = None
            if self._on_iopub_checked is not None:
                self._on_iopub_checked(checking[1])
        pending, self._pending = self._pending, {}
        for waiting in pending.values():
            waiting.errback(ConnectionError("kernel link closed"))

    @property
    def channels(self) -> IChannelFactory:
        return self._channels


def _timed_out(msg_type: str, timeout: float) -> Callable[[Any, float], Any]:
    def raise_timeout(result: Any, seconds: float) -> Any:
        raise TimeoutError(f"no reply to {msg_type} within {timeout:g} s")

    return raise_timeout


class ClientLink:
    """
    One client's shell, control and stdin sockets.
    """

    def __init__(self, link: KernelLink, on_message: MessageHandler, identity: bytes | None = None) -> None:
        self.link = link
        self.identity = identity or uuid.uuid4().hex.encode("ascii")
        self._on_message = on_message
        self._closed = False
        self._sockets: dict[str, IChannelSocket] = {}
        # shell and stdin at once: the kernel routes an input_request to
        # this identity's stdin socket as soon as a request asks for input,
        # and a ROUTER drops what it cannot route.  control on first use:
        # its replies only ever answer this client's own control requests.
        for name in ("shell", "stdin"):
            self._socket(name)

    def _socket(self, name: str) -> IChannelSocket:
        sock = self._sockets.get(name)
        if sock is None:
            link = self.link
            sock = self._sockets[name] = link.channels.dealer(
                link.info.url(name),
                self.identity,
                lambda frames: self._frames(name, frames),
                curve_serverkey=link.info.curve_publickey,
            )
        return sock

    def _frames(self, channel: str, frames: Any) -> None:
        if self.link.hold(self._frames, channel, frames):
            return
        try:
            message = self.link.split(frames)
        except WireError as e:
            _log.warn(
                "kernel {kernel_id}: dropped a {channel} message: {error}",
                kernel_id=self.link.kernel_id,
                channel=channel,
                error=str(e),
            )
            return
        self._on_message(channel, message)

    def send(self, channel: str, message: Message) -> None:
        """
        Sign C{message} with the kernel's key and send it on C{channel}.
        """
        if channel == "control":
            try:
                self.link.sent_on_control(message.msg_id)
            except WireError:
                pass  # a header the kernel will refuse too: nothing of it to track
        if not self._closed:
            self._socket(channel).send(join_frames(message, self.link.signer))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in self._sockets.values():
            sock.close()
