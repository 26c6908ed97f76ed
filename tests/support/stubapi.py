"""
Calling the gateway's HTTP front through treq's in-memory C{StubTreq}, on a
test's L{Clock}: no sockets, no reactor, every answer synchronous.
"""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase


def stub_call(
    case: SynchronousTestCase,
    stub: StubTreq,
    clock: Clock,
    method: str,
    path: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, Any]:
    """
    One request; its status, JSON body (C{None} when empty) and headers.
    The clock moves 0.3 s meanwhile, so fake kernels act on shutdown
    requests (they exit 0.1 s later).
    """
    d = stub.request(method, "http://gw.example" + path, data=data, headers=headers or {})
    stub.flush()
    for _ in range(3):
        clock.advance(0.1)
        stub.flush()
    response = case.successResultOf(d)
    content_d = response.content()
    stub.flush()
    content = case.successResultOf(content_d)
    return response.code, (json.loads(content) if content else None), response.headers


def json_body(body: Any) -> bytes | None:
    return json.dumps(body).encode() if body is not None else None


def assert_json_error(case: SynchronousTestCase, result: tuple[int, Any, Any], status: int, text: str = "") -> None:
    """
    C{result} is the JSON error C{{"reason", "message"}} with C{status},
    its message containing C{text}.
    """
    code, body, headers = result
    case.assertEqual(code, status, body)
    case.assertEqual(set(body), {"reason", "message"})
    case.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
    case.assertIn(text, body["message"])
