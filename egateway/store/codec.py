"""
How records look at rest, shared by every store: JSON text, with the secret
fields of a kernel record replaced by one sealed value.

A stored kernel record reads, for an operator::

    {"format": 1, "kernel_id": "...", "spec_name": "python3", "username": "alice",
     "launcher": "ssh", "state": "running", ..., "secrets": "gAAAAAB..."}
"""

from __future__ import annotations

import json
from typing import Any

from egateway.store.crypto import SecretBox, SecretBoxError
from egateway.store.interface import KernelRecord, RecordUnreadable, SessionRecord

FORMAT = 1


def encode_kernel(record: KernelRecord, box: SecretBox) -> bytes:
    data = record.to_json()
    secrets = {name: data.pop(name) for name in KernelRecord.SECRET_FIELDS}
    data["secrets"] = box.seal(record.kernel_id, secrets)
    data["format"] = FORMAT
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode("utf-8")


def decode_kernel(kernel_id: str, raw: bytes | str, box: SecretBox) -> KernelRecord:
    """
    @raise RecordUnreadable: malformed, from an unknown format, or sealed with
        another key.
    """
    data = _load(raw, "kernel", kernel_id)
    if data.get("kernel_id") != kernel_id:
        raise RecordUnreadable("kernel", kernel_id, f"it is stored under this id but names {data.get('kernel_id')!r}")
    token = data.pop("secrets", None)
    if not isinstance(token, str):
        raise RecordUnreadable("kernel", kernel_id, "it has no sealed secrets")
    try:
        secrets = box.open(kernel_id, token)
    except SecretBoxError as e:
        raise RecordUnreadable("kernel", kernel_id, str(e)) from None
    if not isinstance(secrets, dict):
        raise RecordUnreadable("kernel", kernel_id, "its secrets are not an object")
    data.update({name: secrets.get(name, {}) for name in KernelRecord.SECRET_FIELDS})
    try:
        return KernelRecord.from_json(data)
    except ValueError as e:
        raise RecordUnreadable("kernel", kernel_id, str(e)) from None


def encode_session(record: SessionRecord) -> bytes:
    data = record.to_json()
    data["format"] = FORMAT
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode("utf-8")


def decode_session(session_id: str, raw: bytes | str) -> SessionRecord:
    data = _load(raw, "session", session_id)
    try:
        return SessionRecord.from_json(data)
    except ValueError as e:
        raise RecordUnreadable("session", session_id, str(e)) from None


def _load(raw: bytes | str, kind: str, record_id: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RecordUnreadable(kind, record_id, f"it is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise RecordUnreadable(kind, record_id, "it is not a JSON object")
    version = data.pop("format", None)
    if version != FORMAT:
        raise RecordUnreadable(
            kind, record_id, f"it has format {version!r}; this gateway reads format {FORMAT} (a newer gateway wrote it?)"
        )
    return data
