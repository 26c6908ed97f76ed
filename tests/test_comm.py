"""
Tests for the gateway side of the comm-port protocol
(L{egateway.clusters.comm}) against small stand-in launchers on loopback.
The real launcher is exercised in C{tests.test_kernel_launcher}.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, DeferredQueue
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from egateway.clusters.comm import CommClient, CommError, CommRefused, comm_key, request_mac

KERNEL_ID = "kernel-1"
TOKEN = "launch-token"


class _V1Launcher(Protocol):
    """
    Reads one request to EOF, as Enterprise Gateway's listener does.
    """

    def __init__(self, requests: DeferredQueue) -> None:
        self.requests = requests
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.requests.put(json.loads(self.data))


class _V2Launcher(Protocol):
    """
    The launcher's side of version 2: challenge, verify, answer.
    """

    def __init__(self, requests: list[Any], key: bytes, alive: bool = True) -> None:
        self.requests = requests
        self.key = key
        self.alive = alive
        self.buffer = b""
        self.challenge = os.urandom(16)

    def connectionMade(self) -> None:
        line = {"version": 2, "challenge": base64.b64encode(self.challenge).decode()}
        self.transport.write(json.dumps(line).encode() + b"\n")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\n" not in self.buffer:
            return
        message = json.loads(self.buffer.split(b"\n")[0])
        expected = request_mac(self.key, self.challenge, message["request"])
        if hmac.compare_digest(expected, message["mac"]):
            self.requests.append(json.loads(message["request"]))
            reply = {"ok": True, "alive": self.alive}
        else:
            reply = {"ok": False, "alive": True, "error": "authentication failed"}
        self.transport.write(json.dumps(reply).encode() + b"\n")
        self.transport.loseConnection()


class _Silent(Protocol):
    """
    Accepts and never says anything: a hung launcher.
    """

    def __init__(self, closed: list[Deferred[None]]) -> None:
        self.closed: Deferred[None] = Deferred()
        closed.append(self.closed)

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


class _Garbage(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")


class KeyTests(SynchronousTestCase):
    def test_key_depends_on_token_and_kernel(self) -> None:
        """
        The comm key differs per token and per kernel, and is not the token.
        """
        key = comm_key(TOKEN, KERNEL_ID)
        self.assertEqual(len(key), 32)
        self.assertNotEqual(key, comm_key("other", KERNEL_ID))
        self.assertNotEqual(key, comm_key(TOKEN, "kernel-2"))
        self.assertNotIn(TOKEN.encode(), key)

    def test_mac_binds_challenge_and_request(self) -> None:
        """
        A MAC made for one challenge or request does not fit another.
        """
        key = comm_key(TOKEN, KERNEL_ID)
        mac = request_mac(key, b"a" * 16, '{"signum": 2}')
        self.assertNotEqual(mac, request_mac(key, b"b" * 16, '{"signum": 2}'))
        self.assertNotEqual(mac, request_mac(key, b"a" * 16, '{"signum": 9}'))


class ClockTests(SynchronousTestCase):
    """
    Deadlines run on the injected clock.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def test_connect_timeout(self) -> None:
        """
        A connection attempt that never completes fails at the timeout.
        """
        attempt = CommClient(self.reactor, "127.0.0.1", 5555, timeout=3).signal(2)
        self.reactor.advance(2.9)
        self.assertNoResult(attempt)
        self.reactor.advance(0.2)
        failure = self.failureResultOf(attempt, CommError)
        self.assertIn("within 3s", str(failure.value))

    def test_answer_timeout(self) -> None:
        """
        A launcher that accepts and never answers is cut off at the timeout.
        """
        attempt = CommClient(self.reactor, "127.0.0.1", 5555, kernel_id=KERNEL_ID, token=TOKEN, timeout=3).alive()
        factory = self.reactor.tcpClients[0][2]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.reactor.advance(3.1)
        self.failureResultOf(attempt, CommError)
        self.assertTrue(transport.disconnecting)

    def test_cancel(self) -> None:
        """
        Cancelling a request cancels it; it is not reported as a timeout.
        """
        attempt = CommClient(self.reactor, "127.0.0.1", 5555, timeout=3).shutdown()
        attempt.cancel()
        self.failureResultOf(attempt, CancelledError)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class ClientTests(TestCase):
    timeout = 20

    def serve(self, build: Callable[[], Protocol]) -> int:
        port = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def client(self, port: int, token: str | None = None, timeout: float = 5.0) -> CommClient:
        return CommClient(reactor, "127.0.0.1", port, kernel_id=KERNEL_ID, token=token, timeout=timeout)

    async def test_v1_requests(self) -> None:
        """
        Version 1 sends Enterprise Gateway's plain JSON requests, one per
        connection.
        """
        requests: DeferredQueue = DeferredQueue()
        port = self.serve(lambda: _V1Launcher(requests))
        client = self.client(port)
        self.assertEqual(client.version, 1)
        await client.signal(2)
        self.assertEqual(await requests.get().addTimeout(5, reactor), {"signum": 2})
        await client.shutdown()
        self.assertEqual(await requests.get().addTimeout(5, reactor), {"shutdown": 1})
        self.assertTrue(await client.alive())
        self.assertEqual(await requests.get().addTimeout(5, reactor), {"signum": 0})

    async def test_refused(self) -> None:
        """
        Nothing listening means dead for alive(), and CommRefused for
        requests.
        """
        # A port nobody listens on: bind, note, close.
        probe = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        closed_port = probe.getHost().port
        await probe.stopListening()
        client = self.client(closed_port)
        self.assertFalse(await client.alive())
        with self.assertRaises(CommRefused):
            await client.signal(2)
        v2 = self.client(closed_port, token=TOKEN)
        self.assertFalse(await v2.alive())

    async def test_v2_requests(self) -> None:
        """
        Version 2 answers each challenge with a MAC under the launch's key,
        and reports liveness.
        """
        requests: list[Any] = []
        key = comm_key(TOKEN, KERNEL_ID)
        port = self.serve(lambda: _V2Launcher(requests, key))
        client = self.client(port, token=TOKEN)
        self.assertEqual(client.version, 2)
        await client.signal(2)
        await client.shutdown()
        self.assertTrue(await client.alive())
        self.assertEqual(requests, [{"signum": 2}, {"shutdown": 1}, {"signum": 0}])

    async def test_v2_kernel_gone(self) -> None:
        """
        A version 2 launcher reporting its kernel gone makes alive() false.
        """
        port = self.serve(lambda: _V2Launcher([], comm_key(TOKEN, KERNEL_ID), alive=False))
        self.assertFalse(await self.client(port, token=TOKEN).alive())

    async def test_v2_wrong_token(self) -> None:
        """
        With the wrong token the launcher refuses, and the client says so.
        """
        requests: list[Any] = []
        port = self.serve(lambda: _V2Launcher(requests, comm_key(TOKEN, KERNEL_ID)))
        with self.assertRaises(CommError) as raised:
            await self.client(port, token="wrong").signal(9)
        self.assertIn("authentication failed", str(raised.exception))
        self.assertEqual(requests, [])

    async def test_timeout(self) -> None:
        """
        A launcher that never answers fails the request at the timeout and
        the connection is dropped.
        """
        closed: list[Deferred[None]] = []
        port = self.serve(lambda: _Silent(closed))
        for token in (TOKEN, None):
            client = self.client(port, token=token, timeout=0.3)
            if token is None:
                # Version 1 needs no answer: it completes as soon as sent.
                await client.signal(2)
                continue
            with self.assertRaises(CommError) as raised:
                await client.signal(2)
            self.assertIn("within 0.3s", str(raised.exception))
        self.assertEqual(len(closed), 2)
        for lost in closed:
            await lost

    async def test_garbage_answer(self) -> None:
        """
        Something other than a launcher on the port is a protocol error.
        """
        port = self.serve(_Garbage)
        with self.assertRaises(CommError):
            await self.client(port, token=TOKEN).alive()
