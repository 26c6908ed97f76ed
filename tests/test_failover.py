"""
Failover without loss, piece by piece over fakes: the write-ahead journal
(a client gets a message once the shared store has it), the per-kernel
iopub ring, session identities, and taking a session over from what the
store holds and what the ring saw after it.  tests/test_sharing.py kills a
real gateway.
"""

from __future__ import annotations

import gc

from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from egateway.kernels.failover import IopubRing, session_identity, shared_session_key
from egateway.kernels.journal import JournalLimits, encode_entry
from egateway.kernels.sharing import JournalSink, SharedKernels
from egateway.store.interface import StoreUnavailable
from egateway.wire.protocol import Message
from tests.support.fakes import RecordingClient, make_manager


def output(n: int) -> Message:
    return Message.build("stream", {"name": "stdout", "text": f"{n}\n"}, "kernel")


def busy() -> Message:
    return Message.build("status", {"execution_state": "busy"}, "kernel")



def numbered(client: RecordingClient) -> list[int]:
    """
    The journal numbers a client got, without the unnumbered status a
    resumed client is also told (the kernel's current state).
    """
    return [seq for seq in client.seqs if seq]

class FakeStore:
    """
    The journal half of a shared store: appends wait until the test answers
    them; reads return what the test put there.
    """

    def __init__(self) -> None:
        self.appends: list[tuple[str, list[tuple[int, bytes]], Deferred[bool]]] = []
        self.requests: list[list[str]] = []
        self.journal: list[tuple[int, bytes]] = []
        self.holders: dict[str, str] = {}

    def journal_append(
        self, kernel_id: str, session_id: str, entries: Any, max_entries: int, holder: str = ""
    ) -> Deferred[bool]:
        answer: Deferred[bool] = Deferred()
        self.appends.append((session_id, list(entries), answer))
        return answer

    def journal_append_many(self, appends: Any, max_entries: int, holder: str = "") -> Deferred[list[bool]]:
        """
        Each session's append answered on its own (as L{journal_append});
        the request fires once all are.
        """
        self.requests.append([s for _, s, _ in appends])
        answers = [self.journal_append(k, s, entries, max_entries, holder) for k, s, entries in appends]
        return gatherResults(answers, consumeErrors=True).addErrback(lambda f: f.value.subFailure)

    def claim_session(self, kernel_id: str, session_id: str, holder: str) -> Deferred[str | None]:
        previous = self.holders.get(session_id)
        self.holders[session_id] = holder
        return succeed(previous)

    def journal_read(self, kernel_id: str, session_id: str, after: int) -> Deferred[list[tuple[int, bytes]]]:
        return succeed([entry for entry in self.journal if entry[0] > after])


class FakePersistence:
    def __init__(self, store: Any) -> None:
        self.store = store
        self.instance_id = "test"


class Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        manager, _, self.channels = make_manager(self.clock)
        self.kernel = self.successResultOf(Deferred.fromCoroutine(manager.start_kernel()))
        self.kernel.journal_limits = JournalLimits(entries=100)
        self.store = FakeStore()
        self.sharing = SharedKernels(manager, FakePersistence(self.store), self.clock, lease_ttl=10, journal_entries=100)

    def texts(self, client: RecordingClient) -> list[str]:
        return [m.content()["text"] for _, m in client.messages if m.msg_type == "stream"]


class WriteAheadTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.sharing.equip(self.kernel)

    def test_client_waits_for_the_store(self) -> None:
        """
        A message reaches the client once the shared store holds it; what
        arrives while an append is in flight goes in the next one.
        """
        client = RecordingClient()
        self.kernel.attach(client, "s")
        for n in range(3):
            self.kernel.on_iopub(output(n))
        self.clock.advance(0)
        self.assertEqual((client.seqs, len(self.store.appends)), ([], 1))
        self.kernel.on_iopub(output(3))
        self.clock.advance(0)
        self.assertEqual(len(self.store.appends), 1)
        self.store.appends[0][2].callback(True)
        self.assertEqual(client.seqs, [1, 2, 3])
        self.assertEqual([seq for seq, _ in self.store.appends[1][1]], [4])
        self.store.appends[1][2].callback(True)
        self.assertEqual(self.texts(client), ["0\n", "1\n", "2\n", "3\n"])

    def test_one_request_per_turn(self) -> None:
        """
        The appends of every session ready in one turn go to the store as
        one request; a session still waiting for its last append is not in
        it, and goes in a request of its own once that append is answered.
        """
        first = RecordingClient()
        self.kernel.attach(first, "s0")
        self.kernel.on_iopub(output(0))
        self.clock.advance(0)
        later = [RecordingClient(), RecordingClient()]
        for n, client in enumerate(later):
            self.kernel.attach(client, f"s{n + 1}")
        self.kernel.on_iopub(output(1))
        self.kernel.on_iopub(output(2))
        self.clock.advance(0)
        self.assertEqual(self.store.requests, [["s0"], ["s1", "s2"]])
        self.store.appends[0][2].callback(True)
        self.assertEqual(first.seqs, [1])
        self.assertEqual(self.store.requests[2:], [["s0"]])
        self.assertEqual([seq for seq, _ in self.store.appends[3][1]], [2, 3])
        for _, _, answer in self.store.appends[1:]:
            answer.callback(True)
        self.assertEqual([first.seqs, later[0].seqs, later[1].seqs], [[1, 2, 3], [1, 2], [1, 2]])
        self.assertEqual(len(self.store.requests), 3)

    def test_request_size_bounded(self) -> None:
        """
        A turn with more entries than one request takes is split into
        several requests, each session's batch whole in one of them.
        """
        self.patch(JournalSink, "REQUEST_ENTRIES", 5)
        clients = [RecordingClient() for _ in range(3)]
        for n, client in enumerate(clients):
            self.kernel.attach(client, f"s{n}")
        for n in range(2):
            self.kernel.on_iopub(output(n))
        self.clock.advance(0)
        self.assertEqual([len(r) for r in self.store.requests], [2, 1])
        for _, entries, answer in self.store.appends:
            self.assertEqual([seq for seq, _ in entries], [1, 2])
            answer.callback(True)
        self.assertEqual([client.seqs for client in clients], [[1, 2]] * 3)

    def test_held_as_untracked_values(self) -> None:
        """
        The iopub ring and a session's journal hold a message as plain
        values the garbage collector stops tracking once it has seen them,
        not as the L{Message}: a full collection walks every tracked object
        while the reactor waits, and with 1,000 kernels they held 226,000
        messages (a 467 ms collection in bench/scale.py).  What a client
        resuming gets is the same message.
        """
        first = RecordingClient()
        session = self.kernel.attach(first, "s")
        sent = output(0)
        self.kernel.on_iopub(sent)
        self.clock.advance(0)
        self.store.appends[0][2].callback(True)
        gc.collect()
        ring = self.kernel.iopub_ring
        assert ring is not None
        self.assertEqual([gc.is_tracked(entry) for entry in ring._messages], [False])
        self.assertEqual([gc.is_tracked(entry) for entry in session.journal], [False])
        self.kernel.detach(session, first)
        second = RecordingClient()
        self.kernel.attach(second, "s", resume_after=0)
        self.assertEqual(second.messages[0][1].parts, sent.parts)

    def test_store_refusal_releases(self) -> None:
        """
        A store that refuses appends costs failover, not output: the client
        gets the messages anyway, and the operator one warning per outage.
        """
        warnings: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(warnings.append)
        self.addCleanup(globalLogPublisher.removeObserver, warnings.append)
        client = RecordingClient()
        self.kernel.attach(client, "s")
        self.kernel.on_iopub(output(0))
        self.clock.advance(0)
        self.store.appends[0][2].errback(StoreUnavailable("down"))
        self.assertEqual(client.seqs, [1])
        self.kernel.on_iopub(output(1))
        self.clock.advance(0)
        self.store.appends[1][2].errback(StoreUnavailable("down"))
        self.assertEqual(client.seqs, [1, 2])
        not_shared = [e for e in warnings if "not shared" in e.get("log_format", "")]
        self.assertEqual(len(not_shared), 1)

    def test_resume_while_writing(self) -> None:
        """
        A client that resumes while messages are still on their way to the
        store gets each once: the stored ones at once, the others when
        stored.
        """
        first = RecordingClient()
        session = self.kernel.attach(first, "s")
        for n in range(2):
            self.kernel.on_iopub(output(n))
        self.clock.advance(0)
        self.store.appends[0][2].callback(True)
        self.kernel.on_iopub(output(2))
        self.clock.advance(0)
        self.kernel.detach(session, first)
        second = RecordingClient()
        self.kernel.attach(second, "s", resume_after=1)
        self.assertEqual(numbered(second), [2])
        self.store.appends[1][2].callback(True)
        self.assertEqual(numbered(second), [2, 3])

    def test_claimed_elsewhere(self) -> None:
        """
        An append refused because another gateway claimed the session
        closes it here, and replaces its client.
        """
        client = RecordingClient()
        self.kernel.attach(client, "s")
        self.kernel.on_iopub(output(0))
        self.clock.advance(0)
        self.store.appends[0][2].callback(False)
        self.assertEqual((client.seqs, client.gone, list(self.kernel.sessions)), ([], ["replaced"], []))

    def identities(self) -> set[bytes]:
        return {sock.identity for sock in self.channels.open_sockets()}

    def test_parked_session_keeps_off_the_identity(self) -> None:
        """
        A parked session opens no sockets when the kernel is relinked (its
        client may be on another gateway by now, with the same identity);
        it opens them when its client comes back.
        """
        client = RecordingClient()
        session = self.kernel.attach(client, "s")
        self.assertIn(session.identity, self.identities())
        self.kernel.detach(session, client)
        self.kernel.set_link(self.kernel.link)
        self.kernel.go_live()
        self.assertNotIn(session.identity, self.identities())
        self.kernel.attach(RecordingClient(), "s")
        self.assertIn(session.identity, self.identities())

    def test_stop_writes_everything(self) -> None:
        """
        Stopping the sink writes what is pending and waits for the store.
        """
        self.kernel.attach(RecordingClient(), "s")
        self.kernel.on_iopub(output(0))
        stopped = self.sharing.sink.stop()
        self.assertNoResult(stopped)
        self.store.appends[0][2].callback(True)
        self.successResultOf(stopped)


class RingTests(SynchronousTestCase):
    def test_after(self) -> None:
        """
        The ring gives what it received after the newest of the given
        messages it holds, found by id; none held gives
        everything it holds, said not found.
        """
        ring = IopubRing(JournalLimits(entries=3))
        messages = [output(n) for n in range(5)]
        for message in messages:
            ring.append(message)
        self.assertEqual(len(ring), 3)

        def parts(answer: tuple[list[Message], bool]) -> tuple[list[tuple[bytes, ...]], bool]:
            return [m.parts for m in answer[0]], answer[1]

        self.assertEqual(parts(ring.after([messages[3].msg_id])), ([messages[4].parts], True))
        self.assertEqual(parts(ring.after([messages[0].msg_id])), ([m.parts for m in messages[2:]], False))
        self.assertEqual(
            parts(ring.after([messages[2].msg_id, output(9).msg_id])), ([m.parts for m in messages[3:]], True)
        )

    def test_identity(self) -> None:
        """
        A named session's socket identity is the same on every gateway and
        differs between sessions and kernels.
        """
        self.assertEqual(session_identity("k", "s"), session_identity("k", "s"))
        self.assertEqual(len({session_identity("k", "s"), session_identity("k", "t"), session_identity("j", "s")}), 3)


class TakeOverTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.kernel.iopub_ring = IopubRing(self.kernel.journal_limits)

    def take_over(self, resume_after: int) -> RecordingClient:
        self.successResultOf(
            Deferred.fromCoroutine(self.sharing.take_over_session(self.kernel, "s", resume_after))
        )
        client = RecordingClient()
        self.kernel.attach(client, "s", resume_after=resume_after)
        return client

    def test_continues_from_store_then_ring(self) -> None:
        """
        The client saw 1-3 from the dead gateway, which had stored 1-5:
        here it gets 4-5 from the store, then what this gateway's ring
        received after 5, then new output, each once and in order.
        """
        messages = [output(n) for n in range(8)]
        self.store.journal = [(n + 1, encode_entry("iopub", messages[n])) for n in range(5)]
        for message in messages:
            self.kernel.iopub_ring.append(message)
        client = self.take_over(3)
        self.kernel.on_iopub(output(8))
        self.assertEqual(self.texts(client), [f"{n}\n" for n in range(3, 9)])
        self.assertEqual(numbered(client), [4, 5, 6, 7, 8, 9])

    def test_cursor_far_back(self) -> None:
        """
        When the last kernel iopub message is further back in the journal
        than the client's position (a long run of replies since), it is
        still found, and the ring continues after it.
        """
        outputs = [output(n) for n in range(13)]
        reply = Message.build("execute_reply", {"status": "ok"}, "kernel")
        self.store.journal = [(n + 1, encode_entry("iopub", outputs[n])) for n in range(10)]
        self.store.journal += [(n, encode_entry("shell", reply)) for n in range(11, 301)]
        for message in outputs:
            self.kernel.iopub_ring.append(message)
        client = self.take_over(300)
        self.assertEqual(self.texts(client), ["10\n", "11\n", "12\n"])
        self.assertEqual(numbered(client), [301, 302, 303])

    def test_last_journaled_message_not_in_the_ring(self) -> None:
        """
        The journal's last kernel message may be one this gateway's ring
        never took: a status about this gateway's own readiness probe,
        which it keeps to the probe while the old gateway journaled it as
        any status.  The ring continues after the newest journaled message
        it does hold, and the client gets nothing twice.
        """
        messages = [output(n) for n in range(7)]
        probe_status = Message.build("status", {"execution_state": "idle"}, "kernel")
        self.store.journal = [(n + 1, encode_entry("iopub", messages[n])) for n in range(5)]
        self.store.journal.append((6, encode_entry("iopub", probe_status)))
        for message in messages:
            self.kernel.iopub_ring.append(message)
        client = self.take_over(6)
        self.assertEqual(self.texts(client), ["5\n", "6\n"])
        self.assertEqual(numbered(client), [7, 8])

    def test_gap_while_busy_is_told(self) -> None:
        """
        A ring that began after the last stored message of a busy kernel
        cannot know what came between: the client is told, then gets the
        rest.
        """
        self.store.journal = [(1, encode_entry("iopub", busy())), (2, encode_entry("iopub", output(0)))]
        self.kernel.iopub_ring.append(output(5))
        client = self.take_over(2)
        texts = self.texts(client)
        self.assertIn("may be missing", texts[0])
        self.assertEqual(texts[1:], ["5\n"])

    def test_stale_local_copy_is_replaced(self) -> None:
        """
        A session this gateway served before, which the client then moved
        to another gateway, is taken over from the store again.
        """
        old = RecordingClient()
        self.kernel.detach(self.kernel.attach(old, "s"), old)
        self.store.holders["s"] = "another-gateway"
        messages = [output(n) for n in range(4)]
        self.store.journal = [(n + 1, encode_entry("iopub", messages[n])) for n in range(4)]
        for message in messages:
            self.kernel.iopub_ring.append(message)
        client = self.take_over(2)
        self.assertEqual(self.texts(client), ["2\n", "3\n"])


class OtherUsersSessionTests(Base):
    """
    Sessions belong to their user on every gateway, not only on the one
    that opened them.
    """

    def test_another_user_takes_over_nothing(self) -> None:
        """
        bob presents alice's session id to a gateway that never served it:
        he reads none of the journal alice's gateway wrote, claims nothing
        of hers, and his sockets do not take her routing identity (so her
        replies and prompts cannot reach him).
        """
        self.kernel.iopub_ring = IopubRing(self.kernel.journal_limits)
        alice_key = shared_session_key("s", "alice")
        self.store.holders[alice_key] = "alice-gateway"
        self.store.journal = [(1, encode_entry("iopub", output(0)))]
        reads: list[str] = []
        read = self.store.journal_read

        def journal_read(kernel_id: str, session_id: str, after: int) -> Any:
            reads.append(session_id)
            return read(kernel_id, session_id, after) if session_id == alice_key else succeed([])

        self.store.journal_read = journal_read  # type: ignore[method-assign]
        self.successResultOf(Deferred.fromCoroutine(self.sharing.take_over_session(self.kernel, "s", 0, "bob")))
        self.assertNotIn(alice_key, reads)
        self.assertEqual(self.store.holders[alice_key], "alice-gateway")
        bob = RecordingClient()
        session = self.kernel.attach(bob, "s", resume_after=0, user="bob")
        self.assertEqual(self.texts(bob), [])
        self.assertNotEqual(session.identity, session_identity(self.kernel.id, alice_key))

    def test_keys(self) -> None:
        """
        The store's name for a session differs per user; a caller naming no
        user keeps the bare session id.
        """
        self.assertEqual(shared_session_key("s", ""), "s")
        self.assertEqual(len({shared_session_key("s", "alice"), shared_session_key("s", "bob"), "s"}), 3)
