"""
A large kernel message relayed while its signature is checked
(L{egateway.wire.link.KernelLink.verifies_signatures}): its clients get all
of it but the last fragment of its WebSocket message meanwhile, and the end
only once the signature is known good; nothing else in the gateway sees it
before that, and what the kernel sends meanwhile follows it, in order.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from egateway.api.ws_writer import FRAGMENT_SIZE, FrameWriter
from egateway.kernels.journal import JournalLimits, KernelSession
from egateway.wire.link import CHECK_AHEAD_SIZE, KernelLink
from egateway.wire.protocol import CHECK_SLICE, Message, Signer
from egateway.wire.ws_formats import legacy_encode
from tests.support.fakes import FakeChannels, RecordingClient, make_manager
from tests.test_websocket_memory import fragmented_server_frames
from tests.test_wire_zero_copy import KEY, _PausingTransport, connection_info


def big_stream(size: int = 2 * CHECK_AHEAD_SIZE + 5) -> Message:
    return Message.build("stream", {"name": "stdout", "text": "z" * size}, "kernel")


class SliceCheckTests(SynchronousTestCase):
    def test_same_verdict_as_one_pass(self) -> None:
        """
        Checked a slice per step, a signature passes exactly when
        L{Signer.verify} passes it, after one step per slice.
        """
        signer = Signer(KEY)
        for size in (10, CHECK_SLICE, 3 * CHECK_SLICE + 7):
            message = big_stream(size)
            signature = signer.sign(message.parts)
            total = sum(len(part) for part in message.parts)
            slices = sum(-(-len(part) // CHECK_SLICE) for part in message.parts)
            for given, expected in ((signature, True), (b"0" * len(signature), False)):
                check = signer.check_in_slices(given, message.parts)
                verdicts = [check.step() for _ in range(slices)]
                self.assertEqual(verdicts, [None] * (slices - 1) + [expected], (size, total))
                self.assertEqual(signer.verify(given, message.parts), expected)

    def test_altered_content_fails(self) -> None:
        signer = Signer(KEY)
        message = big_stream(2 * CHECK_SLICE)
        signature = signer.sign(message.parts)
        altered = [*message.parts[:3], message.parts[3][:-2] + b'y"']
        check = signer.check_in_slices(signature, altered)
        verdict = None
        while verdict is None:
            verdict = check.step()
        self.assertFalse(verdict)


def drained(transport: _PausingTransport) -> list[tuple[bool, int, bytes]]:
    """
    The frames C{transport} holds once drained until its writer is done or
    waits (for a release): what a client would have read.
    """
    for _ in range(20):
        transport.drain()
    return fragmented_server_frames(transport.inner.value())


class FrameWriterAheadTests(SynchronousTestCase):
    """
    L{FrameWriter.send_ahead}: all fragments but the last, which waits for
    L{FrameWriter.release}.
    """

    def test_last_fragment_waits_for_release(self) -> None:
        """
        The fragments but the last go out as the transport drains; pings
        still go out (between fragments); the last fragment, then what was
        sent meanwhile, only after the release.
        """
        transport = _PausingTransport()
        writer = FrameWriter(transport, lambda: True)
        payload = b"a" * (2 * FRAGMENT_SIZE + 3)
        self.assertTrue(writer.send_ahead([memoryview(payload)], len(payload), binary=True))
        writer.send([b"next"], 4, binary=True)
        frames = drained(transport)
        self.assertEqual([(fin, op) for fin, op, _ in frames], [(False, 2), (False, 0)])
        self.assertTrue(writer.streaming)
        writer.control(b"\x89\x01P")
        writer.release()
        frames = drained(transport)
        self.assertEqual(
            [(fin, op) for fin, op, _ in frames], [(False, 2), (False, 0), (True, 9), (True, 0), (True, 2)]
        )
        self.assertEqual(b"".join(p for _, op, p in frames[:4] if op != 9), payload)
        self.assertEqual(frames[-1][2], b"next")
        self.assertFalse(writer.streaming)
        self.assertIsNone(transport.producer)

    def test_close_abandons_it(self) -> None:
        """
        A close while the end waits goes out at the boundary, and neither
        the end nor what waited behind it follows.
        """
        transport = _PausingTransport()
        is_open = [True]
        writer = FrameWriter(transport, lambda: is_open[0])
        payload = b"b" * (3 * FRAGMENT_SIZE)
        writer.send_ahead([payload], len(payload), binary=False)
        writer.send([b"next"], 4, binary=False)
        drained(transport)
        is_open[0] = False
        writer.control(b"\x88\x02\x03\xf3")
        frames = drained(transport)
        self.assertEqual([(fin, op) for fin, op, _ in frames], [(False, 1), (False, 0), (True, 8)])
        self.assertFalse(writer.streaming)
        writer.release()
        self.assertEqual(len(drained(transport)), 3)

    def test_declined_when_it_cannot_stream(self) -> None:
        """
        A message too small to stream, or one that would have to wait
        behind another, is not sent ahead: nothing of it is written.
        """
        transport = _PausingTransport()
        writer = FrameWriter(transport, lambda: True)
        self.assertFalse(writer.send_ahead([b"small"], 5, binary=True))
        self.assertEqual(transport.inner.value(), b"")
        payload = b"c" * (2 * FRAGMENT_SIZE)
        writer.send([payload], len(payload), binary=True)
        self.assertFalse(writer.send_ahead([payload], len(payload), binary=True))
        frames = drained(transport)
        self.assertEqual([(fin, op) for fin, op, _ in frames], [(False, 2), (True, 0)])


class LinkAheadTests(SynchronousTestCase):
    """
    L{KernelLink} checks a large message's signature a slice per reactor
    turn, holding back everything else the kernel sends meanwhile.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[tuple[str, Any]] = []

    def link(self, curve: bool = False) -> KernelLink:
        """
        A link to a kernel of its own, whose messages go to L{events} as
        C{(what, msg_id)}.
        """
        channels = self.channels = FakeChannels()
        info = connection_info(curve)
        channels.serve(info)
        link = KernelLink(
            info,
            channels,
            self.clock,
            lambda message: self.events.append(("iopub", message.msg_id)),
            kernel_id="k",
            on_iopub_ahead=lambda message: self.events.append(("ahead", message.msg_id)),
            on_iopub_checked=lambda message: self.events.append(("checked", message.msg_id)),
        )
        self.addCleanup(link.close)
        return link

    def publish(self, link: KernelLink, message: Message, signature: bytes | None = None) -> None:
        self.channels.servers[link.info.url("iopub")].publish_message(message, signature)

    def test_checked_while_relayed(self) -> None:
        """
        A large message is handed ahead at once and delivered only once its
        signature is checked, a slice per turn; a small iopub message and a
        client's reply that come meanwhile follow it, in order.
        """
        link = self.link()
        large, small = big_stream(), Message.build("stream", {"name": "stdout", "text": "after"}, "kernel")
        client = link.client(lambda channel, message: self.events.append((channel, message.msg_type)))
        self.publish(link, large)
        self.publish(link, small)
        client.send("shell", Message.build("kernel_info_request", {}, "client"))
        self.assertEqual(self.events, [("ahead", large.msg_id)])
        # One slice per reactor turn: the verdict takes as many turns.
        slices = sum(-(-len(part) // CHECK_SLICE) for part in large.parts)
        for _ in range(slices - 1):
            self.turn()
        self.assertEqual(self.events, [("ahead", large.msg_id)])
        self.turn()
        self.assertEqual(
            self.events[:4],
            [("ahead", large.msg_id), ("iopub", large.msg_id), ("checked", large.msg_id), ("iopub", small.msg_id)],
        )
        # The fake kernel's busy, its reply, its idle.
        self.assertEqual([kind for kind, _ in self.events[4:]], ["iopub", "shell", "iopub"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def turn(self) -> None:
        """
        One reactor turn: the calls due now, not those they schedule.
        """
        for call in list(self.clock.getDelayedCalls()):
            self.clock.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)

    def test_bad_signature(self) -> None:
        """
        A large message whose signature fails is withdrawn from its clients
        and seen by nothing else; what followed it is handled.
        """
        link = self.link()
        large, small = big_stream(), Message.build("stream", {"name": "stdout", "text": "after"}, "kernel")
        self.publish(link, large, signature=b"0" * 64)
        self.publish(link, small)
        self.clock.advance(0)
        self.assertEqual(self.events, [("ahead", large.msg_id), ("checked", large.msg_id), ("iopub", small.msg_id)])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_two_large_messages_in_turn(self) -> None:
        """
        A second large message waits for the first's check, then has its
        own.
        """
        link = self.link()
        first, second = big_stream(), big_stream(CHECK_AHEAD_SIZE)
        self.publish(link, first)
        self.publish(link, second)
        self.clock.advance(0)
        self.assertEqual(
            self.events,
            [
                (what, message.msg_id)
                for message in (first, second)
                for what in ("ahead", "iopub", "checked")
            ],
        )

    def test_small_curve_and_unasked_messages_checked_at_once(self) -> None:
        """
        Small messages are checked in one pass, messages over CurveZMQ not
        at all (L{KernelLink.verifies_signatures}), and a link made without
        C{on_iopub_ahead} checks large ones in one pass too: none is
        handed ahead.
        """
        small = Message.build("stream", {"name": "stdout", "text": "x" * (CHECK_AHEAD_SIZE - 200)}, "kernel")
        self.publish(self.link(), small)
        self.publish(self.link(curve=True), big_stream())
        plain: list[Message] = []
        info = connection_info(False)
        channels = FakeChannels()
        channels.serve(info)
        link = KernelLink(info, channels, self.clock, plain.append)
        self.addCleanup(link.close)
        channels.servers[info.url("iopub")].publish_message(big_stream())
        self.assertEqual([kind for kind, _ in self.events], ["iopub", "iopub"])
        self.assertEqual(len(plain), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closed_during_the_check(self) -> None:
        """
        A link closed while it checks withdraws the message from its
        clients and delivers nothing more.
        """
        link = self.link()
        large = big_stream()
        self.publish(link, large)
        self.publish(link, Message.build("stream", {"name": "stdout", "text": "after"}, "kernel"))
        link.close()
        self.clock.advance(0)
        self.assertEqual(self.events, [("ahead", large.msg_id), ("checked", large.msg_id)])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SessionAheadTests(SynchronousTestCase):
    def test_under_the_number_it_will_get(self) -> None:
        """
        A connected session hands a message ahead under the number
        L{KernelSession.deliver} will give it; then delivers it under it.
        """

        class Kernel:
            id = "k"
            journal_sink = None

        session = KernelSession("s", Kernel(), JournalLimits())  # type: ignore[arg-type]
        client = session.client = RecordingClient()  # type: ignore[assignment]
        session.deliver("iopub", Message.build("status", {"execution_state": "busy"}, "kernel"))
        large = big_stream()
        session.deliver_ahead("iopub", large)
        session.deliver("iopub", large)
        session.withdraw(large)
        self.assertEqual(client.ahead, [("iopub", large, 2)])
        self.assertEqual(client.seqs, [1, 2])
        self.assertEqual(client.withdrawn, [large])

    def test_not_before_a_shared_store_holds_it(self) -> None:
        """
        A session whose messages go to a shared store first (a named
        session across gateways) hands nothing ahead: its client gets a
        message only once the store holds it.
        """

        class Kernel:
            id = "k"

            @staticmethod
            def journal_sink(*args: Any) -> None:
                pass

        session = KernelSession("s", Kernel(), JournalLimits())  # type: ignore[arg-type]
        client = session.client = RecordingClient()  # type: ignore[assignment]
        session.deliver_ahead("iopub", big_stream())
        self.assertEqual(client.ahead, [])
        session.client = None
        session.deliver_ahead("iopub", big_stream())

    def test_not_without_a_journal(self) -> None:
        """
        A session that cannot be resumed hands nothing ahead: its client
        could not get back a message abandoned midway.
        """

        class Kernel:
            id = "k"
            journal_sink = None

        session = KernelSession("s", Kernel(), JournalLimits(), resumable=False)  # type: ignore[arg-type]
        client = session.client = RecordingClient()  # type: ignore[assignment]
        session.deliver_ahead("iopub", big_stream())
        self.assertEqual(client.ahead, [])


class _Request:
    class kernel:
        id = "k"

    message_limit: int | None = None


def open_channels() -> tuple[Any, _PausingTransport]:
    """
    An open L{ChannelsProtocol} (legacy protocol, no session) writing to a
    L{_PausingTransport}.
    """
    from autobahn.twisted.websocket import WebSocketServerFactory
    from autobahn.websocket.protocol import TrafficStats, WebSocketServerProtocol

    from egateway.api.websocket import ChannelsProtocol
    from egateway.ops.metrics import RelayCounts

    transport = _PausingTransport()
    channels = ChannelsProtocol()
    channels.factory = WebSocketServerFactory()
    channels.factory.relay = RelayCounts()  # type: ignore[attr-defined]
    for name in WebSocketServerProtocol.CONFIG_ATTRS:
        setattr(channels, name, getattr(channels.factory, name))
    channels.closeHandshakeTimeout = 0
    channels.trafficStats, channels.send_queue = TrafficStats(), deque()
    channels.transport = transport
    channels.state = ChannelsProtocol.STATE_OPEN
    channels.channel_request = _Request()  # type: ignore[assignment]
    return channels, transport


class ChannelsAheadTests(SynchronousTestCase):
    """
    A WebSocket connection (L{ChannelsProtocol}) sends a message ahead and
    ends it when the same message comes to be delivered under the same
    number; anything else abandons it by closing the connection.
    """

    def channels(self) -> tuple[Any, _PausingTransport]:
        return open_channels()

    def test_delivered_under_the_same_number(self) -> None:
        """
        The end goes out when the message is delivered: the fragments
        together are what L{deliver} alone would have sent, counted once.
        """
        channels, transport = self.channels()
        large = big_stream()
        channels.deliver_ahead("iopub", large, 7)
        self.assertEqual([fin for fin, _, _ in drained(transport)], [False, False])
        channels.deliver("iopub", large, 7)
        channels.deliver("iopub", Message.build("status", {"execution_state": "idle"}, "kernel"), 8)
        frames = drained(transport)
        self.assertEqual([(fin, op) for fin, op, _ in frames], [(False, 1), (False, 0), (True, 0), (True, 1)])
        self.assertEqual(b"".join(p for _, _, p in frames[:3]), legacy_encode(large, "iopub", 7)[0])
        self.assertEqual(channels.factory.relay.to_client["iopub"], [2, len(legacy_encode(large, "iopub", 7)[0]) + len(frames[3][2])])
        self.assertEqual(channels.state, channels.STATE_OPEN)

    def assertAbandoned(self, channels: Any, transport: _PausingTransport) -> None:
        frames = drained(transport)
        # Fragments without FIN (as many as went out before), then the close.
        self.assertEqual([(fin, op) for fin, op, _ in frames][-2:], [(False, frames[-2][1]), (True, 8)])
        self.assertNotIn(True, [fin for fin, op, _ in frames if op != 8])
        self.assertEqual(frames[-1][2][:2], (1011).to_bytes(2, "big"))
        self.assertEqual(channels.state, channels.STATE_CLOSING)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_another_message_first(self) -> None:
        """
        Another message to deliver first (a status of the gateway's, which
        took the number) closes the connection: no message is completed.
        """
        channels, transport = self.channels()
        large = big_stream()
        channels.deliver_ahead("iopub", large, 7)
        channels.deliver("iopub", Message.build("status", {"execution_state": "restarting"}, "gateway"), 7)
        channels.deliver("iopub", large, 8)
        self.assertAbandoned(channels, transport)

    def test_withdrawn(self) -> None:
        """
        Withdrawn (its signature failed), the message is abandoned; a
        withdrawal after its delivery changes nothing.
        """
        channels, transport = self.channels()
        large = big_stream()
        channels.deliver_ahead("iopub", large, 7)
        channels.withdraw(large)
        self.assertAbandoned(channels, transport)

        channels, transport = self.channels()
        channels.deliver_ahead("iopub", large, 1)
        channels.deliver("iopub", large, 1)
        channels.withdraw(large)
        self.assertEqual([fin for fin, _, _ in drained(transport)], [False, False, True])
        self.assertEqual(channels.state, channels.STATE_OPEN)

    def test_not_ahead_when_it_would_be_cut(self) -> None:
        """
        A client that takes smaller messages gets it cut, in its turn.
        """
        channels, transport = self.channels()
        channels.channel_request.message_limit = CHECK_AHEAD_SIZE
        large = big_stream()
        channels.deliver_ahead("iopub", large, 7)
        self.assertEqual(transport.inner.value(), b"")
        channels.deliver("iopub", large, 7)
        self.assertGreater(len(drained(transport)), 1)
        self.assertEqual(channels.state, channels.STATE_OPEN)


class CloseCodeTests(SynchronousTestCase):
    def test_rfc_codes_a_server_sends(self) -> None:
        """
        The gateway closes with RFC 6455's 1001 (its kernel is gone) and
        1011 (internal error), which Autobahn's own C{sendClose} refuses
        (it raised, and the client was never told); its private codes still
        go through Autobahn.
        """
        for code in (1001, 1011, 4003):
            channels, transport = open_channels()
            channels.sendClose(code, "why " * 50)
            [(fin, op, payload)] = fragmented_server_frames(transport.inner.value())
            self.assertEqual((fin, op, payload[:2]), (True, 8, code.to_bytes(2, "big")))
            self.assertLessEqual(len(payload), 125)
            self.assertTrue(payload[2:].startswith(b"why why"))
            self.assertEqual(channels.state, channels.STATE_CLOSING)


class KernelAheadTests(SynchronousTestCase):
    """
    Through a launched kernel (L{egateway.kernels.launching}): its sessions
    get a large message ahead, then delivered under the same number, or
    withdrawn when its signature fails, which leaves no trace.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        manager, launcher, _ = make_manager(self.clock)
        self.kernel = self.successResultOf(Deferred.fromCoroutine(manager.start_kernel(None, None)))
        self.server = launcher.processes[0].server
        self.client = RecordingClient()
        self.session = self.kernel.attach(self.client, "a-session")

    def test_delivered_under_the_number_given_ahead(self) -> None:
        """
        The session's client gets the message ahead under the next number,
        then, once checked, the same message under that number (and the
        withdrawal that follows every check, which then finds nothing).
        """
        large = big_stream()
        self.server.publish_message(large)
        [(channel, ahead, seq)] = self.client.ahead
        self.assertEqual((channel, ahead.msg_id, seq), ("iopub", large.msg_id, self.session.seq + 1))
        self.assertEqual(self.client.messages, [])
        self.clock.advance(0)
        self.assertEqual([m.msg_id for _, m in self.client.messages], [large.msg_id])
        self.assertEqual(self.client.seqs, [seq])
        self.assertIs(self.client.messages[0][1], ahead)
        self.assertEqual([m.msg_id for m in self.client.withdrawn], [large.msg_id])
        self.assertEqual(len(self.session.journal), 1)

    def test_bad_signature_leaves_no_trace(self) -> None:
        """
        A forged large message is withdrawn from the client, and neither
        the client, the journal, the kernel's state nor its activity saw
        it; the kernel's next message is delivered.
        """
        activity, state = self.kernel.last_activity, self.kernel.execution_state
        self.clock.advance(5)
        forged = Message.build("status", {"execution_state": "busy", "pad": "p" * CHECK_AHEAD_SIZE}, "kernel")
        self.server.publish_message(forged, signature=b"0" * 64)
        self.clock.advance(0)
        self.assertEqual([m.msg_id for m in self.client.withdrawn], [forged.msg_id])
        self.assertEqual(self.client.messages, [])
        self.assertEqual(len(self.session.journal), 0)
        self.assertEqual((self.kernel.last_activity, self.kernel.execution_state), (activity, state))
        self.server.publish("stream", {"name": "stdout", "text": "next"})
        self.assertEqual([m.content()["text"] for _, m in self.client.messages], ["next"])
        self.assertEqual(self.client.seqs, [self.session.seq])
