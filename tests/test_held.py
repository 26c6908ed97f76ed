"""
The bound on what all journals and iopub rings of a gateway hold together
(L{egateway.kernels.held}).
"""

from __future__ import annotations

import gc

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from egateway.kernels.failover import IopubRing, message_size
from egateway.kernels.held import water_level
from egateway.kernels.journal import JournalLimits
from egateway.wire.protocol import Message
from tests.support.fakes import RecordingClient, make_manager

KIB = 1024


def output(text: str) -> Message:
    return Message.build("stream", {"name": "stdout", "text": text}, "kernel")


def sized(size: int, tag: str = "") -> Message:
    """
    An output of about C{size} bytes.
    """
    return output(tag + "x" * (size - len(tag)))


class WaterLevelTests(SynchronousTestCase):
    def test_cuts_the_largest(self) -> None:
        """
        The largest sizes are cut to one level; the rest stay.
        """
        self.assertEqual(water_level([10, 5, 1], 8), 3)
        self.assertEqual(water_level([10, 5, 1], 15), 9)

    def test_all_cut(self) -> None:
        self.assertEqual(water_level([6, 6, 6], 9), 3)

    def test_within_target(self) -> None:
        """
        Sizes already within the target are not cut.
        """
        self.assertEqual(water_level([4, 2], 10), 4)
        self.assertEqual(water_level([], 10), 0)

    def test_sums_within_target(self) -> None:
        for sizes, target in (([100, 90, 3, 2, 1], 50), ([7, 7, 1], 2), ([1000], 10)):
            level = water_level(sizes, target)
            self.assertLessEqual(sum(min(size, level) for size in sizes), target)
            self.assertLess(target - sum(min(size, level) for size in sizes), len(sizes) + 1)


class HeldMessagesTests(SynchronousTestCase):
    """
    Rings and journals under one L{JournalLimits} with a total bound.
    """

    def limits(self, total: int) -> JournalLimits:
        return JournalLimits(entries=100_000, size=1 << 30, total=total)

    def test_flood_sheds_its_own_oldest(self) -> None:
        """
        One ring's flood past the bound costs that ring its oldest messages;
        a quieter ring keeps all of its own.
        """
        limits = self.limits(100 * KIB)
        quiet, loud = IopubRing(limits), IopubRing(limits)
        for n in range(5):
            quiet.append(sized(KIB, f"q{n}"))
        messages = [sized(KIB, f"l{n}") for n in range(300)]
        for message in messages:
            loud.append(message)
        self.assertEqual(len(quiet), 5)
        self.assertLessEqual(limits.held.total, 100 * KIB)
        self.assertEqual(limits.held.total, quiet.held_bytes + loud.held_bytes)
        kept, found = loud.after([messages[-40].msg_id])
        self.assertTrue(found)
        self.assertEqual([m.msg_id for m in kept], [m.msg_id for m in messages[-39:]])
        self.assertEqual(limits.held.shed, 300 - len(loud))

    def test_sheds_rarely(self) -> None:
        """
        Shedding brings the total well below the bound, so it does not run
        again on the next message.
        """
        limits = self.limits(100 * KIB)
        ring = IopubRing(limits)
        while not limits.held.shed:
            ring.append(sized(KIB))
        shed = limits.held.shed
        self.assertLessEqual(limits.held.total, 0.9 * 100 * KIB)
        ring.append(sized(KIB))
        self.assertEqual(limits.held.shed, shed)

    def test_journals_count(self) -> None:
        """
        Parked sessions' journals count against the bound and are trimmed
        by it; what a reconnecting client missed is still reported.
        """
        clock = Clock()
        manager, _, _ = make_manager(clock)
        kernel = self.successResultOf(Deferred.fromCoroutine(manager.start_kernel()))
        kernel.journal_limits = limits = self.limits(64 * KIB)
        client = RecordingClient()
        session = kernel.attach(client, "s")
        kernel.detach(session, client)
        for n in range(100):
            kernel.on_iopub(sized(KIB, f"{n:03d}"))
        self.assertLessEqual(limits.held.total, 64 * KIB)
        self.assertEqual(limits.held.total, session.held_bytes)
        self.assertEqual(limits.dropped, limits.held.shed)
        again = RecordingClient()
        kernel.attach(again, "s", resume_after=0)
        streams = [m.content() for _, m in again.messages if m.msg_type == "stream"]
        self.assertEqual(streams[0]["name"], "stderr")
        self.assertIn(f"{limits.dropped} message(s) of output were dropped", streams[0]["text"])
        replayed = [content["text"][:3] for content in streams[1:]]
        self.assertEqual(replayed, [f"{n:03d}" for n in range(100 - len(replayed), 100)])
        kernel.close_clients("test")
        self.assertEqual(limits.held.total, 0)

    def test_keeps_the_newest(self) -> None:
        """
        A holder keeps its newest message even when that alone is over the
        bound; the next check waits for another tenth of the bound.
        """
        limits = self.limits(10 * KIB)
        ring = IopubRing(limits)
        big = sized(50 * KIB)
        ring.append(big)
        self.assertEqual(len(ring), 1)
        self.assertEqual(limits.held.total, message_size(big))
        ring.append(sized(KIB))
        self.assertEqual(len(ring), 1)

    def test_bound_again_after_a_stuck_pass(self) -> None:
        """
        After a pass that could not get below the bound (a holder's newest
        message alone is over it), the bound applies again in full once
        the total is back within it.
        """
        limits = self.limits(10 * KIB)
        big = IopubRing(limits)
        big.append(sized(50 * KIB))
        self.assertGreater(limits.held.total, 10 * KIB)
        limits.entries = 1
        big.append(sized(KIB))
        limits.entries = 100_000
        self.assertLessEqual(limits.held.total, 10 * KIB)
        ring = IopubRing(limits)
        for n in range(20):
            ring.append(sized(KIB))
        self.assertLessEqual(limits.held.total, 10 * KIB)

    def test_forgotten_holder(self) -> None:
        """
        A ring dropped with its kernel, never telling the bound, stops
        counting at the next check.
        """
        limits = self.limits(100 * KIB)
        each = message_size(sized(KIB))
        gone = IopubRing(limits)
        for n in range(80 * KIB // each):
            gone.append(sized(KIB))
        del gone
        gc.collect()
        ring = IopubRing(limits)
        for n in range(50 * KIB // each):
            ring.append(sized(KIB))
        self.assertEqual(len(ring), 50 * KIB // each)
        self.assertEqual(limits.held.shed, 0)
        self.assertEqual(limits.held.total, ring.held_bytes)

    def test_unbounded(self) -> None:
        """
        With no total bound, only each holder's own bounds apply.
        """
        limits = self.limits(0)
        ring = IopubRing(limits)
        for n in range(200):
            ring.append(sized(KIB))
        self.assertEqual(len(ring), 200)
        self.assertEqual(limits.held.shed, 0)

    def test_from_configuration(self) -> None:
        """
        journal_total_bytes (256 MiB unless set) bounds the manager's
        journals and rings.
        """
        from egateway.validation import load_config

        self.assertEqual(load_config({}, {}, {}).store.journal_total_bytes, 256 << 20)
        configured = load_config({}, {"EG_JOURNAL_TOTAL_BYTES": "1048576"}, {}).store.journal_total_bytes
        self.assertEqual(configured, 1 << 20)
        manager, _, _ = make_manager(Clock(), journal_total_bytes=configured)
        self.assertEqual(manager.journal_limits.held.most, 1 << 20)
