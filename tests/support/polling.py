"""
Waiting on things outside the test's reactor: a process that detached, a
Slurm job, a file another process writes.  They give no event to wait on,
so they are polled, always with a bound.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.task import deferLater


async def eventually(check: Callable[[], Any], what: str, timeout: float = 15.0, interval: float = 0.1) -> Any:
    """
    Poll C{check} every C{interval} seconds until it returns something
    true, and return that; fail after C{timeout} seconds.

    @raise AssertionError: C{check} stayed false for C{timeout} seconds.
    """
    deadline = reactor.seconds() + timeout
    while True:
        result = check()
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await deferLater(reactor, interval, lambda: None)
