"""
The Jupyter wire protocol and both WebSocket encodings, checked against
jupyter_client's and jupyter_server's own implementations so that what we
produce is what real clients and kernels read.
"""

from __future__ import annotations

import json
from typing import Any

from jupyter_client.session import Session
from jupyter_server.services.kernels.connection.base import (
    deserialize_binary_message,
    deserialize_msg_from_ws_v1,
    serialize_binary_message,
    serialize_msg_to_ws_v1,
)
from twisted.trial.unittest import SynchronousTestCase

from egateway.wire.protocol import DELIMITER, Message, Signer, WireError, join_frames, split_frames
from egateway.wire.ws_formats import legacy_decode, legacy_encode, v1_decode, v1_encode

KEY = b"0123456789abcdef"


def kernel_frames(msg_type: str = "stream", content: dict | None = None, buffers: list | None = None) -> list[bytes]:
    """
    Frames exactly as a kernel (jupyter_client's Session) sends them.
    """
    session = Session(key=KEY, signature_scheme="hmac-sha256")
    msg = session.msg(msg_type, content or {"name": "stdout", "text": "hé\n"})
    return session.serialize(msg) + list(buffers or [])


class SigningTests(SynchronousTestCase):
    def test_verifies_kernel_messages(self) -> None:
        """
        A message signed by jupyter_client verifies, and its parts are kept
        as the bytes received.
        """
        frames = [b"ident", *kernel_frames()]
        identities, message = split_frames(frames, Signer(KEY))
        self.assertEqual(identities, [b"ident"])
        self.assertEqual(message.msg_type, "stream")
        self.assertEqual(list(message.parts), frames[3:7])

    def test_rejects_tampering(self) -> None:
        """
        A changed content or a wrong key fails verification.
        """
        frames = kernel_frames()
        tampered = list(frames)
        tampered[-1] = tampered[-1].replace(b"stdout", b"stderr")
        self.assertRaises(WireError, split_frames, tampered, Signer(KEY))
        self.assertRaises(WireError, split_frames, frames, Signer(b"other"))
        self.assertRaises(WireError, split_frames, frames[1:], Signer(KEY))
        self.assertRaises(WireError, split_frames, frames[:4], Signer(KEY))

    def test_our_signatures_verify_in_jupyter_client(self) -> None:
        """
        Messages the gateway signs are accepted by jupyter_client.
        """
        message = Message.build("execute_request", {"code": "1"}, "sess")
        frames = join_frames(message, Signer(KEY), [b"id"])
        session = Session(key=KEY, signature_scheme="hmac-sha256")
        idents, rest = session.feed_identities(frames)
        msg = session.deserialize(rest)
        self.assertEqual(idents, [b"id"])
        self.assertEqual(msg["content"], {"code": "1"})
        self.assertEqual(frames[1], DELIMITER)

    def test_unsigned(self) -> None:
        """
        With an empty key nothing is signed and anything verifies.
        """
        self.assertEqual(Signer(b"").sign([b"a"]), b"")
        self.assertTrue(Signer(b"").verify(b"whatever", [b"a"]))


class LegacyFormatTests(SynchronousTestCase):
    def test_text_frame_matches_jupyter_server(self) -> None:
        """
        A kernel message encoded for a legacy client parses to the fields
        jupyter_server's own encoding carries.
        """
        _, message = split_frames(kernel_frames(), Signer(KEY))
        payload, binary = legacy_encode(message, "iopub")
        self.assertFalse(binary)
        decoded = json.loads(payload)
        self.assertEqual(decoded["channel"], "iopub")
        self.assertEqual(decoded["msg_type"], "stream")
        self.assertEqual(decoded["msg_id"], decoded["header"]["msg_id"])
        self.assertEqual(decoded["content"], {"name": "stdout", "text": "hé\n"})
        self.assertEqual(decoded["buffers"], [])
        self.assertEqual(set(decoded), {"header", "msg_id", "msg_type", "parent_header", "metadata", "content", "buffers", "channel"})

    def test_binary_frame_read_by_jupyter_server(self) -> None:
        """
        A message with buffers becomes a binary frame that jupyter_server's
        decoder reads back with the buffers intact.
        """
        frames = kernel_frames("comm_msg", {"comm_id": "c", "data": {}}, [b"\x00buf1", b"buf2"])
        _, message = split_frames(frames, Signer(KEY))
        payload, binary = legacy_encode(message, "iopub")
        self.assertTrue(binary)
        decoded = deserialize_binary_message(payload)
        self.assertEqual([bytes(b) for b in decoded["buffers"]], [b"\x00buf1", b"buf2"])
        self.assertEqual(decoded["content"], {"comm_id": "c", "data": {}})
        self.assertEqual(decoded["channel"], "iopub")

    def test_client_frames(self) -> None:
        """
        Text and binary frames from a client decode to their channel and
        parts; a missing channel means shell.
        """
        msg = {
            "header": {"msg_id": "1", "msg_type": "execute_request", "session": "s", "username": "", "version": "5.3"},
            "parent_header": {},
            "metadata": {},
            "content": {"code": "1"},
            "buffers": [b"zz"],
            "channel": "control",
        }
        channel, message = legacy_decode(serialize_binary_message(dict(msg)), True)
        self.assertEqual((channel, message.msg_type, list(message.buffers)), ("control", "execute_request", [b"zz"]))
        del msg["channel"]
        msg["buffers"] = []
        channel, message = legacy_decode(json.dumps(msg).encode(), False)
        self.assertEqual(channel, "shell")
        self.assertEqual(json.loads(message.parts[3]), {"code": "1"})

    def test_malformed_client_frames(self) -> None:
        """
        Garbage, wrong channels and bad shapes are WireErrors, not crashes.
        """
        for payload, binary in (
            (b"not json", False),
            (b"[1]", False),
            (b'{"header": {}, "channel": "shell"}', False),
            (b'{"header": {"msg_type": "x"}, "channel": "nope"}', False),
            (b'{"header": {"msg_type": "x"}, "channel": "iopub"}', False),
            (b'{"header": {"msg_type": "x"}, "content": 3}', False),
            (b"\x00\x00", True),
            (b"\x00\x00\x00\x05" + b"\x00" * 8, True),
            (b"\xff\xfe", False),
        ):
            self.assertRaises(WireError, legacy_decode, payload, binary)


class V1FormatTests(SynchronousTestCase):
    def test_encode_matches_jupyter_server(self) -> None:
        """
        Our v1 frames are byte-identical to jupyter_server's for the same
        parts.
        """
        frames = kernel_frames("comm_msg", {"comm_id": "c", "data": {}}, [b"b1"])
        _, message = split_frames(frames, Signer(KEY))
        ours = v1_encode(message, "iopub")
        theirs = serialize_msg_to_ws_v1([*message.parts, *message.buffers], "iopub")
        self.assertEqual(ours, theirs)

    def test_decode_jupyter_server_frames(self) -> None:
        """
        Frames built by jupyter_server's encoder decode to channel and parts.
        """
        parts = [b'{"msg_type":"execute_request","msg_id":"1"}', b"{}", b"{}", b'{"code":"1"}', b"buf"]
        payload = serialize_msg_to_ws_v1(parts, "shell")
        channel, message = v1_decode(payload)
        self.assertEqual(channel, "shell")
        self.assertEqual(list(message.parts), parts[:4])
        self.assertEqual(list(message.buffers), [b"buf"])
        self.assertEqual(deserialize_msg_from_ws_v1(payload), ("shell", parts))

    def test_malformed(self) -> None:
        """
        Short frames, bad offsets and unknown channels are WireErrors.
        """
        good = serialize_msg_to_ws_v1([b"{}"] * 4, "shell")
        for payload in (
            b"",
            good[:20],
            b"\x06" + b"\x00" * 7 + b"\xff" * 48,
            serialize_msg_to_ws_v1([b"{}"] * 4, "iopub"),
            serialize_msg_to_ws_v1([b"{}"] * 4, "bogus"),
            serialize_msg_to_ws_v1([b"{}"] * 3, "shell"),
        ):
            self.assertRaises(WireError, v1_decode, payload)


class ResendReadsTests(SynchronousTestCase):
    """
    A ZMQ send can consume the edge of the socket's FD that says a message
    arrived, so every send (the retried ones too) is followed by a read on
    the next turn; otherwise replies can sit unread until the next
    notification (seen as a stalled pipelined benchmark).
    """

    def socket_with_unsent(self) -> tuple[Any, Any]:
        from collections import deque
        from types import SimpleNamespace

        from twisted.internet.task import Clock

        from egateway.wire.zmq import _Socket

        clock = Clock()
        sent: list[Any] = []
        sock = _Socket.__new__(_Socket)
        sock.factory = SimpleNamespace(reactor=clock)  # type: ignore[assignment]
        sock.socket = SimpleNamespace(send_multipart=lambda frames, flags, copy=True: sent.append(frames))  # type: ignore[assignment]
        sock._closed = False
        sock.read_scheduled = None
        sock._unsent = deque([[b"a"], [b"b"]])
        return sock, clock

    def test_resend_schedules_a_read(self) -> None:
        """
        Once held messages are sent, the socket is read on the next turn.
        """
        sock, clock = self.socket_with_unsent()
        reads: list[bool] = []
        sock.doRead = lambda: reads.append(True)
        sock._resend()
        self.assertIsNone(sock._unsent)
        clock.advance(0)
        self.assertEqual(reads, [True])
