"""
The two WebSocket encodings of Jupyter messages, as pure functions.

Legacy (no subprotocol; what jupyter_server's gateway client speaks): one
JSON text frame per message with a C{channel} key, or, when the message has
binary buffers, a binary frame::

    uint32 BE n | n x uint32 BE offsets | JSON | buffer 1 | buffer 2 ...

C{v1.kernel.websocket.jupyter.org}: binary frames only::

    uint64 LE n | n x uint64 LE offsets | channel | header | parent_header |
    metadata | content | buffers...

Outgoing legacy frames are assembled from the message's JSON parts as bytes,
so the content of a large output is never decoded and re-encoded.
"""

from __future__ import annotations

import json
import struct
from json.encoder import encode_basestring_ascii
from typing import Any

from egateway.wire.protocol import Message, WireError, dumps

CHANNELS = frozenset({"shell", "control", "stdin", "iopub"})
V1_PROTOCOL = "v1.kernel.websocket.jupyter.org"

_CHANNEL_SUFFIX = {
    name: f',"channel":"{name}"}}'.encode("ascii") for name in CHANNELS
}


def legacy_chunks(message: Message, channel: str, seq: int = 0) -> tuple[list[bytes], bool]:
    """
    Encode a message from the kernel for a legacy client, as the chunks
    whose concatenation is the frame payload (so a large content is never
    copied to be framed).  A C{seq} (its number in the client's session) is
    added as C{"egateway_seq"}.

    @return: the chunks and whether the frame is binary.
    """
    header, parent, metadata, content = message.parts
    head = message.header
    body = [
        b'{"header":',
        header,
        b',"msg_id":',
        _json_bytes(head.get("msg_id", "")),
        b',"msg_type":',
        _json_bytes(head.get("msg_type", "")),
        b',"parent_header":',
        parent,
        b',"metadata":',
        metadata,
        b',"content":',
        content,
        b',"buffers":[]' if not message.buffers else b"",
        b',"egateway_seq":%d' % seq if seq else b"",
        _CHANNEL_SUFFIX[channel],
    ]
    if not message.buffers:
        return body, False
    json_length = sum(len(chunk) for chunk in body)
    count = 1 + len(message.buffers)
    offsets = [4 * (count + 1), 4 * (count + 1) + json_length]
    for buffer in message.buffers[:-1]:
        offsets.append(offsets[-1] + len(buffer))
    return [struct.pack(f"!{count + 1}I", count, *offsets), *body, *message.buffers], True


def _json_bytes(value: Any) -> bytes:
    """
    C{value} as JSON, as C{json.dumps} writes it; a string (what a header's
    C{msg_id} and C{msg_type} are) straight through the C encoder, without
    C{json.dumps}'s Python layers, twice per message relayed.
    """
    if type(value) is str:
        return encode_basestring_ascii(value).encode("ascii")
    return json.dumps(value).encode("utf-8")


def legacy_encode(message: Message, channel: str, seq: int = 0) -> tuple[bytes, bool]:
    """
    L{legacy_chunks}, joined.
    """
    chunks, binary = legacy_chunks(message, channel, seq)
    return b"".join(chunks), binary


def legacy_decode(payload: bytes, is_binary: bool) -> tuple[str, Message]:
    """
    Decode a legacy client frame into its channel and message.

    A missing channel means C{shell}, as in jupyter_server.

    @raise WireError: if the frame is not a well-formed message.
    """
    buffers: list[bytes] = []
    if is_binary:
        if len(payload) < 8:
            raise WireError("binary frame too short")
        (count,) = struct.unpack("!I", payload[:4])
        if count < 1 or len(payload) < 4 * (count + 1):
            raise WireError("binary frame has a bad offset table")
        offsets = list(struct.unpack(f"!{count}I", payload[4 : 4 * (count + 1)]))
        offsets.append(len(payload))
        if offsets != sorted(offsets) or offsets[0] < 4 * (count + 1):
            raise WireError("binary frame offsets are out of order")
        pieces = [payload[a:b] for a, b in zip(offsets, offsets[1:])]
        text, buffers = pieces[0], pieces[1:]
    else:
        text = payload
    try:
        msg = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise WireError(f"message is not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise WireError("message is not a JSON object")
    channel = msg.get("channel") or "shell"
    if channel not in CHANNELS or channel == "iopub":
        raise WireError(f"unknown channel {channel!r}")
    header = msg.get("header")
    if not isinstance(header, dict) or not header.get("msg_type"):
        raise WireError("message header must be an object with a msg_type")
    parts = [
        dumps(header),
        dumps(_object(msg, "parent_header")),
        dumps(_object(msg, "metadata")),
        dumps(_object(msg, "content")),
    ]
    message = Message(parts, buffers)
    message._header = header
    return channel, message


def _object(msg: dict[str, Any], key: str) -> dict[str, Any]:
    value = msg.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WireError(f"{key} must be an object")
    return value


def with_seq(metadata: bytes, seq: int) -> bytes:
    """
    C{metadata} (a JSON object's bytes) with C{"egateway_seq": seq} added,
    without parsing it.
    """
    body = metadata.strip()
    if body[:1] != b"{":
        return metadata
    rest = body[1:].lstrip()
    if rest == b"}":
        return b'{"egateway_seq":%d}' % seq
    return b'{"egateway_seq":%d,' % seq + rest


def v1_chunks(message: Message, channel: str, seq: int = 0) -> list[bytes]:
    """
    Encode a message from the kernel for a v1 client, as chunks.  A C{seq}
    is added to the metadata as C{"egateway_seq"}.
    """
    header, parent, metadata, content = message.parts
    if seq:
        metadata = with_seq(metadata, seq)
    parts = [channel.encode("ascii"), header, parent, metadata, content, *message.buffers]
    count = len(parts) + 1
    offsets = [8 * (count + 1)]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    return [struct.pack(f"<{count + 1}Q", count, *offsets), *parts]


def v1_encode(message: Message, channel: str, seq: int = 0) -> bytes:
    """
    L{v1_chunks}, joined.
    """
    return b"".join(v1_chunks(message, channel, seq))


def v1_decode(payload: bytes) -> tuple[str, Message]:
    """
    Decode a v1 client frame.  The header is left unparsed.

    @raise WireError: if the offset table or the channel is malformed.
    """
    if len(payload) < 8:
        raise WireError("v1 frame too short")
    (count,) = struct.unpack("<Q", payload[:8])
    if count < 6 or len(payload) < 8 * (count + 1):
        raise WireError("v1 frame has a bad offset table")
    offsets = struct.unpack(f"<{count}Q", payload[8 : 8 * (count + 1)])
    if list(offsets) != sorted(offsets) or offsets[-1] > len(payload) or offsets[0] < 8 * (count + 1):
        raise WireError("v1 frame offsets are out of range")
    pieces = [payload[a:b] for a, b in zip(offsets, offsets[1:])]
    try:
        channel = pieces[0].decode("ascii")
    except UnicodeDecodeError:
        raise WireError("v1 channel is not ASCII") from None
    if channel not in CHANNELS or channel == "iopub":
        raise WireError(f"unknown channel {channel!r}")
    return channel, Message(pieces[1:5], pieces[5:])
