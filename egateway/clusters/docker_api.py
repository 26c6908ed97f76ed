"""
A small Docker Engine API client for the reactor: HTTP over the engine's
UNIX socket through C{twisted.web.client.Agent} (an endpoint factory that
always answers the socket), so no call blocks the reactor and no thread
pool or C{docker} package is needed.

Only what the Docker and Swarm launchers use is here: JSON requests with a
bounded time (L{DockerEngine.call}), a container's log tail with the
engine's stream framing removed (L{demultiplex}), and a long-lived
streaming request whose body arrives line by line (L{DockerEngine.stream},
used by L{egateway.clusters.docker_events}).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Callable, Mapping
from urllib.parse import quote, urlencode

import treq
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory

from egateway.clusters.http_json import Unreachable, json_request
from zope.interface import implementer

API_VERSION = "v1.41"
"""
The API version every request names: Docker 20.10's, which newer engines
still serve, so the launcher speaks one dialect everywhere.
"""

DEFAULT_TIMEOUT = 30.0


class DockerAPIError(Exception):
    """
    The engine answered with an error status, or could not be reached
    (C{status} 0).  C{message} is the engine's own explanation.
    """

    def __init__(self, status: int, message: str, what: str = "") -> None:
        self.status = status
        self.message = message
        self.what = what
        super().__init__(f"{what}: {message}" if what else message)

    @property
    def not_found(self) -> bool:
        return self.status == 404


def socket_path(docker_host: str) -> str:
    """
    The socket path of a C{unix://...} engine address (or a bare path).

    @raise ValueError: another scheme (TCP engines are not supported: the
        socket's file permissions are the engine's only access control).
    """
    if docker_host.startswith("unix://"):
        path = docker_host[len("unix://") :]
    elif docker_host.startswith("/"):
        path = docker_host
    else:
        raise ValueError(f"docker_host {docker_host!r} is not unix:///path/to/docker.sock")
    if not path.startswith("/"):
        raise ValueError(f"docker_host {docker_host!r} is not an absolute socket path")
    return path


@implementer(IAgentEndpointFactory)
class _SocketEndpoints:
    def __init__(self, reactor: Any, path: str) -> None:
        self._reactor = reactor
        self._path = path

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(self._reactor, self._path, timeout=10)


class _Lines(Protocol):
    """
    Delivers a streaming body's JSON lines to C{on_line}; C{done} fires
    (with C{None}) when the body ends, however it ends.
    """

    def __init__(self, on_line: Callable[[Any], None]) -> None:
        self._on_line = on_line
        self._buffer = b""
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if line.strip():
                try:
                    self._on_line(json.loads(line))
                except ValueError:
                    continue

    def connectionLost(self, reason: Failure) -> None:
        if not self.done.called:
            self.done.callback(None)

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()


@dataclass
class Stream:
    """
    A streaming request under way: C{done} fires when it ends; L{stop}
    ends it.
    """

    protocol: _Lines

    @property
    def done(self) -> Deferred[None]:
        return self.protocol.done

    def stop(self) -> None:
        self.protocol.stop()


def demultiplex(data: bytes) -> str:
    """
    A container's log output without the engine's 8-byte frame headers
    (stream, 0, 0, 0, big-endian length) that precede each chunk of a
    container without a TTY.
    """
    out = []
    while len(data) >= 8 and data[0] in (0, 1, 2) and data[1:4] == b"\0\0\0":
        (size,) = struct.unpack(">I", data[4:8])
        out.append(data[8 : 8 + size])
        data = data[8 + size :]
    out.append(data)
    return b"".join(out).decode("utf-8", "replace")


class DockerEngine:
    """
    One Docker engine, reached at C{path}.
    """

    def __init__(self, reactor: Any, path: str) -> None:
        self._reactor = reactor
        self.path = path
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 4
        self._agent = Agent.usingEndpointFactory(reactor, _SocketEndpoints(reactor, path), pool=self._pool)
        self._http = HTTPClient(self._agent)
        # Streams get a connection of their own: never returned to the pool.
        self._stream_agent = Agent.usingEndpointFactory(
            reactor, _SocketEndpoints(reactor, path), pool=HTTPConnectionPool(reactor, persistent=False)
        )

    def url(self, path: str, query: Mapping[str, Any] | None = None) -> str:
        url = f"http://docker/{API_VERSION}{path}"
        if query:
            url += "?" + urlencode({k: _query_value(v) for k, v in query.items()})
        return url

    async def call(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        raw: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        what: str = "",
    ) -> Any:
        """
        One request; its decoded JSON answer (or text, or C{None} when
        empty).

        @raise DockerAPIError: an error status (with the engine's message),
            no answer within C{timeout}, or no engine at the socket.
        """
        headers = Headers({b"Content-Type": [b"application/json"]})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if raw is not None:
            headers = Headers({b"Content-Type": [b"application/x-tar"]})
        try:
            code, parsed, text = await json_request(
                self._http, self._reactor, method, self.url(path, query), data=data, headers=headers, timeout=timeout
            )
        except Unreachable as e:
            raise DockerAPIError(0, f"cannot reach the Docker engine at {self.path}: {e}", what) from None
        if code >= 400:
            message = parsed.get("message") if isinstance(parsed, dict) else None
            raise DockerAPIError(code, str(message or text.strip() or code), what)
        return parsed

    async def logs(self, container: str, lines: int = 10) -> str:
        """
        The last C{lines} lines a container wrote (stdout and stderr), or
        C{""} when the engine cannot say.
        """
        url = self.url(f"/containers/{quote(container)}/logs", {"stdout": 1, "stderr": 1, "tail": lines})
        d = self._http.get(url)
        d.addTimeout(10, self._reactor)
        try:
            response = await d
            data = await treq.content(response)
        except CancelledError:
            raise
        except Exception:
            # The log only explains a failure already being reported.
            return ""
        if response.code != 200:
            return ""
        return demultiplex(data).strip()

    async def stream(
        self, path: str, query: Mapping[str, Any], on_line: Callable[[Any], None], timeout: float = 10.0
    ) -> Stream:
        """
        Start a streaming request; each JSON line of its body goes to
        C{on_line} as it arrives.

        @raise DockerAPIError: the engine refused it or cannot be reached.
        """
        d = self._stream_agent.request(b"GET", self.url(path, query).encode())
        d.addTimeout(timeout, self._reactor)
        try:
            response = await d
        except CancelledError:
            raise
        except Exception as e:
            raise DockerAPIError(0, f"cannot reach the Docker engine at {self.path}: {e}", path) from None
        if response.code >= 400:
            content = (await treq.content(response)).decode("utf-8", "replace")
            raise DockerAPIError(response.code, content.strip(), path)
        protocol = _Lines(on_line)
        response.deliverBody(protocol)
        return Stream(protocol)

    async def close(self) -> None:
        await self._pool.closeCachedConnections()


def _query_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def label_filter(labels: Mapping[str, str]) -> dict[str, list[str]]:
    """
    The engine's C{filters} for objects carrying every one of C{labels}.
    """
    return {"label": [f"{k}={v}" if v else k for k, v in labels.items()]}


__all__ = ["API_VERSION", "DockerAPIError", "DockerEngine", "Stream", "demultiplex", "label_filter", "socket_path"]
