"""
JupyterHub API tokens, checked with the Hub that issued them.

The gateway asks C{GET {jupyterhub_api_url}/user} with the caller's token;
the Hub answers with the token owner's model (name, groups) or refuses the
token.  Answers are cached for C{jupyterhub_cache_ttl} seconds, keyed by a
hash of the token: a token revoked at the Hub is refused once its cache
entry expires.  Concurrent requests with one token share one question to
the Hub.

A Hub that cannot be reached, or answers with an error, makes the request
fail with 503 (the token is neither accepted nor counted as a wrong one).

Every token of a Hub user is known to the Hub, tokens made for quite other
purposes included; only those granted the configured C{scope} (by default
C{access:services!service=egateway}, what the Hub grants a user allowed to
use the service C{egateway}) are accepted.  The Hub's answer lists the
token's scopes (JupyterHub 2 and later); a token without it is refused like
a wrong one.

The tokens of open WebSockets are checked again every
C{jupyterhub_recheck_interval} seconds (through the same cache); a
WebSocket whose token the Hub refuses is closed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from zope.interface import implementer

from egateway.api.authenticators.interface import IAuthenticator, presented_token
from egateway.api.identity import Identity, valid_username
from egateway.errors import Unauthorized, Unavailable
from egateway.observe import Operation

_log = Logger()

REQUEST_TIMEOUT = 10.0
"""
Seconds the Hub has to answer one token check.
"""

MAX_CACHED = 10_000
"""
Cached answers kept at once; beyond it the oldest go first.
"""

MAX_ANSWER = 1 << 20


@dataclass(frozen=True)
class _Answer:
    identity: Identity | None
    expires: float


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def holds_scope(scopes: Any, required: str) -> bool:
    """
    Whether the Hub's list of a token's scopes grants C{required}: the
    scope itself, or (for a filtered scope such as
    C{access:services!service=egateway}) its unfiltered form, which grants
    it for every resource.
    """
    if not isinstance(scopes, list):
        return False
    base = required.split("!", 1)[0]
    return required in scopes or base in scopes


@implementer(IAuthenticator)
class JupyterHubAuthenticator(Service):
    name = "jupyterhub"

    def __init__(
        self,
        api_url: str,
        *,
        clock: Any,
        http: Any,
        reactor: Any,
        cache_ttl: float = 30.0,
        scope: str = "",
        timeout: float = REQUEST_TIMEOUT,
        max_cached: int = MAX_CACHED,
        on_stop: Any = None,
        recheck_interval: float = 60.0,
    ) -> None:
        """
        @param api_url: the Hub's API root, e.g.
            C{http://127.0.0.1:8081/hub/api}.
        @param clock: the clock cache entries expire on.
        @param http: a C{treq} HTTP client (C{treq.client.HTTPClient}).
        @param reactor: the reactor the request timeout runs on.
        @param scope: the scope a token must hold (empty: none).
        @param on_stop: called at stop, e.g. to close the connection pool;
            may return a Deferred.
        @param recheck_interval: seconds between checks of the tokens open
            WebSockets hold (0: none); see L{AuthenticatorChain.recheck}.
        """
        self._user_url = api_url.rstrip("/") + "/user"
        self._clock = clock
        self._http = http
        self._reactor = reactor
        self._ttl = cache_ttl
        self._timeout = timeout
        self._max_cached = max_cached
        self._scope = scope
        self._on_stop = on_stop
        self._cache: dict[str, _Answer] = {}
        self._asking: dict[str, Operation[Identity | None]] = {}
        self.recheck_interval = recheck_interval

    def stopService(self) -> Any:
        super().stopService()
        for operation in list(self._asking.values()):
            operation.cancel()
        if self._on_stop is not None:
            return self._on_stop()
        return None

    def forget(self) -> None:
        """
        Drop every cached answer (the next request asks the Hub again).
        """
        self._cache.clear()

    def authenticate(self, request: IRequest) -> Deferred[Identity | None]:
        token = presented_token(request)
        if token is None:
            return succeed(None)
        return self.recheck(token)

    def recheck(self, token: str) -> Deferred[Identity | None]:
        """
        Whom the Hub says C{token} belongs to (cached): C{None} if it
        refuses the token.

        @raise Unavailable: (in the Deferred) no usable answer from the Hub.
        """
        key = _digest(token)
        now = self._clock.seconds()
        cached = self._cache.get(key)
        if cached is not None:
            if cached.expires > now:
                return succeed(cached.identity)
            del self._cache[key]
        operation = self._asking.get(key)
        if operation is None:
            operation = Operation("ask JupyterHub", self._ask(token, key))
            if not operation.done:
                self._asking[key] = operation
        return operation.observe()

    async def _ask(self, token: str, key: str) -> Identity | None:
        try:
            identity = await self._ask_hub(token)
        finally:
            self._asking.pop(key, None)
        self._remember(key, identity)
        return identity

    async def _ask_hub(self, token: str) -> Identity | None:
        """
        @raise Unavailable: no usable answer from the Hub.
        """
        try:
            response = await self._http.get(
                self._user_url,
                headers={b"Authorization": [b"token " + token.encode("utf-8")], b"Accept": [b"application/json"]},
                timeout=self._timeout,
                reactor=self._reactor,
            )
            body = await response.content()
        except CancelledError:
            raise Unavailable(f"JupyterHub did not answer within {self._timeout:g} s") from None
        except Exception as e:
            _log.error(
                "cannot reach JupyterHub at {url} to check a token: {error}",
                url=self._user_url,
                error=f"{type(e).__name__}: {e}",
            )
            raise Unavailable("the gateway cannot reach JupyterHub to check the token; try again later") from None
        if response.code in (401, 403):
            return None
        if response.code != 200:
            _log.error(
                "JupyterHub at {url} answered a token check with HTTP {code}; check jupyterhub_api_url",
                url=self._user_url,
                code=response.code,
            )
            raise Unavailable(f"JupyterHub answered the token check with HTTP {response.code}")
        try:
            model = json.loads(body[:MAX_ANSWER])
        except ValueError:
            raise Unavailable("JupyterHub's answer to the token check is not JSON") from None
        if not isinstance(model, dict) or model.get("kind", "user") != "user":
            # A service's token identifies a service, not a user.
            return None
        if self._scope and not holds_scope(model.get("scopes"), self._scope):
            raise Unauthorized(f"the JupyterHub token does not grant the scope {self._scope}")
        username = model.get("name")
        if not valid_username(username):
            raise Unauthorized("JupyterHub names a user the gateway cannot use")
        groups = model.get("groups") or []
        if not isinstance(groups, list):
            groups = []
        return Identity(
            username=username,
            groups=frozenset(g for g in groups if isinstance(g, str)),
            authenticated=True,
            method=self.name,
        )

    def _remember(self, key: str, identity: Identity | None) -> None:
        if self._ttl <= 0:
            return
        if len(self._cache) >= self._max_cached:
            now = self._clock.seconds()
            for old in [k for k, answer in self._cache.items() if answer.expires <= now]:
                del self._cache[old]
            while len(self._cache) >= self._max_cached:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = _Answer(identity, self._clock.seconds() + self._ttl)
