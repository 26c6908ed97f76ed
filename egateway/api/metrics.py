"""
Who may read C{/metrics}, and the listener of its own that serves it
(C{metrics_listen}).  The figures themselves are L{egateway.ops.metrics}'s.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from zope.interface import implementer

from egateway.api.authenticators.interface import presented_token
from egateway.api.authenticators.limiter import FailureLimiter, failure_key
from egateway.api.authenticators.shared_token import token_matches
from egateway.api.authenticators.trusted_proxy import ProxyNetworks, parse_networks
from egateway.config import ConfigError, MetricsConfig
from egateway.errors import Forbidden, GatewayError, NotFound, TooManyRequests, Unauthorized
from egateway.ops import audit
from egateway.ops.audit import client_address

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
"""
The text format every Prometheus version reads.
"""


class MetricsAccess:
    """
    Who may read C{/metrics}: requests from C{metrics_networks}, and those
    presenting C{metrics_token}.  With neither configured (a listener of
    its own, placed by the operator), everyone who can reach it.
    """

    def __init__(
        self, token: str, networks: Iterable[str], path: str = "/metrics", limiter: FailureLimiter | None = None
    ) -> None:
        """
        @param limiter: counts wrong metrics tokens per address, as for the
            API's tokens (C{auth_failure_limit}); C{None}: no limit.
        """
        self._token = token.encode("utf-8")
        self._networks = ProxyNetworks(parse_networks(networks))
        self.path = path.encode("utf-8")
        self._limiter = limiter

    @classmethod
    def from_config(
        cls, settings: MetricsConfig, base_url: str = "/", limiter: FailureLimiter | None = None
    ) -> "MetricsAccess":
        return cls(settings.metrics_token, settings.metrics_networks, base_url + "metrics", limiter)

    def addresses(self, request: IRequest) -> bool:
        """
        Whether C{request} is for C{/metrics}, as the routes will see its
        path (percent-decoded segments).
        """
        return b"/" + b"/".join(request.postpath) == self.path

    def check(self, request: IRequest) -> None:
        """
        @raise Unauthorized: a token is needed and the request has none, or
            a wrong one.
        @raise Forbidden: only networks are allowed and the request comes
            from elsewhere.
        @raise TooManyRequests: too many wrong tokens from this address.
        """
        peer = client_address(request)
        if not self._token and not self._networks:
            return
        if self._networks.contains(peer):
            return
        if not self._token:
            raise Forbidden(f"/metrics is not served to {peer}; its operator adds it to metrics_networks")
        presented = presented_token(request)
        key = failure_key(peer, presented)
        wait = self._limiter.retry_after(key) if self._limiter is not None else 0
        if wait:
            raise TooManyRequests(f"too many wrong metrics tokens from {peer}; try again in {wait} s", retry_after=wait)
        if presented is None:
            raise Unauthorized("/metrics requires the metrics token: send 'Authorization: Bearer <metrics_token>'")
        if not token_matches(presented, self._token):
            if self._limiter is not None:
                self._limiter.failed(key)
            audit.event(
                "auth.failure", method="metrics-token", address=peer, action="GET /metrics",
                reason="the metrics token is not valid", counted=self._limiter is not None,
            )
            raise Unauthorized("the metrics token is not valid")


def _json_error(request: IRequest, error: GatewayError) -> bytes:
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    if isinstance(error, Unauthorized):
        request.setHeader(b"www-authenticate", b'Bearer realm="egateway-metrics"')
    elif isinstance(error, TooManyRequests) and error.retry_after:
        request.setHeader(b"retry-after", str(error.retry_after).encode("ascii"))
    return json.dumps({"reason": error.reason, "message": error.message}).encode("utf-8")


@implementer(IResource)
class MetricsResource:
    """
    The whole of a listener of its own (C{metrics_listen}): C{GET /metrics}
    for those L{MetricsAccess} admits; JSON errors for anything else.
    """

    isLeaf = True

    def __init__(self, metrics: Any, access: MetricsAccess) -> None:
        self._metrics = metrics
        self._access = access

    def getChildWithDefault(self, name: bytes, request: IRequest) -> IResource:
        return self

    def putChild(self, path: bytes, child: IResource) -> None:
        raise NotImplementedError()

    def render(self, request: IRequest) -> bytes:
        request.setHeader(b"x-content-type-options", b"nosniff")
        try:
            if not self._access.addresses(request):
                raise NotFound("this listener serves /metrics only")
            if request.method not in (b"GET", b"HEAD"):
                request.setHeader(b"allow", b"GET")
                raise GatewayError("use GET", status=405)
            self._access.check(request)
        except GatewayError as e:
            return _json_error(request, e)
        request.setHeader(b"content-type", CONTENT_TYPE)
        return self._metrics.exposition()


def check_config(metrics: MetricsConfig) -> None:
    """
    The C{[metrics]} section's networks, checked at start-up (the gateway's
    assembly runs this).
    """
    with ConfigError.about("metrics.metrics_networks"):
        parse_networks(metrics.metrics_networks)
