"""
The gateway side of the comm-port protocol: how the gateway asks a remote
kernel launcher to signal its kernel or to stop listening.

A launcher reports a C{comm_port} with its connection info.  Each request
is one short-lived TCP connection to it.

Version 1 (Enterprise Gateway's, for its launchers): the client sends one
JSON object, C{{"signum": N}} or C{{"shutdown": 1}}, and closes; the end of
the request is EOF.  There is no answer and no authentication, so a client
only learns that something accepted the connection.  C{{"signum": 0}} is
the liveness probe: a launcher whose kernel has gone stops listening, and a
refused connection means "dead".

Version 2 (egateway's launchers, when the launch used a launch token):
a challenge-response exchange of newline-terminated JSON lines, so a
captured request is worthless on any later connection::

    launcher -> {"version": 2, "challenge": b64(16 random bytes)}
    gateway  -> {"request": "<request JSON text>", "mac": hex(HMAC)}
    launcher -> {"ok": true|false, "alive": true|false, "error": "..."}

The request text is a JSON object with C{signum} and/or C{shutdown}, as in
version 1.  C{HMAC} is HMAC-SHA256 keyed with L{comm_key} over the bytes
C{b"egateway-comm-v2\\n" + challenge + b"\\n" + request_text_utf8}, where
C{challenge} is the decoded 16 bytes.  C{alive} says whether the kernel
process still exists after the request was handled.  A launcher that was
given a launch token answers version 2 only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionDone,
    ConnectionRefusedError,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

LABEL = b"egateway-comm-v2"
MAX_LINE = 4096


def comm_key(token: str, kernel_id: str) -> bytes:
    """
    The version 2 request key of one launch: HMAC-SHA256 keyed with the
    launch token (UTF-8) over C{b"egateway-comm-v2|" + kernel_id_utf8}.
    Derived rather than the token itself, so the token proves one thing (the
    handshake) and this key another.
    """
    return hmac.new(token.encode("utf-8"), LABEL + b"|" + kernel_id.encode("utf-8"), hashlib.sha256).digest()


def request_mac(key: bytes, challenge: bytes, request_text: str) -> str:
    """
    The hex MAC a version 2 client sends with C{request_text} in answer to
    C{challenge} (raw bytes).
    """
    message = LABEL + b"\n" + challenge + b"\n" + request_text.encode("utf-8")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


class CommError(Exception):
    """
    A comm-port request failed; the message says how (timeout, protocol
    error, refused by the launcher).
    """


class CommRefused(CommError):
    """
    Nothing accepts connections on the comm port: the launcher (and, for
    the launchers we know, its kernel) has gone.
    """


class _Exchange(Protocol):
    """
    One request on one connection; C{done} fires with the launcher's
    answer (version 2) or C{None} (version 1, once the request is sent).
    """

    def __init__(self, request: dict[str, Any], key: bytes | None) -> None:
        self._request = request
        self._key = key
        self._buffer = b""
        self._challenged = False
        self._reply: dict[str, Any] | None = None
        self.done: Deferred[dict[str, Any] | None] = Deferred(self._cancel)

    def _cancel(self, _: Deferred) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def _finish(self, result: Any) -> None:
        if self.done.called:
            return
        if isinstance(result, Failure):
            self.done.errback(result)
        else:
            self.done.callback(result)

    def connectionMade(self) -> None:
        if self._key is None:
            self.transport.write(json.dumps(self._request).encode("utf-8"))
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._key is None:
            return
        self._buffer += data
        while b"\n" in self._buffer and not self.done.called:
            line, self._buffer = self._buffer.split(b"\n", 1)
            self._line(line)
        if len(self._buffer) > MAX_LINE and not self.done.called:
            self._fail("the launcher sent an overlong line")

    def _fail(self, why: str) -> None:
        self._finish(Failure(CommError(why)))
        self.transport.abortConnection()

    def _line(self, line: bytes) -> None:
        try:
            message = json.loads(line.decode("utf-8"))
            if not isinstance(message, dict):
                raise ValueError("not an object")
        except ValueError:
            self._fail("the launcher sent something other than a JSON object")
            return
        if not self._challenged:
            self._challenged = True
            try:
                challenge = base64.b64decode(message["challenge"], validate=True)
            except (KeyError, TypeError, binascii.Error, ValueError):
                self._fail("the launcher sent no version 2 challenge")
                return
            text = json.dumps(self._request)
            assert self._key is not None
            answer = {"request": text, "mac": request_mac(self._key, challenge, text)}
            self.transport.write(json.dumps(answer).encode("utf-8") + b"\n")
        elif self._reply is None:
            self._reply = message
            self._finish(message)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._key is None:
            if reason.check(ConnectionDone):
                self._finish(None)
            else:
                self._finish(Failure(CommError(f"the request may not have arrived: {reason.getErrorMessage()}")))
        else:
            self._finish(Failure(CommError("the launcher closed the connection without answering")))


class CommClient:
    """
    Sends comm-port requests to one kernel's launcher.

    With a launch C{token} the client speaks version 2 (authenticated, with
    answers); without one, version 1.
    """

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        *,
        kernel_id: str = "",
        token: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        """
        @param reactor: provides C{IReactorTCP} and C{IReactorTime}; all
            timeouts run on it.
        @param timeout: seconds one request may take, connecting included.
        """
        self._reactor = reactor
        self.host = host
        self.port = port
        self.kernel_id = kernel_id
        self.timeout = timeout
        self._key = comm_key(token, kernel_id) if token else None

    @property
    def version(self) -> int:
        return 1 if self._key is None else 2

    def signal(self, signum: int) -> Deferred[None]:
        """
        Ask the launcher to send C{signum} to its kernel.

        Fires with C{None} once sent (version 1) or acknowledged (version 2).
        Fails with L{CommRefused} when nothing listens, L{CommError} on a
        timeout or when the launcher refuses or cannot deliver it.
        """
        return Deferred.fromCoroutine(self._checked({"signum": int(signum)}))

    def shutdown(self) -> Deferred[None]:
        """
        Ask the launcher to stop its comm listener (the kernel itself is
        shut down through Jupyter's C{shutdown_request}).  Fails as
        L{signal} does.
        """
        return Deferred.fromCoroutine(self._checked({"shutdown": 1}))

    def alive(self) -> Deferred[bool]:
        """
        Probe the kernel with signal 0.

        Fires with C{True} when the launcher accepted the probe (version 1)
        or reports the kernel alive (version 2), C{False} when nothing
        listens or the launcher reports the kernel gone.  Fails with
        L{CommError} when the answer is unknown (timeout, protocol error):
        a slow network is not a dead kernel.
        """
        return Deferred.fromCoroutine(self._alive())

    async def _alive(self) -> bool:
        try:
            reply = await self._send({"signum": 0})
        except CommRefused:
            return False
        if reply is None:
            return True
        return bool(reply.get("alive"))

    async def _checked(self, request: dict[str, Any]) -> None:
        reply = await self._send(request)
        if reply is not None and not reply.get("ok"):
            raise CommError(
                f"the launcher at {self.host}:{self.port} refused {json.dumps(request)}: "
                f"{reply.get('error') or 'no reason given'}"
            )

    async def _send(self, request: dict[str, Any]) -> dict[str, Any] | None:
        endpoint = HostnameEndpoint(self._reactor, self.host, self.port, timeout=self.timeout)
        exchange = _Exchange(request, self._key)
        finished = connectProtocol(endpoint, exchange).addCallback(lambda _: exchange.done)

        def timed_out(result: Any, timeout: float) -> Failure:
            # Whatever the cancellation left (CancelledError, or the
            # endpoint's ConnectingCancelledError), the cause is the timeout.
            if isinstance(result, Failure) and not result.check(CancelledError, ConnectingCancelledError):
                return result
            return Failure(
                CommError(f"no answer from the launcher at {self.host}:{self.port} within {timeout:g}s")
            )

        finished.addTimeout(self.timeout, self._reactor, onTimeoutCancel=timed_out)
        try:
            return await finished
        except ConnectionRefusedError:
            raise CommRefused(
                f"nothing listens on the comm port {self.host}:{self.port}"
            ) from None
        except ConnectError as e:
            raise CommError(f"cannot reach the launcher at {self.host}:{self.port}: {e}") from None
        except ConnectingCancelledError:
            raise CancelledError() from None  # our caller cancelled
