"""
Who may call the gateway, and from which origins.

Today's identity is the shared token (Enterprise Gateway's model): a request
presents it as C{Authorization: token <t>} (or C{Bearer <t>}) or, for
browsers' WebSockets, as C{?token=<t>}.  It is compared in constant time and
never logged.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from urllib.parse import urlsplit

from twisted.web.iweb import IRequest

from egateway.config import AuthConfig
from egateway.errors import Forbidden, Unauthorized


@dataclass(frozen=True)
class Identity:
    username: str
    authenticated: bool


ANONYMOUS = Identity(username="", authenticated=False)


def presented_token(request: IRequest) -> str | None:
    raw = request.getHeader(b"authorization")
    if raw:
        header = raw.decode("latin-1") if isinstance(raw, bytes) else raw
        scheme, _, value = header.partition(" ")
        if scheme.lower() in ("token", "bearer") and value:
            return value.strip()
    values = request.args.get(b"token")
    if values:
        return values[0].decode("utf-8", "replace")
    return None


class Authenticator:
    def __init__(self, token: str) -> None:
        self._token = token.encode("utf-8")

    def authenticate(self, request: IRequest) -> Identity:
        """
        @raise Unauthorized: when a token is required and missing or wrong.
        """
        if not self._token:
            return ANONYMOUS
        given = presented_token(request)
        if given is None:
            raise Unauthorized(
                "this gateway requires a token: send 'Authorization: token <token>'"
            )
        if not hmac.compare_digest(given.encode("utf-8"), self._token):
            raise Unauthorized("the token is not valid")
        return Identity(username="", authenticated=True)


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
        return bool(host) and urlsplit(origin).netloc == host

    def check_origin(self, request: IRequest) -> None:
        """
        @raise Forbidden: for a cross-origin request that is not allowed.
        """
        if not self.origin_allowed(request):
            raise Forbidden(
                "cross-origin request refused: set allow_origin (EG_ALLOW_ORIGIN) to admit this origin"
            )
