"""
What a channels WebSocket handshake answers when accepting it goes wrong.
"""

from __future__ import annotations

from types import SimpleNamespace

from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.trial.unittest import SynchronousTestCase

from egateway.api.websocket import ChannelsProtocol
from egateway.errors import NotFound

KERNEL_ID = "0b5e3a0c-1d8e-4f55-9b9e-3f0e6c1a2b3c"


class _Manager:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def get(self, kernel_id: str):
        raise self.error


def _deny(error: Exception) -> ConnectionDeny:
    protocol = ChannelsProtocol()
    protocol.factory = SimpleNamespace(manager=_Manager(error))
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
    def test_unknown_kernel_is_404(self) -> None:
        """
        A kernel that does not exist (any more) is a 404.
        """
        self.assertEqual(_deny(NotFound(f"Kernel does not exist: {KERNEL_ID}")).code, 404)

    def test_internal_error_is_500_and_logged(self) -> None:
        """
        Any other error while accepting is the gateway's fault: a 500, and
        the traceback in the log, not a 404 that hides it.
        """
        deny = _deny(RuntimeError("manager broke"))
        self.assertEqual(deny.code, 500)
        self.assertNotIn("manager broke", deny.reason)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
