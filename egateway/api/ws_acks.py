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
the last few seconds, not the last hundreds.  A client that answers no
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
        self._call: Any = None
        self.pending: bytes | None = None
        """
        The payload of the ping in flight, if one is.
        """

    def delivered(self, seq: int) -> None:
        """
        Message C{seq} was written to the client (this is on the relay's
        hot path: a comparison, and a timer at most once per delay).
        """
        if seq > self._delivered:
            self._delivered = seq
            if self._call is None and self.pending is None:
                self._call = self._clock.callLater(self._delay, self._send)

    def _send(self) -> None:
        self._call = None
        upto = self._delivered
        payload = ACK_PREFIX + b"%d" % upto
        if not self._ping(payload):
            self._call = self._clock.callLater(self._delay, self._send)
            return
        self._upto, self.pending = upto, payload

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
            self._call = self._clock.callLater(self._delay, self._send)

    def stop(self) -> None:
        """
        The connection ended: no more pings.
        """
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        self.pending = None
