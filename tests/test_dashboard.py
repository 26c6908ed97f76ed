"""
The admin dashboard's routes (L{egateway.ops.dashboard}) over fake kernels:
who may use them, the overview, the actions, the cookie a browser uses and
its CSRF guard, and the live event stream.  The page itself, in a real
browser against a real daemon, is in L{tests.test_dashboard_browser}.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from egateway.api.cors import CorsPolicy
from egateway.api.authenticators import build_authentication
from egateway.api.http import FrontResource
from egateway.clusters.balancing import HostHealth
from egateway.kernels.state import KernelState
from egateway.api.identity import Identity
from egateway.ops.dashboard import AdminCookie, AdminDashboard
from tests.support.fakes import make_manager
from tests.test_tenancy import TenancyTestCase, as_user, run_now, token_of

KID = "0b5e3a0c-1d8e-4f55-9b9e-3f0e6c1a2b3c"


class DashboardTestCase(TenancyTestCase):
    """
    The gateway's routes behind the dashboard's cookie wrapper and the
    front resource, with per-user tokens (carol is the admin).
    """

    flags = {"max-kernels-per-user": "3"}

    def setUp(self) -> None:
        super().setUp()
        authentication = build_authentication(self.config.auth, self.clock, None, blocking=run_now)
        front = FrontResource(self.api.resource(), authentication, CorsPolicy(self.config.auth))
        self.stub = StubTreq(AdminCookie(front, "/"))
        self.dashboard = self.api.dashboard

    def send(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, Any, Any]:
        d = self.stub.request(method, "http://gw.example" + path, headers=headers)
        for _ in range(4):
            self.stub.flush()
            self.clock.advance(0.1)
        response = self.successResultOf(d)
        content_d = response.content()
        self.stub.flush()
        content = self.successResultOf(content_d)
        return response.code, (json.loads(content) if content else None), response.headers


class AdminsOnly(DashboardTestCase):
    def test_users_who_are_not_admins_are_refused(self) -> None:
        """
        A user who is not an admin gets a JSON 403 from every dashboard
        route, and nothing happens to the kernel; the admin is served.
        """
        kid = self.start("alice")["id"]
        for method, path in (
            ("GET", "/admin"),
            ("GET", "/admin/static/dashboard.js"),
            ("GET", "/api/admin/overview"),
            ("GET", "/api/admin/events"),
            ("POST", "/api/admin/cull"),
            ("POST", f"/api/admin/kernels/{kid}/interrupt"),
            ("POST", f"/api/admin/kernels/{kid}/restart"),
            ("POST", f"/api/admin/kernels/{kid}/shutdown"),
        ):
            self.refused(self.call(method, path, user="alice"), 403, "admin")
        self.assertEqual(self.manager.kernels[kid].state, KernelState.RUNNING)
        self.assertEqual(self.manager.kernels[kid].restart_count, 0)
        code, overview, _ = self.call("GET", "/api/admin/overview", user="carol")
        self.assertEqual(code, 200, overview)
        self.refused(self.call("GET", "/api/admin/overview"), 401)


class SharedTokenIsNoAdmin(DashboardTestCase):
    flags = {"auth-token": "shared-t0ken-Xk3"}

    def test_refused(self) -> None:
        """
        The shared token names no user, so it is no admin (as for drain).
        """
        code, body, _ = self.send("GET", "/api/admin/overview", {"Authorization": "token shared-t0ken-Xk3"})
        self.assertEqual(code, 403, body)
        self.assertIn("names no user", body["message"])


class Overview(DashboardTestCase):
    def test_kernels_users_quotas_store(self) -> None:
        """
        The overview lists every user's kernels with owner, launcher,
        state and placement, each user's kernels against the per-user quota,
        and says there is no store.
        """
        first = self.start("alice")["id"]
        second = self.start("alice")["id"]
        third = self.start("bob")["id"]
        code, overview, _ = self.call("GET", "/api/admin/overview", user="carol")
        self.assertEqual(code, 200, overview)
        kernels = {k["id"]: k for k in overview["kernels"]}
        self.assertEqual(set(kernels), {first, second, third})
        self.assertEqual(
            (kernels[first]["owner"], kernels[first]["launcher"], kernels[first]["state"]), ("alice", "fake", "running")
        )
        self.assertIn("placement", kernels[first])
        self.assertEqual(
            overview["users"],
            [
                {"user": "alice", "kernels": 2, "launching": 0, "groups": ["physics"]},
                {"user": "bob", "kernels": 1, "launching": 0, "groups": []},
            ],
        )
        self.assertEqual(overview["groups"], [{"group": "physics", "kernels": 2}])
        self.assertEqual(overview["quotas"]["max_kernels_per_user"], 3)
        self.assertEqual(overview["store"], {"persistence": False})
        self.assertEqual(overview["hosts"], [])


class Actions(DashboardTestCase):
    def test_admin_acts_on_any_kernel(self) -> None:
        """
        The admin interrupts, restarts and shuts down another user's kernel;
        an unknown kernel is a JSON 404.
        """
        kid = self.start("alice")["id"]
        code, _, _ = self.call("POST", f"/api/admin/kernels/{kid}/interrupt", user="carol")
        self.assertEqual(code, 204)
        code, model, _ = self.call("POST", f"/api/admin/kernels/{kid}/restart", user="carol")
        self.assertEqual((code, model["restarts"]), (200, 1))
        code, _, _ = self.call("POST", f"/api/admin/kernels/{kid}/shutdown", user="carol")
        self.assertEqual(code, 204)
        self.assertNotIn(kid, self.manager.kernels)
        self.refused(self.call("POST", f"/api/admin/kernels/{KID}/shutdown", user="carol"), 404)

    def test_cull_now_with_culling_off_takes_dead_kernels_only(self) -> None:
        """
        With culling off, "cull now" leaves running kernels alone and
        removes a dead one.
        """
        alive = self.start("alice")["id"]
        dead = self.start("bob")["id"]
        kernel = self.manager.kernels[dead]
        kernel.reason = "it died"
        kernel.transition(KernelState.DEAD, "it died")
        code, result, _ = self.call("POST", "/api/admin/cull", user="carol")
        self.assertEqual((code, result), (200, {"culled": 1}))
        self.assertEqual(list(self.manager.kernels), [alive])


class Cookie(DashboardTestCase):
    def cookie(self, user: str) -> dict[str, str]:
        return {"Cookie": f"egateway_admin={token_of(user)}"}

    def test_cookie_on_dashboard_paths_only(self) -> None:
        """
        The dashboard's cookie authenticates the dashboard's routes and
        nothing else in the API.
        """
        code, overview, _ = self.send("GET", "/api/admin/overview", self.cookie("carol"))
        self.assertEqual(code, 200, overview)
        code, body, _ = self.send("GET", "/api/kernels", self.cookie("carol"))
        self.assertEqual(code, 401, body)
        code, body, _ = self.send("GET", "/api/admin/overview", self.cookie("alice"))
        self.assertEqual(code, 403, body)

    def test_actions_with_the_cookie_need_the_page_header(self) -> None:
        """
        An action carried by the cookie alone (what a forged cross-site
        form would send) is refused and changes nothing; with the header
        the page's script sets, it is done.  A caller sending its token
        itself needs no header.
        """
        kid = self.start("alice")["id"]
        path = f"/api/admin/kernels/{kid}/shutdown"
        code, body, _ = self.send("POST", path, self.cookie("carol"))
        self.assertEqual(code, 403, body)
        self.assertIn("X-Egateway-Dashboard", body["message"])
        self.assertEqual(self.manager.kernels[kid].state, KernelState.RUNNING)
        code, body, _ = self.send("POST", path, {**self.cookie("carol"), "X-Egateway-Dashboard": "1"})
        self.assertEqual(code, 204, body)
        self.assertNotIn(kid, self.manager.kernels)
        code, body, _ = self.send("POST", "/api/admin/cull", as_user("carol"))
        self.assertEqual(code, 200, body)


class Events(DashboardTestCase):
    def test_stream_follows_kernels(self) -> None:
        """
        The event stream starts with a summary, then sends a kernel's model
        as it launches and runs, and its removal when it is shut down; it
        ends when the gateway stops.
        """
        headers = {**as_user("carol"), "Accept": "text/event-stream"}
        d = self.stub.request("GET", "http://gw.example/api/admin/events", headers=headers)
        self.stub.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream; charset=utf-8"])
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        self.stub.flush()

        def events() -> list[tuple[str, Any]]:
            text = b"".join(chunks).decode()
            found = []
            for block in text.split("\n\n"):
                fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
                if "event" in fields:
                    found.append((fields["event"], json.loads(fields["data"])))
            return found

        self.assertEqual([name for name, _ in events()], ["summary"])
        kid = self.start("alice")["id"]
        self.stub.flush()
        states = [data["state"] for name, data in events() if name == "kernel" and data["id"] == kid]
        self.assertEqual((states[0], states[-1]), ("launching", "running"))
        self.clock.advance(1)
        self.stub.flush()
        summaries = [data for name, data in events() if name == "summary"]
        self.assertEqual(summaries[-1]["users"][0]["user"], "alice")
        self.call("DELETE", f"/api/kernels/{kid}", user="alice")
        self.stub.flush()
        self.assertIn(("removed", kid), [(name, data.get("id")) for name, data in events()])
        self.dashboard.stopService()
        self.stub.flush()
        self.successResultOf(done)
        self.assertEqual(events()[-1][0], "bye")

    def test_stream_needs_accept(self) -> None:
        """
        A client that does not ask for an event stream gets a JSON 406 at
        once rather than a response that never ends.
        """
        self.refused(self.call("GET", "/api/admin/events", user="carol"), 406, "text/event-stream")


class Hosts(DashboardTestCase):
    flags = {"remote-hosts": "h1,h2"}

    def test_remote_launcher_hosts(self) -> None:
        """
        A launcher that keeps host health (as the SSH launcher does) shows
        its configured hosts and the hosts its kernels run on, with a backed
        off host's failures and the back-off left.
        """
        self.launcher.health = HostHealth(self.clock, initial=5.0)
        self.start("alice")
        self.launcher.health.failed("h2", "connection refused")
        code, overview, _ = self.call("GET", "/api/admin/overview", user="carol")
        self.assertEqual(code, 200, overview)
        hosts = {h["host"]: h for h in overview["hosts"]}
        self.assertEqual(set(hosts), {"h1", "h2", "fakehost"})
        self.assertEqual((hosts["h1"]["up"], hosts["h1"]["kernels"]), (True, 0))
        self.assertEqual((hosts["fakehost"]["launcher"], hosts["fakehost"]["kernels"]), ("fake", 1))
        self.assertEqual((hosts["h2"]["up"], hosts["h2"]["failures"]), (False, 1))
        self.assertGreater(hosts["h2"]["backoff_remaining"], 0)


class HostStatus(SynchronousTestCase):
    def test_backoff_reported(self) -> None:
        """
        A failed host is reported down with its failures and the back-off
        left; a configured host without failures is up.
        """
        clock = Clock()
        health = HostHealth(clock, initial=5.0)
        health.failed("b", "refused")
        clock.advance(2)
        self.assertEqual(
            health.status(["a", "b"]),
            [
                {"host": "a", "up": True, "failures": 0, "backoff_remaining": 0.0},
                {"host": "b", "up": False, "failures": 1, "backoff_remaining": 3.0},
            ],
        )


class PageCookie(TestCase):
    async def test_cookie_attributes(self) -> None:
        """
        The first load with C{?token=} sets the cookie HttpOnly, SameSite
        Strict and, over TLS, Secure, and the page carries a strict
        Content-Security-Policy; a load without a token sets none.
        """
        from twisted.internet import reactor

        clock = Clock()
        manager, _, _ = make_manager(clock)
        dashboard = AdminDashboard(
            manager=manager, cull=lambda: 0, base_url="/", reactor=reactor, threadpool=reactor.getThreadPool()
        )
        for secure in (False, True):
            request = DummyRequest([b"admin"])
            request.args = {b"token": [b"carol t0ken;x"]}
            request.gateway_user = Identity("carol", admin=True, authenticated=True)
            request.isSecure = lambda secure=secure: secure  # type: ignore[method-assign]
            body = await dashboard.page(request)
            self.assertIn(b"<title>egateway admin</title>", body)
            cookie = request.responseHeaders.getRawHeaders(b"set-cookie")[0].decode()
            expected = "egateway_admin=carol%20t0ken%3Bx; Path=/; HttpOnly; SameSite=Strict"
            self.assertEqual(cookie, expected + ("; Secure" if secure else ""))
            self.assertIn(b"script-src 'self'", request.responseHeaders.getRawHeaders(b"content-security-policy")[0])
        request = DummyRequest([b"admin"])
        request.gateway_user = Identity("carol", admin=True, authenticated=True)
        await dashboard.page(request)
        self.assertIsNone(request.responseHeaders.getRawHeaders(b"set-cookie"))
