"""
The relay's hot path without copies or second passes: large frames received
as views of ZMQ's buffers and relayed (in both WebSocket encodings, through
the journal) as those same buffers, signatures checked once (and not where
CurveZMQ authenticates the channel), and per-client sockets made only when
needed.
"""

from __future__ import annotations

import hashlib
import tracemalloc
from collections import deque
from typing import Any, Generator

import zmq
from jupyter_client.session import Session
from twisted.internet import protocol
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import ClientCreator, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from egateway.kernels.failover import HOLDING_COST
from egateway.kernels.journal import JournalLimits, KernelSession
from egateway.wire.channels import ConnectionInfo
from egateway.wire.link import KernelLink
from egateway.wire.protocol import DELIMITER, Message, Signer, WireError, split_frames
from egateway.wire.ws_formats import legacy_encode, v1_encode
from egateway.wire.zmq import ZERO_COPY_SIZE, receive
from tests.support.fakes import FakeChannels
from tests.test_websocket_memory import fragmented_server_frames

KEY = b"0123456789abcdef"
CURVE_KEY = zmq.curve_keypair()[0] if zmq.has("curve") else b"A" * 40


def large_kernel_frames(size: int = 4 * ZERO_COPY_SIZE) -> list[bytes]:
    """
    A large stream output and a large binary buffer, framed and signed by
    jupyter_client's C{Session}, as a kernel sends them.
    """
    session = Session(key=KEY, signature_scheme="hmac-sha256")
    msg = session.msg("stream", {"name": "stdout", "text": "é" + "x" * size})
    return [b"topic", *session.serialize(msg), b"\x00\x01" * size]


class ZeroCopyReceiveTests(SynchronousTestCase):
    """
    L{receive} on real pyzmq sockets.
    """

    def setUp(self) -> None:
        self.context = zmq.Context()
        self.sender = self.context.socket(zmq.PAIR)
        self.receiver = self.context.socket(zmq.PAIR)
        self.sender.bind("inproc://zero-copy")
        self.receiver.connect("inproc://zero-copy")

    def tearDown(self) -> None:
        self.sender.close(linger=0)
        self.receiver.close(linger=0)
        self.context.term()

    def transfer(self, frames: list[bytes]) -> list[bytes | memoryview]:
        self.sender.send_multipart(frames)
        self.receiver.poll(5000)
        return receive(self.receiver)

    def test_large_frames_are_views_of_the_received_message(self) -> None:
        """
        A large content and buffer arrive as views of ZMQ's frames (no copy
        in this process), the small parts as bytes, all with the bytes sent.
        """
        frames = large_kernel_frames()
        received = self.transfer(frames)
        self.assertEqual([bytes(f) for f in received], frames)
        self.assertIsInstance(received[6], memoryview)
        self.assertIsInstance(received[7], memoryview)
        for small in received[:6]:
            self.assertIsInstance(small, bytes)

    def test_reply_without_identities(self) -> None:
        """
        A message that starts with the delimiter (what a DEALER receives
        from the kernel's ROUTER) has its large content received as a view
        too.
        """
        frames = large_kernel_frames()[1:]
        received = self.transfer(frames)
        self.assertEqual([bytes(f) for f in received], frames)
        self.assertIsInstance(received[5], memoryview)
        self.assertIsInstance(received[4], bytes)

    def test_small_messages_are_bytes(self) -> None:
        """
        A small message is copied into bytes, frame by frame.
        """
        frames = [b"topic", DELIMITER, b"sig", b"{}", b"{}", b"{}", b'{"a":1}', b"buffer"]
        received = self.transfer(frames)
        self.assertEqual(received, frames)
        self.assertTrue(all(isinstance(f, bytes) for f in received))

    def test_nothing_waiting(self) -> None:
        """
        Without a message, L{receive} says so at once rather than block.
        """
        self.assertRaises(zmq.Again, receive, self.receiver)


class RelayWithoutCopyTests(SynchronousTestCase):
    """
    A message whose large parts are views is verified, encoded and
    journaled as the same buffers.
    """

    def received_message(self) -> Message:
        frames: list[bytes | memoryview] = list(large_kernel_frames())
        frames[6] = memoryview(frames[6])
        frames[7] = memoryview(frames[7])
        _, message = split_frames(frames, Signer(KEY))
        return message

    def bytes_message(self, message: Message) -> Message:
        return Message([bytes(p) for p in message.parts], [bytes(b) for b in message.buffers])

    def test_signature_verified_over_views(self) -> None:
        """
        The signature is checked over the views (one pass), and a change in
        the large content is still caught.
        """
        frames: list[bytes | memoryview] = list(large_kernel_frames())
        tampered = bytearray(frames[6])
        tampered[-3:-2] = b"y"
        frames[6] = memoryview(bytes(tampered))
        self.assertRaises(WireError, split_frames, frames, Signer(KEY))
        self.assertEqual(self.received_message().msg_type, "stream")

    def test_encodings_equal_those_of_bytes(self) -> None:
        """
        Both WebSocket encodings of a message relayed from views are, byte
        for byte, those of the same message held as bytes (with and without
        a sequence number).
        """
        message = self.received_message()
        copy = self.bytes_message(message)
        for seq in (0, 7):
            self.assertEqual(v1_encode(message, "iopub", seq), v1_encode(copy, "iopub", seq))
            self.assertEqual(legacy_encode(message, "iopub", seq), legacy_encode(copy, "iopub", seq))

    def test_content_parsed_from_a_view(self) -> None:
        """
        A part held as a view still parses as JSON where the gateway reads
        it (e.g. a status's content).
        """
        message = self.received_message()
        self.assertEqual(message.content()["name"], "stdout")

    def test_journal_shares_the_bytes_it_was_given(self) -> None:
        """
        The journal keeps the very parts and buffers of the message it was
        given (as plain tuples the garbage collector stops tracking, not the
        message object), and the client is handed the message itself: no
        copy.
        """
        message = self.received_message()
        delivered: list[Message] = []

        class Client:
            def deliver(self, channel: str, given: Message, seq: int) -> None:
                delivered.append(given)

        kernel = _KernelStub()
        session = KernelSession("s", kernel, JournalLimits())
        session.client = Client()  # type: ignore[assignment]
        session.deliver("iopub", message)
        (_, _, parts, buffers, size) = session.journal[0]
        self.assertIs(parts, message.parts)
        self.assertIs(buffers, message.buffers)
        self.assertIs(delivered[0], message)
        self.assertEqual(size, HOLDING_COST + sum(len(p) for p in message.parts) + len(message.buffers[0]))


class _KernelStub:
    id = "k"
    journal_sink = None


def connection_info(curve: bool) -> ConnectionInfo:
    return ConnectionInfo(
        ip="127.0.0.1",
        shell_port=1,
        iopub_port=2,
        stdin_port=3,
        control_port=4,
        hb_port=5,
        key=KEY,
        curve_publickey=CURVE_KEY if curve else None,
    )


class LinkTests(SynchronousTestCase):
    """
    L{KernelLink} on the in-memory transport.
    """

    def link(self, curve: bool) -> tuple[KernelLink, FakeChannels, list[Message]]:
        channels = FakeChannels()
        info = connection_info(curve)
        channels.serve(info)
        received: list[Message] = []
        link = KernelLink(info, channels, Clock(), received.append, kernel_id="k")
        self.addCleanup(link.close)
        return link, channels, received

    def publish(self, channels: FakeChannels, link: KernelLink, signature: bytes | None) -> None:
        message = Message.build("stream", {"name": "stdout", "text": "hi"}, "kernel")
        channels.servers[link.info.url("iopub")].publish_message(message, signature)

    def test_bad_signature_refused_in_clear_text(self) -> None:
        """
        Without CurveZMQ, a kernel message with a bad signature is dropped;
        a good one is relayed.
        """
        link, channels, received = self.link(curve=False)
        self.assertTrue(link.verifies_signatures)
        self.publish(channels, link, b"0" * 64)
        self.assertEqual(received, [])
        self.publish(channels, link, None)
        self.assertEqual(len(received), 1)

    def test_curve_channel_is_not_verified_twice(self) -> None:
        """
        Over CurveZMQ, which authenticates every message of the channel, the
        HMAC is not computed again on receipt (the gateway's own messages
        are still signed for the kernel).
        """
        link, channels, received = self.link(curve=True)
        self.assertFalse(link.verifies_signatures)
        self.publish(channels, link, b"0" * 64)
        self.assertEqual(len(received), 1)
        link.send("shell", Message.build("kernel_info_request", {}, link.session))
        server = channels.servers[link.info.url("shell")]
        self.assertEqual(server.received[-1][1].msg_type, "kernel_info_request")

    def sockets(self, channels: FakeChannels) -> list[str]:
        return sorted(s.channel for s in channels.open_sockets())

    def test_control_sockets_made_on_first_use(self) -> None:
        """
        A kernel costs the gateway an iopub and a shell socket, and each
        client a shell and a stdin socket; a control socket is made only
        when a control message is sent, and it gets the reply.
        """
        link, channels, _ = self.link(curve=False)
        self.assertEqual(self.sockets(channels), ["iopub", "shell"])
        replies: list[tuple[str, Message]] = []
        client = link.client(lambda channel, message: replies.append((channel, message)))
        self.assertEqual(self.sockets(channels), ["iopub", "shell", "shell", "stdin"])
        client.send("control", Message.build("shutdown_request", {"restart": False}, "client"))
        self.assertEqual(self.sockets(channels), ["control", "iopub", "shell", "shell", "stdin"])
        self.assertEqual([(c, m.msg_type) for c, m in replies], [("control", "shutdown_reply")])
        reply = link.request("control", "shutdown_request", {"restart": False}, timeout=5)
        self.assertEqual(self.successResultOf(reply).msg_type, "shutdown_reply")
        self.assertEqual(self.sockets(channels), ["control", "control", "iopub", "shell", "shell", "stdin"])
        client.close()
        link.close()
        self.assertEqual(self.sockets(channels), [])


class _PausingTransport:
    """
    A transport that, like Twisted's, pauses its streaming producer once
    more than C{buffer_size} bytes wait, until L{drain}.
    """

    buffer_size = 64 * 1024

    def __init__(self) -> None:
        from twisted.internet.testing import StringTransport

        self.inner = StringTransport()
        self.producer: object = None
        self.streamingProducer = True
        self.pending = 0
        self.connected = True

    def write(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.inner.write(data)
        self.pending += len(data)
        if self.producer is not None and self.pending > self.buffer_size:
            self.producer.pauseProducing()  # type: ignore[attr-defined]

    def registerProducer(self, producer: object, streaming: bool) -> None:
        assert self.producer is None
        self.producer, self.streamingProducer = producer, streaming

    def unregisterProducer(self) -> None:
        self.producer = None

    def drain(self) -> None:
        self.pending = 0
        if self.producer is not None:
            self.producer.resumeProducing()  # type: ignore[attr-defined]


class FrameWriterTests(SynchronousTestCase):
    """
    L{FrameWriter} streams large payloads as fragments from their buffers,
    in order with the messages around them.
    """

    def test_large_message_streamed_in_fragments(self) -> None:
        """
        A large text message goes out as a text frame without FIN and
        continuation frames, one per drain of the transport, their payloads
        together the message; a small message sent meanwhile follows it; the
        transport's previous producer is back at the end and was paused and
        resumed with it.
        """
        from egateway.api.ws_writer import FRAGMENT_SIZE, STREAM_SIZE, FrameWriter

        transport = _PausingTransport()
        events: list[str] = []

        class Previous:
            def pauseProducing(self) -> None:
                events.append("pause")

            def resumeProducing(self) -> None:
                events.append("resume")

        previous = Previous()
        transport.registerProducer(previous, True)
        writer = FrameWriter(transport, lambda: True)
        content = memoryview(b"y" * (2 * FRAGMENT_SIZE + 5))
        chunks = [b'{"content":"', content, b'"}']
        length = sum(len(c) for c in chunks)
        self.assertGreaterEqual(length, STREAM_SIZE)
        writer.send(chunks, length, binary=False)
        writer.send([b"small"], 5, binary=False)
        self.assertEqual(len(fragmented_server_frames(transport.inner.value())), 1)
        while writer.streaming:
            transport.drain()
        frames = fragmented_server_frames(transport.inner.value())
        self.assertEqual([(fin, op) for fin, op, _ in frames], [(False, 1), (False, 0), (True, 0), (True, 1)])
        self.assertEqual(b"".join(p for _, _, p in frames[:3]), b"".join(bytes(c) for c in chunks))
        self.assertEqual(frames[3][2], b"small")
        self.assertIs(transport.producer, previous)
        self.assertEqual(events[:2], ["pause", "resume"])

    def test_small_message_is_one_frame(self) -> None:
        """
        A small binary payload is one final frame with the chunks' bytes.
        """
        from egateway.api.ws_writer import FrameWriter

        transport = _PausingTransport()
        FrameWriter(transport, lambda: True).send([b"ab", memoryview(b"cd")], 4, binary=True)
        self.assertEqual(fragmented_server_frames(transport.inner.value()), [(True, 2, b"abcd")])

    def test_closed_connection_stops_the_stream(self) -> None:
        """
        Once the WebSocket is closing, no more fragments (nor the messages
        waiting behind them) are written.
        """
        from egateway.api.ws_writer import FRAGMENT_SIZE, FrameWriter

        transport = _PausingTransport()
        is_open = [True]
        writer = FrameWriter(transport, lambda: is_open[0])
        writer.send([b"z" * (3 * FRAGMENT_SIZE)], 3 * FRAGMENT_SIZE, binary=True)
        writer.send([b"after"], 5, binary=True)
        is_open[0] = False
        transport.drain()
        self.assertFalse(writer.streaming)
        self.assertEqual(len(fragmented_server_frames(transport.inner.value())), 1)
        self.assertIsNone(transport.producer)

    def test_control_frames_wait_for_the_fragment_boundary(self) -> None:
        """
        A ping written while a message streams goes out after the fragment
        in flight, before the next one; once nothing streams, at once.
        """
        from egateway.api.ws_writer import FRAGMENT_SIZE, FrameWriter

        transport = _PausingTransport()
        writer = FrameWriter(transport, lambda: True)
        writer.send([b"p" * (3 * FRAGMENT_SIZE)], 3 * FRAGMENT_SIZE, binary=True)
        writer.control(b"\x89\x01A")
        while writer.streaming:
            transport.drain()
        writer.control(b"\x89\x01B")
        frames = fragmented_server_frames(transport.inner.value())
        self.assertEqual(
            [(fin, op) for fin, op, _ in frames], [(False, 2), (True, 9), (False, 0), (True, 0), (True, 9)]
        )
        self.assertEqual([p for _, op, p in frames if op == 9], [b"A", b"B"])
        self.assertEqual(b"".join(p for _, op, p in frames if op != 9), b"p" * (3 * FRAGMENT_SIZE))

    def test_close_ends_the_stream_at_the_boundary(self) -> None:
        """
        A close frame written while a message streams follows the fragment
        in flight, and no data frame comes after it.
        """
        from egateway.api.ws_writer import FRAGMENT_SIZE, FrameWriter

        transport = _PausingTransport()
        is_open = [True]
        writer = FrameWriter(transport, lambda: is_open[0])
        writer.send([b"c" * (3 * FRAGMENT_SIZE)], 3 * FRAGMENT_SIZE, binary=True)
        writer.send([b"after"], 5, binary=True)
        writer.control(b"\x88\x02\x03\xe8")
        is_open[0] = False
        transport.drain()
        frames = fragmented_server_frames(transport.inner.value())
        self.assertEqual([(fin, op) for fin, op, _ in frames], [(False, 2), (True, 8)])
        self.assertFalse(writer.streaming)
        self.assertIsNone(transport.producer)

    def test_transport_without_a_named_producer(self) -> None:
        """
        Through a transport whose producer cannot be swapped (TLS), a large
        message goes as one frame.
        """
        from twisted.internet.testing import StringTransport

        from egateway.api.ws_writer import STREAM_SIZE, FrameWriter

        class Hidden(StringTransport):
            def __getattribute__(self, name: str) -> object:
                if name == "producer":
                    raise AttributeError(name)
                return super().__getattribute__(name)

        transport = Hidden()
        payload = b"q" * STREAM_SIZE
        FrameWriter(transport, lambda: True).send([memoryview(payload)], len(payload), binary=True)
        self.assertEqual(fragmented_server_frames(transport.value()), [(True, 2, payload)])


class _Transport(Protocol):
    """
    Fires C{made} with its transport once connected.
    """

    def __init__(self) -> None:
        self.made: Deferred[Any] = Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self.transport)


class _Counter(Protocol):
    """
    Reads a connection, keeping only a hash of it and its length (so that
    reading allocates nothing large), until C{expected} bytes came.
    """

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.digest = hashlib.sha256()
        self.length = 0
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.digest.update(data)
        self.length += len(data)
        if self.length >= self.expected and not self.done.called:
            self.done.callback(None)


class _Streamer(Protocol):
    """
    Sends one message through a L{FrameWriter} once connected.
    """

    def __init__(self, chunks: list[Any], length: int) -> None:
        self.chunks = chunks
        self.length = length

    def connectionMade(self) -> None:
        from egateway.api.ws_writer import FrameWriter

        FrameWriter(self.transport, lambda: True).send(self.chunks, self.length, binary=False)


class TcpStreamTests(TestCase):
    """
    L{FrameWriter} on a real TCP connection (loopback).
    """

    timeout = 30

    @inlineCallbacks
    def test_never_around_tls(self) -> Generator[Any, Any, None]:
        """
        A TCP connection is written through its socket, but not once it
        carries TLS (C{startTLS} leaves it a file descriptor whose socket
        takes TLS records): bytes sent around TLS would reach the client in
        clear text and break its stream.
        """
        from twisted.internet import reactor
        from zope.interface import directlyProvides

        from egateway.api.ws_writer import _direct

        server = _Transport()
        port = reactor.listenTCP(0, protocol.ServerFactory.forProtocol(lambda: server), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = yield ClientCreator(reactor, Protocol).connectTCP("127.0.0.1", port.getHost().port)
        self.addCleanup(client.transport.loseConnection)
        transport = yield server.made
        self.addCleanup(transport.loseConnection)
        self.assertTrue(_direct(transport))
        directlyProvides(transport, ISSLTransport)
        self.assertFalse(_direct(transport))

    @inlineCallbacks
    def test_large_pieces_sent_from_their_own_buffer(self) -> Generator[Any, Any, None]:
        """
        An 8 MB output streamed to a client over TCP is, byte for byte, the
        fragments a copying writer would send, and is never copied whole
        nor fragment by fragment: the largest amount of memory allocated at
        once while sending it stays well under one fragment (it was a
        fragment or more when each fragment was joined into C{bytes}).
        """
        from twisted.internet import reactor

        from egateway.api.ws_writer import FRAGMENT_SIZE, fragment_pieces

        content = memoryview(bytes(range(256)) * (8 * 4096))
        chunks: list[Any] = [b'{"content":"', content, b'"}']
        length = sum(len(c) for c in chunks)
        frames = b"".join(b"".join(pieces) for pieces in fragment_pieces(chunks, length, binary=False))
        expected, expected_length = hashlib.sha256(frames), len(frames)
        del frames
        client = _Counter(expected_length)
        server = protocol.ServerFactory.forProtocol(lambda: _Streamer(chunks, length))
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        connected = yield ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port.getHost().port)
        self.addCleanup(connected.transport.loseConnection)
        yield client.done
        peak = tracemalloc.get_traced_memory()[1] - baseline
        self.assertEqual((client.length, client.digest.hexdigest()), (expected_length, expected.hexdigest()))
        self.assertLess(peak, FRAGMENT_SIZE // 2, peak)


class _PingingStreamer(Protocol):
    """
    Streams one message through a L{ChannelsProtocol}'s writer once
    connected, and has Autobahn send a ping right away and on each reactor
    turn while the message is still going out, as its automatic pings may.
    """

    def __init__(self, chunks: list[Any], length: int) -> None:
        self.chunks = chunks
        self.length = length
        self.pings = 0

    def connectionMade(self) -> None:
        from autobahn.twisted.websocket import WebSocketServerFactory
        from autobahn.websocket.protocol import TrafficStats, WebSocketServerProtocol

        from egateway.api.websocket import ChannelsProtocol

        channels = self.channels = ChannelsProtocol()
        channels.factory = WebSocketServerFactory()
        # What Autobahn copies from its factory once connected.
        for name in WebSocketServerProtocol.CONFIG_ATTRS:
            setattr(channels, name, getattr(channels.factory, name))
        channels.trafficStats, channels.send_queue = TrafficStats(), deque()
        channels.transport = self.transport
        channels.state = ChannelsProtocol.STATE_OPEN
        channels._send_frame(self.chunks, self.length, binary=False)
        self.ping()

    def ping(self) -> None:
        from twisted.internet import reactor

        channels = self.channels
        if channels._writer is None or not channels._writer.streaming:
            return
        self.pings += 1
        channels.sendPing(b"ping %d" % self.pings)
        reactor.callLater(0, self.ping)


class _FrameCollector(Protocol):
    """
    Keeps what a connection receives until it stops.
    """

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(None)


class ControlFramesWhileStreamingTests(TestCase):
    """
    Autobahn's own frames written while a large message streams over TCP.
    """

    timeout = 30

    @inlineCallbacks
    def test_pings_fall_between_fragments(self) -> Generator[Any, Any, None]:
        """
        Pings sent while an 8 MB output is streamed arrive whole, between
        its fragments, and the fragments still carry the whole message: a
        ping written at once would land inside a fragment the socket had
        only partly taken, and the client would read garbage.
        """
        from twisted.internet import reactor

        content = memoryview(bytes(range(256)) * (8 * 4096))
        chunks: list[Any] = [b'{"content":"', content, b'"}']
        length = sum(len(c) for c in chunks)
        streamer = _PingingStreamer(chunks, length)
        port = reactor.listenTCP(
            0, protocol.ServerFactory.forProtocol(lambda: streamer), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        client = _FrameCollector()
        connected = yield ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port.getHost().port)
        # Read only once the server has streamed a while: its socket fills.
        connected.transport.pauseProducing()
        yield deferLater(reactor, 0.2, lambda: None)
        connected.transport.resumeProducing()
        while streamer.channels._writer.streaming:
            yield deferLater(reactor, 0.01, lambda: None)
        streamer.transport.loseConnection()
        yield client.done
        frames = fragmented_server_frames(b"".join(client.data))
        pings = [payload for _, opcode, payload in frames if opcode == 9]
        data = [(fin, opcode, payload) for fin, opcode, payload in frames if opcode != 9]
        self.assertGreater(len(pings), 1)
        self.assertEqual(pings, [b"ping %d" % n for n in range(1, len(pings) + 1)])
        self.assertEqual([opcode for _, opcode, _ in data], [1] + [0] * (len(data) - 1))
        self.assertEqual([fin for fin, _, _ in data], [False] * (len(data) - 1) + [True])
        self.assertEqual(b"".join(p for _, _, p in data), b"".join(bytes(c) for c in chunks))
