"""
Choosing TCP ports for kernels on the gateway's own machine.

Enterprise Gateway probes a port by binding and closing it, then hands it to
the kernel; fifty launches at once race for the same freshly closed ports and
a few lose with "Address already in use".  We keep every port we hand out
reserved until its kernel has bound it (the launch reports readiness, or
fails), so concurrent launches of this gateway never receive the same port,
and within a configured range we only hand out ports nobody holds.
"""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator


@dataclass(frozen=True)
class PortRange:
    """
    An inclusive C{lo..hi} port range; C{0..0} means "any free port".
    """

    low: int
    high: int

    MINIMUM_SIZE = 100

    @classmethod
    def parse(cls, text: str) -> "PortRange":
        """
        @raise ValueError: if C{text} is not C{lo..hi} with sane bounds.
        """
        try:
            low_text, high_text = text.split("..")
            low, high = int(low_text), int(high_text)
        except ValueError:
            raise ValueError(f"{text!r} is not of the form lo..hi") from None
        if (low, high) == (0, 0):
            return cls(0, 0)
        if not (1024 <= low < high <= 65535):
            raise ValueError(f"{text!r} must satisfy 1024 <= lo < hi <= 65535")
        if high - low + 1 < cls.MINIMUM_SIZE:
            raise ValueError(
                f"{text!r} holds fewer than {cls.MINIMUM_SIZE} ports"
            )
        return cls(low, high)

    @property
    def unrestricted(self) -> bool:
        return self.low == 0 and self.high == 0

    def __str__(self) -> str:
        return f"{self.low}..{self.high}"


def _ephemeral_low(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def default_range() -> PortRange:
    """
    The range used for C{0..0}: the ports just below the kernel's ephemeral
    range.  Outgoing connections (our own ZMQ connections to kernels among
    them) take their source ports from the ephemeral range, so a port chosen
    here cannot be grabbed by one between our probe and the kernel's bind.
    """
    low = _ephemeral_low()
    return PortRange(max(1024, low - 12000), low - 1)


class PortExhausted(Exception):
    """
    No free port could be found.
    """


def _bindable(host: str, port: int) -> int | None:
    """
    Bind a TCP socket to C{port} (0 for any) and return the port bound, or
    C{None} if it is taken.  The socket is closed at once: it only proves the
    port free right now.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return None
        return probe.getsockname()[1]


class PortAllocator:
    """
    Hands out sets of free local ports, never the same port twice while it is
    reserved.

    @ivar reserved: ports handed out and not yet released.
    """

    ATTEMPTS = 500
    """
    Distinct candidates probed per reservation at most.
    """

    def __init__(
        self,
        port_range: PortRange = PortRange(0, 0),
        host: str = "127.0.0.1",
        probe: Callable[[str, int], int | None] = _bindable,
        rng: random.Random | None = None,
    ) -> None:
        self.port_range = default_range() if port_range.unrestricted else port_range
        self.host = host
        self.reserved: set[int] = set()
        self._probe = probe
        self._random = rng or random.SystemRandom()

    def reserve(self, count: int) -> list[int]:
        """
        Reserve C{count} distinct free ports.

        @raise PortExhausted: when C{count} ports cannot be found within
            L{ATTEMPTS} probes.
        """
        chosen: list[int] = []
        candidates = self._candidates()
        while len(chosen) < count:
            candidate = next(candidates, None)
            if candidate is None:
                break
            if candidate in self.reserved:
                continue
            port = self._probe(self.host, candidate)
            if port is None or port in self.reserved or port in chosen:
                continue
            chosen.append(port)
        if len(chosen) < count:
            raise PortExhausted(
                f"found only {len(chosen)} of {count} free ports in {self.port_range}"
            )
        self.reserved.update(chosen)
        return chosen

    def _candidates(self) -> Iterator[int]:
        """
        Distinct ports of the range in random order, at most L{ATTEMPTS},
        each drawn only when asked for: a partial Fisher-Yates shuffle of
        the range, the positions moved kept in a dict.  A reservation of 5
        ports draws about 5 random numbers; C{random.sample} of L{ATTEMPTS}
        drew 500 from the system's generator (one C{getrandom} call each,
        about 700 per kernel) for every launch, on the reactor, which
        blocks the other starts of a storm meanwhile (bench/run.py
        C{--only concurrent}).
        """
        low = self.port_range.low
        size = self.port_range.high - low + 1
        moved: dict[int, int] = {}
        for index in range(min(size, self.ATTEMPTS)):
            pick = self._random.randrange(index, size)
            value = moved.get(pick, pick)
            moved[pick] = moved.get(index, index)
            yield low + value

    def release(self, ports: Iterable[int]) -> None:
        """
        Forget reservations; the ports are now held by their kernel, or free.
        """
        self.reserved.difference_update(ports)
