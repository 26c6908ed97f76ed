"""
The local launcher against the launcher contract, with real ipykernel
processes; and its own details (sessions, port reservations, logs).
"""

from __future__ import annotations

import os
import random
import sys

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from egateway.clusters.interface import IKernelProcess, LauncherContext, LaunchSettings, Placement
from egateway.clusters.local import LocalLauncher
from egateway.clusters.ports import PortAllocator, PortExhausted, PortRange
from egateway.clusters.registry import LauncherRegistry
from egateway.config import build_config
from egateway.kernels.specs import KernelSpec
from tests.support.contract import KernelProbe, LauncherContract, request_for
from tests.support.gateway import GatewayTestCase, pid_alive
from tests.support.remote_kernels import write_spec
from tests.support.wsclient import ChannelsClient
from tests.support.threads import started_pool


def spec(name: str, argv: list[str]) -> KernelSpec:
    return KernelSpec.from_json(name, "/nonexistent", {"argv": argv, "language": "python"})


WORKING = spec("working", ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"])
BROKEN = spec("broken", [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"])


class LocalLauncherContract(LauncherContract, TestCase):
    launch_is_pending = False

    async def make_launcher(self) -> LocalLauncher:
        runtime = os.path.abspath(self.mktemp())
        os.makedirs(runtime, mode=0o700)
        return LocalLauncher(
            LauncherContext(reactor=reactor, runtime_dir=runtime, ports=PortAllocator(), threadpool=started_pool(self))
        )

    def make_request(self, kernel_id: str, spec_name: str = "working"):
        return request_for(kernel_id, WORKING)

    def broken_request(self, kernel_id: str):
        return request_for(kernel_id, BROKEN)

    async def leftovers(self, process: IKernelProcess) -> list:
        return [process.placement.pid] if pid_alive(process.placement.pid) else []


class LocalLauncherDetails(TestCase):
    timeout = 60

    async def test_own_session_and_stderr(self) -> None:
        """
        The kernel runs in a session of its own (so the gateway's terminal
        signals do not reach it), and an early exit is explained by its
        stderr.
        """
        runtime = os.path.abspath(self.mktemp())
        os.makedirs(runtime)
        launcher = LocalLauncher(
            LauncherContext(reactor=reactor, runtime_dir=runtime, ports=PortAllocator(), threadpool=started_pool(self))
        )
        request, _ = request_for("11111111-2222-4333-8444-555555555555", BROKEN)
        process = await launcher.launch(request)
        status = await process.when_exited()
        self.assertEqual(status.code, 3)
        self.assertIn("boom", status.describe())
        await process.cleanup()
        self.assertFalse(os.path.exists(process.connection_file))
        request, _ = request_for("21111111-2222-4333-8444-555555555555", WORKING)
        process = await launcher.launch(request)
        probe = KernelProbe(process)
        self.addCleanup(probe.close)
        await probe.ready()
        self.assertEqual(os.getsid(process.placement.pid), process.placement.pid)
        self.assertNotEqual(os.getpgid(process.placement.pid), os.getpgid(0))
        await process.terminate(5)
        await process.cleanup()


class PortTests(SynchronousTestCase):
    def test_reserved_ports_never_repeat(self) -> None:
        """
        Ports handed out are not handed out again until released, even when
        the probe would accept them.
        """
        allocator = PortAllocator(PortRange(40000, 40099), probe=lambda host, port: port)
        first = set(allocator.reserve(50))
        second = set(allocator.reserve(50))
        self.assertEqual(first & second, set())
        self.assertRaises(PortExhausted, allocator.reserve, 1)
        allocator.release(first)
        self.assertEqual(len(allocator.reserve(50)), 50)

    def test_taken_ports_skipped(self) -> None:
        """
        Ports the probe finds taken are never handed out.
        """
        allocator = PortAllocator(PortRange(40000, 40199), probe=lambda host, port: None if port % 2 else port)
        self.assertTrue(all(p % 2 == 0 for p in allocator.reserve(20)))

    def test_candidates_drawn_as_needed(self) -> None:
        """
        A reservation draws random numbers for the candidates it probes,
        not for L{PortAllocator.ATTEMPTS} of them: 5 ports take a handful
        of draws from the (system) generator, where C{random.sample} of 500
        took 500, on the reactor, for every kernel launched.
        """
        draws = []

        class Counting(random.Random):
            def getrandbits(self, k: int) -> int:
                draws.append(k)
                return super().getrandbits(k)

        allocator = PortAllocator(PortRange(40000, 59999), probe=lambda host, port: port, rng=Counting(7))
        ports = allocator.reserve(5)
        self.assertEqual(len(set(ports)), 5)
        self.assertTrue(all(40000 <= port <= 59999 for port in ports))
        self.assertLessEqual(len(draws), 15)

    def test_candidates_distinct_cover_small_range(self) -> None:
        """
        The candidates are distinct ports of the range; a range smaller
        than L{PortAllocator.ATTEMPTS} is offered whole, in random order.
        """
        allocator = PortAllocator(PortRange(40000, 40099), probe=lambda host, port: port, rng=random.Random(3))
        offered = list(allocator._candidates())
        self.assertEqual(sorted(offered), list(range(40000, 40100)))
        self.assertNotEqual(offered, sorted(offered))
        wide = PortAllocator(PortRange(30000, 39999), probe=lambda host, port: port, rng=random.Random(4))
        offered = list(wide._candidates())
        self.assertEqual(len(offered), PortAllocator.ATTEMPTS)
        self.assertEqual(len(set(offered)), PortAllocator.ATTEMPTS)
        self.assertTrue(all(30000 <= port <= 39999 for port in offered))

    def test_range_parsing(self) -> None:
        """
        Ranges must be lo..hi within 1024-65535 and large enough; 0..0 picks
        ports just below the ephemeral range.
        """
        self.assertEqual(PortRange.parse("30000..31000"), PortRange(30000, 31000))
        for bad in ("10..20", "a..b", "30000", "40000..30000", "30000..30010", "100..70000"):
            self.assertRaises(ValueError, PortRange.parse, bad)
        self.assertTrue(PortRange.parse("0..0").unrestricted)
        default = PortAllocator().port_range
        self.assertLess(default.high, 32768 + 1)
        self.assertGreater(default.low, 1023)


class PlacementTests(SynchronousTestCase):
    def test_placement_model(self) -> None:
        """
        A placement shows what is known and its launcher-specific ids.
        """
        self.assertEqual(
            Placement(host="n1", ip="10.0.0.1", pid=5, extra={"job_id": "12"}).to_dict(),
            {"host": "n1", "ip": "10.0.0.1", "pid": 5, "job_id": "12"},
        )


HANGS_ONCE = """
import os, sys, time
marker, connection_file = sys.argv[1], sys.argv[2]
if not os.path.exists(marker):
    open(marker, "w").close()
    print(os.getpid(), file=open(marker, "w"), flush=True)
    # What ipykernel prints when a port was taken, before it hangs instead
    # of exiting (its threads keep the process alive).
    print("zmq.error.ZMQError: Address already in use (addr='tcp://127.0.0.1:1')", flush=True)
    time.sleep(600)
os.execv(sys.executable, [sys.executable, "-m", "ipykernel_launcher", "-f", connection_file])
"""


class RegistryTests(SynchronousTestCase):
    def test_each_launcher_gets_only_its_section(self) -> None:
        """
        The registry hands each launcher its own configuration section
        (SSH its C{[ssh]}, Slurm its C{[slurm]}, a launcher without one
        C{None}) and the shared launch settings, never the whole
        configuration; the context they share keeps its services.
        """
        config = build_config({}, {}, {"remote-hosts": "h1,h2", "slurm-partition": "batch", "terminate-wait": "2"})
        context = LauncherContext(
            reactor=reactor,
            runtime_dir="/nonexistent",
            ports=None,
            shared=LaunchSettings.from_config(config, "gw-1"),
        )
        seen = {}

        def probe(given: LauncherContext) -> LocalLauncher:
            seen["probe"] = given
            return LocalLauncher(given)

        registry = LauncherRegistry(
            context, extra={"probe": probe}, sections={"ssh": config.ssh, "slurm": config.slurm}
        )
        ssh = registry.get("ssh")
        self.addCleanup(ssh.stop)
        self.assertIs(ssh._settings, config.ssh)
        self.assertIs(registry.get("slurm")._settings, config.slurm)
        registry.get("probe")
        self.assertIsNone(seen["probe"].section)
        self.assertIs(seen["probe"].services, context.services)
        self.assertEqual(seen["probe"].shared.gateway_id, "gw-1")
        self.assertEqual(seen["probe"].shared.kernels.terminate_wait, 2.0)
        self.assertFalse(hasattr(seen["probe"], "settings"))


class PortTakenTests(GatewayTestCase):
    """
    A kernel that could not bind a port and hangs is stopped at once and
    launched again on other ports, well within the launch timeout.
    """

    async def setUp(self) -> None:
        specs = os.path.abspath(self.mktemp())
        self.marker = os.path.join(specs, "first-attempt")
        os.makedirs(specs)
        script = os.path.join(specs, "hangs_once.py")
        with open(script, "w") as f:
            f.write(HANGS_ONCE)
        write_spec(specs, "hangs-once", [sys.executable, script, self.marker, "{connection_file}"])
        self.gateway_settings = {"kernelspec_path": specs, "launch_timeout": 20}
        await super().setUp()

    async def test_relaunched_on_other_ports(self) -> None:
        code, model = await self.gateway.request("POST", "api/kernels", {"name": "hangs-once"})
        self.assertEqual(code, 201, model)
        with open(self.marker) as f:
            first = int(f.read())
        self.assertFalse(pid_alive(first), "the hung first attempt was not stopped")
        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        result = await client.execute("1 + 1")
        self.assertEqual(result["result"]["text/plain"], "2")
        await client.close()
