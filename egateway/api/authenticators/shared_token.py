"""
The shared token: one secret for every caller (Enterprise Gateway's
C{EG_AUTH_TOKEN}).

It names no user.  Its holders are, as in Enterprise Gateway, front ends
that say whom a kernel is for in C{KERNEL_USERNAME}; once C{trusted_proxies}
is configured, only requests from those addresses may do that (see
L{egateway.api.authenticators.trusted_proxy}), and the shared token from
anywhere else identifies no one in particular.
"""

from __future__ import annotations

import hmac

from twisted.internet.defer import Deferred, succeed
from twisted.web.iweb import IRequest
from zope.interface import implementer

from egateway.api.authenticators.interface import IAuthenticator, presented_token
from egateway.api.identity import Identity


def token_matches(given: str, expected: bytes) -> bool:
    """
    Compare in constant time (for equal lengths), so response timing does
    not reveal how much of a guess was right.
    """
    return hmac.compare_digest(given.encode("utf-8"), expected)


@implementer(IAuthenticator)
class SharedTokenAuthenticator:
    name = "token"

    def __init__(self, token: str, asserts_user: bool = True) -> None:
        """
        @param asserts_user: holders may name the user in C{KERNEL_USERNAME}
            (false once trusted proxies are configured).
        """
        if not token:
            raise ValueError("the shared token authenticator needs a token (auth_token)")
        self._token = token.encode("utf-8")
        self._identity = Identity(
            username="", authenticated=True, method=self.name, trusted_proxy=asserts_user
        )

    def authenticate(self, request: IRequest) -> Deferred[Identity | None]:
        given = presented_token(request)
        if given is None or not token_matches(given, self._token):
            return succeed(None)
        return succeed(self._identity)
