"""
Running commands on remote hosts over SSH, with twisted.conch.

One SSH connection per host and login user is opened on first use and kept;
every command is a new channel on it, so launching, signalling and polling
kernels costs no new TCP or key exchange.  A lost connection is dropped from
the pool and the next command opens a fresh one.

Host keys are checked against a known_hosts file ("strict", the default),
optionally learning unknown hosts ("accept-new"), or not at all ("off").
Authentication is by key: the configured key files or, as C{ssh} does, the
default ones in C{~/.ssh}.  Commands run as the configured user unless a
caller names another login user (impersonation's "login" mode); that
user's keys come from the pool's C{user_keys} loader, and a host that does
not accept them fails with L{SSHAuthError}, which says nothing about the
host's health.

An SSH C{exec} request carries one string that the remote user's shell
interprets.  Callers build it with L{shell_command}, which quotes every
argument, so no value ever becomes shell syntax.
"""

from __future__ import annotations

import os
import shlex
import struct
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Sequence

from twisted.conch.client.knownhosts import KnownHostsFile
from twisted.conch.ssh import channel, common, connection, keys, transport, userauth
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from egateway.observe import OneShotObserver

_log = Logger()

DEFAULT_KEY_FILES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")


class SSHError(Exception):
    """
    A host could not be reached, refused us, or a command could not run.
    """


class HostKeyRejected(SSHError):
    pass


class SSHAuthError(SSHError):
    """
    The host accepted none of our keys for the login user.
    """


def shell_command(argv: Sequence[str]) -> str:
    """
    One shell command line running C{argv}, each argument quoted.
    """
    return " ".join(shlex.quote(arg) for arg in argv)


def _known_host_entries_blocking(path: str) -> list[Any]:
    return list(KnownHostsFile.fromPath(FilePath(path)).iterentries())


def _add_known_host_blocking(path: str, name: bytes, key: keys.Key) -> None:
    known = KnownHostsFile.fromPath(FilePath(path))
    known.addHostKey(name, key)
    known.save()


def load_keys(paths: Iterable[str]) -> list[keys.Key]:
    """
    Read the private keys that exist among C{paths} (unencrypted keys only;
    use an agent-less key for the gateway's service account).
    """
    loaded = []
    for path in paths:
        full = os.path.expanduser(path)
        if not os.path.exists(full):
            continue
        try:
            loaded.append(keys.Key.fromFile(full))
        except (keys.BadKeyError, keys.EncryptedKeyError, OSError) as e:
            _log.warn("ssh key {path} not usable: {error}", path=full, error=str(e))
    return loaded


@dataclass(frozen=True)
class SSHSettings:
    user: str
    port: int = 22
    key_files: tuple[str, ...] = DEFAULT_KEY_FILES
    known_hosts: str = "~/.ssh/known_hosts"
    host_key_checking: str = "strict"
    connect_timeout: float = 10.0


class _Transport(transport.SSHClientTransport):
    def __init__(
        self, pool: "SSHPool", host: str, ready: defer.Deferred, user: str, private_keys: list[keys.Key]
    ) -> None:
        self._pool = pool
        self._host = host
        self._ready = ready
        self._user = user
        self._keys = private_keys
        self._disconnect_reason: int | None = None
        self.connection_service: _Connection | None = None
        self.known_hosts: list[Any] = []

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> defer.Deferred:
        # Synchronous, against entries read (in a thread) before connecting:
        # conch must have the new keys before the server's next packet.
        try:
            self._pool.check_host_key(self._host, hostKey, self.known_hosts)
        except SSHError as e:
            return defer.fail(e)
        return defer.succeed(True)

    def connectionSecure(self) -> None:
        self.connection_service = _Connection(self._ready)
        self.requestService(_UserAuth(self._user.encode(), self.connection_service, self._keys))

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        self._disconnect_reason = reason
        super().sendDisconnect(reason, desc)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._pool._lost((self._host, self._user), self)
        if not self._ready.called:
            if self._disconnect_reason == transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE:
                self._ready.errback(
                    SSHAuthError(f"ssh to {self._host}: no key we have for {self._user} is accepted")
                )
                return
            why = reason.value if reason else "connection lost"
            self._ready.errback(SSHError(f"ssh to {self._host}: {why}"))


class _UserAuth(userauth.SSHUserAuthClient):
    def __init__(self, user: bytes, service: Any, private_keys: list[keys.Key]) -> None:
        super().__init__(user, service)
        self._keys = list(private_keys)
        self._current: keys.Key | None = None

    def getPublicKey(self) -> keys.Key | None:
        if not self._keys:
            return None
        self._current = self._keys.pop(0)
        return self._current.public()

    def getPrivateKey(self) -> defer.Deferred:
        assert self._current is not None
        return defer.succeed(self._current)

    def getPassword(self, prompt: Any = None) -> None:
        return None

    def getGenericAnswers(self, name: Any, instruction: Any, questions: Any) -> defer.Deferred:
        return defer.fail(SSHError("keyboard-interactive authentication is not supported"))


class _Connection(connection.SSHConnection):
    def __init__(self, ready: defer.Deferred) -> None:
        super().__init__()
        self._ready = ready

    def serviceStarted(self) -> None:
        super().serviceStarted()
        if not self._ready.called:
            self._ready.callback(self)


@dataclass(frozen=True)
class CommandResult:
    code: int | None
    signal: str | None
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.code == 0

    def describe(self) -> str:
        tail = (self.stderr or self.stdout).decode("utf-8", "replace").strip().splitlines()[-3:]
        how = f"exit code {self.code}" if self.signal is None else f"signal {self.signal}"
        return f"{how}" + (f": {' | '.join(tail)}" if tail else "")


class _ExecChannel(channel.SSHChannel):
    name = b"session"

    def __init__(self, command: bytes, stdin: bytes, done: defer.Deferred, **kw: Any) -> None:
        super().__init__(**kw)
        self._command = command
        self._stdin = stdin
        self._done = done
        self._out: list[bytes] = []
        self._err: list[bytes] = []
        self._code: int | None = None
        self._signal: str | None = None

    def openFailed(self, reason: Failure) -> None:
        if not self._done.called:
            self._done.errback(SSHError(f"cannot open an ssh channel: {reason.value}"))

    def channelOpen(self, data: bytes) -> None:
        requested = self.conn.sendRequest(self, b"exec", common.NS(self._command), wantReply=True)
        requested.addCallbacks(self._started, self._refused)

    def _started(self, _: Any) -> None:
        if self._stdin:
            self.write(self._stdin)
        self.conn.sendEOF(self)

    def _refused(self, reason: Failure) -> None:
        if not self._done.called:
            self._done.errback(SSHError(f"the host refused to run the command: {reason.value}"))
        self.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self._out.append(data)

    def extReceived(self, dataType: int, data: bytes) -> None:
        self._err.append(data)

    def request_exit_status(self, data: bytes) -> int:
        (self._code,) = struct.unpack(">L", data[:4])
        return 1

    def request_exit_signal(self, data: bytes) -> int:
        name, _ = common.getNS(data)
        self._signal = name.decode("ascii", "replace")
        return 1

    def closed(self) -> None:
        if not self._done.called:
            self._done.callback(
                CommandResult(self._code, self._signal, b"".join(self._out), b"".join(self._err))
            )


UserKeys = Callable[[str], Awaitable[list[keys.Key]]]
"""
Loads the private keys to log in as a user other than the configured one.
"""

RunBlocking = Callable[..., defer.Deferred]
"""
Runs C{f(*args)} off the reactor thread; a Deferred of its result.
"""


class SSHPool:
    """
    Keeps one SSH connection per host and login user and runs commands on
    it.

    @ivar user_keys: loads the keys for other login users (C{None}: only
        the configured user may log in).
    """

    def __init__(
        self,
        reactor: Any,
        settings: SSHSettings,
        run_blocking: RunBlocking,
        user_keys: UserKeys | None = None,
    ) -> None:
        """
        @param run_blocking: runs the key and C{known_hosts} file reads and
            writes in the gateway's thread pool.
        """
        self._reactor = reactor
        self.settings = settings
        self.user_keys = user_keys
        self._run_blocking: RunBlocking = run_blocking
        # One host key check at a time: they share the known_hosts file.
        self._known_hosts_lock = defer.DeferredLock()
        self._connections: dict[tuple[str, str], _Connection] = {}
        self._connecting: dict[tuple[str, str], OneShotObserver[_Connection]] = {}
        self._transports: dict[tuple[str, str], _Transport] = {}
        self._keys: list[keys.Key] | None = None
        self._closed = False

    async def private_keys(self) -> list[keys.Key]:
        if self._keys is None:
            self._keys = await self._run_blocking(load_keys, self.settings.key_files)
            if not self._keys:
                _log.warn(
                    "no usable ssh key among {paths}; set ssh_key_files",
                    paths=", ".join(self.settings.key_files),
                )
        return self._keys

    async def known_host_entries(self) -> list[Any]:
        """
        The C{known_hosts} entries, read in the thread pool (none when host
        keys are not checked).
        """
        if self.settings.host_key_checking == "off":
            return []
        path = os.path.expanduser(self.settings.known_hosts)
        return await self._known_hosts_lock.run(self._run_blocking, _known_host_entries_blocking, path)

    def check_host_key(self, host: str, blob: bytes, entries: list[Any]) -> None:
        """
        Check C{host}'s key against C{known_hosts} C{entries} (as
        L{KnownHostsFile.hasHostKey} does, without reading the file); under
        C{accept-new} an unknown host's key is appended to the file in the
        thread pool.

        @raise HostKeyRejected: unknown or changed host key under the policy.
        """
        policy = self.settings.host_key_checking
        if policy == "off":
            return
        key = keys.Key.fromString(blob)
        names = {host.encode()}
        if self.settings.port != 22:
            names.add(f"[{host}]:{self.settings.port}".encode())
        for entry in entries:
            if any(entry.matchesHost(name) for name in names) and entry.keyType == key.sshType():
                if entry.matchesKey(key):
                    return
                raise HostKeyRejected(
                    f"the host key of {host} does not match {self.settings.known_hosts}; "
                    "refusing to connect (possible man-in-the-middle)"
                )
        if policy == "accept-new":
            path = os.path.expanduser(self.settings.known_hosts)
            self._known_hosts_lock.run(
                self._run_blocking, _add_known_host_blocking, path, sorted(names)[0], key
            ).addCallbacks(
                lambda _: _log.info("learned the ssh host key of {host}", host=host),
                lambda f: _log.warn(
                    "could not save the ssh host key of {host} to {path}: {error}",
                    host=host,
                    path=path,
                    error=str(f.value),
                ),
            )
            return
        raise HostKeyRejected(
            f"the host key of {host} is not in {self.settings.known_hosts}; add it "
            "(ssh-keyscan) or set ssh_host_key_checking"
        )

    def connection(self, host: str, user: str | None = None) -> defer.Deferred[_Connection]:
        """
        The pooled connection to C{host} as C{user} (default: the
        configured user), opening it if needed.

        @raise SSHError: unreachable, refused, timed out, bad host key or
            authentication failure (L{SSHAuthError}).
        """
        if self._closed:
            return defer.fail(SSHError(f"ssh to {host}: the gateway is stopping"))
        key = (host, user or self.settings.user)
        existing = self._connections.get(key)
        if existing is not None:
            return defer.succeed(existing)
        connecting = self._connecting.get(key)
        if connecting is None:
            connecting = self._connecting[key] = OneShotObserver()
            defer.Deferred.fromCoroutine(self._connect(*key)).addBoth(self._connected, key, connecting)
        return connecting.when_fired()

    async def _login_keys(self, user: str) -> list[keys.Key]:
        if user == self.settings.user:
            return await self.private_keys()
        if self.user_keys is None:
            raise SSHAuthError(f"no keys are configured for logging in as {user}")
        loaded = await self.user_keys(user)
        if not loaded:
            raise SSHAuthError(f"no usable ssh key for logging in as {user}")
        return loaded

    async def _connect(self, host: str, user: str) -> _Connection:
        private_keys = await self._login_keys(user)
        known_hosts = await self.known_host_entries()
        ready: defer.Deferred[_Connection] = defer.Deferred()
        timeout = self.settings.connect_timeout
        endpoint = HostnameEndpoint(self._reactor, host, self.settings.port, timeout=timeout)

        def transport() -> _Transport:
            made = _Transport(self, host, ready, user, private_keys)
            made.known_hosts = known_hosts
            return made

        factory = Factory.forProtocol(transport)
        try:
            proto = await endpoint.connect(factory)
        except defer.CancelledError:
            raise
        except Exception as e:
            raise SSHError(f"cannot connect to {host}:{self.settings.port}: {e}") from None
        if self._closed:
            # Closed while this connection was being made: close() could not
            # see it, so nothing else would ever close it.
            proto.transport.abortConnection()
            raise SSHError(f"ssh to {host}: the gateway is stopping")
        self._transports[(host, user)] = proto
        ready.addTimeout(timeout, self._reactor)
        try:
            return await ready
        except defer.TimeoutError:
            proto.transport.abortConnection()
            raise SSHError(f"ssh to {host}: no session within {timeout:g} s") from None
        except SSHError:
            proto.transport.abortConnection()
            raise
        except defer.CancelledError:
            proto.transport.abortConnection()
            raise
        except Exception as e:
            proto.transport.abortConnection()
            raise SSHError(f"ssh to {host}: {e}") from None

    def _connected(
        self, result: Any, key: tuple[str, str], connecting: OneShotObserver[_Connection]
    ) -> None:
        if self._connecting.get(key) is connecting:
            del self._connecting[key]
        if not isinstance(result, Failure):
            self._connections[key] = result
        connecting.fire(result)
        return None

    def _lost(self, key: tuple[str, str], transport: _Transport) -> None:
        if self._transports.get(key) is transport:
            del self._transports[key]
            conn = self._connections.pop(key, None)
            if conn is not None:
                _log.info("ssh connection to {host} as {user} closed", host=key[0], user=key[1])

    async def run(
        self, host: str, command: str, stdin: bytes = b"", timeout: float = 30.0, user: str | None = None
    ) -> CommandResult:
        """
        Run a shell command line on C{host}, logged in as C{user} (default:
        the configured user), and collect its output.

        @raise SSHError: the host is unreachable or the command could not
            start or did not finish within C{timeout}.
        """
        conn = await self.connection(host, user)
        done: defer.Deferred[CommandResult] = defer.Deferred()
        chan = _ExecChannel(command.encode("utf-8"), stdin, done, conn=conn)
        conn.openChannel(chan)
        done.addTimeout(timeout, self._reactor)
        try:
            return await done
        except defer.TimeoutError:
            chan.loseConnection()
            raise SSHError(f"command on {host} did not finish within {timeout:g} s") from None

    def close(self) -> None:
        """
        Close every connection, and refuse to open any more (one being made
        now is dropped as soon as it is made).
        """
        self._closed = True
        for proto in list(self._transports.values()):
            proto.transport.loseConnection()
        self._transports.clear()
        self._connections.clear()
