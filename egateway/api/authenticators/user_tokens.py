"""
Per-user tokens, from a file that holds the tokens' SHA-256 hashes (never
the tokens, so a copy of the file lets no one in).

The file is TOML (JSON when its name ends in C{.json}), one table per token,
named by the hash in lower-case hex::

    [9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08]
    username = "alice"
    groups = ["physics"]   # optional
    admin = false          # optional

C{python -m egateway.api.authenticators.user_tokens alice --group physics}
makes a new random token and prints it with its entry.

The file is watched: a change (new mtime, size or inode, as an editor's
rename-into-place makes) is loaded in a thread and replaces the table
whole; a file that does not parse is refused, with the reason logged, and
the previous table stays.  A new table is announced to C{on_change}
listeners, so that open WebSockets of a removed token are closed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import sys
import tomllib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from zope.interface import implementer

from egateway.api.authenticators.interface import IAuthenticator, presented_token
from egateway.api.identity import Identity, valid_username
from egateway.observe import Operation

_log = Logger()

POLL_INTERVAL = 5.0
"""
Seconds between checks of the token file for changes.
"""

_HASH = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = {"username", "groups", "admin"}

Signature = tuple[int, int, int]
Blocking = Callable[..., Deferred]


class TokenFileError(ValueError):
    """
    The token file cannot be used; the message says where and why (it never
    quotes a hash in full).
    """


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenTable:
    identities: Mapping[str, Identity]
    signature: Signature | None


def parse_token_file(data: bytes, json_format: bool) -> dict[str, Identity]:
    """
    The identities in a token file's contents, by token hash.

    @raise TokenFileError: malformed contents.
    """
    try:
        document = json.loads(data) if json_format else tomllib.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenFileError(f"not valid {'JSON' if json_format else 'TOML'}: {e}") from None
    if not isinstance(document, dict):
        raise TokenFileError("the top level must map token hashes to entries")
    identities: dict[str, Identity] = {}
    for key, entry in document.items():
        where = f"entry {key[:8]}..."
        if not isinstance(key, str) or not _HASH.match(key):
            raise TokenFileError(f"{where}: keys must be SHA-256 hashes of tokens, in lower-case hex (64 digits)")
        if not isinstance(entry, dict):
            raise TokenFileError(f"{where}: must be a table with username, groups, admin")
        unknown = set(entry) - _FIELDS
        if unknown:
            raise TokenFileError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; allowed: username, groups, admin")
        username = entry.get("username")
        if not valid_username(username):
            raise TokenFileError(f"{where}: username must be a user name (no spaces, slashes or colons)")
        groups = entry.get("groups", [])
        if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
            raise TokenFileError(f"{where}: groups must be a list of names")
        admin = entry.get("admin", False)
        if not isinstance(admin, bool):
            raise TokenFileError(f"{where}: admin must be true or false")
        identities[key] = Identity(
            username=username,
            groups=frozenset(groups),
            admin=admin,
            authenticated=True,
            method=UserTokensAuthenticator.name,
        )
    return identities


def _signature(st: os.stat_result) -> Signature:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def stat_blocking(path: str) -> Signature | None:
    try:
        return _signature(os.stat(path))
    except FileNotFoundError:
        return None


def load_blocking(path: str) -> tuple[Signature, dict[str, Identity]]:
    """
    Read and parse the token file (in a thread: it touches the disk).

    @raise OSError: unreadable.
    @raise TokenFileError: malformed.
    """
    with open(path, "rb") as f:
        signature = _signature(os.fstat(f.fileno()))
        data = f.read()
    return signature, parse_token_file(data, path.endswith(".json"))


@implementer(IAuthenticator)
class UserTokensAuthenticator(Service):
    name = "user-tokens"

    def __init__(
        self,
        path: str,
        *,
        clock: Any,
        blocking: Blocking,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        """
        @param blocking: runs a blocking function off the reactor thread:
            C{blocking(f, *args)} returns a Deferred of its result.
        """
        self.path = path
        self._clock = clock
        self._blocking = blocking
        self._poll_interval = poll_interval
        self._table: TokenTable | None = None
        self._loading: Operation[None] | None = None
        self._watcher: LoopingCall | None = None
        self.on_change: list[Callable[[], None]] = []

    # -- service -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._watcher = LoopingCall(self._poll)
        self._watcher.clock = self._clock
        self._watcher.start(self._poll_interval, now=True)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._watcher is not None and self._watcher.running:
            self._watcher.stop()
        if self._loading is not None and not self._loading.done:
            return self._loading.observe().addErrback(lambda f: None)
        return None

    # -- loading -------------------------------------------------------------

    def _poll(self) -> Deferred[None]:
        return self.check().addErrback(lambda f: _log.failure("checking user token file {path}", f, path=self.path))

    @property
    def loaded(self) -> TokenTable | None:
        return self._table

    def check(self) -> Deferred[None]:
        """
        Load the file if it changed since the last load (or never loaded).
        Errors are logged; the watcher keeps running.
        """
        if self._loading is not None and not self._loading.done:
            return self._loading.observe()
        self._loading = Operation("load user tokens", self._check())
        return self._loading.observe()

    async def _check(self) -> None:
        try:
            current = self._table.signature if self._table is not None else None
            signature = await self._blocking(stat_blocking, self.path)
            if self._table is not None and signature == current:
                return
            if signature is None:
                if self._table is None or current is not None:
                    _log.error(
                        "user token file {path} does not exist; no user token is accepted until it does",
                        path=self.path,
                    )
                self._replace(TokenTable({}, None))
                return
            signature, identities = await self._blocking(load_blocking, self.path)
        except (OSError, ValueError) as e:
            if self._table is None:
                self._table = TokenTable({}, None)
                _log.error(
                    "cannot use user token file {path}: {error}; no user token is accepted until it is fixed",
                    path=self.path,
                    error=str(e),
                )
            else:
                _log.error(
                    "cannot reload user token file {path}: {error}; the previous tokens stay in use",
                    path=self.path,
                    error=str(e),
                )
            return
        first = self._table is None
        _log.info(
            "{verb} user token file {path}: {count} token(s)",
            verb="loaded" if first else "reloaded",
            path=self.path,
            count=len(identities),
        )
        self._replace(TokenTable(identities, signature))

    def _replace(self, table: TokenTable) -> None:
        self._table = table
        for listener in list(self.on_change):
            listener()

    # -- authentication ------------------------------------------------------

    def authenticate(self, request: IRequest) -> Deferred[Identity | None]:
        token = presented_token(request)
        if token is None:
            return succeed(None)
        if self._table is not None:
            return succeed(self._table.identities.get(token_hash(token)))
        return Deferred.fromCoroutine(self._after_load(token_hash(token)))

    def recheck(self, token: str) -> Identity | None:
        """
        What C{token} (accepted earlier) stands for in the table as it is
        now; C{None} once it was removed.
        """
        table = self._table
        return table.identities.get(token_hash(token)) if table is not None else None

    async def _after_load(self, digest: str) -> Identity | None:
        await self.check()
        table = self._table
        return table.identities.get(digest) if table is not None else None


# -- making tokens -----------------------------------------------------------


def _toml_string(value: str) -> str:
    return json.dumps(value)


def new_entry(username: str, groups: list[str], admin: bool) -> tuple[str, str]:
    """
    A fresh random token and its TOML entry.
    """
    token = secrets.token_urlsafe(32)
    lines = [f"[{token_hash(token)}]", f"username = {_toml_string(username)}"]
    if groups:
        lines.append("groups = [" + ", ".join(_toml_string(g) for g in groups) + "]")
    if admin:
        lines.append("admin = true")
    return token, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m egateway.api.authenticators.user_tokens",
        description="Make a user token: prints the token (give it to the user) and the entry to add "
        "to the user_tokens_file (it holds only the token's hash).",
    )
    parser.add_argument("username")
    parser.add_argument("--group", action="append", default=[], help="a group of the user (repeatable)")
    parser.add_argument("--admin", action="store_true", help="the user administers every kernel")
    args = parser.parse_args(argv)
    if not valid_username(args.username):
        parser.error(f"{args.username!r} is not a usable user name")
    token, entry = new_entry(args.username, args.group, args.admin)
    sys.stderr.write("token (give it to the user; it is not stored anywhere):\n")
    sys.stdout.write(token + "\n")
    sys.stderr.write("\nentry for the user_tokens_file:\n")
    sys.stdout.write(entry)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
