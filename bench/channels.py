"""
The two kinds of channel client the benchmark drives, with one interface:
L{GatewayChannels} (the gateway's channels WebSocket, legacy JSON or v1
binary) and L{DirectChannels} (jupyter_client's sockets on the kernel).

Both do the same work per message a real client does: every message
received is parsed (JSON for the WebSocket; C{Session.deserialize}, which
checks the signature and parses the JSON parts, for ZMQ) and handed to one
L{Tracker}, which matches it to the request it answers by
C{parent_header.msg_id}.  A request is complete when its reply and its iopub
C{idle} status have both arrived.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

EXECUTE_CONTENT = {
    "silent": False,
    "store_history": False,
    "user_expressions": {},
    "allow_stdin": False,
    "stop_on_error": True,
}
V1_PROTOCOL = "v1.kernel.websocket.jupyter.org"


@dataclass
class Pending:
    """
    One request in flight and what has arrived for it so far.
    """

    msg_id: str
    need_idle: bool
    done: asyncio.Future
    sent: float = 0.0
    reply: dict | None = None
    idle: bool = False
    stream_messages: int = 0
    stream_chars: int = 0
    stream_texts: list[str] = field(default_factory=list)
    keep_text: bool = False
    replied: asyncio.Future | None = None
    """
    Done once the reply arrived (the C{idle} may still be missing).
    """


class IdleLost(RuntimeError):
    """
    The reply arrived but the C{idle} status did not follow: the kernel's
    iopub socket dropped messages.  A kernel's PUB socket drops what it
    cannot queue (1,000 messages by default) when its ZMQ I/O thread, or
    its subscriber's, is starved of CPU; the last message, C{idle}, is the
    likeliest to go.  Measured: a kernel whose I/O thread ran at idle
    priority among three busy processes lost 508 of 2,000 flushed 10 kB
    writes and the C{idle}.  Waiting for it would wait until the timeout.
    """

    def __init__(self, pending: "Pending", grace: float) -> None:
        super().__init__(f"no idle status {grace:g} s after the reply: the kernel's iopub dropped messages")
        self.pending = pending


class Tracker:
    """
    Matches received messages to requests in flight.
    """

    def __init__(self) -> None:
        self.pending: dict[str, Pending] = {}
        self.iopub_seen = 0
        self.stray = 0
        self._iopub_waiters: list[asyncio.Future] = []

    def expect(self, msg_id: str, need_idle: bool = True, keep_text: bool = False) -> Pending:
        pending = Pending(
            msg_id,
            need_idle,
            asyncio.get_running_loop().create_future(),
            sent=time.perf_counter(),
            keep_text=keep_text,
            replied=asyncio.get_running_loop().create_future(),
        )
        self.pending[msg_id] = pending
        return pending

    def dispatch(self, channel: str, msg_type: str, parent_id: Any, content: dict) -> None:
        if channel == "iopub":
            self.iopub_seen += 1
            if self._iopub_waiters:
                waiters, self._iopub_waiters = self._iopub_waiters, []
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)
        pending = self.pending.get(parent_id) if parent_id else None
        if pending is None:
            self.stray += 1
            return
        if msg_type.endswith("_reply"):
            pending.reply = content
            if pending.replied is not None and not pending.replied.done():
                pending.replied.set_result(None)
        elif msg_type == "status":
            if content.get("execution_state") == "idle":
                pending.idle = True
        elif msg_type == "stream":
            text = content.get("text", "")
            pending.stream_messages += 1
            pending.stream_chars += len(text)
            if pending.keep_text:
                pending.stream_texts.append(text)
        if pending.reply is not None and (pending.idle or not pending.need_idle):
            del self.pending[parent_id]
            if not pending.done.done():
                pending.done.set_result(time.perf_counter())

    async def wait_iopub(self, timeout: float) -> bool:
        """
        Wait for any iopub message (the check jupyter_client's
        C{wait_for_ready} makes that the subscription is live).
        """
        waiter = asyncio.get_running_loop().create_future()
        self._iopub_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def fail_all(self, error: BaseException) -> None:
        pending, self.pending = self.pending, {}
        for item in pending.values():
            if not item.done.done():
                item.done.set_exception(error)


class ChannelsClosed(ConnectionError):
    """
    The connection to the kernel ended while requests were in flight.
    """


class _Channels:
    """
    What both kinds share: request bookkeeping on top of C{send_shell}.
    """

    tracker: Tracker

    def send_shell(self, msg_type: str, content: dict) -> str:
        raise NotImplementedError

    async def flush(self) -> None:
        """
        Push out anything the transport has buffered.
        """

    def start_execute(self, code: str, keep_text: bool = False) -> Pending:
        msg_id = self.send_shell("execute_request", {"code": code, **EXECUTE_CONTENT})
        return self.tracker.expect(msg_id, need_idle=True, keep_text=keep_text)

    async def execute(
        self, code: str, timeout: float = 60.0, keep_text: bool = False, idle_grace: float | None = None
    ) -> Pending:
        """
        Run C{code}; completes once the reply and the C{idle} status arrived.

        @param idle_grace: with a number, wait at most that long for the
            C{idle} once the reply is there (see L{IdleLost}).
        @raise RuntimeError: the cell failed.
        @raise IdleLost: the C{idle} did not come within C{idle_grace}.
        """
        pending = self.start_execute(code, keep_text)
        await self.flush()
        if idle_grace is None or pending.replied is None:
            await asyncio.wait_for(asyncio.shield(pending.done), timeout)
        else:
            await asyncio.wait_for(asyncio.shield(pending.replied), timeout)
            try:
                await asyncio.wait_for(asyncio.shield(pending.done), idle_grace)
            except asyncio.TimeoutError:
                self.tracker.pending.pop(pending.msg_id, None)
                raise IdleLost(pending, idle_grace) from None
        status = (pending.reply or {}).get("status")
        if status != "ok":
            raise RuntimeError(f"cell failed ({status}): {(pending.reply or {}).get('evalue', '')}")
        return pending

    async def kernel_info(self, timeout: float) -> Pending | None:
        """
        One C{kernel_info_request}; its L{Pending} once the reply arrived,
        or C{None} after C{timeout}.
        """
        msg_id = self.send_shell("kernel_info_request", {})
        pending = self.tracker.expect(msg_id, need_idle=False)
        await self.flush()
        try:
            await asyncio.wait_for(asyncio.shield(pending.done), timeout)
        except asyncio.TimeoutError:
            self.tracker.pending.pop(msg_id, None)
            return None
        return pending


def _iso_now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _v1_frame(parts: list[bytes]) -> bytes:
    count = len(parts) + 1
    offsets = [8 * (count + 1)]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    return struct.pack(f"<{count + 1}Q", count, *offsets) + b"".join(parts)


def _v1_parts(payload: bytes) -> list[memoryview]:
    """
    The parts of a v1 message, as views of C{payload}: slicing the bytes
    would copy every part (20 MB for one large output) before it is even
    decoded, a pass the legacy client, which decodes the payload itself,
    does not make.
    """
    (count,) = struct.unpack_from("<Q", payload, 0)
    offsets = struct.unpack_from(f"<{count}Q", payload, 8)
    view = memoryview(payload)
    return [view[a:b] for a, b in zip(offsets, offsets[1:])]


def _json_part(part: memoryview) -> Any:
    """
    One JSON part of a v1 message, decoded straight from its view (as
    C{json.loads} decodes bytes: UTF-8, then parsed).
    """
    return json.loads(str(part, "utf-8"))


def _legacy_binary_json(payload: bytes) -> bytes:
    (count,) = struct.unpack_from("!I", payload, 0)
    offsets = struct.unpack_from(f"!{count}I", payload, 4)
    end = offsets[1] if count > 1 else len(payload)
    return payload[offsets[0] : end]


class GatewayChannels(_Channels):
    """
    A client of C{/api/kernels/{id}/channels} on the C{websockets} library
    (asyncio, C-accelerated framing), so the client is not the bottleneck.
    """

    def __init__(self, ws: Any, protocol: str) -> None:
        self.ws = ws
        self.v1 = protocol == "v1"
        self.session = uuid.uuid4().hex
        self.tracker = Tracker()
        self._outbox: list[str | bytes] = []
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(
        cls, ws_base: str, kernel_id: str, token: str, protocol: str, timeout: float = 30.0
    ) -> "GatewayChannels":
        from websockets.asyncio.client import connect

        session = uuid.uuid4().hex
        url = f"{ws_base}api/kernels/{kernel_id}/channels?session_id={session}"
        headers = {"Authorization": f"token {token}"} if token else None
        ws = await connect(
            url,
            additional_headers=headers,
            subprotocols=[V1_PROTOCOL] if protocol == "v1" else None,
            compression=None,
            max_size=None,
            max_queue=4096,
            ping_interval=None,
            open_timeout=timeout,
            close_timeout=5,
        )
        if protocol == "v1" and ws.subprotocol != V1_PROTOCOL:
            await ws.close()
            raise RuntimeError("the gateway did not accept the v1 subprotocol")
        return cls(ws, protocol)

    def send_shell(self, msg_type: str, content: dict) -> str:
        msg_id = uuid.uuid4().hex
        header = {
            "msg_id": msg_id,
            "msg_type": msg_type,
            "username": "bench",
            "session": self.session,
            "date": _iso_now(),
            "version": "5.3",
        }
        if self.v1:
            dump = json.dumps
            self._outbox.append(
                _v1_frame(
                    [b"shell", dump(header).encode(), b"{}", b"{}", dump(content).encode()]
                )
            )
        else:
            self._outbox.append(
                json.dumps(
                    {
                        "header": header,
                        "parent_header": {},
                        "metadata": {},
                        "content": content,
                        "channel": "shell",
                        "buffers": [],
                    }
                )
            )
        return msg_id

    async def flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        for frame in outbox:
            await self.ws.send(frame)

    async def _read(self) -> None:
        dispatch = self.tracker.dispatch
        loads = json.loads
        try:
            while True:
                payload = await self.ws.recv(decode=False)
                if self.v1:
                    parts = _v1_parts(payload)
                    header = _json_part(parts[1])
                    parent = _json_part(parts[2])
                    _json_part(parts[3])
                    content = _json_part(parts[4])
                    dispatch(str(parts[0], "ascii"), header["msg_type"], parent.get("msg_id"), content)
                else:
                    if payload[:1] != b"{":
                        payload = _legacy_binary_json(payload)
                    msg = loads(payload)
                    dispatch(
                        msg.get("channel", ""),
                        msg["header"]["msg_type"],
                        (msg.get("parent_header") or {}).get("msg_id"),
                        msg.get("content") or {},
                    )
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.tracker.fail_all(ChannelsClosed(f"channels WebSocket ended: {e!r}"))

    async def close(self) -> None:
        self._reader.cancel()
        try:
            await asyncio.wait_for(self.ws.close(), 5)
        except Exception:
            pass


def _url(info: dict, port_key: str) -> str:
    if info.get("transport", "tcp") == "ipc":
        return f"ipc://{info['ip']}-{info[port_key]}"
    return f"tcp://{info['ip']}:{info[port_key]}"


class DirectChannels(_Channels):
    """
    A shell (DEALER) and an iopub (SUB) socket on a kernel, as
    jupyter_client's client makes them, and jupyter_client's C{Session},
    which deserialises every message received, signature check included.

    The sockets are plain (not C{zmq.asyncio}) and read from the event loop
    when their edge-triggered FD fires, draining while C{EVENTS} says
    C{POLLIN}, and again after each send (a send can consume the edge).
    C{zmq.asyncio} was tried first and lost every shell reply of a
    pipelined burst sent without awaiting: the reader never woke.
    """

    BATCH = 256
    SEND_TIMEOUT_MS = 1000

    def __init__(self, connection_info: dict) -> None:
        import zmq
        from jupyter_client.session import Session

        info = dict(connection_info)
        key = info.get("key", b"")
        self.session = Session(
            key=key.encode() if isinstance(key, str) else key,
            signature_scheme=info.get("signature_scheme", "hmac-sha256"),
        )
        self.tracker = Tracker()
        self._loop = asyncio.get_running_loop()
        context = zmq.Context.instance()
        self._shell = context.socket(zmq.DEALER)
        self._shell.setsockopt(zmq.IDENTITY, self.session.bsession)
        self._iopub = context.socket(zmq.SUB)
        self._iopub.setsockopt(zmq.SUBSCRIBE, b"")
        curve_key = info.get("curve_publickey")
        for sock in (self._shell, self._iopub):
            if curve_key:
                # As jupyter_client's client does (JEP 145): a CurveZMQ
                # client of the kernel's key.
                public, secret = zmq.curve_keypair()
                sock.curve_serverkey = curve_key.encode() if isinstance(curve_key, str) else curve_key
                sock.curve_publickey = public
                sock.curve_secretkey = secret
            sock.setsockopt(zmq.LINGER, 0)
            # A DEALER whose peer is gone (a kernel that died on a port
            # collision, a port taken by some other program) blocks on send
            # forever, which would freeze the event loop: fail instead.
            sock.setsockopt(zmq.SNDTIMEO, self.SEND_TIMEOUT_MS)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
        self._shell.connect(_url(info, "shell_port"))
        self._iopub.connect(_url(info, "iopub_port"))
        self._sockets = {"shell": self._shell, "iopub": self._iopub}
        self._closed = False
        for channel, sock in self._sockets.items():
            self._loop.add_reader(sock.FD, self._drain, channel)
            self._loop.call_soon(self._drain, channel)

    def send_shell(self, msg_type: str, content: dict) -> str:
        """
        @raise ChannelsClosed: the kernel took nothing for a second.
        """
        import zmq

        msg = self.session.msg(msg_type, content)
        try:
            self.session.send(self._shell, msg)
        except zmq.Again:
            raise ChannelsClosed("the kernel's shell socket accepts nothing") from None
        finally:
            self._loop.call_soon(self._drain, "shell")
        return msg["header"]["msg_id"]

    def _drain(self, channel: str) -> None:
        import zmq

        if self._closed:
            return
        sock = self._sockets[channel]
        session = self.session
        dispatch = self.tracker.dispatch
        for _ in range(self.BATCH):
            if not sock.get(zmq.EVENTS) & zmq.POLLIN:
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                continue
            try:
                _, msg_list = session.feed_identities(frames, copy=True)
                msg = session.deserialize(msg_list, content=True, copy=True)
            except Exception as e:
                self.tracker.fail_all(ChannelsClosed(f"bad {channel} message: {e!r}"))
                continue
            dispatch(
                channel,
                msg["header"]["msg_type"],
                (msg.get("parent_header") or {}).get("msg_id"),
                msg.get("content") or {},
            )
        self._loop.call_soon(self._drain, channel)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in self._sockets.values():
            self._loop.remove_reader(sock.FD)
            sock.close(linger=0)
