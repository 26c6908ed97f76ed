"""
Where the reactor was when it stalled.

The reactor-lag metric says that the reactor ran late; it cannot say why,
because the reactor thread is the one that was stuck.  A stall of a second
stops every kernel's messages and every request of every user, and its
cause is rarely in the gateway's logs: a blocking call in a launcher, a
log write held up by a saturated disk, a huge JSON body, a long garbage
collection.

L{StallWatch} keeps a thread of its own that notices when the reactor has
not come back for C{stall_warning} seconds and takes the reactor thread's
stack at that moment (C{sys._current_frames}).  The thread only records;
the report is logged by the reactor once it runs again, with how long the
stall lasted and how much of it the reactor thread spent on a CPU (its own
CPU clock): a stall it spent working is the gateway's own code, one it
spent waiting is the machine (no CPU free, a disk, a lock), so logging
stays on the reactor thread like every other log event.  A stall inside C code that holds the GIL (a C{json.dumps} of a
large object) delays the watch thread too: it then sees the stack as that
call returns, which still names the call.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

_log = Logger()

STACK_DEPTH = 25
"""
Innermost frames of the reactor thread's stack kept in a report.
"""


class StallWatch(Service):
    """
    Logs each stall of the reactor longer than C{threshold} seconds with the
    reactor thread's stack, taken while it was stalled.

    @ivar reports: stall reports logged so far (for tests and the manhole).
    """

    name = "stall-watch"

    def __init__(
        self,
        reactor: Any,
        threshold: float,
        monotonic: Callable[[], float] = time.monotonic,
        current_frames: Callable[[], dict[int, Any]] = sys._current_frames,
    ) -> None:
        self._reactor = reactor
        self.threshold = threshold
        self._monotonic = monotonic
        self._current_frames = current_frames
        self._interval = threshold / 4
        self._beat = 0.0
        self._beat_cpu = 0.0
        self._cpu_clock: int | None = None
        self._reactor_thread = 0
        self._captured: tuple[float, str] | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: LoopingCall | None = None
        self.reports = 0

    def startService(self) -> None:
        super().startService()
        self._reactor_thread = threading.get_ident()
        self._cpu_clock = time.pthread_getcpuclockid(self._reactor_thread)
        self._beat = self._monotonic()
        self._beat_cpu = self._cpu()
        self._loop = LoopingCall(self.beat)
        self._loop.clock = self._reactor
        self._loop.start(self._interval, now=False)
        self._stopped.clear()
        self._thread = threading.Thread(target=self._watch, name="egateway-stall-watch", daemon=True)
        self._thread.start()

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- the reactor's side ----------------------------------------------

    def beat(self) -> None:
        """
        The reactor runs: report a stall the watch saw, and start over.
        """
        now, cpu = self._monotonic(), self._cpu()
        captured, self._captured = self._captured, None
        if captured is not None and captured[0] == self._beat:
            self.reports += 1
            _log.warn(
                "the reactor was blocked for about {seconds:.1f}s (stall_warning {threshold:g}s), of which its "
                "thread ran {cpu_seconds:.1f}s on a CPU ({cause}): nothing was relayed and no request answered "
                "meanwhile; the reactor thread was at:\n{stack}",
                seconds=now - self._beat,
                cpu_seconds=cpu - self._beat_cpu,
                cause="working" if cpu - self._beat_cpu >= (now - self._beat) / 2 else
                "mostly waiting: for a CPU, the disk or a lock",
                threshold=self.threshold,
                stack=captured[1],
            )
        self._beat, self._beat_cpu = now, cpu

    def _cpu(self) -> float:
        """
        CPU seconds the reactor thread has used.
        """
        return time.clock_gettime(self._cpu_clock) if self._cpu_clock is not None else 0.0

    # -- the watch thread --------------------------------------------------

    def _watch(self) -> None:
        while not self._stopped.wait(self._interval):
            self.look()

    def look(self) -> None:
        """
        Take the reactor thread's stack if the reactor has been away for the
        threshold or longer (once per stall).
        """
        beat = self._beat
        if self._monotonic() - beat < self.threshold:
            return
        captured = self._captured
        if captured is not None and captured[0] == beat:
            return  # this stall is recorded already
        frame = self._current_frames().get(self._reactor_thread)
        if frame is None:
            return
        stack = "".join(traceback.format_stack(frame)[-STACK_DEPTH:]).rstrip()
        self._captured = (beat, stack)
