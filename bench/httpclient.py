"""
A tiny asyncio HTTP/1.1 client for the gateway's REST calls.

The benchmark only needs a handful of JSON requests (start, delete, list),
made concurrently (50 starts at once), so one connection per request with
C{Connection: close} is enough, and it keeps the benchmark free of thread
pools that would cap concurrency.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


class HTTPFailure(Exception):
    """
    A request got an unexpected status; the message carries the gateway's
    C{reason}/C{message} when it sent one.
    """

    def __init__(self, method: str, url: str, status: int, body: bytes) -> None:
        detail = body[:500].decode("utf-8", "replace")
        try:
            value = json.loads(body)
            if isinstance(value, dict) and "message" in value:
                detail = f"{value.get('reason', '')}: {value['message']}"
        except ValueError:
            pass
        super().__init__(f"{method} {url} -> {status}: {detail}")
        self.status = status


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def _dechunk(data: bytes) -> bytes:
    out = []
    while True:
        line, _, data = data.partition(b"\r\n")
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return b"".join(out)
        out.append(data[:size])
        data = data[size + 2 :]


async def request(
    method: str,
    url: str,
    body: Any = None,
    token: str = "",
    timeout: float = 60.0,
) -> Response:
    """
    One request; the body, when given, is sent as JSON.

    @raise asyncio.TimeoutError: no complete response within C{timeout}.
    """
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if secure else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    payload = b"" if body is None else json.dumps(body).encode("utf-8")
    head = [
        f"{method} {path} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Connection: close",
        "Accept: application/json",
        f"Content-Length: {len(payload)}",
    ]
    if body is not None:
        head.append("Content-Type: application/json")
    if token:
        head.append(f"Authorization: token {token}")
    raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload

    async def exchange() -> bytes:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ssl.create_default_context() if secure else None
        )
        try:
            writer.write(raw)
            await writer.drain()
            return await reader.read()
        finally:
            writer.close()

    data = await asyncio.wait_for(exchange(), timeout)
    header_block, _, content = data.partition(b"\r\n\r\n")
    lines = header_block.decode("latin-1").split("\r\n")
    if not lines or not lines[0].startswith("HTTP/"):
        raise HTTPFailure(method, url, 0, data[:200])
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        content = _dechunk(content)
    return Response(status, headers, content)


async def expect(
    method: str,
    url: str,
    status: int | tuple[int, ...],
    body: Any = None,
    token: str = "",
    timeout: float = 60.0,
) -> Response:
    """
    L{request}, failing with L{HTTPFailure} unless the status is one of
    C{status}.
    """
    wanted = (status,) if isinstance(status, int) else status
    response = await request(method, url, body, token, timeout)
    if response.status not in wanted:
        raise HTTPFailure(method, url, response.status, response.body)
    return response
