"""
Authentication: each authenticator on its own, several in order, the 401s
and 429s every route gives, the audit trail, and the user a kernel is
launched for.

Everything runs on a Clock with synchronous file reads; the REST layer is
driven through StubTreq.  test_jupyterhub checks the JupyterHub
authenticator against a real Hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from typing import Any, Callable

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from klein import Klein
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogPublisher, formatEvent, globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from egateway.api.cors import CorsPolicy
from egateway.api.authenticators import build_authentication, enabled_authenticators
from egateway.api.authenticators.chain import NO_CREDENTIALS, AuthenticatorChain
from egateway.api.authenticators.interface import IAuthenticator
from egateway.api.authenticators.jupyterhub import JupyterHubAuthenticator
from egateway.api.authenticators.jwt_bearer import JWTAuthenticator
from egateway.api.authenticators.limiter import FailureLimiter
from egateway.api.authenticators.shared_token import SharedTokenAuthenticator
from egateway.api.authenticators.trusted_proxy import (
    ProxyNetworks,
    TrustedProxyAuthenticator,
    parse_networks,
)
from egateway.api.authenticators.user_tokens import UserTokensAuthenticator, new_entry, token_hash
from egateway.api.http import FrontResource
from egateway.api.identity import ANONYMOUS, Identity, launch_username, valid_username
from egateway.config import ConfigError
from egateway.errors import Forbidden, Unauthorized, Unavailable
from egateway.ops import audit
from egateway.ops.audit import AUDIT_NAMESPACE, AuditFile, is_audit_event
from egateway.tap import build_api
from egateway.validation import load_config
from tests.support.fakes import make_manager
from tests.support.stubapi import assert_json_error, json_body, stub_call
from tests.test_api import ROUTES

NOW = 1_700_000_000.0
SECRET = "a-jwt-secret-that-is-long-enough-0123456789"
SHARED = "shared-t0ken-Zq81"
ALICE_TOKEN = "alice-t0ken-Xk2m"
BOB_TOKEN = "bob-t0ken-Wd7p"

_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_OTHER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PUBLIC_PEM = _RSA.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def run_now(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """
    Blocking calls, run at once (tests only: the files are tiny and local).
    """
    return maybeDeferred(f, *args)


def request(
    headers: dict[str, str] | None = None,
    args: dict[str, str] | None = None,
    client: str = "203.0.113.9",
    path: bytes = b"/api",
) -> DummyRequest:
    r = DummyRequest([])
    r.path = path
    r.method = b"GET"
    r.client = IPv4Address("TCP", client, 40000)
    for name, value in (headers or {}).items():
        r.requestHeaders.setRawHeaders(name.encode(), [value.encode()])
    for name, value in (args or {}).items():
        r.args[name.encode()] = [value.encode()]
    return r


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def token_file(path: str, entries: dict[str, dict[str, Any]]) -> None:
    """
    Write a user token file (TOML) for C{{token: entry}}.
    """
    lines = []
    for token, entry in entries.items():
        lines.append(f"[{token_hash(token)}]")
        for key, value in entry.items():
            lines.append(f"{key} = {json.dumps(value)}")
    with open(path + ".new", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".new", path)


class AuditCapture:
    """
    Every log event published while it is installed.
    """

    def __init__(self, test: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def audit(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [
            dict(e["audit_fields"], kind=e["audit_kind"])
            for e in self.events
            if is_audit_event(e) and (kind is None or e["audit_kind"] == kind)
        ]

    def text(self) -> str:
        """
        Everything the log would show: each event formatted, and its raw
        fields (a JSON observer writes those too).
        """
        return "\n".join(formatEvent(e) + " " + repr(sorted(e.items(), key=str)) for e in self.events)


# -- identity --------------------------------------------------------------


class IdentityTests(SynchronousTestCase):
    def test_verified_user_launches_as_themself(self) -> None:
        """
        A verified user's kernels are theirs: a matching or absent
        KERNEL_USERNAME is fine, another user's name is refused.
        """
        alice = Identity("alice", authenticated=True, method="jwt")
        self.assertEqual(launch_username(alice, {}), "alice")
        self.assertEqual(launch_username(alice, None), "alice")
        self.assertEqual(launch_username(alice, {"KERNEL_USERNAME": "alice"}), "alice")
        with self.assertRaises(Forbidden) as caught:
            launch_username(alice, {"KERNEL_USERNAME": "bob"})
        self.assertIn("does not match", str(caught.exception))

    def test_who_may_assert_kernel_username(self) -> None:
        """
        A trusted front end and an unauthenticated gateway's clients may name
        the user; another caller without a user may not.
        """
        proxy = Identity("", authenticated=True, method="trusted-proxy", trusted_proxy=True)
        self.assertEqual(launch_username(proxy, {"KERNEL_USERNAME": "carol"}), "carol")
        self.assertEqual(launch_username(ANONYMOUS, {"KERNEL_USERNAME": "carol"}), "carol")
        self.assertIsNone(launch_username(ANONYMOUS, {}))
        untrusted = Identity("", authenticated=True, method="token", trusted_proxy=False)
        self.assertIsNone(launch_username(untrusted, {}))
        self.assertRaises(Forbidden, launch_username, untrusted, {"KERNEL_USERNAME": "carol"})

    def test_usable_user_names(self) -> None:
        """
        User names that could break out of a path or an argument are not
        usable.
        """
        for good in ("alice", "alice@example.org", "a.b-c_d", "Ünïcode"):
            self.assertTrue(valid_username(good), good)
        for bad in ("", "-rf", "a b", "a/b", "..\\x", "a:b", "a\nb", "x" * 256, None, 5):
            self.assertFalse(valid_username(bad), bad)


# -- shared token and trusted proxies ---------------------------------------


class SharedTokenTests(SynchronousTestCase):
    def test_accepts_the_token_in_every_place(self) -> None:
        """
        The shared token is accepted as 'token', as 'Bearer' and as ?token=;
        its holders may name the user unless trusted proxies narrow that.
        """
        auth = SharedTokenAuthenticator(SHARED)
        for r in (
            request({"Authorization": f"token {SHARED}"}),
            request(bearer(SHARED)),
            request(args={"token": SHARED}),
        ):
            identity = self.successResultOf(auth.authenticate(r))
            self.assertEqual((identity.username, identity.method, identity.trusted_proxy), ("", "token", True))
        narrowed = self.successResultOf(SharedTokenAuthenticator(SHARED, asserts_user=False).authenticate(request(bearer(SHARED))))
        self.assertFalse(narrowed.trusted_proxy)

    def test_other_tokens_are_not_its(self) -> None:
        """
        A wrong token, a prefix of the right one, or none, is "not mine".
        """
        auth = SharedTokenAuthenticator(SHARED)
        for r in (request(bearer("wrong")), request(bearer(SHARED[:-1])), request(), request({"Authorization": "Basic eDp5"})):
            self.assertIsNone(self.successResultOf(auth.authenticate(r)))


class TrustedProxyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.networks = ProxyNetworks(parse_networks(["10.1.0.0/16", "2001:db8::/32"]))
        self.auth = TrustedProxyAuthenticator(self.networks, SHARED, "X-Forwarded-User")

    def test_from_its_network(self) -> None:
        """
        A proxy in a trusted network with the shared token names the user in
        its header, or leaves it to KERNEL_USERNAME.
        """
        identity = self.successResultOf(
            self.auth.authenticate(request({**bearer(SHARED), "X-Forwarded-User": "dana"}, client="10.1.2.3"))
        )
        self.assertEqual((identity.username, identity.trusted_proxy, identity.method), ("dana", True, "trusted-proxy"))
        identity = self.successResultOf(self.auth.authenticate(request(bearer(SHARED), client="10.1.200.1")))
        self.assertEqual((identity.username, identity.trusted_proxy), ("", True))

    def test_only_from_its_network(self) -> None:
        """
        The same request from outside the trusted networks, or without the
        shared token, is not the proxy's.
        """
        headers = {**bearer(SHARED), "X-Forwarded-User": "dana"}
        self.assertIsNone(self.successResultOf(self.auth.authenticate(request(headers, client="10.2.0.1"))))
        self.assertIsNone(self.successResultOf(self.auth.authenticate(request(headers, client="127.0.0.1"))))
        self.assertIsNone(
            self.successResultOf(
                self.auth.authenticate(request({"X-Forwarded-User": "dana"}, client="10.1.2.3"))
            )
        )

    def test_bad_user_header(self) -> None:
        """
        A proxy naming an unusable user is refused.
        """
        self.failureResultOf(
            self.auth.authenticate(request({**bearer(SHARED), "X-Forwarded-User": "../root"}, client="10.1.2.3")),
            Unauthorized,
        )

    def test_client_behind_proxy(self) -> None:
        """
        Behind a trusted proxy the client is the first untrusted hop of
        X-Forwarded-For; from anyone else the header is ignored.
        """
        via_proxy = request({"X-Forwarded-For": "198.51.100.7, 10.1.9.9"}, client="10.1.2.3")
        self.assertEqual(self.networks.client_of(via_proxy), "198.51.100.7")
        spoofed = request({"X-Forwarded-For": "198.51.100.7"}, client="192.0.2.1")
        self.assertEqual(self.networks.client_of(spoofed), "192.0.2.1")


# -- per-user token file --------------------------------------------------


class UserTokenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "tokens.toml")
        token_file(self.path, {ALICE_TOKEN: {"username": "alice", "groups": ["physics"], "admin": True}})
        self.auth = UserTokensAuthenticator(self.path, clock=self.clock, blocking=run_now, poll_interval=5)

    def identify(self, token: str) -> Identity | None:
        return self.successResultOf(self.auth.authenticate(request(bearer(token))))

    def test_tokens_identify_their_users(self) -> None:
        """
        A listed token identifies its user with groups and admin flag; any
        other token is not this authenticator's.
        """
        identity = self.identify(ALICE_TOKEN)
        assert identity is not None
        self.assertEqual(
            (identity.username, identity.groups, identity.admin, identity.method),
            ("alice", frozenset({"physics"}), True, "user-tokens"),
        )
        self.assertIsNone(self.identify(BOB_TOKEN))
        self.assertIsNone(self.successResultOf(self.auth.authenticate(request())))

    def test_file_holds_no_token(self) -> None:
        """
        The file holds hashes: neither the tokens nor a made entry contain
        a token.
        """
        with open(self.path) as f:
            self.assertNotIn(ALICE_TOKEN, f.read())
        token, entry = new_entry("erin", ["g"], False)
        self.assertNotIn(token, entry)
        self.assertIn(hashlib.sha256(token.encode()).hexdigest(), entry)

    def test_reloaded_when_changed(self) -> None:
        """
        Once the watcher runs after the file changed, new tokens work and
        removed ones do not; a broken file leaves the last good table.
        """
        self.auth.startService()
        self.addCleanup(self.auth.stopService)
        self.assertIsNotNone(self.identify(ALICE_TOKEN))
        token_file(self.path, {BOB_TOKEN: {"username": "bob"}})
        self.assertIsNotNone(self.identify(ALICE_TOKEN))
        self.clock.advance(5)
        self.assertIsNone(self.identify(ALICE_TOKEN))
        identity = self.identify(BOB_TOKEN)
        assert identity is not None
        self.assertEqual((identity.username, identity.groups, identity.admin), ("bob", frozenset(), False))
        with open(self.path, "w") as f:
            f.write("[not-a-hash]\nusername = 'x'\n")
        self.clock.advance(5)
        self.assertIsNotNone(self.identify(BOB_TOKEN))

    def test_json_format_and_errors(self) -> None:
        """
        A .json file works too; malformed entries are refused with the
        reason.
        """
        from egateway.api.authenticators.user_tokens import TokenFileError, parse_token_file

        identities = parse_token_file(
            json.dumps({token_hash(BOB_TOKEN): {"username": "bob", "groups": ["a"]}}).encode(), True
        )
        self.assertEqual(identities[token_hash(BOB_TOKEN)].username, "bob")
        digest = token_hash(BOB_TOKEN)
        for text, expected in (
            ('[abc]\nusername = "x"\n', "SHA-256"),
            (f'[{digest}]\nusername = "a b"\n', "username"),
            (f'[{digest}]\nusername = "x"\ngroups = "g"\n', "groups"),
            (f'[{digest}]\nusername = "x"\nrole = "admin"\n', "unknown field"),
            ("not toml [", "TOML"),
        ):
            with self.assertRaises(TokenFileError) as caught:
                parse_token_file(text.encode(), False)
            self.assertIn(expected, str(caught.exception))

    def test_missing_file_accepts_nothing(self) -> None:
        """
        Without its file no user token is accepted, and the file appearing
        later is picked up.
        """
        os.remove(self.path)
        self.auth.startService()
        self.addCleanup(self.auth.stopService)
        self.assertIsNone(self.identify(ALICE_TOKEN))
        token_file(self.path, {ALICE_TOKEN: {"username": "alice"}})
        self.clock.advance(5)
        self.assertIsNotNone(self.identify(ALICE_TOKEN))


# -- JWT -------------------------------------------------------------------


def make_jwt(key: Any = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    payload = {"sub": "alice", "exp": NOW + 300, "groups": ["physics"], **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key, algorithm=algorithm)


class JWTTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        directory = self.mktemp()
        os.makedirs(directory)
        self.key_file = os.path.join(directory, "public.pem")
        with open(self.key_file, "wb") as f:
            f.write(RSA_PUBLIC_PEM)

    def authenticator(self, **settings: Any) -> JWTAuthenticator:
        options: dict[str, Any] = dict(
            clock=self.clock, blocking=run_now, secret=SECRET, public_key_file=self.key_file, leeway=30
        )
        options.update(settings)
        return JWTAuthenticator(**options)

    def identify(self, token: str, **settings: Any) -> Identity | None:
        return self.successResultOf(self.authenticator(**settings).authenticate(request(bearer(token))))

    def refused(self, token: str, reason: str, **settings: Any) -> None:
        failure = self.failureResultOf(self.authenticator(**settings).authenticate(request(bearer(token))), Unauthorized)
        self.assertIn(reason, str(failure.value))

    def test_hs256_and_rs256(self) -> None:
        """
        Tokens signed with the secret (HS256) or the private key (RS256)
        identify the user and groups from the configured claims.
        """
        for token in (make_jwt(), make_jwt(_RSA, "RS256")):
            identity = self.identify(token)
            assert identity is not None
            self.assertEqual(
                (identity.username, identity.groups, identity.method), ("alice", frozenset({"physics"}), "jwt")
            )
        nested = make_jwt(preferred_username="zoe", realm={"roles": ["ops", "dev"]})
        identity = self.identify(nested, username_claim="preferred_username", groups_claim="realm.roles")
        assert identity is not None
        self.assertEqual((identity.username, identity.groups), ("zoe", frozenset({"ops", "dev"})))

    def test_tampered(self) -> None:
        """
        A token whose payload or signature was altered, or that was signed
        with another key, is refused for its signature.
        """
        header, payload, signature = make_jwt().split(".")
        forged_payload = jwt.utils.base64url_encode(
            json.dumps({"sub": "root", "exp": NOW + 300}).encode()
        ).decode()
        self.refused(f"{header}.{forged_payload}.{signature}", "signature")
        self.refused(f"{header}.{payload}.{signature[:-4]}AAAA", "signature")
        self.refused(make_jwt("another-secret-that-is-also-long-enough-xx"), "signature")
        self.refused(make_jwt(_OTHER_RSA, "RS256"), "signature")

    def test_expired_and_not_yet_valid(self) -> None:
        """
        exp and nbf are enforced on the gateway's clock, with the leeway.
        """
        self.refused(make_jwt(exp=NOW - 31), "expired")
        self.assertIsNotNone(self.identify(make_jwt(exp=NOW - 29)))
        self.refused(make_jwt(nbf=NOW + 60), "not valid yet")
        self.assertIsNotNone(self.identify(make_jwt(nbf=NOW + 20)))
        token = make_jwt(exp=NOW + 100)
        auth = self.authenticator()
        self.assertIsNotNone(self.successResultOf(auth.authenticate(request(bearer(token)))))
        self.clock.advance(131)
        self.failureResultOf(auth.authenticate(request(bearer(token))), Unauthorized)
        self.refused(make_jwt(exp=None), "'exp'")

    def test_audience_and_issuer(self) -> None:
        """
        With an audience and issuer configured, tokens for another audience
        or from another issuer are refused.
        """
        settings = {"audience": "egateway", "issuer": "https://idp.example"}
        self.assertIsNotNone(self.identify(make_jwt(aud="egateway", iss="https://idp.example"), **settings))
        self.refused(make_jwt(aud="other-service", iss="https://idp.example"), "audience", **settings)
        self.refused(make_jwt(iss="https://idp.example"), "aud", **settings)
        self.refused(make_jwt(aud="egateway", iss="https://evil.example"), "issuer", **settings)

    def test_algorithms(self) -> None:
        """
        Only configured algorithms with a key are accepted: not 'none', not
        HS256 when only RS256 is configured, and the public key is never an
        HMAC secret.
        """
        unsigned = jwt.encode({"sub": "alice", "exp": NOW + 300}, None, algorithm="none")
        self.refused(unsigned, "algorithm")
        self.refused(make_jwt(), "algorithm", algorithms=["RS256"])
        # The classic confusion: HMAC keyed with the (public) RSA key.
        import hmac as hmac_module

        header = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        body = jwt.utils.base64url_encode(json.dumps({"sub": "root", "exp": NOW + 300}).encode())
        mac = hmac_module.new(RSA_PUBLIC_PEM, header + b"." + body, hashlib.sha256).digest()
        confused = (header + b"." + body + b"." + jwt.utils.base64url_encode(mac)).decode()
        self.refused(confused, "signature")
        self.refused(confused, "algorithm", algorithms=["RS256"])

    def test_not_a_jwt(self) -> None:
        """
        Tokens that are not JWTs are left to other authenticators.
        """
        for token in ("plain-token", "a.b.c", SHARED):
            self.assertIsNone(self.identify(token))

    def test_claims_checked(self) -> None:
        """
        A token without a usable username or with malformed groups is
        refused.
        """
        self.refused(make_jwt(sub=None), "'sub'")
        self.refused(make_jwt(sub="../etc"), "unusable")
        self.refused(make_jwt(groups={"a": 1}), "groups")

    def test_unreadable_public_key(self) -> None:
        """
        RS256 tokens cannot be checked without the key: 503, not 401.
        """
        auth = self.authenticator(public_key_file=self.key_file + ".missing")
        self.failureResultOf(auth.authenticate(request(bearer(make_jwt(_RSA, "RS256")))), Unavailable)
        self.assertIsNotNone(self.successResultOf(auth.authenticate(request(bearer(make_jwt())))))


# -- JupyterHub (a stand-in Hub; test_jupyterhub uses a real one) -------------


class FakeHub:
    """
    C{GET /hub/api/user} as JupyterHub answers it.
    """

    def __init__(self) -> None:
        self.users = {"hub-token-1": {"kind": "user", "name": "hubuser", "groups": ["g1"], "admin": False}}
        self.calls = 0
        self.status: int | None = None
        app = Klein()

        @app.route("/hub/api/user")
        def user(request: Any) -> bytes:
            self.calls += 1
            if self.status is not None:
                request.setResponseCode(self.status)
                return b"{}"
            header = (request.getHeader(b"authorization") or b"").decode()
            model = self.users.get(header.partition(" ")[2])
            if model is None:
                request.setResponseCode(403)
                return b'{"status": 403}'
            return json.dumps(model).encode()

        self.stub = StubTreq(app.resource())


class JupyterHubTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.hub = FakeHub()
        self.auth = JupyterHubAuthenticator(
            "http://hub.example/hub/api/", clock=self.clock, http=self.hub.stub, reactor=self.clock, cache_ttl=10
        )

    def identify(self, token: str) -> Deferred[Identity | None]:
        d = self.auth.authenticate(request(bearer(token)))
        self.hub.stub.flush()
        return d

    def test_token_of_a_user(self) -> None:
        """
        The Hub's answer gives the username and groups; an unknown token is
        not this authenticator's.
        """
        identity = self.successResultOf(self.identify("hub-token-1"))
        self.assertEqual(
            (identity.username, identity.groups, identity.method), ("hubuser", frozenset({"g1"}), "jupyterhub")
        )
        self.assertIsNone(self.successResultOf(self.identify("nope")))

    def test_revocation_after_cache_ttl(self) -> None:
        """
        Answers are cached: a token revoked at the Hub still works until its
        entry expires, and is refused after.
        """
        self.assertIsNotNone(self.successResultOf(self.identify("hub-token-1")))
        del self.hub.users["hub-token-1"]
        self.clock.advance(9)
        self.assertIsNotNone(self.successResultOf(self.identify("hub-token-1")))
        self.assertEqual(self.hub.calls, 1)
        self.clock.advance(2)
        self.assertIsNone(self.successResultOf(self.identify("hub-token-1")))
        self.assertEqual(self.hub.calls, 2)

    def test_hub_errors(self) -> None:
        """
        A Hub error is a 503 (not the client's fault, not cached); a
        service's token is not a user.
        """
        self.hub.status = 500
        self.failureResultOf(self.identify("hub-token-1"), Unavailable)
        self.hub.status = None
        self.assertIsNotNone(self.successResultOf(self.identify("hub-token-1")))
        self.hub.users["svc"] = {"kind": "service", "name": "announcer"}
        self.assertIsNone(self.successResultOf(self.identify("svc")))

    def test_scope_required(self) -> None:
        """
        With a scope configured, only tokens the Hub says hold it (or its
        unfiltered form) are accepted; another token of the same user, or
        an answer without scopes (a Hub before 2.0), is refused.
        """
        self.auth = JupyterHubAuthenticator(
            "http://hub.example/hub/api/", clock=self.clock, http=self.hub.stub, reactor=self.clock,
            scope="access:services!service=egateway",
        )
        user = {"kind": "user", "name": "hubuser", "groups": []}
        self.hub.users.update(
            {
                "for-gateway": {**user, "scopes": ["access:services!service=egateway", "read:users!user=hubuser"]},
                "for-all-services": {**user, "scopes": ["access:services"]},
                "for-another-service": {**user, "scopes": ["access:services!service=grader"]},
                "for-servers": {**user, "scopes": ["access:servers!user=hubuser", "read:users!user=hubuser"]},
            }
        )
        for token in ("for-gateway", "for-all-services"):
            self.assertEqual(self.successResultOf(self.identify(token)).username, "hubuser")
        for token in ("for-another-service", "for-servers", "hub-token-1"):
            failure = self.failureResultOf(self.identify(token), Unauthorized)
            self.assertIn("scope access:services!service=egateway", str(failure.value))


class CredentialRecheckTests(SynchronousTestCase):
    """
    Credentials an open WebSocket was accepted with are checked again: a
    user token file reload and, every recheck interval, JupyterHub tokens
    are announced to the chain's listeners, and the chain says what each
    credential gives now.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.changes = 0

    def start(self, authenticator: Any) -> AuthenticatorChain:
        chain = AuthenticatorChain([authenticator], clock=self.clock, admin_users=["hubuser"])

        def changed() -> None:
            self.changes += 1

        chain.on_change.append(changed)
        chain.startService()
        self.addCleanup(chain.stopService)
        return chain

    def test_jupyterhub_token_revoked(self) -> None:
        """
        Every recheck interval (60 s) the chain asks for a recheck; a token the
        Hub revoked then gives no identity, one it still accepts gives the
        user with admin_users applied.
        """
        hub = FakeHub()
        auth = JupyterHubAuthenticator("http://hub.example/hub/api", clock=self.clock, http=hub.stub, reactor=self.clock)
        chain = self.start(auth)
        identity = Identity("hubuser", authenticated=True, method="jupyterhub")
        self.clock.advance(59)
        self.assertEqual(self.changes, 0)
        self.clock.advance(1)
        self.assertEqual(self.changes, 1)
        d = chain.recheck(identity, "hub-token-1")
        hub.stub.flush()
        now = self.successResultOf(d)
        self.assertEqual((now.username, now.admin), ("hubuser", True))
        del hub.users["hub-token-1"]
        self.clock.advance(60)
        self.assertEqual(self.changes, 2)
        d = chain.recheck(identity, "hub-token-1")
        hub.stub.flush()
        self.assertIsNone(self.successResultOf(d))

    def test_user_token_removed(self) -> None:
        """
        A reloaded token file is announced; a removed token gives no
        identity, a kept one its new groups; credentials no authenticator
        can recheck (the shared token) stand as they were.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "tokens.toml")
        token_file(path, {ALICE_TOKEN: {"username": "alice"}, BOB_TOKEN: {"username": "bob"}})
        chain = self.start(UserTokensAuthenticator(path, clock=self.clock, blocking=run_now))
        self.assertEqual(self.changes, 1)
        alice = Identity("alice", authenticated=True, method="user-tokens")
        self.assertEqual(self.successResultOf(chain.recheck(alice, ALICE_TOKEN)).groups, frozenset())
        token_file(path, {ALICE_TOKEN: {"username": "alice", "groups": ["physics"]}})
        self.clock.advance(5)
        self.assertEqual(self.changes, 2)
        self.assertEqual(self.successResultOf(chain.recheck(alice, ALICE_TOKEN)).groups, frozenset({"physics"}))
        self.assertIsNone(self.successResultOf(chain.recheck(alice, BOB_TOKEN)))
        shared = Identity("", authenticated=True, method="token")
        self.assertIs(self.successResultOf(chain.recheck(shared, "whatever")), shared)


# -- the chain --------------------------------------------------------------


@implementer(IAuthenticator)
class Scripted:
    """
    An authenticator that answers what it is told, and counts questions.
    """

    def __init__(self, name: str, answer: Any) -> None:
        self.name = name
        self.answer = answer
        self.asked = 0

    def authenticate(self, request: Any) -> Deferred[Identity | None]:
        self.asked += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        if isinstance(self.answer, Deferred):
            return self.answer
        return succeed(self.answer)


class ChainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.log = AuditCapture(self)

    def chain(self, *authenticators: Any, **options: Any) -> AuthenticatorChain:
        return AuthenticatorChain(list(authenticators), clock=self.clock, **options)

    def test_asked_in_order(self) -> None:
        """
        "Not mine" asks the next; the first identity wins and later
        authenticators are not asked.
        """
        first = Scripted("first", None)
        second = Scripted("second", Identity("bob", authenticated=True, method="second"))
        third = Scripted("third", Identity("eve", authenticated=True, method="third"))
        identity = self.successResultOf(self.chain(first, second, third).authenticate(request(bearer("x"))))
        self.assertEqual(identity.username, "bob")
        self.assertEqual((first.asked, second.asked, third.asked), (1, 1, 0))

    def test_mine_and_wrong_stops(self) -> None:
        """
        "Mine, and wrong" refuses at once; later authenticators are not asked.
        """
        first = Scripted("jwt", Unauthorized("the token has expired"))
        second = Scripted("token", Identity("", authenticated=True))
        failure = self.failureResultOf(self.chain(first, second).authenticate(request(bearer("x"))), Unauthorized)
        self.assertIn("expired", str(failure.value))
        self.assertEqual(second.asked, 0)
        [event] = self.log.audit("auth.failure")
        self.assertEqual((event["method"], event["reason"], event["address"]), ("jwt", "the token has expired", "203.0.113.9"))

    def test_nobody_claims(self) -> None:
        """
        Without credentials the 401 says how to send them; with unknown
        credentials it says they are not valid.
        """
        chain = self.chain(Scripted("token", None))
        failure = self.failureResultOf(chain.authenticate(request()), Unauthorized)
        self.assertEqual(str(failure.value), NO_CREDENTIALS)
        failure = self.failureResultOf(chain.authenticate(request(bearer("guess"))), Unauthorized)
        self.assertIn("not valid", str(failure.value))

    def test_no_authenticators_means_anonymous(self) -> None:
        """
        With nothing configured, every caller is anonymous, as before.
        """
        self.assertIs(self.successResultOf(self.chain().authenticate(request())), ANONYMOUS)
        self.assertEqual(enabled_authenticators(load_config({}, {}, {}).auth), [])

    def test_admins(self) -> None:
        """
        admin_users and admin_groups make administrators.
        """
        chain = self.chain(
            Scripted("a", Identity("root-ish", groups=frozenset({"ops"}), authenticated=True)),
            admin_groups=["ops"],
        )
        self.assertTrue(self.successResultOf(chain.authenticate(request(bearer("x")))).admin)
        chain = self.chain(Scripted("a", Identity("alice", authenticated=True)), admin_users=["alice"])
        self.assertTrue(self.successResultOf(chain.authenticate(request(bearer("x")))).admin)
        chain = self.chain(Scripted("a", Identity("bob", authenticated=True)), admin_users=["alice"])
        self.assertFalse(self.successResultOf(chain.authenticate(request(bearer("x")))).admin)

    def test_waits_for_a_slow_authenticator(self) -> None:
        """
        The chain's answer waits for an authenticator that asks the network.
        """
        pending: Deferred[Identity | None] = Deferred()
        d = self.chain(Scripted("hub", pending)).authenticate(request(bearer("x")))
        self.assertNoResult(d)
        pending.callback(Identity("hubuser", authenticated=True, method="hub"))
        self.assertEqual(self.successResultOf(d).username, "hubuser")

    def test_default_order(self) -> None:
        """
        Left empty, the authenticators are those configured, proxies first
        and the network-bound JupyterHub last; listed, exactly those.
        """
        config = load_config(
            {},
            {},
            {
                "auth-token": SHARED,
                "trusted-proxies": "10.0.0.0/8",
                "jwt-secret": SECRET,
                "jwt-audience": "egateway",
                "jupyterhub-api-url": "http://hub:8081/hub/api",
                "user-tokens-file": "/nonexistent",
            },
        )
        self.assertEqual(
            enabled_authenticators(config.auth), ["trusted-proxy", "token", "user-tokens", "jwt", "jupyterhub"]
        )
        config = load_config(
            {}, {}, {"auth-token": SHARED, "jwt-secret": SECRET, "jwt-audience": "eg", "authenticators": "jwt,token"}
        )
        self.assertEqual(enabled_authenticators(config.auth), ["jwt", "token"])


class LimiterTests(SynchronousTestCase):
    def test_window(self) -> None:
        """
        After the limit of failures an address waits until the oldest ages
        out of the window; other addresses are unaffected.
        """
        clock = Clock()
        limiter = FailureLimiter(clock, 3, 60)
        for _ in range(3):
            self.assertEqual(limiter.retry_after("a"), 0)
            limiter.failed("a")
            clock.advance(1)
        self.assertEqual(limiter.retry_after("a"), 57)
        self.assertEqual(limiter.retry_after("b"), 0)
        clock.advance(57)
        self.assertEqual(limiter.retry_after("a"), 0)
        self.assertEqual(limiter.tracked(), 1)
        clock.advance(60)
        self.assertEqual(limiter.retry_after("a"), 0)
        self.assertEqual(limiter.tracked(), 0)

    def test_bounded_memory(self) -> None:
        """
        A flood of addresses never tracks more than the bound.
        """
        limiter = FailureLimiter(Clock(), 5, 60, max_addresses=100)
        for n in range(1000):
            limiter.failed(f"10.0.{n // 256}.{n % 256}")
        self.assertLessEqual(limiter.tracked(), 100)


# -- through the HTTP front ---------------------------------------------------


class FrontTestCase(SynchronousTestCase):
    """
    The routes behind the front resource with the configured
    authenticators, on a Clock, with synchronous file reads.
    """

    flags: dict[str, str] = {}

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.tokens_path = os.path.join(directory, "tokens.toml")
        token_file(
            self.tokens_path,
            {
                ALICE_TOKEN: {"username": "alice", "groups": ["physics"]},
                BOB_TOKEN: {"username": "bob"},
            },
        )
        flags = {k: v.replace("{tokens}", self.tokens_path) for k, v in self.flags.items()}
        self.config = load_config({}, {}, flags)
        self.manager, self.launcher, _ = make_manager(self.clock)
        self.api, _ = build_api(self.config, self.manager, self.clock, ThreadPool())
        self.authentication = build_authentication(self.config.auth, self.clock, None, blocking=run_now)
        self.front = FrontResource(self.api.resource(), self.authentication, CorsPolicy(self.config.auth))
        self.stub = StubTreq(self.front)
        self.log = AuditCapture(self)

    def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, Any]:
        return stub_call(self, self.stub, self.clock, method, path, json_body(body), headers)

    def assertRefused(self, result: tuple[int, Any, Any], status: int, text: str = "") -> None:
        assert_json_error(self, result, status, text)


class EveryRouteRefuses(FrontTestCase):
    flags = {
        "auth-token": SHARED,
        "user-tokens-file": "{tokens}",
        "jwt-secret": SECRET,
        "jwt-audience": "egateway",
        "list-kernels": "true",
        "auth-failure-limit": "0",
    }

    def test_each_failure_on_every_route(self) -> None:
        """
        Every route, unknown ones included, answers JSON 401 with
        WWW-Authenticate for missing, wrong, tampered, expired, wrong-audience
        and not-yet-valid credentials, and starts nothing.
        """
        header, _, signature = make_jwt(aud="egateway").split(".")
        forged = jwt.utils.base64url_encode(
            json.dumps({"sub": "root", "aud": "egateway", "exp": NOW + 300}).encode()
        ).decode()
        failures = {
            "no credentials": ({}, "token"),
            "wrong token": (bearer("wrong-token"), "not valid"),
            "wrong query token": ({}, "not valid"),
            "tampered JWT": (bearer(f"{header}.{forged}.{signature}"), "signature"),
            "expired JWT": (bearer(make_jwt(aud="egateway", exp=NOW - 3600)), "expired"),
            "wrong-audience JWT": (bearer(make_jwt(aud="someone-else")), "audience"),
            "not-yet-valid JWT": (bearer(make_jwt(aud="egateway", nbf=NOW + 3600)), "not valid yet"),
        }
        for method, path in ROUTES:
            for what, (headers, text) in failures.items():
                query = "?token=wrong-token" if what == "wrong query token" else ""
                result = self.call(method, path + query, {}, headers=headers)
                self.assertRefused(result, 401, text)
                self.assertEqual(
                    result[2].getRawHeaders(b"www-authenticate"), [b'Bearer realm="egateway"'], (method, path, what)
                )
        self.assertEqual(self.launcher.processes, [])

    def test_each_authenticator_admits(self) -> None:
        """
        The shared token, a user token and a JWT are each accepted.
        """
        for headers in (bearer(SHARED), bearer(ALICE_TOKEN), bearer(make_jwt(aud="egateway"))):
            code, _, _ = self.call("GET", "/api/kernelspecs", headers=headers)
            self.assertEqual(code, 200, headers)


class KernelUsername(FrontTestCase):
    flags = {"auth-token": SHARED, "user-tokens-file": "{tokens}", "list-kernels": "true"}

    def test_mismatch_is_refused(self) -> None:
        """
        A verified user asking for a kernel as someone else gets 403 and no
        kernel; as themself (or without naming anyone) gets a kernel of
        theirs.
        """
        self.assertRefused(
            self.call("POST", "/api/kernels", {"env": {"KERNEL_USERNAME": "bob"}}, bearer(ALICE_TOKEN)),
            403,
            "does not match",
        )
        self.assertEqual(self.launcher.processes, [])
        for env in ({"KERNEL_USERNAME": "alice"}, {}):
            code, model, _ = self.call("POST", "/api/kernels", {"env": env}, bearer(ALICE_TOKEN))
            self.assertEqual((code, model["username"]), (201, "alice"))
            self.assertEqual(self.manager.kernels[model["id"]].env["KERNEL_USERNAME"], "alice")

    def test_sessions_too(self) -> None:
        """
        POST /api/sessions applies the same rule to its kernel's env.
        """
        body = {"path": "a.ipynb", "type": "notebook", "kernel": {"name": "fake", "env": {"KERNEL_USERNAME": "bob"}}}
        self.assertRefused(self.call("POST", "/api/sessions", body, bearer(ALICE_TOKEN)), 403, "does not match")
        body["kernel"]["env"] = {}
        code, session, _ = self.call("POST", "/api/sessions", body, bearer(ALICE_TOKEN))
        self.assertEqual((code, session["kernel"]["username"]), (201, "alice"))

    def test_shared_token_names_the_user(self) -> None:
        """
        Without trusted proxies, shared-token holders name the user as in
        Enterprise Gateway.
        """
        code, model, _ = self.call("POST", "/api/kernels", {"env": {"KERNEL_USERNAME": "carol"}}, bearer(SHARED))
        self.assertEqual((code, model["username"]), (201, "carol"))

    def test_refusal_audited(self) -> None:
        """
        The 403 is an audit event naming who, what and why.
        """
        self.call("POST", "/api/kernels", {"env": {"KERNEL_USERNAME": "bob"}}, bearer(ALICE_TOKEN))
        [event] = self.log.audit("request.refused")
        self.assertEqual((event["user"], event["action"], event["status"]), ("alice", "POST /api/kernels", 403))
        self.assertIn("does not match", event["reason"])


class TrustedFrontEnd(FrontTestCase):
    flags = {
        "auth-token": SHARED,
        "trusted-proxies": "127.0.0.0/8",
        "trusted-user-header": "X-Forwarded-User",
    }

    def test_proxy_names_the_user(self) -> None:
        """
        From the trusted network, the shared token's holder names the user in
        the header or in KERNEL_USERNAME.
        """
        code, model, _ = self.call("POST", "/api/kernels", {}, {**bearer(SHARED), "X-Forwarded-User": "dana"})
        self.assertEqual((code, model["username"]), (201, "dana"))
        code, model, _ = self.call("POST", "/api/kernels", {"env": {"KERNEL_USERNAME": "erin"}}, bearer(SHARED))
        self.assertEqual((code, model["username"]), (201, "erin"))
        self.assertRefused(
            self.call(
                "POST", "/api/kernels", {"env": {"KERNEL_USERNAME": "erin"}}, {**bearer(SHARED), "X-Forwarded-User": "dana"}
            ),
            403,
        )


class UntrustedAddress(FrontTestCase):
    # StubTreq's client is 127.0.0.1: outside this network.
    flags = {"auth-token": SHARED, "trusted-proxies": "10.0.0.0/8", "trusted-user-header": "X-Forwarded-User"}

    def test_outside_the_proxy_network(self) -> None:
        """
        From outside the trusted networks, the shared token still admits, but
        neither the header nor KERNEL_USERNAME names the user.
        """
        self.assertRefused(
            self.call("POST", "/api/kernels", {"env": {"KERNEL_USERNAME": "erin"}}, bearer(SHARED)),
            403,
            "trusted front end",
        )
        code, model, _ = self.call("POST", "/api/kernels", {}, {**bearer(SHARED), "X-Forwarded-User": "dana"})
        self.assertEqual((code, model["username"]), (201, "gatewayuser"))


class RateLimit(FrontTestCase):
    flags = {"user-tokens-file": "{tokens}", "auth-failure-limit": "3", "auth-failure-window": "60"}

    def test_limit_and_recovery(self) -> None:
        """
        After 3 failures of one token from an address, that token gets 429
        with Retry-After until the window has passed.
        """
        for _ in range(20):
            self.assertEqual(self.call("GET", "/api", headers=bearer(ALICE_TOKEN))[0], 200)
        for _ in range(3):
            self.assertRefused(self.call("GET", "/api", headers=bearer("guess")), 401)
        for _ in range(2):
            code, body, response_headers = self.call("GET", "/api", headers=bearer("guess"))
            self.assertRefused((code, body, response_headers), 429, "too many failed authentications")
            retry = int(response_headers.getRawHeaders(b"retry-after")[0])
            self.assertTrue(0 < retry <= 60, retry)
        self.clock.advance(retry)
        self.assertRefused(self.call("GET", "/api", headers=bearer("guess")), 401)
        [throttled, *_] = self.log.audit("auth.throttled")
        self.assertEqual(throttled["address"], "127.0.0.1")

    def test_others_failures_never_refuse_a_valid_token(self) -> None:
        """
        Clients sharing one address (a NAT, a proxy): one client's wrong
        tokens throttle those tokens only; the valid tokens of the others,
        and requests without credentials, are answered as usual.
        """
        for guess in ("guess-1", "guess-2"):
            for _ in range(3):
                self.call("GET", "/api", headers=bearer(guess))
            self.assertRefused(self.call("GET", "/api", headers=bearer(guess)), 429)
        self.assertEqual(self.call("GET", "/api", headers=bearer(ALICE_TOKEN))[0], 200)
        self.assertEqual(self.call("GET", "/api", headers=bearer(BOB_TOKEN))[0], 200)
        self.assertRefused(self.call("GET", "/api"), 401)
        self.assertRefused(self.call("GET", "/api", headers=bearer("guess-3")), 401)

    def test_missing_credentials_do_not_count(self) -> None:
        """
        Requests without credentials (probes, misconfigured clients) are 401s
        that never lock an address out.
        """
        for _ in range(10):
            self.assertRefused(self.call("GET", "/api"), 401)
        self.assertEqual(self.call("GET", "/api", headers=bearer(ALICE_TOKEN))[0], 200)


class SlowAuthentication(FrontTestCase):
    def test_route_waits(self) -> None:
        """
        A route runs only once authentication (here, a Hub not answering yet)
        has decided, and then answers normally.
        """
        pending: Deferred[Identity | None] = Deferred()
        hub = Scripted("jupyterhub", pending)
        self.front.authentication = AuthenticatorChain([hub], clock=self.clock)
        d = self.stub.request("POST", "http://gw.example/api/kernels", data=b"{}", headers=bearer("t"))
        self.stub.flush()
        self.assertNoResult(d)
        self.assertEqual(self.launcher.processes, [])
        pending.callback(Identity("hubuser", authenticated=True, method="jupyterhub"))
        self.stub.flush()
        self.clock.advance(0.1)
        self.stub.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 201)
        body = self.successResultOf(response.json())
        self.assertEqual(body["username"], "hubuser")


    def test_client_leaves_during_authentication(self) -> None:
        """
        A client that disconnects while its credentials are being checked
        cancels the check, and its request is never served.
        """
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure
        from twisted.web.server import NOT_DONE_YET

        cancelled: list[bool] = []
        pending: Deferred[Identity | None] = Deferred(lambda d: cancelled.append(True))
        self.front.authentication = AuthenticatorChain([Scripted("jupyterhub", pending)], clock=self.clock)
        r = request(bearer("t"), path=b"/api/kernels")
        r.method = b"POST"
        self.assertIs(self.front.render(r), NOT_DONE_YET)
        r.processingFailed(Failure(ConnectionDone()))
        self.assertEqual(cancelled, [True])
        self.assertEqual((r.written, r.finished), ([], 0))
        self.assertEqual(self.launcher.processes, [])


class Audit(FrontTestCase):
    # bob administers every kernel: only an admin (or the owner) may shut alice's down.
    flags = {
        "user-tokens-file": "{tokens}", "jwt-secret": SECRET, "jwt-any-audience": "true", "auth-failure-limit": "2",
        "list-kernels": "true",
        "admin-users": "bob",
    }

    def test_security_decisions_recorded(self) -> None:
        """
        Failures (with method, address, reason), throttling, successes,
        launches (user, spec, placement), connects and shutdowns (by whom)
        are audit events in their own namespace.
        """
        self.call("GET", "/api", headers=bearer(make_jwt(exp=NOW - 3600)))
        code, model, _ = self.call("POST", "/api/kernels", {}, bearer(ALICE_TOKEN))
        self.assertEqual(code, 201)
        request_ = DummyRequest([])
        request_.requestHeaders.setRawHeaders(b"upgrade", [b"websocket"])
        request_.uri = f"/api/kernels/{model['id']}/channels?session_id=s-1".encode()
        request_.args = {b"session_id": [b"s-1"]}
        request_.gateway_user = Identity("alice", authenticated=True, method="user-tokens")
        self.successResultOf(Deferred.fromCoroutine(self.api.kernel_channels(request_, model["id"])))
        self.call("DELETE", f"/api/kernels/{model['id']}", headers=bearer(BOB_TOKEN))
        self.call("GET", "/api", headers=bearer("guess"))
        self.call("GET", "/api", headers=bearer("guess"))
        self.call("GET", "/api", headers=bearer("guess"))

        [expired, guess, _] = self.log.audit("auth.failure")
        self.assertEqual(
            (expired["method"], expired["address"], expired["reason"]), ("jwt", "127.0.0.1", "the token has expired")
        )
        self.assertEqual(guess["reason"], "no authenticator accepted the token")
        self.assertEqual(
            {e["user"] for e in self.log.audit("auth.success")}, {"alice", "bob"}
        )
        [launch] = self.log.audit("kernel.launch")
        self.assertEqual((launch["user"], launch["spec"], launch["kernel_id"]), ("alice", "fake", model["id"]))
        self.assertEqual(launch["placement"]["host"], "fakehost")
        [connect] = self.log.audit("websocket.connect")
        self.assertEqual((connect["user"], connect["kernel_id"], connect["session"]), ("alice", model["id"], "s-1"))
        [shutdown] = self.log.audit("kernel.shutdown")
        self.assertEqual((shutdown["user"], shutdown["owner"], shutdown["kernel_id"]), ("bob", "alice", model["id"]))
        [removed] = self.log.audit("kernel.removed")
        self.assertEqual(removed["kernel_id"], model["id"])
        self.assertEqual(len(self.log.audit("auth.throttled")), 1)
        for event in self.log.events:
            if "audit_kind" in event:
                self.assertEqual(event["log_namespace"], AUDIT_NAMESPACE)



class NoTokenInLogs(FrontTestCase):
    flags = {"auth-token": SHARED, "user-tokens-file": "{tokens}", "jwt-secret": SECRET, "jwt-audience": "egateway"}

    def test_no_token_in_any_log_line(self) -> None:
        """
        Whatever happens, good, wrong, expired or forged, no token appears in
        any log event, formatted or raw.
        """
        good_jwt = make_jwt(aud="egateway")
        expired = make_jwt(aud="egateway", exp=NOW - 3600)
        forged = good_jwt[:-6] + "AAAAAA"
        other_audience = make_jwt(aud="another")
        tokens = [SHARED, ALICE_TOKEN, BOB_TOKEN, good_jwt, expired, forged, other_audience, "guess-Qv9z"]
        self.assertEqual(self.call("POST", "/api/kernels", {}, bearer(ALICE_TOKEN))[0], 201)
        self.assertEqual(self.call("GET", "/api", headers=bearer(good_jwt))[0], 200)
        self.assertEqual(self.call("GET", f"/api?token={BOB_TOKEN}")[0], 200)
        self.assertEqual(self.call("GET", "/api", headers={"Authorization": f"token {SHARED}"})[0], 200)
        for token in (expired, forged, other_audience, "guess-Qv9z", SHARED + "x"):
            self.assertEqual(self.call("GET", "/api/kernels", headers=bearer(token))[0], 401)
        audit.event("test.redaction", token=ALICE_TOKEN, authorization=f"Bearer {BOB_TOKEN}", note="ok")
        text = self.log.text()
        self.assertIn("auth.failure", text)
        self.assertIn("[redacted]", text)
        for token in tokens:
            self.assertNotIn(token, text)
            # Nor the part after the last dot, which identifies a JWT.
            self.assertNotIn(token.rsplit(".", 1)[-1], text)


class AuditFileTests(SynchronousTestCase):
    def test_json_lines(self) -> None:
        """
        Audit events (and nothing else) go to the file as JSON lines, mode
        0600, flushed on the clock and at stop.
        """
        clock = Clock()
        publisher = LogPublisher()
        path = os.path.abspath(self.mktemp())
        service = AuditFile(path, clock, publisher=publisher, flush_interval=1.0)
        service.startService()
        from twisted.logger import Logger

        Logger(namespace=AUDIT_NAMESPACE, observer=publisher).info(
            "audit {audit_kind}", audit_kind="auth.failure", audit_fields={"address": "192.0.2.1", "reason": "x"}
        )
        Logger(observer=publisher).info("an operational message")
        self.assertEqual(open(path).read(), "")
        clock.advance(1)
        [line] = open(path).read().splitlines()
        record = json.loads(line)
        self.assertEqual((record["kind"], record["address"], record["reason"]), ("auth.failure", "192.0.2.1", "x"))
        self.assertTrue(record["time"].endswith("Z"))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        Logger(namespace=AUDIT_NAMESPACE, observer=publisher).info(
            "audit {audit_kind}", audit_kind="kernel.launch", audit_fields={"user": "alice"}
        )
        service.stopService()
        self.assertEqual(len(open(path).read().splitlines()), 2)
        self.assertEqual(clock.getDelayedCalls(), [])


class ConfigTests(SynchronousTestCase):
    def test_refused_settings(self) -> None:
        """
        Authentication settings that cannot work stop start-up, naming the
        key.
        """
        for flags, text in (
            ({"authenticators": "kerberos"}, "unknown authenticator"),
            ({"authenticators": "token"}, "needs auth_token"),
            ({"authenticators": "jwt"}, "jwt needs"),
            ({"authenticators": "jwt", "jwt-secret": "short"}, "32 bytes"),
            ({"jwt-secret": SECRET}, "auth.jwt_audience: required"),
            ({"authenticators": "trusted-proxy", "trusted-proxies": "10.0.0.0/8"}, "auth_token"),
            ({"trusted-proxies": "not-a-network"}, "auth.trusted_proxies"),
            ({"jwt-algorithms": "none"}, "auth.jwt_algorithms"),
            ({"authenticators": "jupyterhub", "jupyterhub-api-url": "hub:8081"}, "http://"),
            ({"authenticators": "token,token", "auth-token": "x"}, "once"),
        ):
            with self.assertRaises(ConfigError) as caught:
                load_config({}, {}, flags)
            self.assertIn(text, str(caught.exception), flags)
