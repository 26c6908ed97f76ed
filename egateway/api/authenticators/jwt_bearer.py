"""
JWT bearer tokens, as an identity provider (Keycloak, Dex, Azure AD, a
JupyterHub service, ...) issues them: signed with a shared secret (HS256)
or with a private key whose public half the gateway has (RS256).

The username and groups come from configured claims.  C{exp} is required
and, with C{nbf}, checked against the gateway's clock with a small leeway
for clock skew; C{aud} and C{iss} are checked when configured.  Only the
configured algorithms with a configured key are accepted, each with its own
key, so a token cannot choose C{none} or pass the public key off as an HMAC
secret.

A token that is not shaped like a JWT is not this authenticator's; one that
is, but fails a check, is refused with the check that failed.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Callable, Sequence

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from zope.interface import implementer

from egateway.api.authenticators.interface import IAuthenticator, presented_token
from egateway.api.identity import Identity, valid_username
from egateway.errors import Unauthorized, Unavailable
from egateway.observe import Operation

_log = Logger()

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
ALGORITHMS = HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS

Blocking = Callable[..., Deferred]


def load_public_key_blocking(path: str) -> Any:
    """
    A PEM public key, or the public key of a PEM certificate.

    @raise OSError: unreadable.
    @raise ValueError: not a PEM public key or certificate.
    """
    with open(path, "rb") as f:
        data = f.read()
    if b"BEGIN CERTIFICATE" in data:
        return x509.load_pem_x509_certificate(data).public_key()
    return serialization.load_pem_public_key(data)


def _claim_groups(value: Any) -> frozenset[str] | None:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset(part for part in value.replace(",", " ").split() if part)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return frozenset(value)
    return None


def _claim(claims: dict[str, Any], path: str) -> Any:
    """
    A claim by name; a dotted name reaches into nested objects
    (C{realm_access.roles}), as some providers nest groups.
    """
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _jwt_algorithm(token: str) -> str | None:
    """
    The C{alg} of a token shaped like a JWT (three dot-separated parts, the
    first a JSON header naming an algorithm); C{None} for anything else.
    Only the header is looked at: a JWT whose other parts are damaged is
    still a JWT, and refused as one.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    except (ValueError, binascii.Error):
        return None
    algorithm = header.get("alg") if isinstance(header, dict) else None
    return algorithm if isinstance(algorithm, str) else None


@implementer(IAuthenticator)
class JWTAuthenticator(Service):
    name = "jwt"

    def __init__(
        self,
        *,
        clock: Any,
        blocking: Blocking,
        secret: str = "",
        public_key_file: str = "",
        algorithms: Sequence[str] = ("HS256", "RS256"),
        audience: str = "",
        issuer: str = "",
        username_claim: str = "sub",
        groups_claim: str = "groups",
        leeway: float = 30.0,
    ) -> None:
        unknown = [a for a in algorithms if a not in ALGORITHMS]
        if unknown:
            raise ValueError(f"unsupported JWT algorithm(s): {', '.join(unknown)}")
        self._clock = clock
        self._blocking = blocking
        self._secret = secret.encode("utf-8") if secret else None
        self._public_key_file = public_key_file
        self._public_key: Any = None
        self._key_loading: Operation[None] | None = None
        self._algorithms = [
            a
            for a in algorithms
            if (a in HMAC_ALGORITHMS and self._secret) or (a in PUBLIC_KEY_ALGORITHMS and public_key_file)
        ]
        if not self._algorithms:
            raise ValueError("no JWT algorithm has a key: set jwt_secret (HS*) or jwt_public_key_file (RS*, ES*, ...)")
        self._audience = audience
        self._issuer = issuer
        self._username_claim = username_claim
        self._groups_claim = groups_claim
        self._leeway = leeway

    @property
    def algorithms(self) -> list[str]:
        """
        The algorithms accepted: those configured that have a key.
        """
        return list(self._algorithms)

    # -- the public key ------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._public_key_file:
            # Load early, so a bad key file is in the log at start-up.
            self._load_key()

    def _load_key(self) -> Deferred[None]:
        if self._key_loading is None or (self._key_loading.done and self._public_key is None):
            self._key_loading = Operation("load JWT public key", self._read_key())
        return self._key_loading.observe()

    async def _read_key(self) -> None:
        try:
            self._public_key = await self._blocking(load_public_key_blocking, self._public_key_file)
        except (OSError, ValueError) as e:
            _log.error(
                "cannot load the JWT public key {path}: {error}; tokens signed with it are refused until it is fixed",
                path=self._public_key_file,
                error=str(e),
            )

    # -- authentication ------------------------------------------------------

    def authenticate(self, request: IRequest) -> Deferred[Identity | None]:
        token = presented_token(request)
        algorithm = _jwt_algorithm(token) if token is not None else None
        if token is None or algorithm is None:
            return succeed(None)
        if algorithm in PUBLIC_KEY_ALGORITHMS and algorithm in self._algorithms and self._public_key is None:
            return Deferred.fromCoroutine(self._verify_after_key(token, algorithm))
        try:
            return succeed(self._verify(token, algorithm))
        except Exception as e:
            return fail(e)

    async def _verify_after_key(self, token: str, algorithm: str) -> Identity:
        await self._load_key()
        if self._public_key is None:
            raise Unavailable("the gateway cannot load its JWT public key; see its log")
        return self._verify(token, algorithm)

    def _verify(self, token: str, algorithm: str) -> Identity:
        """
        @raise Unauthorized: the token fails a check; the message says which.
        """
        if algorithm not in self._algorithms:
            raise Unauthorized(f"the token's algorithm {algorithm[:16]!r} is not accepted")
        key = self._secret if algorithm in HMAC_ALGORITHMS else self._public_key
        options = {
            # Time is checked below, on the gateway's clock.
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": bool(self._audience),
            "verify_iss": bool(self._issuer),
            "require": ["exp"],
        }
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience or None,
                issuer=self._issuer or None,
                options=options,  # type: ignore[arg-type]
            )
        except jwt.InvalidSignatureError:
            raise Unauthorized("the token's signature is not valid") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized("the token's audience (aud) is not accepted") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("the token's issuer (iss) is not accepted") from None
        except jwt.MissingRequiredClaimError as e:
            raise Unauthorized(f"the token has no '{e.claim}' claim") from None
        except jwt.PyJWTError as e:
            raise Unauthorized(f"the token is not a valid JWT ({type(e).__name__})") from None
        self._check_times(claims)
        username = _claim(claims, self._username_claim)
        if not isinstance(username, str) or not username:
            raise Unauthorized(f"the token has no '{self._username_claim}' claim naming the user")
        if not valid_username(username):
            raise Unauthorized("the token names an unusable user name")
        groups = _claim_groups(_claim(claims, self._groups_claim)) if self._groups_claim else frozenset()
        if groups is None:
            raise Unauthorized(f"the token's '{self._groups_claim}' claim is not a list of group names")
        return Identity(username=username, groups=groups, authenticated=True, method=self.name)

    def _check_times(self, claims: dict[str, Any]) -> None:
        now = self._clock.seconds()
        for name in ("exp", "nbf"):
            value = claims.get(name)
            if name in claims and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise Unauthorized(f"the token's '{name}' claim is not a time")
        if now > claims["exp"] + self._leeway:
            raise Unauthorized("the token has expired")
        if "nbf" in claims and now < claims["nbf"] - self._leeway:
            raise Unauthorized("the token is not valid yet (nbf)")
