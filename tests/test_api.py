"""
Every REST route with its error cases, authentication on every route, CORS
and Origin checks, and the OpenAPI document's agreement with the routes.

The routes run over a kernel manager with fake launchers (StubTreq, Clock);
test_integration and test_daemon drive the same routes with real kernels.
"""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase

from egateway.api.hosts import HostPolicy
from egateway.clusters.interface import LaunchError
from egateway.config import build_config
from egateway.tap import build_api
from tests.support.fakes import fake_spec, make_manager
from tests.support.stubapi import assert_json_error, json_body, stub_call

KID = "0b5e3a0c-1d8e-4f55-9b9e-3f0e6c1a2b3c"
MISSING_PROXY = "enterprise_gateway.services.processproxies.spark_operator.SparkOperatorProcessProxy"


class APITestCase(SynchronousTestCase):
    flags: dict[str, str] = {}
    manager_settings: dict[str, Any] = {}
    specs: tuple[Any, ...] = ()

    def setUp(self) -> None:
        self.clock = Clock()
        # The stub's requests name gw.example: allowed, as if it were this
        # gateway's name (DnsRebinding checks the refusal of other names).
        self.config = build_config({}, {}, {"allowed-hosts": "gw.example", **self.flags})
        self.manager, self.launcher, self.channels = make_manager(
            self.clock, *self.specs, **self.manager_settings
        )
        self.api, front = build_api(self.config, self.manager, self.clock, ThreadPool())
        self.stub = StubTreq(front)

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any, Any]:
        data = raw if raw is not None else json_body(body)
        return stub_call(self, self.stub, self.clock, method, path, data, headers)

    def assertError(self, result: tuple[int, Any, Any], status: int, text: str = "") -> None:
        assert_json_error(self, result, status, text)

    def start(self) -> dict[str, Any]:
        code, model, _ = self.call("POST", "/api/kernels", {})
        self.assertEqual(code, 201, model)
        return model


class InfoRoutes(APITestCase):
    def test_api(self) -> None:
        """
        /api answers with the API and gateway versions.
        """
        code, body, headers = self.call("GET", "/api")
        self.assertEqual(code, 200)
        self.assertEqual(set(body), {"version", "gateway_version"})
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(headers.getRawHeaders(b"x-content-type-options"), [b"nosniff"])

    def test_unknown_path_and_method(self) -> None:
        """
        Unknown paths are JSON 404s and wrong methods JSON 405s, never HTML.
        """
        self.assertError(self.call("GET", "/tree"), 404, "/tree")
        self.assertError(self.call("GET", "/api/kernels/not-a-uuid"), 404)
        self.assertError(self.call("PUT", "/api/kernels"), 405, "GET")

    def test_kernelspecs(self) -> None:
        """
        The kernelspec list names the default; one spec can be fetched; an
        unknown one is a 404.
        """
        code, body, _ = self.call("GET", "/api/kernelspecs")
        self.assertEqual(code, 200)
        self.assertEqual(body["default"], "fake")
        self.assertEqual(body["kernelspecs"]["fake"]["spec"]["display_name"], "Fake fake")
        code, body, _ = self.call("GET", "/api/kernelspecs/fake")
        self.assertEqual((code, body["name"]), (200, "fake"))
        self.assertError(self.call("GET", "/api/kernelspecs/nope"), 404, "nope")
        self.assertError(self.call("GET", "/kernelspecs/nope/logo-64x64.png"), 404)


class KernelRoutes(APITestCase):
    def test_start(self) -> None:
        """
        POST /api/kernels with an empty body starts the default kernel and
        answers 201 with its model and Location.
        """
        code, model, headers = self.call("POST", "/api/kernels")
        self.assertEqual(code, 201)
        self.assertEqual(model["name"], "fake")
        self.assertEqual(model["execution_state"], "idle")
        self.assertEqual(model["connections"], 0)
        self.assertEqual(headers.getRawHeaders(b"location"), [f"/api/kernels/{model['id']}".encode()])
        for key in ("id", "name", "last_activity", "execution_state", "connections", "started", "placement"):
            self.assertIn(key, model)

    def test_start_errors(self) -> None:
        """
        Malformed bodies and envs are 400s; an unknown kernelspec a 404.
        """
        self.assertError(self.call("POST", "/api/kernels", raw=b"{not json"), 400, "not valid JSON")
        self.assertError(self.call("POST", "/api/kernels", [1, 2]), 400, "JSON object")
        self.assertError(self.call("POST", "/api/kernels", {"env": "x"}), 400, "'env'")
        self.assertError(self.call("POST", "/api/kernels", {"env": {"KERNEL_A": 1}}), 400, "KERNEL_A")
        self.assertError(self.call("POST", "/api/kernels", {"name": 5}), 400, "'name'")
        self.assertError(self.call("POST", "/api/kernels", {"name": "nope"}), 404, "nope")
        self.assertEqual(self.manager.kernels, {})

    def test_deeply_nested_bodies(self) -> None:
        """
        A body nested deeper than the parser's stack (or just deeper than any
        route needs) is a 400 on every route that reads one, never a 500.
        """
        kid = self.start()["id"]
        for depth in (100, 100_000):
            raw = b'{"env": ' + b"[" * depth + b"]" * depth + b"}"
            for method, path in (
                ("POST", "/api/kernels"),
                ("POST", "/api/sessions"),
                ("PUT", f"/api/kernels/{kid}/acl"),
            ):
                self.assertError(self.call(method, path, raw=raw), 400, "nested more than 64 levels")
        self.assertEqual(list(self.manager.kernels), [kid])

    def test_launch_failure(self) -> None:
        """
        A failed launch is a 500 whose message names the cause.
        """
        self.launcher.fail_with = LaunchError("sbatch: invalid partition")
        self.assertError(self.call("POST", "/api/kernels", {}), 500, "sbatch: invalid partition")

    def test_launch_timeout(self) -> None:
        """
        A launch that times out is a 504 naming the phase.
        """
        self.launcher.hold = True
        d = self.stub.request("POST", "http://gw.example/api/kernels", data=b"{}")
        self.stub.flush()
        self.clock.advance(31)
        self.stub.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 504)
        body = json.loads(self.successResultOf(response.content()))
        self.assertIn("last phase: submitted", body["message"])

    def test_get_delete(self) -> None:
        """
        A kernel can be fetched and deleted; afterwards it is a 404.
        """
        model = self.start()
        code, body, _ = self.call("GET", f"/api/kernels/{model['id']}")
        self.assertEqual((code, body["id"]), (200, model["id"]))
        code, body, _ = self.call("DELETE", f"/api/kernels/{model['id']}")
        self.assertEqual((code, body), (204, None))
        self.assertError(self.call("GET", f"/api/kernels/{model['id']}"), 404, model["id"])
        self.assertError(self.call("DELETE", f"/api/kernels/{model['id']}"), 404)

    def test_interrupt_and_restart(self) -> None:
        """
        Interrupt answers 204, restart 200 with the model; both 404 for an
        unknown kernel.
        """
        model = self.start()
        code, _, _ = self.call("POST", f"/api/kernels/{model['id']}/interrupt")
        self.assertEqual(code, 204)
        code, body, _ = self.call("POST", f"/api/kernels/{model['id']}/restart")
        self.assertEqual((code, body["id"], body["restarts"]), (200, model["id"], 1))
        self.assertError(self.call("POST", f"/api/kernels/{KID}/interrupt"), 404)
        self.assertError(self.call("POST", f"/api/kernels/{KID}/restart"), 404)

    def test_listing_on_by_default(self) -> None:
        """
        Listing is on by default, as JupyterLab polls the list through
        jupyter_server's gateway client.
        """
        model = self.start()
        code, body, _ = self.call("GET", "/api/kernels")
        self.assertEqual((code, [k["id"] for k in body]), (200, [model["id"]]))
        self.assertEqual(self.call("GET", "/api/sessions")[:2], (200, []))

    def test_channels_needs_upgrade(self) -> None:
        """
        A plain GET on the channels route is a 400; for an unknown kernel a
        404.
        """
        model = self.start()
        self.assertError(self.call("GET", f"/api/kernels/{model['id']}/channels"), 400, "WebSocket")
        self.assertError(self.call("GET", f"/api/kernels/{KID}/channels"), 404)

    def test_channels_session_id_not_cut(self) -> None:
        """
        A session_id longer than the gateway keeps is refused (400) rather
        than cut, since a cut id would name another session than the one the
        WebSocket attaches to.
        """
        model = self.start()
        upgrade = {"Upgrade": "websocket", "Connection": "Upgrade"}
        path = f"/api/kernels/{model['id']}/channels?session_id={'s' * 129}"
        self.assertError(self.call("GET", path, headers=upgrade), 400, "session_id")


class ListingOff(APITestCase):
    flags = {"list-kernels": "false"}

    def test_listing_disabled(self) -> None:
        """
        Without list_kernels, listing kernels and sessions is a JSON 403
        naming the setting that turns it on.
        """
        for path, what in (("/api/kernels", "kernels"), ("/api/sessions", "sessions")):
            result = self.call("GET", path)
            self.assertError(result, 403, f"listing {what} is turned off")
            self.assertIn("EG_LIST_KERNELS=true", result[1]["message"])
            self.assertNotIn("%s", result[1]["message"])


class MissingLauncher(APITestCase):
    specs = (
        fake_spec(),
        fake_spec(
            "spark_operator",
            metadata={"process_proxy": {"class_name": MISSING_PROXY, "config": {}}},
        ),
        fake_spec("nomad", metadata={"egateway": {"launcher": "nomad"}}),
    )

    def test_kernelspec_for_a_launcher_egateway_lacks(self) -> None:
        """
        A kernelspec (Enterprise Gateway's or egateway's) naming a launcher
        this gateway does not have is refused with 501 naming the launcher
        (and the process proxy class it comes from); nothing is launched.
        """
        result = self.call("POST", "/api/kernels", {"name": "spark_operator"})
        self.assertError(result, 501, "'spark-operator'")
        self.assertIn(MISSING_PROXY, result[1]["message"])
        self.assertEqual(result[1]["reason"], "Not Implemented")
        self.assertError(self.call("POST", "/api/kernels", {"name": "nomad"}), 501, "no launcher named 'nomad'")
        self.assertEqual((self.manager.kernels, self.launcher.processes), ({}, []))


class Limits(APITestCase):
    manager_settings = {"max_kernels": 1}

    def test_limit(self) -> None:
        """
        Past max_kernels a start is a 403 naming the limit.
        """
        self.start()
        self.assertError(self.call("POST", "/api/kernels", {}), 403, "max kernels limit of 1")


class ListingAndSessions(APITestCase):
    flags = {"list-kernels": "true"}

    def test_list(self) -> None:
        """
        With list_kernels, GET /api/kernels lists every kernel.
        """
        model = self.start()
        code, body, _ = self.call("GET", "/api/kernels")
        self.assertEqual((code, [k["id"] for k in body]), (200, [model["id"]]))

    def test_session_lifecycle(self) -> None:
        """
        A session can be created (starting a kernel), fetched, renamed,
        listed and deleted (shutting its kernel down).
        """
        code, session, headers = self.call(
            "POST", "/api/sessions", {"path": "a.ipynb", "type": "notebook", "name": "a", "kernel": {"name": "fake"}}
        )
        self.assertEqual(code, 201, session)
        self.assertEqual((session["path"], session["type"], session["notebook"]["path"]), ("a.ipynb", "notebook", "a.ipynb"))
        self.assertEqual(headers.getRawHeaders(b"location"), [f"/api/sessions/{session['id']}".encode()])
        kernel_id = session["kernel"]["id"]
        code, again, _ = self.call("GET", f"/api/sessions/{session['id']}")
        self.assertEqual((code, again["kernel"]["id"]), (200, kernel_id))
        code, patched, _ = self.call("PATCH", f"/api/sessions/{session['id']}", {"path": "b.ipynb"})
        self.assertEqual((code, patched["path"]), (200, "b.ipynb"))
        code, listed, _ = self.call("GET", "/api/sessions")
        self.assertEqual([s["id"] for s in listed], [session["id"]])
        code, _, _ = self.call("DELETE", f"/api/sessions/{session['id']}")
        self.assertEqual(code, 204)
        self.assertNotIn(kernel_id, self.manager.kernels)
        self.assertError(self.call("GET", f"/api/sessions/{session['id']}"), 404)

    def test_session_with_existing_kernel(self) -> None:
        """
        A session can bind an existing kernel by id; an unknown id is a 404.
        """
        model = self.start()
        code, session, _ = self.call(
            "POST", "/api/sessions", {"path": "x", "type": "console", "kernel": {"id": model["id"]}}
        )
        self.assertEqual((code, session["kernel"]["id"]), (201, model["id"]))
        self.assertError(
            self.call("POST", "/api/sessions", {"path": "y", "type": "console", "kernel": {"id": KID}}), 404
        )

    def test_session_errors(self) -> None:
        """
        Missing path or type, or a non-object body, are 400s; an unknown
        session is a 404.
        """
        self.assertError(self.call("POST", "/api/sessions", {"type": "notebook"}), 400, "'path'")
        self.assertError(self.call("POST", "/api/sessions", {"path": "a"}), 400, "'type'")
        self.assertError(self.call("POST", "/api/sessions", [1]), 400)
        self.assertError(self.call("POST", "/api/sessions", {"path": "a", "type": "t", "kernel": 3}), 400)
        self.assertError(self.call("GET", f"/api/sessions/{KID}"), 404)
        self.assertError(self.call("PATCH", f"/api/sessions/{KID}", {"path": "q"}), 404)
        self.assertError(self.call("DELETE", f"/api/sessions/{KID}"), 404)

    def test_session_removed_with_its_kernel(self) -> None:
        """
        Deleting a session's kernel removes the session.
        """
        code, session, _ = self.call("POST", "/api/sessions", {"path": "a", "type": "notebook"})
        self.call("DELETE", f"/api/kernels/{session['kernel']['id']}")
        self.assertError(self.call("GET", f"/api/sessions/{session['id']}"), 404)


ROUTES = [
    ("GET", "/api"),
    ("GET", "/api/openapi.json"),
    ("GET", "/api/swagger.json"),
    ("GET", "/api/kernelspecs"),
    ("GET", "/api/kernelspecs/fake"),
    ("GET", "/kernelspecs/fake/logo-64x64.png"),
    ("GET", "/api/kernels"),
    ("POST", "/api/kernels"),
    ("GET", f"/api/kernels/{KID}"),
    ("DELETE", f"/api/kernels/{KID}"),
    ("POST", f"/api/kernels/{KID}/interrupt"),
    ("POST", f"/api/kernels/{KID}/restart"),
    ("GET", f"/api/kernels/{KID}/channels"),
    ("GET", "/api/sessions"),
    ("POST", "/api/sessions"),
    ("GET", f"/api/sessions/{KID}"),
    ("PATCH", f"/api/sessions/{KID}"),
    ("DELETE", f"/api/sessions/{KID}"),
    ("GET", "/no/such/route"),
]


class Authentication(APITestCase):
    # Many wrong tokens from one address: without the limit they stay 401s.
    flags = {"auth-token": "s3cret", "list-kernels": "true", "auth-failure-limit": "0"}

    def test_every_route_requires_the_token(self) -> None:
        """
        Every route, unknown ones included, answers 401 JSON without a token
        or with a wrong one, and starts nothing.
        """
        for method, path in ROUTES:
            self.assertError(self.call(method, path, {}), 401, "token")
            self.assertError(
                self.call(method, path, {}, headers={"Authorization": "token wrong"}), 401, "not valid"
            )
            self.assertError(self.call(method, path + "?token=wrong", {}), 401)
        self.assertEqual(self.launcher.processes, [])

    def test_token_accepted(self) -> None:
        """
        The token works in the Authorization header (token or Bearer scheme)
        and as ?token=.
        """
        for headers, query in (
            ({"Authorization": "token s3cret"}, ""),
            ({"Authorization": "Bearer s3cret"}, ""),
            ({}, "?token=s3cret"),
        ):
            code, _, _ = self.call("GET", "/api" + query, headers=headers)
            self.assertEqual(code, 200)

    def test_preflight_without_token(self) -> None:
        """
        CORS preflight (OPTIONS) needs no token.
        """
        code, _, _ = self.call("OPTIONS", "/api/kernels")
        self.assertEqual(code, 204)


class Cors(APITestCase):
    flags = {"allow-origin": "https://lab.example", "allow-methods": "GET,POST", "max-age": "600"}

    def test_headers(self) -> None:
        """
        Configured CORS headers are sent on every response.
        """
        _, _, headers = self.call("GET", "/api")
        self.assertEqual(headers.getRawHeaders(b"access-control-allow-origin"), [b"https://lab.example"])
        self.assertEqual(headers.getRawHeaders(b"access-control-allow-methods"), [b"GET,POST"])
        self.assertEqual(headers.getRawHeaders(b"access-control-max-age"), [b"600"])

    def test_origin_check(self) -> None:
        """
        A page from another origin is refused with 403; the allowed origin and
        same-origin requests pass.
        """
        self.assertError(self.call("GET", "/api", headers={"Origin": "https://evil.example"}), 403, "allow_origin")
        code, _, _ = self.call("GET", "/api", headers={"Origin": "https://lab.example"})
        self.assertEqual(code, 200)
        code, _, _ = self.call("GET", "/api", headers={"Origin": "http://gw.example", "Host": "gw.example"})
        self.assertEqual(code, 200)


class OpenAPI(APITestCase):
    def test_document_matches_routes(self) -> None:
        """
        The OpenAPI document lists exactly the routes the gateway serves,
        with the same methods.
        """
        code, document, _ = self.call("GET", "/api/openapi.json")
        self.assertEqual(code, 200)
        documented = {
            (method.upper(), path)
            for path, item in document["paths"].items()
            for method in item
            if method != "parameters"
        }
        served = set()
        for rule in self.api.app.url_map.iter_rules():
            path = rule.rule
            for name in rule.arguments:
                path = path.replace(f"<uuidtext:{name}>", "{%s}" % name)
                path = path.replace(f"<string:{name}>", "{%s}" % name)
                path = path.replace(f"<path:{name}>", "{%s}" % name)
            for method in rule.methods - {"HEAD", "OPTIONS"}:
                served.add((method, path))
        self.assertEqual(documented, served)


class HostPolicyTests(SynchronousTestCase):
    def test_names_of_each_listener(self) -> None:
        """
        Loopback names and addresses always pass; a listener on every
        interface also admits any address and the host's own name; one on a
        given address, that address; anything else needs allowed_hosts.
        """
        cases = {
            "tcp:8888:interface=127.0.0.1": {"localhost:8888": True, "a.localhost": True, "127.0.0.2": True,
                                             "[::1]:8888": True, "gw1": False, "10.1.2.3": False,
                                             "evil.example": False},
            "tcp:8888": {"10.1.2.3:8888": True, "[2001:db8::1]": True, "gw1": True, "gw1.corp.example": True,
                         "evil.example": False, "gw1.evil.example": False},
            "tcp6:8888:interface=\\:\\:": {"[2001:db8::1]:8888": True, "evil.example": False},
            "ssl:8443:privateKey=k.pem:interface=10.1.2.3": {"10.1.2.3:8443": True, "10.1.2.4": False,
                                                             "gw1": True, "evil.example": False},
            "tcp:8888:interface=gw.internal": {"gw.internal:8888": True, "evil.example": False},
            "unix:/run/egateway.sock": {"localhost": True, "gw1": False, "10.1.2.3": False},
        }
        for listen, hosts in cases.items():
            policy = HostPolicy(listen, hostname="gw1.corp.example")
            self.assertEqual({host: policy.allows(host) for host in hosts}, hosts, listen)
        policy = HostPolicy("tcp:8888:interface=127.0.0.1", [".lab.example", "Notebooks.Example"], hostname="gw1")
        self.assertEqual(
            [policy.allows(h) for h in ("n1.lab.example", "notebooks.example:80", "lab.example.evil", "gw1")],
            [True, True, False, False],
        )
        self.assertTrue(HostPolicy("tcp:8888:interface=127.0.0.1", ["*"]).allows("evil.example"))

    def test_only_without_authentication(self) -> None:
        """
        Through the front: a foreign Host is a JSON 403 without
        authentication, and not checked once authentication is on (a
        rebinding page has no credentials).
        """
        for flags, code in (({}, 403), ({"auth-token": "t0ken-Kq3v"}, 200)):
            config = build_config({}, {}, flags)
            manager, _, _ = make_manager(Clock())
            _, front = build_api(config, manager, Clock(), ThreadPool())
            result = stub_call(self, StubTreq(front), Clock(), "GET", "/api", None, {"Authorization": "token t0ken-Kq3v"})
            self.assertEqual(result[0], code, result[1])
            if code == 403:
                assert_json_error(self, result, 403, "allowed_hosts")

