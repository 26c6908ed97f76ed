"""
One bound on the kernel messages a gateway holds for replay, across all of
its kernels.

Each session journal and each kernel's iopub ring
(L{egateway.kernels.failover.IopubRing}) is bounded on its own, by
C{journal_entries} and C{journal_bytes} (20,000 messages or 64 MiB by
default).  Those bounds let one kernel's flood be replayed; they do not
bound the gateway: with a shared store every kernel has a ring, and every
parked session a journal, so after hours of output 1,000 kernels could
hold 64 GiB.  L{HeldMessages} adds up what every holder holds and, past
C{journal_total_bytes}, sheds the oldest messages of the largest holders
until the total is down to L{SHED_TO} of the bound ("water filling"): the
kernel that floods pays first, and a quiet kernel's short history
survives another's flood.

A message held by a ring and by a journal of the same kernel (the same
bytes objects) counts for each: the bound is an upper bound of what those
messages take, not an exact figure.
"""

from __future__ import annotations

import weakref
from typing import Protocol

SHED_TO = 0.9
"""
Shedding brings the total down to this fraction of the bound, so that it
happens once per tenth of the bound of new output, not on every message.
"""


class IHolder(Protocol):
    """
    A journal or ring whose messages count against the bound.
    """

    @property
    def held_bytes(self) -> int:
        """
        The bytes of the messages it holds now.
        """

    def shed_to(self, most: int) -> int:
        """
        Drop its oldest messages until it holds at most C{most} bytes (or
        one message, which it keeps: it may still be on its way to a
        client).

        @return: how many messages it dropped.
        """


class HeldMessages:
    """
    What every holder of one gateway holds, and the bound on it.

    Holders report what they add, net of what they drop by their own
    bounds (L{grew}), and what they let go otherwise (L{shrank}: messages
    a connected client acknowledged, everything when closed); the
    running total those make is checked against the bound on every
    L{grew}, and recomputed from the holders whenever it is over, so that a
    holder dropped without a last report (a kernel forgotten with its ring)
    is not counted for long.

    @ivar most: the bound, in bytes (0: none).
    @ivar total: the bytes held, as last reported.
    @ivar shed: messages dropped to keep to the bound (for the metrics).
    """

    def __init__(self, most: int = 0) -> None:
        self.most = most
        self.total = 0
        self.shed = 0
        self._holders: weakref.WeakSet[IHolder] = weakref.WeakSet()
        self._next_check = most

    def add(self, holder: IHolder) -> None:
        """
        Count C{holder}'s messages from now on (it holds none yet).
        """
        self._holders.add(holder)

    def remove(self, holder: IHolder) -> None:
        """
        Stop counting C{holder}, which holds nothing any more.
        """
        self._holders.discard(holder)

    def shrank(self, size: int) -> None:
        self.grew(-size)

    def grew(self, size: int) -> None:
        """
        A holder took C{size} more bytes (net of what it dropped on its own
        meanwhile, so possibly fewer than none): shed if that puts the total
        over the bound.
        """
        self.total += size
        if self.total > self._next_check:
            if self.most:
                self._shed()
        elif self.total <= self.most:
            # Back within the bound: the next check is at the bound again,
            # not where a pass that could not get below it had put it.
            self._next_check = self.most

    def _shed(self) -> None:
        holders = sorted(self._holders, key=lambda h: h.held_bytes, reverse=True)
        sizes = [holder.held_bytes for holder in holders]
        self.total = sum(sizes)
        if self.total > self.most:
            level = water_level(sizes, int(self.most * SHED_TO))
            for holder, size in zip(holders, sizes):
                if size <= level:
                    break
                self.shed += holder.shed_to(level)
            self.total = sum(holder.held_bytes for holder in holders)
        # What each holder keeps (its newest message) may leave the total
        # above the bound: check again only once another tenth of the
        # bound has come in, not on every message.
        self._next_check = max(self.most, self.total + int(self.most * (1 - SHED_TO)))


def water_level(sizes: list[int], target: int) -> int:
    """
    The level to cut the largest of C{sizes} (in descending order) down to
    so that they add up to C{target} at most: every size above the level
    becomes the level, the others stay.
    """
    rest = sum(sizes)
    if rest <= target:
        return sizes[0] if sizes else 0
    for count, size in enumerate(sizes, start=1):
        rest -= size
        level = (target - rest) // count
        following = sizes[count] if count < len(sizes) else 0
        if level >= following:
            return max(level, 0)
    return 0
