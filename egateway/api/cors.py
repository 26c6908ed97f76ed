"""
From which origins a browser page may call the gateway: the CORS policy.

Authentication itself lives in L{egateway.api.authenticators} (the shared
token, per-user tokens, JWTs, JupyterHub tokens, trusted front ends) and the
resulting identity in L{egateway.api.identity}.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from twisted.web.iweb import IRequest

from egateway.config import AuthConfig
from egateway.errors import Forbidden

__all__ = ["CorsPolicy"]


class CorsPolicy:
    """
    The C{Access-Control-*} headers from configuration, and the Origin check
    (a browser page from another origin may only call us if C{allow_origin}
    admits it).
    """

    def __init__(self, settings: AuthConfig) -> None:
        self._origin = settings.allow_origin
        self._headers = [
            (b"access-control-allow-origin", settings.allow_origin),
            (b"access-control-allow-credentials", settings.allow_credentials),
            (b"access-control-allow-headers", settings.allow_headers),
            (b"access-control-allow-methods", settings.allow_methods),
            (b"access-control-expose-headers", settings.expose_headers),
            (b"access-control-max-age", settings.max_age),
        ]

    def apply(self, request: IRequest) -> None:
        for name, value in self._headers:
            if value:
                request.setHeader(name, value.encode("utf-8"))

    def origin_allowed(self, request: IRequest) -> bool:
        raw_origin = request.getHeader(b"origin")
        if not raw_origin or self._origin == "*":
            return True
        origin = raw_origin.decode("latin-1")
        if self._origin and origin == self._origin:
            return True
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        try:
            netloc = urlsplit(origin).netloc
        except ValueError:
            # Not a URL (say, an unclosed IPv6 bracket): not our origin.
            return False
        return bool(host) and netloc == host

    def check_origin(self, request: IRequest) -> None:
        """
        @raise Forbidden: for a cross-origin request that is not allowed.
        """
        if not self.origin_allowed(request):
            raise Forbidden(
                "cross-origin request refused: set allow_origin (EG_ALLOW_ORIGIN) to admit this origin"
            )
