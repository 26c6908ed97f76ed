"""
Kernels as Docker containers and Swarm services: the container plan's rules
without an engine (synchronous), then a real private Docker engine with a
one-node swarm (L{tests.support.docker_engine}) driven through an
in-process gateway's REST API and WebSocket.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
import uuid
from types import SimpleNamespace
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dataclasses import replace

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure

from egateway.clusters.docker import ContainerWatch, DockerLauncher
from egateway.clusters.docker_api import Stream, _Lines, demultiplex
from egateway.clusters.docker_events import EngineEvents
from egateway.clusters.docker_plan import container_body, container_env, container_plan, service_body
from egateway.clusters.interface import LaunchError, LauncherContext, LaunchSettings
from egateway.clusters.swarm import SwarmLauncher
from egateway.config import build_config
from egateway.errors import BadRequest
from egateway.kernels.policy import TenancyPolicy
from egateway.kernels.specs import KernelSpec
from tests.fixtures.docker import DockerDaemon
from tests.support.docker_engine import shared_docker
from tests.support.gateway import GatewayTestCase, InProcessGateway
from tests.support.polling import eventually
from tests.support.contract import LauncherContract, request_for
from tests.support.remote_kernels import kernelspec, launcher_argv, write_spec
from tests.support.wsclient import ChannelsClient

KERNEL_LABEL = "org.egateway.kernel_id"


def settings(**overrides: Any) -> Any:
    values = {"docker_network": "kernels", "docker_max_cpus": "4", "docker_max_memory": "8G",
              "docker_mounts": "", "docker_max_gpus": "0"}
    values.update(overrides)
    return SimpleNamespace(**values)


# -- no engine -------------------------------------------------------------


class PlanTests(SynchronousTestCase):
    config = {"image_name": "local/kernel:1", "mounts": ["/usr:/usr:ro"], "user": "1000:100",
              "allowed_images": ["local/kernel:2"], "max_cpus": 2}

    def test_config_decides(self) -> None:
        """
        Image, network, mounts and user come from the kernelspec config.
        """
        plan = container_plan({}, self.config, settings())
        self.assertEqual((plan.image, plan.network, plan.user), ("local/kernel:1", "kernels", "1000:100"))
        self.assertEqual([m.bind() for m in plan.mounts], ["/usr:/usr:ro"])
        self.assertEqual((plan.cpus, plan.memory), (0.0, 0))

    def test_client_values_inside_the_allow_lists(self) -> None:
        """
        A client may pick an allowed image and resources up to the bounds;
        anything else is refused with 400 naming the variable.
        """
        plan = container_plan({"KERNEL_IMAGE": "local/kernel:2", "KERNEL_CPUS": "1.5", "KERNEL_MEMORY": "1G"},
                              self.config, settings())
        self.assertEqual((plan.image, plan.cpus, plan.memory), ("local/kernel:2", 1.5, 1024 ** 3))
        for env, word in (
            ({"KERNEL_IMAGE": "evil/miner:latest"}, "KERNEL_IMAGE"),
            ({"KERNEL_CPUS": "3"}, "KERNEL_CPUS"),
            ({"KERNEL_CPUS": "nan"}, "KERNEL_CPUS"),
            ({"KERNEL_MEMORY": "9G"}, "KERNEL_MEMORY"),
            ({"KERNEL_UID": "0"}, "KERNEL_UID"),
        ):
            with self.assertRaises(LaunchError) as caught:
                container_plan(env, self.config, settings())
            self.assertEqual(caught.exception.status, 400, env)
            self.assertIn(word, str(caught.exception))

    def test_bad_config_is_the_operators(self) -> None:
        """
        A kernelspec without an image, with a relative mount or a root user
        fails with 500 naming the key.
        """
        for config, key in (({}, "image_name"), ({**self.config, "mounts": ["usr:/usr"]}, "mounts"),
                            ({**self.config, "user": "0"}, "user")):
            with self.assertRaises(LaunchError) as caught:
                container_plan({}, config, settings())
            self.assertEqual(caught.exception.status, 500)
            self.assertIn(key, str(caught.exception))

    def test_gpus_within_bounds(self) -> None:
        """
        GPUs: the kernelspec's count, a client's only up to max_gpus (none
        by default); requested from the engine as devices (Docker) or
        generic resources (Swarm).
        """
        self.assertEqual(container_plan({}, {**self.config, "gpus": 1}, settings()).gpus, 1)
        with self.assertRaises(LaunchError) as caught:
            container_plan({"KERNEL_GPUS": "1"}, self.config, settings())
        self.assertEqual(caught.exception.status, 400)
        plan = container_plan({"KERNEL_GPUS": "2"}, {**self.config, "max_gpus": 2}, settings())
        body = container_body(plan, "egateway-k", [], {})
        self.assertEqual(body["HostConfig"]["DeviceRequests"],
                         [{"Driver": "nvidia", "Count": 2, "Capabilities": [["gpu"]]}])
        service = service_body(plan, "egateway-k", [], {}, 3)
        self.assertEqual(service["TaskTemplate"]["Resources"]["Reservations"]["GenericResources"],
                         [{"DiscreteResourceSpec": {"Kind": "gpu", "Value": 2}}])

    def test_bodies(self) -> None:
        """
        The container has no restart policy, the plan's limits, read-only
        binds and the labels; the service one replica, no restart policy of
        Swarm's, the constraints, and the labels on its container too.
        """
        plan = container_plan({"KERNEL_CPUS": "1.5", "KERNEL_MEMORY": "1G"},
                              {**self.config, "constraints": ["node.role==worker"]}, settings())
        body = container_body(plan, "egateway-k", ["A=1"], {"l": "v"})
        self.assertEqual((body["Image"], body["Env"], body["Labels"], body["User"]),
                         ("local/kernel:1", ["A=1"], {"l": "v"}, "1000:100"))
        self.assertEqual(body["HostConfig"]["RestartPolicy"], {"Name": "no"})
        self.assertEqual((body["HostConfig"]["NanoCpus"], body["HostConfig"]["Memory"]), (1_500_000_000, 1024 ** 3))
        self.assertEqual(body["HostConfig"]["Binds"], ["/usr:/usr:ro"])
        self.assertNotIn("DeviceRequests", body["HostConfig"])
        service = service_body(plan, "egateway-k", ["A=1"], {"l": "v"}, 3)
        task = service["TaskTemplate"]
        self.assertEqual(service["Mode"], {"Replicated": {"Replicas": 1}})
        self.assertEqual(task["RestartPolicy"], {"Condition": "none"})
        self.assertEqual(task["Placement"], {"Constraints": ["node.role==worker"]})
        self.assertEqual((service["Labels"], task["ContainerSpec"]["Labels"]), ({"l": "v"}, {"l": "v"}))
        self.assertEqual(task["ContainerSpec"]["Mounts"],
                         [{"Type": "bind", "Source": "/usr", "Target": "/usr", "ReadOnly": True}])
        self.assertEqual(service["EndpointSpec"], {"Mode": "dnsrr"})

    def test_profile_allow_list(self) -> None:
        """
        Through a profile: its image and resources apply, a client picks only
        an image on the profile's list, and nothing else.
        """
        config = build_config({"profiles": {"images": {
            "kernelspecs": ["docker"], "image": "local/kernel:1", "cpus": 1, "memory": "2G",
            "allowed_images": ["local/kernel:1", "local/kernel:gpu"]}}}, {}, {})
        spec = KernelSpec.from_json("docker", "/nonexistent", kernelspec(
            "docker", launcher_argv(), "docker", config={"image_name": "local/other:1", "mounts": ["/usr:/usr:ro"]}))
        policy = TenancyPolicy.from_config(config)

        def planned(env: dict[str, str]) -> Any:
            launch = policy.plan(None, "alice", spec, env, env, requested="images")
            return container_plan(env, launch.launcher_config, settings())

        self.assertEqual((planned({}).image, planned({}).cpus, planned({}).memory),
                         ("local/kernel:1", 1.0, 2 * 1024 ** 3))
        self.assertEqual(planned({"KERNEL_IMAGE": "local/kernel:gpu"}).image, "local/kernel:gpu")
        for env in ({"KERNEL_IMAGE": "local/other:1"}, {"KERNEL_IMAGE": "evil/miner:1"}):
            with self.assertRaises((BadRequest, LaunchError)):
                planned(env)

    def test_environment(self) -> None:
        """
        The gateway host's PATH and HOME stay out; the contract wins.
        """
        env = container_env({"PATH": "/x", "HOME": "/root", "KERNEL_ID": "client", "A": "1", "bad-name": "2"},
                            {"KERNEL_ID": "k1"})
        self.assertEqual(env, ["A=1", "KERNEL_ID=k1"])

    def test_demultiplex(self) -> None:
        """
        The engine's log frames are removed.
        """
        framed = b"\x01\0\0\0\0\0\0\x06hello\n\x02\0\0\0\0\0\0\x05oops\n"
        self.assertEqual(demultiplex(framed), "hello\noops\n")


class WatchTests(SynchronousTestCase):
    """
    How a container's events become the kernel's exit status.
    """

    def ended(self, *events: tuple[str, dict], stopping: bool = False) -> Any:
        watch = ContainerWatch("c1", "egateway-k1")
        watch.gateway_stopping = stopping
        fired = []
        watch.when_ended().addCallback(fired.append)
        for action, attributes in events:
            watch.on_event(action, attributes)
        return fired[0] if fired else None

    def test_killed_outside_is_a_decision(self) -> None:
        """
        A TERM or KILL the gateway did not send, then death: a decision,
        with the exit code.
        """
        status = self.ended(("kill", {"signal": "9"}), ("die", {"exitCode": "137"}))
        self.assertEqual((status.code, status.decision), (137, True))
        self.assertIn("stopped outside the gateway (signal 9) and exited with code 137", status.describe())

    def test_gateway_stop_and_crashes_are_not(self) -> None:
        """
        The gateway's own stop, an exit of the kernel's own, the OOM killer
        and an interrupt are not decisions.
        """
        self.assertFalse(self.ended(("kill", {"signal": "15"}), ("die", {"exitCode": "143"}), stopping=True).decision)
        self.assertFalse(self.ended(("kill", {"signal": "2"}), ("die", {"exitCode": "3"})).decision)
        oom = self.ended(("oom", {}), ("die", {"exitCode": "137"}))
        self.assertFalse(oom.decision)
        self.assertIn("OOM killer", oom.describe())

    def test_removed_outside(self) -> None:
        """
        A container removed without a death seen first ends the kernel as a
        decision; a death is reported once.
        """
        self.assertTrue(self.ended(("destroy", {})).decision)
        self.assertEqual(self.ended(("die", {"exitCode": "1"}), ("destroy", {})).code, 1)


class FakeStreamingEngine:
    path = "/nonexistent/docker.sock"

    def __init__(self) -> None:
        self.queries: list[dict] = []
        self.protocols: list[Any] = []

    async def stream(self, path: str, query: dict, on_line: Any) -> Stream:
        self.queries.append(query)
        protocol = _Lines(on_line)
        self.protocols.append(protocol)
        return Stream(protocol)


class EventStreamTests(SynchronousTestCase):
    def test_one_stream_dispatch_and_reopen(self) -> None:
        """
        One stream serves every watched container (split across chunks);
        when it breaks it is reopened from the last event's time.
        """
        clock = Clock()
        engine = FakeStreamingEngine()
        events = EngineEvents(clock, engine)
        seen: dict[str, list] = {"a": [], "b": []}
        events.watch("a", lambda action, attrs: seen["a"].append((action, attrs.get("exitCode"))))
        events.watch("b", lambda action, attrs: seen["b"].append(action))
        clock.advance(0)
        self.assertEqual(len(engine.queries), 1)
        self.assertEqual(engine.queries[0]["filters"]["label"], [KERNEL_LABEL])
        self.assertTrue(events.connected)
        line = json.dumps({"Action": "die", "Actor": {"ID": "a", "Attributes": {"exitCode": "3"}}, "time": 17})
        engine.protocols[0].dataReceived(line[:10].encode())
        engine.protocols[0].dataReceived((line[10:] + "\n" + json.dumps(
            {"Action": "kill", "Actor": {"ID": "b", "Attributes": {}}, "time": 18}) + "\n").encode())
        self.assertEqual(seen, {"a": [("die", "3")], "b": ["kill"]})
        engine.protocols[0].connectionLost(Failure(ConnectionDone()))
        self.assertFalse(events.connected)
        clock.advance(1)
        self.assertEqual(len(engine.queries), 2)
        self.assertEqual(engine.queries[1]["since"], 18)
        events.stop()


class SharedStreamTests(SynchronousTestCase):
    def test_concurrent_starts_open_one_stream(self) -> None:
        """
        Launches that start at once share one attempt to open the stream.
        """
        engine = FakeStreamingEngine()
        gate: Deferred[None] = Deferred()
        opened = engine.stream

        async def slow(path: str, query: dict, on_line: Any) -> Stream:
            await gate
            return await opened(path, query, on_line)

        engine.stream = slow  # type: ignore[method-assign]
        events = EngineEvents(Clock(), engine)
        first = Deferred.fromCoroutine(events.started())
        second = Deferred.fromCoroutine(events.started())
        gate.callback(None)
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(len(engine.queries), 1)
        events.stop()


class UnreachableEngineTests(TestCase):
    async def test_no_engine_fails_the_launch_saying_so(self) -> None:
        """
        Without an engine at docker_host the launch fails (500) saying
        which socket it could not reach, before anything else.
        """
        config = build_config({}, {}, {"docker-host": "unix:///nonexistent/docker.sock", "docker-network": "n"})
        launcher = DockerLauncher(LauncherContext(reactor=reactor, runtime_dir="", ports=None,
                                                  section=config.docker, shared=LaunchSettings.from_config(config)))
        self.addCleanup(launcher.stop)
        spec = KernelSpec.from_json("s", "/nonexistent", kernelspec("s", launcher_argv(), "docker",
                                                                     config={"image_name": "local/k:1"}))
        request, _ = request_for("k1", spec)
        with self.assertRaises(LaunchError) as caught:
            await launcher.launch(request)
        self.assertEqual(caught.exception.status, 500)
        self.assertIn("cannot reach the Docker engine at /nonexistent/docker.sock", str(caught.exception))


# -- the fixture itself ----------------------------------------------------------


class FixtureTests(TestCase):
    timeout = 120

    def test_private_engine_leaves_nothing(self) -> None:
        """
        A private engine runs a container of the kernel image with the
        host's /usr; down() leaves no process, mount, bridge or directory.
        """
        daemon = DockerDaemon(tempfile.mkdtemp(prefix="egw-", dir="/tmp"))
        self.addCleanup(daemon.down)
        daemon.up()
        created = daemon.api("POST", "/containers/create", body={
            "Image": daemon.image,
            "Entrypoint": ["/usr/bin/python3", "-c", "import ipykernel, os; print(os.listdir('/opt/kernel-launchers'))"],
            "HostConfig": {"Binds": ["/usr:/usr:ro"], "NetworkMode": daemon.network},
        })
        daemon.api("POST", f"/containers/{created['Id']}/start")
        self.assertEqual(daemon.api("POST", f"/containers/{created['Id']}/wait")["StatusCode"], 0)
        daemon.down()
        self.assertEqual(daemon.leftovers(), [])


# -- a gateway on the engine -----------------------------------------------------


class DockerGatewayTestCase(GatewayTestCase):
    """
    A gateway whose kernelspecs run kernels as containers (and Swarm
    services) on the shared engine; every test must leave no container or
    service of its kernels.
    """

    timeout = 120
    extra_settings: dict[str, Any] = {}

    async def setUp(self) -> None:
        self.docker = shared_docker()
        self.specs = os.path.abspath(self.mktemp())
        self.write_specs()
        self.gateway_settings = self.settings()
        await super().setUp()
        self.addCleanup(self.nothing_left)

    def settings(self, **more: Any) -> dict[str, Any]:
        return {
            "kernelspec_path": self.specs,
            "response_ip": self.docker.gateway_ip,
            "docker_host": self.docker.docker_host,
            "docker_poll_interval": 0.2,
            "list_kernels": "true",
            "shutdown_wait": 3,
            "terminate_wait": 3,
            "poll_interval": 0.5,
            **self.extra_settings,
            **more,
        }

    def config(self, **more: Any) -> dict[str, Any]:
        return {"image_name": self.docker.image, "network": self.docker.network, "mounts": ["/usr:/usr:ro"],
                "user": "65534:65534", **more}

    def write_specs(self) -> None:
        write_spec(self.specs, "docker", launcher_argv(), "docker", config=self.config())
        write_spec(self.specs, "missing", launcher_argv(), "docker", config=self.config(image_name="local/nope:1"))
        write_spec(self.specs, "exits", launcher_argv(), "docker", config=self.config(), env={"KERNEL_LANGUAGE": "cobol"})

    def kernel_containers(self) -> list[dict]:
        return [c for c in self.docker.containers() if KERNEL_LABEL in (c.get("Labels") or {})]

    def kernel_services(self) -> list[dict]:
        return [s for s in self.docker.services() if KERNEL_LABEL in (s.get("Spec", {}).get("Labels") or {})]

    async def nothing_left(self) -> None:
        await eventually(lambda: not self.kernel_containers() and not self.kernel_services(),
                         "kernel containers and services to be removed", timeout=20)

    async def start(self, name: str = "docker", env: dict[str, str] | None = None) -> dict[str, Any]:
        body = {"name": name, **({"env": env} if env else {})}
        code, model = await self.gateway.request("POST", "api/kernels", body)
        self.assertEqual(code, 201, model)
        return model


class ContainerKernelTests(DockerGatewayTestCase):
    async def test_kernel_runs_code_interrupt_shutdown(self) -> None:
        """
        A kernel runs in its own labelled container as the kernelspec's
        user, runs code through the WebSocket, is interrupted, and shutting
        it down removes its container.
        """
        started = time.time() - 1
        model = await self.start()
        placement = model["placement"]
        containers = self.kernel_containers()
        self.assertEqual(len(containers), 1)
        labels = containers[0]["Labels"]
        self.assertEqual(labels[KERNEL_LABEL], model["id"])
        self.assertEqual(containers[0]["Id"], placement["container_id"])
        self.assertEqual(placement["ip"].rsplit(".", 1)[0], self.docker.prefix)
        phases = [p["phase"] for p in model["phases"]]
        self.assertEqual(phases[-4:], ["placed", "connection info received", "connected", "ready"])

        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        result = await client.execute(
            "import os, json, socket; print(json.dumps([os.getuid(), os.environ.get('KERNEL_ID'), "
            "socket.gethostname(), 'EG_LAUNCH_TOKEN' in os.environ, os.environ.get('PATH')]))"
        )
        uid, kernel_id, hostname, token, path = json.loads(result["stdout"])
        self.assertEqual((uid, kernel_id, token), (65534, model["id"], False))
        self.assertEqual(hostname, f"egateway-{model['id']}"[:63])
        self.assertEqual(path, "/usr/local/bin:/usr/bin:/bin")

        async def interrupt() -> None:
            code, _ = await self.gateway.request("POST", f"api/kernels/{model['id']}/interrupt")
            self.assertEqual(code, 204)

        reply = await client.interrupted_sleep(interrupt)
        self.assertEqual(reply["ename"], "KeyboardInterrupt")
        await client.close()

        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
        self.assertEqual(self.kernel_containers(), [])
        # It ended (stopped or shut down by its kernel) before it was removed.
        actions = [action for action, _ in self.docker.events(placement["container_id"], started)]
        self.assertIn("die", actions)
        self.assertEqual(actions[-1], "destroy")
        self.assertLess(actions.index("die"), actions.index("destroy"))

    async def test_missing_image_fails_fast_naming_it(self) -> None:
        """
        A kernelspec naming an image the engine does not have fails at once
        with the image's name, and nothing is created.
        """
        started = reactor.seconds()
        code, body = await self.gateway.request("POST", "api/kernels", {"name": "missing"})
        self.assertEqual(code, 500, body)
        self.assertIn("'local/nope:1' is not on the Docker engine", body["message"])
        self.assertLess(reactor.seconds() - started, 5)
        self.assertEqual(self.kernel_containers(), [])

    async def test_container_exiting_before_the_handshake(self) -> None:
        """
        A container whose entry point exits before the kernel reports fails
        the launch with its exit code and its last log lines; it is removed.
        """
        code, body = await self.gateway.request("POST", "api/kernels", {"name": "exits"})
        self.assertEqual(code, 500, body)
        self.assertIn("exited with code 1", body["message"])
        self.assertIn("unknown KERNEL_LANGUAGE=cobol", body["message"])
        await eventually(lambda: not self.kernel_containers(), "the container to be removed")

    async def test_killed_from_outside_is_dead_with_exit_code(self) -> None:
        """
        A kernel container killed outside the gateway makes the kernel dead
        (not restarted) with the container's exit code.
        """
        model = await self.start()
        self.docker.api("POST", f"/containers/{model['placement']['container_id']}/kill", query={"signal": "KILL"})
        now = await wait_state(self.gateway, model["id"], "dead")
        self.assertIn("exited with code 137", now["reason"])
        self.assertIn("stopped outside the gateway", now["reason"])
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertIn(code, (204, 404))


class SwarmKernelTests(DockerGatewayTestCase):
    def write_specs(self) -> None:
        config = self.config(network="host")
        write_spec(self.specs, "swarm", launcher_argv(), "docker-swarm", config=config)
        write_spec(self.specs, "nowhere", launcher_argv(), "docker-swarm",
                   config={**config, "constraints": ["node.labels.egateway-test==never"]})

    async def test_service_kernel_runs_code_and_is_removed(self) -> None:
        """
        A Swarm kernel runs as a one-replica service without Swarm's own
        restarts, on the swarm's node, runs code; a restart replaces the
        service, and the service is removed on shutdown.
        """
        model = await self.start("swarm")
        services = self.kernel_services()
        self.assertEqual(len(services), 1)
        spec = services[0]["Spec"]
        self.assertEqual(spec["Labels"][KERNEL_LABEL], model["id"])
        self.assertEqual(spec["TaskTemplate"]["RestartPolicy"]["Condition"], "none")
        self.assertEqual(spec["Mode"]["Replicated"]["Replicas"], 1)
        self.assertEqual(model["placement"]["service_id"], services[0]["ID"])
        self.assertEqual(model["placement"]["ip"], self.docker.gateway_ip)
        self.assertIn("Swarm node", [p["detail"] for p in model["phases"] if p["phase"] == "placed"][0])
        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        result = await client.execute("import os; print(os.environ['KERNEL_ID'], os.getuid())")
        self.assertEqual(result["stdout"].split(), [model["id"], "65534"])
        code, restarted = await self.gateway.request("POST", f"api/kernels/{model['id']}/restart")
        self.assertEqual(code, 200, restarted)
        self.assertNotEqual(restarted["placement"]["service_id"], model["placement"]["service_id"])
        await eventually(lambda: [s["ID"] for s in self.kernel_services()] == [restarted["placement"]["service_id"]],
                         "the old service to be removed")
        self.assertEqual((await client.execute("1 + 1"))["result"]["text/plain"], "2")
        await client.close()
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
        self.assertEqual(self.kernel_services(), [])

    async def test_service_removed_outside_is_dead(self) -> None:
        """
        A kernel whose service is removed outside the gateway is dead (not
        restarted), saying so.
        """
        model = await self.start("swarm")
        self.docker.api("DELETE", f"/services/{model['placement']['service_id']}")
        now = await wait_state(self.gateway, model["id"], "dead")
        self.assertIn("outside the gateway", now["reason"])
        self.assertEqual(self.kernel_services(), [])
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertIn(code, (204, 404))

    async def test_reconciler_removes_an_orphan_service(self) -> None:
        """
        A kernel service labelled with this gateway's id that the store does
        not know is removed by the reconciler.
        """
        created = self.docker.api("POST", "/services/create", body={
            "Name": f"egw-orphan-{uuid.uuid4().hex[:8]}",
            "Labels": {KERNEL_LABEL: str(uuid.uuid4()), "org.egateway.gateway_id": "egw-swarm-test"},
            "TaskTemplate": {"ContainerSpec": {"Image": self.docker.image, "Command": ["/usr/bin/sleep", "300"],
                                               "Mounts": [{"Type": "bind", "Source": "/usr", "Target": "/usr",
                                                           "ReadOnly": True}]},
                             "RestartPolicy": {"Condition": "none"}, "Networks": [{"Target": "host"}]},
        })
        settings = {**self.settings(), "persistence": "true", "data_dir": os.path.abspath(self.mktemp()),
                    "gateway_id": "egw-swarm-test", "reconcile": "reap"}
        gateway = InProcessGateway(**settings)
        await gateway.start()
        self.addCleanup(gateway.stop)
        await eventually(lambda: created["ID"] not in [s["ID"] for s in self.docker.services()],
                         "the reconciler to remove the orphan service", timeout=30)

    async def test_pending_task_fails_with_swarms_reason(self) -> None:
        """
        A service whose constraints no node meets fails at once with
        Swarm's reason, and the service is removed.
        """
        started = reactor.seconds()
        code, body = await self.gateway.request("POST", "api/kernels", {"name": "nowhere"})
        self.assertEqual(code, 500, body)
        self.assertIn("can never start", body["message"])
        self.assertIn("no suitable node", body["message"])
        self.assertIn("node.labels.egateway-test==never", body["message"])
        self.assertLess(reactor.seconds() - started, 10)
        self.assertEqual(self.kernel_services(), [])


async def wait_state(gateway: InProcessGateway, kernel_id: str, state: str, timeout: float = 20) -> dict:
    """
    The kernel's model once it is in C{state} (bounded).
    """
    deadline = reactor.seconds() + timeout
    while True:
        code, model = await gateway.request("GET", f"api/kernels/{kernel_id}")
        if code == 200 and model["state"] == state:
            return model
        if reactor.seconds() > deadline:
            raise AssertionError(f"kernel {kernel_id} not {state} after {timeout:g} s: {code} {model}")
        await deferLater(reactor, 0.1, lambda: None)


class LifecycleTests(DockerGatewayTestCase):
    async def test_restart_makes_a_new_container_for_the_same_kernel(self) -> None:
        """
        A restart replaces the container (new container, same kernel id,
        state lost) and removes the old one.
        """
        model = await self.start()
        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        await client.execute("x = 1")
        code, restarted = await self.gateway.request("POST", f"api/kernels/{model['id']}/restart")
        self.assertEqual(code, 200, restarted)
        old, new = model["placement"]["container_id"], restarted["placement"]["container_id"]
        self.assertNotEqual(old, new)
        self.assertEqual([c["Id"] for c in self.kernel_containers()], [new])
        self.assertEqual(self.kernel_containers()[0]["Labels"][KERNEL_LABEL], model["id"])
        self.assertEqual((await client.execute("'x' in dir()"))["result"]["text/plain"], "False")
        await client.close()
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)

    async def test_restarted_gateway_reattaches(self) -> None:
        """
        A gateway that keeps its kernels when it stops, and a new one on the
        same data directory, reattaches to the running container: same
        kernel, same container, state kept.
        """
        data_dir = os.path.abspath(self.mktemp())
        settings = {**self.settings(), "persistence": "true", "data_dir": data_dir}
        first = InProcessGateway(**{**settings, "on_stop": "keep"})
        await first.start()
        code, model = await first.request("POST", "api/kernels", {"name": "docker"})
        self.assertEqual(code, 201, model)
        client = await ChannelsClient.connect(first.url, model["id"])
        await client.execute("x = 42")
        await client.close()
        await first.stop()
        container = model["placement"]["container_id"]
        self.assertEqual([c["State"] for c in self.kernel_containers()], ["running"])

        second = InProcessGateway(**{**settings, "on_stop": "shutdown"})
        await second.start()
        self.addCleanup(second.stop)
        again = await wait_state(second, model["id"], "running")
        self.assertEqual(again["placement"]["container_id"], container)
        client = await ChannelsClient.connect(second.url, model["id"])
        self.assertEqual((await client.execute("x"))["result"]["text/plain"], "42")
        await client.close()
        code, _ = await second.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)

    async def test_reconciler_removes_an_orphan(self) -> None:
        """
        A running container labelled with this gateway's id and a kernel id
        the store does not know is removed by the reconciler; one of another
        gateway is left alone.
        """
        def orphan(gateway_id: str) -> str:
            created = self.docker.api("POST", "/containers/create", body={
                "Image": self.docker.image,
                "Entrypoint": ["/usr/bin/sleep", "300"],
                "Labels": {KERNEL_LABEL: str(uuid.uuid4()), "org.egateway.gateway_id": gateway_id},
                "HostConfig": {"Binds": ["/usr:/usr:ro"], "NetworkMode": self.docker.network},
            })
            self.docker.api("POST", f"/containers/{created['Id']}/start")
            return created["Id"]

        mine, theirs = orphan("egw-docker-test"), orphan("egw-someone-else")
        self.addCleanup(self.docker.api, "DELETE", f"/containers/{theirs}", {"force": 1}, None, None, 30.0, (404,))
        settings = {**self.settings(), "persistence": "true", "data_dir": os.path.abspath(self.mktemp()),
                    "gateway_id": "egw-docker-test", "reconcile": "reap"}
        gateway = InProcessGateway(**settings)
        await gateway.start()
        self.addCleanup(gateway.stop)
        await eventually(lambda: mine not in [c["Id"] for c in self.docker.containers()],
                         "the reconciler to remove the orphan", timeout=30)
        self.assertIn(theirs, [c["Id"] for c in self.docker.containers()])
        self.docker.api("DELETE", f"/containers/{theirs}", query={"force": 1})


class EnterpriseGatewaySpecTests(DockerGatewayTestCase):
    extra_settings = {"docker_mounts": "/usr:/usr:ro"}
    process_proxy = "enterprise_gateway.services.processproxies.docker_swarm.DockerProcessProxy"

    def write_specs(self) -> None:
        # Enterprise Gateway's python_docker kernelspec, unchanged but for
        # the image: its argv runs launch_docker.py, which egateway does
        # not need (it creates the container itself).
        os.makedirs(os.path.join(self.specs, "python_docker"))
        with open(os.path.join(self.specs, "python_docker", "kernel.json"), "w") as f:
            json.dump({
                "display_name": "Python on Docker",
                "language": "python",
                "metadata": {
                    "process_proxy": {
                        "class_name": self.process_proxy,
                        "config": {"image_name": self.docker.image},
                    },
                    "debugger": True,
                },
                "env": {},
                "argv": ["python", "/usr/local/share/jupyter/kernels/python_docker/scripts/launch_docker.py",
                         "--RemoteProcessProxy.kernel-id", "{kernel_id}",
                         "--RemoteProcessProxy.response-address", "{response_address}",
                         "--RemoteProcessProxy.public-key", "{public_key}",
                         "--RemoteProcessProxy.port-range", "{port_range}"],
            }, f)

    def network(self) -> str:
        return shared_docker().network

    async def setUp(self) -> None:
        self.gateway_env = {"EG_DOCKER_NETWORK": self.network()}
        await super().setUp()

    async def test_jeg_docker_kernelspec_runs(self) -> None:
        """
        Enterprise Gateway's Docker kernelspec launches a container kernel
        that runs code, the network coming from EG_DOCKER_NETWORK.
        """
        model = await self.start("python_docker")
        self.assertEqual(self.kernel_containers()[0]["Labels"]["kernel_id"], model["id"])
        self.assertEqual(model["placement"].get("service_id") is not None, "Swarm" in self.process_proxy)
        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        self.assertEqual((await client.execute("6 * 7"))["result"]["text/plain"], "42")
        await client.close()
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)


# -- the launcher contract on the engine ----------------------------------------


class DockerLauncherContract(LauncherContract, TestCase):
    """
    The Docker launcher against the launcher contract, on the shared engine.
    """

    timeout = 120
    launcher_class: Any = DockerLauncher
    network_of_kernels = ""

    async def setUp(self) -> None:
        self.docker = shared_docker()
        self.config = build_config({}, {}, {
            "response-ip": self.docker.gateway_ip,
            "response-port": "0",
            "docker-host": self.docker.docker_host,
            "docker-poll-interval": "0.2",
            "poll-interval": "1",
        })
        self.services: dict[str, Any] = {}
        self.addCleanup(self._stop_services)
        config = {"image_name": self.docker.image, "network": self.network_of_kernels or self.docker.network,
                  "mounts": ["/usr:/usr:ro"], "user": "65534:65534"}
        launcher = "docker-swarm" if self.launcher_class is SwarmLauncher else "docker"
        self.working = KernelSpec.from_json("working", "/nonexistent",
                                            kernelspec("working", launcher_argv(), launcher, config=config))
        self.broken = KernelSpec.from_json("broken", "/nonexistent", kernelspec(
            "broken", launcher_argv(), launcher, config=config, env={"KERNEL_LANGUAGE": "cobol"}))

    async def _stop_services(self) -> None:
        listener = self.services.get("response")
        if listener is not None and listener.running:
            await listener.stopService()
        if "docker" in self.services:
            engine, events = self.services["docker"]
            events.stop()
            await engine.close()

    async def make_launcher(self) -> Any:
        return self.launcher_class(
            LauncherContext(reactor=reactor, runtime_dir="", ports=None, section=self.config.docker,
                            shared=LaunchSettings.from_config(self.config), services=self.services)
        )

    def make_request(self, kernel_id: str, spec_name: str = "working") -> Any:
        request, phases = request_for(kernel_id, self.working, timeout=30)
        return replace(request, env={**request.env, "KERNEL_LANGUAGE": "python"}), phases

    def broken_request(self, kernel_id: str) -> Any:
        request, phases = request_for(kernel_id, self.broken, timeout=30)
        return replace(request, env={**request.env, "KERNEL_LANGUAGE": "cobol"}), phases

    def kernel_objects(self, kernel_id: str) -> list[str]:
        containers = [c["Id"] for c in self.docker.containers(**{KERNEL_LABEL: kernel_id})]
        services = [s["ID"] for s in self.docker.services()
                    if (s["Spec"].get("Labels") or {}).get(KERNEL_LABEL) == kernel_id]
        return containers + services

    async def leftovers(self, process: Any) -> list:
        try:
            await eventually(lambda: not self.kernel_objects(process.kernel_id), "the container to go", timeout=15)
        except AssertionError:
            pass
        return self.kernel_objects(process.kernel_id)

    async def placed_leftovers(self, phases: list) -> list:
        try:
            await eventually(lambda: not self.all_kernel_objects(), "the container to go", timeout=15)
        except AssertionError:
            pass
        return self.all_kernel_objects()

    def all_kernel_objects(self) -> list[str]:
        return [c["Id"] for c in self.docker.containers() if KERNEL_LABEL in (c.get("Labels") or {})] + [
            s["ID"] for s in self.docker.services() if KERNEL_LABEL in (s["Spec"].get("Labels") or {})]

    async def test_interrupt_through_the_engine(self) -> None:
        """
        Without the comm port, the engine's kill with SIGINT (forwarded by
        bootstrap-kernel.sh to the kernel's process group) interrupts a
        running cell; the kernel lives on.
        """
        _, process, _, probe = await self.launched()
        running = Deferred.fromCoroutine(probe.execute("import time; time.sleep(60)", timeout=30))
        await deferLater(reactor, 1.0, lambda: None)
        await process._signal_directly(signal.SIGINT)
        self.assertEqual((await running).get("ename"), "KeyboardInterrupt")
        # ipykernel aborts requests for a moment after an error.
        for _ in range(20):
            if (await probe.execute("1 + 1"))["status"] == "ok":
                break
            await deferLater(reactor, 0.2, lambda: None)
        else:
            self.fail("the kernel kept aborting requests after the interrupt")
        self.assertTrue((await process.poll()).alive)


class EnterpriseGatewaySwarmSpecTests(EnterpriseGatewaySpecTests):
    """
    The same with Enterprise Gateway's DockerSwarmProcessProxy: a service
    on the host network (EG_DOCKER_NETWORK=host).
    """

    process_proxy = "enterprise_gateway.services.processproxies.docker_swarm.DockerSwarmProcessProxy"

    def network(self) -> str:
        return "host"


class SwarmLauncherContract(DockerLauncherContract):
    """
    The Swarm launcher against the launcher contract, on the shared swarm.
    """

    launcher_class = SwarmLauncher
    network_of_kernels = "host"


class OutOfMemoryTests(DockerGatewayTestCase):
    def write_specs(self) -> None:
        write_spec(self.specs, "small", launcher_argv(), "docker", config=self.config(memory="150M"))

    async def test_oom_killed_kernel_is_restarted(self) -> None:
        """
        A kernel killed by the OOM killer at its container's memory limit is
        a crash, not a decision: the gateway restarts it in a new container.
        """
        model = await self.start("small")
        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        client.request_execute("x = bytearray(400 * 1024 * 1024); x[::4096] = b'1' * len(x[::4096])")
        restarted = await eventually(lambda: [c for c in self.kernel_containers()
                                              if c["Id"] != model["placement"]["container_id"]],
                                     "a new container", timeout=30)
        self.assertEqual(restarted[0]["Labels"][KERNEL_LABEL], model["id"])
        await client.close()
        now = await wait_state(self.gateway, model["id"], "running", timeout=30)
        self.assertNotEqual(now["placement"]["container_id"], model["placement"]["container_id"])
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
