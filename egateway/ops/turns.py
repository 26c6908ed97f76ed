"""
Reactor turns of bounded length, with the API's connections served first.

Twisted's epoll reactor asks the kernel for every descriptor that is ready
and handles all of them before it runs a timer or looks again.  Under heavy
kernel traffic that makes long turns: with 50 clients executing back to back
against 300 kernels (C{bench/scale.py}), 80 to 120 descriptors were ready
at each poll and a turn took 25 to 60 ms, and a timer, a health probe or a
kernel start request waited for all of it.

L{TurnPoller} stands in for the reactor's epoll object and changes two
things:

  - A poll hands the reactor only as many ready descriptors as it can serve
    in a budget of time (C{[ops] turn_budget}, learnt from the turns before:
    L{TurnPoller}).  The others stay ready in the kernel's list and come
    first in the next poll (epoll puts a level-triggered descriptor it
    returned at the back of its ready list, and those it did not return
    stay in front), so every descriptor is still served, in turn, and
    timers run between turns.
  - Descriptors of the control plane (the API's HTTP connections, until one
    becomes a WebSocket) are registered in a second epoll object, which is
    asked first in every turn: an API request waits for at most one bounded
    turn of kernel traffic, not for every message that was ready before it.
    The second object's own descriptor sits in the first, so a reactor
    waiting for anything wakes up for a request too.  A turn with requests
    ready serves them alone, so that the replies they wrote (Twisted sends
    when the next poll says a connection is writable) leave in the next
    turn rather than after a turn of kernel traffic; but never two such
    turns in a row, so requests cannot starve the data plane, of which
    every other turn serves as much as its budget allows.

The reactor keeps calling C{register}, C{modify} and C{unregister} as before;
the poller sends each to the epoll object that holds the descriptor.  It is
installed only on Twisted's epoll reactor (C{reactor._poller} is a private
attribute: if a release renames it, the gateway runs with Twisted's own
turns and says so in its log).
"""

from __future__ import annotations

import select
import time
from typing import Any, Callable

from twisted.application.service import Service
from twisted.logger import Logger

_log = Logger()

_installed: "TurnPoller | None" = None


MAX_EVENTS = 64
"""
Most data descriptors handed out by one poll, whatever the budget allows.
"""

SMOOTHING = 0.2
"""
Weight of the last turn in the running estimate of what serving one
descriptor costs.
"""


class TurnPoller:
    """
    An epoll object's C{register}, C{modify}, C{unregister} and C{poll}
    over two epoll objects: the control plane's, polled first, and the
    rest's (the reactor's own), of which each poll hands out as many as
    fit in C{budget} seconds of work.

    What a descriptor costs is learnt from the turns themselves: the time
    from one poll's return to the next poll, over the descriptors the first
    one handed out (a running average), so a turn of cheap status messages
    serves many and a turn of large outputs few; never fewer than one,
    never more than L{MAX_EVENTS}.
    """

    def __init__(
        self,
        data: Any,
        budget: float,
        flags_of: Callable[[int], int],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """
        @param data: the reactor's epoll object.
        @param budget: seconds of data-plane work per turn.
        @param flags_of: the flags the reactor has a descriptor registered
            with (0: not registered), read when one moves between the two
            epoll objects.
        """
        self.data = data
        self.budget = budget
        self.control = select.epoll()
        self._control_fd = self.control.fileno()
        self.data.register(self._control_fd, select.EPOLLIN)
        self._preferred: set[int] = set()
        self._flags_of = flags_of
        self._clock = clock
        self.cost = 0.0
        """
        What serving one data descriptor took, on average (seconds).
        """
        self.cap = MAX_EVENTS
        """
        How many data descriptors the next poll hands out at most.
        """
        self._handed = 0
        self._returned = 0.0
        self._control_only = False

    # -- what the reactor calls ------------------------------------------

    def register(self, fd: int, flags: int) -> None:
        self._holder(fd).register(fd, flags)

    def modify(self, fd: int, flags: int) -> None:
        self._holder(fd).modify(fd, flags)

    def unregister(self, fd: int) -> None:
        self._holder(fd).unregister(fd)

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
        if self._handed:
            self._learn((self._clock() - self._returned) / self._handed)
        cap = self.cap if maxevents < 1 else min(maxevents, self.cap)
        first = self.control.poll(0) if self._preferred else []
        if first and not self._control_only:
            # A turn of the control plane alone, so that what it wrote
            # (Twisted sends when the next poll says writable) goes out
            # in the next turn, not after a turn of kernel traffic.  Never
            # two in a row: requests cannot starve kernel traffic.
            events = first
            self._control_only = True
        else:
            self._control_only = False
            events = self.data.poll(0 if first else timeout, cap)
            control_fd = self._control_fd
            if not first and any(fd == control_fd for fd, _ in events):
                first = self.control.poll(0)
            if first:
                events = first + [event for event in events if event[0] != control_fd]
        self._handed = len(events)
        self._returned = self._clock()
        return events

    def _learn(self, cost: float) -> None:
        self.cost = cost if not self.cost else self.cost + SMOOTHING * (cost - self.cost)
        if self.cost <= 0:
            self.cap = MAX_EVENTS
            return
        self.cap = max(1, min(MAX_EVENTS, round(self.budget / self.cost)))

    # -- the control plane -----------------------------------------------

    def prefer(self, fd: int) -> None:
        """
        Serve C{fd} ahead of the data plane from now on, until L{release}.
        """
        if fd < 0 or fd in self._preferred:
            return
        self._move(fd, self.data, self.control)
        self._preferred.add(fd)

    def release(self, fd: int) -> None:
        """
        Serve C{fd} with the data plane again (or forget it: it is closing).
        """
        if fd not in self._preferred:
            return
        self._preferred.discard(fd)
        self._move(fd, self.control, self.data)

    def _holder(self, fd: int) -> Any:
        return self.control if fd in self._preferred else self.data

    def _move(self, fd: int, source: Any, target: Any) -> None:
        flags = self._flags_of(fd)
        if not flags:
            return
        try:
            source.unregister(fd)
        except OSError:
            # Closed meanwhile: the kernel dropped it from every epoll set.
            return
        target.register(fd, flags)

    def uninstall(self) -> Any:
        """
        Move every preferred descriptor back to the reactor's own epoll
        object, close the control one, and return the reactor's.
        """
        for fd in list(self._preferred):
            self.release(fd)
        self.data.unregister(self._control_fd)
        self.control.close()
        return self.data


def _fileno(transport: Any) -> int:
    """
    The descriptor under C{transport}: a TCP or UNIX transport's own, or,
    through a TLS wrapper, that of the transport it wraps.
    """
    for _ in range(4):
        if transport is None:
            return -1
        fileno = getattr(transport, "fileno", None)
        if fileno is not None:
            try:
                return int(fileno())
            except (OSError, ValueError, TypeError):
                return -1
        transport = getattr(transport, "transport", None)
    return -1


def prefer(transport: Any) -> int:
    """
    Serve C{transport}'s connection ahead of kernel traffic (an HTTP
    connection of the API), if the turns are installed.

    @return: its descriptor, for L{release_descriptor} once it is closed
        (when its transport no longer knows it), or -1.
    """
    if _installed is None:
        return -1
    fd = _fileno(transport)
    _installed.prefer(fd)
    return fd


def release(transport: Any) -> None:
    """
    Serve C{transport}'s connection as kernel traffic again: it became a
    WebSocket.
    """
    if _installed is not None:
        _installed.release(_fileno(transport))


def release_descriptor(fd: int) -> None:
    """
    Forget a preferred descriptor whose connection is closed, before the
    number is given to another one.
    """
    if _installed is not None:
        _installed.release(fd)


class BoundedTurns(Service):
    """
    Installs a L{TurnPoller} on the reactor while running.
    """

    name = "bounded-turns"

    def __init__(self, reactor: Any, budget: float) -> None:
        self._reactor = reactor
        self.budget = budget
        self.poller: TurnPoller | None = None

    def startService(self) -> None:
        global _installed
        super().startService()
        original = getattr(self._reactor, "_poller", None)
        if not isinstance(original, select.epoll) or not all(
            hasattr(self._reactor, name) for name in ("_selectables", "_reads", "_writes")
        ):
            _log.info(
                "reactor turns are Twisted's own ({reactor} has no epoll object of its own to bound)",
                reactor=type(self._reactor).__name__,
            )
            return
        if _installed is not None:
            _log.warn("reactor turns are already bounded by another service; turn_budget {budget} not applied",
                      budget=self.budget)
            return
        reactor = self._reactor

        def flags_of(fd: int) -> int:
            return (select.EPOLLIN if fd in reactor._reads else 0) | (select.EPOLLOUT if fd in reactor._writes else 0)

        self.poller = TurnPoller(original, self.budget, flags_of)
        self._reactor._poller = self.poller
        _installed = self.poller

    def stopService(self) -> None:
        global _installed
        super().stopService()
        poller, self.poller = self.poller, None
        if poller is None:
            return
        if _installed is poller:
            _installed = None
        if self._reactor._poller is poller:
            self._reactor._poller = poller.uninstall()
