"""
Pluggable authentication: one module per kind of credential, all behind
L{IAuthenticator}, asked in order by an L{AuthenticatorChain}.

  - C{token}: the shared token (L{SharedTokenAuthenticator});
  - C{user-tokens}: per-user tokens from a file of hashes
    (L{UserTokensAuthenticator});
  - C{jwt}: JWT bearer tokens (L{JWTAuthenticator});
  - C{jupyterhub}: JupyterHub API tokens checked with the Hub
    (L{JupyterHubAuthenticator});
  - C{trusted-proxy}: front ends at trusted addresses that name the user
    (L{TrustedProxyAuthenticator}).

L{build_authentication} makes the chain the configuration asks for.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from egateway.api.authenticators.chain import AuthenticatorChain
from egateway.api.authenticators.interface import IAuthenticator, presented_token
from egateway.api.authenticators.limiter import FailureLimiter
from egateway.api.authenticators.trusted_proxy import ProxyNetworks, parse_networks
from egateway.config import AuthConfig, ConfigError

AUTHENTICATOR_NAMES = ("trusted-proxy", "token", "user-tokens", "jwt", "jupyterhub")
"""
Every authenticator, in the order they are asked when C{authenticators} is
left empty.
"""


def enabled_authenticators(settings: AuthConfig) -> list[str]:
    """
    The authenticators to ask, in order: those named in C{authenticators};
    when it is empty, each whose settings are given, in
    L{AUTHENTICATOR_NAMES} order (so C{auth_token} alone means the shared
    token, as before).
    """
    if settings.authenticators:
        return list(settings.authenticators)
    configured = {
        "trusted-proxy": bool(settings.trusted_proxies and settings.auth_token),
        "token": bool(settings.auth_token),
        "user-tokens": bool(settings.user_tokens_file),
        "jwt": bool(settings.jwt_secret or settings.jwt_public_key_file),
        "jupyterhub": bool(settings.jupyterhub_api_url),
    }
    return [name for name in AUTHENTICATOR_NAMES if configured[name]]



def check_config(auth: AuthConfig) -> None:
    """
    The C{[auth]} section, checked at start-up (the gateway's assembly
    runs this): known authenticators, each with the settings it needs,
    parseable proxy networks, JWT algorithms and keys that can verify.
    """
    from egateway.api.authenticators.jwt_bearer import ALGORITHMS, HMAC_ALGORITHMS

    for name in auth.authenticators:
        if name not in AUTHENTICATOR_NAMES:
            raise ConfigError(
                f"auth.authenticators: unknown authenticator {name!r}; known: {', '.join(AUTHENTICATOR_NAMES)}"
            )
    if len(set(auth.authenticators)) != len(auth.authenticators):
        raise ConfigError("auth.authenticators: each authenticator may be named once")
    with ConfigError.about("auth.trusted_proxies"):
        parse_networks(auth.trusted_proxies)
    for algorithm in auth.jwt_algorithms:
        if algorithm not in ALGORITHMS:
            raise ConfigError(
                f"auth.jwt_algorithms: {algorithm!r} is not supported; use some of {', '.join(sorted(ALGORITHMS))}"
            )
    if auth.jwt_secret and len(auth.jwt_secret.encode("utf-8")) < 32:
        raise ConfigError("auth.jwt_secret: must be at least 32 bytes long (RFC 7518 for HS256)")
    if auth.jupyterhub_api_url and not re.match(r"^https?://[^/\s]+", auth.jupyterhub_api_url):
        raise ConfigError("auth.jupyterhub_api_url: must be an http:// or https:// URL, e.g. http://hub:8081/hub/api")
    needs = {
        "token": ("auth_token", auth.auth_token),
        "trusted-proxy": ("auth_token and trusted_proxies", auth.auth_token and auth.trusted_proxies),
        "user-tokens": ("user_tokens_file", auth.user_tokens_file),
        "jupyterhub": ("jupyterhub_api_url", auth.jupyterhub_api_url),
    }
    for name in enabled_authenticators(auth):
        if name in needs and not needs[name][1]:
            raise ConfigError(f"auth.authenticators: {name} needs {needs[name][0]} to be set")
        if name == "jwt":
            usable = [
                a
                for a in auth.jwt_algorithms
                if (a in HMAC_ALGORITHMS and auth.jwt_secret) or (a not in HMAC_ALGORITHMS and auth.jwt_public_key_file)
            ]
            if not usable:
                raise ConfigError(
                    "auth.authenticators: jwt needs jwt_secret (for HS*) or jwt_public_key_file (for RS*, ES*, ...) "
                    "matching one of jwt_algorithms"
                )
            if not auth.jwt_audience and not auth.jwt_any_audience:
                raise ConfigError(
                    "auth.jwt_audience: required with the jwt authenticator, or a token the identity provider "
                    "issued for another service is accepted here; set it to the aud claim of this gateway's "
                    "tokens (or set jwt_any_audience = true if every token of this provider is meant for it)"
                )

def build_authentication(
    settings: AuthConfig,
    reactor: Any,
    threadpool: Any,
    *,
    clock: Any = None,
    blocking: Callable[..., Deferred] | None = None,
    http: Any = None,
) -> AuthenticatorChain:
    """
    The chain C{settings} describe.  Nothing is read or connected here; each
    authenticator does its I/O when started or first used.

    @param clock: time for expiry and limits (default: C{reactor}).
    @param blocking: runs blocking file reads off the reactor thread
        (default: C{threadpool}).
    @param http: a C{treq} client for the JupyterHub (default: one with its
        own connection pool, closed at stop).
    """
    clock = clock if clock is not None else reactor
    if blocking is None:

        def blocking(f: Callable[..., Any], *args: Any) -> Deferred:
            return deferToThreadPool(reactor, threadpool, f, *args)

    proxies = ProxyNetworks(parse_networks(settings.trusted_proxies))
    authenticators: list[IAuthenticator] = []
    for name in enabled_authenticators(settings):
        if name == "token":
            from egateway.api.authenticators.shared_token import SharedTokenAuthenticator

            authenticators.append(SharedTokenAuthenticator(settings.auth_token, asserts_user=not proxies))
        elif name == "trusted-proxy":
            from egateway.api.authenticators.trusted_proxy import TrustedProxyAuthenticator

            authenticators.append(
                TrustedProxyAuthenticator(proxies, settings.auth_token, settings.trusted_user_header)
            )
        elif name == "user-tokens":
            from egateway.api.authenticators.user_tokens import UserTokensAuthenticator

            authenticators.append(UserTokensAuthenticator(settings.user_tokens_file, clock=clock, blocking=blocking))
        elif name == "jwt":
            from egateway.api.authenticators.jwt_bearer import JWTAuthenticator

            authenticators.append(
                JWTAuthenticator(
                    clock=clock,
                    blocking=blocking,
                    secret=settings.jwt_secret,
                    public_key_file=settings.jwt_public_key_file,
                    algorithms=settings.jwt_algorithms,
                    audience=settings.jwt_audience,
                    issuer=settings.jwt_issuer,
                    username_claim=settings.jwt_username_claim,
                    groups_claim=settings.jwt_groups_claim,
                    leeway=settings.jwt_leeway,
                )
            )
        elif name == "jupyterhub":
            authenticators.append(_jupyterhub(settings, reactor, clock, http))
        else:
            raise ValueError(f"unknown authenticator {name!r}; known: {', '.join(AUTHENTICATOR_NAMES)}")
    return AuthenticatorChain(
        authenticators,
        clock=clock,
        limiter=FailureLimiter(clock, settings.auth_failure_limit, settings.auth_failure_window),
        proxies=proxies,
        admin_users=settings.admin_users,
        admin_groups=settings.admin_groups,
    )


def _jupyterhub(settings: AuthConfig, reactor: Any, clock: Any, http: Any) -> IAuthenticator:
    from egateway.api.authenticators.jupyterhub import JupyterHubAuthenticator

    on_stop = None
    if http is None:
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 4
        http = HTTPClient(Agent(reactor, pool=pool))
        on_stop = pool.closeCachedConnections
    return JupyterHubAuthenticator(
        settings.jupyterhub_api_url,
        clock=clock,
        http=http,
        reactor=reactor,
        cache_ttl=settings.jupyterhub_cache_ttl,
        scope=settings.jupyterhub_scope,
        on_stop=on_stop,
        recheck_interval=settings.jupyterhub_recheck_interval,
    )


__all__ = [
    "AUTHENTICATOR_NAMES",
    "AuthenticatorChain",
    "FailureLimiter",
    "IAuthenticator",
    "build_authentication",
    "enabled_authenticators",
    "presented_token",
]
