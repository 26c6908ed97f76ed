"""
Tests for L{egateway.clusters.response.ResponseListener}: real loopback TCP
for what launchers and attackers can send, a memory reactor for deadlines.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from egateway.clusters.handshake import encode_v1, encode_v2
from egateway.clusters.interface import LaunchError
from egateway.clusters.response import ResponseListener, primary_ipv4
from egateway.config import build_config
from tests.support.polling import eventually
from tests.test_handshake import INFO, keys

KERNEL_ID = INFO["kernel_id"]


def observe(deferred: Deferred[Any]) -> Deferred[Any]:
    """
    A waiter on C{deferred}, as a launch awaiting its connection info is.
    """
    waiter: Deferred[Any] = Deferred()
    deferred.addCallbacks(waiter.callback, waiter.errback)
    return waiter


def info_for(kernel_id: str) -> dict[str, Any]:
    return dict(INFO, kernel_id=kernel_id)


class _Sender(Protocol):
    """
    Sends one payload as a launcher does (data, then half-close) and
    collects the gateway's verdict.
    """

    def __init__(self, payload: bytes, half_close: bool = True) -> None:
        self.payload = payload
        self.half_close = half_close
        self.verdict = b""
        self.closed: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)
        if self.half_close:
            self.transport.loseWriteConnection()
        else:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.verdict += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(self.verdict)


class LoopbackTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.events: list[dict] = []
        self.patch(ResponseListener, "_log", Logger(observer=self.events.append))
        self.listener = self.make_listener()

    def make_listener(self, **kwargs: Any) -> ResponseListener:
        listener = ResponseListener(reactor, ip="127.0.0.1", port=0, keys=keys(), **kwargs)
        listener.startService()
        self.addCleanup(listener.stopService)
        return listener

    async def send(self, payload: bytes, listener: ResponseListener | None = None, half_close: bool = True) -> bytes:
        listener = listener or self.listener
        sender = _Sender(payload, half_close)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", listener.port, timeout=5)
        await connectProtocol(endpoint, sender)
        return await sender.closed.addTimeout(10, reactor)

    def expect(self, kernel_id: str, listener: ResponseListener | None = None, **kwargs: Any) -> Any:
        """
        Expect a launch the test may leave waiting: its failure when the
        listener stops at clean-up is expected, not an unhandled error.
        """
        pending = (listener or self.listener).expect(kernel_id, **kwargs)
        pending.received.addErrback(lambda f: f.trap(CancelledError, LaunchError) and None)
        return pending

    def legacy(self, kernel_id: str = KERNEL_ID, hosts: list[str] | None = None) -> tuple[ResponseListener, Any]:
        """
        A listener the operator allowed version 1 on, and a launch of
        C{kernel_id} that allows it (a kernelspec running Enterprise
        Gateway's launcher) placed on C{hosts} (default: this host).
        """
        listener = self.make_listener(accept_v1=True)
        pending = self.expect(kernel_id, listener, accept_v1=True, hosts=["127.0.0.1"] if hosts is None else hosts)
        return listener, pending

    def refusals(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_format", "").startswith("refused")]

    async def assert_still_serving(self, listener: ResponseListener | None = None) -> None:
        """
        After a refusal the same listener still accepts a genuine payload.
        """
        listener = listener or self.listener
        pending = self.expect("healthy-kernel", listener)
        verdict = await self.send(
            encode_v2(info_for("healthy-kernel"), listener.public_key, "healthy-kernel", pending.token),
            listener,
        )
        self.assertEqual(verdict, b"OK\n")
        self.assertEqual((await pending.received)["kernel_id"], "healthy-kernel")

    def test_address_of_port_zero(self) -> None:
        """
        Configured with port 0, the listener advertises the port it bound.
        """
        host, port = self.listener.response_address.split(":")
        self.assertEqual(host, "127.0.0.1")
        self.assertEqual(int(port), self.listener.port)
        self.assertNotEqual(self.listener.port, 0)
        self.assertEqual(self.listener.public_key, keys().public_key_b64)

    async def test_v1_delivered(self) -> None:
        """
        A version 1 payload for a pending kernel delivers its connection
        info, launcher extras included.
        """
        listener, pending = self.legacy()
        verdict = await self.send(encode_v1(INFO, listener.public_key), listener)
        self.assertEqual(verdict, b"OK\n")
        self.assertEqual(await pending.received, INFO)
        self.assertEqual(pending.version, 1)
        self.assertIsNone(pending.comm_token)

    async def test_v1_without_half_close(self) -> None:
        """
        A launcher that closes outright after sending (Enterprise Gateway's)
        is understood.
        """
        listener, pending = self.legacy()
        await self.send(encode_v1(INFO, listener.public_key), listener, half_close=False)
        self.assertEqual(await pending.received, INFO)

    async def test_v2_delivered(self) -> None:
        """
        A version 2 payload with the launch's token delivers, and the comm
        port may then use version 2.
        """
        pending = self.listener.expect(KERNEL_ID)
        verdict = await self.send(encode_v2(INFO, self.listener.public_key, KERNEL_ID, pending.token))
        self.assertEqual(verdict, b"OK\n")
        self.assertEqual(await pending.received, INFO)
        self.assertEqual(pending.comm_token, pending.token)
        self.assertEqual(self.refusals(), [])

    async def test_tokens_unique_and_url_safe(self) -> None:
        """
        Each launch gets its own token, usable in an environment variable.
        """
        tokens = {self.expect(f"k{i}").token for i in range(20)}
        self.assertEqual(len(tokens), 20)
        for token in tokens:
            self.assertRegex(token, r"^[A-Za-z0-9_-]{40,}$")

    async def test_unknown_kernel(self) -> None:
        """
        A payload for a kernel nobody is launching is refused and logged.
        """
        listener, _ = self.legacy()
        for payload in (
            encode_v1(info_for("nobody"), listener.public_key),
            encode_v2(info_for("nobody"), listener.public_key, "nobody", "x"),
        ):
            self.assertEqual(await self.send(payload, listener), b"ERROR refused\n")
        self.assertEqual(len(self.refusals()), 2)
        for line in self.refusals():
            self.assertIn("no launch is waiting for kernel 'nobody'", line)
        await self.assert_still_serving(listener)

    async def test_replay(self) -> None:
        """
        Sending a delivered payload again is refused; the first delivery
        stands.
        """
        pending = self.listener.expect(KERNEL_ID)
        payload = encode_v2(INFO, self.listener.public_key, KERNEL_ID, pending.token)
        self.assertEqual(await self.send(payload), b"OK\n")
        self.assertEqual(await self.send(payload), b"ERROR refused\n")
        [line] = self.refusals()
        self.assertIn("already delivered", line)
        self.assertEqual(await pending.received, INFO)
        await self.assert_still_serving()

    async def test_v1_replay(self) -> None:
        """
        A second version 1 payload for a delivered launch is refused too.
        """
        listener, _ = self.legacy()
        payload = encode_v1(INFO, listener.public_key)
        self.assertEqual(await self.send(payload, listener), b"OK\n")
        self.assertEqual(await self.send(payload, listener), b"ERROR refused\n")
        self.assertIn("already delivered", self.refusals()[0])

    async def test_forged_token(self) -> None:
        """
        A version 2 payload with a wrong token is refused without using up
        the launch: the genuine launcher still gets through.
        """
        pending = self.expect(KERNEL_ID)
        forged = encode_v2(INFO, self.listener.public_key, KERNEL_ID, "guessed-token")
        self.assertEqual(await self.send(forged), b"ERROR refused\n")
        self.assertIn("wrong launch token", self.refusals()[0])
        self.assertFalse(pending.received.called)
        genuine = encode_v2(INFO, self.listener.public_key, KERNEL_ID, pending.token)
        self.assertEqual(await self.send(genuine), b"OK\n")
        self.assertEqual(await pending.received, INFO)

    async def test_tampered(self) -> None:
        """
        A genuine payload with one bit flipped in transit is refused.
        """
        pending = self.expect(KERNEL_ID)
        fields = json.loads(base64.b64decode(encode_v2(INFO, self.listener.public_key, KERNEL_ID, pending.token)))
        ciphertext = bytearray(base64.b64decode(fields["conn_info"]))
        ciphertext[10] ^= 0x80
        fields["conn_info"] = base64.b64encode(bytes(ciphertext)).decode()
        tampered = base64.b64encode(json.dumps(fields).encode())
        self.assertEqual(await self.send(tampered), b"ERROR refused\n")
        self.assertIn("fails authentication", self.refusals()[0])
        self.assertFalse(pending.received.called)
        await self.assert_still_serving()

    async def test_wrong_key(self) -> None:
        """
        A payload encrypted to another gateway's key is refused.

        RSA PKCS#1 v1.5 decryption rejects implicitly: for a wrong key it
        usually raises, but it may return random bytes instead, which are
        then refused by the key length check, the AES padding check or,
        rarely, the JSON parse.  Any of those is the right refusal.
        """
        listener, _ = self.legacy()
        self.assertEqual(await self.send(encode_v1(INFO, keys(1).public_key_b64), listener), b"ERROR refused\n")
        self.assertEqual(len(self.refusals()), 1)
        self.assertRegex(
            self.refusals()[0],
            "version 1 (key cannot be decrypted|conn_info does not decrypt|connection info is not JSON)",
        )
        await self.assert_still_serving(listener)

    async def test_garbage(self) -> None:
        """
        Random bytes, an HTTP request and a version 0 payload are each
        refused with one log line.
        """
        self.expect(KERNEL_ID)
        for payload in (
            os.urandom(300),
            b"GET / HTTP/1.0\r\n\r\n",
            base64.b64encode(json.dumps({"kernel_id": KERNEL_ID}).encode()),
        ):
            self.assertEqual(await self.send(payload), b"ERROR refused\n")
        self.assertEqual(len(self.refusals()), 3)
        self.assertIn("version 0", self.refusals()[2])
        await self.assert_still_serving()

    async def test_oversize(self) -> None:
        """
        A payload over the size limit is refused and its connection cut.
        """
        listener = self.make_listener(max_payload=2048)
        pending = self.expect(KERNEL_ID, listener)
        big = encode_v2(dict(INFO, padding="x" * 4000), listener.public_key, KERNEL_ID, pending.token)
        self.assertEqual(await self.send(big, listener), b"")
        [line] = self.refusals()
        self.assertIn("larger than 2048 bytes", line)
        self.assertFalse(pending.received.called)
        await self.assert_still_serving(listener)

    async def test_v1_disabled(self) -> None:
        """
        By default (the operator has not turned version 1 on) a version 1
        payload is refused, even for a launch that would allow it, while
        version 2 still works.
        """
        listener = self.listener
        pending = self.expect(KERNEL_ID, listener, accept_v1=True, hosts=["127.0.0.1"])
        self.assertFalse(pending.accept_v1)
        self.assertEqual(await self.send(encode_v1(INFO, listener.public_key), listener), b"ERROR refused\n")
        self.assertIn("version 1 payloads are disabled", self.refusals()[0])
        self.assertFalse(pending.received.called)
        await self.assert_still_serving(listener)

    async def test_v1_refused_for_egateway_launcher(self) -> None:
        """
        With version 1 turned on, a launch that does not allow it (the
        kernelspec runs egateway's launcher) refuses a forged version 1
        payload, even from its own host, and its genuine version 2 payload
        then delivers rather than being refused as a replay.
        """
        listener = self.make_listener(accept_v1=True)
        pending = self.expect(KERNEL_ID, listener, hosts=["127.0.0.1"])
        forged = dict(INFO, shell_port=1, iopub_port=2, stdin_port=3, control_port=4, hb_port=5)
        self.assertEqual(await self.send(encode_v1(forged, listener.public_key), listener), b"ERROR refused\n")
        self.assertIn("must use version 2", self.refusals()[0])
        genuine = encode_v2(INFO, listener.public_key, KERNEL_ID, pending.token)
        self.assertEqual(await self.send(genuine, listener), b"OK\n")
        self.assertEqual(await pending.received, INFO)
        self.assertEqual(pending.version, 2)

    async def test_v1_only_from_the_placement_host(self) -> None:
        """
        A launch allowing version 1 takes it only from the address of the
        host the kernel was placed on; from anywhere else it is refused
        without using up the launch.
        """
        listener, pending = self.legacy(hosts=["192.0.2.7"])
        self.assertEqual(await self.send(encode_v1(INFO, listener.public_key), listener), b"ERROR refused\n")
        self.assertIn("does not come from its host (192.0.2.7)", self.refusals()[0])
        self.assertFalse(pending.received.called)
        pending.expect_from(["::ffff:127.0.0.1"])
        self.assertEqual(await self.send(encode_v1(INFO, listener.public_key), listener), b"OK\n")
        self.assertEqual(await pending.received, INFO)

    async def test_v1_held_until_placement(self) -> None:
        """
        A version 1 payload that arrives before the kernel's placement is
        known waits, unanswered, until it is: then the first from the
        placement host delivers and the others are refused.
        """
        listener = self.make_listener(accept_v1=True)
        pending = self.expect(KERNEL_ID, listener, accept_v1=True)
        first = Deferred.fromCoroutine(self.send(encode_v1(INFO, listener.public_key), listener))
        second = Deferred.fromCoroutine(
            self.send(encode_v1(dict(INFO, shell_port=1), listener.public_key), listener)
        )
        await eventually(lambda: len(pending._held) == 2, "both payloads to be held", timeout=10)
        self.assertFalse(pending.received.called)
        pending.expect_from(["127.0.0.1"])
        self.assertEqual(await first, b"OK\n")
        self.assertEqual(await second, b"ERROR refused\n")
        self.assertEqual(await pending.received, INFO)
        self.assertIn("already delivered", self.refusals()[0])

    async def test_v1_held_then_placed_elsewhere_or_cancelled(self) -> None:
        """
        A held version 1 payload is refused when the kernel turns out to
        run elsewhere, or when its launch ends first.
        """
        listener = self.make_listener(accept_v1=True)
        pending = self.expect(KERNEL_ID, listener, accept_v1=True)
        held = Deferred.fromCoroutine(self.send(encode_v1(INFO, listener.public_key), listener))
        await eventually(lambda: pending._held, "the payload to be held", timeout=10)
        pending.expect_from(["192.0.2.7"])
        self.assertEqual(await held, b"ERROR refused\n")
        self.assertFalse(pending.received.called)
        other = self.expect("other-kernel", listener, accept_v1=True)
        held = Deferred.fromCoroutine(self.send(encode_v1(info_for("other-kernel"), listener.public_key), listener))
        await eventually(lambda: other._held, "the payload to be held", timeout=10)
        other.cancel()
        self.assertEqual(await held, b"ERROR refused\n")
        self.assertIn("ended before its placement was known", self.refusals()[-1])

    async def test_malformed_connection_info(self) -> None:
        """
        Authentic but unusable connection info (no ports) is refused.
        """
        pending = self.expect(KERNEL_ID)
        info = {"kernel_id": KERNEL_ID, "ip": "0.0.0.0"}
        payload = encode_v2(info, self.listener.public_key, KERNEL_ID, pending.token)
        self.assertEqual(await self.send(payload), b"ERROR refused\n")
        self.assertIn("lacks shell_port", self.refusals()[0])

    async def test_cancelled_launch(self) -> None:
        """
        After a launch is cancelled, its payload is refused as unknown and
        whoever was waiting has seen CancelledError.
        """
        pending = self.listener.expect(KERNEL_ID)
        waiting = observe(pending.received)
        pending.cancel()
        self.failureResultOf(waiting, CancelledError)
        payload = encode_v2(INFO, self.listener.public_key, KERNEL_ID, pending.token)
        self.assertEqual(await self.send(payload), b"ERROR refused\n")
        self.assertIn("no launch is waiting", self.refusals()[0])

    async def test_restart_replaces_launch(self) -> None:
        """
        Expecting a kernel again (a restart) retires the old token.
        """
        first = self.listener.expect(KERNEL_ID)
        waiting = observe(first.received)
        second = self.listener.expect(KERNEL_ID)
        self.failureResultOf(waiting, CancelledError)
        old = encode_v2(INFO, self.listener.public_key, KERNEL_ID, first.token)
        self.assertEqual(await self.send(old), b"ERROR refused\n")
        new = encode_v2(INFO, self.listener.public_key, KERNEL_ID, second.token)
        self.assertEqual(await self.send(new), b"OK\n")
        self.assertEqual(await second.received, INFO)


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict] = []
        self.patch(ResponseListener, "_log", Logger(observer=self.events.append))
        self.reactor = MemoryReactorClock()
        self.listener = ResponseListener(self.reactor, ip="127.0.0.1", port=0, keys=keys(), timeout=5, max_payload=1024)
        self.listener.startService()

    def connect(self) -> tuple[Any, StringTransport]:
        port, factory, backlog, interface = self.reactor.tcpServers[0]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_binds_configured_address(self) -> None:
        """
        The listener binds the configured interface, not every address.
        """
        port, _, backlog, interface = self.reactor.tcpServers[0]
        self.assertEqual((port, interface, backlog), (0, "127.0.0.1", 128))

    def test_bind_all_advertises_primary_address(self) -> None:
        """
        Bound to every address, the listener still advertises one that
        launchers can reach.
        """
        reactor = MemoryReactorClock()
        listener = ResponseListener(reactor, ip="0.0.0.0", port=0, keys=keys())
        listener.startService()
        self.assertEqual(reactor.tcpServers[0][3], "0.0.0.0")
        self.assertEqual(listener.advertised_ip, primary_ipv4())
        self.assertNotEqual(listener.advertised_ip, "0.0.0.0")

    def test_deadline(self) -> None:
        """
        A connection that never finishes its payload is cut at the deadline
        on the injected clock and logged.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"eyJ2ZXJz")
        self.reactor.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(0.2)
        self.assertTrue(transport.disconnecting)
        [event] = [e for e in self.events if e["log_format"].startswith("refused")]
        self.assertIn("no complete payload within 5s", formatEvent(event))

    def test_oversize_cut_early(self) -> None:
        """
        The connection is cut as soon as the limit is passed, without
        waiting for EOF.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"A" * 1000)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"A" * 100)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_verdict_after_eof(self) -> None:
        """
        At EOF the payload is judged and the verdict written back.
        """
        pending = self.listener.expect(KERNEL_ID)
        protocol, transport = self.connect()
        protocol.dataReceived(encode_v2(INFO, self.listener.public_key, KERNEL_ID, pending.token)[:1024])
        self.assertEqual(transport.value(), b"")
        protocol.readConnectionLost()
        self.assertEqual(transport.value(), b"ERROR refused\n")

    def test_stop_fails_waiting_launches(self) -> None:
        """
        Stopping the listener fails launches still waiting, with a message
        saying why, and stops listening.
        """
        pending = self.listener.expect(KERNEL_ID)
        self.listener.stopService()
        failure = self.failureResultOf(pending.received, LaunchError)
        self.assertIn("response listener stopped", str(failure.value))

    def test_from_config(self) -> None:
        """
        The settings reach the listener, Enterprise Gateway's variables
        among them.
        """
        config = build_config(
            environ={
                "EG_RESPONSE_IP": "127.0.0.1",
                "EG_RESPONSE_PORT": "9999",
                "EG_RESPONSE_ACCEPT_V1": "false",
                "EG_RESPONSE_MAX_PAYLOAD": "4096",
            }
        )
        listener = ResponseListener.from_config(self.reactor, config.response, keys())
        self.assertEqual(
            (listener.ip, listener._requested_port, listener.accept_v1, listener.max_payload),
            ("127.0.0.1", 9999, False, 4096),
        )
        defaults = build_config(environ={}).response
        self.assertEqual(
            (defaults.response_port, defaults.response_accept_v1, defaults.response_max_payload),
            (8877, False, 65536),
        )


class _RecordingListener:
    """
    Stands in for the listener when only the version accepted per launch matters.
    """

    def __init__(self, accept_v1: bool) -> None:
        self.accept_v1 = accept_v1
        self.expected: list[tuple[str, bool]] = []

    def expect(self, kernel_id: str, accept_v1: bool = False) -> str:
        self.expected.append((kernel_id, accept_v1))
        return kernel_id


class ExpectLaunchTests(SynchronousTestCase):
    """
    Which launches may answer in version 1: only kernelspecs that run
    Enterprise Gateway's launcher, and only while the operator allows it.
    """

    def spec(self, metadata: dict[str, Any]) -> Any:
        from egateway.kernels.specs import KernelSpec

        return KernelSpec(
            name="k", argv=("python",), display_name="k", language="python", resource_dir="/", metadata=metadata
        )

    def accepted(self, accept_v1: bool, metadata: dict[str, Any]) -> bool:
        from types import SimpleNamespace

        from egateway.clusters.remote import expect_launch

        listener = _RecordingListener(accept_v1)
        expect_launch(listener, SimpleNamespace(kernel_id=KERNEL_ID, spec=self.spec(metadata)))  # type: ignore[arg-type]
        [(kernel_id, v1)] = listener.expected
        return v1

    def test_unchanged_enterprise_gateway_kernelspec(self) -> None:
        """
        An Enterprise Gateway kernelspec copied unchanged takes version 1
        once the operator turns it on, and version 2 only otherwise.
        """
        jeg = {"process_proxy": {"class_name": "enterprise_gateway.services.processproxies.distributed.X"}}
        self.assertTrue(self.accepted(True, jeg))
        self.assertFalse(self.accepted(False, jeg))

    def test_egateway_launcher_never_takes_v1(self) -> None:
        """
        egateway's own kernelspecs, and Enterprise Gateway-form ones marked
        as running egateway's launcher, take version 2 only even with
        version 1 on.
        """
        self.assertFalse(self.accepted(True, {"egateway": {"launcher": "ssh", "config": {}}}))
        marked = {"process_proxy": {"class_name": "x", "config": {"kernel_launcher": "egateway"}}}
        self.assertFalse(self.accepted(True, marked))
        self.assertFalse(self.accepted(True, {}))

    def test_marked_enterprise_gateway_launcher_needs_v1(self) -> None:
        """
        A kernelspec marked as running Enterprise Gateway's launcher fails
        at once while version 1 is off.
        """
        marked = {"egateway": {"launcher": "ssh", "config": {"kernel_launcher": "enterprise-gateway"}}}
        self.assertTrue(self.accepted(True, marked))
        self.assertRaises(LaunchError, self.accepted, False, marked)
