"""
The reconciler: kernels running for this gateway installation that its
store does not know are reaped, adopted or reported, by setting; nothing of
another gateway id, and nothing the store or the manager knows, is touched.

First the decisions and the pass with fakes on a Clock, the launchers'
parsers and the local /proc scan against real processes; then real
gateways with real kernels: local ones, kernels on real sshd hosts, and
jobs on a real Slurm cluster.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import uuid
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from egateway.clusters.interface import Found, ILauncherInventory, LaunchError, check_gateway_id
from egateway.clusters.local import find_local_kernels_blocking
from egateway.clusters.slurm_jobs import job_comment, parse_inventory as parse_slurm_inventory, sbatch_arguments
from egateway.clusters.ssh_host import parse_inventory as parse_ssh_inventory
from egateway.config import ConfigError, build_config
from egateway.kernels.reconcile import Action, Reconciler, decide
from egateway.kernels.state import KernelState
from egateway.store.interface import KernelRecord, RecordUnreadable, StoreUnavailable
from egateway.tap import default_gateway_id
from egateway.validation import load_config
from tests.support.daemon import pid_alive
from tests.support.gateway import InProcessGateway
from tests.support.polling import eventually
from tests.support.remote_kernels import launcher_argv, write_spec
from tests.support.wsclient import ChannelsClient
from tests.test_slurm import SlurmMixin



def new_id() -> str:
    return str(uuid.uuid4())


# -- fakes -------------------------------------------------------------------


class Reaps:
    """
    Records which kernels were reaped; a kernel id in C{failing} fails.
    """

    def __init__(self) -> None:
        self.done: list[str] = []
        self.failing: set[str] = set()

    def of(self, kernel_id: str) -> Callable[[], Deferred[None]]:
        def reap() -> Deferred[None]:
            if kernel_id in self.failing:
                return fail(LaunchError("kill: permission denied"))
            self.done.append(kernel_id)
            return succeed(None)

        return reap


def found(reaps: Reaps, kernel_id: str, launcher: str = "fake", adoptable: bool = False) -> Found:
    return Found(
        kernel_id=kernel_id,
        launcher=launcher,
        description=f"fake process of {kernel_id[:8]}",
        reap=reaps.of(kernel_id),
        snapshot={"pid": 4242} if adoptable else None,
        spec_name="python3",
        env={"KERNEL_USERNAME": "alice", "KERNEL_ID": kernel_id},
    )


@implementer(ILauncherInventory)
class FakeLauncher:
    """
    Runs the kernels in C{running}, by gateway id.
    """

    def __init__(self, name: str, running: dict[str, list[Found]]) -> None:
        self.name = name
        self.running = running
        self.asked: list[str] = []
        self.broken = False

    def inventory(self, gateway_id: str, hints: Any = ()) -> Deferred[list[Found]]:
        self.asked.append(gateway_id)
        if self.broken:
            return fail(LaunchError("squeue: command not found"))
        return succeed(list(self.running.get(gateway_id, [])))


class PlainLauncher:
    name = "plain"


class FakeRegistry:
    def __init__(self, launchers: list[Any]) -> None:
        self._launchers = {launcher.name: launcher for launcher in launchers}

    def built(self) -> list[Any]:
        return list(self._launchers.values())

    def get(self, name: str) -> Any:
        if name not in self._launchers:
            raise LaunchError(f"no launcher named {name!r}")
        return self._launchers[name]


class FakeSpecs:
    def all(self) -> Deferred[dict[str, Any]]:
        return succeed({})


class FakeKernel:
    def __init__(self, kernel_id: str, state: KernelState = KernelState.RUNNING) -> None:
        self.id = kernel_id
        self.state = state
        self.reason = "the kernel process is gone" if state == KernelState.DEAD else ""


class FakeManager:
    def __init__(self, launchers: list[Any]) -> None:
        self.kernels: dict[str, Any] = {}
        self.specs = FakeSpecs()
        self.launchers = FakeRegistry(launchers)
        self.shut_down: list[str] = []

    def shutdown(self, kernel_id: str, reason: str = "") -> Deferred[None]:
        self.shut_down.append(kernel_id)
        self.kernels.pop(kernel_id, None)
        return succeed(None)


class FakeStore:
    shared = False

    def __init__(self) -> None:
        self.records: dict[str, KernelRecord] = {}
        self.unreadable: set[str] = set()
        self.down = False
        self.down_after_list = False

    def load_kernels(self) -> Deferred[list[KernelRecord]]:
        if self.down:
            return fail(StoreUnavailable("redis: connection refused"))
        if self.down_after_list:
            self.down = True
        return succeed(list(self.records.values()))

    def load_kernel(self, kernel_id: str) -> Deferred[KernelRecord | None]:
        if self.down:
            return fail(StoreUnavailable("redis: connection refused"))
        if kernel_id in self.unreadable:
            return fail(RecordUnreadable("kernel", kernel_id, "wrong key"))
        return succeed(self.records.get(kernel_id))


class FakePersistence:
    def __init__(self, manager: FakeManager) -> None:
        self.store = FakeStore()
        self.restored: list[Any] = []
        self.gateway_id = "gw-mine"
        self.adopted: list[KernelRecord] = []
        self.restore_as = KernelState.RUNNING
        self._manager = manager

    async def restore(self, record: KernelRecord) -> Any:
        self.adopted.append(record)
        kernel = FakeKernel(record.kernel_id, self.restore_as)
        self._manager.kernels[record.kernel_id] = kernel
        return kernel

    def run_restored_hooks(self) -> None:
        for hook in self.restored:
            Deferred.fromCoroutine(hook())


def record(kernel_id: str) -> KernelRecord:
    return KernelRecord(kernel_id, "python3", "bob", "fake", {}, {}, "running", "idle", 0.0, 0.0)


class Setup:
    """
    A reconciler over fakes: launcher C{fake} runs kernels for C{gw-mine}
    and C{gw-other}.
    """

    def __init__(self, mode: str = "reap", interval: float = 60.0) -> None:
        self.clock = Clock()
        self.reaps = Reaps()
        self.launcher = FakeLauncher("fake", {})
        self.manager = FakeManager([self.launcher, PlainLauncher()])
        self.persistence = FakePersistence(self.manager)
        self.store = self.persistence.store
        self.reconciler = Reconciler(
            manager=self.manager,
            persistence=self.persistence,
            gateway_id="gw-mine",
            mode=mode,
            interval=interval,
            clock=self.clock,
        )

    def run(self, *kernels: Found, other: tuple[Found, ...] = ()) -> None:
        self.launcher.running = {"gw-mine": list(kernels), "gw-other": list(other)}


# -- decisions and passes ------------------------------------------------------


class DecideTests(SynchronousTestCase):
    def test_known_kernels_are_left_alone(self) -> None:
        """
        Only kernels nobody knows get a decision; one found twice (two
        launchers looking at one machine) gets one.
        """
        reaps = Reaps()
        a, b, c = new_id(), new_id(), new_id()
        decisions = decide([found(reaps, a), found(reaps, b), found(reaps, a, "other")], {b, c}, "reap")
        self.assertEqual([(d.found.kernel_id, d.found.launcher, d.action) for d in decisions], [(a, "fake", Action.REAP)])

    def test_modes(self) -> None:
        """
        adopt adopts what its launcher can reattach to and reaps the rest;
        report only reports; an unknown mode is refused.
        """
        reaps = Reaps()
        local, remote = found(reaps, new_id(), "local", adoptable=True), found(reaps, new_id(), "ssh")
        self.assertEqual([d.action for d in decide([local, remote], set(), "adopt")], [Action.ADOPT, Action.REAP])
        self.assertEqual([d.action for d in decide([local, remote], set(), "reap")], [Action.REAP, Action.REAP])
        self.assertEqual([d.action for d in decide([local, remote], set(), "report")], [Action.REPORT] * 2)
        self.assertRaises(ValueError, decide, [local], set(), "kill")


class ReconcilerTests(SynchronousTestCase):
    def test_reaps_only_orphans_of_this_gateway(self) -> None:
        """
        An orphan is reaped; kernels the store records, the manager holds
        (launching and restoring ones included), and another gateway id's
        kernels are not.
        """
        s = Setup()
        orphan, stored, held, launching, foreign = (new_id() for _ in range(5))
        s.store.records[stored] = record(stored)
        s.manager.kernels[held] = FakeKernel(held)
        s.manager.kernels[launching] = FakeKernel(launching, KernelState.LAUNCHING)
        s.run(*(found(s.reaps, k) for k in (orphan, stored, held, launching)), other=(found(s.reaps, foreign),))
        outcomes = self.successResultOf(s.reconciler.reconcile())
        self.assertEqual(s.reaps.done, [orphan])
        self.assertEqual([(o.kernel_id, o.done) for o in outcomes], [(orphan, "reaped")])
        self.assertEqual(s.launcher.asked, ["gw-mine"])
        self.assertEqual(s.reconciler.passes, 1)

    def test_unreadable_record_counts_as_known(self) -> None:
        """
        A kernel whose record the store has but cannot read (another key)
        is not reaped.
        """
        s = Setup()
        kernel = new_id()
        s.store.unreadable.add(kernel)
        s.run(found(s.reaps, kernel))
        outcomes = self.successResultOf(s.reconciler.reconcile())
        self.assertEqual(s.reaps.done, [])
        self.assertEqual([o.done for o in outcomes], ["skipped"])

    def test_store_down_means_nothing_is_touched(self) -> None:
        """
        When the store cannot be read, or stops answering half-way, no
        kernel is reaped.
        """
        s = Setup()
        s.run(found(s.reaps, new_id()), found(s.reaps, new_id()))
        s.store.down = True
        self.assertEqual(self.successResultOf(s.reconciler.reconcile()), [])
        s.store.down, s.store.down_after_list = False, True
        self.assertEqual(self.successResultOf(s.reconciler.reconcile()), [])
        self.assertEqual(s.reaps.done, [])

    def test_adopt(self) -> None:
        """
        In adopt mode an adoptable orphan is restored from a record made of
        what its launcher found (kernelspec, user as owner, snapshot); one
        that cannot be reattached is reaped; one that ended meanwhile is
        removed again.
        """
        s = Setup(mode="adopt")
        local, remote = new_id(), new_id()
        s.run(found(s.reaps, local, "local", adoptable=True), found(s.reaps, remote, "ssh"))
        s.clock.advance(1000)
        outcomes = self.successResultOf(s.reconciler.reconcile())
        self.assertEqual([(o.kernel_id, o.done) for o in outcomes], [(local, "adopted"), (remote, "reaped")])
        (adopted,) = s.persistence.adopted
        self.assertEqual(
            (adopted.kernel_id, adopted.spec_name, adopted.username, adopted.owner, adopted.launcher),
            (local, "python3", "alice", "alice", "local"),
        )
        self.assertEqual((adopted.snapshot, adopted.state, adopted.created, adopted.gateway_id),
                         ({"pid": 4242}, "running", 1000.0, "gw-mine"))
        self.assertEqual(s.reaps.done, [remote])

        gone = new_id()
        s.persistence.restore_as = KernelState.DEAD
        s.run(found(s.reaps, gone, "local", adoptable=True))
        outcomes = self.successResultOf(s.reconciler.reconcile())
        self.assertEqual([(o.kernel_id, o.done) for o in outcomes], [(gone, "gone")])
        self.assertEqual(s.manager.shut_down, [gone])

    def test_report(self) -> None:
        """
        In report mode orphans are logged and left running.
        """
        s = Setup(mode="report")
        kernel = new_id()
        s.run(found(s.reaps, kernel))
        outcomes = self.successResultOf(s.reconciler.reconcile())
        self.assertEqual([(o.kernel_id, o.done) for o in outcomes], [(kernel, "reported")])
        self.assertEqual(s.reaps.done, [])

    def test_failures_are_retried_next_pass(self) -> None:
        """
        A reap that fails is reported and tried again at the next pass; a
        launcher that cannot list its kernels does not stop the others.
        """
        s = Setup()
        stuck = new_id()
        s.reaps.failing.add(stuck)
        s.run(found(s.reaps, stuck))
        broken = FakeLauncher("broken", {})
        broken.broken = True
        s.manager.launchers._launchers["broken"] = broken
        self.assertEqual([o.done for o in self.successResultOf(s.reconciler.reconcile())], ["failed"])
        self.assertEqual(broken.asked, ["gw-mine"])
        s.reaps.failing.clear()
        self.assertEqual([o.done for o in self.successResultOf(s.reconciler.reconcile())], ["reaped"])
        self.flushLoggedErrors()

    def test_schedule(self) -> None:
        """
        The first pass runs once the store's kernels are restored (not
        before, and not if the service stopped), then one per interval on
        the clock; stopping ends the passes.
        """
        s = Setup(interval=60.0)
        s.persistence.run_restored_hooks()
        self.assertEqual(s.reconciler.passes, 0, "a pass ran before the service started")
        s.reconciler.startService()
        s.run(found(s.reaps, new_id()))
        s.persistence.run_restored_hooks()
        self.assertEqual(s.reconciler.passes, 1)
        self.assertEqual(len(s.reaps.done), 1)
        s.clock.advance(59)
        self.assertEqual(s.reconciler.passes, 1)
        s.clock.advance(1)
        self.assertEqual(s.reconciler.passes, 2)
        self.successResultOf(s.reconciler.stopService())
        s.clock.advance(600)
        self.assertEqual(s.reconciler.passes, 2)

    def test_only_at_start(self) -> None:
        """
        With an interval of 0 only the pass at start runs.
        """
        s = Setup(interval=0)
        s.reconciler.startService()
        s.persistence.run_restored_hooks()
        s.clock.advance(10_000)
        self.assertEqual(s.reconciler.passes, 1)
        self.assertEqual(s.clock.getDelayedCalls(), [])

    def test_bad_settings(self) -> None:
        """
        A malformed gateway id or an unknown mode is refused at construction.
        """
        manager = FakeManager([])
        for gateway_id, mode in (("gw mine", "reap"), ("", "reap"), ("a;b", "reap"), ("gw", "kill")):
            self.assertRaises(
                ValueError,
                Reconciler,
                manager=manager,
                persistence=FakePersistence(manager),
                gateway_id=gateway_id,
                mode=mode,
                interval=1,
                clock=Clock(),
            )


# -- settings and tags -----------------------------------------------------------


class SettingsTests(SynchronousTestCase):
    def test_gateway_id_setting(self) -> None:
        """
        gateway_id accepts letters, digits, . _ - and refuses anything a
        shell or Slurm could read differently; reconcile takes its three
        modes.
        """
        self.assertEqual(load_config({}, {"EG_GATEWAY_ID": "gw-1.prod_a"}, {}).store.gateway_id, "gw-1.prod_a")
        for bad in ("gw 1", "gw;1", "gw$1", "x" * 65, "gw\n1", "g/w"):
            self.assertRaises(ConfigError, load_config, {}, {"EG_GATEWAY_ID": bad}, {})
        self.assertEqual(load_config({}, {}, {"reconcile": "adopt"}).store.reconcile, "adopt")
        self.assertRaises(ConfigError, load_config, {}, {"EG_RECONCILE": "kill"}, {})
        self.assertRaises(ValueError, check_gateway_id, "")

    def test_default_gateway_id(self) -> None:
        """
        The default id is stable for one host and data directory, differs
        for another data directory, and is always a valid id.
        """
        first = default_gateway_id("/var/lib/egateway", "node1.example.org")
        self.assertEqual(first, default_gateway_id("/var/lib/egateway", "node1.example.org"))
        self.assertNotEqual(first, default_gateway_id("/srv/egateway", "node1.example.org"))
        self.assertTrue(first.startswith("node1.example.org-"))
        for host in ("weird host_name!", "-", "x" * 200):
            check_gateway_id(default_gateway_id("/d", host))

    def test_slurm_jobs_carry_the_id(self) -> None:
        """
        sbatch gets the gateway id as the job's comment.
        """
        from egateway.clusters.slurm_jobs import JobResources

        args = sbatch_arguments(JobResources(), "egateway-k", "/tmp/k.log", "", ["python"], comment=job_comment("gw-1"))
        self.assertIn("--comment=egateway:gw-1", args)
        self.assertLess(args.index("--comment=egateway:gw-1"), args.index("/dev/stdin"))


class ParserTests(SynchronousTestCase):
    def test_ssh_inventory_output(self) -> None:
        """
        The hosts' answer is grouped by kernel; malformed lines, ids that
        are not UUIDs and pids 0 or 1 are dropped.
        """
        a, b = new_id(), new_id()
        lines = [
            {"pid": 10, "pgid": 10, "kernel_id": a},
            {"pid": 11, "pgid": 10, "kernel_id": a},
            {"pid": 20, "pgid": 20, "kernel_id": b},
            {"pid": 30, "pgid": 30, "kernel_id": "../../etc/passwd"},
            {"pid": 1, "pgid": 1, "kernel_id": new_id()},
            {"pid": 40, "pgid": "x", "kernel_id": new_id()},
        ]
        output = "\n".join(json.dumps(line) for line in lines) + "\nnot json\n"
        kernels = parse_ssh_inventory("h1", output.encode())
        self.assertEqual(
            sorted((k.kernel_id, k.pids, k.pgids, k.host) for k in kernels),
            sorted([(a, (10, 11), (10,), "h1"), (b, (20,), (20,), "h1")]),
        )

    def test_slurm_inventory_output(self) -> None:
        """
        Only pending or running jobs with this gateway's comment and a
        kernel job name count; a line with a | too many (a job name or
        comment holding one) is skipped.
        """
        k = new_id()
        out = (
            f"7|RUNNING|n1|egateway-{k}|egateway:gw-1\n"
            f"8|PENDING||egateway-{new_id()}|egateway:gw-2\n"
            f"9|COMPLETED|n1|egateway-{new_id()}|egateway:gw-1\n"
            f"10|RUNNING|n2|other-{new_id()}|egateway:gw-1\n"
            f"11|RUNNING|n2|egateway-{new_id()}|x|egateway:gw-1\n"
            f"12|PENDING||egateway-{new_id()}|\n"
        ).encode()
        jobs = parse_slurm_inventory(out, "gw-1", "egateway-")
        self.assertEqual([(j.job_id, j.state, j.node, j.kernel_id) for j in jobs], [("7", "RUNNING", "n1", k)])


class LocalScanTests(TestCase):
    """
    The local inventory's /proc scan, against real processes.
    """

    timeout = 30

    def spawn(self, directory: str, kernel_id: str, env: dict[str, str]) -> subprocess.Popen:
        path = os.path.join(directory, f"kernel-{kernel_id}.json")
        with open(path, "w") as f:
            json.dump({"shell_port": 1}, f)
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys, time; time.sleep(60)", "-f", path],
            env={"PATH": os.environ.get("PATH", ""), **env},
            start_new_session=True,
        )

        def stop() -> None:
            proc.kill()
            proc.wait()

        self.addCleanup(stop)
        return proc

    async def test_finds_only_this_gateways_kernels(self) -> None:
        """
        A process naming a connection file in the runtime directory and
        carrying this gateway's id is found, with its environment and
        connection info; another gateway id, no id, or another directory
        is not.
        """
        runtime, elsewhere = os.path.abspath(self.mktemp()), os.path.abspath(self.mktemp())
        os.makedirs(runtime)
        os.makedirs(elsewhere)
        mine, other, untagged, outside = new_id(), new_id(), new_id(), new_id()
        proc = self.spawn(runtime, mine, {"EGATEWAY_ID": "gw-scan", "EGATEWAY_KERNELSPEC": "py", "KERNEL_USERNAME": "al"})
        self.spawn(runtime, other, {"EGATEWAY_ID": "gw-scan2"})
        self.spawn(runtime, untagged, {})
        self.spawn(elsewhere, outside, {"EGATEWAY_ID": "gw-scan"})
        deadline = reactor.seconds() + 10
        while True:
            kernels = find_local_kernels_blocking([runtime], "gw-scan")
            if kernels or reactor.seconds() > deadline:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual([k.kernel_id for k in kernels], [mine])
        (kernel,) = kernels
        self.assertEqual((kernel.pids, kernel.pgid, kernel.spec_name), ((proc.pid,), proc.pid, "py"))
        self.assertEqual(kernel.env["KERNEL_USERNAME"], "al")
        self.assertNotIn("EGATEWAY_ID", kernel.env)
        self.assertEqual(kernel.connection_info, {"shell_port": 1})
        self.assertEqual(kernel.log_file, os.path.join(runtime, f"kernel-{mine}.log"))


class PidAliveTests(SynchronousTestCase):
    """
    L{egateway.clusters.local._pid_alive} over a fake C{/proc}: what waits
    for a reaped kernel to be gone asks it.
    """

    def check(self, state: str, flags: int, cmdline: bytes, marker: str = "/run/kernel-a.json") -> bool:
        from egateway.clusters.local import _pid_alive

        proc = self.mktemp()
        os.makedirs(os.path.join(proc, "42"))
        with open(os.path.join(proc, "42", "stat"), "w") as f:
            f.write(f"42 (python (x)) {state} 1 42 42 0 -1 {flags} 0 0 0 0 5 3 0 0 20 0 3 0\n")
        with open(os.path.join(proc, "42", "cmdline"), "wb") as f:
            f.write(cmdline)
        return _pid_alive(42, marker, proc)

    def test_exiting_process_counts_until_it_is_a_zombie(self) -> None:
        """
        A kernel that is exiting shows an empty command line once its
        memory is gone, while it still closes its sockets: alive until it
        is a zombie.  Before, it counted as gone then, and a reconcile
        pass said it had reaped a kernel still running (a CI failure of
        C{test_orphan_reaped_known_kernel_untouched}).
        """
        running = b"python\0-m\0ipykernel_launcher\0-f\0/run/kernel-a.json\0"
        self.assertTrue(self.check("S", 0x400000, running))
        self.assertTrue(self.check("R", 0x400000 | 0x4, b""))
        self.assertTrue(self.check("D", 0x4, b""))
        self.assertFalse(self.check("Z", 0x4, b""))
        self.assertFalse(self.check("Z", 0x400000, running))

    def test_another_process_under_the_pid(self) -> None:
        """
        A recycled pid (another command line), or a process without a
        command line that is not exiting (a kernel thread), is not ours.
        """
        self.assertFalse(self.check("S", 0x400000, b"sshd\0"))
        self.assertFalse(self.check("I", 0x208040, b""))
        self.assertTrue(self.check("S", 0x400000, b"sshd\0", marker=""))

    def test_no_such_process(self) -> None:
        from egateway.clusters.local import _pid_alive

        self.assertFalse(_pid_alive(42, "", self.mktemp()))


# -- real gateways -----------------------------------------------------------------


def kernel_processes(gateway_id: str, kernel_id: str) -> list[int]:
    """
    Live processes (anywhere on this machine, SSH test hosts included)
    whose environment names this kernel and gateway id.
    """
    tags = {f"EGATEWAY_ID={gateway_id}".encode(), f"KERNEL_ID={kernel_id}".encode()}
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = set(f.read().split(b"\0"))
        except OSError:
            continue
        if tags <= env and pid_alive(int(name)):
            pids.append(int(name))
    return sorted(pids)


def forget(data_dir: str, kernel_id: str) -> None:
    """
    Delete one kernel's record from a stopped gateway's SQLite store.
    """
    with sqlite3.connect(os.path.join(data_dir, "kernels.sqlite3")) as db:
        deleted = db.execute("DELETE FROM kernels WHERE kernel_id = ?", (kernel_id,)).rowcount
    assert deleted == 1, f"no record of {kernel_id}"


def lose_store(data_dir: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        path = os.path.join(data_dir, "kernels.sqlite3" + suffix)
        if os.path.exists(path):
            os.unlink(path)




class ReconcileTestCase(TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.data_dir = os.path.abspath(self.mktemp())
        self.gateway_id = f"test-{uuid.uuid4().hex[:12]}"
        self.extra: dict[str, Any] = {}
        self.leak_checks: list[tuple[str, str]] = []
        self.addCleanup(self._no_leaks)

    def _no_leaks(self) -> None:
        for gateway_id, kernel_id in self.leak_checks:
            self.assertEqual(kernel_processes(gateway_id, kernel_id), [], f"kernel {kernel_id} outlived the test")

    async def gateway(self, gateway_id: str | None = None, **flags: Any) -> InProcessGateway:
        settings = {
            "persistence": "true",
            "data_dir": self.data_dir,
            "list_kernels": "true",
            "gateway_id": gateway_id or self.gateway_id,
            "terminate_wait": 3,
            "shutdown_wait": 3,
            **self.extra,
            **flags,
        }
        gateway = InProcessGateway(**settings)
        await gateway.start()
        self.addCleanup(self._stop, gateway)
        return gateway

    async def _stop(self, gateway: InProcessGateway) -> None:
        if gateway.service.running:
            await gateway.stop()

    async def first_pass(self, gateway: InProcessGateway) -> list:
        reconciler = gateway.service.getServiceNamed("reconciler")
        await eventually(lambda: reconciler.passes >= 1, "the reconciler's first pass", timeout=60)
        return reconciler.last

    async def started(self, gateway: InProcessGateway, name: str | None = None) -> dict[str, Any]:
        model = await gateway.start_kernel(name)
        self.leak_checks.append((self.gateway_id, model["id"]))
        return model

    async def listed(self, gateway: InProcessGateway) -> dict[str, dict[str, Any]]:
        code, models = await gateway.request("GET", "api/kernels")
        self.assertEqual(code, 200, models)
        return {model["id"]: model for model in models}


class LocalReconcileTests(ReconcileTestCase):
    async def test_orphan_reaped_known_kernel_untouched(self) -> None:
        """
        A kernel whose record was deleted while the gateway was stopped is
        stopped and its files removed at the next start; the kernel the
        store still knows is restored as it was.
        """
        first = await self.gateway(on_stop="keep")
        kept, orphan = await self.started(first), await self.started(first)
        await first.stop()
        forget(self.data_dir, orphan["id"])
        orphan_pids = kernel_processes(self.gateway_id, orphan["id"])
        self.assertEqual(orphan_pids, [orphan["placement"]["pid"]])

        second = await self.gateway(on_stop="shutdown", reconcile="reap")
        outcomes = await self.first_pass(second)
        self.assertEqual([(o.kernel_id, o.done) for o in outcomes], [(orphan["id"], "reaped")])
        self.assertFalse(pid_alive(orphan["placement"]["pid"]))
        runtime = os.path.join(self.data_dir, "runtime")
        self.assertEqual([n for n in os.listdir(runtime) if orphan["id"] in n], [])
        listed = await self.listed(second)
        self.assertEqual(list(listed), [kept["id"]])
        self.assertEqual(
            (listed[kept["id"]]["state"], listed[kept["id"]]["placement"]["pid"]), ("running", kept["placement"]["pid"])
        )

    async def test_orphan_adopted_and_usable(self) -> None:
        """
        With the store file lost, reconcile = adopt lists the running
        kernel again under its id, with its kernelspec and user, and its
        state is intact through a new WebSocket.
        """
        first = await self.gateway(on_stop="keep")
        model = await self.started(first)
        client = await ChannelsClient.connect(first.url, model["id"])
        self.assertEqual((await client.execute("x = 42"))["reply"]["status"], "ok")
        await client.close()
        await first.stop()
        lose_store(self.data_dir)

        second = await self.gateway(on_stop="shutdown", reconcile="adopt")
        outcomes = await self.first_pass(second)
        self.assertEqual([(o.kernel_id, o.done) for o in outcomes], [(model["id"], "adopted")])
        adopted = (await self.listed(second))[model["id"]]
        self.assertEqual(
            (adopted["state"], adopted["name"], adopted["username"], adopted["placement"]["pid"]),
            ("running", model["name"], model["username"], model["placement"]["pid"]),
        )
        client = await ChannelsClient.connect(second.url, model["id"])
        self.assertEqual((await client.execute("x"))["result"]["text/plain"], "42")
        await client.close()
        code, _ = await second.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
        self.assertFalse(pid_alive(model["placement"]["pid"]))

    async def test_other_gateway_id_left_alone(self) -> None:
        """
        A gateway with another id, on the same data directory, neither
        reaps nor lists an orphan that is not its own; the gateway whose id
        it carries reaps it.
        """
        first = await self.gateway(on_stop="keep")
        model = await self.started(first)
        await first.stop()
        lose_store(self.data_dir)

        stranger = await self.gateway(gateway_id=f"{self.gateway_id}-x", on_stop="shutdown", reconcile="reap")
        self.assertEqual(await self.first_pass(stranger), [])
        self.assertTrue(pid_alive(model["placement"]["pid"]))
        self.assertEqual(await self.listed(stranger), {})
        await stranger.stop()

        owner = await self.gateway(on_stop="shutdown", reconcile="reap")
        self.assertEqual([o.done for o in await self.first_pass(owner)], ["reaped"])
        self.assertFalse(pid_alive(model["placement"]["pid"]))

    async def test_report_and_periodic_pass(self) -> None:
        """
        reconcile = report leaves an orphan running and listed nowhere; a
        record deleted while the gateway runs is noticed at the next
        periodic pass.
        """
        gateway = await self.gateway(on_stop="shutdown", reconcile="report", reconcile_interval=1)
        self.assertEqual(await self.first_pass(gateway), [])
        model = await self.started(gateway)
        reconciler = gateway.service.getServiceNamed("reconciler")
        # The manager forgets it, as if it never had it: no record, no kernel.
        kernel = gateway.manager.kernels.pop(model["id"])
        await gateway.manager.persistence.store.delete_kernel(model["id"])
        passes = reconciler.passes
        await eventually(lambda: reconciler.passes > passes + 1, "two more passes", timeout=20)
        self.assertEqual([(o.kernel_id, o.done) for o in reconciler.last], [(model["id"], "reported")])
        self.assertTrue(pid_alive(model["placement"]["pid"]))
        # Hand it back so the gateway's stop shuts it down.
        gateway.manager.kernels[model["id"]] = kernel


class SSHReconcileTests(ReconcileTestCase):
    async def setUp(self) -> None:
        from tests.fixtures import SSHHosts
        from tests.fixtures.system import SSH_PACKAGES, require_packages

        super().setUp()
        require_packages(*SSH_PACKAGES)
        self.ssh = SSHHosts(tempfile.mkdtemp(prefix="egw-", dir="/tmp"), ("h1", "h2"))
        self.ssh.up()
        self.addCleanup(self.ssh.down)
        self.addCleanup(lambda: self.assertEqual([p for h in ("h1", "h2") for p in self.ssh.pids(h)], []))
        specs = os.path.abspath(self.mktemp())
        os.makedirs(specs)
        write_spec(specs, "remote", launcher_argv(), "ssh", {"remote_hosts": ",".join(h.ip for h in self.ssh.hosts)})
        self.extra = {
            "kernelspec_path": specs,
            "response_ip": self.ssh.bridge_ip,
            "ssh_key_files": self.ssh.client_key_path,
            "ssh_known_hosts": self.ssh.known_hosts_path,
            "remote_user": self.ssh.user,
            "poll_interval": 1,
        }

    async def test_ssh_orphan_reaped(self) -> None:
        """
        A kernel on an SSH host whose record was deleted is killed there
        (kernel and comm listener) and its log removed at the next start,
        even with reconcile = adopt (it cannot be reattached); the other,
        still recorded, is restored and keeps running.
        """
        first = await self.gateway(on_stop="keep")
        kept, orphan = await self.started(first, "remote"), await self.started(first, "remote")
        await first.stop()
        forget(self.data_dir, orphan["id"])
        kept_pids = kernel_processes(self.gateway_id, kept["id"])
        self.assertEqual(len(kernel_processes(self.gateway_id, orphan["id"])), 2)  # kernel and comm listener
        log = f"/tmp/kernel-{orphan['id']}.log"
        self.assertTrue(os.path.exists(log))

        second = await self.gateway(on_stop="shutdown", reconcile="adopt")
        outcomes = await self.first_pass(second)
        self.assertEqual([(o.kernel_id, o.done) for o in outcomes], [(orphan["id"], "reaped")])
        self.assertEqual(kernel_processes(self.gateway_id, orphan["id"]), [])
        self.assertFalse(os.path.exists(log))
        listed = await self.listed(second)
        self.assertEqual((list(listed), listed[kept["id"]]["state"]), ([kept["id"]], "running"))
        self.assertEqual(kernel_processes(self.gateway_id, kept["id"]), kept_pids)


class SlurmReconcileTests(SlurmMixin, ReconcileTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.start_slurm()
        self.addCleanup(self.no_kernel_jobs)
        specs = os.path.abspath(self.mktemp())
        write_spec(specs, "slurm", launcher_argv(), "slurm", config={"cpus": 1})
        self.extra = {
            "kernelspec_path": specs,
            "response_ip": self.slurm.controller_ip,
            "slurm_conf": self.slurm.conf_path,
            "slurm_log_dir": self.logs,
            "slurm_poll_interval": 0.2,
            "poll_interval": 0.5,
        }

    async def test_slurm_orphan_cancelled(self) -> None:
        """
        A kernel job whose record was deleted is cancelled at the next
        start; a job of another gateway id is left running.
        """
        first = await self.gateway(on_stop="keep")
        orphan = await self.started(first, "slurm")
        await first.stop()
        other_dir = os.path.abspath(self.mktemp())
        other = await self.gateway(gateway_id=f"{self.gateway_id}-other", on_stop="keep", data_dir=other_dir)
        foreign = await other.start_kernel("slurm")
        self.addCleanup(self.slurm.run, ["scancel", foreign["placement"]["job_id"]], check=True)
        await other.stop()
        forget(self.data_dir, orphan["id"])
        jobs = self.jobs()
        self.assertEqual(jobs[orphan["placement"]["job_id"]][0], "RUNNING")

        second = await self.gateway(on_stop="shutdown", reconcile="reap")
        outcomes = await self.first_pass(second)
        self.assertEqual([(o.kernel_id, o.done) for o in outcomes], [(orphan["id"], "reaped")])
        # Cancelled; under load the job stays COMPLETING a moment after
        # scancel returns, while slurmd reaps its processes.
        await eventually(
            lambda: orphan["placement"]["job_id"] not in self.jobs(), "the orphan's job to end", timeout=30
        )
        self.assertEqual(self.jobs()[foreign["placement"]["job_id"]][0], "RUNNING")
