"""
Per-message work on the relay's hot path that the execute round trip pays
(bench/run.py --only roundtrip, profiled): no enum objects built to read a
ZMQ socket's flags, no debug log fields formatted for every client frame,
header values encoded without C{json.dumps}'s Python layers.  Each test
checks what the message costs in calls, and that the bytes stay the same.
"""

from __future__ import annotations

import json
import sys
from types import FrameType
from typing import Any, Callable

import autobahn.twisted.websocket
import zmq
from jupyter_client.session import Session
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from egateway.wire.protocol import Message, dumps
from egateway.wire.ws_formats import legacy_chunks, legacy_encode
from egateway.wire.zmq import ZmqChannelFactory
from tests.test_websocket_memory import TEXT, MemoryCase, client_frame, kernel_message


def python_calls_into(filename_suffix: str, work: Callable[[], Any]) -> list[str]:
    """
    The Python functions defined in a file ending with C{filename_suffix}
    that C{work} called, in order.
    """
    seen: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.endswith(filename_suffix):
            seen.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        work()
    finally:
        sys.setprofile(None)
    return seen


class _Reactor(Clock):
    """
    A clock that also takes readers (the ZMQ sockets add themselves).
    """

    def addReader(self, reader: Any) -> None:
        pass

    def removeReader(self, reader: Any) -> None:
        pass


class ReadFlagsTests(SynchronousTestCase):
    """
    A gateway socket's C{doRead} on real pyzmq sockets tests its flags as
    plain ints.
    """

    def test_no_enum_flag_arithmetic_per_message(self) -> None:
        """
        Reading a kernel's reply does no C{&} on pyzmq's enum constants (a
        Python call building an enum value, on every read and every
        message), and hands over the frames sent.
        """
        reactor = _Reactor()
        channels = ZmqChannelFactory(reactor)
        self.addCleanup(channels.close)
        kernel = zmq.Context.instance().socket(zmq.ROUTER)
        self.addCleanup(kernel.close, 0)
        port = kernel.bind_to_random_port("tcp://127.0.0.1")
        received: list[Any] = []
        dealer = channels.dealer(f"tcp://127.0.0.1:{port}", b"client-1", received.append)
        dealer.send([b"<IDS|MSG>", b"", b"{}", b"{}", b"{}", b"{}"])
        self.assertTrue(kernel.poll(5000))
        identity, *_ = kernel.recv_multipart()
        session = Session(key=b"")
        reply = session.serialize(session.msg("kernel_info_reply", {}))
        kernel.send_multipart([identity, *reply])
        deadline = 200
        while not received and deadline:
            deadline -= 1
            zmq.select([dealer.socket], [], [], 0.05)  # type: ignore[attr-defined]

            calls = python_calls_into("enum.py", dealer.doRead)  # type: ignore[attr-defined]

            self.assertNotIn("__and__", calls)
            self.assertNotIn("__rand__", calls)
            # Nor any socket option read (pyzmq looks each option up in an
            # enum, EnumType.__call__, as costly as receiving a frame):
            # RCVMORE comes with each frame, and reading stops at Again.
            self.assertEqual(calls, [])
        self.assertEqual([[bytes(f) for f in frames] for frames in received], [reply])


class LegacyHeaderValuesTests(SynchronousTestCase):
    """
    The top-level C{msg_id} and C{msg_type} of a legacy frame, written as
    C{json.dumps} writes them.
    """

    def encoded(self, header: dict[str, Any]) -> dict[str, Any]:
        message = Message([dumps(header), b"{}", b"{}", b'{"a":1}'])
        payload, binary = legacy_encode(message, "iopub")
        self.assertFalse(binary)
        return json.loads(payload)

    def test_unusual_strings(self) -> None:
        """
        Quotes, backslashes, control and non-ASCII characters are escaped
        as C{json.dumps} escapes them (ASCII output), and read back equal.
        """
        msg_id = 'é"\\\n\x01\U0001f600'
        message = Message([dumps({"msg_id": msg_id, "msg_type": "stréam"}), b"{}", b"{}", b"{}"])
        chunks, _ = legacy_chunks(message, "iopub")
        self.assertIn(json.dumps(msg_id).encode("ascii"), chunks)
        decoded = self.encoded({"msg_id": msg_id, "msg_type": "stréam"})
        self.assertEqual((decoded["msg_id"], decoded["msg_type"]), (msg_id, "stréam"))

    def test_values_that_are_not_strings(self) -> None:
        """
        A kernel's header may carry any JSON value there (or none): written
        as JSON all the same.
        """
        self.assertEqual(self.encoded({"msg_id": 7, "msg_type": None})["msg_id"], 7)
        self.assertEqual(self.encoded({})["msg_type"], "")

    def test_no_json_dumps_for_string_values(self) -> None:
        """
        String values (every Jupyter header) skip C{json.dumps} and its
        encoder object.
        """
        message = Message([dumps({"msg_id": "m-1", "msg_type": "status"}), b"{}", b"{}", b"{}"])
        message.header  # parsed once, as the relay does before encoding
        calls = python_calls_into("json/__init__.py", lambda: legacy_chunks(message, "iopub"))
        self.assertNotIn("dumps", calls)


class ParentHeaderTests(SynchronousTestCase):
    def test_parsed_once(self) -> None:
        """
        A status's parent header is read by several readers in turn (the
        reply matcher, the state tracker asking whether it is about a
        control request or the gateway's own, the readiness probe): the
        message parses it once.
        """
        message = Message([dumps({"msg_id": "s", "msg_type": "status"}), b'{"msg_id":"p","session":"x"}', b"{}",
                           b'{"execution_state":"busy"}'])
        calls = python_calls_into("json/__init__.py", lambda: [message.parent_header() for _ in range(3)])
        self.assertEqual(calls.count("loads"), 1)
        self.assertEqual(message.parent_header(), {"msg_id": "p", "session": "x"})


class ClientFrameTests(MemoryCase):
    """
    A client frame reaches the kernel without Autobahn's per-read debug
    log fields being formatted.
    """

    def test_no_debug_fields_formatted(self) -> None:
        formatted: list[Any] = []
        for name in ("hltype", "hlval"):
            original = getattr(autobahn.twisted.websocket, name)
            self.patch(
                autobahn.twisted.websocket,
                name,
                lambda value, *a, _original=original, **kw: formatted.append(value) or _original(value, *a, **kw),
            )
        wire = self.connect("?session_id=hot-1")
        message = {**kernel_message("execute_request", "m-hot", {"code": "1"}), "channel": "shell"}
        del formatted[:]

        wire.send(client_frame(TEXT, json.dumps(message).encode()))

        [(channel, request)] = self.received_by_kernel("execute_request")
        self.assertEqual((channel, request.header["msg_id"]), ("shell", "m-hot"))
        self.assertEqual(formatted, [])
