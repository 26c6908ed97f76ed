"""
Choosing a host for a kernel, and avoiding hosts that are down.

A L{LoadBalancer} picks among the hosts that are up; L{HostHealth} marks a
host down when it refuses or times out, with an exponential back-off on the
injected clock, and up again once the back-off has passed (the next launch
tries it) or a launch there succeeds.  Other algorithms plug in by
implementing L{ILoadBalancer} and registering under a name in L{BALANCERS}.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from twisted.logger import Logger
from zope.interface import Interface, implementer

_log = Logger()


class ILoadBalancer(Interface):
    def choose(hosts: Sequence[str]) -> str:
        """
        One of C{hosts} (never empty) for the next kernel.
        """

    def placed(host: str) -> None:
        """
        A kernel now runs on C{host}.
        """

    def released(host: str) -> None:
        """
        A kernel on C{host} has gone.
        """


@implementer(ILoadBalancer)
class RoundRobin:
    """
    Each launch takes the host after the one the previous launch took.
    """

    def __init__(self) -> None:
        self._last: str | None = None

    def choose(self, hosts: Sequence[str]) -> str:
        if self._last in hosts:
            index = (list(hosts).index(self._last) + 1) % len(hosts)
        else:
            index = 0
        self._last = hosts[index]
        return hosts[index]

    def placed(self, host: str) -> None:
        pass

    def released(self, host: str) -> None:
        pass


@implementer(ILoadBalancer)
class LeastConnection:
    """
    Each launch takes the host running the fewest of this gateway's kernels
    (ties go to the earliest host in the list).
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def choose(self, hosts: Sequence[str]) -> str:
        return min(hosts, key=lambda host: (self.counts[host], list(hosts).index(host)))

    def placed(self, host: str) -> None:
        self.counts[host] += 1

    def released(self, host: str) -> None:
        if self.counts[host] > 0:
            self.counts[host] -= 1


BALANCERS = {"round-robin": RoundRobin, "least-connection": LeastConnection}


def balancer(name: str) -> ILoadBalancer:
    """
    @raise ValueError: for an unknown algorithm name.
    """
    try:
        return BALANCERS[name]()
    except KeyError:
        raise ValueError(
            f"unknown load-balancing algorithm {name!r}; known: {', '.join(BALANCERS)}"
        ) from None


class HostHealth:
    """
    Which hosts are down, and until when.

    @ivar initial: first back-off, seconds; doubles on each consecutive
        failure up to C{maximum}.
    """

    def __init__(self, clock: Any, initial: float = 5.0, maximum: float = 300.0) -> None:
        self._clock = clock
        self.initial = initial
        self.maximum = maximum
        self._down_until: dict[str, float] = {}
        self._failures: Counter[str] = Counter()

    def up(self, hosts: Sequence[str]) -> list[str]:
        """
        The hosts not currently backed off, in order.
        """
        now = self._clock.seconds()
        return [h for h in hosts if self._down_until.get(h, 0.0) <= now]

    def failed(self, host: str, why: str) -> float:
        """
        Mark C{host} down; returns the back-off in seconds.
        """
        self._failures[host] += 1
        backoff = min(self.maximum, self.initial * 2 ** (self._failures[host] - 1))
        self._down_until[host] = self._clock.seconds() + backoff
        _log.warn(
            "host {host} marked down for {backoff:g} s: {why}",
            host=host,
            backoff=backoff,
            why=why,
        )
        return backoff

    def succeeded(self, host: str) -> None:
        if self._failures.pop(host, None):
            _log.info("host {host} is up again", host=host)
        self._down_until.pop(host, None)

    def is_down(self, host: str) -> bool:
        return self._down_until.get(host, 0.0) > self._clock.seconds()

    def status(self, hosts: Sequence[str]) -> list[dict[str, Any]]:
        """
        Each of C{hosts} (and any other host with a failure on record): up
        or backed off, consecutive failures, seconds of back-off left.
        """
        now = self._clock.seconds()
        names = list(dict.fromkeys([*hosts, *self._failures]))
        return [
            {
                "host": host,
                "up": self._down_until.get(host, 0.0) <= now,
                "failures": self._failures.get(host, 0),
                "backoff_remaining": max(0.0, round(self._down_until.get(host, 0.0) - now, 1)),
            }
            for host in names
        ]
