"""
The stall watch: a reactor blocked past C{stall_warning} is reported with
where its thread was.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from egateway.validation import load_config
from egateway.ops.stalls import StallWatch
from tests.support.polling import eventually


def _decode_json_slowly_for_the_test() -> None:
    """
    Stands for a blocking call on the reactor thread (a synchronous client,
    a file write stuck on a saturated disk): the thing to be found.
    """
    time.sleep(1.5)


class StallWatchTests(TestCase):
    timeout = 60

    def watching(self, threshold: float) -> tuple[StallWatch, list[dict[str, Any]]]:
        watch = StallWatch(reactor, threshold)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        watch.startService()
        self.addCleanup(watch.stopService)
        return watch, events

    async def test_blocked_reactor_reported_with_its_stack(self) -> None:
        """
        A call that holds the reactor thread for longer than the threshold
        is logged once the reactor runs again, once, with how long the
        stall lasted and the blocking call on the stack.
        """
        watch, events = self.watching(0.2)
        await deferLater(reactor, 0, _decode_json_slowly_for_the_test)
        await eventually(lambda: watch.reports, "the stall report", timeout=10)
        stalls = [
            e for e in events
            if "reactor was blocked" in e.get("log_format", "") and "_decode_json_slowly" in e["stack"]
        ]
        self.assertEqual(len(stalls), 1)
        self.assertGreaterEqual(stalls[0]["seconds"], 1.0)
        self.assertIn("_decode_json_slowly_for_the_test", stalls[0]["stack"])
        self.assertIn("time.sleep(1.5)", stalls[0]["stack"])
        self.assertLess(stalls[0]["cpu_seconds"], 0.5)  # asleep, not working
        self.assertIn("waiting", stalls[0]["cause"])

    async def test_working_stall_counts_its_cpu(self) -> None:
        """
        A stall the reactor thread spent computing reports the CPU time it
        used (a waiting one reports next to none, above), which is what
        tells the gateway's own code from a starved machine.
        """
        watch, events = self.watching(0.2)

        def spin() -> None:
            # CPU time, not wall time: on a busy machine the thread gets a
            # share of a CPU, and the figure reported is that share.
            end = time.thread_time() + 0.6
            while time.thread_time() < end:
                pass

        # The watch thread must get the GIL during the stall to see it; on a
        # machine whose CPUs are all busy (the test suite's other worker and
        # its kernels) a 0.6 s stall once passed unseen, so the reactor is
        # stalled again, up to five times, until one is reported.
        for _ in range(5):
            await deferLater(reactor, 0, spin)
            try:
                await eventually(lambda: watch.reports, "the stall report", timeout=4)
                break
            except AssertionError:
                continue
        self.assertTrue(watch.reports, "none of five stalls of 0.6 s was reported")
        stalls = [e for e in events if "reactor was blocked" in e.get("log_format", "")]
        self.assertGreaterEqual(stalls[0]["cpu_seconds"], 0.55)
        self.assertIn("spin", stalls[0]["stack"])

    def test_stopped_watch_leaves_no_thread(self) -> None:
        """
        Stopping the service ends its thread.
        """
        watch, _ = self.watching(0.2)
        before = {t.name for t in threading.enumerate()}
        watch.stopService()
        after = {t.name for t in threading.enumerate()}
        self.assertEqual(before - after, {"egateway-stall-watch"})

    def test_setting(self) -> None:
        """
        On by default at one second; 0 turns it off; negative is refused.
        """
        self.assertEqual(load_config({}, {}, {}).ops.stall_warning, 1.0)
        self.assertEqual(load_config({"ops": {"stall_warning": 0}}, {}, {}).ops.stall_warning, 0.0)
        with self.assertRaises(ValueError):
            load_config({}, {"EG_STALL_WARNING": "-1"}, {})
