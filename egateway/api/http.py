"""
HTTP plumbing shared by every route: JSON responses and errors, the site
and request classes (body limits, no version banner, C{TCP_NODELAY}), and the
front resource that applies authentication and CORS to every request,
unknown paths included.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import ITCPTransport
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from egateway.api.cors import CorsPolicy
from egateway.api.authenticators import AuthenticatorChain
from egateway.api.hosts import HostPolicy
from egateway.errors import BadRequest, GatewayError, TooManyRequests, Unauthorized, error_body, write_error
from egateway.errors import write_json  # noqa: F401 (the routes import the JSON helpers from here)
from egateway.ops import audit
from egateway.ops import turns

_log = Logger()

MAX_JSON_DEPTH = 64
"""
Deepest nesting of arrays and objects a request body may have.  No route
needs more than a few levels; a deeper body would make the parser (or any
recursive walk after it) exhaust the stack.
"""


def json_body(request: IRequest) -> Any:
    """
    The request's JSON body; C{None} when empty.

    @raise BadRequest: if the body is not valid JSON, or nested deeper than
        L{MAX_JSON_DEPTH}.
    """
    request.content.seek(0)
    data = request.content.read()
    if not data.strip():
        return None
    try:
        value = json.loads(data)
    except RecursionError:
        raise BadRequest(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from None
    if _depth_exceeds(value, MAX_JSON_DEPTH):
        raise BadRequest(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    """
    Whether C{value} nests lists and dicts more than C{limit} deep; walked
    with an explicit stack, so the check cannot itself overflow.
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


class GatewayRequest(Request):
    """
    A request that stops storing its body past C{max_body} bytes (the
    front resource then answers 413) and carries no version banner.
    """

    max_body = 1 << 20
    too_large = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self.too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self.too_large = True
            self.content.seek(0)
            self.content.truncate()
            return
        super().handleContentChunk(data)

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            self.responseHeaders.removeHeader(b"server")
        super().write(data)


class _Channel(HTTPChannel):
    _turn_fd = -1

    def connectionMade(self) -> None:
        super().connectionMade()
        if ITCPTransport.providedBy(self.transport):
            # Without it, small replies wait ~40 ms for the client's delayed
            # ACK (Nagle), which is what makes other gateways slow.
            self.transport.setTcpNoDelay(True)
        # Requests go ahead of kernel traffic in each reactor turn, until
        # the connection becomes a WebSocket (ChannelsProtocol releases it).
        self._turn_fd = turns.prefer(self.transport)

    def connectionLost(self, reason: Any) -> None:
        turns.release_descriptor(self._turn_fd)
        super().connectionLost(reason)


class GatewaySite(Site):
    protocol = _Channel
    requestFactory = GatewayRequest
    displayTracebacks = False

    def __init__(self, resource: IResource, max_body: int, **kwargs: Any) -> None:
        # The API reads JSON bodies only.  Parsing form bodies into
        # request.args would let a POST body add query arguments, and a
        # malformed multipart body is answered with a bare, non-JSON 400.
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        self.requestFactory = type("BoundRequest", (GatewayRequest,), {"max_body": max_body})

    def log(self, request: Request) -> None:
        # Access log lines would carry ?token= query strings.
        pass


@implementer(IResource)
class FrontResource:
    """
    Applies the policies every request shares, then hands it to the routes.

    Authentication may wait on the network (a JupyterHub token check), so
    the route is rendered once it is done; meanwhile nothing of the request
    is acted on.  If the client goes away first, the check is cancelled and
    nothing is rendered.  Every refusal is a JSON error; 401s carry
    C{WWW-Authenticate}, 429s C{Retry-After}.

    @ivar authentication: the chain deciding who each request is from; its
        identity is C{request.gateway_user}.
    @ivar public_paths: exact request paths served without authentication
        or Origin check (the health probes).
    @ivar refused: requests refused here, by status (for the metrics).
    """

    public_paths: frozenset[bytes] = frozenset()

    isLeaf = True

    def __init__(
        self,
        routes: IResource,
        authentication: AuthenticatorChain,
        cors: CorsPolicy,
        hosts: HostPolicy | None = None,
        metrics: Any = None,
    ) -> None:
        """
        @param hosts: the names a request may give in C{Host} when no
            authenticator is configured (C{None}: any).
        @param metrics: who may read C{/metrics} (a
            L{egateway.api.metrics.MetricsAccess}), instead of the API's
            authentication; C{None}: it is not served here.
        """
        self._routes = routes
        self.authentication = authentication
        self._cors = cors
        self._hosts = hosts
        self._metrics = metrics
        self.refused: dict[int, int] = {}

    def getChildWithDefault(self, name: bytes, request: IRequest) -> IResource:
        return self

    def putChild(self, path: bytes, child: IResource) -> None:
        raise NotImplementedError()

    def render(self, request: IRequest) -> bytes | int:
        request.setHeader(b"x-content-type-options", b"nosniff")
        self._cors.apply(request)
        if request.method == b"OPTIONS":
            request.setResponseCode(204)
            return b""
        if getattr(request, "too_large", False):
            return error_body(
                request, 413, "Request Entity Too Large", "the request body exceeds the size limit"
            )
        gone: list[bool] = []
        serving: list[Deferred[None]] = []

        def client_left(failure: Any) -> None:
            gone.append(True)
            for d in serving:
                d.cancel()

        request.notifyFinish().addErrback(client_left)
        d = Deferred.fromCoroutine(self._serve(request, gone))
        d.addErrback(self._lost)
        serving.append(d)
        return NOT_DONE_YET

    def _lost(self, failure: Any) -> None:
        if not failure.check(CancelledError):
            _log.failure("serving a request", failure)

    async def _serve(self, request: IRequest, gone: list[bool]) -> None:
        if request.path in self.public_paths:
            # The health probes: no credentials (the caller is anonymous),
            # no Origin check; their bodies say nothing.
            self._render(request)
            return
        try:
            if self._metrics is not None and self._metrics.addresses(request):
                # Its own rule: the API's credentials do not open it.
                self._metrics.check(request)
                request.metrics_access = True
            else:
                if self._hosts is not None and not self.authentication.authenticators:
                    self._hosts.check(request)
                request.gateway_user = await self.authentication.authenticate(request)
            self._cors.check_origin(request)
        except CancelledError:
            return
        except GatewayError as e:
            if not gone:
                self._refuse(request, e)
            return
        except Exception:
            _log.failure(
                "authenticating {method} {path}",
                method=request.method.decode("ascii", "replace"),
                path=request.path.decode("utf-8", "replace"),
            )
            if not gone:
                body = error_body(
                    request, 500, "Internal Server Error", "Unknown server error; see the gateway log"
                )
                _finish(request, body)
            return
        if gone:
            return
        self._render(request)

    def _render(self, request: IRequest) -> None:
        if not _utf8_url(request):
            # Klein would answer a plain-text 400 and log a traceback.
            _finish(request, error_body(request, 400, "Bad Request", "the URL or Host is not valid UTF-8"))
            return
        body = self._routes.render(request)
        if body is not NOT_DONE_YET:
            _finish(request, body)

    def _refuse(self, request: IRequest, error: GatewayError) -> None:
        self.refused[error.status] = self.refused.get(error.status, 0) + 1
        if isinstance(error, Unauthorized):
            request.setHeader(b"www-authenticate", b'Bearer realm="egateway"')
        elif isinstance(error, TooManyRequests) and error.retry_after:
            request.setHeader(b"retry-after", str(error.retry_after).encode("ascii"))
        elif error.status == 403:
            # Authentication events are audited by the chain; this is the
            # Origin or Host check.
            audit.refused(request, error.status, error.message)
        _finish(request, write_error(request, error))


def _utf8_url(request: IRequest) -> bool:
    """
    Whether the request's path (percent-decoded) and host name decode as
    UTF-8, as the routes need.
    """
    try:
        b"/".join(request.postpath).decode("utf-8")
        request.getRequestHostname().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _finish(request: IRequest, body: bytes) -> None:
    """
    Send a whole body, as C{Request.render} would for a resource that
    returned it.
    """
    request.setHeader(b"content-length", b"%d" % (len(body),))
    request.write(body)  # a HEAD response drops it
    request.finish()


__all__ = ["NOT_DONE_YET"]
