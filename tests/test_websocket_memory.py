"""
The channels WebSocket driven in memory, frame by frame: the gateway's HTTP
front serves a connection over a C{StringTransport}, the route upgrades it,
and the test writes the handshake and client frames as bytes and reads back
the bytes a client would receive.  The kernel behind it is a fake one on
in-memory channels (L{tests.support.fakes}); Autobahn's timers run on the
test's clock.  test_integration drives the same path with real kernels over
real sockets.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import txaio
from jupyter_server.services.kernels.connection.base import deserialize_msg_from_ws_v1, serialize_msg_to_ws_v1
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from egateway.api.authenticators import build_authentication
from egateway.api.cors import CorsPolicy
from egateway.api.http import FrontResource
from egateway.api.websocket import ChannelsProtocol
from egateway.config import build_config
from egateway.tap import build_api
from tests.support.fakes import make_manager
from tests.support.stubapi import stub_call
from tests.test_tenancy import TenancyTestCase, as_user, run_now, token_of

V1 = "v1.kernel.websocket.jupyter.org"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
"""
RFC 6455's example key and the accept value it must be answered with.
"""
UNKNOWN = "0b5e3a0c-1d8e-4f55-9b9e-3f0e6c1a2b3c"

TEXT, BINARY, CLOSE = 0x1, 0x2, 0x8


def handshake(path: str, *protocols: str, origin: str | None = None, headers: dict[str, str] | None = None) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: gw.example",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY}",
        "Sec-WebSocket-Version: 13",
    ]
    if protocols:
        lines.append("Sec-WebSocket-Protocol: " + ", ".join(protocols))
    if origin is not None:
        lines.append(f"Origin: {origin}")
    lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def client_frame(opcode: int, payload: bytes) -> bytes:
    """
    One final frame as a client must send it: masked (with a fixed mask, so
    runs are repeatable).
    """
    mask = b"\x1f\x2e\x3d\x4c"
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """
    The frames in C{data} as C{(opcode, payload)}; each must be final and
    unmasked, as a server sends them.
    """
    frames = fragmented_server_frames(data)
    assert all(fin for fin, _, _ in frames), frames
    return [(opcode, payload) for _, opcode, payload in frames]


def fragmented_server_frames(data: bytes) -> list[tuple[bool, int, bytes]]:
    """
    The unmasked frames in C{data} as C{(FIN, opcode, payload)}.
    """
    frames, at = [], 0
    while at < len(data):
        first, second = data[at], data[at + 1]
        at += 2
        assert not second & 0x80, (first, second)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack_from("!H", data, at)
            at += 2
        elif length == 127:
            (length,) = struct.unpack_from("!Q", data, at)
            at += 8
        frames.append((bool(first & 0x80), first & 0x0F, data[at : at + length]))
        at += length
    assert at == len(data)
    return frames


def http_response(data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """
    The status, headers (lower-cased names) and body of one HTTP response
    (its body de-chunked where it was chunked).
    """
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding") == b"chunked":
        chunks, rest = [], body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            chunks.append(rest[:size])
            rest = rest[size + 2 :]
        body = b"".join(chunks)
    return int(status_line.split()[1]), headers, body


def kernel_message(msg_type: str, msg_id: str, content: dict[str, Any]) -> dict[str, Any]:
    return {
        "header": {
            "msg_id": msg_id,
            "msg_type": msg_type,
            "session": "client-session",
            "username": "tester",
            "date": "2026-01-01T00:00:00.000000Z",
            "version": "5.3",
        },
        "parent_header": {},
        "metadata": {},
        "content": content,
    }


def v1_frame_parts(message: dict[str, Any]) -> list[bytes]:
    return [json.dumps(message[key]).encode() for key in ("header", "parent_header", "metadata", "content")]


def assert_refused(
    case: SynchronousTestCase,
    site: Site,
    path: str,
    status: int,
    text: str,
    origin: str | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    """
    A handshake at C{path} is answered, before any upgrade, with C{status}
    and a JSON error whose message contains C{text}.
    """
    wire = Wire(site)
    wire.send(handshake(path, origin=origin, headers=headers))
    code, answer, body = wire.handshake_answer()
    case.assertEqual(code, status, body)
    case.assertEqual(answer[b"content-type"], b"application/json")
    error = json.loads(body)
    case.assertEqual(set(error), {"reason", "message"})
    case.assertIn(text, error["message"])
    case.assertNotIsInstance(wire.protocol, ChannelsProtocol)


class Wire:
    """
    One in-memory TCP connection to the gateway: what the client writes goes
    to the protocol holding the transport (Twisted's HTTP channel, then,
    after the upgrade, the WebSocket), as a socket would deliver it.
    """

    def __init__(self, site: Site) -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        http = site.buildProtocol(self.transport.getPeer())
        self.transport.protocol = http
        http.makeConnection(self.transport)
        self._unread = b""

    @property
    def protocol(self) -> Any:
        return self.transport.protocol

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def received(self) -> bytes:
        """
        What the gateway wrote since the last call.
        """
        data = self._unread + self.transport.value()
        self._unread = b""
        self.transport.clear()
        return data

    def handshake_answer(self) -> tuple[int, dict[bytes, bytes], bytes]:
        """
        The HTTP answer to the handshake; any frames written after a 101 are
        left for L{received}.
        """
        data = self.received()
        if data.startswith(b"HTTP/1.1 101 "):
            head, _, self._unread = data.partition(b"\r\n\r\n")
            return http_response(head + b"\r\n\r\n")
        return http_response(data)

    def lose(self) -> None:
        """
        The TCP connection ends (after the gateway closed it, or the client
        went away).
        """
        self.protocol.connectionLost(Failure(ConnectionDone()))


def upgrade(
    case: SynchronousTestCase, site: Site, path: str, *protocols: str, headers: dict[str, str] | None = None
) -> Wire:
    """
    An open WebSocket at C{path}: the handshake answered with 101, choosing
    the first of C{protocols}.
    """
    wire = Wire(site)
    wire.send(handshake(path, *protocols, headers=headers))
    status, answer, body = wire.handshake_answer()
    case.assertEqual(status, 101, body)
    case.assertEqual(answer[b"sec-websocket-accept"], ACCEPT)
    case.assertEqual(answer.get(b"sec-websocket-protocol"), protocols[0].encode() if protocols else None)
    case.assertIsInstance(wire.protocol, ChannelsProtocol)
    return wire


class MemoryCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        # Autobahn's timers (the opening handshake's timeout...) on the
        # test's clock, not the global reactor.
        self.patch(txaio.config, "loop", self.clock)
        config = build_config({}, {}, {"allowed-hosts": "gw.example"})
        self.manager, self.launcher, self.fake_channels = make_manager(self.clock)
        self.api, front = build_api(config, self.manager, self.clock, ThreadPool())
        self.stub = StubTreq(front)
        self.site = Site(front, reactor=self.clock)
        code, model, _ = stub_call(self, self.stub, self.clock, "POST", "/api/kernels")
        self.assertEqual(code, 201, model)
        self.kernel_id = model["id"]
        self.kernel = self.manager.kernels[self.kernel_id]
        self.kernel_side = self.launcher.processes[-1].server

    def connect(self, query: str = "", *protocols: str) -> Wire:
        return upgrade(self, self.site, f"/api/kernels/{self.kernel_id}/channels{query}", *protocols)

    def received_by_kernel(self, msg_type: str) -> list[tuple[str, Any]]:
        return [(channel, m) for channel, m in self.kernel_side.received if m.msg_type == msg_type]


class Relay(MemoryCase):
    def test_legacy_frames(self) -> None:
        """
        A legacy JSON text frame from the client reaches the kernel on its
        channel; the kernel's replies, and a message it publishes, come back
        as JSON text frames naming their channel and parent.
        """
        wire = self.connect("?session_id=s-1")
        message = {**kernel_message("execute_request", "m-1", {"code": "1 + 1"}), "channel": "shell"}
        wire.send(client_frame(TEXT, json.dumps(message).encode()))

        [(channel, request)] = self.received_by_kernel("execute_request")
        self.assertEqual((channel, request.header["msg_id"], request.content()["code"]), ("shell", "m-1", "1 + 1"))
        frames = server_frames(wire.received())
        self.assertEqual({opcode for opcode, _ in frames}, {TEXT})
        replies = [json.loads(payload) for _, payload in frames]
        self.assertEqual(
            [(r["channel"], r["header"]["msg_type"], r["parent_header"]["msg_id"]) for r in replies],
            [("iopub", "status", "m-1"), ("shell", "execute_reply", "m-1"), ("iopub", "status", "m-1")],
        )

        self.kernel_side.publish("stream", {"name": "stdout", "text": "hello"})
        [(opcode, payload)] = server_frames(wire.received())
        stream = json.loads(payload)
        self.assertEqual((opcode, stream["channel"], stream["msg_type"]), (TEXT, "iopub", "stream"))
        self.assertEqual(stream["content"], {"name": "stdout", "text": "hello"})

    def test_v1_frames(self) -> None:
        """
        With C{v1.kernel.websocket.jupyter.org} offered, the handshake
        chooses it; a binary frame as jupyter_server encodes it reaches the
        kernel, and the replies are binary frames jupyter_server decodes.
        """
        wire = self.connect("?session_id=s-2", V1)
        message = kernel_message("execute_request", "m-2", {"code": "2 + 2"})
        wire.send(client_frame(BINARY, serialize_msg_to_ws_v1(v1_frame_parts(message), "shell")))

        [(channel, request)] = self.received_by_kernel("execute_request")
        self.assertEqual((channel, request.header["msg_id"], request.content()["code"]), ("shell", "m-2", "2 + 2"))
        frames = server_frames(wire.received())
        self.assertEqual({opcode for opcode, _ in frames}, {BINARY})
        replies = []
        for _, payload in frames:
            channel, parts = deserialize_msg_from_ws_v1(payload)
            header, parent = json.loads(parts[0]), json.loads(parts[1])
            replies.append((channel, header["msg_type"], parent["msg_id"]))
        self.assertEqual(
            replies, [("iopub", "status", "m-2"), ("shell", "execute_reply", "m-2"), ("iopub", "status", "m-2")]
        )

    def test_client_close_parks_session(self) -> None:
        """
        A close frame from the client is answered with a close frame; when
        the connection ends, its session is parked (kept, with no client),
        and what the kernel says meanwhile is replayed to the client that
        resumes it.
        """
        wire = self.connect("?session_id=s-3")
        wire.send(client_frame(CLOSE, struct.pack("!H", 1000)))
        [(opcode, payload)] = server_frames(wire.received())
        self.assertEqual((opcode, struct.unpack("!H", payload[:2])[0]), (CLOSE, 1000))
        wire.lose()

        session = self.kernel.sessions["s-3"]
        self.assertIsNone(session.client)
        self.assertEqual(session.parked_at, self.clock.seconds())
        self.assertEqual(self.api.channels.connections, {})

        self.kernel_side.publish("stream", {"name": "stdout", "text": "while away"})
        again = self.connect("?session_id=s-3&resume_after=0")
        texts = [json.loads(p)["content"].get("text") for _, p in server_frames(again.received())]
        self.assertIn("while away", texts)


class RouteDecides(MemoryCase):
    def test_kernel_looked_up_once(self) -> None:
        """
        The route finds the kernel once per connection; neither the upgrade
        nor the WebSocket looks it up again.
        """
        lookups: list[str] = []
        for name in ("get", "find"):
            original = getattr(self.manager, name)

            def counted(kernel_id: str, _name: str = name, _original: Any = original) -> Any:
                lookups.append(_name)
                return _original(kernel_id)

            self.patch(self.manager, name, counted)
        wire = self.connect("?session_id=s-4", V1)
        self.assertEqual(lookups, ["find"])
        self.assertIs(wire.protocol.kernel, self.kernel)
        self.assertEqual((wire.protocol.session_id, wire.protocol.v1), ("s-4", True))

    def test_v1_among_other_offers(self) -> None:
        """
        The v1 protocol is chosen wherever the client lists it, in one
        C{Sec-WebSocket-Protocol} header or across several, as Autobahn
        reads the offer (a choice it did not read there fails the
        handshake).
        """
        path = f"/api/kernels/{self.kernel_id}/channels"
        for offers, chosen in (([f"chat, {V1}"], V1), ([f" {V1} ", "chat"], V1), (["chat"], None)):
            wire = Wire(self.site)
            lines = "".join(f"Sec-WebSocket-Protocol: {offer}\r\n" for offer in offers)
            wire.send(handshake(path)[:-2] + lines.encode() + b"\r\n")
            status, answer, body = wire.handshake_answer()
            self.assertEqual(status, 101, body)
            self.assertEqual(answer.get(b"sec-websocket-protocol"), chosen.encode() if chosen else None)
            self.assertEqual(wire.protocol.v1, chosen == V1)

    def test_options_copied_without_formatting_them(self) -> None:
        """
        A connection gets the factory's options, as Autobahn copies them,
        without Autobahn's C{pformat} of them all for a debug line that is
        never written (a third of the reactor's time per handshake at 1,000
        connections, bench/scale.py).
        """
        import autobahn.websocket.protocol

        formatted: list[Any] = []
        original = autobahn.websocket.protocol.pformat
        self.patch(autobahn.websocket.protocol, "pformat", lambda o: formatted.append(o) or original(o))
        wire = self.connect("?session_id=s-5")
        self.assertEqual([o for o in formatted if o], [])
        protocol = wire.protocol
        for name in autobahn.websocket.protocol.WebSocketServerProtocol.CONFIG_ATTRS:
            self.assertEqual(getattr(protocol, name), getattr(protocol.factory, name), name)
        self.assertFalse(protocol.failByDrop)

    def assertRefused(self, path: str, status: int, text: str, origin: str | None = None) -> None:
        assert_refused(self, self.site, path, status, text, origin=origin)

    def test_refusals_before_upgrade(self) -> None:
        """
        An unknown kernel, a bad query, an over-long session_id and a
        foreign origin are answered by the route with their HTTP status and
        a JSON error, and the connection is never upgraded.
        """
        channels = f"/api/kernels/{self.kernel_id}/channels"
        self.assertRefused(f"/api/kernels/{UNKNOWN}/channels", 404, UNKNOWN)
        self.assertRefused(channels + "?resume_after=soon", 400, "resume_after")
        self.assertRefused(channels + "?session_id=" + "s" * 129, 400, "session_id")
        self.assertRefused(channels, 403, "origin", origin="http://elsewhere.example")


class SharedKernel(TenancyTestCase):
    """
    Per-user tokens: who opened a connection is what the route decided, and
    the endpoint's access checks close the connection it serves.
    """

    def setUp(self) -> None:
        super().setUp()
        self.patch(txaio.config, "loop", self.clock)
        authentication = build_authentication(self.config.auth, self.clock, None, blocking=run_now)
        front = FrontResource(self.api.resource(), authentication, CorsPolicy(self.config.auth))
        self.site = Site(front, reactor=self.clock)

    def test_unshared_connection_closed(self) -> None:
        """
        Bob connects to a kernel alice shares with him, as himself; a user
        it is not shared with is refused before the upgrade; when alice
        stops sharing, bob's WebSocket is closed with 4003 saying why, and
        his session is dropped.
        """
        kid = self.start("alice")["id"]
        self.call("PUT", f"/api/kernels/{kid}/acl", {"users": ["bob"]}, "alice")
        path = f"/api/kernels/{kid}/channels?session_id=b-1"
        wire = upgrade(self, self.site, path, headers=as_user("bob"))
        self.assertEqual((wire.protocol.identity.username, wire.protocol.token), ("bob", token_of("bob")))
        assert_refused(self, self.site, path, 404, kid, headers=as_user("erin"))

        self.call("PUT", f"/api/kernels/{kid}/acl", {"users": []}, "alice")
        [(opcode, payload)] = server_frames(wire.received())
        self.assertEqual(
            (opcode, struct.unpack("!H", payload[:2])[0], payload[2:].decode()),
            (CLOSE, 4003, f"access to kernel {kid} was revoked"),
        )
        self.assertNotIn("b-1", self.manager.kernels[kid].sessions)
