"""
Failed-authentication limits: a credential that keeps failing from one
address is told to wait (HTTP 429 with C{Retry-After}) before it is even
looked at again.

Failures are counted per address I{and} credential (a digest of the token),
never per address alone: everyone behind one NAT or proxy shares an address,
and one client's wrong tokens must not lock out the valid tokens of the
others.  The price is that the limit does not slow a guesser who tries a
new token every time; what stops guessing is the tokens' length (the
per-user, JupyterHub and JWT credentials are long and random; the shared
token is the operator's to choose long).  Only wrong credentials count;
requests without any, and successful ones, do not.  Time is the injected
clock's.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from typing import Any

MAX_ADDRESSES = 100_000
"""
Keys (address and credential) tracked at once; past it the ones with no
recent failure are forgotten, so a flood of wrong tokens cannot exhaust
memory.
"""


def failure_key(address: str, token: str | None) -> str:
    """
    What failures are counted by: the client's address and a digest of the
    token it presented (never the token itself).
    """
    digest = hashlib.sha256(token.encode("utf-8")).hexdigest()[:32] if token is not None else "-"
    return f"{address} {digest}"


class FailureLimiter:
    """
    At most C{limit} failures per key (see L{failure_key}) within any
    C{window} seconds; while that many are recent, the key is refused.
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
