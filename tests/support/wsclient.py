"""
A small Jupyter kernel-channels client on Autobahn's Twisted WebSocket
client, for integration tests that run in trial's reactor.

It speaks both encodings (legacy JSON and v1 binary), keeps every message it
receives, and lets a test wait, with a bound, for the message it expects.
"""

from __future__ import annotations

import json
import struct
import uuid
from typing import Any, Callable
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS

V1 = "v1.kernel.websocket.jupyter.org"

Predicate = Callable[[dict[str, Any]], bool]


def decode_v1(payload: bytes) -> dict[str, Any]:
    (count,) = struct.unpack("<Q", payload[:8])
    offsets = struct.unpack(f"<{count}Q", payload[8 : 8 * (count + 1)])
    parts = [payload[a:b] for a, b in zip(offsets, offsets[1:])]
    header, parent, metadata, content = (json.loads(p) for p in parts[1:5])
    return {
        "channel": parts[0].decode(),
        "header": header,
        "parent_header": parent,
        "metadata": metadata,
        "content": content,
        "buffers": parts[5:],
        "msg_type": header.get("msg_type"),
        "egateway_seq": metadata.get("egateway_seq", 0),
    }


def encode_v1(channel: str, msg: dict[str, Any]) -> bytes:
    parts = [channel.encode()] + [
        json.dumps(msg[k]).encode() for k in ("header", "parent_header", "metadata", "content")
    ]
    count = len(parts) + 1
    offsets = [8 * (count + 1)]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    return struct.pack(f"<{count + 1}Q", count, *offsets) + b"".join(parts)


def decode_legacy(payload: bytes, binary: bool) -> dict[str, Any]:
    if not binary:
        return json.loads(payload)
    (count,) = struct.unpack("!I", payload[:4])
    offsets = list(struct.unpack(f"!{count}I", payload[4 : 4 * (count + 1)])) + [len(payload)]
    pieces = [payload[a:b] for a, b in zip(offsets, offsets[1:])]
    msg = json.loads(pieces[0])
    msg["buffers"] = pieces[1:]
    return msg


class _Protocol(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.client._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        client = self.factory.client
        if client.v1:
            msg = decode_v1(payload)
        else:
            msg = decode_legacy(payload, isBinary)
        client._received(msg)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.client._closed_with(code, reason)


class ChannelsClient:
    """
    @ivar messages: every message received, in order.
    """

    def __init__(self, v1: bool = False) -> None:
        self.v1 = v1
        self.session = uuid.uuid4().hex
        self.messages: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.closed: Deferred[None] = Deferred()
        self._opened_d: Deferred[ChannelsClient] = Deferred()
        self._waiters: list[tuple[Predicate, Deferred[dict[str, Any]], int]] = []
        self._proto: _Protocol | None = None

    @classmethod
    async def connect(
        cls,
        base_url: str,
        kernel_id: str,
        v1: bool = False,
        token: str | None = None,
        session_id: str | None = None,
        timeout: float = 15,
        resume_after: int | None = None,
        client_tls: Any = None,
    ) -> "ChannelsClient":
        """
        @param client_tls: TLS client options (C{optionsForClientTLS}) to
            connect with C{wss://}; C{None} for C{ws://}.
        """
        client = cls(v1)
        if session_id:
            client.session = session_id
        parts = urlsplit(base_url)
        scheme = "wss" if client_tls is not None else "ws"
        url = f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}/api/kernels/{kernel_id}/channels?session_id={client.session}"
        if resume_after is not None:
            url += f"&resume_after={resume_after}"
        headers = {"Authorization": f"token {token}"} if token else {}
        factory = WebSocketClientFactory(url, protocols=[V1] if v1 else [], headers=headers)
        # The whole connect is bounded by C{timeout}, the opening handshake
        # included (Autobahn's own default gives up on it after 5 s: a
        # gateway attaching to a busy kernel on demand answers later).
        factory.setProtocolOptions(maxMessagePayloadSize=0, maxFramePayloadSize=0, openHandshakeTimeout=timeout)
        factory.protocol = _Protocol
        factory.client = client
        endpoint = TCP4ClientEndpoint(reactor, parts.hostname, parts.port, timeout=timeout)
        if client_tls is not None:
            endpoint = wrapClientTLS(client_tls, endpoint)
        await endpoint.connect(factory)
        opened = client._opened_d
        opened.addTimeout(timeout, reactor)
        return await opened

    def _opened(self, proto: _Protocol) -> None:
        self._proto = proto
        self._opened_d.callback(self)

    def _closed_with(self, code: int | None, reason: str | None) -> None:
        self.close_code, self.close_reason = code, reason
        if not self._opened_d.called:
            self._opened_d.errback(ConnectionError(f"WebSocket refused: {code} {reason}"))
        if not self.closed.called:
            self.closed.callback(None)
        waiters, self._waiters = self._waiters, []
        for _, waiter, _ in waiters:
            if not waiter.called:
                waiter.errback(ConnectionError(f"WebSocket closed: {code} {reason}"))

    def _received(self, msg: dict[str, Any]) -> None:
        index = len(self.messages)
        self.messages.append(msg)
        for entry in list(self._waiters):
            predicate, waiter, start = entry
            if start <= index and predicate(msg):
                self._waiters.remove(entry)
                waiter.callback(msg)

    def send(
        self,
        msg_type: str,
        content: dict[str, Any],
        channel: str = "shell",
        parent: dict[str, Any] | None = None,
    ) -> str:
        msg_id = uuid.uuid4().hex
        msg = {
            "header": {
                "msg_id": msg_id,
                "msg_type": msg_type,
                "username": "test",
                "session": self.session,
                "date": "2026-01-01T00:00:00Z",
                "version": "5.3",
            },
            "parent_header": parent or {},
            "metadata": {},
            "content": content,
            "channel": channel,
            "buffers": [],
        }
        assert self._proto is not None
        if self.v1:
            self._proto.sendMessage(encode_v1(channel, msg), isBinary=True)
        else:
            self._proto.sendMessage(json.dumps(msg).encode(), isBinary=False)
        return msg_id

    def wait_for(self, predicate: Predicate, timeout: float = 20, since: int = 0) -> Deferred[dict[str, Any]]:
        """
        The first message (received at index C{since} or later) matching
        C{predicate}; fails with TimeoutError after C{timeout} seconds.
        """
        for msg in self.messages[since:]:
            if predicate(msg):
                d: Deferred[dict[str, Any]] = Deferred()
                d.callback(msg)
                return d
        entry: tuple[Predicate, Deferred[dict[str, Any]], int]

        def forget(result: Any) -> Any:
            if entry in self._waiters:
                self._waiters.remove(entry)
            return result

        waiter: Deferred[dict[str, Any]] = Deferred()
        entry = (predicate, waiter, since)
        self._waiters.append(entry)
        waiter.addTimeout(timeout, reactor)
        waiter.addErrback(forget)
        return waiter

    @property
    def last_seq(self) -> int:
        """
        The highest session number among the messages received.
        """
        return max((m.get("egateway_seq", 0) for m in self.messages), default=0)

    def drop(self) -> None:
        """
        Lose the connection abruptly (no close handshake), as a network
        failure would.
        """
        assert self._proto is not None
        self._proto.transport.abortConnection()

    def replies_to(self, msg_id: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("parent_header", {}).get("msg_id") == msg_id]

    async def execute(self, code: str, timeout: float = 30, allow_stdin: bool = False) -> dict[str, Any]:
        """
        Run C{code}; wait for its C{execute_reply} and iopub C{idle}.

        @return: C{{"reply": content, "stdout": text, "stderr": text,
            "result": data, "error": content or None, "msg_id": id}}.
        """
        since = len(self.messages)
        msg_id = self.request_execute(code, allow_stdin)
        mine = lambda m: m.get("parent_header", {}).get("msg_id") == msg_id  # noqa: E731
        reply = await self.wait_for(lambda m: mine(m) and m["msg_type"] == "execute_reply", timeout, since)
        await self.wait_for(
            lambda m: mine(m) and m["msg_type"] == "status" and m["content"]["execution_state"] == "idle",
            timeout,
            since,
        )
        outputs = [m for m in self.messages[since:] if mine(m) and m.get("channel") == "iopub"]

        def stream(name: str) -> str:
            return "".join(
                m["content"]["text"] for m in outputs if m["msg_type"] == "stream" and m["content"]["name"] == name
            )

        return {
            "msg_id": msg_id,
            "reply": reply["content"],
            "stdout": stream("stdout"),
            "stderr": stream("stderr"),
            "result": next(
                (m["content"]["data"] for m in outputs if m["msg_type"] == "execute_result"), None
            ),
            "error": next((m["content"] for m in outputs if m["msg_type"] == "error"), None),
        }

    def request_execute(self, code: str, allow_stdin: bool = False) -> str:
        """
        Send an C{execute_request} without waiting; returns its msg_id.
        """
        return self.send(
            "execute_request",
            {
                "code": code,
                "silent": False,
                "store_history": False,
                "user_expressions": {},
                "allow_stdin": allow_stdin,
            },
        )

    async def interrupted_sleep(
        self,
        interrupt: Callable[[], Any],
        timeout: float = 15,
        code: str = "import time; print('sleeping', flush=True); time.sleep(60)",
        noop: str = "pass",
    ) -> dict[str, Any]:
        """
        Start C{time.sleep(60)} (or C{code}, in another kernel's language,
        which prints C{sleeping} first), call C{interrupt} (which must interrupt the
        kernel, e.g. through the REST API) once the cell is running,
        and wait until the cell has ended and the kernel is idle again.

        @return: the cell's C{execute_reply} content.
        """
        since = len(self.messages)
        sleeper = self.request_execute(code)
        mine = lambda m: m.get("parent_header", {}).get("msg_id") == sleeper  # noqa: E731
        # Not "busy": ipykernel says busy before it installs its SIGINT
        # handler, and ignores an interrupt that comes in between.  The
        # cell's own output proves it runs.
        await self.wait_for(
            lambda m: mine(m) and m.get("msg_type") == "stream" and "sleeping" in m["content"]["text"],
            since=since,
        )
        await interrupt()
        reply = await self.wait_for(lambda m: mine(m) and m.get("msg_type") == "execute_reply", timeout, since)
        # Requests sent before the interrupted cell's idle may be aborted by
        # the kernel (stop_on_error), so wait for it.
        await self.wait_for(
            lambda m: mine(m) and m.get("msg_type") == "status" and m["content"]["execution_state"] == "idle",
            timeout,
            since,
        )
        await self.settle(noop=noop)
        return reply["content"]

    async def settle(self, attempts: int = 20, noop: str = "pass") -> None:
        """
        After an error, ipykernel aborts requests that arrive within a short
        window (longer on a loaded machine); run no-ops until one is
        answered normally, so the test's next request is not aborted.
        """
        for _ in range(attempts):
            result = await self.execute(noop)
            if result["reply"].get("status") == "ok":
                return
        raise AssertionError("the kernel kept aborting requests")

    async def close(self) -> None:
        if self._proto is not None and not self.closed.called:
            self._proto.sendClose(1000)
            d = Deferred()
            self.closed.addBoth(lambda r: d.callback(None) if not d.called else None)
            d.addTimeout(10, reactor)
            try:
                await d
            except Exception:
                self._proto.dropConnection(abort=True)
