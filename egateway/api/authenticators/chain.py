"""
Authentication for every request: the configured authenticators, asked in
order, behind the failed-authentication limit, with every outcome in the
audit trail.

  1. A token that failed too often recently from the same address gets 429
     at once (failures are counted per address and token, so a valid token
     is never refused for the failures of others behind the same address).
  2. With no authenticator configured, the caller is anonymous (the
     gateway's behaviour without C{auth_token}).
  3. Each authenticator in turn: an identity ends the search; "not mine"
     asks the next; "mine, and wrong" refuses (401) and counts a failure.
  4. If none claims the request: 401, counted as a failure when credentials
     were presented (requests without any are not guesses).

The identity then gets the administrator flag from C{admin_users} and
C{admin_groups}.

Credentials that outlive a request (an open WebSocket's) are checked again
when they may have changed: L{AuthenticatorChain.on_change} listeners hear
when an authenticator's credentials changed (a token file reloaded) and,
for authenticators that can only tell by asking (a JupyterHub), every
C{recheck_interval} seconds; L{AuthenticatorChain.recheck} answers whether
a credential still holds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from egateway.api.authenticators.interface import IAuthenticator, presented_token
from egateway.api.authenticators.limiter import FailureLimiter, failure_key
from egateway.api.authenticators.trusted_proxy import ProxyNetworks
from egateway.api.identity import ANONYMOUS, Identity, valid_username
from egateway.errors import GatewayError, TooManyRequests, Unauthorized
from egateway.ops import audit

_log = Logger()

SUCCESS_AUDIT_INTERVAL = 3600.0
"""
A user's successful authentications from one address, by one method, are
audited once per this many seconds, not once per request.
"""

_MAX_REMEMBERED_SUCCESSES = 10_000

NO_CREDENTIALS = (
    "this gateway requires a token: send 'Authorization: token <token>' "
    "(or 'Authorization: Bearer <token>')"
)
INVALID_CREDENTIALS = "the token is not valid"


class AuthenticatorChain(MultiService):
    """
    @ivar authenticators: the configured authenticators, in the order they
        are asked.
    @ivar on_change: called (with no arguments) when credentials accepted
        earlier may no longer hold.
    """

    name = "authentication"

    def __init__(
        self,
        authenticators: Sequence[IAuthenticator],
        *,
        clock: Any,
        limiter: FailureLimiter | None = None,
        proxies: ProxyNetworks | None = None,
        admin_users: Iterable[str] = (),
        admin_groups: Iterable[str] = (),
    ) -> None:
        super().__init__()
        self.authenticators = list(authenticators)
        self._clock = clock
        self.limiter = limiter if limiter is not None else FailureLimiter(clock, 0, 0)
        self._proxies = proxies if proxies is not None else ProxyNetworks()
        self._admin_users = frozenset(admin_users)
        self._admin_groups = frozenset(admin_groups)
        self._audited_successes: dict[tuple[str, str, str], float] = {}
        self.on_change: list[Callable[[], None]] = []
        self._rechecks: LoopingCall | None = None
        for authenticator in self.authenticators:
            if IService.providedBy(authenticator):
                authenticator.setServiceParent(self)
            changes = getattr(authenticator, "on_change", None)
            if isinstance(changes, list):
                changes.append(self.changed)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.authenticators]

    def startService(self) -> None:
        super().startService()
        _log.info(
            "authentication: {methods}",
            methods=", ".join(self.names) or "none (every caller is anonymous)",
        )
        intervals = [getattr(a, "recheck_interval", 0) or 0 for a in self.authenticators]
        interval = min((i for i in intervals if i > 0), default=0)
        if interval:
            self._rechecks = LoopingCall(self.changed)
            self._rechecks.clock = self._clock
            self._rechecks.start(interval, now=False)

    def stopService(self) -> Any:
        if self._rechecks is not None and self._rechecks.running:
            self._rechecks.stop()
        return super().stopService()

    def changed(self) -> None:
        """
        Tell the L{on_change} listeners that credentials may have changed.
        """
        for listener in list(self.on_change):
            try:
                listener()
            except Exception:
                _log.failure("checking credentials again after a change")

    def recheck(self, identity: Identity, token: str | None) -> Deferred[Identity | None]:
        """
        Whether credentials accepted earlier still hold.

        @param identity: what they gave then.
        @param token: the token presented then (C{None}: none).
        @return: a Deferred firing with the identity they give now (with
            admin rights applied), C{None} if they were revoked, or
            C{identity} as it is when its authenticator cannot tell (the
            shared token, a JWT until it expires); failing as
            L{authenticate} does when its authenticator cannot answer now.
        """
        for authenticator in self.authenticators:
            if authenticator.name != identity.method:
                continue
            check = getattr(authenticator, "recheck", None)
            if check is None or token is None:
                break
            d = maybeDeferred(check, token)
            return d.addCallback(lambda now: self._with_roles(now) if now is not None else None)
        return succeed(identity)

    def authenticate(self, request: IRequest) -> Deferred[Identity]:
        """
        Establish who sent C{request}; also sets
        C{request.gateway_client_address} (the client behind any trusted
        proxy).

        @return: a Deferred firing with the L{Identity}; failing with
            L{Unauthorized} (401), L{TooManyRequests} (429), or another
            L{GatewayError} an authenticator raised (503 when a JupyterHub
            is unreachable).
        """
        return Deferred.fromCoroutine(self._authenticate(request))

    async def _authenticate(self, request: IRequest) -> Identity:
        address = self._proxies.client_of(request)
        request.gateway_client_address = address  # type: ignore[attr-defined]
        key = failure_key(address, presented_token(request))
        wait = self.limiter.retry_after(key)
        if wait:
            audit.event(
                "auth.throttled",
                address=address,
                action=_action(request),
                retry_after=wait,
                reason=f"more than {self.limiter.limit} failed authentications with this token in "
                f"{self.limiter.window:g} s",
            )
            raise TooManyRequests(
                f"too many failed authentications with this token from {address}; try again in {wait} s",
                retry_after=wait,
            )
        if not self.authenticators:
            return ANONYMOUS
        for authenticator in self.authenticators:
            try:
                identity = await maybeDeferred(authenticator.authenticate, request)
            except Unauthorized as e:
                self._failed(request, address, key, authenticator.name, str(e), counted=True)
                raise
            except GatewayError as e:
                audit.event(
                    "auth.error",
                    method=authenticator.name,
                    address=address,
                    action=_action(request),
                    reason=str(e),
                )
                raise
            if identity is None:
                continue
            if identity.username and not valid_username(identity.username):
                reason = "the credentials name an unusable user name"
                self._failed(request, address, key, authenticator.name, reason, counted=True)
                raise Unauthorized(reason)
            identity = self._with_roles(identity)
            self._succeeded(identity, address)
            return identity
        if presented_token(request) is None:
            self._failed(request, address, key, "none", "no credentials", counted=False)
            raise Unauthorized(NO_CREDENTIALS)
        self._failed(
            request, address, key, ",".join(self.names), "no authenticator accepted the token", counted=True
        )
        raise Unauthorized(INVALID_CREDENTIALS)

    def _with_roles(self, identity: Identity) -> Identity:
        admin = (
            identity.admin
            or (bool(identity.username) and identity.username in self._admin_users)
            or bool(identity.groups & self._admin_groups)
        )
        return dataclasses.replace(identity, admin=admin) if admin != identity.admin else identity

    def _failed(self, request: IRequest, address: str, key: str, method: str, reason: str, counted: bool) -> None:
        if counted:
            self.limiter.failed(key)
        audit.event(
            "auth.failure",
            method=method,
            address=address,
            action=_action(request),
            reason=reason,
            counted=counted,
        )

    def _succeeded(self, identity: Identity, address: str) -> None:
        key = (identity.username, identity.method, address)
        now = self._clock.seconds()
        last = self._audited_successes.get(key)
        if last is not None and now - last < SUCCESS_AUDIT_INTERVAL:
            return
        if len(self._audited_successes) >= _MAX_REMEMBERED_SUCCESSES:
            self._audited_successes.clear()
        self._audited_successes[key] = now
        fields: dict[str, Any] = {
            "user": identity.display_name,
            "method": identity.method,
            "address": address,
            "admin": identity.admin,
        }
        if identity.groups:
            fields["groups"] = sorted(identity.groups)
        if identity.trusted_proxy:
            fields["via_proxy"] = True
        audit.event("auth.success", **fields)


def _action(request: IRequest) -> str:
    return f"{request.method.decode('ascii', 'replace')} {request.path.decode('utf-8', 'replace')[:200]}"
