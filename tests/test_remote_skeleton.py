"""
The remote-launch skeleton (L{egateway.clusters.remote.RemoteLauncher})
with a launcher whose steps are in memory: the sequence, its phases, the
placement-only version 1 source, and the cleanup on failure and on
cancellation, with time on a Clock.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from typing import Any, Mapping

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from egateway.clusters.interface import LaunchError, LauncherContext, LaunchSettings, Liveness, Phase, Placement
from egateway.clusters.remote import (
    Placed,
    RemoteKernelProcess,
    RemoteLaunch,
    RemoteLauncher,
    signal_name,
    wait_until,
    with_log_tail,
)
from egateway.config import build_config
from egateway.kernels.specs import KernelSpec
from egateway.wire.channels import ConnectionInfo
from tests.support.contract import LauncherContract, request_for
from tests.support.fake_launcher import FakeCluster, FakeLauncher
from tests.support.remote_kernels import launcher_argv
from tests.support.threads import started_pool
from tests.test_slurm import FakeListener

PAYLOAD = {
    "shell_port": 5001, "iopub_port": 5002, "stdin_port": 5003, "control_port": 5004, "hb_port": 5005,
    "key": "k", "signature_scheme": "hmac-sha256", "ip": "0.0.0.0",
}


class MemoryKernel(RemoteKernelProcess):
    def __init__(self, *, cluster: "MemoryLauncher", job: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.cluster = cluster
        self.job = job

    async def _check_alive(self) -> Liveness:
        return Liveness(self.job in self.cluster.jobs, "the job is gone")

    async def _signal_directly(self, signum: int) -> None:
        self.cluster.signals.append((self.job, signum))

    async def _release(self) -> None:
        self.cluster.jobs.pop(self.job, None)


class MemoryLauncher(RemoteLauncher):
    """
    A launcher whose cluster is a dict: only its steps, nothing of the
    sequence.
    """

    name = "memory"

    def __init__(self, clock: Clock, refuse: bool = False) -> None:
        super().__init__(
            LauncherContext(
                reactor=clock, runtime_dir="", ports=None,
                shared=LaunchSettings.from_config(build_config({}, {}, {})),
                services={"response": FakeListener()},
            )
        )
        self.refuse = refuse
        self.jobs: dict[str, str] = {}
        self.signals: list[tuple[str, int]] = []
        self.abandoned: list[str] = []
        self.asked: list[str] = []

    @property
    def listener(self) -> FakeListener:
        return self._context.services["response"]

    async def _prepare(self, request: Any) -> dict[str, str]:
        if self.refuse:
            raise LaunchError("refused before anything started", status=400)
        return {}

    async def _submit(self, launch: RemoteLaunch) -> None:
        job = str(len(self.jobs) + 1)
        self.jobs[job] = "running"
        launch.state["job"] = job
        launch.request.report(Phase.SUBMITTED, f"job {job}")

    async def _await_placement(self, launch: RemoteLaunch) -> Placed:
        return Placed("node1", "10.0.0.5", f"node1, job {launch.state['job']}")

    async def _launch_ended(self, launch: RemoteLaunch) -> str | None:
        return None if launch.state["job"] in self.jobs else "the job ended before reporting"

    def _kernel(self, launch: RemoteLaunch, placed: Placed, info: ConnectionInfo, payload: Mapping[str, Any]) -> Any:
        return MemoryKernel(
            cluster=self, job=launch.state["job"], placement=Placement(host=placed.host, ip=placed.address),
            **self._kernel_arguments(launch, info, payload),
        )

    async def _abandon(self, launch: RemoteLaunch) -> None:
        job = launch.state.get("job")
        if job is not None:
            self.abandoned.append(job)
            self.jobs.pop(job, None)

    async def _restore(self, kernel_id: str, snapshot: Mapping[str, Any]) -> Any:
        arguments = self._restored_arguments(kernel_id, snapshot)
        job = str(snapshot.get("job"))
        if job not in self.jobs:
            raise LaunchError(f"kernel {kernel_id} is no longer running")
        placement = Placement(host=str(snapshot["host"]), ip=arguments["info"].ip)
        return MemoryKernel(cluster=self, job=job, placement=placement, **arguments)

    async def _find(self, gateway_id: str, hints: Any) -> list[Any]:
        self.asked.append(gateway_id)

        async def reap(job: str) -> None:
            self.jobs.pop(job, None)

        return [self._found(f"kernel-{job}", f"job {job}", lambda job=job: reap(job)) for job in sorted(self.jobs)]


def request() -> tuple[Any, list]:
    spec = KernelSpec.from_json("s", "/nonexistent", {"argv": ["python", "-c", "pass"], "language": "python"})
    return request_for(str(uuid.uuid4()), spec)


class SkeletonTests(SynchronousTestCase):
    def test_sequence_and_phases(self) -> None:
        """
        Submitted, placed, connection info, in that order; version 1 is
        taken from the placement's address only; the kernel is reached at
        the placement's address, not the payload's.
        """
        clock = Clock()
        launcher = MemoryLauncher(clock)
        req, phases = request()
        d = launcher.launch(req)
        [pending] = launcher.listener.pending
        self.assertEqual(pending.hosts, ["10.0.0.5"])
        pending.received.callback(dict(PAYLOAD))
        process = self.successResultOf(d)
        self.assertEqual([p for p, _ in phases], [Phase.SUBMITTED, Phase.PLACED, Phase.CONNECTION_INFO])
        self.assertEqual(phases[1][1], "node1, job 1")
        self.assertEqual(process.connection_info.ip, "10.0.0.5")
        self.assertFalse(pending.cancelled)
        self.successResultOf(process.cleanup())
        self.assertEqual(launcher.jobs, {})

    def test_launch_dies_before_reporting(self) -> None:
        """
        The step's account of an early death fails the launch; the
        handshake is cancelled and the launcher's own cleanup runs.
        """
        clock = Clock()
        launcher = MemoryLauncher(clock)
        req, _ = request()
        d = launcher.launch(req)
        launcher.jobs.clear()
        clock.advance(1.0)
        failure = self.failureResultOf(d, LaunchError)
        self.assertIn("the job ended before reporting", str(failure.value))
        self.assertTrue(launcher.listener.pending[0].cancelled)
        self.assertEqual(launcher.abandoned, ["1"])

    def test_cancelled_launch_is_abandoned(self) -> None:
        """
        Cancelling a launch waiting for connection info (the manager's
        timeout) cancels the handshake and removes what was submitted.
        """
        clock = Clock()
        launcher = MemoryLauncher(clock)
        req, _ = request()
        d = launcher.launch(req)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(launcher.listener.pending[0].cancelled)
        self.assertEqual(launcher.abandoned, ["1"])
        self.assertEqual(launcher.jobs, {})

    def test_refused_before_anything_starts(self) -> None:
        """
        A request the launcher's checks refuse never reaches the response
        listener nor the cluster.
        """
        launcher = MemoryLauncher(Clock(), refuse=True)
        req, phases = request()
        failure = self.failureResultOf(launcher.launch(req), LaunchError)
        self.assertEqual(failure.value.status, 400)
        self.assertEqual(launcher.listener.pending, [])
        self.assertEqual(phases, [])
        self.assertEqual(launcher.jobs, {})


class SharedPartsTests(SynchronousTestCase):
    """
    What the skeleton does for every launcher besides the launch: restore
    and the inventory around the launcher's steps, and the helpers SSH and
    Slurm share.
    """

    def test_restore_reads_the_common_fields(self) -> None:
        """
        A snapshot's connection info, address, comm port and token come
        back through the skeleton; a snapshot without connection info is
        refused in the launcher's name.
        """
        clock = Clock()
        launcher = MemoryLauncher(clock)
        req, _ = request()
        d = launcher.launch(req)
        launcher.listener.pending[0].received.callback(dict(PAYLOAD, comm_port=7001))
        process = self.successResultOf(d)
        self.addCleanup(process.detach)
        snapshot = {**process.snapshot(), "job": process.job}
        restored = self.successResultOf(launcher.restore(req.kernel_id, snapshot))
        self.addCleanup(restored.detach)
        self.assertEqual(restored.connection_info, process.connection_info)
        self.assertEqual((restored.comm_port, restored.comm_token), (7001, process.comm_token))
        self.assertEqual(restored.kernel_id, req.kernel_id)
        bad = {key: value for key, value in snapshot.items() if key != "connection_info"}
        failure = self.failureResultOf(launcher.restore(req.kernel_id, bad), LaunchError)
        self.assertEqual(str(failure.value), "bad memory snapshot: missing 'connection_info'")

    def test_inventory_checks_the_id_then_finds(self) -> None:
        """
        A gateway id outside the plain alphabet is refused before the
        launcher's C{_find} runs (it would reach a remote command); what
        C{_find} returns carries the launcher's name and reaps through it.
        """
        launcher = MemoryLauncher(Clock())
        launcher.jobs = {"1": "running", "2": "running"}
        self.failureResultOf(launcher.inventory("gw 1; rm -rf /"), LaunchError)
        self.assertEqual(launcher.asked, [])
        found = self.successResultOf(launcher.inventory("gw-1"))
        self.assertEqual(launcher.asked, ["gw-1"])
        self.assertEqual([(f.kernel_id, f.launcher, f.description) for f in found],
                         [("kernel-1", "memory", "job 1"), ("kernel-2", "memory", "job 2")])
        self.successResultOf(found[0].reap())
        self.assertEqual(launcher.jobs, {"2": "running"})

    def test_wait_until(self) -> None:
        """
        C{done} is asked at once and every interval until it says yes, or
        until the timeout has passed.
        """
        clock = Clock()
        answers = [False, False, True]
        asked: list[float] = []

        async def done() -> bool:
            asked.append(clock.seconds())
            return answers.pop(0)

        d = Deferred.fromCoroutine(wait_until(clock, done, 5.0, 0.5))
        clock.advance(0.5)
        self.assertNoResult(d)
        clock.advance(0.5)
        self.assertTrue(self.successResultOf(d))
        self.assertEqual(asked, [0.0, 0.5, 1.0])

        async def never() -> bool:
            return False

        d = Deferred.fromCoroutine(wait_until(clock, never, 1.0, 0.25))
        clock.pump([0.25] * 4)
        self.assertFalse(self.successResultOf(d))

    def test_log_tail_and_signal_names(self) -> None:
        """
        A dead launch's story quotes the last lines of its log on one line,
        or nothing when the log is empty; signals are named as kill -s and
        scancel --signal take them.
        """
        log = "one\n  two\nthree\nfour\nfive\nsix\n"
        self.assertEqual(with_log_tail("it died", "log h:/x.log", log),
                         "it died; its log h:/x.log ends: two | three | four | five | six")
        self.assertEqual(with_log_tail("it died", "log h:/x.log", " \n"), "it died")
        self.assertEqual([signal_name(n) for n in (0, signal.SIGINT, signal.SIGKILL, 99)], ["0", "INT", "KILL", "99"])


class FakeLauncherContract(LauncherContract, TestCase):
    """
    The launcher contract against L{FakeLauncher}: the skeleton with
    in-memory steps and real ipykernel kernels on this machine.
    """

    timeout = 120

    async def setUp(self) -> None:
        self.config = build_config({}, {}, {"response-ip": "127.0.0.1", "response-port": "0", "poll-interval": "1"})
        self.services: dict[str, Any] = {}
        self.cluster = FakeCluster()
        self.addCleanup(self._stop)
        self.working = KernelSpec.from_json("working", "/nonexistent", {"argv": launcher_argv(), "language": "python"})
        self.broken = KernelSpec.from_json(
            "broken", "/nonexistent", {"argv": [sys.executable, "/nonexistent/x.py"], "language": "python"}
        )

    async def _stop(self) -> None:
        for pid in self.cluster.leftovers():
            os.kill(pid, signal.SIGKILL)
        listener = self.services.get("response")
        if listener is not None and listener.running:
            await listener.stopService()

    async def make_launcher(self) -> Any:
        return FakeLauncher(
            LauncherContext(reactor=reactor, runtime_dir="", ports=None, shared=LaunchSettings.from_config(self.config),
                            services=self.services, threadpool=started_pool(self)),
            self.cluster,
        )

    def make_request(self, kernel_id: str, spec_name: str = "working") -> Any:
        return request_for(kernel_id, self.working, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})

    def broken_request(self, kernel_id: str) -> Any:
        return request_for(kernel_id, self.broken)

    async def leftovers(self, process: Any) -> list:
        return [pid for pid in self.cluster.leftovers() if pid == process.placement.pid]

    async def placed_leftovers(self, phases: list) -> list:
        return self.cluster.leftovers()
