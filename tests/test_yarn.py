"""
Kernels as Spark applications on a real Hadoop YARN in cluster mode (one
ResourceManager and one NodeManager JVM shared by the trial process,
L{tests.support.yarn_cluster}), driven through an in-process gateway's
REST API and WebSocket; then the launcher's pure parts without YARN.
"""

from __future__ import annotations

import json
import os
import tempfile
from types import SimpleNamespace
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from dataclasses import replace

from egateway.clusters.interface import LauncherContext, LaunchSettings
from egateway.clusters.yarn import YarnLauncher, _Cluster
from egateway.config import build_config
from egateway.kernels.specs import KernelSpec
from tests.support.contract import LauncherContract, request_for
from egateway.clusters.yarn_api import ResourceManagers, YarnAPIError, base_url, endpoints_from_site
from egateway.clusters.yarn_apps import ApplicationPoller, ApplicationWatch, newest_named
from egateway.clusters.yarn_submit import properties_text, submission, submit_error, submitted_app_id
from tests.fixtures._processes import is_alive
from tests.fixtures.yarn import FINAL_STATES, YarnCluster
from tests.support.gateway import GatewayTestCase, InProcessGateway
from tests.support.polling import eventually
from tests.support.wsclient import ChannelsClient
from tests.support.yarn_cluster import MAX_ALLOCATION_MB, install_jeg_yarn_spec, shared_yarn, write_yarn_specs


async def wait_state(gateway: InProcessGateway, kernel_id: str, state: str, timeout: float = 30) -> dict:
    """
    The kernel's model once it is in C{state} (bounded).
    """

    async def check() -> Any:
        code, model = await gateway.request("GET", f"api/kernels/{kernel_id}")
        return model if code == 200 and model["state"] == state else None

    deadline = reactor.seconds() + timeout
    while True:
        model = await check()
        if model is not None:
            return model
        if reactor.seconds() > deadline:
            raise AssertionError(f"kernel {kernel_id} not {state} after {timeout:g} s")
        await deferLater(reactor, 0.2, lambda: None)


class YarnGatewayTestCase(GatewayTestCase):
    """
    A gateway whose kernelspecs submit kernels to the shared YARN; every
    test must leave no application alive and no container process.
    """

    timeout = 480

    async def setUp(self) -> None:
        self.yarn = self.cluster()
        self.specs = os.path.abspath(self.mktemp())
        self.write_specs()
        self.gateway_settings = self.settings()
        await super().setUp()
        self.addCleanup(self.nothing_left)

    def cluster(self) -> YarnCluster:
        return shared_yarn()

    def settings(self, **more: Any) -> dict[str, Any]:
        return {
            "kernelspec_path": self.specs,
            "yarn_endpoint": self.yarn.web_url,
            "yarn_poll_interval": 0.25,
            "list_kernels": "true",
            "launch_timeout": 180,
            "shutdown_wait": 5,
            "terminate_wait": 5,
            "poll_interval": 0.5,
            **more,
        }

    def write_specs(self) -> None:
        write_yarn_specs(self.specs, self.yarn)

    def dedicated_cluster(self, **options: Any) -> YarnCluster:
        """
        A cluster of this test's own (started now, stopped after it, leaving nothing behind).
        """
        cluster = YarnCluster(tempfile.mkdtemp(prefix="egw-", dir="/tmp"), max_allocation_mb=MAX_ALLOCATION_MB,
                              **options)
        cluster.up()
        self.addCleanup(self.cluster_down, cluster)
        return cluster

    def cluster_down(self, cluster: YarnCluster) -> None:
        cluster.down()
        self.assertEqual(cluster.leftovers(), [])

    async def nothing_left(self) -> None:
        await eventually(lambda: not self.yarn.live_applications(), "kernel applications to end", timeout=30)
        await eventually(lambda: not self.yarn.container_processes(), "container processes to end", timeout=30)

    async def start(self, name: str = "yarn", env: dict[str, str] | None = None) -> dict[str, Any]:
        body = {"name": name, **({"env": env} if env else {})}
        code, model = await self.gateway.request("POST", "api/kernels", body)
        self.assertEqual(code, 201, model)
        return model


class YarnKernelTests(YarnGatewayTestCase):
    async def test_kernel_runs_code_interrupt_restart_shutdown(self) -> None:
        """
        A kernel starts as a YARN application named and tagged with its
        id, runs code inside a YARN container, is interrupted, restarts as
        a new application under the same kernel id, and shutting it down
        leaves no application alive and no kernel process.
        """
        model = await self.start()
        kernel_id = model["id"]
        app_id = model["placement"]["app_id"]
        app = self.yarn.application(app_id)
        self.assertEqual(app["name"], kernel_id)
        self.assertIn(kernel_id, app["applicationTags"].split(","))
        self.assertIn(app["state"], ("ACCEPTED", "RUNNING"))
        details = " ".join(p["detail"] for p in model["phases"])
        self.assertIn(f"YARN application {app_id}", details)

        client = await ChannelsClient.connect(self.gateway.url, kernel_id)
        result = await client.execute("import os; print(os.environ.get('CONTAINER_ID', ''), os.getpgid(0) != os.getpid())")
        container, in_group = result["stdout"].split()
        self.assertTrue(container.startswith("container_"), result)
        self.assertEqual(in_group, "True")  # stays in the container's process group

        async def interrupt() -> None:
            code, _ = await self.gateway.request("POST", f"api/kernels/{kernel_id}/interrupt")
            self.assertEqual(code, 204)

        reply = await client.interrupted_sleep(interrupt)
        self.assertEqual(reply["ename"], "KeyboardInterrupt")
        await client.close()

        code, restarted = await self.gateway.request("POST", f"api/kernels/{kernel_id}/restart")
        self.assertEqual(code, 200, restarted)
        code, now = await self.gateway.request("GET", f"api/kernels/{kernel_id}")
        new_app = now["placement"]["app_id"]
        self.assertNotEqual(new_app, app_id)
        self.assertIn(self.yarn.application(app_id)["state"], FINAL_STATES)
        client = await ChannelsClient.connect(self.gateway.url, kernel_id)
        result = await client.execute("6 * 7")
        self.assertEqual(result["result"]["text/plain"], "42")
        await client.close()

        code, _ = await self.gateway.request("DELETE", f"api/kernels/{kernel_id}")
        self.assertEqual(code, 204)
        self.assertIn(self.yarn.application(new_app)["state"], FINAL_STATES)
        self.assertEqual(self.yarn.container_processes(), [])

    async def test_killed_from_outside_is_dead_with_diagnostics(self) -> None:
        """
        An application killed through YARN (not by the gateway) makes its
        kernel dead, not restarted, with YARN's diagnostics; the kernel
        process dies with its container.
        """
        model = await self.start()
        pid = model["placement"]["pid"]
        self.yarn.kill(model["placement"]["app_id"])
        now = await wait_state(self.gateway, model["id"], "dead")
        self.assertIn(f"YARN application {model['placement']['app_id']} KILLED", now["reason"])
        self.assertIn("was killed by user", now["reason"])
        self.assertIn("not restarted", now["reason"])
        await eventually(lambda: not is_alive(pid), "the kernel process to die with its container", timeout=15)

    async def test_memory_above_the_maximum_allocation_fails_fast(self) -> None:
        """
        A client asking for more driver memory than any container may have
        is refused within seconds with the ResourceManager's maximum, and no
        application is left.
        """
        started = reactor.seconds()
        code, body = await self.gateway.request(
            "POST", "api/kernels", {"name": "yarn", "env": {"KERNEL_DRIVER_MEMORY": "4g"}}
        )
        self.assertEqual(code, 400, body)
        self.assertIn("spark-submit exited with code 1", body["message"])
        self.assertIn(f"max threshold ({MAX_ALLOCATION_MB} MB)", body["message"])
        self.assertLess(reactor.seconds() - started, 30)

    async def test_held_in_accepted_says_why_and_is_killed(self) -> None:
        """
        An application YARN cannot give a container (two kernels fill the
        node) times out saying why, in the RM's words, with the queue's
        capacity, and is killed.
        """
        fillers = [await self.start(env={"KERNEL_DRIVER_MEMORY": "1600m"}) for _ in range(2)]
        before = {app["id"] for app in self.yarn.applications()}
        # The timeout leaves spark-submit (a JVM) time to submit on a loaded
        # machine: once, during a full test run, it had not within 25 s.
        code, body = await self.gateway.request(
            "POST", "api/kernels", {"name": "yarn", "env": {"KERNEL_LAUNCH_TIMEOUT": "45"}}
        )
        self.assertGreaterEqual(code, 500, body)
        message = body["message"]
        self.assertIn("timed out after 45 s", message)
        self.assertIn("ACCEPTED", message)
        self.assertIn("queue default (FIFO scheduler)", message)
        self.assertIn("0 MB free of 4096 MB", message)
        (held,) = [app for app in self.yarn.applications() if app["id"] not in before]
        self.assertEqual(self.yarn.wait_for_state(held["id"], {"KILLED"})["state"], "KILLED")
        for model in fillers:
            code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
            self.assertEqual(code, 204)


AM_EXPIRY_MS = 30000
"""
How long the idle-kernel test's ResourceManager waits for an ApplicationMaster to register (YARN's default: 10
minutes); a hidden Spark context took 9 s from the container's launch with a load average of 21 on 2 cores.
"""


class YarnIdleKernelTests(YarnGatewayTestCase):
    """
    A cluster of its own whose ResourceManager fails an ApplicationMaster that has not registered within
    L{AM_EXPIRY_MS}, as every YARN does after 10 minutes.
    """

    def cluster(self) -> YarnCluster:
        return self.dedicated_cluster(am_liveness_expiry_ms=AM_EXPIRY_MS)

    async def test_idle_kernel_without_spark_context_outlives_the_am_expiry(self) -> None:
        """
        A kernel without a Spark context (mode none) stays alive and idle
        past the ResourceManager's expiry for unregistered
        ApplicationMasters: its application is RUNNING with the
        ApplicationMaster's container only (no executor), the kernel still
        runs code, and its namespace has no spark or sc; a session the
        user then makes runs a job on an executor allocated for it.
        """
        model = await self.start()
        kernel_id, app_id = model["id"], model["placement"]["app_id"]
        # The RM checks every third of the expiry, so an unregistered AM fails between 1 and 4/3 of it after its
        # launch (which came before the kernel was ready); watch the kernel that long and a margin more.
        watch_until = reactor.seconds() + AM_EXPIRY_MS / 1000 * 4 / 3 + 10
        while reactor.seconds() < watch_until:
            code, now = await self.gateway.request("GET", f"api/kernels/{kernel_id}")
            self.assertEqual(code, 200, now)
            self.assertNotEqual(now["state"], "dead", now.get("reason"))
            await deferLater(reactor, 1.0, lambda: None)
        self.assertEqual((now["state"], now["execution_state"]), ("running", "idle"), now)
        app = self.yarn.application(app_id)
        self.assertEqual(app["state"], "RUNNING", app.get("diagnostics"))
        self.assertEqual(app["runningContainers"], 1, app)  # the ApplicationMaster's: no executor was allocated

        client = await ChannelsClient.connect(self.gateway.url, kernel_id)
        self.addCleanup(client.close)
        result = await client.execute("print(6 * 7, *(name in globals() for name in ('spark', 'sc', 'sqlContext')))")
        self.assertEqual(result["stdout"].split(), ["42", "False", "False", "False"], result)
        # A session the user makes gets executors for its job (the hidden context allocates them on demand).
        result = await client.execute(
            "from pyspark.sql import SparkSession\nprint(SparkSession.builder.getOrCreate().range(100).groupBy().sum().first()[0])",
            timeout=180,
        )
        self.assertEqual(result["stdout"].split(), ["4950"], result)
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{kernel_id}")
        self.assertEqual(code, 204)
        self.assertIn(self.yarn.application(app_id)["state"], FINAL_STATES)


class YarnEnterpriseGatewaySpecTests(YarnGatewayTestCase):
    def write_specs(self) -> None:
        self.jeg_spec = install_jeg_yarn_spec(self.specs, self.yarn)

    def settings(self, **more: Any) -> dict[str, Any]:
        # What an operator running Enterprise Gateway's kernelspecs sets (its launchers answer in version 1); the
        # response address is the loopback one, where the kernel's container (on this host) is placed.
        return super().settings(response_accept_v1="true", response_ip="127.0.0.1", **more)

    async def test_enterprise_gateway_run_sh_kernelspec(self) -> None:
        """
        Enterprise Gateway's spark_python_yarn_cluster kernelspec (its
        process proxy class, bin/run.sh submitting with SPARK_OPTS, the
        launcher's --RemoteProcessProxy.* arguments, a lazy Spark context)
        launches unchanged: the application is found by its name, the kernel
        runs code and a Spark job, and shutdown kills the application.
        """
        model = await self.start(self.jeg_spec)
        kernel_id, app_id = model["id"], model["placement"]["app_id"]
        self.assertEqual(self.yarn.application(app_id)["name"], kernel_id)
        client = await ChannelsClient.connect(self.gateway.url, kernel_id)
        self.addCleanup(client.close)
        result = await client.execute("print(sc.parallelize(range(100), 2).sum())", timeout=120)
        self.assertEqual(result["stdout"].split(), ["4950"], result)
        self.assertEqual(self.yarn.application(app_id)["state"], "RUNNING")
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{kernel_id}")
        self.assertEqual(code, 204)
        self.assertIn(self.yarn.application(app_id)["state"], FINAL_STATES)


class YarnLifecycleTests(YarnGatewayTestCase):
    async def test_restarted_gateway_reattaches_and_reconciler_kills_orphans(self) -> None:
        """
        A gateway that keeps its kernels when it stops, and a new one on the
        same data directory, reattaches to the running application (same
        kernel, same application, state kept); a gateway with the same id
        and an empty store kills the application as an orphan.
        """
        data_dir = os.path.abspath(self.mktemp())
        settings = {**self.settings(), "persistence": "true", "data_dir": data_dir, "gateway_id": "egw-yarn-test"}
        first = InProcessGateway(**{**settings, "on_stop": "keep"})
        await first.start()
        code, model = await first.request("POST", "api/kernels", {"name": "yarn"})
        self.assertEqual(code, 201, model)
        app_id = model["placement"]["app_id"]
        self.assertIn("egateway-gateway:egw-yarn-test", self.yarn.application(app_id)["applicationTags"].split(","))
        client = await ChannelsClient.connect(first.url, model["id"])
        await client.execute("x = 42")
        await client.close()
        await first.stop()
        self.assertIn(self.yarn.application(app_id)["state"], ("ACCEPTED", "RUNNING"))

        second = InProcessGateway(**{**settings, "on_stop": "keep"})
        await second.start()
        again = await wait_state(second, model["id"], "running")
        self.assertEqual(again["placement"]["app_id"], app_id)
        client = await ChannelsClient.connect(second.url, model["id"])
        self.assertEqual((await client.execute("x"))["result"]["text/plain"], "42")
        await client.close()
        await second.stop()

        # Same gateway id, a store that knows nothing: the application is an orphan.
        third = InProcessGateway(**{**settings, "data_dir": os.path.abspath(self.mktemp()), "reconcile": "reap"})
        await third.start()
        self.addCleanup(third.stop)
        await eventually(lambda: self.yarn.application(app_id)["state"] in FINAL_STATES,
                         "the reconciler to kill the orphan application", timeout=60)


class YarnImpersonationTests(YarnGatewayTestCase):
    def settings(self, **more: Any) -> dict[str, Any]:
        return super().settings(impersonation_enabled="true", **more)

    async def test_application_runs_as_the_kernel_user(self) -> None:
        """
        With impersonation the application is submitted with --proxy-user:
        YARN runs it as the kernel's user; a prohibited user is refused
        before anything is submitted.
        """
        model = await self.start(env={"KERNEL_USERNAME": "alice"})
        self.assertEqual(self.yarn.application(model["placement"]["app_id"])["user"], "alice")
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
        before = len(self.yarn.applications())
        code, body = await self.gateway.request("POST", "api/kernels", {"name": "yarn", "env": {"KERNEL_USERNAME": "root"}})
        self.assertEqual(code, 403, body)
        self.assertIn("prohibited", body["message"])
        self.assertEqual(len(self.yarn.applications()), before)


class YarnSparkTests(YarnGatewayTestCase):
    async def test_spark_job_runs_on_an_executor(self) -> None:
        """
        With an eager Spark context the kernel's application is RUNNING
        when the kernel is ready, a job on an executor returns its result,
        sqlContext works with pyspark 4, and ten interrupts in a row land.
        """
        model = await self.start("yarn_spark")
        self.assertEqual(self.yarn.application(model["placement"]["app_id"])["state"], "RUNNING")
        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        result = await client.execute("print(sc.parallelize(range(100), 2).sum(), spark.range(10).count())", timeout=120)
        self.assertEqual(result["stdout"].split(), ["4950", "10"], result)
        result = await client.execute("print(type(sqlContext).__name__, sqlContext.range(3).count())")
        self.assertEqual(result["stdout"].split(), ["SQLContext", "3"], result)

        async def interrupt() -> None:
            code, _ = await self.gateway.request("POST", f"api/kernels/{model['id']}/interrupt")
            self.assertEqual(code, 204)

        # Ten interrupts in a row all land (no SIGINT+SIGUSR2 race).
        for _ in range(10):
            reply = await client.interrupted_sleep(interrupt)
            self.assertEqual(reply["ename"], "KeyboardInterrupt")
        await client.close()
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)


class YarnFailoverTests(YarnGatewayTestCase):
    """
    A gateway configured as Enterprise Gateway's users configure an HA pair
    (EG_YARN_ENDPOINT and EG_ALT_YARN_ENDPOINT) in front of two real
    ResourceManagers with automatic failover and work-preserving recovery
    (ZooKeeper, rm1, rm2 and a NodeManager: a cluster of its own, started
    for this test and stopped after it).
    """

    def cluster(self) -> YarnCluster:
        return self.dedicated_cluster(resource_managers=2)

    @property
    def gateway_env(self) -> dict[str, str]:  # type: ignore[override]
        return {"EG_YARN_ENDPOINT": self.yarn.web_urls[0] + "/ws/v1/cluster",
                "EG_ALT_YARN_ENDPOINT": self.yarn.web_urls[1]}

    def settings(self, **more: Any) -> dict[str, Any]:
        settings = super().settings(**more)
        del settings["yarn_endpoint"]
        return settings

    async def test_failover_keeps_the_kernel_served(self) -> None:
        """
        The active ResourceManager is killed while a kernel with a Spark
        context runs: the standby takes over, the kernel still runs code and
        Spark jobs, the gateway follows the new active RM (its kernel is not
        marked dead), and shutdown kills the application through it.
        """
        switched: list[str] = []

        def observe(event: dict) -> None:
            if "the active ResourceManager is now" in str(event.get("log_format", "")):
                switched.append(str(event.get("endpoint")))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        model = await self.start("yarn_lazy")
        kernel_id, app_id = model["id"], model["placement"]["app_id"]
        client = await ChannelsClient.connect(self.gateway.url, kernel_id)
        self.addCleanup(client.close)
        result = await client.execute("x = sc.parallelize(range(100), 2).sum(); print(x)", timeout=120)
        self.assertEqual(result["stdout"].split(), ["4950"], result)

        active = self.yarn.active_rm()
        (survivor,) = [rm_id for rm_id in self.yarn.rm_ids if rm_id != active]
        self.yarn.kill_resource_manager(active)
        await eventually(lambda: self.yarn.active_rm() == survivor, f"{survivor} to become active", timeout=60)
        self.assertEqual(self.yarn.application(app_id)["name"], kernel_id)  # recovered from ZooKeeper

        result = await client.execute("print(x + sc.parallelize(range(10), 2).sum())", timeout=120)
        self.assertEqual(result["stdout"].split(), ["4995"], result)
        await eventually(lambda: self.yarn.rm_url(survivor) in switched,
                         "the gateway to follow the new active ResourceManager", timeout=30)
        code, now = await self.gateway.request("GET", f"api/kernels/{kernel_id}")
        self.assertNotEqual(now["state"], "dead", now)
        # Recovered ACCEPTED, RUNNING again once its ApplicationMaster has re-registered with the new RM.
        await eventually(lambda: self.yarn.application(app_id)["state"] == "RUNNING",
                         "the application to run again under the new RM", timeout=60)
        code, now = await self.gateway.request("GET", f"api/kernels/{kernel_id}")
        self.assertNotEqual(now["state"], "dead", now)

        code, _ = await self.gateway.request("DELETE", f"api/kernels/{kernel_id}")
        self.assertEqual(code, 204)
        self.assertIn(self.yarn.application(app_id)["state"], FINAL_STATES)


class YarnLauncherContract(LauncherContract, TestCase):
    """
    The YARN launcher against the launcher contract, on the shared cluster.
    """

    timeout = 480

    async def setUp(self) -> None:
        self.yarn = shared_yarn()
        self.config = build_config({}, {}, {
            "response-port": "0",
            "yarn-endpoint": self.yarn.web_url,
            "yarn-poll-interval": "0.25",
            "poll-interval": "1",
        })
        self.services: dict[str, Any] = {}
        self.launchers: list[Any] = []
        self.addCleanup(self._stop_services)
        specs = os.path.abspath(self.mktemp())
        write_yarn_specs(specs, self.yarn)
        self.working = KernelSpec.from_json("working", "/nonexistent",
                                            json.load(open(os.path.join(specs, "yarn", "kernel.json"))))
        broken = json.load(open(os.path.join(specs, "yarn", "kernel.json")))
        broken["argv"] = broken["argv"] + ["--kernel-class-name", "no.such.Kernel"]
        self.broken = KernelSpec.from_json("broken", "/nonexistent", broken)

    async def _stop_services(self) -> None:
        for launcher in self.launchers:
            await launcher.stop()
        listener = self.services.get("response")
        if listener is not None and listener.running:
            await listener.stopService()

    async def make_launcher(self) -> Any:
        launcher = YarnLauncher(
            LauncherContext(reactor=reactor, runtime_dir=os.path.abspath(self.mktemp()), ports=None,
                            section=self.config.yarn, shared=LaunchSettings.from_config(self.config),
                            services=self.services)
        )
        self.launchers.append(launcher)
        return launcher

    def make_request(self, kernel_id: str, spec_name: str = "working") -> Any:
        request, phases = request_for(kernel_id, self.working, timeout=60)
        return replace(request, env={**self.working.env, **request.env}, config=self.working.launcher_config), phases

    def broken_request(self, kernel_id: str) -> Any:
        request, phases = request_for(kernel_id, self.broken, timeout=60)
        return replace(request, env={**self.broken.env, **request.env}, config=self.broken.launcher_config), phases

    def live(self) -> list[str]:
        return [app["id"] for app in self.yarn.live_applications()]

    async def leftovers(self, process: Any) -> list:
        try:
            await eventually(lambda: not self.live() and not self.yarn.container_processes(),
                             "the application to end", timeout=30)
        except AssertionError:
            pass
        return self.live() + self.yarn.container_processes()

    async def placed_leftovers(self, phases: list) -> list:
        return await self.leftovers(None)


# -- without YARN -------------------------------------------------------------


class DriverDetectionTests(SynchronousTestCase):
    def test_only_a_yarn_cluster_mode_driver_keeps_its_application_master_alive(self) -> None:
        """
        The launcher creates its hidden Spark context only as the driver of a YARN cluster-mode application
        (Spark's gateway, a YARN container, a staged application): not under a plain spark-submit (client mode or
        a standalone cluster), not in a YARN container Spark did not start.
        """
        import importlib.util

        from tests.support.remote_kernels import LAUNCHER

        spec = importlib.util.spec_from_file_location("launch_ipykernel_under_test", LAUNCHER)
        launcher = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(launcher)
        driver = {"PYSPARK_GATEWAY_PORT": "40000", "CONTAINER_ID": "container_1_0001_01_000001",
                  "SPARK_YARN_STAGING_DIR": "file:/staging/application_1_0001"}
        for env, expected in ((driver, True), ({**driver, "CONTAINER_ID": ""}, False),
                              ({k: v for k, v in driver.items() if k != "PYSPARK_GATEWAY_PORT"}, False),
                              ({k: v for k, v in driver.items() if k != "SPARK_YARN_STAGING_DIR"}, False)):
            self.patch(os, "environ", env)
            self.assertEqual(launcher.spark_yarn_cluster_driver(), expected, env)


class EndpointTests(SynchronousTestCase):
    def test_both_forms_of_the_endpoint(self) -> None:
        """
        EG_YARN_ENDPOINT works as Enterprise Gateway's users set it: the
        RM's base URL or its /ws/v1/cluster form.
        """
        for given in ("http://rm:8088", "http://rm:8088/", "http://rm:8088/ws/v1/cluster", "http://rm:8088/ws/v1/cluster/"):
            self.assertEqual(base_url(given), "http://rm:8088")
        self.assertRaises(ValueError, base_url, "rm:8088")

    def test_bad_endpoint_stops_start_up(self) -> None:
        """
        A malformed EG_YARN_ENDPOINT, or an alternate RM without a primary,
        is a start-up error naming the setting.
        """
        from egateway.config import ConfigError
        from egateway.validation import load_config

        error = self.assertRaises(ConfigError, load_config, {}, {"EG_YARN_ENDPOINT": "rm:8088"}, {})
        self.assertIn("yarn.yarn_endpoint: 'rm:8088' is not an http:// or https:// URL", str(error))
        error = self.assertRaises(ConfigError, load_config, {}, {"EG_ALT_YARN_ENDPOINT": "http://rm2:8088"}, {})
        self.assertIn("yarn.alt_yarn_endpoint", str(error))
        config = load_config({}, {"EG_YARN_ENDPOINT": "http://rm:8088/ws/v1/cluster"}, {})
        self.assertEqual(config.yarn.yarn_endpoint, "http://rm:8088/ws/v1/cluster")

    def test_endpoints_from_yarn_site(self) -> None:
        """
        Without an endpoint, yarn-site.xml names the RM (both of an HA pair).
        """
        conf = self.mktemp()
        os.makedirs(conf)
        with open(os.path.join(conf, "yarn-site.xml"), "w") as f:
            f.write(
                "<configuration><property><name>yarn.resourcemanager.ha.enabled</name><value>true</value></property>"
                "<property><name>yarn.resourcemanager.ha.rm-ids</name><value>rm1,rm2</value></property>"
                "<property><name>yarn.resourcemanager.webapp.address.rm1</name><value>a:8088</value></property>"
                "<property><name>yarn.resourcemanager.webapp.address.rm2</name><value>b:8088</value></property>"
                "</configuration>"
            )
        self.assertEqual(endpoints_from_site(conf), ["http://a:8088", "http://b:8088"])


class _FakeRM(Resource):
    """
    A ResourceManager's REST API as far as the HA client cares: active, it
    lists one application; standby, it redirects as a standby RM does.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.standby = False
        self.requests = 0

    def render(self, request: Any) -> bytes:
        self.requests += 1
        # No kept connection: stopping the port is then the RM's death.
        request.setHeader(b"Connection", b"close")
        if self.standby:
            request.setResponseCode(307)
            request.setHeader(b"Location", b"http://elsewhere/")
            return b"This is standby RM."
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"apps": {"app": [{"id": "application_1_1", "state": "RUNNING"}]}}).encode()


class HATests(TestCase):
    async def test_follows_the_active_resource_manager(self) -> None:
        """
        With two RMs the client uses the active one, moves to the other
        when it turns standby or stops answering, and says when none is
        active.
        """
        rms = [_FakeRM(), _FakeRM()]
        ports = [reactor.listenTCP(0, Site(rm), interface="127.0.0.1") for rm in rms]
        for port in ports:
            self.addCleanup(lambda port=port: port.connected and port.stopListening())
        rms[1].standby = True
        client = ResourceManagers(reactor, [f"http://127.0.0.1:{p.getHost().port}/ws/v1/cluster" for p in ports])
        self.addCleanup(client.close)
        self.assertEqual(len(await client.applications()), 1)
        self.assertEqual((rms[0].requests, rms[1].requests), (1, 0))
        # Failover: the first turns standby, the second active.
        rms[0].standby, rms[1].standby = True, False
        self.assertEqual(len(await client.applications()), 1)
        self.assertEqual(client.active, f"http://127.0.0.1:{ports[1].getHost().port}")
        # The active one dies: the other (active again) answers.
        rms[0].standby = False
        await ports[1].stopListening()
        self.assertEqual(len(await client.applications()), 1)
        self.assertEqual(client.active, f"http://127.0.0.1:{ports[0].getHost().port}")
        rms[0].standby = True
        error = await self.assertFailure(Deferred.fromCoroutine(client.applications()), YarnAPIError)
        self.assertIn("no active YARN ResourceManager answered", str(error))
        self.assertIn("standby", str(error))


class SubmissionTests(SynchronousTestCase):
    def plan(self, **env: str) -> Any:
        return submission(
            ["/venv/bin/python", "/l/launch_ipykernel.py", "--kernel-id", "k"],
            spark_submit="/spark/bin/spark-submit", kernel_id="k", gateway_id="g1", env=env,
            config={"spark_opts": ["--conf", "a=b"]}, am_wait_time="3600s", token="T", properties_file="/r/p.conf",
        )

    def test_argv_and_properties(self) -> None:
        """
        The launcher script is the driver of a cluster-mode application
        named after the kernel; the token, the tags, the AM's wait and a
        single attempt are properties (not on the command line).
        """
        plan = self.plan(KERNEL_USERNAME="alice")
        self.assertEqual(plan.argv, ["/spark/bin/spark-submit", "--master", "yarn", "--deploy-mode", "cluster",
                                     "--name", "k", "--properties-file", "/r/p.conf", "--conf", "a=b",
                                     "/l/launch_ipykernel.py", "--kernel-id", "k"])
        self.assertNotIn("T", " ".join(plan.argv))
        props = plan.properties
        self.assertEqual(props["spark.yarn.appMasterEnv.EG_LAUNCH_TOKEN"], "T")
        self.assertEqual(props["spark.yarn.tags"], "k,egateway-gateway:g1")
        self.assertEqual((props["spark.yarn.maxAppAttempts"], props["spark.yarn.am.waitTime"]), ("1", "3600s"))
        self.assertEqual(props["spark.yarn.appMasterEnv.KERNEL_USERNAME"], "alice")

    def test_client_memory_is_checked(self) -> None:
        """
        KERNEL_DRIVER_MEMORY becomes --driver-memory (which wins over the
        kernelspec's spark.driver.memory); a malformed one is a 400.
        """
        self.assertEqual(self.plan(KERNEL_DRIVER_MEMORY="2g").argv[-5:-3], ["--driver-memory", "2g"])
        from egateway.clusters.interface import LaunchError

        error = self.assertRaises(LaunchError, self.plan, KERNEL_DRIVER_MEMORY="2g --conf x=y")
        self.assertEqual(error.status, 400)

    def test_properties_round_trip(self) -> None:
        """
        Values with separators, backslashes and non-ASCII characters are
        escaped the way Java reads them back.
        """
        self.assertEqual(properties_text({"k": "=a\\b é"}), "k=\\=a\\\\b \\u00e9\n")

    def test_submit_output(self) -> None:
        """
        The application id and the reason of a failed submit come from
        spark-submit's output.
        """
        self.assertEqual(submitted_app_id("INFO Client: Submitted application application_17_0003\n"),
                         "application_17_0003")
        output = ("INFO x\nException in thread \"main\" java.lang.IllegalArgumentException: Required AM memory "
                  "(4096+409 MB) is above the max threshold (2048 MB) of this cluster!\n\tat org.apache.Foo\n")
        self.assertEqual(submit_error(output), "java.lang.IllegalArgumentException: Required AM memory (4096+409 MB) "
                         "is above the max threshold (2048 MB) of this cluster!")


class WatchTests(SynchronousTestCase):
    def test_killed_outside_is_a_decision(self) -> None:
        """
        KILLED by someone else ends the kernel as a decision with YARN's
        diagnostics; killed by the gateway it is not.
        """
        watch = ApplicationWatch("k", "application_1_1")
        ended = []
        watch.when_ended().addCallback(ended.append)
        watch.report({"id": "application_1_1", "state": "KILLED", "diagnostics": "Application killed by user."})
        self.assertTrue(ended[0].decision)
        self.assertEqual(ended[0].reason, "YARN application application_1_1 KILLED: Application killed by user.")
        mine = ApplicationWatch("k", "application_1_2")
        mine.stopping = True
        mine.report({"id": "application_1_2", "state": "KILLED"})
        self.assertFalse(mine.status.decision)

    def test_one_poll_for_all_and_unwatching_mid_query(self) -> None:
        """
        One query per interval follows every watched application; a kernel
        ending (unwatched) while a query is out, and another watched right
        after, neither doubles the loop nor breaks it.
        """
        clock = Clock()
        answers: list[Deferred[list]] = []
        rms = SimpleNamespace(applications=lambda **query: answers.append(Deferred()) or answers[-1])
        poller = ApplicationPoller(clock, rms, "g1", 1.0)
        first, second = ApplicationWatch("k1", "application_1_1"), ApplicationWatch("k2", "application_1_2")
        unwatch = poller.watch(first)
        poller.watch(second)
        clock.advance(1.0)
        self.assertEqual(len(answers), 1)
        unwatch()
        third = ApplicationWatch("k3", "application_1_3")
        poller.watch(third)
        answers[0].callback([{"id": "application_1_2", "state": "KILLED"}])
        self.assertEqual(second.status.reason, "YARN application application_1_2 KILLED")
        self.assertIsNone(first.app)
        clock.advance(1.0)
        self.assertEqual(len(answers), 2)
        answers[1].callback([{"id": "application_1_3", "state": "RUNNING"}])
        self.assertEqual(third.state, "RUNNING")
        self.assertTrue(poller.watching(third))
        self.successResultOf(Deferred.fromCoroutine(poller.stop()))
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertFalse(poller.watching(third))

    def test_untagged_application_found_by_name(self) -> None:
        """
        An application a kernelspec's own script submitted (Enterprise
        Gateway's run.sh: no gateway tag, and spark-submit's output may not
        name it) is found by its name in the one listing of the interval.
        """
        clock = Clock()
        queries: list[dict] = []
        apps = [{"id": "application_1_7", "name": "k-run", "startedTime": 5000, "state": "ACCEPTED",
                 "applicationTags": ""}]

        def applications(**query: Any) -> Deferred[list]:
            queries.append(query)
            tag = query.get("applicationTags")
            return succeed([app for app in apps if not tag or tag in app["applicationTags"].split(",")])

        async def application(app_id: str) -> dict:
            return {"id": app_id, "state": "RUNNING"}

        rms = SimpleNamespace(applications=applications, application=application)
        poller = ApplicationPoller(clock, rms, "g1", 1.0)
        tagged = ApplicationWatch("k1", "application_1_1", started=4000)
        untagged = ApplicationWatch("k-run", started=4000, tagged=False)
        poller.watch(tagged)
        poller.watch(untagged)
        clock.advance(1.0)
        self.assertEqual(untagged.app_id, "application_1_7")
        self.assertEqual(untagged.state, "ACCEPTED")
        self.assertEqual(len(queries), 1)
        self.successResultOf(Deferred.fromCoroutine(poller.stop()))

    def test_restart_finds_the_new_application(self) -> None:
        """
        A restart reuses the name: the previous launch's application is
        older than the new launch and is not taken for it.
        """
        apps = [{"id": "application_1_1", "name": "k", "startedTime": 1000, "state": "KILLED"},
                {"id": "application_1_2", "name": "k", "startedTime": 5000, "state": "ACCEPTED"}]
        self.assertEqual(newest_named(apps, "k", 4000)["id"], "application_1_2")
        self.assertIsNone(newest_named(apps[:1], "k", 4000))


class KillDuringFailoverTests(SynchronousTestCase):
    def launcher(self, clock: Clock) -> YarnLauncher:
        config = build_config({}, {}, {})
        return YarnLauncher(LauncherContext(
            reactor=clock, runtime_dir=self.mktemp(), ports=None, section=config.yarn,
            shared=LaunchSettings.from_config(config), services={},
        ))

    def test_restore_waits_for_an_active_resource_manager(self) -> None:
        """
        A gateway restarting while no ResourceManager answers as active
        (failover under way) reattaches its kernel once one does, instead
        of taking it for dead.
        """
        clock = Clock()
        launcher = self.launcher(clock)
        endpoints = ["http://rm1:8088", "http://rm2:8088"]
        active = []

        async def application(app_id: str) -> dict[str, Any]:
            if not active:
                raise YarnAPIError(0, "no active YARN ResourceManager answered: rm2: standby")
            return {"id": app_id, "name": "k", "state": "RUNNING", "startedTime": 1000}

        async def applications(**query: Any) -> list:
            return []

        async def close() -> None:
            pass

        rms = SimpleNamespace(application=application, applications=applications, close=close, endpoints=endpoints)
        launcher._clusters[tuple(endpoints)] = _Cluster(rms, ApplicationPoller(clock, rms, "g1", 1.0))
        info = {"ip": "127.0.0.1", "shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4,
                "hb_port": 5, "key": "k", "transport": "tcp", "signature_scheme": "hmac-sha256"}
        restoring = launcher.restore("k", {"app_id": "application_1_1", "endpoints": endpoints,
                                           "connection_info": info, "ip": "127.0.0.1", "host": "localhost"})
        clock.pump([0.5] * 20)  # 10 s of failover
        self.assertNoResult(restoring)
        active.append(True)
        clock.pump([0.5] * 2)
        process = self.successResultOf(restoring)
        self.assertEqual(process.app_id, "application_1_1")
        process.detach()
        self.successResultOf(launcher.stop())

    def test_kill_waits_for_an_active_resource_manager(self) -> None:
        """
        A kernel stopped while no ResourceManager answers as active (the
        active one just died, the standby has not taken over) still has its
        application killed, through the RM that becomes active; one that
        stays unreachable is given up after a bound.
        """
        clock = Clock()
        launcher = self.launcher(clock)
        state = {"active": False, "app": "RUNNING", "kills": 0}

        async def application(app_id: str) -> dict[str, Any]:
            if not state["active"]:
                raise YarnAPIError(0, "no active YARN ResourceManager answered: rm2: standby")
            return {"id": app_id, "state": state["app"]}

        async def kill(app_id: str) -> None:
            await application(app_id)
            state["kills"] += 1
            state["app"] = "KILLED"

        cluster = SimpleNamespace(rms=SimpleNamespace(application=application, kill=kill))
        done = Deferred.fromCoroutine(launcher.kill_quietly(cluster, "application_1_1", "k"))
        clock.pump([0.25] * 20)  # 5 s of failover
        self.assertNoResult(done)
        state["active"] = True
        clock.pump([0.25] * 2)
        self.successResultOf(done)
        self.assertEqual((state["kills"], state["app"]), (1, "KILLED"))

        state.update(active=False, app="RUNNING", kills=0)
        done = Deferred.fromCoroutine(launcher.kill_quietly(cluster, "application_1_2", "k"))
        clock.pump([0.25] * 4 * 60)
        self.successResultOf(done)
        self.assertEqual(state["kills"], 0)
