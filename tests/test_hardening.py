"""
Hardening of the listener, against an in-process gateway with real kernels:
the request body limit, the WebSocket message limit, the WebSocket Origin
check, and the absence of version banners.

Responses are read as raw bytes where headers matter: an HTTP client library
would hide what the gateway actually sent (and Autobahn writes the WebSocket
101 itself, outside Twisted's request).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from tests.support.daemon import _bounded
from tests.support.gateway import GatewayTestCase
from tests.support.wsclient import ChannelsClient

TOKEN = "hardening-t0ken-Pw7x"
LIMIT = 1024
"""
The body and WebSocket message limits the gateways here run with (the
smallest the configuration allows).
"""
WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


class RawReply:
    """
    What came back on a connection: the status line, the headers as raw
    lines and as a lower-cased dict, and the body.
    """

    def __init__(self, data: bytes) -> None:
        self.raw = data
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.status_line = lines[0]
        self.code = int(lines[0].split()[1]) if len(lines[0].split()) > 1 else 0
        self.header_lines = lines[1:]
        self.headers = {}
        for line in self.header_lines:
            name, _, value = line.partition(b":")
            self.headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        self.body = _dechunk(body) if self.headers.get("transfer-encoding") == "chunked" else body

    def json(self) -> Any:
        return json.loads(self.body)


def _dechunk(data: bytes) -> bytes:
    body = b""
    while data:
        size, _, rest = data.partition(b"\r\n")
        length = int(size.split(b";")[0], 16)
        if length == 0:
            break
        body, data = body + rest[:length], rest[length + 2 :]
    return body


def _complete(data: bytes) -> bool:
    """
    Whether C{data} holds a whole response: a 101's headers, or headers
    and as much body as C{Content-Length} says.
    """
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    reply = RawReply(head + b"\r\n\r\n")
    if reply.code == 101:
        return True
    length = reply.headers.get("content-length")
    if length is not None:
        return len(body) >= int(length)
    return body.endswith(b"0\r\n\r\n")  # chunked


class _RawClient(Protocol):
    def __init__(self, complete: Callable[[bytes], bool]) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()
        self._complete = complete

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if not self.done.called and self._complete(self.data):
            self.done.callback(self.data)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        if not self.done.called:
            self.done.callback(self.data)


async def raw_exchange(port: int, request: bytes, timeout: float = 15) -> RawReply:
    """
    Send C{request} as is to the gateway on loopback C{port} and read one
    response; the connection is closed afterwards (a WebSocket right after
    its 101).
    """
    client = _RawClient(_complete)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=timeout)
    proto = await connectProtocol(endpoint, client)
    proto.transport.write(request)
    try:
        data = await _bounded(client.done, timeout, reactor)
    finally:
        proto.transport.loseConnection()
    return RawReply(data)


class RawTestCase(GatewayTestCase):
    gateway_settings = {"auth_token": TOKEN, "max_request_body": LIMIT, "max_ws_message": LIMIT}

    @property
    def port(self) -> int:
        return int(self.gateway.url.split(":")[2].split("/")[0])

    def http(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
             token: str | None = TOKEN) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}"]
        if token:
            lines.append(f"Authorization: token {token}")
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if body and "Transfer-Encoding" not in (headers or {}):
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def upgrade(self, kernel_id: str, origin: str | None = None, token: str | None = TOKEN) -> bytes:
        headers = {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": WS_KEY,
            "Sec-WebSocket-Version": "13",
        }
        if origin is not None:
            headers["Origin"] = origin
        return self.http("GET", f"/api/kernels/{kernel_id}/channels?session_id=s1", headers=headers, token=token)

    async def until_disconnected(self, kernel_id: str, timeout: float = 10) -> None:
        """
        Wait until the gateway has seen every WebSocket to C{kernel_id} go
        (a raw client drops its side right after the 101), so no close
        handshake is left running when the test stops the gateway.
        """
        kernel = self.gateway.manager.kernels[kernel_id]
        deadline = reactor.seconds() + timeout
        while kernel.connections:
            self.assertLess(reactor.seconds(), deadline, "the gateway never saw the WebSocket close")
            await deferLater(reactor, 0.02, lambda: None)

    def assertJSONError(self, reply: RawReply, status: int, text: str = "") -> None:
        self.assertEqual(reply.code, status, reply.raw[:500])
        self.assertEqual(reply.headers.get("content-type"), "application/json")
        body = reply.json()
        self.assertEqual(set(body), {"reason", "message"})
        self.assertIn(text, body["message"])


class BodyLimit(RawTestCase):
    async def test_declared_length_over_limit(self) -> None:
        """
        A body whose Content-Length exceeds max_request_body is refused with
        a JSON 413, and nothing is started.
        """
        body = json.dumps({"name": "python3", "pad": "x" * LIMIT}).encode()
        reply = await raw_exchange(self.port, self.http("POST", "/api/kernels", body))
        self.assertJSONError(reply, 413, "size limit")
        self.assertEqual(self.gateway.manager.kernels, {})

    async def test_chunked_body_over_limit(self) -> None:
        """
        A chunked body that grows past max_request_body is refused with a
        JSON 413 too: the limit does not depend on a declared length.
        """
        chunk = b"x" * 600
        encoded = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3)) + b"0\r\n\r\n"
        request = self.http("POST", "/api/kernels", encoded, headers={"Transfer-Encoding": "chunked"})
        self.assertJSONError(await raw_exchange(self.port, request), 413)
        self.assertEqual(self.gateway.manager.kernels, {})

    async def test_body_within_limit(self) -> None:
        """
        A body just under the limit is read and judged on its content (here
        an unknown kernelspec, 404), so the limit is not off by much.
        """
        body = json.dumps({"name": "nope", "pad": "x" * (LIMIT - 40)}).encode()
        self.assertLessEqual(len(body), LIMIT)
        reply = await raw_exchange(self.port, self.http("POST", "/api/kernels", body))
        self.assertJSONError(reply, 404, "nope")


class NoBanner(RawTestCase):
    async def test_rest_responses(self) -> None:
        """
        No REST response names the server software: successes, refusals and
        errors alike carry no Server header.
        """
        requests = {
            200: self.http("GET", "/api"),
            204: self.http("OPTIONS", "/api/kernels", token=None),
            400: self.http("POST", "/api/kernels", b"{not json"),
            401: self.http("GET", "/api/kernelspecs", token=None),
            404: self.http("GET", "/no/such/thing"),
            405: self.http("PUT", "/api/kernels"),
            413: self.http("POST", "/api/kernels", b"x" * (LIMIT + 1)),
        }
        for status, request in requests.items():
            reply = await raw_exchange(self.port, request)
            self.assertEqual(reply.code, status, reply.raw[:300])
            self.assertNotIn("server", reply.headers, reply.raw[:300])
            self.assertNotIn(b"twisted", reply.raw.lower())

    async def test_websocket_upgrade(self) -> None:
        """
        The WebSocket 101 response carries no Server header (Autobahn writes
        one unless told not to).
        """
        model = await self.gateway.start_kernel(token=TOKEN)
        reply = await raw_exchange(self.port, self.upgrade(model["id"]))
        self.assertEqual(reply.code, 101, reply.raw[:300])
        self.assertNotIn("server", reply.headers, reply.raw[:300])
        self.assertNotIn(b"autobahn", reply.raw.lower())
        await self.until_disconnected(model["id"])


class WebSocketMessageLimit(RawTestCase):
    async def test_oversized_message_closes_with_1009(self) -> None:
        """
        A client message larger than max_ws_message closes that connection
        with 1009; the kernel and the gateway keep serving other clients.
        """
        model = await self.gateway.start_kernel(token=TOKEN)
        for v1 in (False, True):
            client = await ChannelsClient.connect(self.gateway.url, model["id"], v1=v1, token=TOKEN)
            client._proto.sendMessage(b"x" * (LIMIT * 4), isBinary=True)
            await _bounded(client.closed, 15, reactor)
            self.assertEqual(client.close_code, 1009, client.close_reason)

        client = await ChannelsClient.connect(self.gateway.url, model["id"], token=TOKEN)
        result = await client.execute("print(6 * 7)")
        self.assertEqual(result["stdout"], "42\n")
        await client.close()
        code, body = await self.gateway.request("GET", f"api/kernels/{model['id']}", token=TOKEN)
        self.assertEqual((code, body["execution_state"] != "dead"), (200, True))


class OriginCheck(RawTestCase):
    async def test_foreign_origin_refused(self) -> None:
        """
        A WebSocket from a foreign Origin is refused with a JSON 403 before
        the upgrade; the gateway's own origin and no Origin (non-browser
        clients) are upgraded.
        """
        model = await self.gateway.start_kernel(token=TOKEN)
        reply = await raw_exchange(self.port, self.upgrade(model["id"], "https://evil.example"))
        self.assertJSONError(reply, 403, "allow_origin")
        self.assertNotIn("upgrade", reply.headers)
        self.assertNotIn("sec-websocket-accept", reply.headers)
        for origin in (None, f"http://127.0.0.1:{self.port}"):
            reply = await raw_exchange(self.port, self.upgrade(model["id"], origin))
            self.assertEqual(reply.code, 101, (origin, reply.raw[:300]))
            await self.until_disconnected(model["id"])
        # Without credentials it is refused too, and never upgraded.
        reply = await raw_exchange(self.port, self.upgrade(model["id"], "https://evil.example", token=None))
        self.assertJSONError(reply, 401)


class AllowedOrigin(RawTestCase):
    gateway_settings = {**RawTestCase.gateway_settings, "allow_origin": "https://notebooks.example"}

    async def test_allow_origin_admits_it(self) -> None:
        """
        The origin named in allow_origin is upgraded; any other foreign one
        is still refused with 403.
        """
        model = await self.gateway.start_kernel(token=TOKEN)
        reply = await raw_exchange(self.port, self.upgrade(model["id"], "https://notebooks.example"))
        self.assertEqual(reply.code, 101, reply.raw[:300])
        await self.until_disconnected(model["id"])
        reply = await raw_exchange(self.port, self.upgrade(model["id"], "https://evil.example"))
        self.assertJSONError(reply, 403)


class AnyOrigin(RawTestCase):
    gateway_settings = {**RawTestCase.gateway_settings, "allow_origin": "*"}

    async def test_star_admits_any(self) -> None:
        """
        allow_origin '*' admits a WebSocket from any origin.
        """
        model = await self.gateway.start_kernel(token=TOKEN)
        reply = await raw_exchange(self.port, self.upgrade(model["id"], "https://anywhere.example"))
        self.assertEqual(reply.code, 101, reply.raw[:300])
        await self.until_disconnected(model["id"])


def named(host: str, method: str, path: str, headers: dict[str, str] | None = None) -> bytes:
    """
    A request without credentials whose Host header is C{host}.
    """
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Content-Length: 0"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class DnsRebinding(RawTestCase):
    # No authentication: what a DNS rebinding page goes after.
    gateway_settings = {"max_request_body": LIMIT, "max_ws_message": LIMIT}

    async def test_foreign_host_refused(self) -> None:
        """
        Without authentication, a request naming another host (a page at
        evil.example rebound to 127.0.0.1, its own origin as far as the
        browser knows) is a JSON 403 on every path, WebSockets included,
        and starts nothing; loopback names and addresses are served.
        """
        model = await self.gateway.start_kernel()
        evil = f"evil.example:{self.port}"
        for method, path in (("GET", "/api/kernels"), ("POST", "/api/kernels"), ("GET", "/api")):
            reply = await raw_exchange(self.port, named(evil, method, path, {"Origin": f"http://{evil}"}))
            self.assertJSONError(reply, 403, "allowed_hosts")
        upgrade = {
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": WS_KEY,
            "Sec-WebSocket-Version": "13", "Origin": f"http://{evil}",
        }
        reply = await raw_exchange(
            self.port, named(evil, "GET", f"/api/kernels/{model['id']}/channels?session_id=s1", upgrade)
        )
        self.assertJSONError(reply, 403, "allowed_hosts")
        self.assertNotIn("sec-websocket-accept", reply.headers)
        self.assertEqual(list(self.gateway.manager.kernels), [model["id"]])
        for host in (f"127.0.0.1:{self.port}", f"localhost:{self.port}", "[::1]", "LOCALHOST."):
            reply = await raw_exchange(self.port, named(host, "GET", "/api"))
            self.assertEqual(reply.code, 200, (host, reply.raw[:300]))


class AllowedHosts(RawTestCase):
    gateway_settings = {**DnsRebinding.gateway_settings, "allowed_hosts": "gw.example,.lab.example"}

    async def test_allowed_hosts(self) -> None:
        """
        Names in allowed_hosts (a leading dot: any name under it) are
        served; others are still refused.
        """
        for host, code in (("gw.example", 200), ("n1.lab.example:8888", 200), ("lab.example.evil", 403)):
            reply = await raw_exchange(self.port, named(host, "GET", "/api"))
            self.assertEqual(reply.code, code, (host, reply.raw[:300]))

