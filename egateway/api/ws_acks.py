"""
What a WebSocket client has received, learnt from pings.

A connected session journals the messages its client may not have
received, so that a client resuming with C{resume_after} after a dropped
connection gets them (L{egateway.kernels.journal}).  Jupyter clients never
say what they received; but every client answers a ping with a pong
(RFC 6455, section 5.5.2), and a ping written after some messages reaches
the client after them, on the same TCP stream, so its pong comes back only
once the client's WebSocket has read every frame before it.  That pong
acknowledges them all, end to end: through proxies too, which forward
frames and hold bytes the gateway's socket already counts as sent.

So, some seconds after a message (one ping for all the messages of that
while), a connection pings its client, and the pong lets the session drop
what it holds for it: while connected, a journal holds only the messages of
the last few seconds, not the last hundreds.  A busy connection is pinged
sooner, once it has sent L{ACK_BYTES} since its last ping, so that what it
holds is bounded in bytes as well as in time.  A client that answers no
pings keeps the journal at its connected bounds, as before.
"""

from __future__ import annotations

from typing import Any, Callable

ACK_DELAY = 5.0
"""
Seconds from a message to the ping that acknowledges it (and whatever
followed meanwhile): how long a connected session holds what it sent.
Shorter costs pings: with 1,000 kernels each publishing a status a second,
one ping per connection every 5 s is 200 pings and pongs a second.
"""

ACK_BYTES = 16 << 10
"""
Bytes sent since the last ping that bring the next one forward, to at most
L{ACK_SOON} later: 50 clients each executing 13 cells a second (about
50 kB a second each) are then pinged about once a second and each session
holds some 40 kB, not the 250 kB of five seconds.
"""

ACK_SOON = 0.5
"""
Seconds from L{ACK_BYTES} sent to the ping: at most two pings a second per
connection however much it sends (a stream of 10 kB writes is not pinged
every other write).
"""

ACK_PREFIX = b"egateway-ack "


class Acknowledgements:
    """
    The acknowledgement pings of one connection.

    @param clock: an C{IReactorTime}.
    @param delay: seconds from a delivered message to its ping.
    @param ping: sends a ping with this payload now, or returns C{False}
        when it may not now (a message is being streamed, so the ping would
        land between its fragments and acknowledge it before its end), to
        be asked again after C{delay}.
    @param acknowledged: told the number of the last message the client
        has read.
    """

    __slots__ = ("_clock", "_delay", "_ping", "_acknowledged", "_delivered", "_upto", "_since_ping", "_soon",
                 "_call", "pending")

    def __init__(
        self,
        clock: Any,
        delay: float,
        ping: Callable[[bytes], bool],
        acknowledged: Callable[[int], None],
    ) -> None:
        self._clock = clock
        self._delay = delay
        self._ping = ping
        self._acknowledged = acknowledged
        self._delivered = 0
        self._upto = 0
        self._since_ping = 0
        self._soon = min(ACK_SOON, delay)
        self._call: Any = None
        self.pending: bytes | None = None
        """
        The payload of the ping in flight, if one is.
        """

    def delivered(self, seq: int, size: int) -> None:
        """
        Message C{seq}, of C{size} bytes, was written to the client (this
        is on the relay's hot path: an addition, two comparisons, and a
        timer at most once per ping).
        """
        if seq > self._delivered:
            self._delivered = seq
            self._since_ping += size
            if self.pending is not None:
                return
            call = self._call
            if call is None:
                self._call = self._clock.callLater(self._next_delay(), self._send)
            elif self._since_ping >= ACK_BYTES and call.getTime() - self._clock.seconds() > self._soon:
                call.reset(self._soon)

    def _send(self) -> None:
        self._call = None
        upto = self._delivered
        payload = ACK_PREFIX + b"%d" % upto
        if not self._ping(payload):
            self._call = self._clock.callLater(self._next_delay(), self._send)
            return
        self._upto, self.pending, self._since_ping = upto, payload, 0

    def pong(self, payload: bytes) -> bool:
        """
        A pong arrived: whether it was this connection's acknowledgement
        (which was then passed on).
        """
        if self.pending is None or payload != self.pending:
            return False
        self.settled()
        return True

    def settled(self) -> None:
        """
        The ping in flight was answered (or a later one, which the client
        may answer alone: RFC 6455 allows a pong for the most recent ping
        only).
        """
        if self.pending is None:
            return
        self.pending = None
        self._acknowledged(self._upto)
        if self._delivered > self._upto and self._call is None:
            self._call = self._clock.callLater(self._next_delay(), self._send)

    def _next_delay(self) -> float:
        return self._soon if self._since_ping >= ACK_BYTES else self._delay

    def stop(self) -> None:
        """
        The connection ended: no more pings.
        """
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        self.pending = None
