"""
A small Redis client on Twisted endpoints, made for a store that must keep
working through Redis outages.

Why our own: the gateway needs commands to fail at once (with
L{StoreUnavailable}) while Redis is unreachable, rather than queue until it
returns, and to reconnect by itself; it needs only a dozen commands,
pipelined, and Lua scripts.  RESP2 is a small protocol.

L{RedisClient} keeps one connection, reconnecting with exponential back-off
(with jitter) for as long as it is started: a Twisted L{ClientService} with a
L{backoffPolicy} keeps it, over an endpoint that fires only once the
connection is logged in (and, with sentinels, on the primary).  A command
sent while disconnected fails immediately; a command without a reply within
C{command_timeout} fails, and the connection is dropped and remade (its
replies can no longer be matched to requests).

High availability (C{redis+sentinel://}): each connection starts by asking
the sentinels, in turn, where the primary is (C{SENTINEL
get-master-addr-by-name}), and checks with C{ROLE} that the server it
reached is a primary.  A lost connection, a C{-READONLY} reply (the
server was demoted) or a sentinel's C{+switch-master} announcement (the
client stays subscribed on one sentinel) drops the connection, and the next
one asks the sentinels again, so the client follows a failover by itself
within about the sentinels' C{down-after-milliseconds} plus their election.

What a failover can lose, and what the client does about it: Redis
replicates asynchronously, so a write the old primary acknowledged but had
not yet sent to a replica is gone once that replica is promoted.  With
C{replicas=N} (the default for sentinel URLs is 1) every batch of commands
that writes is followed by C{WAIT N}: its reply says how many replicas hold
the write, and a write no replica confirmed within C{replica_wait} is
logged as at risk (the gateway keeps working; refusing writes whenever the
replica lags would turn a replica outage into a store outage).  A write in
flight when the primary dies fails with L{StoreUnavailable}, as in any
outage, and the caller deals with it as it already must: a kernel start
answers 503, a refused record update is retried by the gateway's persistence
loop, a journal batch is still served from the gateway's own journal.  We chose
this over re-saving every record after a switch: C{WAIT} closes the window
for every write in one place (the connection), without the store knowing
what the gateway holds, and a gateway re-saving its copy could overwrite a
newer record another gateway wrote since.
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import CancelledError, Deferred, fail, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from egateway.observe import OneShotObserver
from egateway.store.interface import StoreRefused, StoreUnavailable


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
    Where Redis is and how to log in, from a store URL::

        redis://[[user]:password@]host[:port][/db][?replicas=N]
        rediss://[[user]:password@]host[:port][/db][?ca=PATH&cert=PATH&key=PATH&replicas=N]
        redis+sentinel://[[user]:password@]host1[:port1],host2[:port2],.../master-name[/db][?replicas=N]
        rediss+sentinel://...   (TLS to the sentinels and to the primary, same query parameters)

    C{rediss} is TLS: C{ca} is the PEM file of the certificate authority the
    server's certificate must chain to (default: the system's), C{cert} and
    C{key} the client's certificate and key when the server checks them
    (C{tls-auth-clients yes}).  The server's certificate must name the host
    (or IP address) the gateway connects to.

    With C{+sentinel}, the hosts are Redis Sentinels (port 26379 by default),
    asked in turn where the primary of C{master-name} is; the user and
    password are the primary's (the sentinels are asked without one).
    C{replicas} (default 1 with sentinels, else 0) is how many replicas must
    confirm each write (C{WAIT}) before the gateway counts it as safe; see
    L{RedisClient}.
    """

    host: str
    port: int = 6379
    db: int = 0
    username: str = ""
    password: str = ""
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str = ""
    replicas: int = 0

    @classmethod
    def from_url(cls, url: str) -> "RedisAddress":
        """
        Parse a C{redis://}, C{rediss://}, C{redis+sentinel://} or
        C{rediss+sentinel://} URL.

        @raise ValueError: not such a URL (the message never contains the
            password).
        """
        parts = urlsplit(url)
        scheme = parts.scheme
        if scheme not in SCHEMES:
            raise ValueError(f"expected a redis://, rediss://, redis+sentinel:// or rediss+sentinel:// URL, "
                             f"got scheme {scheme!r}")
        tls = scheme.startswith("rediss")
        sentinel = scheme.endswith("+sentinel")
        if parts.fragment:
            raise ValueError(f"{scheme}:// URLs take no fragment")
        options = _query(parts.query, scheme, tls)
        credentials, _, hosts = parts.netloc.rpartition("@")
        username, _, password = credentials.partition(":")
        path = [piece for piece in parts.path.split("/") if piece]
        if sentinel:
            sentinels = tuple(_host_port(item, 26379, scheme) for item in hosts.split(","))
            if not path:
                raise ValueError(f"a {scheme}:// URL names the master after the hosts: {scheme}://host:26379/mymaster")
            master_name, db_text = unquote(path[0]), "/".join(path[1:])
            host, port = sentinels[0]
        else:
            sentinels, master_name, db_text = (), "", "/".join(path)
            host, port = _host_port(hosts, 6379, scheme)
        if db_text and not db_text.isdigit():
            raise ValueError(f"the database of a {scheme}:// URL is a number (/0), not {db_text!r}")
        replicas = options.pop("replicas", "1" if sentinel else "0")
        if not replicas.isdigit():
            raise ValueError(f"replicas= in a {scheme}:// URL is a number of replicas (0 turns WAIT off)")
        return cls(
            host=host,
            port=port,
            db=int(db_text or 0),
            username=unquote(username),
            password=unquote(password),
            tls=tls,
            tls_ca=options.get("ca", ""),
            tls_cert=options.get("cert", ""),
            tls_key=options.get("key", ""),
            sentinels=sentinels,
            master_name=master_name,
            replicas=int(replicas),
        )

    @property
    def scheme(self) -> str:
        return ("rediss" if self.tls else "redis") + ("+sentinel" if self.sentinels else "")

    def __str__(self) -> str:
        if self.sentinels:
            hosts = ",".join(_join_host_port(host, port) for host, port in self.sentinels)
            return f"{self.scheme}://{hosts}/{quote(self.master_name, safe='')}/{self.db}"
        return f"{self.scheme}://{_join_host_port(self.host, self.port)}/{self.db}"

    def __repr__(self) -> str:
        return f"<RedisAddress {self}>"


SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel")
"""
The URL schemes of a Redis store.
"""


def _query(query: str, scheme: str, tls: bool) -> dict[str, str]:
    allowed = {"replicas"} | ({"ca", "cert", "key"} if tls else set())
    options: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if name not in allowed:
            raise ValueError(
                f"unknown parameter {name!r} in the {scheme}:// URL; it takes {', '.join(sorted(allowed))}"
                + ("" if tls else " (ca, cert and key are for rediss://)")
            )
        options[name] = value
    if ("cert" in options) != ("key" in options):
        raise ValueError(f"a {scheme}:// URL gives the client certificate with both cert= and key=")
    return options


def _host_port(text: str, default_port: int, scheme: str) -> tuple[str, int]:
    parts = urlsplit("//" + text)
    try:
        port = parts.port or default_port
    except ValueError:
        raise ValueError(f"a port in the {scheme}:// URL is not a number from 1 to 65535") from None
    host = parts.hostname or ""
    if not host:
        raise ValueError(f"the {scheme}:// URL names no host")
    return host, port


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
        # Where messages nobody asked for go (a subscription); None: they are an error.
        self.pushed: Callable[[Any], None] | None = None

    def connectionMade(self) -> None:
        # Made once, and again when handed to the ClientService (L{_Handover}).
        if not self.made.called:
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
                if self.pushed is not None:
                    self.pushed(reply)
                    continue
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
        self.failure_reason = self.failure_reason or _describe_loss(reason)
        # The client forgets this connection before anyone hears of the
        # failure, so nothing is sent on it from an errback below.
        self.lost.callback(None)
        pending, self._pending = self._pending, deque()
        for waiting in pending:
            waiting.errback(ConnectionLost(self.failure_reason))


class ConnectionLost(Exception):
    pass


class UnreadableFile(OSError):
    """
    A file C{store_url} names (C{ca=}, C{cert=}, C{key=}) cannot be read.
    """


class NoPrimary(Exception):
    """
    The sentinels named no primary, or the server they named is not one.
    """


_READS = frozenset({"GET", "HGET", "HGETALL", "ZRANGEBYSCORE", "SMEMBERS", "EXISTS", "PING", "ROLE", "INFO"})
"""
Commands that write nothing: a batch of only these is not followed by C{WAIT}.
Anything else counts as a write, so a command added later errs on the safe side.
"""


def _describe_loss(reason: Failure) -> str:
    from OpenSSL.SSL import Error as TLSError

    if reason.check(TLSError):
        return f"TLS handshake failed ({reason.getErrorMessage()}); check ca=, cert= and key= in store_url"
    return reason.getErrorMessage()


class _Handover(Protocol):
    """
    What a connection's transport talks to: the L{RedisProtocol} while it
    is being logged in, then the L{ClientService}'s proxy of it, so the
    service hears of its loss only once it holds it.
    """

    def __init__(self, target: Any) -> None:
        self.target = target

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.target.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.target.dataReceived(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.target.connectionLost(reason)


class _Adopting(Factory):
    """
    The L{ClientService}'s factory: its "new" protocol is the connection
    L{_ReadyEndpoint} has just made ready.
    """

    noisy = False

    def __init__(self) -> None:
        self.ready: RedisProtocol | None = None

    def buildProtocol(self, addr: Any) -> RedisProtocol | None:
        protocol, self.ready = self.ready, None
        return protocol


@implementer(IStreamClientEndpoint)
class _ReadyEndpoint:
    """
    Connects and prepares a connection (finds the primary, logs in, or
    subscribes), and only then gives it to the L{ClientService}: a failed
    preparation is a failed connection attempt, backed off like one.

    (Not C{ClientService}'s C{prepareConnection}: a connection it rejects is
    left open, and closing it breaks the service's state machine.)
    """

    def __init__(self, prepare: Callable[[], Any], what: str) -> None:
        """
        @param prepare: a coroutine function connecting a L{RedisProtocol}
            (through a L{_Handover}) and preparing it; returns both.
        @param what: for the service's log lines.
        """
        self._prepare = prepare
        self._what = what
        self.factory = _Adopting()

    def __repr__(self) -> str:
        return self._what

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: IProtocolFactory) -> IProtocol:
        protocol, handover = await self._prepare()
        self.factory.ready = protocol
        proxy = factory.buildProtocol(protocol.transport.getPeer())  # type: ignore[union-attr]
        assert proxy is not None
        proxy.makeConnection(protocol.transport)  # type: ignore[arg-type]
        handover.target = proxy
        return proxy


class RedisClient:
    """
    A self-healing connection to one Redis.

    @param reactor: provides C{IReactorTime} and C{IReactorTCP}.
    @ivar retry_policy: seconds before the next connection attempt, by the
        number of failed attempts in a row (L{backoffPolicy}).
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
        replica_wait: float = 0.5,
        retry_policy: Callable[[int], float] | None = None,
    ) -> None:
        """
        @param min_backoff: seconds before the first reconnection (plus up
            to as much jitter).
        @param max_backoff: seconds between attempts at most (plus jitter).
        @param retry_policy: overrides C{min_backoff} and C{max_backoff}.
        """
        self.address = address
        self._replica_wait = replica_wait
        self._unconfirmed = 0
        self._server: tuple[str, int] = (address.host, address.port)
        self._tls_files: tuple[bytes | None, bytes | None] | None = None
        self._sockets: set[RedisProtocol] = set()
        self._watch_failures = 0
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self.retry_policy = retry_policy or backoffPolicy(
            initialDelay=min_backoff / 2,
            maxDelay=max_backoff,
            factor=2.0,
            jitter=lambda: random.uniform(0, min_backoff),
        )
        self._running = False
        self._protocol: RedisProtocol | None = None
        self._failures = 0
        self._last_error = "not connected yet"
        self._scripts: dict[str, str] = {}
        # The outcome of the attempt in progress, for start()'s callers.
        self._attempt: OneShotObserver[None] = OneShotObserver()
        # Made at each start: a stopped ClientService cannot start again.
        self._service: ClientService | None = None
        self._watch: ClientService | None = None

    def _keeping(self, prepare: Callable[[], Any], what: str) -> ClientService:
        """
        A service keeping one connection that C{prepare} makes ready.
        """
        endpoint = _ReadyEndpoint(prepare, f"{what} of {self.address}")
        return ClientService(endpoint, endpoint.factory, retryPolicy=self.retry_policy, clock=self._reactor)

    @property
    def connected(self) -> bool:
        return self._protocol is not None

    # -- life cycle -------------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        Connect, and keep reconnecting until L{stop}.  Fires once connected,
        or fails with L{StoreUnavailable} when the next attempt fails; the
        client keeps trying in the background either way.
        """
        if self._protocol is not None:
            return succeed(None)
        # Our own waiters, not the service's whenConnected: it still offers
        # a connection whose loss it has not yet been told of.
        waiter = self._attempt.when_fired()
        if not self._running:
            self._running = True
            self._service = self._keeping(self._open, "the Redis primary")
            if self.address.sentinels:
                self._watch = self._keeping(self._subscribe, "the sentinels")
            self._service.startService()
            if self._watch is not None:
                self._watch.startService()
        return waiter.addBoth(self._next_turn).addCallbacks(lambda _: None, self._start_failed)

    def _next_turn(self, result: Any) -> Deferred[Any]:
        """
        C{result}, on the reactor's next turn: an attempt ends in the
        middle of the service's state change, when whoever waits may not
        call it again (stop it, typically).
        """
        later: Deferred[Any] = Deferred()
        self._reactor.callLater(0, later.callback, result)
        return later

    def _start_failed(self, f: Failure) -> Failure:
        if f.check(CancelledError):
            return Failure(StoreUnavailable(f"{self.address}: the store was stopped"))
        if _refused(f):
            return Failure(StoreRefused(f"{self.address} refuses this gateway: {_describe(f)}"))
        return Failure(StoreUnavailable(f"{self.address} is unreachable: {_describe(f)}"))

    def stop(self) -> Deferred[None]:
        """
        Stop reconnecting and close the connection; fires once every socket
        this client opened is closed.
        """
        self._running = False
        protocol = self._protocol
        if protocol is not None:
            protocol.failure_reason = "the store was stopped"
        self._end_attempt(Failure(CancelledError()))
        # Not a second time: its state machine may be the one running now.
        stopping = [service.stopService() for service in (self._service, self._watch) if service and service.running]
        # Every socket this client opened: the connection, one being made,
        # a question to a sentinel.
        for socket in list(self._sockets):
            if not socket.closed and socket.made.called:
                socket.transport.loseConnection()  # type: ignore[union-attr]
        stopping += [p.lost for p in self._sockets if not p.closed]
        return gatherResults(stopping).addCallback(lambda _: None)

    async def _open(self) -> tuple[RedisProtocol, _Handover]:
        """
        Find the primary (asking the sentinels, if any), connect to it and
        log in: one connection attempt of the L{ClientService}.
        """
        try:
            if self.address.sentinels:
                server = await self._ask_sentinels()
                if server != self._server:
                    self._log.info(
                        "store: the sentinels name {host}:{port} as the primary of {master}",
                        host=server[0],
                        port=server[1],
                        master=self.address.master_name,
                    )
                self._server = server
            protocol = RedisProtocol()
            handover = _Handover(protocol)
            await self._endpoint(*self._server).connect(self._factory(protocol, handover))
            await self._handshake(protocol)
        except CancelledError:
            raise
        except Exception as e:
            self._connect_failed(Failure(e))
            raise
        self._connected(protocol)
        return protocol, handover

    def _factory(self, protocol: RedisProtocol, handover: Protocol | None = None) -> Factory:
        def build() -> Protocol:
            self._sockets.add(protocol)
            protocol.lost.addCallback(lambda _: self._sockets.discard(protocol))
            return handover or protocol

        factory = Factory.forProtocol(build)
        factory.noisy = False  # one log line per reconnection attempt is enough
        return factory

    async def _ask_sentinels(self) -> tuple[str, int]:
        """
        The primary's address from the first sentinel that knows it.

        @raise NoPrimary: no sentinel answered with an address; the message
            says what each one did.
        """
        problems = []
        for host, port in self.address.sentinels:
            protocol = RedisProtocol()
            try:
                await self._endpoint(host, port).connect(self._factory(protocol))
                [reply] = await self._timed(protocol, [["SENTINEL", "get-master-addr-by-name", self.address.master_name]])
            except (ConnectError, DNSLookupError, ConnectionLost) as e:
                problems.append(f"{host}:{port}: {e}")
                continue
            finally:
                if protocol.made.called and not protocol.closed:
                    protocol.transport.loseConnection()  # type: ignore[union-attr]
            if isinstance(reply, RedisError):
                problems.append(f"{host}:{port}: {reply}")
            elif not reply:
                problems.append(f"{host}:{port} knows no master named {self.address.master_name!r}")
            else:
                return reply[0].decode("ascii", "replace"), int(reply[1])
        raise NoPrimary("no sentinel named the primary (" + "; ".join(problems) + ")")

    # -- following +switch-master ------------------------------------------

    async def _subscribe(self) -> tuple[RedisProtocol, _Handover]:
        """
        Subscribe to C{+switch-master} on the first sentinel that takes it,
        so a failover is followed as soon as the sentinels announce it, even
        when the old primary is still reachable from here (cut off from the
        sentinels only); without it, the switch is noticed at the next lost
        connection or C{-READONLY}.  One connection attempt of the
        subscription's L{ClientService}, which makes it again when lost.
        """
        problems = []
        for host, port in self.address.sentinels:
            protocol = RedisProtocol()
            protocol.pushed = self._announced
            handover = _Handover(protocol)
            try:
                await self._endpoint(host, port).connect(self._factory(protocol, handover))
                [reply] = await self._timed(protocol, [["SUBSCRIBE", "+switch-master"]])
            except (ConnectError, DNSLookupError, ConnectionLost) as e:
                problems.append(f"{host}:{port}: {e}")
                continue
            except BaseException:
                if protocol.made.called and not protocol.closed:
                    protocol.transport.abortConnection()  # type: ignore[union-attr]
                raise
            if isinstance(reply, RedisError):
                problems.append(f"{host}:{port}: {reply}")
                protocol.transport.loseConnection()  # type: ignore[union-attr]
                continue
            self._watch_failures = 0
            return protocol, handover
        self._watch_failures += 1
        error = "no sentinel took the subscription (" + "; ".join(problems) + ")"
        if self._watch_failures == 1 or self._watch_failures % 30 == 0:
            self._log.warn(
                "store: cannot follow the sentinels' announcements ({error}); retrying",
                error=error,
            )
        raise NoPrimary(error)

    def _announced(self, message: Any) -> None:
        """
        A sentinel's C{+switch-master} message: C{name old-ip old-port
        new-ip new-port}.  Drop a connection to anything but the new
        primary; the next connection asks the sentinels.
        """
        if not isinstance(message, list) or len(message) != 3 or message[0] != b"message":
            return
        fields = bytes(message[2]).decode("utf-8", "replace").split()
        if len(fields) != 5 or fields[0] != self.address.master_name or not fields[4].isdigit():
            return
        new = (fields[3], int(fields[4]))
        self._log.info(
            "store: the sentinels switched the primary of {master} to {host}:{port}",
            master=self.address.master_name,
            host=new[0],
            port=new[1],
        )
        protocol = self._protocol
        if protocol is not None and self._server != new:
            self._protocol = None
            protocol.abort(f"the sentinels switched the primary to {new[0]}:{new[1]}")

    def _endpoint(self, host: str, port: int) -> Any:
        timeout = self._connect_timeout
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            endpoint: Any = HostnameEndpoint(self._reactor, host, port, timeout=timeout)
        else:
            if ip.version == 4:
                endpoint = TCP4ClientEndpoint(self._reactor, host, port, timeout=timeout)
            else:
                endpoint = TCP6ClientEndpoint(self._reactor, host, port, timeout=timeout)
        if self.address.tls:
            endpoint = wrapClientTLS(self._tls_options(host), endpoint)
        return endpoint

    def _tls_options(self, host: str) -> Any:
        """
        TLS settings for a connection to C{host}: its certificate must chain
        to C{ca=} (or the system's authorities) and name C{host}.  The files
        are read once, at the first connection (a few kilobytes, read while
        the reactor waits: not worth a thread), so a changed certificate
        needs a restart.

        @raise OSError: a file cannot be read.
        """
        from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS

        if self._tls_files is None:
            address = self.address
            ca = _read_tls_file(address.tls_ca, "ca") if address.tls_ca else None
            pair = None
            if address.tls_cert:
                pair = _read_tls_file(address.tls_cert, "cert") + b"\n" + _read_tls_file(address.tls_key, "key")
            self._tls_files = (ca, pair)
        ca, pair = self._tls_files
        return optionsForClientTLS(
            host,
            trustRoot=Certificate.loadPEM(ca) if ca else None,
            clientCertificate=PrivateCertificate.loadPEM(pair) if pair else None,
        )

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
        if self.address.sentinels:
            commands.append(["ROLE"])
        replies = await self._timed(protocol, commands)
        for reply in replies:
            if isinstance(reply, RedisError):
                raise reply
        if self.address.sentinels and replies[-1][0] != b"master":
            host, port = self._server
            raise NoPrimary(f"{host}:{port} is a {replies[-1][0].decode('ascii', 'replace')}, not the primary yet")

    def _handshake(self, protocol: RedisProtocol) -> Deferred[RedisProtocol]:
        d = Deferred.fromCoroutine(self._handshake_steps(protocol))

        def failed(f: Failure) -> Failure:
            protocol.transport.abortConnection()  # type: ignore[union-attr]
            return f

        return d.addCallbacks(lambda _: protocol, failed)

    def _connected(self, protocol: RedisProtocol) -> None:
        if self._failures:
            self._log.info(
                "store: connected to {address} again after {failures} failed attempts",
                address=str(self.address),
                failures=self._failures,
            )
        self._failures = 0
        self._protocol = protocol
        protocol.lost.addCallback(lambda _: self._disconnected(protocol))
        self._end_attempt(None)

    def _connect_failed(self, f: Failure) -> None:
        """
        One attempt failed; the service tries again after its back-off.
        """
        self._last_error = _describe(f)
        self._failures += 1
        if self._failures == 1 or self._failures % 30 == 0:
            self._log.warn(
                "store: cannot reach {address}: {error}; retrying with back-off",
                address=str(self.address),
                error=self._last_error,
            )
        self._end_attempt(f)

    def _end_attempt(self, outcome: Failure | None) -> None:
        attempt, self._attempt = self._attempt, OneShotObserver()
        attempt.fire(outcome)

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

    # -- commands ---------------------------------------------------------

    def _timed(self, protocol: RedisProtocol, commands: Sequence[Sequence[Any]]) -> Deferred[list[Any]]:
        """
        Send C{commands} on C{protocol}; fires with the list of replies (error
        replies as L{RedisError} values), or fails with L{ConnectionLost}.
        A batch not fully answered in time aborts the connection.
        """
        waiting = protocol.send(commands)
        timer = self._reactor.callLater(self._command_timeout, self._overdue, protocol, waiting[-1])
        if len(waiting) == 1:
            # One command (every journal append): its reply as a list of
            # one, without gathering (a DeferredList and two more callbacks
            # per command, on the reactor for each message journalled).
            def single(result: Any) -> Any:
                if timer.active():
                    timer.cancel()
                if isinstance(result, Failure):
                    return [result.value] if result.check(RedisError) else result
                return [result]

            return waiting[0].addBoth(single)
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

    def _overdue(self, protocol: RedisProtocol, last: Deferred[Any]) -> None:
        """
        The command timeout passed before the last reply of a batch came.
        Abort only if it is still missing after one more pass over the
        sockets: after a stall of the reactor longer than the timeout (a
        long turn, a process starved of CPU), timers run before the reads
        that waited meanwhile, and the reply may be there, unread.
        """

        def confirm() -> None:
            if not last.called:
                protocol.abort(f"no reply within {self._command_timeout:g}s")

        self._reactor.callLater(0, confirm)

    def pipeline(self, commands: Sequence[Sequence[Any]]) -> Deferred[list[Any]]:
        """
        Send several commands in one write; fires with their replies, error
        replies included as L{RedisError} values.  Fails with
        L{StoreUnavailable} when disconnected or when the connection is lost.
        """
        protocol = self._protocol
        if protocol is None:
            return fail(self._unavailable())
        wait = self.address.replicas > 0 and any(_name(command[0]) not in _READS for command in commands)
        if wait:
            commands = [*commands, ["WAIT", self.address.replicas, max(1, int(self._replica_wait * 1000))]]
        d = self._timed(protocol, commands).addCallback(self._after, protocol, wait)
        return d.addErrback(self._translate)

    def _after(self, replies: list[Any], protocol: RedisProtocol, wait: bool) -> list[Any]:
        """
        Drop a connection to a server that was demoted (C{-READONLY}: the
        next connection asks the sentinels again), and take off the reply to
        our C{WAIT}, logging a write no replica confirmed.
        """
        if any(isinstance(reply, RedisError) and reply.code == "READONLY" for reply in replies):
            if self._protocol is protocol:
                self._protocol = None  # nothing more is sent on it
            protocol.abort("the server is a replica now (READONLY)")
            raise ConnectionLost("the server is a replica now (READONLY)")
        if not wait:
            return replies
        replicas = replies.pop()
        if not isinstance(replicas, int) or replicas < self.address.replicas:
            # An error (an ACL user without WAIT) is as unconfirmed as a timeout.
            self._unconfirmed += 1
            if self._unconfirmed == 1 or self._unconfirmed % 1000 == 0:
                self._log.warn(
                    "store: {count} writes to {address} not confirmed by {replicas} replica(s) within {wait:g}s "
                    "({answer}): a failover now would lose them; check the replicas (or set replicas= in store_url)",
                    count=self._unconfirmed,
                    address=str(self.address),
                    replicas=self.address.replicas,
                    wait=self._replica_wait,
                    answer=f"WAIT answered {replicas}",
                )
        elif self._unconfirmed:
            self._log.info("store: the replicas of {address} confirm writes again", address=str(self.address))
            self._unconfirmed = 0
        return replies

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
            raise StoreUnavailable(f"{self.address} refused {_name(args[0])}: {reply}")
        return reply

    def _unavailable(self) -> StoreUnavailable:
        if not self._running:
            return StoreUnavailable(f"{self.address}: the store is not started")
        return StoreUnavailable(f"{self.address} is unreachable: {self._last_error}; reconnecting in the background")

    def _translate(self, f: Failure) -> Failure:
        if f.check(ConnectionLost):
            return Failure(StoreUnavailable(f"{self.address}: connection lost ({f.getErrorMessage()})"))
        return f


def _authentication_failed(error: str) -> bool:
    return error.startswith(("NOAUTH", "WRONGPASS")) or "AUTH" in error.split(" ", 1)[0]


def _refused(f: Failure) -> bool:
    """
    Whether the attempt failed on the configuration (the password, a TLS
    file), which no retry mends.
    """
    return bool(f.check(UnreadableFile)) or bool(f.check(RedisError) and _authentication_failed(str(f.value)))


def _describe(f: Failure) -> str:
    if f.check(RedisError):
        error = str(f.value)
        if _authentication_failed(error):
            return f"authentication failed ({error}); check the user and password in store_url"
        return error
    return f.getErrorMessage()


def _name(command: Any) -> str:
    return (command if isinstance(command, str) else bytes(command).decode("ascii", "replace")).upper()


def _read_tls_file(path: str, parameter: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UnreadableFile(f"cannot read {parameter}={path} of store_url: {e.strerror}") from None
