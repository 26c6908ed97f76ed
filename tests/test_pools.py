"""
Warm pools with late binding: the pool logic over fake launchers and a
Clock, and binding with real ipykernel kernels through the local launcher
in an in-process gateway (the kernel's own environment and working
directory read back with an execute request).
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from egateway.clusters.interface import ExitStatus, LaunchError
from egateway.config import PoolConfig, TenancyConfig
from egateway.errors import LimitReached
from egateway.kernels.binding import python_binding, supports_binding
from egateway.kernels.policy import Caller, TenancyPolicy
from egateway.kernels.pools import BIND_TIMEOUT, RETRY_FIRST, KernelPools, pools_from_config
from egateway.kernels.state import KernelState
from tests.support.fakes import fake_spec, make_manager
from tests.support.gateway import GatewayTestCase
from tests.support.wsclient import ChannelsClient
from tests.test_ssh import SSHTestCase


def start(manager: Any, env: Any = None, caller: Caller | None = None, name: str | None = None) -> Deferred:
    return Deferred.fromCoroutine(manager.start_kernel(name, env, caller.username if caller else None, caller))


class PoolLogicTests(SynchronousTestCase):
    """
    Pools over fake kernels, time on a Clock.
    """

    def setUp(self) -> None:
        self.start_pools({"fake": PoolConfig(size=2)})

    def start_pools(self, tables: dict[str, PoolConfig], profiles: Any = None) -> None:
        """
        A manager (max_kernels 4) over fakes with pools for C{tables},
        filled.
        """
        self.clock = Clock()
        self.manager, self.launcher, self.channels = make_manager(self.clock, max_kernels=4)
        if profiles is not None:
            self.manager.policy = TenancyPolicy(TenancyConfig(), profiles)
        self.pools = KernelPools(
            manager=self.manager, clock=self.clock, pools=pools_from_config(tables, profiles or {})
        )
        self.pools.startService()
        self.clock.advance(0)

    def pooled(self) -> list[Any]:
        return [k for k in self.manager.kernels.values() if k.pooled]

    def test_filled_at_start_and_hidden(self) -> None:
        """
        The pool starts its kernels at once; they are owned by nobody and
        neither listed nor found through the API.
        """
        self.assertEqual(len(self.pools.pools["fake"].ready()), 2)
        for kernel in self.pooled():
            self.assertEqual(kernel.owner, "")
            self.assertEqual(kernel.model()["pooled"], True)
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(self.manager.list_models())), [])
        self.failureResultOf(Deferred.fromCoroutine(self.manager.find(self.pooled()[0].id)))

    def test_take_binds_and_refills(self) -> None:
        """
        A matching request gets a pooled kernel bound to its caller (owner,
        KERNEL_USERNAME in its environment, pool values gone), and the pool
        starts a replacement.
        """
        before = {k.id for k in self.pooled()}
        launched = len(self.launcher.processes)
        kernel = self.successResultOf(start(self.manager, {"KERNEL_USERNAME": "alice"}, Caller("alice")))
        self.assertIn(kernel.id, before)
        self.assertFalse(kernel.pooled)
        self.assertEqual((kernel.owner, kernel.username, kernel.env["KERNEL_USERNAME"]), ("alice",) * 3)
        code = [m for ch, m in kernel.process.server.received if m.msg_type == "execute_request"]
        self.assertEqual(len(code), 1)
        self.assertTrue(code[0].content()["silent"])
        self.assertIn("'KERNEL_USERNAME': 'alice'", code[0].content()["code"])
        self.assertEqual(len(self.launcher.processes), launched + 1)
        self.assertEqual(len(self.pools.pools["fake"].ready()), 2)
        self.assertEqual(self.pools.takes["fake"], 1)

    def test_audited_when_bound(self) -> None:
        """
        The audit trail records a bound kernel's launch for its user, with
        its pool, and nothing of pooled kernels before.
        """
        from twisted.logger import globalLogPublisher

        from egateway.ops.audit import is_audit_event, watch_kernels

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        watch_kernels(self.manager)
        victim = self.pooled()[0]
        victim.process.exit(ExitStatus(code=1))
        self.clock.advance(10)
        kernel = self.successResultOf(start(self.manager, None, Caller("alice")))
        audited = [(e["audit_kind"], e["audit_fields"]) for e in events if is_audit_event(e)]
        self.assertEqual(
            [(kind, f["kernel_id"], f["user"], f.get("pool")) for kind, f in audited],
            [("kernel.launch", kernel.id, "alice", "fake")],
        )

    def test_bind_failure_starts_fresh(self) -> None:
        """
        A pooled kernel that does not answer its binding is discarded and
        the request is served by a fresh start; the failure is counted as a
        miss.
        """
        for kernel in self.pooled():
            kernel.process.server.responsive = False
        taken = start(self.manager, {"KERNEL_USERNAME": "alice"}, Caller("alice"))
        self.assertNoResult(taken)
        [hung] = [k for k in self.manager.kernels.values() if not k.pooled]
        self.clock.advance(BIND_TIMEOUT - 0.01)
        self.assertNoResult(taken)
        self.clock.advance(0.01)
        for _ in range(10):
            self.clock.advance(1)
        kernel = self.successResultOf(taken)
        self.assertNotEqual(kernel.id, hung.id)
        self.assertNotIn(hung.id, self.manager.kernels)
        self.assertEqual((kernel.owner, kernel.pool), ("alice", None))
        self.assertEqual(self.pools.misses["fake"], 1)

    def test_profile_pool(self) -> None:
        """
        A pool with a profile serves requests for that profile only, with
        the profile's environment and its name on the kernel; a request
        without the profile takes from the plain pool.
        """
        from egateway.config import ProfileConfig
        from egateway.kernels.profiles import load_profiles

        profiles = load_profiles({"small": ProfileConfig(env={"SIZE": "s"})})
        self.start_pools(
            {"fake": PoolConfig(size=1), "fake-small": PoolConfig(kernelspec="fake", profile="small", size=1)},
            profiles,
        )
        [small] = self.pools.pools["fake-small"].ready()
        self.assertEqual((small.profile, small.env["SIZE"]), ("small", "s"))
        kernel = self.successResultOf(
            Deferred.fromCoroutine(self.manager.start_kernel(None, None, "alice", Caller("alice"), "small"))
        )
        self.assertEqual((kernel.id, kernel.pool, kernel.profile), (small.id, "fake-small", "small"))
        self.assertEqual((kernel.env["KERNEL_PROFILE"], kernel.env["SIZE"]), ("small", "s"))
        plain = self.successResultOf(start(self.manager, None, Caller("bob")))
        self.assertEqual((plain.pool, plain.profile), ("fake", None))
        self.assertNotIn("KERNEL_PROFILE", plain.env)

    def test_launch_values_start_fresh(self) -> None:
        """
        A client KERNEL_* value the launcher consumes (an image) or a chosen
        KERNEL_ID is started fresh; the pool is untouched.
        """
        pooled = {k.id for k in self.pooled()}
        kernel = self.successResultOf(start(self.manager, {"KERNEL_IMAGE": "other:1"}))
        self.assertNotIn(kernel.id, pooled)
        kid = "0b5e3a0c-1d8e-4f55-9b9e-3f0e6c1a2b3c"
        self.assertEqual(self.successResultOf(start(self.manager, {"KERNEL_ID": kid})).id, kid)
        self.assertEqual({k.id for k in self.pooled()}, pooled)

    def test_pool_counts_against_max_kernels(self) -> None:
        """
        Pooled kernels count against max_kernels (4: two pooled, two more
        fit), and a pool does not refill past it.
        """
        self.successResultOf(start(self.manager, {"KERNEL_IMAGE": "x"}))
        self.successResultOf(start(self.manager, {"KERNEL_IMAGE": "x"}))
        self.failureResultOf(start(self.manager, {"KERNEL_IMAGE": "x"}), LimitReached)
        # A take leaves the count at 4: the refill finds no room, and
        # tries again later.
        self.successResultOf(start(self.manager))
        self.assertEqual(len(self.pooled()), 1)
        self.assertEqual(len([k for k in self.manager.kernels.values() if k.state not in (KernelState.GONE,)]), 4)

    def test_quota_of_user(self) -> None:
        """
        Pooled kernels are nobody's: a user with max_kernels_per_user=1 and
        no kernel takes one; with one kernel, a take is refused like a fresh
        start, and the pool keeps its kernels.
        """
        self.manager.policy = TenancyPolicy(TenancyConfig(max_kernels_per_user=1))
        alice = Caller("alice")
        self.successResultOf(start(self.manager, None, alice))
        pooled = {k.id for k in self.pooled()}
        self.failureResultOf(start(self.manager, None, alice), LimitReached)
        self.assertEqual({k.id for k in self.pooled()}, pooled)
        self.successResultOf(start(self.manager, None, Caller("bob")))

    def test_dead_pooled_kernel_replaced(self) -> None:
        """
        A pooled kernel whose process dies is removed (not restarted as a
        user's kernel would be) and another one is started.
        """
        victim = self.pooled()[0]
        victim.process.exit(ExitStatus(code=1))
        self.clock.advance(10)
        self.assertNotIn(victim.id, self.manager.kernels)
        self.assertEqual(len(self.pools.pools["fake"].ready()), 2)

    def test_failed_launch_retried_on_clock(self) -> None:
        """
        A pool whose launches fail tries again after RETRY_FIRST seconds,
        doubling, and fills once launches work again.
        """
        self.launcher.fail_with = LaunchError("no capacity")
        stopped = [self.manager.shutdown(kernel.id) for kernel in self.pooled()]
        self.clock.advance(1)
        for d in stopped:
            self.successResultOf(d)
        self.assertEqual(self.pools.pools["fake"].kernels, [])
        self.clock.advance(RETRY_FIRST)
        self.assertEqual(self.pools.pools["fake"].kernels, [])
        self.launcher.fail_with = None
        self.clock.advance(RETRY_FIRST * 2 - 0.01)
        self.assertEqual(self.pools.pools["fake"].kernels, [])
        self.clock.advance(0.01)
        self.assertEqual(len(self.pools.pools["fake"].ready()), 2)

    def test_unknown_kernelspec_retried(self) -> None:
        """
        A pool naming a kernelspec that does not exist (yet) starts nothing
        and looks again later, backing off.
        """
        self.start_pools({"missing": PoolConfig(size=1)})
        self.assertEqual(self.launcher.processes, [])
        retry = self.pools.pools["missing"].retry
        self.assertTrue(retry.active())
        self.assertEqual(retry.getTime(), RETRY_FIRST)
        self.clock.advance(RETRY_FIRST)
        self.assertEqual(self.pools.pools["missing"].retry.getTime(), RETRY_FIRST * 3)

    def test_drain(self) -> None:
        """
        Draining shuts every pooled kernel down and stops refilling.
        """
        drained = Deferred.fromCoroutine(self.pools.drain())
        self.clock.advance(10)
        self.successResultOf(drained)
        self.assertEqual(self.pooled(), [])
        self.assertEqual(len(self.manager.kernels), 0)


class BindingCodeTests(SynchronousTestCase):
    def test_values_stay_literals(self) -> None:
        """
        Values become Python string literals: quotes and backslashes cannot
        end them, and the expression binds no name.
        """
        code = python_binding(["POOL"], {"A": "x') or __import__('os').system('id"}, "/tmp")
        namespace: dict[str, Any] = {}
        saved = dict(os.environ)
        cwd = os.getcwd()
        try:
            os.environ["POOL"] = "1"
            exec(code, namespace)
            self.assertEqual(os.environ["A"], "x') or __import__('os').system('id")
            self.assertNotIn("POOL", os.environ)
            self.assertEqual(os.getcwd(), "/tmp")
        finally:
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(saved)
        self.assertEqual(set(namespace), {"__builtins__"})

    def test_languages(self) -> None:
        """
        Python kernels bind by default; others do not; a kernelspec may
        refuse.
        """
        self.assertTrue(supports_binding(fake_spec()))
        self.assertFalse(supports_binding(fake_spec(language="R")))
        self.assertFalse(supports_binding(fake_spec(metadata={"egateway": {"launcher": "fake", "binding": False}})))


async def kernel_state(gateway: Any, kernel_id: str, user: str = "") -> dict[str, Any]:
    """
    The kernel's own environment and working directory, read by running
    code in it through the channels WebSocket.
    """
    client = await ChannelsClient.connect(gateway.url, kernel_id)
    try:
        reply = await client.execute(
            "import json, os; print(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd()}))"
        )
    finally:
        await client.close()
    return json.loads(reply["stdout"])


class PooledIpykernelTests(GatewayTestCase):
    """
    A gateway with a pool of one real ipykernel kernel.
    """

    timeout = 120

    async def setUp(self) -> None:
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.gateway_settings = {"client_envs": "PROJECT", "metrics_networks": "127.0.0.1/32"}
        await self._start(size=1)

    async def _start(self, size: int) -> None:
        from tests.support.gateway import InProcessGateway

        self.gateway = InProcessGateway(
            file_values={"pools": {"python3": {"size": size}}}, **self.gateway_settings
        )
        await self.gateway.start()
        self.addCleanup(self._stop_and_check)
        self.pools = self.gateway.service.getServiceNamed("pools")
        await self.pools.when_ready("python3").addTimeout(60, reactor)

    async def test_bound_kernel_is_the_callers(self) -> None:
        """
        A start served from the pool returns the pooled kernel, bound: its
        environment has the caller's KERNEL_USERNAME and values and its
        working directory; nothing of the pool's user remains; the pool
        refills.
        """
        pooled = [k.id for k in self.gateway.manager.kernels.values() if k.pooled]
        model = await self.gateway.start_kernel(
            "python3", {"KERNEL_USERNAME": "alice", "PROJECT": "apollo", "KERNEL_WORKING_DIR": self.workdir}
        )
        self.assertEqual(model["id"], pooled[0])
        self.assertEqual((model["pool"], model["pooled"], model["username"]), ("python3", False, "alice"))
        state = await kernel_state(self.gateway, model["id"])
        self.assertEqual(state["env"]["KERNEL_USERNAME"], "alice")
        self.assertEqual(state["env"]["PROJECT"], "apollo")
        self.assertEqual(state["env"]["KERNEL_ID"], model["id"])
        self.assertEqual(state["cwd"], self.workdir)
        pool_user = self.gateway.manager.admission.default_username
        self.assertNotIn(pool_user, [v for k, v in state["env"].items() if k.startswith("KERNEL_")])
        await self.pools.when_ready("python3").addTimeout(60, reactor)
        second = await self.gateway.start_kernel("python3", {"KERNEL_USERNAME": "bob"})
        state = await kernel_state(self.gateway, second["id"])
        self.assertEqual(state["env"]["KERNEL_USERNAME"], "bob")
        self.assertNotIn("PROJECT", state["env"])
        self.assertNotIn("alice", json.dumps(state))

    async def test_metrics_count_pools_apart(self) -> None:
        """
        /metrics counts pooled kernels in egateway_pool_kernels, not in
        egateway_kernels; a take is counted, and the bound kernel moves to
        egateway_kernels.
        """
        import treq

        async def scrape() -> str:
            response = await treq.get(self.gateway.url + "metrics", pool=self.gateway.pool)
            return (await response.content()).decode()

        text = await scrape()
        self.assertIn('egateway_pool_kernels{pool="python3",state="ready"} 1.0', text)
        self.assertNotIn('egateway_kernels{kernelspec="python3",launcher="local",state="running"} 1.0', text)
        await self.gateway.start_kernel("python3")
        await self.pools.when_ready("python3").addTimeout(60, reactor)
        text = await scrape()
        self.assertIn('egateway_pool_takes_total{pool="python3"} 1.0', text)
        self.assertIn('egateway_kernels{kernelspec="python3",launcher="local",state="running"} 1.0', text)
        self.assertIn('egateway_pool_kernels{pool="python3",state="ready"} 1.0', text)

    async def test_restart_drains_and_refills(self) -> None:
        """
        Stopping the gateway shuts its pooled kernels down (they are not
        kept as users' kernels); a new gateway fills its pool afresh.
        """
        pooled = [k for k in self.gateway.manager.kernels.values() if k.pooled]
        pids = [k.process.placement.pid for k in pooled]
        self.gateway.pids.update(pids)
        await self.gateway.stop()
        from tests.support.daemon import pid_alive

        self.assertEqual([pid for pid in pids if pid_alive(pid)], [])
        await self._start(size=1)
        fresh = [k.id for k in self.gateway.manager.kernels.values() if k.pooled]
        self.assertEqual(len(fresh), 1)
        self.assertNotIn(fresh[0], [k.id for k in pooled])


class ConfigTests(SynchronousTestCase):
    def test_example_and_unknown_profile(self) -> None:
        """
        etc/egateway.toml's commented pool example is a valid pool; a pool
        naming an unknown profile is a start-up error naming the key.
        """
        import tomllib

        from egateway.config import ConfigError
        from egateway.validation import load_config

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        etc = open(os.path.join(root, "etc", "egateway.toml")).read()
        block = etc[etc.index("# pool-example:start\n") + 21 : etc.index("# pool-example:end")]
        values = tomllib.loads("\n".join(line[3:] for line in block.splitlines()))
        config = load_config(values, {}, {})
        [pool] = pools_from_config(config.pools, config.profiles)
        self.assertEqual((pool.name, pool.kernelspec, pool.size), ("python3", "python3", 2))
        with self.assertRaises(ConfigError) as caught:
            load_config({"pools": {"p": {"size": 1, "profile": "nope"}}}, {}, {})
        self.assertIn("pools.p.profile", str(caught.exception))


class PoolsAcrossRestartTests(TestCase):
    """
    Pools with a store that keeps kernels across gateway restarts.
    """

    timeout = 120

    def gateway(self, data_dir: str, **flags: str) -> Any:
        from tests.support.gateway import InProcessGateway

        return InProcessGateway(
            file_values={"pools": {"python3": {"size": 1}}},
            persistence="true",
            data_dir=data_dir,
            **flags,
        )

    async def test_pooled_not_kept_bound_kept(self) -> None:
        """
        With on_stop=keep, a stopping gateway keeps the kernel it bound to a
        user but shuts its pooled one down; the next gateway restores the
        user's kernel as theirs (not pooled) and fills its pool afresh.
        """
        from tests.support.daemon import pid_alive

        data_dir = os.path.abspath(self.mktemp())
        first = self.gateway(data_dir)
        await first.start()
        pools = first.service.getServiceNamed("pools")
        await pools.when_ready("python3").addTimeout(60, reactor)
        bound = await first.start_kernel("python3", {"KERNEL_USERNAME": "alice"})
        self.assertEqual(bound["pool"], "python3")
        await pools.when_ready("python3").addTimeout(60, reactor)
        [spare] = [k for k in first.manager.kernels.values() if k.pooled]
        spare_pid = spare.process.placement.pid
        await first.stop()
        self.assertFalse(pid_alive(spare_pid), "the pooled kernel was kept")
        self.assertTrue(pid_alive(bound["placement"]["pid"]), "the bound kernel was not kept")

        second = self.gateway(data_dir, on_stop="shutdown")
        await second.start()

        async def stop() -> None:
            await second.stop()
            self.assertFalse(pid_alive(bound["placement"]["pid"]))

        self.addCleanup(stop)
        await second.service.getServiceNamed("pools").when_ready("python3").addTimeout(60, reactor)
        code, restored = await second.request("GET", f"api/kernels/{bound['id']}")
        self.assertEqual(code, 200)
        self.assertEqual((restored["owner"], restored["state"]), ("alice", "running"))
        self.assertNotIn(spare.id, second.manager.kernels)
        kinds = sorted((k.pooled, k.owner) for k in second.manager.kernels.values())
        self.assertEqual(kinds, [(False, "alice"), (True, "")])
        state = await kernel_state(second, bound["id"])
        self.assertEqual(state["env"]["KERNEL_USERNAME"], "alice")


class SSHPoolTests(SSHTestCase):
    """
    A pool of one kernel on a real SSH host.
    """

    hosts = ("h1",)
    gateway_file = {"pools": {"remote": {"size": 1}}}

    async def test_bound_on_the_host(self) -> None:
        """
        The pooled kernel on the SSH host is handed over bound: the
        caller's KERNEL_USERNAME and working directory, on that host.
        """
        pools = self.gateway.service.getServiceNamed("pools")
        await pools.when_ready("remote").addTimeout(90, reactor)
        [pooled] = [k.id for k in self.gateway.manager.kernels.values() if k.pooled]
        model = await self.start_remote("remote", {"KERNEL_USERNAME": "alice", "KERNEL_WORKING_DIR": "/tmp"})
        self.assertEqual((model["id"], model["pool"]), (pooled, "remote"))
        state = await kernel_state(self.gateway, model["id"])
        self.assertEqual((state["env"]["KERNEL_USERNAME"], state["cwd"]), ("alice", "/tmp"))
        self.assertEqual(await self.hostname_of(model["id"]), "h1")


class BenchmarkSmokeTests(SynchronousTestCase):
    def test_quick_run(self) -> None:
        """
        bench/pools.py runs end to end: both temperatures measured, a warm
        start served from the pool and bound (it checks that itself), and
        the figures written; nothing asserted about speed.
        """
        import subprocess
        import sys

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = os.path.abspath(self.mktemp())
        done = subprocess.run(
            [sys.executable, os.path.join(root, "bench", "pools.py"), "--starts", "1", "--json", out],
            capture_output=True, text=True, timeout=300, cwd=root,
        )
        self.assertIn(done.returncode, (0, 2), done.stderr[-2000:])
        with open(out) as f:
            summary = json.load(f)["summary"]["local"]
        self.assertGreater(summary["cold_p50_s"], 0)
        self.assertGreater(summary["warm_p50_s"], 0)


class SharedStoreTests(TestCase):
    """
    Two in-process gateways sharing a real Redis store, the first with a
    pool.
    """

    timeout = 120

    async def test_pooled_kernels_belong_to_their_gateway(self) -> None:
        """
        The other gateway neither lists nor finds a pooled kernel; once
        bound it is an ordinary shared kernel; and a stopping gateway shuts
        its pooled kernel down even though a shared store keeps kernels.
        """
        import tempfile

        from egateway.store.crypto import SecretBox
        from tests.fixtures import RedisServer
        from tests.fixtures.system import REDIS_PACKAGES, require_packages
        from tests.support.daemon import pid_alive
        from tests.support.gateway import InProcessGateway

        require_packages(*REDIS_PACKAGES)
        redis = RedisServer(tempfile.mkdtemp(prefix="egw-", dir="/tmp"))
        redis.up()
        self.addCleanup(redis.down)
        env = {"EG_STORE_KEY": SecretBox.generate_key()}

        def gateway(pools: dict[str, Any]) -> Any:
            return InProcessGateway(
                env=env,
                file_values={"pools": pools},
                persistence="true",
                store_url=redis.url,
                data_dir=os.path.abspath(self.mktemp()),
                list_kernels="true",
            )

        a = await gateway({"python3": {"size": 1}}).start()
        b = await gateway({}).start()
        stopped: list[Any] = []

        async def stop() -> None:
            for g in (a, b):
                if g not in stopped:
                    await g.stop()

        self.addCleanup(stop)
        await a.service.getServiceNamed("pools").when_ready("python3").addTimeout(60, reactor)
        [pooled] = [k for k in a.manager.kernels.values() if k.pooled]
        # What the store's periodic write of activity (every 5 s) does now.
        await a.manager.persistence._flush()
        code, listed = await b.request("GET", "api/kernels")
        self.assertEqual((code, listed), (200, []))
        code, _ = await b.request("GET", f"api/kernels/{pooled.id}")
        self.assertEqual(code, 404)
        bound = await a.start_kernel("python3", {"KERNEL_USERNAME": "alice"})
        self.assertEqual(bound["id"], pooled.id)
        code, seen = await b.request("GET", f"api/kernels/{pooled.id}")
        self.assertEqual((code, seen["owner"]), (200, "alice"))
        code, _ = await b.request("DELETE", f"api/kernels/{pooled.id}")
        self.assertEqual(code, 204)
        await a.service.getServiceNamed("pools").when_ready("python3").addTimeout(60, reactor)
        [spare] = [k for k in a.manager.kernels.values() if k.pooled]
        spare_pid = spare.process.placement.pid
        await a.stop()
        stopped.append(a)
        self.assertFalse(pid_alive(spare_pid), "the pooled kernel was kept for a next gateway")
        code, listed = await b.request("GET", "api/kernels")
        self.assertEqual((code, listed), (200, []))


class BuildTests(SynchronousTestCase):
    def test_no_pools_with_impersonation(self) -> None:
        """
        With impersonation on, the configured pools are not built (a pooled
        kernel cannot become its user's OS account); without, they are.
        """
        from twisted.application.service import MultiService

        from egateway.tap import build_pools
        from egateway.validation import load_config

        for flag, built in (("false", True), ("true", False)):
            config = load_config({"pools": {"python3": {"size": 1}}}, {}, {"impersonation-enabled": flag})
            manager, _, _ = make_manager(Clock())
            top = MultiService()
            pools = build_pools(config, manager, Clock(), top)
            self.assertEqual(pools is not None, built)
            self.assertEqual(manager.pools is not None, built)
            self.assertEqual("pools" in top.namedServices, built)
