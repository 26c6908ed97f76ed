"""
The response listener: the one TCP port where remote kernel launchers
deliver their kernel's connection info.

A remote launcher calls L{ResponseListener.expect} before starting a
kernel, passes C{response_address}, C{public_key} and the pending launch's
C{token} to the kernel-side launcher, and waits on C{received}.  The
kernel-side launcher connects, sends one payload (see
L{egateway.clusters.handshake}) and ends it with EOF (a half-close, so it
can read our one-line verdict: C{OK} or C{ERROR refused}; Enterprise
Gateway's launchers close without reading, which is fine).

With TLS (C{response_tls}) the listener is reached only by egateway's own
launcher, told the CA to check our certificate against.  TLS has no
half-close, so there a newline ends the payload (base64 holds none) and the
verdict follows on the same connection.  Enterprise Gateway's launchers do
not speak TLS: a TLS listener serves version 2 launchers only.

The port is reachable by anyone on the network, so every payload is
suspect: garbage, oversize payloads, payloads for kernels nobody is
launching, replays, forgeries and version 1 payloads where version 1 is not
allowed are refused with one log line each, and none of them disturbs a
launch in progress.  A refused payload does not use up the launch: the
genuine launcher may still deliver.

Version 1 payloads are not authenticated: the kernel id and the public key
are all it takes to forge one, and both are visible to any user of the
kernel's host while it launches (C{ps}, C{squeue}).  So a launch accepts
version 1 only when the operator turned it on for the whole gateway
(C{response_accept_v1}, off by default) and the launch itself allows it (its
kernelspec runs Enterprise Gateway's launcher, which cannot speak version
2), and only from the address of the host the kernel was placed on.  A
version 1 payload that arrives before the placement is known (a Slurm job
whose launcher reports before the gateway has seen the job run) is held,
unanswered, until it is; see L{PendingLaunch.expect_from}.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
from typing import Any, Iterable

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from egateway.clusters.handshake import (
    HandshakeError,
    HandshakeKeys,
    HandshakePayload,
    open_envelope,
    parse_envelope,
)
from egateway.clusters.interface import LaunchError
from egateway.wire.channels import ConnectionInfo

DEFAULT_PORT = 8877


def primary_ipv4() -> str:
    """
    This host's address on its default route, or C{127.0.0.1} without one.
    Connecting a UDP socket sends nothing; it only asks the kernel which
    source address it would use.  Hosts with several networks should set
    C{EG_RESPONSE_IP} instead of relying on this.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class PendingLaunch:
    """
    One launch waiting for its connection info.

    @ivar token: the one-time launch token to hand to the kernel-side
        launcher (in C{EG_LAUNCH_TOKEN}); version 2 payloads must carry it.
    @ivar received: fires with the connection info dict (C{pid}, C{pgid},
        C{comm_port}, C{kernel_id} included when the launcher sent them);
        fails with L{LaunchError} when the listener stops first.  Cancelling
        it is the same as L{cancel}: callbacks already waiting see
        C{CancelledError}; after that it holds C{None}, so an abandoned
        launch logs no unhandled error.
    @ivar version: the payload version that delivered (C{None} until then);
        the comm port speaks version 2 only after a version 2 handshake.
    @ivar accept_v1: whether this launch takes version 1 payloads at all
        (the operator's switch and the launch's own permission).
    @ivar hosts: the addresses a version 1 payload may come from (the
        kernel's placement host), or C{None} while the placement is not
        known.
    """

    MAX_HELD = 4
    """
    Version 1 payloads held at most while the placement is unknown; more
    are refused (each holds a connection open).
    """

    def __init__(self, listener: "ResponseListener", kernel_id: str, accept_v1: bool) -> None:
        self.kernel_id = kernel_id
        self.accept_v1 = accept_v1
        self.token = secrets.token_urlsafe(32)
        self.version: int | None = None
        self.hosts: frozenset[str] | None = None
        self.received: Deferred[dict[str, Any]] = Deferred(lambda _: listener._forget(self))
        self._listener = listener
        self._held: list[tuple[HandshakePayload, str, Deferred[bool]]] = []

    @property
    def delivered(self) -> bool:
        return self.version is not None

    @property
    def comm_token(self) -> str | None:
        """
        The token for L{egateway.clusters.comm.CommClient}: C{None} unless
        the launcher proved it speaks version 2.
        """
        return self.token if self.version == 2 else None

    def expect_from(self, addresses: Iterable[str]) -> None:
        """
        The kernel's placement is known: version 1 payloads for this launch
        are accepted from these addresses only (from now on, and for those
        held so far, judged in the order they arrived).
        """
        self.hosts = frozenset(_normal_address(a) for a in addresses)
        held, self._held = self._held, []
        for payload, peer, verdict in held:
            verdict.callback(self._listener._judge_v1_source(self, payload, peer))

    def _hold(self, payload: HandshakePayload, peer: str) -> Deferred[bool] | bool:
        if len(self._held) >= self.MAX_HELD:
            return self._listener._refuse(
                peer, f"too many version 1 payloads for kernel {self.kernel_id!r} before its placement is known",
                self.kernel_id,
            )
        verdict: Deferred[bool] = Deferred()
        self._held.append((payload, peer, verdict))
        return verdict

    def _refuse_held(self, reason: str) -> None:
        held, self._held = self._held, []
        for _, peer, verdict in held:
            verdict.callback(self._listener._refuse(peer, reason, self.kernel_id))

    def cancel(self) -> None:
        """
        Stop expecting this launch.  Until then a delivered launch stays
        registered, so a replayed payload is recognised as one; call this
        when the kernel is cleaned up.
        """
        self._refuse_held(f"the launch of kernel {self.kernel_id!r} ended before its placement was known")
        if not self.received.called:
            self.received.cancel()
            # Nobody may be waiting any more (the launch failed before it
            # waited); a cancellation is not an error to log.
            self.received.addErrback(lambda f: f.trap(CancelledError) and None)
        else:
            self._listener._forget(self)

    def _deliver(self, payload: HandshakePayload) -> None:
        self.version = payload.version
        self._refuse_held(f"kernel {self.kernel_id!r} already delivered its connection info")
        self.received.callback(payload.conn_info)


def _normal_address(address: str) -> str:
    """
    An address in one canonical text form (IPv4-mapped IPv6 as IPv4), so
    a peer compares equal to the placement host however it is written.
    """
    host = address.strip().strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def _peer_host(peer: str) -> str:
    """
    The address part of L{_PayloadProtocol.peer} (C{host:port}).
    """
    return _normal_address(peer.rsplit(":", 1)[0])


@implementer(IHalfCloseableProtocol)
class _PayloadProtocol(Protocol):
    """
    Reads one payload up to EOF, within a size limit and a deadline.
    """

    def __init__(self, listener: "ResponseListener") -> None:
        self._listener = listener
        self._chunks: list[bytes] = []
        self._size = 0
        self._finished = False
        self._deadline: Any = None

    @property
    def peer(self) -> str:
        address = self.transport.getPeer()
        return f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}"

    def connectionMade(self) -> None:
        self._listener._connections.add(self)
        self._deadline = self._listener._reactor.callLater(self._listener.timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self._finished:
            return
        self._size += len(data)
        if self._size > self._listener.max_payload:
            self._finish()
            self._listener._refuse(
                self.peer, f"payload larger than {self._listener.max_payload} bytes"
            )
            self.transport.abortConnection()
            return
        self._chunks.append(data)
        if self._listener.tls is not None and b"\n" in data:
            self.readConnectionLost()

    def _timed_out(self) -> None:
        self._deadline = None
        if not self._finished:
            self._finish()
            self._listener._refuse(
                self.peer, f"no complete payload within {self._listener.timeout:g}s"
            )
        self.transport.abortConnection()

    def _finish(self) -> None:
        self._finished = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def readConnectionLost(self) -> None:
        if self._finished:
            return
        self._finish()
        payload = b"".join(self._chunks)
        if self._listener.tls is not None:
            payload = payload.split(b"\n", 1)[0]
        verdict = self._listener._judge(payload, self.peer)
        if isinstance(verdict, Deferred):
            verdict.addCallback(self._answer)
        else:
            self._answer(verdict)

    def _answer(self, accepted: bool) -> None:
        self.transport.write(b"OK\n" if accepted else b"ERROR refused\n")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._listener._connections.discard(self)
        if not self._finished:
            # Closed without a clean EOF (reset): use what arrived.
            self._finish()
            if self._chunks:
                self._listener._judge(b"".join(self._chunks), self.peer)


class ResponseListener(Service):
    """
    Receives connection info from remote launchers.

    @ivar keys: the key pair whose public half launchers encrypt to.
    @ivar accept_v1: whether version 1 payloads may be accepted at all (the
        operator's C{response_accept_v1}); each launch must allow them too.
    @ivar max_payload: bytes; a longer payload is refused and its
        connection dropped.
    @ivar timeout: seconds a connection may take to deliver its payload.
    @ivar tls: the certificate to serve (an
        L{egateway.ops.tls.ReloadableServerTLS}), or C{None} for plain TCP.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        *,
        ip: str = "",
        port: int = DEFAULT_PORT,
        accept_v1: bool = False,
        max_payload: int = 65536,
        timeout: float = 10.0,
        keys: HandshakeKeys | None = None,
        tls: Any = None,
    ) -> None:
        """
        @param reactor: provides C{IReactorTCP} and C{IReactorTime}.
        @param ip: the address to bind and advertise; empty for
            L{primary_ipv4}; C{0.0.0.0} (or C{::}) binds every address and
            advertises L{primary_ipv4}.
        @param port: 0 for any free port (see L{port} once started).
        @param keys: the key pair; generated at start-up when omitted.
        """
        self._reactor = reactor
        self.ip = ip
        self.advertised_ip = ip
        self._requested_port = port
        self.accept_v1 = accept_v1
        self.max_payload = max_payload
        self.timeout = timeout
        self.keys = keys
        self.tls = tls
        self._listening: Any = None
        self._pending: dict[str, PendingLaunch] = {}
        self._connections: set[_PayloadProtocol] = set()

    @classmethod
    def from_config(
        cls, reactor: Any, config: Any, keys: HandshakeKeys | None = None, tls: Any = None
    ) -> "ResponseListener":
        """
        Build from the C{response} section of L{egateway.config.Config}.
        """
        return cls(
            reactor,
            ip=config.response_ip,
            port=config.response_port,
            accept_v1=config.response_accept_v1,
            max_payload=config.response_max_payload,
            keys=keys,
            tls=tls,
        )

    def startService(self) -> None:
        """
        Bind the port.  A busy port raises C{CannotListenError} here, which
        aborts the gateway's start-up rather than leaving launches to time
        out later.
        """
        if self.keys is None:
            self.keys = HandshakeKeys.generate()
        bind = self.ip or primary_ipv4()
        self.advertised_ip = primary_ipv4() if bind in ("0.0.0.0", "::") else bind
        factory = Factory.forProtocol(lambda: _PayloadProtocol(self))
        factory.noisy = False
        if self.tls is not None:
            factory = self.tls.wrap(factory)
        self._listening = self._reactor.listenTCP(
            self._requested_port, factory, backlog=128, interface=bind
        )
        super().startService()
        self._log.info(
            "listening for kernel connection info on {address}{tls}",
            address=self.response_address,
            tls=" (TLS)" if self.tls is not None else "",
        )

    def stopService(self) -> Deferred[Any]:
        """
        Stop listening, drop connections in progress and fail launches
        still waiting.
        """
        super().stopService()
        for pending in list(self._pending.values()):
            pending._refuse_held("the gateway's response listener stopped")
            if not pending.received.called:
                pending.received.errback(
                    LaunchError("the gateway's response listener stopped before connection info arrived")
                )
        self._pending.clear()
        for connection in list(self._connections):
            connection._finish()
            connection.transport.abortConnection()
        listening, self._listening = self._listening, None
        if listening is None:
            return succeed(None)
        return maybeDeferred(listening.stopListening)

    @property
    def port(self) -> int:
        """
        The port actually bound (the answer to a configured port 0).
        """
        if self._listening is None:
            raise RuntimeError("the response listener is not listening")
        return self._listening.getHost().port

    @property
    def response_address(self) -> str:
        """
        C{ip:port} as substituted for C{{response_address}}.
        """
        host = self.advertised_ip
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def public_key(self) -> str:
        """
        The base64 DER public key substituted for C{{public_key}}.
        """
        if self.keys is None:
            raise RuntimeError("the response listener has not started")
        return self.keys.public_key_b64

    def expect(
        self, kernel_id: str, *, accept_v1: bool = False, hosts: Iterable[str] | None = None
    ) -> PendingLaunch:
        """
        Register a launch of C{kernel_id} before starting its launcher.

        A launch already registered for the same kernel (a restart) is
        cancelled and replaced, so its token stops working.

        @param accept_v1: this launch may deliver a version 1 payload (its
            kernelspec runs Enterprise Gateway's launcher); ignored unless
            the listener accepts version 1 at all.  Otherwise only version
            2, which proves knowledge of the launch token, is accepted.
        @param hosts: the addresses the kernel's host is known by, when
            known already (else see L{PendingLaunch.expect_from}).
        """
        previous = self._pending.get(kernel_id)
        if previous is not None:
            previous.cancel()
        pending = PendingLaunch(self, kernel_id, accept_v1 and self.accept_v1)
        self._pending[kernel_id] = pending
        if hosts is not None:
            pending.expect_from(hosts)
        return pending

    def _forget(self, pending: PendingLaunch) -> None:
        if self._pending.get(pending.kernel_id) is pending:
            del self._pending[pending.kernel_id]

    def _refuse(self, peer: str, reason: str, kernel_id: str = "") -> bool:
        self._log.warn(
            "refused connection info from {peer}: {reason}",
            peer=peer,
            reason=reason,
            kernel_id=kernel_id,
        )
        return False

    def _judge(self, data: bytes, peer: str) -> bool | Deferred[bool]:
        """
        L{_received}, with a bug in judging one payload logged rather than
        left to break the connection handling.  A verdict still to come (a
        held version 1 payload) is a Deferred.
        """
        try:
            return self._received(data, peer)
        except Exception:
            self._log.failure("error judging connection info from {peer}", peer=peer)
            return False

    def _received(self, data: bytes, peer: str) -> bool | Deferred[bool]:
        """
        Judge one payload; deliver it if acceptable.  Returns whether it
        was accepted, or a Deferred verdict for a version 1 payload held
        until its launch's placement is known.
        """
        if not data.strip():
            self._log.info("ignored an empty connection from {peer}", peer=peer)
            return False
        try:
            envelope = parse_envelope(data)
        except HandshakeError as e:
            return self._refuse(peer, str(e))
        if envelope.version == 1 and not self.accept_v1:
            return self._refuse(peer, "version 1 payloads are disabled (response_accept_v1 is off)")
        if envelope.version == 2:
            # Refuse what we can before spending an RSA decryption on it.
            early = self._pending.get(envelope.kernel_id)
            if early is None:
                return self._refuse(
                    peer, f"no launch is waiting for kernel {envelope.kernel_id!r}", envelope.kernel_id
                )
            if early.delivered:
                return self._refuse(
                    peer, f"kernel {envelope.kernel_id!r} already delivered its connection info (replay?)",
                    envelope.kernel_id,
                )
        assert self.keys is not None
        try:
            payload = open_envelope(envelope, self.keys)
        except HandshakeError as e:
            return self._refuse(peer, str(e), envelope.kernel_id)
        kernel_id = payload.kernel_id
        pending = self._pending.get(kernel_id)
        if pending is None:
            return self._refuse(peer, f"no launch is waiting for kernel {kernel_id!r}", kernel_id)
        if pending.delivered:
            return self._refuse(
                peer, f"kernel {kernel_id!r} already delivered its connection info (replay?)", kernel_id
            )
        if payload.version == 1:
            if not pending.accept_v1:
                return self._refuse(
                    peer,
                    f"kernel {kernel_id!r} must use version 2 (its kernelspec does not run Enterprise "
                    "Gateway's launcher, or response_accept_v1 is off)",
                    kernel_id,
                )
            if pending.hosts is None:
                return pending._hold(payload, peer)
            return self._judge_v1_source(pending, payload, peer)
        if not hmac.compare_digest(
            (payload.token or "").encode("utf-8"), pending.token.encode("utf-8")
        ):
            return self._refuse(peer, f"wrong launch token for kernel {kernel_id!r}", kernel_id)
        return self._accept(pending, payload, peer)

    def _judge_v1_source(self, pending: PendingLaunch, payload: HandshakePayload, peer: str) -> bool:
        """
        A version 1 payload is accepted only from the kernel's placement
        host: anyone can forge one, but not from there.
        """
        kernel_id = pending.kernel_id
        if pending.delivered:
            return self._refuse(peer, f"kernel {kernel_id!r} already delivered its connection info", kernel_id)
        if self._pending.get(kernel_id) is not pending:
            return self._refuse(peer, f"kernel {kernel_id!r} is no longer waiting for connection info", kernel_id)
        if _peer_host(peer) not in (pending.hosts or ()):
            return self._refuse(
                peer,
                f"version 1 payload for kernel {kernel_id!r} does not come from its host "
                f"({', '.join(sorted(pending.hosts or ())) or 'unknown'})",
                kernel_id,
            )
        return self._accept(pending, payload, peer)

    def _accept(self, pending: PendingLaunch, payload: HandshakePayload, peer: str) -> bool:
        kernel_id = pending.kernel_id
        try:
            ConnectionInfo.from_dict(payload.conn_info)
        except ValueError as e:
            return self._refuse(peer, f"kernel {kernel_id!r}: {e}", kernel_id)
        self._log.info(
            "kernel {kernel_id} connection info received from {peer} (version {version})",
            kernel_id=kernel_id,
            peer=peer,
            version=payload.version,
        )
        pending._deliver(payload)
        return True
