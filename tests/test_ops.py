"""
Operating the gateway: health and readiness probes, draining for rolling
upgrades (admin API and SIGUSR1).

The routes run in memory (StubTreq, Clock) over fake launchers; the daemon
tests drive a real C{twistd egateway} with real kernels and a real Redis.
"""

from __future__ import annotations

import os
import signal
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from egateway.ops.health import Drain, Readiness
from egateway.store.crypto import SecretBox
from tests.fixtures import RedisServer
from tests.fixtures.system import REDIS_PACKAGES, require_packages
from tests.support.daemon import GatewayDaemon, Reply, start_gateway
from tests.support.stubapi import assert_json_error
from tests.support.wsclient import ChannelsClient
from tests.test_api import APITestCase
from tests.test_tenancy import TenancyTestCase


class Probes(APITestCase):
    flags = {"auth-token": "s3cret", "auth-failure-limit": "0"}

    def test_healthz_and_readyz_need_no_token(self) -> None:
        """
        With token authentication on, both probes answer 200 without a token
        and say nothing beyond their status.
        """
        for path, status in (("/healthz", "ok"), ("/readyz", "ready")):
            code, body, headers = self.call("GET", path)
            self.assertEqual((code, body), (200, {"status": status}))
            self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])

    def test_only_the_probes_are_public(self) -> None:
        """
        Paths near the probes' and the drain switch still need the token.
        """
        for method, path in (
            ("GET", "/healthz/x"),
            ("GET", "/readyz/"),
            ("GET", "//healthz"),
            ("POST", "/api/admin/drain"),
            ("GET", "/api/admin/drain"),
        ):
            assert_json_error(self, self.call(method, path), 401)
        self.assertFalse(self.api.ops.drain.draining)

    def test_readyz_during_drain(self) -> None:
        """
        While draining, /readyz answers a JSON 503 with Retry-After and
        /healthz stays 200; after the drain, /readyz is 200 again.
        """
        self.api.ops.drain.set(True, by="test")
        result = self.call("GET", "/readyz")
        assert_json_error(self, result, 503)
        self.assertEqual(result[2].getRawHeaders(b"retry-after"), [b"30"])
        self.assertEqual(self.call("GET", "/healthz")[0], 200)
        self.api.ops.drain.set(False, by="test")
        self.assertEqual(self.call("GET", "/readyz")[0], 200)


class AdminDrain(TenancyTestCase):
    def test_drain_refuses_new_kernels_and_serves_old_ones(self) -> None:
        """
        An admin drains the gateway: new kernels (and sessions) are refused
        with a JSON 503 and Retry-After, existing ones are still served;
        undrain admits new kernels again.
        """
        model = self.start("alice")
        code, body, _ = self.call("POST", "/api/admin/drain", user="carol")
        self.assertEqual((code, body), (200, {"draining": True}))
        code, body, headers = self.call("POST", "/api/kernels", {}, user="alice")
        self.refused((code, body, headers), 503, "draining")
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"30"])
        self.refused(self.call("POST", "/api/sessions", {"path": "a.ipynb", "type": "notebook"}, "alice"), 503)
        code, got, _ = self.call("GET", f"/api/kernels/{model['id']}", user="alice")
        self.assertEqual((code, got["id"]), (200, model["id"]))
        self.assertEqual(self.call("POST", f"/api/kernels/{model['id']}/restart", user="alice")[0], 200)
        self.assertEqual(self.call("GET", "/api/admin/drain", user="carol")[1], {"draining": True})
        code, body, _ = self.call("POST", "/api/admin/undrain", user="carol")
        self.assertEqual((code, body), (200, {"draining": False}))
        self.start("alice")

    def test_only_admins_drain(self) -> None:
        """
        A user who is not an administrator can neither drain, undrain nor
        look: 403, and the gateway keeps admitting kernels.
        """
        for method in ("POST", "DELETE", "GET"):
            self.refused(self.call(method, "/api/admin/drain", user="alice"), 403, "administrator")
        self.start("bob")
        self.assertEqual(self.call("DELETE", "/api/admin/drain", user="carol")[1], {"draining": False})


class ReadinessChecks(SynchronousTestCase):
    def test_store_that_does_not_answer(self) -> None:
        """
        A store that does not answer within the timeout makes the gateway
        not ready, once the timeout passes on the clock.
        """
        from twisted.internet.task import Clock

        clock = Clock()
        hanging: Deferred[Any] = Deferred()

        class Persistence:
            class store:
                @staticmethod
                def load_kernel(kernel_id: str) -> Deferred[Any]:
                    return hanging

        readiness = Readiness(clock, Drain(30), lambda: Persistence, 2.0)
        d = Deferred.fromCoroutine(readiness.problems())
        self.assertNoResult(d)
        clock.advance(2.0)
        self.assertEqual(self.successResultOf(d), ["the store did not answer within 2 s"])


async def until(condition: Any, what: str, timeout: float = 20.0) -> None:
    """
    Poll another process until C{condition()} (a coroutine function) is
    true; there is no event to wait on across processes.
    """
    deadline = reactor.seconds() + timeout
    while not await condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.1, lambda: None)


async def status_of(gateway: GatewayDaemon, path: str) -> Reply:
    return await gateway.api.request("GET", path, token=None)


class DaemonDrain(TestCase):
    timeout = 120

    async def test_sigusr1_drains(self) -> None:
        """
        SIGUSR1 drains a real daemon: /readyz turns 503, a new kernel is
        refused with 503 + Retry-After, an existing kernel still runs code.
        """
        gateway = await start_gateway(self, token="s3cret")
        self.assertEqual((await status_of(gateway, "readyz")).code, 200)
        model = await gateway.api.call("POST", "api/kernels", {}, expect=201)
        os.kill(gateway.pid, signal.SIGUSR1)

        async def not_ready() -> bool:
            return (await status_of(gateway, "readyz")).code == 503

        await until(not_ready, "/readyz to answer 503 after SIGUSR1")
        refused = await gateway.api.request("POST", "api/kernels", {})
        self.assertEqual(refused.code, 503, refused.body)
        self.assertEqual(set(refused.json()), {"reason", "message"})
        self.assertEqual(refused.headers["retry-after"], "30")
        client = await ChannelsClient.connect(gateway.url, model["id"], token="s3cret")
        self.addCleanup(client.close)
        result = await client.execute("6 * 7")
        self.assertEqual(result["result"]["text/plain"], "42")
        self.assertEqual((await status_of(gateway, "healthz")).code, 200)


class StoreReadiness(TestCase):
    timeout = 120

    async def test_readyz_follows_redis(self) -> None:
        """
        With kernels kept in Redis, /readyz answers 503 while Redis is
        stopped and 200 again once it is back; /healthz stays 200.
        """
        require_packages(*REDIS_PACKAGES)
        redis = RedisServer(tempfile.mkdtemp(prefix="egw-", dir="/tmp"))
        redis.up()
        self.addCleanup(redis.down)
        gateway = await start_gateway(
            self,
            flags={"persistence": "true", "store-url": redis.url, "readiness-timeout": "1"},
            env={"EG_STORE_KEY": SecretBox.generate_key()},
        )
        self.assertEqual((await status_of(gateway, "readyz")).code, 200)
        redis.stop()
        reply = await status_of(gateway, "readyz")
        self.assertEqual(reply.code, 503, reply.body)
        self.assertEqual(reply.json(), {"reason": "Service Unavailable", "message": "not ready"})
        self.assertEqual((await status_of(gateway, "healthz")).code, 200)
        redis.start()

        async def ready() -> bool:
            return (await status_of(gateway, "readyz")).code == 200

        await until(ready, "/readyz to answer 200 once Redis is back")
