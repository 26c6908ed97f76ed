"""
Prometheus metrics: a real daemon scraped while kernels start, run code,
fail and stop; who may read C{/metrics}; the reactor-lag probe on a Clock.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from egateway.config import build_config
from egateway.ops.metrics import GatewayMetrics, ReactorLagProbe, TimedStore
from egateway.tap import build_api
from tests.support.daemon import HttpApi, free_port, start_gateway
from tests.support.fakes import make_manager
from tests import test_store as store_tests
from tests.support.wsclient import ChannelsClient

API_TOKEN = "api-t0ken"
METRICS_TOKEN = "scrape-t0ken"


class Samples(dict):
    """
    One scrape: C{(name, frozenset(labels.items()))} -> value.
    """

    @classmethod
    def parse(cls, text: str) -> "Samples":
        samples = cls()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return samples

    def get_(self, name: str, **labels: str) -> float:
        """
        The sample's value; 0 when absent (a counter not yet incremented).
        """
        return self.get((name, frozenset(labels.items())), 0.0)


def write_kernelspec(root: str, name: str, argv: list[str]) -> None:
    os.makedirs(os.path.join(root, name))
    with open(os.path.join(root, name, "kernel.json"), "w") as f:
        json.dump({"argv": argv, "display_name": name, "language": "python"}, f)


class ScrapeDaemon(TestCase):
    timeout = 120

    async def scrape(self, api: HttpApi) -> Samples:
        reply = await api.request("GET", "metrics", token=METRICS_TOKEN)
        self.assertEqual(reply.code, 200, reply.body[:500])
        self.assertTrue(reply.headers["content-type"].startswith("text/plain; version=0.0.4"))
        return Samples.parse(reply.body.decode("utf-8"))

    async def test_metrics_follow_kernels(self) -> None:
        """
        Scraped from a real daemon, the figures move as a kernel starts,
        runs code over WebSockets (both protocols), restarts and stops, and as a kernel
        whose process exits at once fails to launch; the kernel store's
        operations are timed.
        """
        specs = os.path.abspath(self.mktemp())
        write_kernelspec(specs, "quitter", [sys.executable, "-c", "import sys; sys.exit(3)"])
        gateway = await start_gateway(
            self,
            token=API_TOKEN,
            flags={"list-kernels": "true", "kernelspec-path": specs, "launch-timeout": "30", "persistence": "true"},
            env={"EG_METRICS_TOKEN": METRICS_TOKEN},
        )
        api = gateway.api
        before = await self.scrape(api)
        self.assertEqual(before.get_("egateway_launches_started_total", launcher="local"), 0)
        self.assertEqual(before.get_("egateway_websocket_connections"), 0)

        model = await api.call("POST", "api/kernels", {"name": "python3"}, expect=201)
        client = await ChannelsClient.connect(gateway.url, model["id"], token=API_TOKEN)
        result = await client.execute("print('x' * 5000)")
        self.assertEqual((result["reply"]["status"], len(result["stdout"])), ("ok", 5001))
        running = await self.scrape(api)
        kernel = {"state": "running", "launcher": "local", "kernelspec": "python3"}
        self.assertEqual(running.get_("egateway_kernels", **kernel), 1)
        self.assertEqual(running.get_("egateway_launches_started_total", launcher="local"), 1)
        self.assertEqual(running.get_("egateway_launches_succeeded_total", launcher="local"), 1)
        self.assertEqual(running.get_("egateway_launch_duration_seconds_count", launcher="local"), 1)
        self.assertGreater(running.get_("egateway_launch_duration_seconds_sum", launcher="local"), 0)
        self.assertEqual(
            running.get_("egateway_launch_phase_seconds_count", launcher="local", phase="ready"), 1
        )
        self.assertEqual(running.get_("egateway_websocket_connections"), 1)
        self.assertEqual(running.get_("egateway_websocket_connections_opened_total", protocol="legacy"), 1)
        self.assertGreaterEqual(
            running.get_("egateway_relayed_messages_total", channel="shell", direction="from_client"), 1
        )
        self.assertGreaterEqual(
            running.get_("egateway_relayed_messages_total", channel="shell", direction="to_client"), 1
        )
        # The printed line alone is 5,000 bytes of iopub.
        self.assertGreater(running.get_("egateway_relayed_bytes_total", channel="iopub", direction="to_client"), 5000)

        failed = await api.request("POST", "api/kernels", {"name": "quitter"})
        self.assertEqual(failed.code, 500, failed.body)
        after_failure = await self.scrape(api)
        self.assertEqual(after_failure.get_("egateway_launches_started_total", launcher="local"), 2)
        self.assertEqual(
            after_failure.get_("egateway_launches_failed_total", launcher="local", reason="exited"), 1
        )
        self.assertEqual(after_failure.get_("egateway_launches_succeeded_total", launcher="local"), 1)

        await api.call("POST", f"api/kernels/{model['id']}/restart", {}, expect=200)
        restarted = await self.scrape(api)
        self.assertEqual(restarted.get_("egateway_restarts_total", launcher="local"), 1)
        self.assertEqual(restarted.get_("egateway_auto_restarts_total", launcher="local"), 0)

        binary = await ChannelsClient.connect(gateway.url, model["id"], v1=True, token=API_TOKEN)
        self.assertEqual((await binary.execute("6 * 7"))["result"]["text/plain"], "42")
        both = await self.scrape(api)
        self.assertEqual(both.get_("egateway_websocket_connections"), 2)
        self.assertEqual(both.get_("egateway_websocket_connections_opened_total", protocol="v1"), 1)
        await binary.close()
        await client.close()
        await api.call("DELETE", f"api/kernels/{model['id']}", expect=204)
        stopped = await self.scrape(api)
        self.assertEqual(stopped.get_("egateway_kernels", **kernel), 0)
        self.assertEqual(stopped.get_("egateway_websocket_connections"), 0)
        self.assertGreaterEqual(stopped.get_("egateway_reactor_lag_seconds_count"), 1)
        # The kernel store (SQLite here) is timed.
        self.assertGreaterEqual(stopped.get_("egateway_store_operation_seconds_count", operation="save_kernel"), 2)
        self.assertEqual(stopped.get_("egateway_store_errors_total", operation="save_kernel"), 0)
        self.assertEqual(stopped.get_("egateway_build_info", version=__import__("egateway").__version__), 1)

    async def test_refused_without_the_metrics_token(self) -> None:
        """
        /metrics answers a JSON 401 without the metrics token, also to a
        caller with the API's own token, and the refusals are counted.
        """
        gateway = await start_gateway(self, token=API_TOKEN, env={"EG_METRICS_TOKEN": METRICS_TOKEN})
        for token in (None, API_TOKEN, "wrong"):
            reply = await gateway.api.request("GET", "metrics", token=token)
            self.assertEqual(reply.code, 401, reply.body)
            self.assertEqual(set(reply.json()), {"reason", "message"})
            self.assertEqual(reply.headers["content-type"], "application/json")
        samples = await self.scrape(gateway.api)
        self.assertEqual(samples.get_("egateway_auth_failures_total", status="401"), 3)

    async def test_listener_of_its_own_and_networks(self) -> None:
        """
        With metrics_listen, a second port serves /metrics alone; with
        metrics_networks, addresses there need no token, and others get a
        JSON 403 when no token is configured.
        """
        port = free_port()
        gateway = await start_gateway(
            self,
            token=API_TOKEN,
            flags={"metrics-listen": f"tcp:{port}:interface=127.0.0.1", "metrics-networks": "127.0.0.0/8"},
        )
        apart = HttpApi(reactor, f"http://127.0.0.1:{port}/", None)
        self.addCleanup(apart.close)
        reply = await apart.request("GET", "metrics")
        self.assertEqual(reply.code, 200, reply.body)
        self.assertIn(("egateway_websocket_connections", frozenset()), Samples.parse(reply.body.decode()))
        self.assertEqual((await apart.request("GET", "api")).code, 404)
        main = await gateway.api.request("GET", "metrics", token=None)
        self.assertEqual(main.code, 200, main.body)

        other = await start_gateway(self, token=API_TOKEN, flags={"metrics-networks": "192.0.2.0/24"})
        refused = await other.api.request("GET", "metrics")
        self.assertEqual(refused.code, 403, refused.body)
        self.assertIn("metrics_networks", refused.json()["message"])


def _config(**flags: str) -> Any:
    return build_config({}, {}, {"allowed-hosts": "gw.example", **flags})


class MainListenerRule(SynchronousTestCase):
    """
    The front resource's rule for /metrics, over fake kernels (StubTreq).
    """

    def front(self, **flags: str) -> tuple[Any, StubTreq]:
        self.clock = Clock()
        config = _config(**flags)
        manager, _, _ = make_manager(self.clock)
        metrics = GatewayMetrics(config.metrics, self.clock) if config.metrics.enabled else None
        api, front = build_api(config, manager, self.clock, ThreadPool(), metrics)
        return api, StubTreq(front)

    def get(self, stub: StubTreq, path: str, authorization: str = "") -> tuple[int, bytes, Any]:
        headers = {"Authorization": authorization} if authorization else {}
        d = stub.request("GET", "http://gw.example" + path, headers=headers)
        stub.flush()
        response = self.successResultOf(d)
        content = response.content()
        stub.flush()
        return response.code, self.successResultOf(content), response.headers

    def test_off_by_default(self) -> None:
        """
        Without metrics_token or metrics_networks, /metrics is no route of
        the API, whatever the caller's credentials, and the OpenAPI
        document does not list it.
        """
        api, stub = self.front(**{"auth-token": API_TOKEN})
        code, body, _ = self.get(stub, "/metrics", f"token {API_TOKEN}")
        self.assertEqual((code, json.loads(body)["reason"]), (404, "Not Found"))
        code, body, _ = self.get(stub, "/api/openapi.json", f"token {API_TOKEN}")
        self.assertNotIn("/metrics", json.loads(body)["paths"])

    def test_only_the_metrics_token_opens_it(self) -> None:
        """
        The metrics token (as a Bearer token, as Prometheus sends it) opens
        /metrics; no token, the API's token or a percent-encoded path do
        not; the OpenAPI document lists /metrics, as the routes do.
        """
        api, stub = self.front(**{"auth-token": API_TOKEN, "metrics-token": METRICS_TOKEN})
        for path, authorization in (
            ("/metrics", ""),
            ("/metrics", f"token {API_TOKEN}"),
            ("/metrics", f"Bearer {API_TOKEN}"),
            ("/%6Detrics", f"token {API_TOKEN}"),
        ):
            code, body, headers = self.get(stub, path, authorization)
            self.assertEqual(code, 401, (path, authorization, body))
            self.assertEqual(set(json.loads(body)), {"reason", "message"})
            self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        code, body, headers = self.get(stub, "/metrics", f"Bearer {METRICS_TOKEN}")
        self.assertEqual(code, 200, body)
        names = {family.name for family in text_string_to_metric_families(body.decode())}
        self.assertIn("egateway_kernels", names)
        self.assertIn("egateway_reactor_lag_seconds", names)
        # The metrics token is no API credential either.
        code, _, _ = self.get(stub, "/api", f"Bearer {METRICS_TOKEN}")
        self.assertEqual(code, 401)
        code, body, _ = self.get(stub, "/api/openapi.json", f"token {API_TOKEN}")
        documented = {(m.upper(), p) for p, item in json.loads(body)["paths"].items() for m in item if m != "parameters"}
        self.assertIn(("GET", "/metrics"), documented)
        served = {
            (method, rule.rule)
            for rule in api.app.url_map.iter_rules()
            for method in rule.methods - {"HEAD", "OPTIONS"}
            if "<" not in rule.rule
        }
        self.assertEqual({pair for pair in documented if "{" not in pair[1]}, served)

    def test_wrong_tokens_limited(self) -> None:
        """
        Wrong metrics tokens count towards auth_failure_limit as the API's
        do: past it that token from that address gets 429 with Retry-After,
        while the right token still works.
        """
        _, stub = self.front(**{"auth-token": API_TOKEN, "metrics-token": METRICS_TOKEN, "auth-failure-limit": "2"})
        codes = [self.get(stub, "/metrics", "Bearer guess")[0] for _ in range(3)]
        self.assertEqual(codes, [401, 401, 429])
        code, body, headers = self.get(stub, "/metrics", "Bearer guess")
        self.assertEqual((code, json.loads(body)["reason"]), (429, "Too Many Requests"))
        self.assertTrue(headers.getRawHeaders(b"retry-after"))
        self.assertEqual(self.get(stub, "/metrics", f"Bearer {METRICS_TOKEN}")[0], 200)


class ReactorLagProbeTests(SynchronousTestCase):
    def test_lateness_measured(self) -> None:
        """
        Each firing reports how long after its due time it ran: nothing when
        on time, the stall when the reactor was held up.
        """
        clock = Clock()
        seen: list[float] = []
        probe = ReactorLagProbe(clock, seen.append, interval=1.0)
        probe.start()
        clock.advance(1.0)
        clock.advance(3.5)  # a 2.5 s stall past the firing due at 2.0
        clock.advance(0.5)  # the next firing is due at 5.0, on the grid
        clock.advance(1.25)
        self.assertEqual(seen, [0.0, 2.5, 0.0, 0.25])
        probe.stop()
        clock.advance(10)
        self.assertEqual(len(seen), 4)

    def test_exported(self) -> None:
        """
        The metrics service runs the probe while it runs and exports the
        lag as a histogram and the last value.
        """
        clock = Clock()
        metrics = GatewayMetrics(_config().metrics, clock)
        metrics.startService()
        clock.advance(1.0)
        clock.advance(1.3)
        metrics.stopService()
        samples = Samples.parse(metrics.exposition().decode())
        self.assertEqual(samples.get_("egateway_reactor_lag_seconds_count"), 2)
        self.assertAlmostEqual(samples.get_("egateway_reactor_lag_last_seconds"), 0.3)
        self.assertEqual(samples.get_("egateway_reactor_lag_seconds_bucket", le="0.25"), 1)
        self.assertEqual(clock.getDelayedCalls(), [])


class TimedStoreTests(SynchronousTestCase):
    def test_latency_and_errors(self) -> None:
        """
        Every store operation is timed on the clock, failures are counted,
        and other attributes pass through.
        """
        from twisted.internet.defer import Deferred, fail

        clock = Clock()
        metrics = GatewayMetrics(_config().metrics, clock)
        pending: Deferred[None] = Deferred()

        class Store:
            shared = True

            def save_kernel(self, record: Any) -> Deferred[None]:
                return pending

            def load_kernels(self) -> Deferred[Any]:
                return fail(OSError("down"))

        store = metrics.timed_store(Store())
        self.assertIsInstance(store, TimedStore)
        self.assertTrue(store.shared)
        saving = store.save_kernel(None)
        clock.advance(0.02)
        pending.callback(None)
        self.successResultOf(saving)
        self.failureResultOf(store.load_kernels(), OSError)
        samples = Samples.parse(metrics.exposition().decode())
        self.assertEqual(samples.get_("egateway_store_operation_seconds_count", operation="save_kernel"), 1)
        self.assertAlmostEqual(samples.get_("egateway_store_operation_seconds_sum", operation="save_kernel"), 0.02)
        self.assertEqual(samples.get_("egateway_store_errors_total", operation="load_kernels"), 1)
        self.assertEqual(samples.get_("egateway_store_errors_total", operation="save_kernel"), 0)


class LifecycleCounts(SynchronousTestCase):
    """
    The figures a daemon test cannot provoke cheaply, over fake kernels on
    a Clock: launch timeouts, automatic restarts, deaths, culls, journal
    drops.
    """

    def test_counted(self) -> None:
        """
        A crash restarted, a second crash past the restart limit, a launch
        timing out, a dead kernel culled and a journal overflowing each
        move their counter.
        """
        from egateway.clusters.interface import ExitStatus
        from egateway.config import CullingConfig
        from egateway.kernels.culling import Culler
        from egateway.wire.protocol import Message
        from tests.support.fakes import RecordingClient

        clock = Clock()
        manager, launcher, _ = make_manager(clock, restart_limit=1)
        metrics = GatewayMetrics(_config().metrics, clock)
        metrics.watch_manager(manager)
        culler = Culler(manager, CullingConfig(cull_idle_timeout=600, cull_interval=60), clock)
        metrics.watch(culler=culler)

        kernel = self.successResultOf(Deferred.fromCoroutine(manager.start_kernel(None, None)))
        manager.journal_limits.entries = 2
        client = RecordingClient()
        session = kernel.attach(client, "session-1")
        kernel.detach(session, client)
        for n in range(5):
            session.deliver("iopub", Message.build("stream", {"name": "stdout", "text": str(n)}, session="k"))
        kernel.attach(client, "session-1", resume_after=0)
        journal = Samples.parse(metrics.exposition().decode())
        self.assertEqual(journal.get_("egateway_journal_dropped_messages_total"), 3)
        self.assertEqual(journal.get_("egateway_journal_lost_messages_total"), 3)

        launcher.processes[0].exit(ExitStatus(code=1))
        self.assertEqual(kernel.state.value, "running")
        launcher.processes[1].exit(ExitStatus(code=1))
        self.assertEqual(kernel.state.value, "dead")
        launcher.hold = True
        slow = Deferred.fromCoroutine(manager.start_kernel(None, None))
        clock.advance(31)
        self.failureResultOf(slow)
        culler.startService()
        self.addCleanup(culler.stopService)
        clock.advance(60)

        samples = Samples.parse(metrics.exposition().decode())
        self.assertEqual(samples.get_("egateway_auto_restarts_total", launcher="fake"), 1)
        self.assertEqual(samples.get_("egateway_restarts_total", launcher="fake"), 0)
        self.assertEqual(samples.get_("egateway_kernel_deaths_total", launcher="fake"), 1)
        self.assertEqual(samples.get_("egateway_launches_started_total", launcher="fake"), 2)
        self.assertEqual(samples.get_("egateway_launches_failed_total", launcher="fake", reason="timeout"), 1)
        self.assertEqual(samples.get_("egateway_culls_total", reason="dead"), 1)
        self.assertEqual(samples.get_("egateway_culls_total", reason="idle"), 0)
        self.assertEqual(samples.get_("egateway_kernels", state="running", launcher="fake", kernelspec="fake"), 0)

    def test_user_label_bounded(self) -> None:
        """
        With metrics_users, the kernels gauge names the users with most
        kernels and counts the rest under one label value.
        """
        clock = Clock()
        manager, _, _ = make_manager(clock)
        metrics = GatewayMetrics(_config(**{"metrics-users": "1"}).metrics, clock)
        metrics.watch_manager(manager)
        for user in ("ann", "ann", "bob", "cy"):
            self.successResultOf(Deferred.fromCoroutine(manager.start_kernel(None, None, username=user)))
        samples = Samples.parse(metrics.exposition().decode())
        labels = {"state": "running", "launcher": "fake", "kernelspec": "fake"}
        self.assertEqual(samples.get_("egateway_kernels", user="ann", **labels), 2)
        self.assertEqual(samples.get_("egateway_kernels", user="(other)", **labels), 2)
        self.assertEqual(len([key for key in samples if key[0] == "egateway_kernels"]), 2)


class _Timed:
    """
    The store contract over a store whose operations are timed: the
    wrapper must change nothing the gateway relies on.
    """

    async def open(self, box: Any = None) -> Any:
        store = await super().open(box)  # type: ignore[misc]
        self.timed_metrics = GatewayMetrics(_config().metrics, reactor)
        return self.timed_metrics.timed_store(store)


class TimedSQLiteStoreTests(_Timed, store_tests.SQLiteStoreTests):
    def test_reactor_free_while_writing(self) -> None:
        """
        (It patches a private method of the store itself; not the
        wrapper's business.)
        """
        raise SkipTest("patches the SQLite store's own blocking method")


class TimedRedisStoreTests(_Timed, store_tests.RedisStoreTests):
    pass
