#!/usr/bin/env python
"""
Many kernels in one process, for the 1,000-kernel benchmark (C{bench/scale.py}).

A thousand ipykernel processes do not fit in the benchmark machine's memory,
so this process serves many simulated kernels instead.  Each one speaks the
Jupyter wire protocol on its own five TCP ports (shell, iopub, stdin,
control, hb) with its own HMAC-SHA256 key, as a real kernel does; it just
computes nothing:

  - C{kernel_info_request} (shell or control): status busy, the reply, status
    idle, all with the request as parent;
  - C{execute_request}: status busy, C{execute_input}, a C{stream} (stdout)
    with the execution count, C{execute_reply}, status idle;
  - C{comm_info_request}, C{is_complete_request}, C{history_request},
    C{interrupt_request} and C{shutdown_request} are answered (a shutdown
    request also ends the kernel); other requests are ignored, as ipykernel
    ignores unknown ones;
  - heartbeat: every message on hb is echoed back;
  - with the ticker on (C{{"op": "tick", "rate": 1}}), every kernel publishes
    an iopub C{status} (C{idle}, no parent) once a second, spread evenly over
    the second.

The gateway reaches the farm through a launcher the benchmark registers
(C{bench/farm_launcher.py}); that launcher talks to this process over a
UNIX socket, one JSON object per line, with a request id echoed in each
answer::

    {"id": 1, "op": "start", "kernel": "<kernel id>"} -> {"id": 1, "ok": true, "connection_info": {...}}
    {"id": 2, "op": "stop", "kernel": "..."}          -> {"id": 2, "ok": true, "existed": true}
    {"id": 3, "op": "alive", "kernel": "..."}         -> {"id": 3, "ok": true, "alive": true}
    {"id": 4, "op": "tick", "rate": 1.0}              -> {"id": 4, "ok": true}
    {"id": 5, "op": "stats"}                          -> {"id": 5, "ok": true, "kernels": 1000, ...}

and C{{"event": "ended", "kernel": "..."}} is sent to every connection when a
kernel ends (a shutdown request, or a stop).

Sockets are driven without a task or future per socket: each ZMQ socket's
file descriptor is registered once with the asyncio loop, and its handler
drains every message ZMQ has (the descriptor is edge-triggered, so the
handler also runs after each send on that socket).

    python bench/kernel_farm.py --socket /path/farm.sock [--ready-file PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import resource
import signal
import sys
import uuid
from datetime import datetime, timezone
from typing import Any, Callable

import zmq

DELIMITER = b"<IDS|MSG>"
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
MAX_SOCKETS = 65536


def raise_nofile(wanted: int = 65536) -> int:
    """
    Raise this process's open-file limit towards C{wanted} (the hard limit
    too, which root may); the limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (wanted, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), max(hard, target)))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class FarmKernel:
    """
    One simulated kernel: five bound sockets, a key and a session.
    """

    def __init__(self, farm: "Farm", kernel_id: str) -> None:
        self.farm = farm
        self.id = kernel_id
        self.key = uuid.uuid4().hex.encode("ascii")
        self.session = uuid.uuid4().hex
        self._hmac = hmac.new(self.key, digestmod=hashlib.sha256)
        self.execution_count = 0
        self.sockets: dict[str, zmq.Socket] = {}
        self.ports: dict[str, int] = {}
        kinds = {"shell": zmq.ROUTER, "iopub": zmq.PUB, "stdin": zmq.ROUTER, "control": zmq.ROUTER, "hb": zmq.REP}
        try:
            for name in CHANNELS:
                sock = farm.context.socket(kinds[name])
                sock.linger = 0
                self.ports[name] = sock.bind_to_random_port("tcp://127.0.0.1")
                self.sockets[name] = sock
        except zmq.ZMQError:
            self.close()
            raise
        for name in ("shell", "control", "hb"):
            farm.watch(self.sockets[name], self._handler(name))

    def connection_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {f"{name}_port": port for name, port in ((n, self.ports[n]) for n in CHANNELS)}
        info.update(ip="127.0.0.1", transport="tcp", key=self.key.decode("ascii"), signature_scheme="hmac-sha256")
        return info

    # -- messages --------------------------------------------------------

    def _sign(self, parts: list[bytes]) -> bytes:
        h = self._hmac.copy()
        for part in parts:
            h.update(part)
        return h.hexdigest().encode("ascii")

    def _frames(self, msg_type: str, content: dict[str, Any], parent: dict[str, Any]) -> list[bytes]:
        header = {
            "msg_id": uuid.uuid4().hex,
            "session": self.session,
            "username": "farm",
            "date": _now(),
            "msg_type": msg_type,
            "version": "5.3",
        }
        parts = [json.dumps(header).encode(), json.dumps(parent).encode(), b"{}", json.dumps(content).encode()]
        return [DELIMITER, self._sign(parts), *parts]

    def send(self, channel: str, msg_type: str, content: dict[str, Any], parent: dict[str, Any],
             identities: list[bytes] = ()) -> None:
        sock = self.sockets.get(channel)
        if sock is None:
            return
        try:
            sock.send_multipart([*identities, *self._frames(msg_type, content, parent)], zmq.NOBLOCK)
        except zmq.Again:
            self.farm.dropped += 1
            return
        self.farm.sent += 1
        if channel != "iopub":
            # A send may consume the edge that says a request is waiting.
            self.farm.drain_soon(sock)

    def status(self, state: str, parent: dict[str, Any]) -> None:
        self.send("iopub", "status", {"execution_state": state}, parent)

    def _handler(self, channel: str) -> Callable[[list[bytes]], None]:
        sock = self.sockets[channel]
        if channel == "hb":
            def echo(frames: list[bytes]) -> None:
                try:
                    sock.send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    pass
                self.farm.drain_soon(sock)
            return echo
        return lambda frames: self._request(channel, frames)

    def _request(self, channel: str, frames: list[bytes]) -> None:
        try:
            split = frames.index(DELIMITER)
        except ValueError:
            return
        identities, signature, parts = frames[:split], frames[split + 1], frames[split + 2 : split + 6]
        if len(parts) != 4 or not hmac.compare_digest(signature, self._sign(parts)):
            self.farm.bad_signatures += 1
            return
        header = json.loads(parts[0])
        msg_type = header.get("msg_type", "")
        self.farm.received += 1
        answer = ANSWERS.get(msg_type)
        if answer is None:
            return
        self.status("busy", header)
        answer(self, channel, identities, header, json.loads(parts[3]))
        self.status("idle", header)
        if msg_type == "shutdown_request":
            self.farm.end(self.id)

    # -- life --------------------------------------------------------------

    def close(self) -> None:
        for sock in self.sockets.values():
            self.farm.unwatch(sock)
            sock.close(0)
        self.sockets.clear()


def _kernel_info(kernel: FarmKernel, channel: str, ids: list[bytes], header: dict, content: dict) -> None:
    kernel.send(channel, "kernel_info_reply", {
        "status": "ok",
        "protocol_version": "5.3",
        "implementation": "egateway-bench-farm",
        "implementation_version": "1.0",
        "language_info": {"name": "python", "version": sys.version.split()[0], "mimetype": "text/x-python",
                          "file_extension": ".py"},
        "banner": "egateway benchmark kernel farm (simulated kernel, computes nothing)",
        "help_links": [],
    }, header, ids)


def _execute(kernel: FarmKernel, channel: str, ids: list[bytes], header: dict, content: dict) -> None:
    silent = bool(content.get("silent"))
    if not silent:
        kernel.execution_count += 1
    count = kernel.execution_count
    code = str(content.get("code", ""))
    kernel.send("iopub", "execute_input", {"code": code, "execution_count": count}, header)
    if not silent:
        kernel.send("iopub", "stream", {"name": "stdout", "text": f"{count}\n"}, header)
    kernel.send(channel, "execute_reply", {"status": "ok", "execution_count": count, "user_expressions": {},
                                           "payload": []}, header, ids)


def _simple(reply_type: str, content: dict[str, Any]) -> Callable[..., None]:
    def answer(kernel: FarmKernel, channel: str, ids: list[bytes], header: dict, request: dict) -> None:
        body = dict(content)
        if reply_type == "shutdown_reply":
            body["restart"] = bool(request.get("restart"))
        kernel.send(channel, reply_type, body, header, ids)
    return answer


ANSWERS: dict[str, Callable[..., None]] = {
    "kernel_info_request": _kernel_info,
    "execute_request": _execute,
    "comm_info_request": _simple("comm_info_reply", {"status": "ok", "comms": {}}),
    "is_complete_request": _simple("is_complete_reply", {"status": "complete"}),
    "history_request": _simple("history_reply", {"status": "ok", "history": []}),
    "interrupt_request": _simple("interrupt_reply", {"status": "ok"}),
    "shutdown_request": _simple("shutdown_reply", {"status": "ok"}),
}


class Farm:
    """
    The kernels, the loop that drives their sockets, the ticker and the
    control connections.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.context = zmq.Context()
        self.context.set(zmq.MAX_SOCKETS, MAX_SOCKETS)
        self.kernels: dict[str, FarmKernel] = {}
        self.listeners: set[asyncio.StreamWriter] = set()
        self._handlers: dict[int, tuple[zmq.Socket, Callable[[list[bytes]], None]]] = {}
        self._soon: set[zmq.Socket] = set()
        self._closing: set[FarmKernel] = set()
        self._tick: asyncio.Task | None = None
        self.sent = self.received = self.dropped = self.bad_signatures = self.ticks = 0

    # -- sockets -------------------------------------------------------------

    def watch(self, sock: zmq.Socket, handler: Callable[[list[bytes]], None]) -> None:
        fd = sock.getsockopt(zmq.FD)
        self._handlers[fd] = (sock, handler)
        self.loop.add_reader(fd, self._readable, fd)
        self.drain_soon(sock)

    def unwatch(self, sock: zmq.Socket) -> None:
        if sock.closed:
            return
        fd = sock.getsockopt(zmq.FD)
        if self._handlers.pop(fd, None) is not None:
            self.loop.remove_reader(fd)
        self._soon.discard(sock)

    def _readable(self, fd: int) -> None:
        entry = self._handlers.get(fd)
        if entry is not None:
            self._drain(*entry)

    def _drain(self, sock: zmq.Socket, handler: Callable[[list[bytes]], None]) -> None:
        for _ in range(256):
            if sock.closed or not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handler(frames)
        self.drain_soon(sock)

    def drain_soon(self, sock: zmq.Socket) -> None:
        if sock not in self._soon:
            self._soon.add(sock)
            self.loop.call_soon(self._drain_later, sock)

    def _drain_later(self, sock: zmq.Socket) -> None:
        self._soon.discard(sock)
        if sock.closed:
            return
        entry = self._handlers.get(sock.getsockopt(zmq.FD))
        if entry is not None:
            self._drain(*entry)

    # -- kernels -------------------------------------------------------------

    def start(self, kernel_id: str) -> dict[str, Any]:
        kernel = self.kernels.get(kernel_id)
        if kernel is None:
            kernel = self.kernels[kernel_id] = FarmKernel(self, kernel_id)
        return kernel.connection_info()

    def end(self, kernel_id: str) -> bool:
        kernel = self.kernels.pop(kernel_id, None)
        if kernel is None:
            return False
        # After the reply to a shutdown request has left.
        self._closing.add(kernel)
        self.loop.call_later(0.05, self._close, kernel)
        self._broadcast({"event": "ended", "kernel": kernel_id})
        return True

    def _close(self, kernel: FarmKernel) -> None:
        self._closing.discard(kernel)
        kernel.close()

    def _broadcast(self, event: dict[str, Any]) -> None:
        line = json.dumps(event).encode() + b"\n"
        for writer in list(self.listeners):
            writer.write(line)

    def set_tick(self, rate: float) -> None:
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        if rate > 0:
            self._tick = self.loop.create_task(self._ticker(rate))

    async def _ticker(self, rate: float) -> None:
        """
        Every kernel publishes C{rate} status messages a second, spread over
        the second in 50 slices so the gateway sees a steady flow.
        """
        slices = 50
        period = 1.0 / rate
        index = 0
        next_at = self.loop.time()
        while True:
            kernels = list(self.kernels.values())
            for kernel in kernels[index::slices]:
                kernel.status("idle", {})
                self.ticks += 1
            index = (index + 1) % slices
            next_at += period / slices
            await asyncio.sleep(max(0.0, next_at - self.loop.time()))

    def stats(self) -> dict[str, Any]:
        return {
            "kernels": len(self.kernels),
            "sent": self.sent,
            "received": self.received,
            "dropped": self.dropped,
            "bad_signatures": self.bad_signatures,
            "ticks": self.ticks,
            "pid": os.getpid(),
            "rss_kib": _rss_kib(),
            "fds": len(os.listdir("/proc/self/fd")),
        }

    # -- control -------------------------------------------------------------

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        kernel_id = str(request.get("kernel", ""))
        if op == "start":
            return {"connection_info": self.start(kernel_id)}
        if op == "stop":
            return {"existed": self.end(kernel_id)}
        if op == "alive":
            return {"alive": kernel_id in self.kernels}
        if op == "signal":
            return {"delivered": kernel_id in self.kernels}
        if op == "tick":
            self.set_tick(float(request.get("rate", 0)))
            return {}
        if op == "stats":
            return self.stats()
        raise ValueError(f"unknown op {op!r}")

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.listeners.add(writer)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                request: dict[str, Any] = {}
                try:
                    request = json.loads(line)
                    reply = {"id": request.get("id"), "ok": True, **self.answer(request)}
                except (ValueError, zmq.ZMQError) as e:
                    reply = {"id": request.get("id"), "ok": False, "error": f"{type(e).__name__}: {e}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            return
        finally:
            self.listeners.discard(writer)
            writer.close()

    def close(self) -> None:
        self.set_tick(0)
        for kernel in [*self.kernels.values(), *self._closing]:
            kernel.close()
        self.kernels.clear()
        self._closing.clear()
        self.context.destroy(linger=0)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def serve(socket_path: str, ready_file: str) -> None:
    loop = asyncio.get_running_loop()
    farm = Farm(loop)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await asyncio.start_unix_server(farm.serve_connection, path=socket_path)
    os.chmod(socket_path, 0o600)
    if ready_file:
        with open(ready_file, "w") as f:
            json.dump({"pid": os.getpid(), "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}, f)
    try:
        await stop.wait()
    finally:
        server.close()
        farm.close()
        try:
            os.unlink(socket_path)
        except OSError:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve many simulated Jupyter kernels from one process.")
    parser.add_argument("--socket", required=True, help="UNIX socket for the launcher's requests")
    parser.add_argument("--ready-file", default="", help="written once the socket listens")
    args = parser.parse_args()
    raise_nofile()
    asyncio.run(serve(args.socket, args.ready_file))


if __name__ == "__main__":
    main()
