"""
Kernel sessions and their journals: numbering, parking, exact resumption,
the journal bound, and expiry.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from egateway.kernels.kernel import SessionTaken
from egateway.kernels.journal import JournalLimits
from egateway.wire.protocol import Message
from tests.support.fakes import RecordingClient, make_manager


def output(n: int) -> Message:
    return Message.build("stream", {"name": "stdout", "text": f"{n}\n"}, "kernel")


class SessionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        manager, _, _ = make_manager(self.clock)
        from twisted.internet.defer import Deferred

        self.kernel = self.successResultOf(Deferred.fromCoroutine(manager.start_kernel()))
        self.kernel.journal_limits = JournalLimits(entries=10)

    def texts(self, client: RecordingClient) -> list[str]:
        return [m.content()["text"] for _, m in client.messages if m.msg_type == "stream"]

    def test_numbered_in_order(self) -> None:
        """
        Each message a session gets is numbered 1, 2, 3 ...
        """
        client = RecordingClient()
        self.kernel.attach(client, "s")
        for n in range(3):
            self.kernel.on_iopub(output(n))
        self.assertEqual(client.seqs, [1, 2, 3])

    def test_exact_resume(self) -> None:
        """
        A client resuming after message N gets N+1 onwards, once, including
        what arrived while it was away.
        """
        first = RecordingClient()
        session = self.kernel.attach(first, "s")
        for n in range(4):
            self.kernel.on_iopub(output(n))
        self.kernel.detach(session, first)
        for n in range(4, 7):
            self.kernel.on_iopub(output(n))
        second = RecordingClient()
        self.kernel.attach(second, "s", resume_after=2)
        self.assertEqual(self.texts(second), [f"{n}\n" for n in range(2, 7)])
        numbered = [seq for seq, (_, m) in zip(second.seqs, second.messages) if m.msg_type == "stream"]
        self.assertEqual(numbered, [3, 4, 5, 6, 7])

    def test_resume_without_position(self) -> None:
        """
        Without a resume point, a client gets what was sent after the gateway
        saw its predecessor leave.
        """
        first = RecordingClient()
        session = self.kernel.attach(first, "s")
        self.kernel.on_iopub(output(0))
        self.kernel.detach(session, first)
        self.kernel.on_iopub(output(1))
        second = RecordingClient()
        self.kernel.attach(second, "s")
        self.assertEqual(self.texts(second), ["1\n"])

    def test_bound(self) -> None:
        """
        Past the journal bound the client is told how many messages were
        dropped before it gets the rest.
        """
        first = RecordingClient()
        session = self.kernel.attach(first, "s")
        self.kernel.detach(session, first)
        for n in range(25):
            self.kernel.on_iopub(output(n))
        second = RecordingClient()
        self.kernel.attach(second, "s", resume_after=0)
        texts = self.texts(second)
        self.assertIn("15 message(s) of output were dropped", texts[0])
        self.assertEqual(texts[1:], [f"{n}\n" for n in range(15, 25)])

    def test_sessions_are_separate(self) -> None:
        """
        Two sessions have their own numbering; an anonymous session is not
        kept once its client leaves.
        """
        a, b = RecordingClient(), RecordingClient()
        self.kernel.attach(a, "a")
        anonymous = self.kernel.attach(b)
        self.kernel.on_iopub(output(0))
        self.assertEqual((a.seqs, b.seqs), ([1], [1]))
        self.kernel.detach(anonymous, b)
        self.assertEqual(list(self.kernel.sessions), ["a"])

    def test_sessions_belong_to_their_user(self) -> None:
        """
        Another user naming a session (connected or parked) neither takes it
        over nor gets its journal; its own user resumes it; a revoked
        client's session is dropped, journal and all.
        """
        alice = RecordingClient()
        session = self.kernel.attach(alice, "s", user="alice")
        self.kernel.on_iopub(output(0))
        with self.assertRaises(SessionTaken):
            self.kernel.attach(RecordingClient(), "s", resume_after=0, user="bob")
        with self.assertRaises(SessionTaken):
            self.kernel.attach(RecordingClient(), "s", resume_after=0)
        self.assertEqual((alice.gone, session.client), ([], alice))
        self.kernel.detach(session, alice)
        bob = RecordingClient()
        with self.assertRaises(SessionTaken):
            self.kernel.attach(bob, "s", resume_after=0, user="bob")
        self.assertEqual(bob.messages, [])
        again = RecordingClient()
        self.kernel.attach(again, "s", resume_after=0, user="alice")
        self.assertEqual(self.texts(again), ["0\n"])
        self.kernel.drop_session(session, again)
        self.assertNotIn("s", self.kernel.sessions)

    def test_expiry(self) -> None:
        """
        A parked session expires after the retention period.
        """
        client = RecordingClient()
        session = self.kernel.attach(client, "s")
        self.kernel.detach(session, client)
        self.clock.advance(100)
        self.kernel.expire_sessions(retention=200)
        self.assertIn("s", self.kernel.sessions)
        self.clock.advance(100)
        self.kernel.expire_sessions(retention=200)
        self.assertNotIn("s", self.kernel.sessions)


class ConnectedWindowTests(SynchronousTestCase):
    """
    A session holds only a small window of messages while its client is
    connected, and its full journal once the client is gone.
    """

    def setUp(self) -> None:
        from twisted.internet.defer import Deferred

        manager, _, _ = make_manager(Clock())
        self.kernel = self.successResultOf(Deferred.fromCoroutine(manager.start_kernel()))
        self.kernel.journal_limits = JournalLimits(entries=10_000)

    def test_window_while_connected(self) -> None:
        """
        While connected the journal keeps the last L{CONNECTED_ENTRIES}
        messages (what may be in flight at a drop), which a client resuming
        within them gets exactly; after the drop, everything is kept.
        """
        from egateway.kernels.journal import CONNECTED_ENTRIES

        first = RecordingClient()
        session = self.kernel.attach(first, "s")
        total = CONNECTED_ENTRIES * 3
        for n in range(total):
            self.kernel.on_iopub(output(n))
        self.assertEqual(len(session.journal), CONNECTED_ENTRIES)
        self.assertEqual(self.kernel.journal_limits.dropped, 0)
        self.kernel.detach(session, first)
        for n in range(total, total + CONNECTED_ENTRIES * 2):
            self.kernel.on_iopub(output(n))
        self.assertEqual(len(session.journal), CONNECTED_ENTRIES * 3)
        second = RecordingClient()
        self.kernel.attach(second, "s", resume_after=total - 5)
        texts = [m.content()["text"] for _, m in second.messages if m.msg_type == "stream"]
        self.assertEqual(texts, [f"{n}\n" for n in range(total - 5, total + CONNECTED_ENTRIES * 2)])

    def test_window_in_bytes(self) -> None:
        """
        Large outputs delivered to a connected client are not held beyond
        L{CONNECTED_BYTES} (the newest is always kept).
        """
        from egateway.kernels.journal import CONNECTED_BYTES

        client = RecordingClient()
        session = self.kernel.attach(client, "s")
        big = Message.build("stream", {"name": "stdout", "text": "x" * (CONNECTED_BYTES // 2)}, "kernel")
        for _ in range(5):
            self.kernel.on_iopub(big)
        self.assertEqual(len(session.journal), 1)
        self.assertEqual(len(client.messages), 5)
