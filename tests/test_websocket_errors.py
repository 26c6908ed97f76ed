"""
What a channels WebSocket handshake answers when accepting it goes wrong.

The client's own errors (unknown kernel, access, a bad query) are answered
by the route before the upgrade (see test_websocket_memory.RouteDecides);
whatever fails in the protocol's C{onConnect} after that is the gateway's
bug, and is answered as one.
"""

from __future__ import annotations

from typing import Any

from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.trial.unittest import SynchronousTestCase

from egateway.api.websocket import ChannelsProtocol

KERNEL_ID = "0b5e3a0c-1d8e-4f55-9b9e-3f0e6c1a2b3c"


class _Broken:
    """
    A channel request whose reading fails, as a bug in onConnect would.
    """

    @property
    def v1(self) -> bool:
        raise RuntimeError("manager broke")


def _deny(channel_request: Any) -> ConnectionDeny:
    protocol = ChannelsProtocol()
    protocol.channel_request = channel_request
    request = ConnectionRequest(
        peer="tcp:127.0.0.1:5000",
        headers={},
        host="localhost",
        path=f"/api/kernels/{KERNEL_ID}/channels",
        params={},
        version=13,
        origin=None,
        protocols=[],
        extensions=[],
    )
    try:
        protocol.onConnect(request)
    except ConnectionDeny as deny:
        return deny
    raise AssertionError("the connection was accepted")


class ConnectErrorTests(SynchronousTestCase):
    def test_internal_error_is_500_and_logged(self) -> None:
        """
        An error while accepting is the gateway's fault: a 500, and the
        traceback in the log, not a 404 that hides it, nor its text.
        """
        deny = _deny(_Broken())
        self.assertEqual(deny.code, 500)
        self.assertNotIn("manager broke", deny.reason)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_without_route_is_500(self) -> None:
        """
        A protocol built without the route's checks (no channel request)
        refuses to serve anything: a 500, logged, never a 404.
        """
        self.assertEqual(_deny(None).code, 500)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
