"""
Short full garbage collections on a gateway that holds many kernels.

Python's collection of its oldest generation walks every object the
collector tracks, and the reactor waits meanwhile: every WebSocket, every
kernel's messages, every request.  Right after start-up most of a
gateway's heap is modules, classes, configuration and services, objects
that live as long as the process; walking them again and again is what made
the reactor late by 300 ms with only 20 kernels on a busy two-core machine
(C{bench/scale.py} traces the collections).  Freezing them (L{gc.freeze})
moves them to a generation the collector skips.

It is done once, on the reactor's first turn after the gateway's services
have started (every module imported, the listeners open): objects made later, kernels' included,
are collected as before.  Frozen objects are still freed by reference
counting; only a reference cycle among them would never be collected, which
does not matter for objects that live as long as the process.
"""

from __future__ import annotations

import gc
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

_log = Logger()

YOUNG_THRESHOLD = 10_000
"""
Allocations (net of frees) between two collections of the youngest
generation; Python's default is 700.  Every tenth young collection also
collects the middle generation, and every tenth of those may be a full
collection: with 1,000 kernels a full collection stalled the reactor for
0.3 to 1 s, and the default let one happen every second or two under load
(bench/scale.py).  A young collection walks only young objects, so a larger
threshold makes each a little longer (about a millisecond) and all of them,
full ones included, about 14 times rarer.
"""


class HeapFreeze(Service):
    """
    Freezes the start-up heap on the reactor's first turn, and makes
    collections rarer (L{YOUNG_THRESHOLD}).
    """

    name = "heap-freeze"

    def __init__(self, clock: IReactorTime, freeze: Callable[[], None] = gc.freeze) -> None:
        self._clock = clock
        self._freeze = freeze
        self._pending: IDelayedCall | None = None
        self.frozen = False

    def startService(self) -> None:
        super().startService()
        if not self.frozen and self._pending is None:
            self._pending = self._clock.callLater(0, self._now)

    def stopService(self) -> Any:
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        return super().stopService()

    def _now(self) -> None:
        self._pending = None
        # Collect first, so that start-up's garbage is freed rather than
        # frozen for the life of the process.
        gc.collect()
        self._freeze()
        young, *older = gc.get_threshold()
        if young < YOUNG_THRESHOLD:
            gc.set_threshold(YOUNG_THRESHOLD, *older)
        self.frozen = True
        _log.info("froze {count} start-up objects out of garbage collection", count=gc.get_freeze_count())
