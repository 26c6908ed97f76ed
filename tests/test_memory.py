"""
Returning freed memory to the system once kernels are restored
(L{egateway.ops.memory}).
"""

from __future__ import annotations

import os
import tempfile
from types import SimpleNamespace

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from egateway.ops import memory
from tests.support.snippets import run_snippet

MIB = 1 << 20


class ReleaseTests(SynchronousTestCase):
    def test_holes_are_returned(self) -> None:
        """
        Memory freed between blocks still in use (which glibc keeps for
        itself) is returned: the resident set shrinks.  In a process of its
        own, whose heap holds nothing else: in the test runner's, earlier
        tests decide where the blocks land.
        """
        if memory._trim is None:
            self.skipTest("this C library has no malloc_trim")
        script = (
            "from egateway.ops import memory\n"
            "blocks = [bytes(100_000) for _ in range(2000)]\n"
            "del blocks[::2]\n"
            "print(*memory.release_freed_memory_blocking())\n"
        )
        before, after = (int(value) for value in run_snippet(script).stdout.split())
        self.assertLess(after, before - 40 * MIB)

    def test_logged(self) -> None:
        """
        The operator is told the resident size before and after.
        """
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        ran = []

        def run(f):  # type: ignore[no-untyped-def]
            ran.append(f)
            return succeed((300 * MIB, 240 * MIB))

        self.successResultOf(Deferred.fromCoroutine(memory.release_freed_memory(run, "store restored")))
        self.assertEqual(ran, [memory.release_freed_memory_blocking])
        texts = [formatEvent(e) for e in events if e.get("log_namespace") == "egateway.ops.memory"]
        self.assertEqual(texts, ["store restored: resident memory 300 MiB, 240 MiB once freed memory was returned"])

    def test_after_restore(self) -> None:
        """
        The gateway's persistence returns freed memory once it has restored
        the store's kernels, through the blocking pool.
        """
        from egateway.tap import build_persistence
        from egateway.validation import load_config

        ran = []

        class Blocking:
            def run(self, f, *args):  # type: ignore[no-untyped-def]
                ran.append(f)
                return succeed((1, 1))

        data = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, data)
        manager = SimpleNamespace(listeners=[], change_listeners=[])
        persistence = build_persistence(load_config({}, {}, {}), data, manager, Clock(), "gw", Blocking())
        for after in persistence.restored:
            self.successResultOf(Deferred.fromCoroutine(after()))
        self.assertEqual(ran, [memory.release_freed_memory_blocking])
