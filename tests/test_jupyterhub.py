"""
JupyterHub API tokens against a real JupyterHub (the C{jupyterhub} package
from PyPI), started on loopback with its own directory.

The Hub runs without its proxy: its configuration installs an in-memory
proxy class (JupyterHub's proxy is pluggable), so C{configurable-http-proxy}
(an npm package) is not needed.  Only the Hub's own REST API is used: an
admin service token from the Hub's configuration creates a user, a group and
an API token, and later revokes the token.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from typing import Any

from treq.client import HTTPClient
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.test.requesthelper import DummyRequest

from egateway.api.authenticators.jupyterhub import JupyterHubAuthenticator
from tests.support.daemon import (
    LOOPBACK,
    ChildProcess,
    HttpApi,
    free_port,
    processes_mentioning,
    start_gateway,
    wait_until_answers,
)
from tests.support.wsclient import ChannelsClient

HUB_CONFIG = """
from jupyterhub.proxy import Proxy


class InMemoryProxy(Proxy):
    # Routes kept in memory: the tests use only the Hub's own API, so no
    # configurable-http-proxy process is needed.
    should_start = False
    routes = {{}}

    async def add_route(self, routespec, target, data):
        self.routes[routespec] = {{"routespec": routespec, "target": target, "data": data}}

    async def delete_route(self, routespec):
        self.routes.pop(routespec, None)

    async def get_all_routes(self):
        return dict(self.routes)


c = get_config()
c.JupyterHub.proxy_class = InMemoryProxy
c.JupyterHub.hub_bind_url = "http://{host}:{port}"
c.JupyterHub.bind_url = "http://{host}:{public_port}"
c.JupyterHub.db_url = "sqlite:///{workdir}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{workdir}/cookie_secret"
c.JupyterHub.pid_file = "{workdir}/jupyterhub.pid"
c.JupyterHub.authenticator_class = "dummy"
c.JupyterHub.cleanup_servers = True
# The gateway is known to the Hub as the service "egateway"; users may use
# it, so their tokens hold access:services!service=egateway unless made with
# fewer scopes.
c.JupyterHub.services = [
    {{"name": "egateway-test-admin", "api_token": "{admin_token}"}},
    {{"name": "egateway"}},
]
c.JupyterHub.load_roles = [
    {{
        "name": "egateway-test-admin",
        "scopes": ["admin:users", "admin:groups", "tokens"],
        "services": ["egateway-test-admin"],
    }},
    {{"name": "user", "scopes": ["self", "access:services!service=egateway"]}},
]
"""


class Hub:
    """
    One JupyterHub process and an admin client of its API.
    """

    def __init__(self, reactor: Any, workdir: str, port: int) -> None:
        self.reactor = reactor
        self.workdir = workdir
        self.port = port
        self.admin_token = secrets.token_hex(24)
        self.api_url = f"http://{LOOPBACK}:{port}/hub/api"
        self.process = ChildProcess("jupyterhub", os.path.join(workdir, "jupyterhub.log"), reactor)
        self.admin = HttpApi(reactor, f"http://{LOOPBACK}:{port}/", self.admin_token)

    def start(self) -> None:
        config = os.path.join(self.workdir, "jupyterhub_config.py")
        with open(config, "w") as f:
            f.write(
                HUB_CONFIG.format(
                    host=LOOPBACK,
                    port=self.port,
                    public_port=free_port(),
                    workdir=self.workdir,
                    admin_token=self.admin_token,
                )
            )
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "JPY_", "EG_"))}
        self.process.start([sys.executable, "-m", "jupyterhub", "-f", config], environ, self.workdir)

    async def create_user_token(self, name: str, group: str) -> tuple[str, str]:
        """
        A new Hub user in a new group, and an API token of theirs (with every
        scope the user has, the gateway's among them).

        @return: the token and its id (for revoking it).
        """
        await self.admin.call("POST", f"hub/api/users/{name}", expect=201)
        await self.admin.call("POST", f"hub/api/groups/{group}", {"users": [name]}, expect=201)
        return await self.create_token(name)

    async def create_token(self, name: str, scopes: list[str] | None = None) -> tuple[str, str]:
        """
        Another API token of user C{name}, with C{scopes} (default: all the
        user has).
        """
        body: dict[str, Any] = {"note": "egateway test"}
        if scopes is not None:
            body["scopes"] = scopes
        model = await self.admin.call("POST", f"hub/api/users/{name}/tokens", body, expect=201)
        return model["token"], model["id"]

    async def revoke(self, name: str, token_id: str) -> None:
        reply = await self.admin.request("DELETE", f"hub/api/users/{name}/tokens/{token_id}")
        if reply.code != 204:
            raise AssertionError(f"revoking the token: HTTP {reply.code}: {reply.body[:500]!r}")

    async def stop(self) -> Any:
        try:
            await self.admin.close()
        finally:
            report = await self.process.stop(20, marker=self.workdir)
        return report


async def start_hub(test: TestCase, reactor: Any = None) -> Hub:
    """
    Start a JupyterHub on a free loopback port and wait until its API
    answers.  The test's cleanup stops it and fails the test if it needed
    SIGKILL or left a process behind.
    """
    if reactor is None:
        from twisted.internet import reactor
    last: Exception | None = None
    for attempt in range(3):
        workdir = os.path.abspath(test.mktemp())
        os.makedirs(workdir)
        hub = Hub(reactor, workdir, free_port())
        hub.start()

        async def cleanup(hub: Hub = hub) -> None:
            report = await hub.stop()
            if not report.graceful:
                test.fail(f"{report.describe()}; log: {hub.process.log_path}")
            left = processes_mentioning(hub.workdir)
            if left:
                test.fail(f"processes outlived the Hub: {left}")

        test.addCleanup(cleanup)
        try:
            await wait_until_answers(hub.admin, "hub/api/", hub.process, 60, reactor)
        except RuntimeError as e:
            if hub.process.ended and "already in use" in hub.process.log_tail():
                last = e
                continue
            raise
        return hub
    raise RuntimeError(f"JupyterHub found no free port in 3 attempts: {last}")


def _request_with(token: str) -> DummyRequest:
    request = DummyRequest([])
    request.client = IPv4Address("TCP", LOOPBACK, 40000)
    request.requestHeaders.setRawHeaders(b"authorization", [f"token {token}".encode()])
    return request


class RealHubTests(TestCase):
    timeout = 180

    async def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.hub = await start_hub(self, reactor)
        self.token, self.token_id = await self.hub.create_user_token("hubtester", "physics")

    async def gateway_with_hub(self, **flags: str) -> Any:
        """
        A gateway daemon that checks tokens with the Hub, caching answers
        for one second, with more C{flags}.
        """
        return await start_gateway(
            self,
            token=self.token,
            flags={
                "authenticators": "jupyterhub",
                "jupyterhub-api-url": self.hub.api_url,
                "jupyterhub-cache-ttl": "1",
                **flags,
            },
            reactor=self.reactor,
        )

    async def test_token_accepted_then_revoked(self) -> None:
        """
        The Hub's token identifies its user and groups; once revoked at the
        Hub it still works until the cache entry expires, and not after.
        """
        pool = HTTPConnectionPool(self.reactor, persistent=False)
        clock = Clock()
        auth = JupyterHubAuthenticator(
            self.hub.api_url,
            clock=clock,
            http=HTTPClient(Agent(self.reactor, pool=pool)),
            reactor=self.reactor,
            cache_ttl=5,
            scope="access:services!service=egateway",
        )
        self.addCleanup(pool.closeCachedConnections)
        identity = await auth.authenticate(_request_with(self.token))
        self.assertEqual(
            (identity.username, identity.groups, identity.method), ("hubtester", frozenset({"physics"}), "jupyterhub")
        )
        self.assertIsNone(await auth.authenticate(_request_with(secrets.token_hex(16))))
        await self.hub.revoke("hubtester", self.token_id)
        cached = await auth.authenticate(_request_with(self.token))
        self.assertEqual(cached.username, "hubtester")
        clock.advance(6)
        self.assertIsNone(await auth.authenticate(_request_with(self.token)))

    async def test_gateway_with_hub_tokens(self) -> None:
        """
        egateway configured with the Hub starts kernels for the token's user
        (and refuses another KERNEL_USERNAME), refuses the token once it is
        revoked and its short cache entry has expired, and never logs it.
        """
        audit_path = os.path.join(os.path.abspath(self.mktemp()) + "-audit.jsonl")
        gateway = await self.gateway_with_hub(**{"audit-log": audit_path})
        model = await gateway.api.call("POST", "api/kernels", {}, expect=201)
        self.assertEqual(model["username"], "hubtester")
        # The WebSocket handshake goes through the same (network-bound)
        # check, and the kernel runs for the Hub's user.
        client = await ChannelsClient.connect(gateway.url, model["id"], token=self.token)
        try:
            result = await client.execute("print(__import__('os').environ['KERNEL_USERNAME'])")
        finally:
            await client.close()
        self.assertEqual(result["stdout"].strip(), "hubtester", result)
        refused = await gateway.api.request("POST", "api/kernels", {"env": {"KERNEL_USERNAME": "someone-else"}})
        self.assertEqual(refused.code, 403, refused.body)
        # The same user's token made for other uses (here, reading their
        # own model only) is valid at the Hub but not here.
        narrow, _ = await self.hub.create_token("hubtester", ["read:users!user=hubtester"])
        reply = await gateway.api.request("GET", "api/kernelspecs", token=narrow)
        self.assertEqual(reply.code, 401, reply.body)
        self.assertIn("access:services!service=egateway", json.loads(reply.body)["message"])
        await gateway.api.call("DELETE", f"api/kernels/{model['id']}", expect=204)

        await self.hub.revoke("hubtester", self.token_id)
        deadline = self.reactor.seconds() + 20
        while True:
            reply = await gateway.api.request("GET", "api")
            if reply.code == 401:
                break
            self.assertEqual(reply.code, 200, reply.body)
            self.assertLess(self.reactor.seconds(), deadline, "the revoked token was still accepted after 20 s")
            await deferLater(self.reactor, 0.2, lambda: None)
        self.assertEqual(json.loads(reply.body)["message"], "the token is not valid")

        report = await gateway.stop()
        self.assertTrue(report.graceful, report.describe())
        with open(gateway.process.log_path) as f:
            gateway_log = f.read()
        with open(audit_path) as f:
            audit_lines = [json.loads(line) for line in f]
        self.assertNotIn(self.token, gateway_log)
        self.assertNotIn(self.token, json.dumps(audit_lines))
        launches = [e for e in audit_lines if e["kind"] == "kernel.launch"]
        self.assertEqual([(e["user"], e["kernel_id"]) for e in launches], [("hubtester", model["id"])])
        self.assertIn("auth.failure", {e["kind"] for e in audit_lines})
        self.assertEqual([e["user"] for e in audit_lines if e["kind"] == "websocket.connect"], ["hubtester"])

    async def test_websocket_closed_when_token_revoked(self) -> None:
        """
        A channels WebSocket opened with a Hub token is closed (4003, saying
        why) once the Hub revokes the token: the gateway checks open
        sockets' tokens every jupyterhub_recheck_interval seconds.
        """
        gateway = await self.gateway_with_hub(**{"jupyterhub-recheck-interval": "1"})
        model = await gateway.api.call("POST", "api/kernels", {}, expect=201)
        client = await ChannelsClient.connect(gateway.url, model["id"], token=self.token)
        self.assertEqual((await client.execute("6 * 7"))["result"]["text/plain"], "42")
        await self.hub.revoke("hubtester", self.token_id)
        closed: Deferred[None] = Deferred()
        client.closed.addBoth(lambda _: closed.callback(None) if not closed.called else None)
        await closed.addTimeout(20, self.reactor)
        self.assertEqual((client.close_code, client.close_reason), (4003, "your credentials were revoked"))
