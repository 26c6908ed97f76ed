"""
Acknowledgement pings (L{egateway.api.ws_acks}): a connected session holds
only what its client has not yet answered a ping for.
"""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from egateway.api.ws_acks import ACK_BYTES, ACK_DELAY, ACK_PREFIX, ACK_SOON, Acknowledgements
from egateway.api.ws_writer import FrameWriter
from tests.test_websocket_memory import TEXT, MemoryCase, Wire, client_frame, fragmented_server_frames, server_frames

PING, PONG = 0x9, 0xA


class AcknowledgementsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pings: list[bytes] = []
        self.acked: list[int] = []
        self.may_ping = True
        self.acks = Acknowledgements(self.clock, 5.0, self.ping, self.acked.append)

    def ping(self, payload: bytes) -> bool:
        if self.may_ping:
            self.pings.append(payload)
        return self.may_ping

    def test_one_ping_for_what_came_meanwhile(self) -> None:
        """
        The ping goes C{delay} seconds after the first message unanswered,
        for every message written by then; its pong acknowledges them.
        """
        self.acks.delivered(1, 100)
        self.clock.advance(4)
        self.acks.delivered(2, 100)
        self.acks.delivered(3, 100)
        self.assertEqual(self.pings, [])
        self.clock.advance(1)
        self.assertEqual(self.pings, [ACK_PREFIX + b"3"])
        self.acks.delivered(4, 100)
        self.clock.advance(30)
        self.assertEqual(self.pings, [ACK_PREFIX + b"3"], "one ping in flight at a time")
        self.assertFalse(self.acks.pong(ACK_PREFIX + b"4"))
        self.assertTrue(self.acks.pong(ACK_PREFIX + b"3"))
        self.assertEqual(self.acked, [3])
        self.clock.advance(5)
        self.assertEqual(self.pings[-1], ACK_PREFIX + b"4")

    def test_nothing_new_no_ping(self) -> None:
        """
        Once everything written is acknowledged, no ping until the next
        message; numbers not above the last one delivered change nothing.
        """
        self.acks.delivered(2, 100)
        self.clock.advance(5)
        self.acks.pong(self.pings[-1])
        self.acks.delivered(2, 100)
        self.acks.delivered(1, 100)
        self.clock.advance(60)
        self.assertEqual(len(self.pings), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_asked_again_when_it_may_not_ping(self) -> None:
        """
        While it may not ping (a message half sent), it asks again after
        the delay, and the ping then covers what was written meanwhile.
        """
        self.may_ping = False
        self.acks.delivered(1, 100)
        self.clock.advance(5)
        self.acks.delivered(2, 100)
        self.may_ping = True
        self.clock.advance(5)
        self.assertEqual(self.pings, [ACK_PREFIX + b"2"])

    def test_busy_connection_pinged_sooner(self) -> None:
        """
        Once L{ACK_BYTES} were sent since the last ping, the next one goes
        at most L{ACK_SOON} later (never sooner, however much is sent), and
        again after the pong if as much was sent meanwhile.
        """
        self.acks.delivered(1, 100)
        self.clock.advance(1)
        for seq in range(2, 40):
            self.acks.delivered(seq, ACK_BYTES // 4)
        self.clock.advance(ACK_SOON - 0.01)
        self.assertEqual(self.pings, [])
        self.clock.advance(0.01)
        self.assertEqual(self.pings, [ACK_PREFIX + b"39"])
        for seq in range(40, 45):
            self.acks.delivered(seq, ACK_BYTES // 4)
        self.acks.pong(self.pings[-1])
        self.clock.advance(ACK_SOON)
        self.assertEqual(self.pings[-1], ACK_PREFIX + b"44")
        self.acks.pong(self.pings[-1])
        self.acks.delivered(45, 100)
        self.clock.advance(ACK_DELAY - 0.01)
        self.assertEqual(len(self.pings), 2, "a quiet connection waits the whole delay")
        self.clock.advance(0.01)
        self.assertEqual(self.pings[-1], ACK_PREFIX + b"45")

    def test_one_large_message_pinged_soon(self) -> None:
        """
        A single message of L{ACK_BYTES} or more (a large output) is pinged
        for L{ACK_SOON} after it, not the whole delay.
        """
        self.acks.delivered(1, ACK_BYTES)
        self.clock.advance(ACK_SOON)
        self.assertEqual(self.pings, [ACK_PREFIX + b"1"])

    def test_settled_by_a_later_ping(self) -> None:
        """
        A pong for a later ping (a client may answer only the last of two)
        settles the one in flight.
        """
        self.acks.delivered(7, 100)
        self.clock.advance(5)
        self.acks.settled()
        self.assertEqual(self.acked, [7])
        self.assertIsNone(self.acks.pending)
        self.acks.settled()
        self.assertEqual(self.acked, [7])

    def test_stop(self) -> None:
        """
        Stopped, it forgets the ping in flight (its pong acknowledges
        nothing) and has no timer left.
        """
        self.acks.delivered(1, 100)
        self.clock.advance(5)
        self.acks.delivered(2, 100)
        self.acks.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.acks.pong(self.pings[-1]))
        self.assertEqual(self.acked, [])


def pings(data: bytes) -> list[bytes]:
    return [payload for opcode, payload in server_frames(data) if opcode == PING]


def texts(data: bytes) -> list[str]:
    return [
        json.loads(payload)["content"].get("text", "")
        for opcode, payload in server_frames(data)
        if opcode == TEXT and json.loads(payload)["msg_type"] == "stream"
    ]


class AcknowledgedSessionTests(MemoryCase):
    """
    The channels WebSocket pings to acknowledge what it sent, and its
    session stops holding what the pong acknowledges.
    """

    def publish(self, *lines: str) -> None:
        for line in lines:
            self.kernel_side.publish("stream", {"name": "stdout", "text": line})

    def acknowledge(self, wire: Wire) -> bytes:
        """
        The ping the gateway sends C{ACK_DELAY} later, answered.
        """
        self.clock.advance(ACK_DELAY)
        [ping] = pings(wire.received())
        wire.send(client_frame(PONG, ping))
        return ping

    def test_pong_frees_the_journal(self) -> None:
        """
        Messages sent to a connected client are held until the pong of the
        ping after them; then the journal, and what all journals hold
        together, are free of them.
        """
        wire = self.connect("?session_id=a-1")
        session = self.kernel.sessions["a-1"]
        held = self.manager.journal_limits.held
        before = held.total
        self.publish("one", "two", "three")
        self.assertEqual(len(session.journal), 3)
        self.assertGreater(held.total, before)
        wire.received()
        ping = self.acknowledge(wire)
        self.assertEqual(ping, ACK_PREFIX + b"%d" % session.seq)
        self.assertEqual((len(session.journal), held.total), (0, before))

        self.publish("four")
        self.assertEqual(len(session.journal), 1)
        self.acknowledge(wire)
        self.assertEqual(len(session.journal), 0)

    def test_unanswered_ping_keeps_the_window(self) -> None:
        """
        A client that answers no ping gets one, and its session keeps what
        it sent (within the connected bounds).
        """
        wire = self.connect("?session_id=a-2")
        session = self.kernel.sessions["a-2"]
        self.publish("one")
        self.clock.advance(ACK_DELAY)
        self.publish("two", "three")
        self.clock.advance(ACK_DELAY * 4)
        self.assertEqual(len(pings(wire.received())), 1)
        self.assertEqual(len(session.journal), 3)

    def test_resume_after_an_acknowledgement(self) -> None:
        """
        A client whose connection drops after an acknowledgement resumes
        exactly: from the number it names, with what arrived meanwhile; one
        naming an acknowledged number it no longer has is told messages
        were dropped.
        """
        wire = self.connect("?session_id=a-3")
        session = self.kernel.sessions["a-3"]
        self.publish("one", "two")
        self.acknowledge(wire)
        last = session.seq
        self.publish("three")
        wire.lose()
        self.publish("four")

        again = self.connect(f"?session_id=a-3&resume_after={last}")
        self.assertEqual(texts(again.received()), ["three", "four"])
        again.lose()
        third = self.connect("?session_id=a-3&resume_after=0")
        received = texts(third.received())
        self.assertIn("dropped", received[0])
        self.assertEqual(received[1:], ["three", "four"])

    def test_not_while_keepalive_ping_awaits_its_pong(self) -> None:
        """
        No acknowledgement ping goes while Autobahn's keep-alive ping waits
        for its pong (a client may answer only the later of two pings, and
        Autobahn closes a connection whose keep-alive pong does not come);
        answered, the acknowledgement follows.
        """
        wire = self.connect("?session_id=a-4")
        session = self.kernel.sessions["a-4"]
        self.clock.advance(30)
        [keepalive] = pings(wire.received())
        self.assertFalse(keepalive.startswith(ACK_PREFIX))
        self.publish("one")
        self.clock.advance(ACK_DELAY)
        self.assertEqual(pings(wire.received()), [])
        wire.send(client_frame(PONG, keepalive))
        self.clock.advance(ACK_DELAY)
        [ping] = pings(wire.received())
        self.assertTrue(ping.startswith(ACK_PREFIX))
        self.assertEqual(len(session.journal), 1)

    def test_keepalive_pong_settles_an_earlier_ping(self) -> None:
        """
        A client that answers only the keep-alive ping sent after an
        acknowledgement ping has read that one too.
        """
        wire = self.connect("?session_id=a-5")
        session = self.kernel.sessions["a-5"]
        self.clock.advance(30 - ACK_DELAY - 1)
        self.publish("one")
        self.clock.advance(ACK_DELAY)
        [ping] = pings(wire.received())
        self.assertTrue(ping.startswith(ACK_PREFIX))
        self.clock.advance(1)
        [keepalive] = pings(wire.received())
        self.assertEqual(len(session.journal), 1)
        wire.send(client_frame(PONG, keepalive))
        self.assertEqual(len(session.journal), 0)

    def test_not_inside_a_streamed_message(self) -> None:
        """
        While a large message is still being written, no ping goes (it
        would land between its fragments and acknowledge it before its
        end); once written, the ping covers it.
        """
        wire = self.connect("?session_id=a-6")
        session = self.kernel.sessions["a-6"]
        transport, write = wire.transport, wire.transport.write
        paused: list[FrameWriter] = []

        def write_and_fill(data: bytes) -> None:
            write(data)
            producer = transport.producer
            if isinstance(producer, FrameWriter) and not paused:
                paused.append(producer)
                producer.pauseProducing()

        self.patch(transport, "write", write_and_fill)
        self.publish("x" * (3 << 20))
        [writer] = paused
        self.assertTrue(writer.streaming)
        self.clock.advance(ACK_DELAY)
        written = wire.received()
        self.assertTrue(ACK_PREFIX not in written, "a ping inside the streamed message")
        writer.resumeProducing()
        self.assertFalse(writer.streaming)
        self.clock.advance(ACK_DELAY)
        frames = fragmented_server_frames(written + wire.received())
        self.assertEqual([p for _, opcode, p in frames if opcode == PING], [ACK_PREFIX + b"%d" % session.seq])
        self.assertEqual(frames[-1][1], PING, "the ping after the message's last fragment")

    def test_unnamed_session_never_pings(self) -> None:
        """
        A connection without a session id (nothing to resume, nothing
        journaled) sends no acknowledgement pings.
        """
        wire = self.connect()
        self.publish("one")
        self.clock.advance(ACK_DELAY * 2)
        self.assertEqual(pings(wire.received()), [])
