"""
Failed-authentication limits: an address that keeps presenting wrong
credentials is told to wait (HTTP 429 with C{Retry-After}) before its
credentials are even looked at.

Only wrong credentials count; requests without any, and successful ones,
do not.  Time is the injected clock's.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

MAX_ADDRESSES = 100_000
"""
Addresses tracked at once; past it the ones with no recent failure are
forgotten, so a flood from many addresses cannot exhaust memory.
"""


class FailureLimiter:
    """
    At most C{limit} failures per address within any C{window} seconds;
    while that many are recent, the address is refused.
    """

    def __init__(self, clock: Any, limit: int, window: float, max_addresses: int = MAX_ADDRESSES) -> None:
        """
        @param limit: failures allowed per window; 0 disables the limiter.
        """
        self._clock = clock
        self.limit = limit
        self.window = window
        self._max_addresses = max_addresses
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, address: str, now: float) -> deque[float] | None:
        failures = self._failures.get(address)
        if failures is None:
            return None
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return None
        return failures

    def retry_after(self, address: str) -> int:
        """
        Seconds until C{address} may try again; 0 if it may now.
        """
        if self.limit <= 0:
            return 0
        now = self._clock.seconds()
        failures = self._recent(address, now)
        if failures is None or len(failures) < self.limit:
            return 0
        # Allowed again once enough of the recent failures have aged out.
        release = failures[len(failures) - self.limit] + self.window
        return max(1, math.ceil(release - now))

    def failed(self, address: str) -> None:
        """
        Count one failure for C{address}.
        """
        if self.limit <= 0:
            return
        now = self._clock.seconds()
        failures = self._recent(address, now)
        if failures is None:
            if len(self._failures) >= self._max_addresses:
                self._sweep(now)
            failures = self._failures.setdefault(address, deque())
        failures.append(now)
        # Older entries can never matter again.
        while len(failures) > self.limit:
            failures.popleft()

    def _sweep(self, now: float) -> None:
        for address in list(self._failures):
            self._recent(address, now)
        while len(self._failures) >= self._max_addresses:
            del self._failures[next(iter(self._failures))]

    def tracked(self) -> int:
        """
        How many addresses have recent failures (for tests and metrics).
        """
        return len(self._failures)
