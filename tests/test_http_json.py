"""
L{egateway.clusters.http_json}: the one request helper the Docker engine,
Conductor and YARN ResourceManager clients share, driven through
C{treq.testing.StubTreq} with a L{Clock}.
"""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from egateway.clusters.http_json import Unreachable, json_request


class _Server(Resource):
    """
    Answers by path: C{/json}, C{/text}, C{/empty}, C{/moved} (a redirect
    to C{/json}), C{/stall} (the headers and part of a body, then nothing).
    """

    isLeaf = True

    def render(self, request: Any) -> Any:
        path = request.path.decode()
        if path == "/moved":
            request.setResponseCode(307)
            request.setHeader(b"Location", b"http://server/json")
            return b"moved"
        if path == "/stall":
            request.write(b'{"half": ')
            return NOT_DONE_YET
        return {"/json": b'{"a": 1}', "/text": b"not json", "/empty": b" "}[path]


class JSONRequestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.http = StubTreq(_Server())

    def request(self, path: str, **kwargs: Any) -> Deferred:
        d = Deferred.fromCoroutine(
            json_request(self.http, self.clock, "GET", f"http://server{path}", timeout=5, **kwargs)
        )
        self.http.flush()
        return d

    def test_body_decoded(self) -> None:
        """
        The answer comes back as its status, its JSON (the text itself when
        it is not JSON, nothing when empty) and its text.
        """
        self.assertEqual(self.successResultOf(self.request("/json")), (200, {"a": 1}, '{"a": 1}'))
        self.assertEqual(self.successResultOf(self.request("/text")), (200, "not json", "not json"))
        self.assertEqual(self.successResultOf(self.request("/empty")), (200, None, " "))

    def test_redirects_followed_unless_refused(self) -> None:
        """
        A redirect is followed by default; a caller that must see it (YARN's
        standby ResourceManager) gets the redirect itself.
        """
        self.assertEqual(self.successResultOf(self.request("/moved"))[:2], (200, {"a": 1}))
        self.assertEqual(self.successResultOf(self.request("/moved", allow_redirects=False))[:2], (307, "moved"))

    def test_stalled_body_is_no_answer(self) -> None:
        """
        A server that sends the headers and then stalls mid-body is
        unreachable once the deadline passes, not a request waiting forever.
        """
        d = self.request("/stall")
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(str(self.failureResultOf(d, Unreachable).value), "no answer within 5 s")
