"""
Persistence of kernels, sessions, leases and WebSocket journals.

L{open_store} picks the implementation from the configured location:
C{redis://...} (or C{rediss://}, C{redis+sentinel://}, C{rediss+sentinel://})
for gateways sharing one Redis, C{sqlite:///path} or a plain
path for a gateway on its own.  Nothing is opened until the store's
C{start()}.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote, urlsplit

from egateway.config import ConfigError, StoreConfig
from egateway.names import check_gateway_id
from egateway.store.crypto import SecretBox, SecretBoxError, load_or_create_key_file_blocking
from egateway.store.interface import (
    IKernelStore,
    KernelRecord,
    RecordUnreadable,
    SessionRecord,
    StoreError,
    StoreUnavailable,
)

__all__ = [
    "IKernelStore",
    "KernelRecord",
    "RecordUnreadable",
    "SecretBox",
    "SecretBoxError",
    "SessionRecord",
    "StoreError",
    "StoreUnavailable",
    "check_config",
    "load_or_create_key_file_blocking",
    "open_store",
    "parse_store_url",
]


def parse_store_url(url_or_path: str) -> tuple[str, str]:
    """
    Check a store location without opening anything.

    @return: C{("redis", url)} or C{("sqlite", absolute path)}.
    @raise ValueError: an unknown scheme or a malformed URL; the message
        says what is accepted and never contains a password.
    """
    text = url_or_path.strip()
    if not text:
        raise ValueError("the store location is empty")
    scheme = urlsplit(text).scheme if "://" in text else ""
    if scheme in ("redis", "rediss", "redis+sentinel", "rediss+sentinel"):
        from egateway.store.resp import RedisAddress

        RedisAddress.from_url(text)
        return "redis", text
    if scheme == "sqlite":
        # sqlite:///var/lib/egateway/store.sqlite3 (three slashes: an absolute path)
        parts = urlsplit(text)
        if parts.netloc:
            raise ValueError("sqlite:// URLs take an absolute path after three slashes: sqlite:///path/to/file")
        path = unquote(parts.path)
        if not path or path == "/":
            raise ValueError("the sqlite:// URL names no file")
        return "sqlite", os.path.abspath(path)
    if scheme:
        raise ValueError(
            f"unknown store scheme {scheme!r}; use redis://host:port/db, rediss://host:port/db, "
            "redis+sentinel://host:26379,host2:26379/master-name/db, sqlite:///path or a file path"
        )
    return "sqlite", os.path.abspath(os.path.expanduser(text))


def open_store(url_or_path: str, secret_box: SecretBox, reactor: Any) -> IKernelStore:
    """
    The store for C{url_or_path}, not yet started.

    @raise ValueError: as L{parse_store_url}.
    """
    kind, location = parse_store_url(url_or_path)
    if kind == "redis":
        from egateway.store.redis import RedisStore

        return RedisStore(location, secret_box, reactor)
    from egateway.store.sqlite import SQLiteStore

    return SQLiteStore(location, secret_box, reactor)


def check_config(settings: StoreConfig) -> None:
    """
    The C{[store]} section's location, key and gateway id, checked without
    opening anything (the gateway's assembly runs this at start-up).
    """
    if settings.store_url:
        with ConfigError.about("store.store_url"):
            parse_store_url(settings.store_url)
    if settings.store_key:
        with ConfigError.about("store.store_key", SecretBoxError):
            SecretBox.from_key(settings.store_key)
    if settings.gateway_id:
        with ConfigError.about("store.gateway_id"):
            check_gateway_id(settings.gateway_id)
