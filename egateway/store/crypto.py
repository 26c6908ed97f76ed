"""
Encryption at rest for the secret parts of stored records.

A kernel record carries the kernel's HMAC key and launcher credentials; a
stolen store file or a Redis dump must not hand them out.  L{SecretBox}
wraps Fernet (AES-128-CBC with an HMAC-SHA256, from C{cryptography}): each
value is sealed together with the id of the record it belongs to, so a
sealed value copied into another record is refused too.

Keys are Fernet keys (32 random bytes, URL-safe base64).  Several keys,
comma-separated, allow rotation: the first encrypts, any of them decrypts.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
import tempfile
from typing import Any, Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from twisted.logger import Logger

_log = Logger()


class SecretBoxError(ValueError):
    """
    A sealed value cannot be opened (another key, or tampered with), or a
    key is malformed.  The message says which and what to do.
    """


class SecretBox:
    """
    Seals and opens JSON-able values bound to a record id.
    """

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise SecretBoxError("a SecretBox needs at least one key")
        self._fernet = MultiFernet([Fernet(k) for k in keys])

    @classmethod
    def from_key(cls, key: str | bytes) -> "SecretBox":
        """
        A box for one Fernet key, or several separated by commas (the first
        encrypts; all decrypt).

        @raise SecretBoxError: a key is not 32 bytes of URL-safe base64.
        """
        text = key.decode("ascii", "replace") if isinstance(key, bytes) else key
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise SecretBoxError("the store key is empty; generate one with `python -m egateway.store.crypto`")
        keys = []
        for i, part in enumerate(parts):
            try:
                raw = base64.urlsafe_b64decode(part.encode("ascii"))
            except (binascii.Error, ValueError, UnicodeEncodeError):
                raw = b""
            if len(raw) != 32:
                raise SecretBoxError(
                    f"store key #{i + 1} is not a Fernet key (32 bytes in URL-safe base64, 44 characters); "
                    "generate one with `python -m egateway.store.crypto`"
                )
            keys.append(part.encode("ascii"))
        return cls(keys)

    @staticmethod
    def generate_key() -> str:
        """
        A new random key, as text for a key file or C{EG_STORE_KEY}.
        """
        return Fernet.generate_key().decode("ascii")

    def seal(self, record_id: str, value: Any) -> str:
        """
        Encrypt C{value} (JSON-able) for the record C{record_id}.
        """
        plain = json.dumps({"id": record_id, "value": value}, separators=(",", ":")).encode("utf-8")
        return self._fernet.encrypt(plain).decode("ascii")

    def open(self, record_id: str, token: str) -> Any:
        """
        Decrypt what L{seal} produced for the same C{record_id}.

        @raise SecretBoxError: wrong key, tampered data, or a value sealed
            for another record.
        """
        try:
            plain = self._fernet.decrypt(token.encode("ascii") if isinstance(token, str) else token)
        except (InvalidToken, UnicodeEncodeError, TypeError):
            raise SecretBoxError(
                "its secrets were encrypted with a different store key (or were altered); "
                "configure the key it was written with (store_key or store_key_file, several keys may be "
                "given comma-separated), or delete the record"
            ) from None
        try:
            sealed = json.loads(plain)
            sealed_id, value = sealed["id"], sealed["value"]
        except (ValueError, KeyError, TypeError):
            raise SecretBoxError("its secrets decrypt to malformed data") from None
        if sealed_id != record_id:
            raise SecretBoxError(f"its secrets belong to record {sealed_id!r}, not to this one")
        return value


def load_or_create_key_file_blocking(path: str, create: bool = True) -> SecretBox:
    """
    The box for the key in C{path}.  If the file does not exist and
    C{create} is true, write a new random key there (mode 0600, its
    directory 0700 if this makes it), which is the zero-configuration
    default for a single gateway.  Gateways sharing a store must share one
    key: pass C{create=False} for them, so a missing file is an error
    rather than a private key the other gateways cannot read.

    Blocking file I/O: call it at start-up or from a thread.

    @raise SecretBoxError: unreadable or malformed key file, or missing with
        C{create=False}.
    """
    path = os.path.abspath(os.path.expanduser(path))
    try:
        return _read_key_file(path)
    except FileNotFoundError:
        if not create:
            raise SecretBoxError(
                f"store key file {path} does not exist; gateways sharing a store need the same key: "
                "generate one with `python -m egateway.store.crypto` and give it to every gateway"
            ) from None
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
    key = SecretBox.generate_key()
    # Written under a temporary name, then linked into place: a concurrent
    # reader sees either no file or a whole key, and of two gateways
    # creating at once exactly one wins and the other reads its key.
    fd, temporary = tempfile.mkstemp(prefix=".store-key-", dir=directory)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temporary, path)
            _log.info("created store key file {path} (mode 0600); back it up with the store", path=path)
        except FileExistsError:
            pass
    finally:
        os.unlink(temporary)
    return _read_key_file(path)


def _read_key_file(path: str) -> SecretBox:
    with open(path, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        text = f.read().decode("ascii", "replace").strip()
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        _log.warn(
            "store key file {path} is readable by other users (mode {mode:o}); run chmod 600 on it",
            path=path,
            mode=stat.S_IMODE(mode),
        )
    try:
        return SecretBox.from_key(text)
    except SecretBoxError as e:
        raise SecretBoxError(f"store key file {path}: {e}") from None


if __name__ == "__main__":
    print(SecretBox.generate_key())
