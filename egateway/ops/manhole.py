"""
The manhole: a Python prompt inside the running daemon, over SSH, for an
operator who must look at (or fix) what the API does not show.

Off by default.  When on, it listens on loopback or a UNIX socket only, and
lets in only the public keys of an C{authorized_keys} file (no passwords,
no other user database).  Every login, refusal and line typed is an audit
event (L{egateway.ops.audit}), as it runs with all the gateway's power.

The namespace holds C{service} (the service tree), C{manager} (the kernel
manager), C{store} (the kernel store, or C{None}) and helpers:
C{kernels()} lists live kernels as a table, C{kernel(id)} returns one
(an id prefix is enough), C{show(id)} tabulates its model.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from typing import Any, Callable, Iterable

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.conch import manhole, manhole_ssh
from twisted.conch.error import ValidPublicKey
from twisted.conch.insults import insults
from twisted.conch.interfaces import ISession
from twisted.conch.ssh.keys import BadKeyError, Key
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from zope.interface import implementer

from egateway.ops import audit

_log = Logger()


class ManholeSetupError(Exception):
    """
    The manhole's settings or files are unusable; the message says which.
    """


def check_settings(settings: Any) -> str:
    """
    Why the C{ops} manhole settings are unusable; empty when they are fine
    (or the manhole is off).
    """
    listen = settings.manhole_listen
    if not listen:
        return ""
    if not settings.manhole_authorized_keys:
        return "ops.manhole_authorized_keys: the manhole needs an authorized_keys file"
    kind, _, rest = listen.partition(":")
    if kind == "unix":
        return ""
    if kind not in ("tcp", "tcp6"):
        return f"ops.manhole_listen: {listen!r}: use tcp:PORT:interface=127.0.0.1 (or ::1) or unix:PATH"
    interface = ""
    for part in re.split(r"(?<!\\):", rest)[1:]:
        if part.startswith("interface="):
            interface = part[len("interface=") :].replace("\\", "")
    try:
        loopback = ipaddress.ip_address(interface).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return f"ops.manhole_listen: {listen!r} must name a loopback interface (interface=127.0.0.1 or ::1)"
    return ""


def load_authorized_keys_blocking(path: str) -> list[Key]:
    """
    The public keys of an OpenSSH C{authorized_keys} file (options before
    a key, as in C{from="..." ssh-ed25519 AAAA...}, are not honoured: the
    line's key is taken and the options ignored).

    @raise ManholeSetupError: unreadable, or no key in it.
    """
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ManholeSetupError(f"cannot read the manhole's authorized keys {path}: {e.strerror or e}") from None
    found = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        for start in range(len(line.split())):
            try:
                found.append(Key.fromString(b" ".join(line.split()[start:])))
                break
            except (BadKeyError, ValueError, IndexError):
                continue
    if not found:
        raise ManholeSetupError(f"no public key in the manhole's authorized keys {path}")
    return found


def load_or_create_host_key_blocking(path: str) -> Key:
    """
    The manhole's host key, made (Ed25519, mode 0600) if the file is absent.
    """
    if not os.path.exists(path):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Key(Ed25519PrivateKey.generate())
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as f:
            f.write(key.toString("openssh"))
        _log.info("created the manhole host key {path} ({fingerprint})", path=path, fingerprint=key.fingerprint())
        return key
    try:
        return Key.fromFile(path)
    except (OSError, BadKeyError, ValueError) as e:
        raise ManholeSetupError(f"cannot load the manhole host key {path}: {e}") from None


@implementer(ICredentialsChecker)
class AuthorizedKeysChecker:
    """
    Lets in whoever proves they hold one of C{keys}, under any user name;
    audits every login and every refused key.
    """

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(self, keys: Iterable[Key]) -> None:
        self._keys = list(keys)

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        user = credentials.username.decode("utf-8", "replace")
        try:
            key = Key.fromString(credentials.blob)
        except (BadKeyError, ValueError):
            return self._refuse(user, "unreadable key", "-")
        fingerprint = key.fingerprint()
        if key not in self._keys:
            return self._refuse(user, "key not in authorized_keys", fingerprint)
        if credentials.signature is None:
            # The client asks whether the key would do; it proves it next.
            return fail(ValidPublicKey())
        if not key.verify(credentials.signature, credentials.sigData):
            return self._refuse(user, "bad signature", fingerprint)
        audit.event("manhole.login", user=user, key=fingerprint)
        return succeed(f"{user} ({fingerprint})")

    def _refuse(self, user: str, reason: str, fingerprint: str) -> Deferred[Any]:
        audit.event("manhole.refused", user=user, key=fingerprint, reason=reason)
        return fail(UnauthorizedLogin(reason))


class AuditedManhole(manhole.ColoredManhole):
    """
    The interactive prompt; every line is audited before it runs.
    """

    def __init__(self, namespace: dict[str, Any], who: str) -> None:
        super().__init__(namespace)
        self._who = who

    def lineReceived(self, line: bytes) -> None:
        audit.event("manhole.command", user=self._who, command=line.decode("utf-8", "replace"))
        super().lineReceived(line)


class _Session(manhole_ssh.TerminalSession):
    """
    Twisted's terminal session, tolerating what OpenSSH sends: a window
    resize, and EOF when its standard input ends (the session then ends).
    """

    _shell: Any = None

    def openShell(self, proto: Any) -> None:
        self._shell = proto
        super().openShell(proto)

    def windowChanged(self, newWindowSize: Any) -> None:
        pass

    def eofReceived(self) -> None:
        if self._shell is not None:
            self._shell.loseConnection()


class _Realm(manhole_ssh.TerminalRealm):
    sessionFactory = _Session

    def __init__(self, namespace: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self._namespace = namespace

    def _getAvatar(self, avatarId: Any) -> Any:
        user = super()._getAvatar(avatarId)
        session = user.original.getComponent(ISession)
        session.chainedProtocolFactory = lambda: insults.ServerProtocol(AuditedManhole, self._namespace(), avatarId)
        return user


class ManholeService(MultiService):
    """
    The SSH listener of the manhole; its keys are read when it starts (so
    a bad file stops start-up with a message saying which).
    """

    name = "manhole"

    def __init__(
        self,
        listen: str,
        authorized_keys: str,
        host_key: Callable[[], str],
        namespace: Callable[[], dict[str, Any]],
        reactor: Any,
    ) -> None:
        """
        @param host_key: returns the host key's path (the data directory
            is known only once it is made).
        @param namespace: returns the names a new session starts with.
        """
        super().__init__()
        self._listen = listen
        self._authorized_keys = authorized_keys
        self._host_key = host_key
        self._namespace = namespace
        self._reactor = reactor

    def startService(self) -> None:
        try:
            self._start()
        except ManholeSetupError as e:
            # Unusable files or a busy port: one line, no traceback.
            sys.stderr.write(f"egateway: {e}\n")
            raise SystemExit(1) from None

    def _start(self) -> None:
        keys = load_authorized_keys_blocking(self._authorized_keys)
        host_key = load_or_create_host_key_blocking(self._host_key())
        factory = manhole_ssh.ConchFactory(Portal(_Realm(self._namespace), [AuthorizedKeysChecker(keys)]))
        # ConchFactory's key tables are class attributes: give it its own.
        factory.publicKeys = {host_key.sshType(): host_key.public()}
        factory.privateKeys = {host_key.sshType(): host_key}
        factory.noisy = False
        strports.service(self._listen, factory, reactor=self._reactor).setServiceParent(self)
        try:
            super().startService()
        except CannotListenError as e:
            raise ManholeSetupError(f"the manhole cannot listen on {self._listen}: {e.socketError}") from None
        _log.info(
            "manhole listening on {listen} for the keys in {keys}",
            listen=self._listen,
            keys=self._authorized_keys,
        )


# -- the namespace -----------------------------------------------------------


class Table(list):
    """
    Rows that print as an aligned text table in the manhole.
    """

    def __init__(self, header: list[str], rows: Iterable[list[Any]]) -> None:
        super().__init__([list(header)] + [[str(cell) for cell in row] for row in rows])

    def __repr__(self) -> str:
        widths = [max(len(row[i]) for row in self) for i in range(len(self[0]))]
        return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in self)


def namespace(top: Any, manager: Any) -> dict[str, Any]:
    """
    What a manhole session starts with.
    """

    def kernels() -> Table:
        """
        The live kernels: id, kernelspec, state, user, launcher, clients.
        """
        return Table(
            ["id", "spec", "state", "user", "launcher", "connections"],
            (
                [k.id, k.spec.name, k.state.value, k.username, k.launcher_name, k.model().get("connections", 0)]
                for k in manager.kernels.values()
            ),
        )

    def kernel(kernel_id: str) -> Any:
        """
        The kernel whose id is (or starts with) C{kernel_id}.
        """
        matches = [k for k in manager.kernels.values() if k.id.startswith(kernel_id)]
        if len(matches) != 1:
            raise KeyError(f"{len(matches)} kernels match {kernel_id!r}")
        return matches[0]

    def show(kernel_id: str) -> Table:
        """
        One kernel's model as a table of fields.
        """
        return Table(["field", "value"], ([name, value] for name, value in kernel(kernel_id).model().items()))

    persistence = manager.persistence
    return {
        "service": top,
        "manager": manager,
        "store": persistence.store if persistence is not None else None,
        "kernels": kernels,
        "kernel": kernel,
        "show": show,
    }
