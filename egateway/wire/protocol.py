"""
The Jupyter wire protocol as pure functions: framing, HMAC signing and the
few header fields the gateway must read.

A message on a ZMQ socket is::

    [identities..., b"<IDS|MSG>", signature, header, parent_header, metadata,
     content, buffers...]

The gateway forwards message bodies as the bytes it received; it parses only
the header (for routing and activity) and, for iopub C{status} messages, the
content.  A large content or buffer may be a C{memoryview} of the frame ZMQ
received (L{egateway.wire.zmq.ZERO_COPY_SIZE}) rather than C{bytes}: every
consumer of a message's parts takes either.  See U{https://jupyter-client.readthedocs.io/en/latest/messaging.html}.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import uuid
from collections import deque
from datetime import datetime, timezone
from typing import Any, Sequence

DELIMITER = b"<IDS|MSG>"
PROTOCOL_VERSION = "5.3"

_DIGESTS = {
    "hmac-sha256": hashlib.sha256,
    "hmac-sha512": hashlib.sha512,
    "hmac-sha1": hashlib.sha1,
    "hmac-md5": hashlib.md5,
}


class WireError(ValueError):
    """
    A message is malformed or its signature does not verify.
    """


class Signer:
    """
    Computes and checks message signatures with a kernel's key.

    An empty key means the kernel does not sign (C{signature} is empty).
    """

    def __init__(self, key: bytes, scheme: str = "hmac-sha256") -> None:
        if scheme not in _DIGESTS:
            raise WireError(f"unsupported signature scheme {scheme!r}")
        self.key = key
        self.scheme = scheme
        self._template = hmac.new(key, digestmod=_DIGESTS[scheme]) if key else None

    def sign(self, parts: Sequence[bytes]) -> bytes:
        """
        The hex signature of C{header, parent_header, metadata, content}.
        """
        if self._template is None:
            return b""
        h = self._template.copy()
        for part in parts:
            h.update(part)
        return h.hexdigest().encode("ascii")

    def verify(self, signature: bytes, parts: Sequence[bytes]) -> bool:
        """
        Whether C{signature} is that of C{parts}: one HMAC pass over them,
        compared in constant time.
        """
        if self._template is None:
            return True
        return hmac.compare_digest(signature, self.sign(parts))

    def check_in_slices(self, signature: bytes, parts: Sequence[bytes]) -> "SliceCheck":
        """
        A check of C{signature} against C{parts} made a slice at a time
        (L{SliceCheck}).
        """
        return SliceCheck(self._template, signature, parts)


CHECK_SLICE = 1 << 20
"""
Bytes hashed per step of a L{SliceCheck}: about 0.75 ms of HMAC-SHA256 on
the benchmark machine.
"""


class SliceCheck:
    """
    One message's signature check, one pass over its parts as L{Signer.verify}
    makes, cut into steps of L{CHECK_SLICE} bytes.  A caller that takes one
    step per reactor turn keeps the reactor writing to sockets meanwhile
    (L{egateway.wire.link.KernelLink}, for large messages).
    """

    def __init__(self, template: Any, signature: bytes, parts: Sequence[bytes]) -> None:
        self._hmac = template.copy() if template is not None else None
        self._signature = signature
        self._slices = deque(
            view[start : start + CHECK_SLICE]
            for view in (memoryview(part).cast("B") for part in parts)
            for start in range(0, len(view), CHECK_SLICE)
        )

    def step(self) -> bool | None:
        """
        Hash the next slice.

        @return: C{None} while slices are left; then whether the signature
            is that of the parts (compared in constant time).
        """
        if self._hmac is None:
            return True
        if self._slices:
            self._hmac.update(self._slices.popleft())
            if self._slices:
                return None
        digest = self._hmac.hexdigest().encode("ascii")
        return hmac.compare_digest(self._signature, digest)


class Message:
    """
    One Jupyter message held as the bytes of its parts.

    C{header} and the parent header are parsed on first use and cached
    (a status is asked about its parent by several readers in turn: the
    reply matcher, the state tracker, the readiness probe); metadata and
    content are parsed each time they are asked for.
    """

    __slots__ = ("parts", "buffers", "_header", "_parent")

    def __init__(self, parts: Sequence[bytes], buffers: Sequence[bytes] = ()) -> None:
        if len(parts) != 4:
            raise WireError(f"a message has 4 parts, not {len(parts)}")
        # Tuples, not lists: a tuple of bytes leaves the garbage collector's
        # view once a collection has seen it, a list never does.  With 1,000
        # kernels the journals and iopub rings hold ~100,000 messages, and
        # every object the collector tracks lengthens each full collection,
        # which stops the reactor (1.7 s in bench/scale.py with Redis).
        self.parts: tuple[bytes, ...] = tuple(parts)
        self.buffers: tuple[bytes, ...] = tuple(buffers)
        self._header: dict[str, Any] | None = None
        self._parent: dict[str, Any] | None = None

    @property
    def header(self) -> dict[str, Any]:
        if self._header is None:
            self._header = loads_part(self.parts[0], "header")
        return self._header

    @property
    def msg_type(self) -> str:
        return str(self.header.get("msg_type", ""))

    @property
    def msg_id(self) -> str:
        return str(self.header.get("msg_id", ""))

    def parent_header(self) -> dict[str, Any]:
        if self._parent is None:
            self._parent = loads_part(self.parts[1], "parent_header")
        return self._parent

    def content(self) -> dict[str, Any]:
        return loads_part(self.parts[3], "content")

    @classmethod
    def build(
        cls,
        msg_type: str,
        content: dict[str, Any],
        session: str,
        parent: dict[str, Any] | None = None,
        username: str = "egateway",
        metadata: dict[str, Any] | None = None,
    ) -> "Message":
        """
        A new message originated by the gateway itself.
        """
        header = new_header(msg_type, session, username)
        message = cls(
            [
                dumps(header),
                dumps(parent or {}),
                dumps(metadata or {}),
                dumps(content),
            ]
        )
        message._header = header
        return message


def loads_part(data: bytes | memoryview, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data if isinstance(data, bytes) else bytes(data))
    except (ValueError, UnicodeDecodeError) as e:
        raise WireError(f"{what} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise WireError(f"{what} is not a JSON object")
    return value


def dumps(value: Any) -> bytes:
    """
    Serialise like jupyter_client: compact, UTF-8, dates as ISO-8601.
    """
    return json.dumps(
        value, separators=(",", ":"), ensure_ascii=False, default=_json_default
    ).encode("utf-8")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, datetime):
        if obj.tzinfo is None:
            obj = obj.replace(tzinfo=timezone.utc)
        return obj.isoformat().replace("+00:00", "Z")
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def utcnow_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


_SESSION_PREFIX = uuid.uuid4().hex[:12]
_counter = 0


def new_msg_id() -> str:
    global _counter
    _counter += 1
    return f"{_SESSION_PREFIX}_{os.getpid()}_{_counter}"


def new_header(msg_type: str, session: str, username: str = "egateway") -> dict[str, Any]:
    return {
        "msg_id": new_msg_id(),
        "msg_type": msg_type,
        "username": username,
        "session": session,
        "date": utcnow_iso(),
        "version": PROTOCOL_VERSION,
    }


def split_frames(
    frames: Sequence[bytes], signer: Signer, verify: bool = True
) -> tuple[list[bytes], Message]:
    """
    Split ZMQ frames into routing identities and a verified L{Message}.

    @param verify: check the signature (the default); C{False} only where
        the channel itself authenticates the sender (see
        L{egateway.wire.link.KernelLink.verifies_signatures}).
    @raise WireError: no delimiter, too few parts, or a bad signature.
    """
    identities, signature, message = split_unchecked(frames)
    if verify and not signer.verify(signature, message.parts):
        raise WireError("invalid signature")
    return identities, message


def split_unchecked(frames: Sequence[bytes]) -> tuple[list[bytes], bytes, Message]:
    """
    Split ZMQ frames into routing identities, the signature, and a
    L{Message} whose signature is not checked: for a caller that checks it
    (L{Signer.check_in_slices}) before anything acts on the message.

    @raise WireError: no delimiter, or too few parts.
    """
    try:
        index = frames.index(DELIMITER)
    except ValueError:
        raise WireError("no <IDS|MSG> delimiter") from None
    if len(frames) < index + 6:
        raise WireError("message has fewer than 4 parts")
    return list(frames[:index]), frames[index + 1], Message(frames[index + 2 : index + 6], frames[index + 6 :])


def join_frames(
    message: Message, signer: Signer, identities: Sequence[bytes] = ()
) -> list[bytes]:
    """
    The ZMQ frames for C{message}, signed with C{signer}.
    """
    return [
        *identities,
        DELIMITER,
        signer.sign(message.parts),
        *message.parts,
        *message.buffers,
    ]
