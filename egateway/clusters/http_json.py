"""
One HTTP request to a cluster manager's REST API (the Docker engine,
Conductor, YARN's ResourceManager) with a deadline, its answer decoded: the
part every such client shares, so each only maps statuses and messages to
its own errors.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet.defer import CancelledError
from twisted.internet.defer import TimeoutError as DeferredTimeout


class Unreachable(Exception):
    """
    No answer: the connection failed or the deadline passed.  The message
    says which.
    """


async def json_request(
    http: Any, clock: Any, method: str, url: str, *, data: bytes | None = None, headers: Any = None,
    timeout: float, allow_redirects: bool = True,
) -> tuple[int, Any, str]:
    """
    The status, the body decoded as JSON (the text itself when it is not
    JSON, C{None} when empty) and the text.

    The response's headers and then its body each get C{timeout} seconds,
    so a server that answers the headers and then stalls cannot hold the
    caller forever.

    @param http: a C{treq.client.HTTPClient}.
    @param allow_redirects: follow redirects; a client that must see them
        (a standby YARN ResourceManager redirects to the active one) passes
        C{False} and gets the redirect's status.
    @raise Unreachable: no answer within C{timeout} seconds on C{clock}
        (the message says so), or the connection failed (its error).
    """
    d = http.request(method, url, data=data, headers=headers, allow_redirects=allow_redirects)
    d.addTimeout(timeout, clock)
    try:
        response = await d
        body = treq.content(response)
        body.addTimeout(timeout, clock)
        content = await body
    except CancelledError:
        raise
    except Exception as e:
        raise Unreachable(f"no answer within {timeout:g} s" if isinstance(e, DeferredTimeout) else str(e)) from None
    text = content.decode("utf-8", "replace")
    parsed: Any = None
    if text.strip():
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
    return response.code, parsed, text
