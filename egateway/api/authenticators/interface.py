"""
The contract every authenticator keeps, and how a request presents a token.

An authenticator looks at a request and answers, through a Deferred:

  - an L{Identity}: the credentials are its kind and they are good;
  - C{None}: not its kind of credentials (or none it recognises), so the
    next authenticator is asked;
  - a L{Unauthorized} failure: its kind, and wrong (an expired or tampered
    JWT): no other authenticator is asked.

Other failures (L{egateway.errors.Unavailable} when a JupyterHub cannot be
reached) are not the client's fault and are passed on as they are.

An authenticator never logs, stores or echoes a token: messages name what is
wrong with it, never what it is.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest
from zope.interface import Attribute, Interface

from egateway.api.identity import Identity


class IAuthenticator(Interface):
    name = Attribute(
        "The name operators use in the C{authenticators} setting, and that "
        "audit events and L{Identity.method} carry."
    )

    def authenticate(request: IRequest) -> Deferred[Identity | None]:
        """
        Decide whether C{request}'s credentials are this authenticator's.

        @return: a Deferred firing with the L{Identity}, or C{None} for "not
            mine"; failing with L{Unauthorized} for "mine, and wrong".
        """


def presented_token(request: IRequest) -> str | None:
    """
    The token a request carries: C{Authorization: token <t>} or
    C{Authorization: Bearer <t>} (either scheme, any case), else the C{token}
    query argument (browsers cannot set headers on WebSockets).
    """
    raw = request.getHeader(b"authorization")
    if raw:
        header = raw.decode("latin-1") if isinstance(raw, bytes) else raw
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() in ("token", "bearer") and value.strip():
            return value.strip()
    values = request.args.get(b"token") if request.args else None
    if values and values[0]:
        return values[0].decode("utf-8", "replace")
    return None
