"""
Ownership and sharing, authorization, quotas at admission and profiles
(egateway.kernels.policy and egateway.kernels.profiles): through the REST
routes with per-user tokens, fake launchers and a Clock, and directly.
test_tenancy_integration drives the same rules with real kernels.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from typing import Any, Callable

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase

from egateway.api.cors import CorsPolicy
from egateway.api.authenticators import build_authentication
from egateway.api.authenticators.user_tokens import token_hash
from egateway.api.http import FrontResource
from egateway.clusters.interface import ExitStatus, LaunchError
from egateway.config import ConfigError, load_toml
from egateway.errors import Unavailable
from egateway.kernels.manager import record_model
from egateway.kernels.persistence import record_of
from egateway.kernels.policy import Acl, Caller, TenancyPolicy, caller_of, split_names
from egateway.kernels.profiles import OverrideRule, parse_size
from egateway.kernels.state import KernelState
from egateway.store.interface import KernelRecord
from egateway.tap import build_api
from egateway.validation import load_config
from tests.support.fakes import StaticSpecs, fake_spec, make_manager
from tests.support.stubapi import json_body, stub_call

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KID = "0b5e3a0c-1d8e-4f55-9b9e-3f0e6c1a2b3c"

USERS: dict[str, dict[str, Any]] = {
    "alice": {"groups": ["physics"]},
    "bob": {},
    "carol": {"admin": True},
    "dave": {"groups": ["physics"]},
    "erin": {"groups": ["chem"]},
    "bad_guy": {},
    "ali": {},
}


def token_of(user: str) -> str:
    return f"{user}-t0ken-9fQ2"


def as_user(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_of(user)}"}


def write_tokens(path: str, users: dict[str, dict[str, Any]] = USERS) -> None:
    lines = []
    for user, extra in users.items():
        lines.append(f"[{token_hash(token_of(user))}]")
        lines.append(f"username = {json.dumps(user)}")
        for key, value in extra.items():
            lines.append(f"{key} = {json.dumps(value)}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def run_now(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args)


def restricted_spec() -> Any:
    """
    A kernelspec restricted in Enterprise Gateway's metadata form.
    """
    return fake_spec(
        "restricted",
        metadata={
            "egateway": {"launcher": "fake"},
            "process_proxy": {
                "config": {"authorized_users": "bob,alice,bad_guy", "unauthorized_users": "bad_guy"}
            },
        },
    )


PROFILES: dict[str, Any] = {
    "gpu": {
        "description": "One GPU",
        "kernelspecs": ["fake"],
        "groups": ["physics"],
        "default_for_groups": ["physics"],
        "default_env": {"KERNEL_CPUS": "2"},
        "env": {"GPU_POLICY": "exclusive"},
        "cpus": 2,
        "memory": "8G",
        "gpus": 1,
        "partition": "gpu",
        "image": "registry.example/py:1",
        "allowed_images": ["registry.example/py:1", "registry.example/py:2"],
        "launcher_config": {"max_cpus": 8},
        "max_kernels_per_user": 2,
        "overrides": {
            "KERNEL_CPUS": {"min": 1, "max": 8, "integer": True},
            "KERNEL_MEMORY": {"max": "16G"},
            "KERNEL_QUEUE": {"values": ["short", "long"]},
            "KERNEL_WORKING_DIR": {},
        },
    },
    "small": {
        "description": "Single-threaded",
        "users": ["bob"],
        "default_for_users": ["bob"],
        "env": {"OMP_NUM_THREADS": "1"},
        "remote_hosts": ["h1", "h2"],
    },
    "anywhere": {"kernelspecs": ["restricted"], "namespace": "team-a"},
}


class TenancyTestCase(SynchronousTestCase):
    """
    The routes behind the front resource with per-user tokens, over a
    kernel manager with fake launchers and the fake and restricted specs.
    """

    flags: dict[str, str] = {}
    file_values: dict[str, Any] = {}
    tokens = True

    def setUp(self) -> None:
        self.clock = Clock()
        flags = {"list-kernels": "true", **self.flags}
        if self.tokens:
            directory = os.path.abspath(self.mktemp())
            os.makedirs(directory)
            path = os.path.join(directory, "tokens.toml")
            write_tokens(path)
            flags["user-tokens-file"] = path
        self.config = load_config(self.file_values, {}, flags)
        self.manager, self.launcher, _ = make_manager(
            self.clock, fake_spec(), restricted_spec(), client_envs=["OMP_NUM_THREADS"]
        )
        self.manager.policy = TenancyPolicy.from_config(self.config)
        self.api, _ = build_api(self.config, self.manager, self.clock, ThreadPool())
        authentication = build_authentication(self.config.auth, self.clock, None, blocking=run_now)
        self.stub = StubTreq(FrontResource(self.api.resource(), authentication, CorsPolicy(self.config.auth)))
        self.requests: list[Any] = []
        launch = self.launcher.launch

        def recording(request: Any) -> Any:
            self.requests.append(request)
            return launch(request)

        self.launcher.launch = recording  # type: ignore[method-assign]

    def call(self, method: str, path: str, body: Any = None, user: str | None = None) -> tuple[int, Any, Any]:
        return stub_call(self, self.stub, self.clock, method, path, json_body(body), as_user(user) if user else {})

    def refused(self, result: tuple[int, Any, Any], status: int, *texts: str) -> str:
        code, body, _ = result
        self.assertEqual(code, status, body)
        self.assertEqual(set(body), {"reason", "message"})
        for text in texts:
            self.assertIn(text, body["message"])
        return body["message"]

    def start(self, user: str | None, body: dict[str, Any] | None = None) -> dict[str, Any]:
        code, model, _ = self.call("POST", "/api/kernels", body or {}, user)
        self.assertEqual(code, 201, model)
        return model


# -- ownership -----------------------------------------------------------------


class Ownership(TenancyTestCase):
    def test_other_users_are_told_nothing(self) -> None:
        """
        Another user's list, get, channels, interrupt, restart, delete and ACL
        change of alice's kernel get exactly what an unknown id gets, and
        change nothing.
        """
        model = self.start("alice")
        kid = model["id"]
        code, listed, _ = self.call("GET", "/api/kernels", user="bob")
        self.assertEqual((code, listed), (200, []))
        for method, path, body in (
            ("GET", "", None),
            ("DELETE", "", None),
            ("POST", "/interrupt", None),
            ("POST", "/restart", None),
            ("GET", "/channels", None),
            ("PUT", "/acl", {"users": ["bob"]}),
        ):
            theirs = self.refused(self.call(method, f"/api/kernels/{kid}{path}", body, "bob"), 404)
            unknown = self.refused(self.call(method, f"/api/kernels/{KID}{path}", body, "bob"), 404)
            self.assertEqual(theirs.replace(kid, KID), unknown, (method, path))
        kernel = self.manager.kernels[kid]
        self.assertEqual((kernel.state, kernel.restart_count, kernel.acl), (KernelState.RUNNING, 0, Acl()))
        self.assertEqual(kernel.process.signals, [])

    def test_listing_costs_the_callers_kernels(self) -> None:
        """
        A user's GET /api/kernels makes the models of the kernels they may
        see only: on a gateway of a thousand kernels, each user's listing
        (JupyterLab polls it) does not format every other user's.
        """
        mine = self.start("alice")["id"]
        for _ in range(3):
            self.start("bob")
        made: list[str] = []
        for kernel in self.manager.kernels.values():
            original = kernel.model

            def counted(original: Any = original, kernel: Any = kernel) -> Any:
                made.append(kernel.id)
                return original()

            kernel.model = counted
        code, listed, _ = self.call("GET", "/api/kernels", user="alice")
        self.assertEqual(([k["id"] for k in listed], made), ([mine], [mine]))

    def test_owner_and_admin(self) -> None:
        """
        The owner and an admin see and act on the kernel; the model names
        its owner, ACL and profile.
        """
        model = self.start("alice")
        self.assertEqual((model["owner"], model["acl"], model["profile"]), ("alice", {"users": [], "groups": []}, None))
        mine = self.start("bob")
        code, listed, _ = self.call("GET", "/api/kernels", user="carol")
        self.assertEqual(sorted(k["id"] for k in listed), sorted([model["id"], mine["id"]]))
        code, listed, _ = self.call("GET", "/api/kernels", user="alice")
        self.assertEqual([k["id"] for k in listed], [model["id"]])
        self.assertEqual(self.call("POST", f"/api/kernels/{model['id']}/restart", None, "carol")[0], 200)
        self.assertEqual(self.call("DELETE", f"/api/kernels/{model['id']}", None, "carol")[0], 204)
        self.assertEqual(self.call("DELETE", f"/api/kernels/{mine['id']}", None, "bob")[0], 204)

    def test_share_with_a_user(self) -> None:
        """
        Shared with bob, alice's kernel is bob's to see, interrupt, restart
        and list, but not to reshare; unshared, it is hidden again.
        """
        kid = self.start("alice")["id"]
        code, model, _ = self.call("PUT", f"/api/kernels/{kid}/acl", {"users": ["bob", "bob"]}, "alice")
        self.assertEqual((code, model["acl"]), (200, {"users": ["bob"], "groups": []}))
        self.assertEqual(self.call("GET", f"/api/kernels/{kid}", None, "bob")[0], 200)
        self.assertEqual(self.call("POST", f"/api/kernels/{kid}/interrupt", None, "bob")[0], 204)
        self.assertEqual(self.call("POST", f"/api/kernels/{kid}/restart", None, "bob")[0], 200)
        self.assertEqual([k["id"] for k in self.call("GET", "/api/kernels", user="bob")[1]], [kid])
        self.refused(self.call("PUT", f"/api/kernels/{kid}/acl", {"users": ["erin"]}, "bob"), 403, "only the owner")
        self.refused(self.call("GET", f"/api/kernels/{kid}", None, "erin"), 404)
        self.assertEqual(self.call("PUT", f"/api/kernels/{kid}/acl", {}, "alice")[0], 200)
        self.refused(self.call("GET", f"/api/kernels/{kid}", None, "bob"), 404)

    def test_share_with_a_group(self) -> None:
        """
        Shared with a group, the kernel is visible to its members only; an
        admin may change the ACL too.
        """
        kid = self.start("bob")["id"]
        self.assertEqual(self.call("PUT", f"/api/kernels/{kid}/acl", {"groups": ["physics"]}, "carol")[0], 200)
        self.assertEqual(self.call("GET", f"/api/kernels/{kid}", None, "dave")[0], 200)
        self.assertEqual(self.call("GET", f"/api/kernels/{kid}", None, "alice")[0], 200)
        self.refused(self.call("GET", f"/api/kernels/{kid}", None, "erin"), 404)

    def test_acl_validation(self) -> None:
        """
        A malformed ACL is a 400 naming the problem, and changes nothing.
        """
        kid = self.start("alice")["id"]
        for body, text in (
            ([], "must be"),
            ({"users": "bob"}, "'users' must be a list"),
            ({"users": [1]}, "'users' must be a list"),
            ({"groups": ["a b"]}, "not a user or group name"),
            ({"users": ["x"] * 300}, "at most 256"),
            ({"owner": "bob"}, "unknown field owner"),
        ):
            self.refused(self.call("PUT", f"/api/kernels/{kid}/acl", body, "alice"), 400, text)
        self.assertEqual(self.manager.kernels[kid].acl, Acl())

    def test_sessions(self) -> None:
        """
        A session is visible to whoever may see its kernel: others can
        neither get, list, patch, delete nor reuse it (by path or kernel
        id), until it is shared.
        """
        code, session, _ = self.call("POST", "/api/sessions", {"path": "a.ipynb", "type": "notebook"}, "alice")
        self.assertEqual(code, 201)
        sid, kid = session["id"], session["kernel"]["id"]
        self.refused(self.call("GET", f"/api/sessions/{sid}", None, "bob"), 404, "Session not found")
        self.refused(self.call("PATCH", f"/api/sessions/{sid}", {"path": "b"}, "bob"), 404)
        self.refused(self.call("DELETE", f"/api/sessions/{sid}", None, "bob"), 404)
        self.assertEqual(self.call("GET", "/api/sessions", user="bob")[1], [])
        self.refused(
            self.call("POST", "/api/sessions", {"path": "x", "type": "console", "kernel": {"id": kid}}, "bob"), 404
        )
        code, own, _ = self.call("POST", "/api/sessions", {"path": "a.ipynb", "type": "notebook"}, "bob")
        self.assertEqual(code, 201)
        self.assertNotEqual((own["id"], own["kernel"]["id"]), (sid, kid))
        self.assertEqual(own["kernel"]["owner"], "bob")
        self.assertEqual(self.call("GET", f"/api/sessions/{sid}", None, "alice")[1]["path"], "a.ipynb")
        self.call("PUT", f"/api/kernels/{kid}/acl", {"users": ["bob"]}, "alice")
        self.assertEqual(self.call("GET", f"/api/sessions/{sid}", None, "bob")[0], 200)
        self.assertEqual(sorted(s["id"] for s in self.call("GET", "/api/sessions", user="bob")[1]), sorted([sid, own["id"]]))

    def test_persisted(self) -> None:
        """
        The record keeps owner, groups, ACL and profile; a record written
        before them restores with its username as owner.
        """
        kid = self.start("alice")["id"]
        self.call("PUT", f"/api/kernels/{kid}/acl", {"users": ["bob"], "groups": ["chem"]}, "alice")
        record = record_of(self.manager.kernels[kid], "gw")
        self.assertEqual(
            (record.owner, record.owner_groups, record.acl, record.profile),
            ("alice", ["physics"], {"users": ["bob"], "groups": ["chem"]}, ""),
        )
        again = KernelRecord.from_json(json.loads(json.dumps(record.to_json())))
        self.assertEqual(record_model(again)["acl"], {"users": ["bob"], "groups": ["chem"]})
        old = {k: v for k, v in record.to_json().items() if k not in ("owner", "owner_groups", "acl", "profile")}
        old.update(kernel_id=KID, username="zed", state="dead")
        restored = self.successResultOf(
            Deferred.fromCoroutine(self.manager.restore_kernel(KernelRecord.from_json(old), fake_spec()))
        )
        self.assertEqual((restored.owner, restored.acl, restored.profile), ("zed", Acl(), None))
        self.refused(self.call("GET", f"/api/kernels/{KID}", None, "alice"), 404)


class Forbidding(TenancyTestCase):
    flags = {"hide-kernels": "false"}

    def test_403_when_not_hidden(self) -> None:
        """
        With hide_kernels off, another user's kernel and session are 403s
        saying whose they are not; unknown ids stay 404s.
        """
        code, session, _ = self.call("POST", "/api/sessions", {"path": "a", "type": "notebook"}, "alice")
        kid = session["kernel"]["id"]
        for method, path in (("GET", ""), ("DELETE", ""), ("POST", "/interrupt"), ("POST", "/restart"), ("GET", "/channels")):
            self.refused(self.call(method, f"/api/kernels/{kid}{path}", None, "bob"), 403, "belongs to another user")
        self.refused(self.call("GET", f"/api/sessions/{session['id']}", None, "bob"), 403)
        self.refused(self.call("GET", f"/api/kernels/{KID}", None, "bob"), 404)


class OpenGateway(TenancyTestCase):
    tokens = False

    def test_anonymous_sees_everything(self) -> None:
        """
        Without authentication nothing changes: kernels are owned by the
        KERNEL_USERNAME the client names, and every caller sees them all.
        """
        a = self.start(None, {"env": {"KERNEL_USERNAME": "alice"}})
        b = self.start(None, {"env": {"KERNEL_USERNAME": "bob"}})
        self.assertEqual((a["owner"], b["owner"]), ("alice", "bob"))
        self.assertEqual(len(self.call("GET", "/api/kernels")[1]), 2)
        self.assertEqual(self.call("DELETE", f"/api/kernels/{a['id']}")[0], 204)


class _Connection:
    """
    An open channels WebSocket, as the endpoint's rechecks see it.
    """

    def __init__(self, kernel: Any, user: str, token: str) -> None:
        from egateway.api.identity import Identity

        self.kernel, self.token = kernel, token
        groups = frozenset(USERS[user].get("groups", ()))
        self.identity = Identity(user, groups, authenticated=True, method="user-tokens")
        self.user = user
        self.revoked: list[str] = []

    @property
    def caller(self) -> Caller | None:
        return caller_of(self.identity)

    def revoke(self, reason: str) -> None:
        self.revoked.append(reason)


class OpenConnections(TenancyTestCase):
    def test_rechecks(self) -> None:
        """
        Unsharing revokes the connections of the users it excludes; a
        credential recheck revokes those whose token is gone or whose new
        groups exclude them, and leaves one alone when its authenticator
        cannot answer (a Hub down).
        """
        kid = self.start("alice")["id"]
        kernel = self.manager.kernels[kid]
        self.call("PUT", f"/api/kernels/{kid}/acl", {"users": ["bob", "erin"], "groups": ["physics"]}, "alice")
        channels = self.api.channels
        people = {user: _Connection(kernel, user, token_of(user)) for user in ("alice", "bob", "dave", "erin")}
        channels.connections[kid] = set(people.values())
        self.call("PUT", f"/api/kernels/{kid}/acl", {"users": ["bob"], "groups": ["physics"]}, "alice")
        self.assertEqual({u: c.revoked for u, c in people.items() if c.revoked},
                         {"erin": [f"access to kernel {kid} was revoked"]})
        channels.connections[kid].discard(people.pop("erin"))

        answers: dict[str, Any] = {
            "alice": Deferred(),
            "bob": None,
            "dave": dataclasses.replace(people["dave"].identity, groups=frozenset({"chem"})),
        }
        answers["alice"].errback(Unavailable("JupyterHub is down"))

        class Chain:
            on_change: list[Any] = []

            def recheck(self, identity: Any, token: str) -> Any:
                return answers[identity.username]

        channels.watch_credentials(Chain())
        channels.recheck_credentials()
        self.assertEqual(
            {u: c.revoked for u, c in people.items()},
            {"alice": [], "bob": ["your credentials were revoked"], "dave": [f"access to kernel {kid} was revoked"]},
        )


class Callers(SynchronousTestCase):
    def test_caller_of(self) -> None:
        """
        Only an authenticated identity with a user name is a caller; the
        shared token and anonymous requests are not.
        """
        from egateway.api.identity import ANONYMOUS, Identity

        self.assertIsNone(caller_of(ANONYMOUS))
        self.assertIsNone(caller_of(Identity("", authenticated=True, method="token")))
        self.assertIsNone(caller_of(None))
        self.assertEqual(
            caller_of(Identity("a", frozenset({"g"}), admin=True, authenticated=True)),
            Caller("a", frozenset({"g"}), True),
        )


# -- authorization -------------------------------------------------------------


class AuthorizationRules(SynchronousTestCase):
    def policy(self, **settings: Any) -> TenancyPolicy:
        config = load_config({"tenancy": settings}, {}, {})
        return TenancyPolicy.from_config(config)

    def spec(self, **config: Any) -> Any:
        return fake_spec("s", metadata={"egateway": {"launcher": "fake", "config": config}})

    def test_global_lists(self) -> None:
        """
        unauthorized_* refuse; authorized_* admit only those named, by user
        or group.
        """
        policy = self.policy(unauthorized_users=["root"], authorized_users=["alice"], authorized_groups=["ops"])
        spec = self.spec()
        self.assertIsNone(policy.authorization_refusal("alice", frozenset(), spec))
        self.assertIsNone(policy.authorization_refusal("zed", frozenset({"ops"}), spec))
        self.assertIn("is in unauthorized_users", policy.authorization_refusal("root", frozenset({"ops"}), spec))
        self.assertIn(
            "not in authorized_users or authorized_groups", policy.authorization_refusal("bob", frozenset(), spec)
        )
        policy = self.policy(unauthorized_groups=["banned"])
        self.assertIn("group 'banned'", policy.authorization_refusal("x", frozenset({"banned"}), spec))

    def test_kernelspec_lists(self) -> None:
        """
        A kernelspec's authorized lists replace the gateway's, its
        unauthorized lists add to them; comma strings split exactly, with no
        substring matches.
        """
        policy = self.policy(authorized_users=["zed"], unauthorized_users=["mallory"])
        spec = restricted_spec()
        self.assertIsNone(policy.authorization_refusal("alice", frozenset(), spec))
        self.assertIn("kernelspec 'restricted''s authorized_users", policy.authorization_refusal("zed", frozenset(), spec))
        self.assertIn("not in", policy.authorization_refusal("ali", frozenset(), spec))
        self.assertIn("unauthorized_users", policy.authorization_refusal("bad_guy", frozenset(), spec))
        self.assertIn("is in unauthorized_users", policy.authorization_refusal("mallory", frozenset(), spec))
        own = self.spec(authorized_groups=["physics"], unauthorized_users=["dave"])
        self.assertIsNone(policy.authorization_refusal("alice", frozenset({"physics"}), own))
        self.assertIn("unauthorized_users", policy.authorization_refusal("dave", frozenset({"physics"}), own))

    def test_split_names(self) -> None:
        """
        Enterprise Gateway's comma strings and JSON lists both work.
        """
        self.assertEqual(split_names("bob, alice,,bad_guy "), ("bob", "alice", "bad_guy"))
        self.assertEqual(split_names(["a", " b "]), ("a", "b"))
        self.assertEqual(split_names(None), ())
        self.assertEqual(split_names(7), ())


class Authorization(TenancyTestCase):
    flags = {"unauthorized-users": "erin"}

    def test_launch_refused_naming_the_rule(self) -> None:
        """
        A forbidden kernelspec is a 403 naming the rule, and nothing
        launches.
        """
        self.refused(self.call("POST", "/api/kernels", {"name": "restricted"}, "dave"), 403,
                     "'restricted'", "not in kernelspec 'restricted''s authorized_users")
        self.refused(self.call("POST", "/api/kernels", {"name": "restricted"}, "bad_guy"), 403,
                     "kernelspec 'restricted''s unauthorized_users")
        self.refused(self.call("POST", "/api/kernels", {"name": "restricted"}, "ali"), 403, "'ali' is not in")
        self.refused(self.call("POST", "/api/kernels", {}, "erin"), 403, "user 'erin' is in unauthorized_users")
        self.refused(
            self.call("POST", "/api/sessions", {"path": "p", "type": "t", "kernel": {"name": "restricted"}}, "dave"),
            403,
            "authorized_users",
        )
        self.assertEqual(self.requests, [])
        self.assertEqual(self.start("alice", {"name": "restricted"})["name"], "restricted")

    def test_kernelspecs_show_what_one_may_launch(self) -> None:
        """
        /api/kernelspecs lists, and /api/kernelspecs/{name} serves, only the
        specs the caller may launch; anonymous callers may filter with
        ?user= as in Enterprise Gateway; an admin may look as someone else.
        """
        names = lambda user, query="": sorted(self.call("GET", "/api/kernelspecs" + query, user=user)[1]["kernelspecs"])
        self.assertEqual(names("alice"), ["fake", "restricted"])
        self.assertEqual(names("dave"), ["fake"])
        self.assertEqual(names("erin"), [])
        self.assertEqual(names("dave", "?user=alice"), ["fake"])
        self.assertEqual(names("carol", "?user=dave"), ["fake"])
        self.refused(self.call("GET", "/api/kernelspecs/restricted", None, "dave"), 404)
        self.assertEqual(self.call("GET", "/api/kernelspecs/restricted", None, "bob")[0], 200)


class AnonymousKernelspecs(TenancyTestCase):
    tokens = False

    def test_user_query(self) -> None:
        """
        Without authentication, ?user= filters the kernelspecs (advisory, as
        in Enterprise Gateway) and a launch is authorized for the
        KERNEL_USERNAME named.
        """
        listed = self.call("GET", "/api/kernelspecs?user=dave")[1]["kernelspecs"]
        self.assertEqual(sorted(listed), ["fake"])
        self.assertEqual(sorted(self.call("GET", "/api/kernelspecs")[1]["kernelspecs"]), ["fake", "restricted"])
        self.refused(
            self.call("POST", "/api/kernels", {"name": "restricted", "env": {"KERNEL_USERNAME": "dave"}}), 403, "'dave'"
        )


class _Immediately:
    """
    A thread pool and reactor that run blocking calls at once, so that a
    kernelspec resource is read within a synchronous test.
    """

    def callInThreadWithCallback(self, on_result: Callable[..., Any], f: Callable[..., Any], *args: Any) -> None:
        try:
            result = f(*args)
        except Exception:
            on_result(False, Failure())
        else:
            on_result(True, result)

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        f(*args)


class KernelspecResources(TenancyTestCase):
    def test_only_for_those_who_may_launch(self) -> None:
        """
        A kernelspec's files (kernel.json, logos) are served only to users
        who may launch it; anyone else gets what an unknown kernelspec's
        files get.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "kernel.json"), "w") as f:
            f.write('{"argv": ["secret-launcher"]}')
        spec = restricted_spec()
        self.manager.specs._specs["restricted"] = type(spec).from_json("restricted", directory, {
            "argv": list(spec.argv), "display_name": "R", "language": "python", "metadata": spec.metadata,
        })
        self.api._reactor = self.api._threadpool = _Immediately()
        code, body, _ = self.call("GET", "/kernelspecs/restricted/kernel.json", user="bob")
        self.assertEqual((code, body), (200, {"argv": ["secret-launcher"]}))
        for user in ("erin", "bad_guy"):
            theirs = self.refused(self.call("GET", "/kernelspecs/restricted/kernel.json", user=user), 404)
            unknown = self.refused(self.call("GET", "/kernelspecs/nospec/kernel.json", user=user), 404)
            self.assertEqual(theirs.replace("restricted", "nospec"), unknown)


class ChosenKernelIds(TenancyTestCase):
    def test_no_existence_oracle(self) -> None:
        """
        With hidden kernels, a user choosing KERNEL_ID gets the same refusal
        whether the id is another user's kernel or free, and nothing
        launches; an admin (who sees every kernel) may still choose one.
        """
        kid = self.start("alice")["id"]
        taken = self.refused(self.call("POST", "/api/kernels", {"env": {"KERNEL_ID": kid}}, "bob"), 403)
        free = self.refused(self.call("POST", "/api/kernels", {"env": {"KERNEL_ID": KID}}, "bob"), 403)
        self.assertEqual(taken, free)
        self.assertIn("omit it", free)
        self.assertEqual(list(self.manager.kernels), [kid])
        self.refused(self.call("POST", "/api/kernels", {"env": {"KERNEL_ID": kid}}, "carol"), 409)
        self.assertEqual(self.start("carol", {"env": {"KERNEL_ID": KID}})["id"], KID)


class ChosenKernelIdsNotHidden(TenancyTestCase):
    flags = {"hide-kernels": "false"}
    file_values = {"profiles": PROFILES}

    def test_users_choose_ids(self) -> None:
        """
        With hide_kernels off (other users' kernels are 403s, not hidden), a
        user may choose KERNEL_ID, which no profile rule restricts.
        """
        model = self.start("alice", {"env": {"KERNEL_ID": KID}})
        self.assertEqual((model["id"], model["profile"]), (KID, "gpu"))
        self.refused(self.call("POST", "/api/kernels", {"env": {"KERNEL_ID": KID}}, "bob"), 409)


# -- quotas ----------------------------------------------------------------------


class Quotas(TenancyTestCase):
    flags = {"max-kernels-per-user": "2", "max-kernels-per-group": "3"}

    def test_per_user(self) -> None:
        """
        A user's third kernel is refused 403 naming the limit and its value;
        other users are unaffected; a dead kernel does not count.
        """
        first = self.start("bob")
        self.start("bob")
        self.refused(self.call("POST", "/api/kernels", {}, "bob"), 403, "max_kernels_per_user limit of 2", "'bob'")
        self.start("erin")
        self.manager.kernels[first["id"]].transition(KernelState.DEAD, "test")
        self.start("bob")

    def test_per_group(self) -> None:
        """
        Members of one group together have at most max_kernels_per_group.
        """
        self.start("alice")
        self.start("alice")
        self.start("dave")
        self.refused(self.call("POST", "/api/kernels", {}, "dave"), 403, "max_kernels_per_group limit of 3",
                     "group 'physics'")
        self.start("erin")


class DeadKernels(TenancyTestCase):
    flags = {"max-kernels-per-user": "2"}

    def setUp(self) -> None:
        super().setUp()
        self.manager.settings = dataclasses.replace(self.manager.settings, max_kernels=3)

    def kill(self, model: dict[str, Any]) -> None:
        """
        End a kernel's process for good: its automatic restart fails, so it
        is declared dead.
        """
        kernel = self.manager.kernels[model["id"]]
        self.launcher.fail_with = LaunchError("no capacity left")
        kernel.process.exit(ExitStatus(code=1))
        self.launcher.fail_with = None
        self.assertEqual(kernel.state, KernelState.DEAD)

    def test_dead_kernels_fill_no_limit(self) -> None:
        """
        One user's dead kernels count toward neither their quota nor the
        gateway-wide max_kernels: others (and they) can still start kernels.
        """
        for _ in range(2):
            self.kill(self.start("bob"))
        self.kill(self.start("bob"))
        self.start("bob")
        self.start("erin")
        self.start("erin")
        self.refused(self.call("POST", "/api/kernels", {}, "alice"), 403, "max kernels limit of 3")
        self.assertEqual(len(self.manager.kernels), 6)

    def test_reviving_passes_admission(self) -> None:
        """
        Restarting a dead kernel is refused (and it stays dead) while its
        owner's quota or max_kernels is full, and revives it once there is
        room.
        """
        dead = self.start("bob")
        self.kill(dead)
        second = self.start("bob")
        self.start("bob")
        restart = f"/api/kernels/{dead['id']}/restart"
        self.refused(self.call("POST", restart, None, "bob"), 403, "max_kernels_per_user limit of 2", "'bob'")
        kernel = self.manager.kernels[dead["id"]]
        self.assertEqual(kernel.state, KernelState.DEAD)
        self.assertEqual(self.call("DELETE", f"/api/kernels/{second['id']}", None, "bob")[0], 204)
        self.start("erin")
        self.start("erin")
        self.refused(self.call("POST", restart, None, "bob"), 403, "max kernels limit of 3")
        self.assertEqual(kernel.state, KernelState.DEAD)
        self.manager.settings = dataclasses.replace(self.manager.settings, max_kernels=4)
        code, model, _ = self.call("POST", restart, None, "bob")
        self.assertEqual((code, model["state"]), (200, "running"), model)

    def test_reviving_rechecks_authorization(self) -> None:
        """
        A user barred from a kernelspec since their kernel died cannot bring
        it back with a restart.
        """
        dead = self.start("bob")
        self.kill(dead)
        self.manager.policy.settings = dataclasses.replace(self.manager.policy.settings, unauthorized_users=["bob"])
        self.refused(
            self.call("POST", f"/api/kernels/{dead['id']}/restart", None, "bob"), 403, "unauthorized_users"
        )
        self.assertEqual(self.manager.kernels[dead["id"]].state, KernelState.DEAD)


class ConcurrentLaunches(TenancyTestCase):
    flags = {"max-concurrent-launches-per-user": "2"}

    def test_429_with_retry_after(self) -> None:
        """
        A third launch while two are in progress is a 429 with Retry-After
        naming the limit; once they finish, launching works again.
        """
        self.launcher.hold = True
        pending = [self.stub.request("POST", "http://gw.example/api/kernels", data=b"{}", headers=as_user("bob"))
                   for _ in range(2)]
        self.stub.flush()
        self.clock.advance(10)
        code, body, headers = self.call("POST", "/api/kernels", {}, "bob")
        message = self.refused((code, body, headers), 429, "max_concurrent_launches_per_user limit of 2")
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"20"])
        self.assertIn("retry after 20 s", message)
        self.assertEqual(len(self.launcher.pending), 2)
        self.launcher.hold = False
        self.launcher.release()
        self.launcher.release()
        self.stub.flush()
        self.clock.advance(0.1)
        self.stub.flush()
        self.assertEqual([self.successResultOf(d).code for d in pending], [201, 201])
        self.start("bob")


class GatedSpecs(StaticSpecs):
    """
    A catalog whose lookups wait until released, so every request of a
    burst is suspended before admission at once.
    """

    def __init__(self, *specs: Any) -> None:
        super().__init__(*specs)
        self.waiting: list[tuple[Deferred[Any], Any]] = []

    def get(self, name: str) -> Deferred[Any]:  # type: ignore[override]
        d: Deferred[Any] = Deferred()
        self.waiting.append((d, self._specs[name]))
        return d

    def release_all(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d, spec in waiting:
            d.callback(spec)


class PeakCounter(dict):  # type: ignore[type-arg]
    """
    The manager's kernel table, remembering the most kernels each owner
    ever had registered at once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.peak: dict[str, int] = {}

    def __setitem__(self, key: str, kernel: Any) -> None:
        super().__setitem__(key, kernel)
        owner = kernel.owner
        count = sum(1 for k in self.values() if k.owner == owner)
        self.peak[owner] = max(self.peak.get(owner, 0), count)


class ConcurrentStarts(TenancyTestCase):
    flags = {"max-kernels-per-user": "5"}

    def test_200_concurrent_starts(self) -> None:
        """
        200 concurrent starts by one user, all suspended before admission
        and then resumed together, against a per-user limit of 5: never
        more than 5 kernels, 5 launches and 195 refusals naming the limit.
        """
        specs = GatedSpecs(fake_spec())
        self.manager.specs = specs
        self.manager.kernels = PeakCounter()
        self.launcher.hold = True
        requests = [
            self.stub.request("POST", "http://gw.example/api/kernels", data=b"{}", headers=as_user("alice"))
            for _ in range(200)
        ]
        self.stub.flush()
        self.assertEqual(len(specs.waiting), 200)
        specs.release_all()
        self.stub.flush()
        self.assertEqual(len(self.launcher.pending), 5)
        while self.launcher.pending:
            self.launcher.release()
        self.stub.flush()
        self.clock.advance(0.1)
        self.stub.flush()
        responses = [self.successResultOf(d) for d in requests]
        codes = [r.code for r in responses]
        self.assertEqual((codes.count(201), codes.count(403)), (5, 195))
        refusal = json.loads(self.successResultOf(next(r for r in responses if r.code == 403).content()))
        self.assertIn("max_kernels_per_user limit of 5", refusal["message"])
        self.assertEqual(self.manager.kernels.peak, {"alice": 5})
        self.assertEqual(len(self.manager.kernels), 5)


# -- profiles --------------------------------------------------------------------


class Profiles(TenancyTestCase):
    file_values = {"profiles": PROFILES}

    def test_group_default(self) -> None:
        """
        A physics member's launch gets the gpu profile: its environment,
        its resources and launcher parameters merged over the kernelspec's
        launcher config, recorded on the kernel, its model and its record.
        """
        model = self.start("alice")
        self.assertEqual(model["profile"], "gpu")
        kernel = self.manager.kernels[model["id"]]
        self.assertEqual(
            {k: kernel.env.get(k) for k in ("KERNEL_PROFILE", "KERNEL_CPUS", "GPU_POLICY")},
            {"KERNEL_PROFILE": "gpu", "KERNEL_CPUS": "2", "GPU_POLICY": "exclusive"},
        )
        [request] = self.requests
        self.assertEqual(
            dict(request.config),
            {"cpus": 2, "memory": "8G", "gpus": 1, "partition": "gpu", "image_name": "registry.example/py:1",
             "max_cpus": 8},
        )
        self.assertEqual(record_of(kernel, "gw").profile, "gpu")

    def test_user_default_and_fixed_env(self) -> None:
        """
        bob's own default forces OMP_NUM_THREADS and its host pool; bob may
        not set the forced name himself.
        """
        model = self.start("bob")
        self.assertEqual(model["profile"], "small")
        self.assertEqual(self.manager.kernels[model["id"]].env["OMP_NUM_THREADS"], "1")
        self.assertEqual(self.requests[0].config["remote_hosts"], ["h1", "h2"])
        self.refused(self.call("POST", "/api/kernels", {"env": {"OMP_NUM_THREADS": "8"}}, "bob"), 400,
                     "OMP_NUM_THREADS is fixed by profile 'small'")

    def test_allowed_overrides(self) -> None:
        """
        Overrides within the rules reach the kernel; an allowed image
        replaces the profile's in the launcher config.
        """
        env = {"KERNEL_CPUS": "8", "KERNEL_MEMORY": "16G", "KERNEL_QUEUE": "long", "KERNEL_WORKING_DIR": "/w",
               "KERNEL_IMAGE": "registry.example/py:2", "KERNEL_USERNAME": "alice"}
        model = self.start("alice", {"env": env})
        kernel = self.manager.kernels[model["id"]]
        self.assertEqual((kernel.env["KERNEL_CPUS"], kernel.env["KERNEL_QUEUE"]), ("8", "long"))
        self.assertEqual(self.requests[0].config["image_name"], "registry.example/py:2")

    def test_violations_name_key_and_rule(self) -> None:
        """
        Each override the profile does not allow is a 400 naming the key
        and the rule, and nothing launches.
        """
        for env, texts in (
            ({"KERNEL_CPUS": "9"}, ("KERNEL_CPUS", "max = 8")),
            ({"KERNEL_CPUS": "0"}, ("KERNEL_CPUS", "min = 1")),
            ({"KERNEL_CPUS": "2.5"}, ("KERNEL_CPUS", "integer = true")),
            ({"KERNEL_CPUS": "lots"}, ("KERNEL_CPUS", "a number")),
            ({"KERNEL_MEMORY": "32G"}, ("KERNEL_MEMORY", "max = 16G")),
            ({"KERNEL_MEMORY": "4096"}, ("KERNEL_MEMORY", "with a unit")),
            ({"KERNEL_QUEUE": "huge"}, ("KERNEL_QUEUE", "one of short, long", "rule: values")),
            ({"KERNEL_VOLUMES": "[]"}, ("KERNEL_VOLUMES", "not in the profile's overrides")),
            ({"KERNEL_NAMESPACE": "kube-system"}, ("KERNEL_NAMESPACE", "not in the profile's overrides")),
            ({"KERNEL_IMAGE": "evil/miner"}, ("KERNEL_IMAGE", "allowed_images")),
            ({"GPU_POLICY": "shared"}, ()),
        ):
            if "GPU_POLICY" in env:
                # Not a KERNEL_* name nor in client_envs: dropped, not refused.
                self.start("alice", {"env": env})
                continue
            message = self.refused(self.call("POST", "/api/kernels", {"env": env}, "alice"), 400, "profile 'gpu'", *texts)
            self.assertNotIn(list(env.values())[0], message.replace("16G", "").replace("short, long", ""))
        self.assertEqual(len(self.requests), 1)

    def test_choosing(self) -> None:
        """
        A client chooses with KERNEL_PROFILE or the body's profile; they
        must agree; unknown, forbidden or inapplicable profiles are refused
        naming why; an admin may use any profile.
        """
        self.assertEqual(self.start("alice", {"name": "restricted", "profile": "anywhere"})["profile"], "anywhere")
        self.assertEqual(self.requests[0].config, {"authorized_users": "bob,alice,bad_guy",
                                                   "unauthorized_users": "bad_guy", "namespace": "team-a"})
        self.assertEqual(
            self.start("alice", {"name": "restricted", "env": {"KERNEL_PROFILE": "anywhere"}})["profile"], "anywhere"
        )
        self.refused(self.call("POST", "/api/kernels", {"profile": "gpu", "env": {"KERNEL_PROFILE": "small"}}, "alice"),
                     400, "different profiles")
        self.refused(self.call("POST", "/api/kernels", {"profile": "nope"}, "alice"), 400, "no profile named 'nope'")
        self.refused(self.call("POST", "/api/kernels", {"profile": 3}, "alice"), 400, "'profile' must be a string")
        self.refused(self.call("POST", "/api/kernels", {"profile": "gpu"}, "erin"), 403, "may not use profile 'gpu'")
        self.refused(self.call("POST", "/api/kernels", {"profile": "anywhere"}, "alice"), 400,
                     "does not apply to kernelspec 'fake'")
        self.assertEqual(self.start("carol", {"profile": "small"})["profile"], "small")
        self.assertIsNone(self.start("erin")["profile"])
        code, session, _ = self.call(
            "POST", "/api/sessions", {"path": "s", "type": "t", "kernel": {"name": "restricted", "profile": "anywhere"}},
            "alice",
        )
        self.assertEqual((code, session["kernel"]["profile"]), (201, "anywhere"))

    def test_profile_limit(self) -> None:
        """
        The profile's own per-user limit refuses a third kernel with it.
        """
        self.start("alice")
        self.start("alice")
        self.refused(self.call("POST", "/api/kernels", {}, "alice"), 403,
                     "profile 'gpu''s max_kernels_per_user limit of 2")
        self.start("dave")

    def test_listing(self) -> None:
        """
        GET /api/profiles lists the caller's usable profiles with their
        kernelspecs, overrides, limits and default flag, never the forced
        values.
        """
        code, body, _ = self.call("GET", "/api/profiles", user="alice")
        self.assertEqual(code, 200)
        self.assertFalse(body["require_profile"])
        by_name = {p["name"]: p for p in body["profiles"]}
        self.assertEqual(sorted(by_name), ["anywhere", "gpu"])
        gpu = by_name["gpu"]
        self.assertEqual((gpu["default"], gpu["kernelspecs"], gpu["fixed"]), (True, ["fake"], ["GPU_POLICY"]))
        self.assertEqual(gpu["overrides"]["KERNEL_CPUS"], {"min": 1, "max": 8, "integer": True})
        self.assertEqual(gpu["overrides"]["KERNEL_MEMORY"], {"max": "16G"})
        self.assertEqual(gpu["overrides"]["KERNEL_IMAGE"]["values"], ["registry.example/py:1", "registry.example/py:2"])
        self.assertEqual(gpu["limits"], {"max_kernels": 0, "max_kernels_per_user": 2})
        self.assertNotIn("exclusive", json.dumps(body))
        self.assertEqual(sorted(p["name"] for p in self.call("GET", "/api/profiles", user="bob")[1]["profiles"]),
                         ["anywhere", "small"])
        self.assertEqual(len(self.call("GET", "/api/profiles", user="carol")[1]["profiles"]), 3)


class Audited(TenancyTestCase):
    file_values = {"profiles": PROFILES}

    def test_decisions_audited(self) -> None:
        """
        Profile refusals, hidden refusals (404s) and ACL changes are audit
        events naming who, what and why.
        """
        from twisted.logger import globalLogPublisher

        from egateway.ops.audit import is_audit_event

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.call("POST", "/api/kernels", {"env": {"KERNEL_CPUS": "99"}}, "alice")
        kid = self.start("alice")["id"]
        self.call("GET", f"/api/kernels/{kid}", None, "bob")
        self.call("PUT", f"/api/kernels/{kid}/acl", {"users": ["erin"]}, "alice")
        audited = [(e["audit_kind"], e["audit_fields"]) for e in events if is_audit_event(e)]
        refused = [fields for kind, fields in audited if kind == "request.refused"]
        self.assertEqual(
            [(f["user"], f["status"]) for f in refused], [("alice", 400), ("bob", 404)]
        )
        self.assertIn("KERNEL_CPUS", refused[0]["reason"])
        self.assertTrue(refused[1]["hidden"])
        [shared] = [fields for kind, fields in audited if kind == "kernel.shared"]
        self.assertEqual((shared["user"], shared["owner"], shared["users"]), ("alice", "alice", ["erin"]))
        [launch] = [fields for kind, fields in audited if kind == "kernel.launch"]
        self.assertEqual(launch["profile"], "gpu")


class RequiredProfiles(TenancyTestCase):
    file_values = {"profiles": PROFILES}
    flags = {"require-profile": "true"}

    def test_required(self) -> None:
        """
        With require_profile, a launch with no profile and no default is a
        403 naming the usable ones, and kernelspecs no usable profile
        applies to are not listed.
        """
        self.refused(self.call("POST", "/api/kernels", {}, "erin"), 403, "a profile is required",
                     "none is available to you")
        self.refused(self.call("POST", "/api/kernels", {"name": "restricted"}, "alice"), 403, "anywhere")
        self.assertEqual(self.start("alice")["profile"], "gpu")
        listed = lambda user: sorted(self.call("GET", "/api/kernelspecs", user=user)[1]["kernelspecs"])
        self.assertEqual(listed("erin"), [])
        self.assertEqual(listed("dave"), ["fake"])
        self.assertEqual(listed("alice"), ["fake", "restricted"])


class OverrideRules(SynchronousTestCase):
    def test_rules(self) -> None:
        """
        Ranges, sizes, whole numbers and allow-lists accept and refuse as
        documented.
        """
        rule = OverrideRule.parse("K", {"min": 0.5, "max": 4})
        self.assertIsNone(rule.refusal("0.5"))
        self.assertIn("at most 4", rule.refusal("4.01"))
        self.assertIn("a number", rule.refusal("nan"))
        sizes = OverrideRule.parse("K", {"min": "512M", "max": "2Gi"})
        self.assertIsNone(sizes.refusal("1g"))
        self.assertIn("at least 512M", sizes.refusal("100M"))
        self.assertIsNone(OverrideRule.parse("K", {}).refusal("anything"))
        self.assertEqual(parse_size("1.5KB"), 1536)
        for table, text in (
            ({"max": "1G", "min": 0}, "both be sizes"),
            ({"min": 5, "max": 1}, "min is above max"),
            ({"values": []}, "non-empty"),
            ({"between": [1, 2]}, "unknown rule key between"),
            ({"integer": "yes"}, "true or false"),
            ({"max": "8"}, "with a unit"),
            ("any", "a rule is a table"),
        ):
            with self.assertRaises(ValueError) as caught:
                OverrideRule.parse("K", table)
            self.assertIn(text, str(caught.exception))


# -- configuration -----------------------------------------------------------------


class ProfileConfiguration(SynchronousTestCase):
    def refused(self, profile: dict[str, Any], *texts: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            load_config({"profiles": {"p": profile}}, {}, {})
        for text in texts:
            self.assertIn(text, str(caught.exception))

    def test_strict(self) -> None:
        """
        Unknown keys and malformed values are start-up errors naming the
        profile and key.
        """
        self.refused({"cpu": 2, "gpu": 1}, "unknown keys cpu, gpu in [profiles.p]", "known keys: description")
        self.refused({"cpus": "2"}, "profiles.p.cpus", "expected int")
        self.refused({"env": {"KERNEL_ID": "x"}}, "profiles.p.env", "set by the gateway")
        self.refused({"env": {"A": "1"}, "default_env": {"A": "2"}}, "profiles.p.default_env", "also in env")
        self.refused({"env": {"KERNEL_X": "1"}, "overrides": {"KERNEL_X": {}}}, "profiles.p.overrides", "forced")
        self.refused({"overrides": {"PATH": {}}}, "only KERNEL_* names")
        self.refused({"overrides": {"KERNEL_CPUS": {"max": 4, "step": 1}}}, "unknown rule key step")
        self.refused({"image": "a", "allowed_images": ["b"]}, "profiles.p.image", "not one of allowed_images")
        self.refused({"cpus": 2, "launcher_config": {"cpus": 4}}, "cpus is set by the profile's cpus")
        self.refused({"launcher_config": {"authorized_users": "x"}}, "belongs to the kernelspec")
        self.refused({"memory": "lots"}, "profiles.p.memory")
        self.refused({"namespace": "Bad_NS"}, "profiles.p.namespace")
        self.refused({"partition": "a b"}, "profiles.p.partition")
        self.refused({"users": ["a b"]}, "profiles.p.users")
        with self.assertRaises(ConfigError) as caught:
            load_config({"profiles": {"p": "x"}}, {}, {})
        self.assertIn("profiles.p must be a table", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            load_config({"profiles": {"bad name": {}}}, {}, {})
        self.assertIn("a name is", str(caught.exception))

    def test_tenancy_settings(self) -> None:
        """
        The tenancy settings come from Enterprise Gateway's environment
        names, -1 meaning no per-user limit as there.
        """
        config = load_config(
            {}, {"EG_MAX_KERNELS_PER_USER": "-1", "EG_AUTHORIZED_USERS": "a, b", "EG_UNAUTHORIZED_USERS": "root"}, {}
        )
        self.assertEqual(
            (config.tenancy.max_kernels_per_user, config.tenancy.authorized_users, config.tenancy.unauthorized_users),
            (-1, ["a", "b"], ["root"]),
        )
        self.assertEqual(load_config({}, {}, {}).tenancy.unauthorized_users, [])

    def test_file(self) -> None:
        """
        A config file's [profiles.<name>] tables load; an unknown key there
        names the file, profile and key.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[profiles.a]\ncpus = 2\n[profiles.a.overrides]\nKERNEL_CPUS = { max = 4 }\n')
        config = load_config(load_toml(path), {}, {})
        self.assertEqual(config.profiles["a"].overrides, {"KERNEL_CPUS": {"max": 4}})
        with open(path, "w") as f:
            f.write('[profiles.a]\ncpu = 2\n')
        with self.assertRaises(ConfigError) as caught:
            load_toml(path)
        self.assertIn(f"config file {path}: unknown key cpu in [profiles.a]", str(caught.exception))

    def example(self, text: str, start: str, end: str, prefix: str) -> dict[str, Any]:
        block = text[text.index(start) + len(start) : text.index(end)]
        lines = [line[len(prefix):] if line.startswith(prefix) else line for line in block.splitlines()]
        return tomllib.loads("\n".join(lines))

    def test_documented_examples_load(self) -> None:
        """
        The README's profile example and etc/egateway.toml's commented one
        are valid configurations.
        """
        readme = open(os.path.join(ROOT, "README.md")).read()
        values = self.example(readme, "<!-- profile-example -->\n```toml\n", "```\n<!-- profile-example:end -->", "")
        config = load_config(values, {}, {})
        self.assertTrue(config.profiles)
        TenancyPolicy.from_config(config)
        etc = open(os.path.join(ROOT, "etc", "egateway.toml")).read()
        values = self.example(etc, "# profile-example:start\n", "# profile-example:end", "#  ")
        self.assertTrue(load_config(values, {}, {}).profiles)
        block = etc[etc.index("# profile-example:start") : etc.index("# profile-example:end")]
        # test_docs uncomments "# key = value" lines into settings.
        self.assertFalse(re.search(r"^# \w+ = ", block, re.M))
