"""
A small Redis client on Twisted endpoints, made for a store that must keep
working through Redis outages.

Why our own: the gateway needs commands to fail at once (with
L{StoreUnavailable}) while Redis is unreachable, rather than queue until it
returns, and to reconnect by itself; it needs only a dozen commands,
pipelined, and Lua scripts.  RESP2 is a small protocol.

L{RedisClient} keeps one connection, reconnecting with exponential back-off
(with jitter) for as long as it is started.  A command sent while
disconnected fails immediately; a command without a reply within
C{command_timeout} fails, and the connection is dropped and remade (its
replies can no longer be matched to requests).
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from egateway.observe import OneShotObserver
from egateway.store.interface import StoreUnavailable


class RedisError(Exception):
    """
    An error reply from Redis (C{-ERR ...}, C{-NOSCRIPT ...}).
    """

    @property
    def code(self) -> str:
        return str(self).split(" ", 1)[0]


@dataclass(frozen=True)
class RedisAddress:
    """
    Where Redis is and how to log in, from a C{redis://} URL.
    """

    host: str
    port: int = 6379
    db: int = 0
    username: str = ""
    password: str = ""

    @classmethod
    def from_url(cls, url: str) -> "RedisAddress":
        """
        Parse C{redis://[[user]:password@]host[:port][/db]}.

        @raise ValueError: not such a URL (the message never contains the
            password).
        """
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError(f"expected a redis:// URL, got scheme {parts.scheme!r}")
        if parts.query or parts.fragment:
            raise ValueError("redis:// URLs take no query or fragment")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError("the port of the redis:// URL is not a number from 1 to 65535") from None
        host = parts.hostname or ""
        if not host:
            raise ValueError("the redis:// URL names no host")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"the database of a redis:// URL is a number (/0), not {path!r}")
        return cls(
            host=host,
            port=port,
            db=int(path or 0),
            username=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
        )

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/{self.db}"

    def __repr__(self) -> str:
        return f"<RedisAddress {self}>"


Argument = bytes | str | int | float | list[bytes]
"""
A command argument; a list of bytes is one argument sent in pieces.
"""


def encode_command(args: Sequence[Argument]) -> bytes:
    """
    One command as a RESP array of bulk strings.
    """
    return b"".join(command_chunks(args))


def command_chunks(args: Sequence[Argument]) -> list[bytes]:
    """
    One command as a RESP array of bulk strings, in pieces: a large
    argument (a journaled 20 MB message) is written as it is, not copied
    into one buffer with the rest, and an argument given as a list of
    pieces is never joined here.
    """
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, list):
            out.append(b"$%d\r\n" % sum(len(piece) for piece in arg))
            out.extend(bytes(piece) for piece in arg)
            out.append(b"\r\n")
            continue
        if isinstance(arg, str):
            data = arg.encode("utf-8")
        elif isinstance(arg, (bytes, bytearray, memoryview)):
            data = bytes(arg)
        elif isinstance(arg, bool):
            raise TypeError("booleans are not Redis arguments")
        elif isinstance(arg, (int, float)):
            data = repr(arg).encode("ascii")
        else:
            raise TypeError(f"cannot send {type(arg).__name__} to Redis")
        out.append(b"$%d\r\n" % len(data))
        out.append(data)
        out.append(b"\r\n")
    return out


class ReplyParser:
    """
    Incremental RESP2 reply parser.  It keeps its place between chunks, so a
    large reply arriving in many pieces is parsed once, not once per piece.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._bulk: int | None = None  # length of the bulk string being read
        self._arrays: list[list[Any]] = []  # [remaining, items] for arrays being read

    def feed(self, data: bytes) -> list[Any]:
        """
        Add bytes; return the replies they complete (error replies as
        L{RedisError} values).

        @raise ValueError: the peer does not speak RESP.
        """
        buffer = self._buffer
        buffer += data
        replies: list[Any] = []
        position = 0
        size = len(buffer)
        while position < size:
            if self._bulk is not None:
                end = position + self._bulk
                if end + 2 > size:
                    break
                value: Any = bytes(buffer[position:end])
                position = end + 2
                self._bulk = None
            else:
                newline = buffer.find(b"\r\n", position)
                if newline < 0:
                    break
                kind = buffer[position]
                line = bytes(buffer[position + 1 : newline])
                position = newline + 2
                if kind == 0x2B:  # +
                    value = line
                elif kind == 0x2D:  # -
                    value = RedisError(line.decode("utf-8", "replace"))
                elif kind == 0x3A:  # :
                    value = int(line)
                elif kind == 0x24:  # $
                    length = int(line)
                    if length >= 0:
                        self._bulk = length
                        continue
                    value = None
                elif kind == 0x2A:  # *
                    count = int(line)
                    if count > 0:
                        self._arrays.append([count, []])
                        continue
                    value = None if count < 0 else []
                else:
                    raise ValueError(f"not a RESP reply: {bytes(buffer[position - 2 - len(line) - 1 : position])!r}")
            # A complete value: fill enclosing arrays, bubbling up the ones it completes.
            while self._arrays:
                top = self._arrays[-1]
                top[1].append(value)
                top[0] -= 1
                if top[0]:
                    break
                self._arrays.pop()
                value = top[1]
            else:
                replies.append(value)
        del buffer[:position]
        return replies


class RedisProtocol(Protocol):
    """
    One connection: requests are written as they come (pipelined) and
    replies matched to them in order.
    """

    def __init__(self) -> None:
        self._parser = ReplyParser()
        self._pending: deque[Deferred[Any]] = deque()
        self.lost: Deferred[None] = Deferred()
        self.made: Deferred[RedisProtocol] = Deferred()
        self.failure_reason = ""
        self.closed = False

    def connectionMade(self) -> None:
        self.made.callback(self)

    def send(self, commands: Sequence[Sequence[Any]]) -> list[Deferred[Any]]:
        """
        Write C{commands} in one write; one Deferred per reply.
        """
        if self.closed:
            return [fail(ConnectionLost(self.failure_reason or "connection closed")) for _ in commands]
        waiting: list[Deferred[Any]] = [Deferred() for _ in commands]
        self._pending.extend(waiting)
        chunks = [chunk for command in commands for chunk in command_chunks(command)]
        self.transport.writeSequence(chunks)  # type: ignore[union-attr]
        return waiting

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except ValueError as e:
            self.abort(f"garbled reply ({e})")
            return
        for reply in replies:
            if not self._pending:
                self.abort("a reply nobody asked for")
                return
            waiting = self._pending.popleft()
            if isinstance(reply, RedisError):
                waiting.errback(reply)
            else:
                waiting.callback(reply)

    def abort(self, why: str) -> None:
        if self.closed:
            return
        self.failure_reason = why
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        self.failure_reason = self.failure_reason or reason.getErrorMessage()
        # The client forgets this connection before anyone hears of the
        # failure, so nothing is sent on it from an errback below.
        self.lost.callback(None)
        pending, self._pending = self._pending, deque()
        for waiting in pending:
            waiting.errback(ConnectionLost(self.failure_reason))


class ConnectionLost(Exception):
    pass


class RedisClient:
    """
    A self-healing connection to one Redis.

    @param reactor: provides C{IReactorTime} and C{IReactorTCP}.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        address: RedisAddress,
        *,
        connect_timeout: float = 3.0,
        command_timeout: float = 5.0,
        min_backoff: float = 0.1,
        max_backoff: float = 2.0,
    ) -> None:
        self.address = address
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._running = False
        self._protocol: RedisProtocol | None = None
        self._attempt: Deferred[Any] | None = None
        self._connecting: RedisProtocol | None = None
        self._retry: Any = None
        self._failures = 0
        self._last_error = "not connected yet"
        # The outcome of the attempt in progress, for start()'s callers.
        self._first: OneShotObserver[None] = OneShotObserver()
        self._scripts: dict[str, str] = {}

    @property
    def connected(self) -> bool:
        return self._protocol is not None

    # -- life cycle -------------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        Connect, and keep reconnecting until L{stop}.  Fires once connected,
        or fails with L{StoreUnavailable} when the first attempt fails; the
        client keeps trying in the background either way.
        """
        if self._protocol is not None:
            return succeed(None)
        waiter = self._first.when_fired()
        if not self._running:
            self._running = True
            self._connect()
        return waiter

    def stop(self) -> Deferred[None]:
        """
        Stop reconnecting and close the connection; fires once every socket
        this client opened is closed.
        """
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        closing: list[Deferred[None]] = []
        connecting, self._connecting = self._connecting, None
        if self._attempt is not None:
            if connecting is not None and connecting.made.called:
                closing.append(connecting.lost)
            self._attempt.cancel()
        self._release_waiters(StoreUnavailable(f"{self.address}: the store was stopped"))
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.failure_reason = "the store was stopped"
            closing.append(protocol.lost)
            protocol.transport.loseConnection()  # type: ignore[union-attr]
        return gatherResults(closing).addCallback(lambda _: None)

    def _connect(self) -> None:
        self._retry = None
        self._connecting = protocol = RedisProtocol()
        factory = Factory.forProtocol(lambda: protocol)
        factory.noisy = False  # one log line per reconnection attempt is enough
        attempt = self._endpoint().connect(factory)
        attempt.addCallback(self._handshake)
        self._attempt = attempt
        attempt.addCallbacks(self._connected, self._connect_failed)

    def _endpoint(self) -> Any:
        host, port, timeout = self.address.host, self.address.port, self._connect_timeout
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return HostnameEndpoint(self._reactor, host, port, timeout=timeout)
        if ip.version == 4:
            return TCP4ClientEndpoint(self._reactor, host, port, timeout=timeout)
        return TCP6ClientEndpoint(self._reactor, host, port, timeout=timeout)

    async def _handshake_steps(self, protocol: RedisProtocol) -> None:
        commands: list[list[Any]] = []
        if self.address.password:
            auth: list[Any] = ["AUTH"]
            if self.address.username:
                auth.append(self.address.username)
            auth.append(self.address.password)
            commands.append(auth)
        if self.address.db:
            commands.append(["SELECT", self.address.db])
        # PING fails with -LOADING while Redis loads its data set.
        commands.append(["PING"])
        for reply in await self._timed(protocol, commands):
            if isinstance(reply, RedisError):
                raise reply

    def _handshake(self, protocol: RedisProtocol) -> Deferred[RedisProtocol]:
        d = Deferred.fromCoroutine(self._handshake_steps(protocol))

        def failed(f: Failure) -> Failure:
            protocol.transport.abortConnection()  # type: ignore[union-attr]
            return f

        return d.addCallbacks(lambda _: protocol, failed)

    def _connected(self, protocol: RedisProtocol) -> None:
        self._attempt = self._connecting = None
        if not self._running:
            protocol.transport.loseConnection()  # type: ignore[union-attr]
            return
        if self._failures:
            self._log.info(
                "store: connected to {address} again after {failures} failed attempts",
                address=str(self.address),
                failures=self._failures,
            )
        self._failures = 0
        self._protocol = protocol
        protocol.lost.addCallback(lambda _: self._disconnected(protocol))
        self._release_waiters(None)

    def _connect_failed(self, f: Failure) -> None:
        self._attempt = self._connecting = None
        if not self._running:
            return
        self._last_error = _describe(f)
        self._failures += 1
        delay = min(self._max_backoff, self._min_backoff * 2 ** min(self._failures - 1, 20))
        delay *= random.uniform(0.8, 1.2)
        if self._failures == 1 or self._failures % 30 == 0:
            self._log.warn(
                "store: cannot reach {address}: {error}; retrying every {max_backoff:.0f}s at most",
                address=str(self.address),
                error=self._last_error,
                max_backoff=self._max_backoff,
            )
        self._retry = self._reactor.callLater(delay, self._connect)
        # Last: a waiter's errback may run anything, stop() included.
        self._release_waiters(StoreUnavailable(f"{self.address} is unreachable: {self._last_error}"))

    def _disconnected(self, protocol: RedisProtocol) -> None:
        if self._protocol is protocol:
            self._protocol = None
        if not self._running:
            return
        self._last_error = f"connection lost ({protocol.failure_reason or 'closed by the server'})"
        self._log.warn(
            "store: lost the connection to {address}: {why}; reconnecting",
            address=str(self.address),
            why=protocol.failure_reason or "closed by the server",
        )
        self._failures = 1
        self._retry = self._reactor.callLater(self._min_backoff * random.uniform(0.5, 1.0), self._connect)

    def _release_waiters(self, error: Exception | None) -> None:
        first, self._first = self._first, OneShotObserver()
        first.fire(error)

    # -- commands ---------------------------------------------------------

    def _timed(self, protocol: RedisProtocol, commands: Sequence[Sequence[Any]]) -> Deferred[list[Any]]:
        """
        Send C{commands} on C{protocol}; fires with the list of replies (error
        replies as L{RedisError} values), or fails with L{ConnectionLost}.
        A batch not fully answered in time aborts the connection.
        """
        waiting = protocol.send(commands)
        timer = self._reactor.callLater(
            self._command_timeout, protocol.abort, f"no reply within {self._command_timeout:g}s"
        )
        results = [w.addErrback(lambda f: f.value if f.check(RedisError) else f) for w in waiting]

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        gathered = gatherResults(results, consumeErrors=True).addBoth(done)

        def unwrap(f: Failure) -> Failure:
            # gatherResults wraps the first failure; pass on the cause itself.
            return f.value.subFailure if hasattr(f.value, "subFailure") else f  # type: ignore[union-attr]

        return gathered.addErrback(unwrap)

    def pipeline(self, commands: Sequence[Sequence[Any]]) -> Deferred[list[Any]]:
        """
        Send several commands in one write; fires with their replies, error
        replies included as L{RedisError} values.  Fails with
        L{StoreUnavailable} when disconnected or when the connection is lost.
        """
        protocol = self._protocol
        if protocol is None:
            return fail(self._unavailable())
        return self._timed(protocol, commands).addErrback(self._translate)

    def execute(self, *args: Any) -> Deferred[Any]:
        """
        One command; fires with its reply.  Fails with L{StoreUnavailable}
        when disconnected, on a lost connection and on an error reply.
        """
        return self.pipeline([args]).addCallback(lambda replies: self.check(replies[0], args))

    def eval_script(self, script: str, keys: Sequence[Any], args: Sequence[Any]) -> Deferred[Any]:
        """
        Run a Lua script by its digest, loading it on C{NOSCRIPT} (after a
        Redis restart the script cache is empty).
        """
        sha = self._scripts.get(script)
        if sha is None:
            sha = self._scripts[script] = hashlib.sha1(script.encode("utf-8")).hexdigest()
        d = self.pipeline([["EVALSHA", sha, len(keys), *keys, *args]])

        def reply(replies: list[Any]) -> Any:
            if isinstance(replies[0], RedisError) and replies[0].code == "NOSCRIPT":
                return self.execute("EVAL", script, len(keys), *keys, *args)
            return self.check(replies[0], ("EVALSHA",))

        return d.addCallback(reply)

    def check(self, reply: Any, args: Sequence[Any]) -> Any:
        """
        C{reply}, unless it is an error reply: then L{StoreUnavailable}
        naming the command (C{args[0]}).
        """
        if isinstance(reply, RedisError):
            name = args[0] if isinstance(args[0], str) else bytes(args[0]).decode("ascii", "replace")
            raise StoreUnavailable(f"{self.address} refused {name.upper()}: {reply}")
        return reply

    def _unavailable(self) -> StoreUnavailable:
        if not self._running:
            return StoreUnavailable(f"{self.address}: the store is not started")
        return StoreUnavailable(f"{self.address} is unreachable: {self._last_error}; reconnecting in the background")

    def _translate(self, f: Failure) -> Failure:
        if f.check(ConnectionLost):
            return Failure(StoreUnavailable(f"{self.address}: connection lost ({f.getErrorMessage()})"))
        return f


def _describe(f: Failure) -> str:
    if f.check(RedisError):
        error = str(f.value)
        if error.startswith(("NOAUTH", "WRONGPASS")) or "AUTH" in error.split(" ", 1)[0]:
            return f"authentication failed ({error}); check the user and password in store_url"
        return error
    return f.getErrorMessage()
