"""
Smoke tests of the benchmarks (C{bench/run.py}, C{bench/remote.py},
C{bench/persistence.py}, C{bench/scale.py}): each still runs end to end, reports every figure
with plausible values and no lost output, and removes every kernel, gateway
and server it started.  They assert nothing about speed.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support.daemon import REPO_ROOT, ChildProcess, _bounded, pid_alive, processes_mentioning

RUN = os.path.join(REPO_ROOT, "bench", "run.py")
REMOTE = os.path.join(REPO_ROOT, "bench", "remote.py")
PERSISTENCE = os.path.join(REPO_ROOT, "bench", "persistence.py")
SCALE = os.path.join(REPO_ROOT, "bench", "scale.py")
DEADLINE = 180.0
"""
Seconds a quick run may take before the test gives up and stops it.
"""
REMOTE_DEADLINE = 150.0
"""
The same for a quick run of C{bench/remote.py} with Slurm, which takes
about 45 s on a quiet machine (two SSH hosts, 7 kernel starts, 550 round
trips per side, a Slurm cluster and 3 jobs, and their teardown) and about
twice that on a busy one.
"""
PERSISTENCE_DEADLINE = 60.0
"""
The same for a quick run of C{bench/persistence.py}, which takes about
15 s on a quiet machine (Redis, three gateways, 6 kernel starts and 3
kernels streaming 2 MB per case).
"""
SCALE_DEADLINE = 120.0
"""
The same for a quick run of C{bench/scale.py}: 20 simulated kernels on a
gateway with each store (about 30 s on a quiet machine).
"""


def _direct_port_collisions(figures: dict[str, Any]) -> str:
    """
    The check failure a run reports when, and only when, jupyter_client's
    own kernels (the direct side) lost a port race with another process on
    this machine: a known jupyter_client weakness the benchmark exists to
    show, not a fault of the gateway or of the benchmark.  Empty otherwise.
    """
    direct = figures.get("concurrent", {}).get("direct", {})
    errors = direct.get("errors", [])
    if direct.get("ready") == direct.get("requested") or not errors:
        return ""
    if not all("Address already in use" in error for error in errors):
        return ""
    return f"concurrent: direct {direct['ready']} of {direct['requested']} ready"


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


class QuickRun:
    """
    Running a benchmark script as a child process, for the smoke tests.
    """

    async def _bench(
        self, *args: str, script: str = RUN, deadline: float = DEADLINE
    ) -> tuple[int | None, dict[str, Any], str]:
        """
        Run C{script --quick} (C{bench/run.py} unless told) with C{args} in
        a work directory of this test; its exit code, its JSON and the end
        of its output.  Fails the test if it overruns C{deadline} or leaves
        a process that names its work directory.
        """
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        out = os.path.join(workdir, "results.json")
        child = ChildProcess("bench", os.path.join(workdir, "bench-output.log"), reactor)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EG_", "KG_"))}
        child.start(
            [sys.executable, script, "--quick", "--workdir", workdir, "--json", out, *args],
            env,
            REPO_ROOT,
        )
        overran = False
        try:
            await _bounded(child.when_ended(), deadline, reactor)
        except TimeoutError:
            overran = True
        report = await child.stop(grace=45, marker=workdir)
        self.assertFalse(overran, f"the quick benchmark overran {deadline:g} s:\n{child.log_tail()}")
        self.assertEqual(report.leftovers, [], report.describe())
        self.assertEqual(processes_mentioning(workdir), [])
        results: dict[str, Any] = {}
        if os.path.exists(out):
            with open(out) as f:
                results = json.load(f)
        gateway_pid = results.get("meta", {}).get("gateway_pid")
        if gateway_pid:
            self.assertFalse(pid_alive(gateway_pid), "the benchmark's gateway is still running")
        return child.code, results, child.log_tail()

    async def _clean_run(self, *args: str, script: str, deadline: float) -> dict[str, Any]:
        """
        L{_bench}, failing the test unless the run succeeded with no error,
        no problem and nothing left behind; its JSON.
        """
        code, results, output = await self._bench(*args, script=script, deadline=deadline)
        self.assertEqual(code, 0, output)
        self.assertNotIn("error", results, output)
        self.assertEqual(results["problems"], [], output)
        self.assertEqual(results["leaked_processes"], [], output)
        return results

    def _check_pair(self, figure: dict[str, Any], field: str) -> None:
        for side in ("gateway", "direct"):
            self.assertTrue(_positive(figure[side][field]), f"{side} {field}: {figure[side]}")
        self.assertTrue(_positive(figure["ratio"]), figure)


class BenchSmokeTests(QuickRun, TestCase):
    timeout = DEADLINE + 60

    async def test_quick_run_reports_every_figure(self) -> None:
        """
        A quick run measures all six figures on both sides, loses no output,
        gets every concurrent kernel ready and leaves nothing running.
        """
        code, results, output = await self._bench()
        figures = results["figures"]
        direct_collisions = _direct_port_collisions(figures)
        self.assertEqual(code, 3 if direct_collisions else 0, output)
        self.assertEqual(results.get("leaked_processes"), [], output)
        self.assertEqual(
            results.get("checks_failed"), [direct_collisions] if direct_collisions else [], output
        )
        self.assertEqual(results.get("problems"), [], output)
        self.assertEqual(
            set(figures),
            {"start", "roundtrip", "pipelined", "stream_one_write", "stream_flushed_writes",
             "concurrent", "rss"},
        )
        self._check_pair(figures["start"], "median_s")
        self.assertLess(figures["start"]["gateway"]["median_s"], 60)
        self._check_pair(figures["roundtrip"], "p50_ms")
        for side in ("gateway", "direct"):
            rt = figures["roundtrip"][side]
            self.assertGreaterEqual(rt["p99_ms"], rt["p50_ms"])
            self.assertGreaterEqual(rt["n"], 100)
        self._check_pair(figures["pipelined"], "executes_per_s")
        for side in ("gateway", "direct"):
            self.assertEqual(figures["pipelined"][side]["failed"], 0)
        for case in ("stream_one_write", "stream_flushed_writes"):
            self._check_pair(figures[case], "mb_per_s")
            for side in ("gateway", "direct"):
                self.assertEqual(figures[case][side]["lost"], 0, figures[case])
                self.assertTrue(figures[case][side]["bytes_ok"], figures[case])
        concurrent = figures["concurrent"]
        self.assertEqual(concurrent["gateway"]["ready"], concurrent["gateway"]["requested"], concurrent)
        if not direct_collisions:
            self.assertEqual(concurrent["direct"]["ready"], concurrent["direct"]["requested"], concurrent)
        self.assertGreater(concurrent["gateway"]["requested"], 1)
        self._check_pair(concurrent, "last_ready_s")
        rss = figures["rss"]["gateway"]
        self.assertGreater(rss["idle_mib"], 10)
        self.assertGreaterEqual(rss["with_kernels_mib"], rss["idle_mib"] * 0.9)
        self.assertTrue(_positive(rss["idle_after_mib"]))
        self.assertIn("stopped", results["meta"]["gateway_stop"])

    async def test_v1_protocol(self) -> None:
        """
        The round trip and stream figures also work over the v1 binary
        subprotocol, with no output lost, also with the clients' and the
        kernels' allocators keeping what they free (which the run records).
        """
        code, results, output = await self._bench(
            "--protocol", "v1", "--only", "roundtrip,stream", "--malloc", "keep"
        )
        self.assertEqual(code, 0, output)
        self.assertEqual(results["meta"]["malloc"], "keep")
        self.assertEqual(results["meta"]["kernelspec"], "python3-malloc-keep")
        figures = results["figures"]
        self.assertEqual(set(figures), {"roundtrip", "stream_one_write", "stream_flushed_writes"})
        self._check_pair(figures["roundtrip"], "p50_ms")
        for case in ("stream_one_write", "stream_flushed_writes"):
            self.assertEqual(figures[case]["gateway"]["lost"], 0, figures[case])
            self.assertTrue(figures[case]["gateway"]["bytes_ok"], figures[case])

    async def test_malloc_keep_needs_the_private_gateway(self) -> None:
        """
        C{--malloc keep} starts both sides from a kernelspec copy only the
        benchmark's own gateway can see: with C{--gateway-url} it is refused
        before anything starts.
        """
        code, results, output = await self._bench("--gateway-url", "http://127.0.0.1:9/", "--malloc", "keep")
        self.assertEqual(code, 2)
        self.assertIn("--malloc keep needs the private gateway", output)
        self.assertEqual(results, {})

    async def test_unknown_figure_is_refused(self) -> None:
        """
        A misspelt figure name stops the benchmark before it starts anything.
        """
        code, results, output = await self._bench("--only", "roundtrips")
        self.assertEqual(code, 2)
        self.assertIn("unknown figure(s) roundtrips", output)
        self.assertEqual(results, {})


class RemoteBenchSmokeTests(QuickRun, TestCase):
    """
    C{bench/remote.py}: kernels on SSH hosts and Slurm, measured through an
    in-process gateway and directly.
    """

    timeout = REMOTE_DEADLINE + 90

    async def test_quick_remote_run(self) -> None:
        """
        A quick run with Slurm reports the SSH and local starts, the round
        trip through the gateway and directly to the same SSH kernel, and
        the Slurm job start, and leaves no kernel, job, host, namespace or
        fixture directory behind.
        """
        results = await self._clean_run("--slurm", script=REMOTE, deadline=REMOTE_DEADLINE)
        figures = results["figures"]
        self.assertEqual(set(figures), {"start", "roundtrip", "slurm"})
        start = figures["start"]
        for kind in ("local", "ssh"):
            self.assertTrue(_positive(start[kind]["median_s"]), start)
            self.assertLessEqual(start[kind]["post_median_s"], start[kind]["median_s"], start)
            self.assertLess(start[kind]["median_s"], 60, start)
        self.assertEqual(start["local"]["hosts"], ["localhost"])
        self.assertEqual(set(start["ssh"]["hosts"]), set(results["meta"]["ssh_hosts"].values()))
        self.assertTrue(_positive(start["ratio"]), start)
        roundtrip = figures["roundtrip"]
        self._check_pair(roundtrip, "p50_ms")
        for side in ("gateway", "direct"):
            self.assertGreaterEqual(roundtrip[side]["n"], 500)
            self.assertGreaterEqual(roundtrip[side]["p99_ms"], roundtrip[side]["p50_ms"])
        self.assertIn(roundtrip["met"], (True, False))
        self.assertEqual(results["meta"]["gateway_iopub_in_direct_turns"], "paused")
        self.assertIn(results["meta"]["roundtrip_kernel"]["ip"], results["meta"]["ssh_hosts"].values())
        slurm = figures["slurm"]["gateway"]
        self.assertTrue(_positive(slurm["median_s"]), slurm)
        self.assertLessEqual(slurm["post_median_s"], slurm["median_s"], slurm)
        self.assertEqual(list(slurm["phases_median_s"])[-1], "ready", slurm)
        self.assertLessEqual(set(slurm["nodes"]), set(results["meta"]["slurm_nodes"]), slurm)
        self.assertEqual(len(results["meta"]["fixture_workdirs"]), 2)
        for path in results["meta"]["fixture_workdirs"]:
            self.assertFalse(os.path.exists(path), f"fixture directory {path} left behind")
            self.assertEqual(processes_mentioning(path), [])


class PersistenceBenchSmokeTests(QuickRun, TestCase):
    """
    C{bench/persistence.py}: kernel start with the Redis store against no
    store, and streaming with the WebSocket journal against none.
    """

    timeout = PERSISTENCE_DEADLINE + 60

    async def test_quick_persistence_run(self) -> None:
        """
        A quick run reports both sides of the start figure and all three of
        each stream case with their ratios, loses no output, and leaves no
        gateway, kernel or Redis behind.
        """
        results = await self._clean_run(script=PERSISTENCE, deadline=PERSISTENCE_DEADLINE)
        figures = results["figures"]
        self.assertEqual(set(figures), {"start", "stream_one_write", "stream_flushed_writes"})
        start = figures["start"]
        for side in ("no_store", "redis"):
            self.assertTrue(_positive(start[side]["median_s"]), start)
            self.assertLess(start[side]["median_s"], 60, start)
        self.assertTrue(_positive(start["ratio"]), start)
        for case in ("stream_one_write", "stream_flushed_writes"):
            figure = figures[case]
            for side in ("journal_on", "journal_off", "journal_on_redis"):
                self.assertTrue(_positive(figure[side]["mb_per_s"]), figure)
                self.assertEqual(figure[side]["lost"], 0, figure)
                self.assertTrue(figure[side]["bytes_ok"], figure)
            self.assertTrue(_positive(figure["ratio"]), figure)
            self.assertTrue(_positive(figure["ratio_redis"]), figure)
        self.assertEqual(set(results["meta"]["gateway_pids"]), {"plain", "journal-off", "redis"})
        for name, pid in results["meta"]["gateway_pids"].items():
            self.assertFalse(pid_alive(pid), f"gateway {name} is still running")
            self.assertIn("stopped", results["meta"]["gateway_stop"][name])
        for path in results["meta"]["fixture_workdirs"]:
            self.assertFalse(os.path.exists(path), f"Redis fixture directory {path} left behind")
            self.assertEqual(processes_mentioning(path), [])


class ScaleBenchSmokeTests(QuickRun, TestCase):
    """
    C{bench/scale.py}: many connected kernels (simulated, from the kernel
    farm) on one gateway, with each store.
    """

    timeout = SCALE_DEADLINE + 60

    async def test_quick_scale_run(self) -> None:
        """
        A quick run says its kernels are simulated, reports the memory,
        descriptor, lag, listing, restart and shutdown figures for both
        stores, restores every kernel after the restart, deletes them all,
        and leaves no gateway, farm or Redis behind.
        """
        results = await self._clean_run(script=SCALE, deadline=SCALE_DEADLINE)
        self.assertIn("SIMULATED", results["meta"]["kernels_are"])
        self.assertEqual(set(results["figures"]), {"sqlite", "redis"})
        for store, figure in results["figures"].items():
            for snapshot in ("idle", "started", "connected", "restored"):
                self.assertTrue(_positive(figure[snapshot]["rss_mib"]), (store, figure))
            self.assertGreater(figure["connected"]["fds"], figure["idle"]["fds"], (store, figure))
            for phase in ("lag_quiet", "lag_ticks", "lag_load"):
                self.assertTrue(_positive(figure[phase]["probe"]["p99_ms"]), (store, figure[phase]))
            self.assertTrue(_positive(figure["lag_load"]["executes_per_s"]), (store, figure))
            self.assertTrue(_positive(figure["after_load"]["rss_mib"]), (store, figure))
            for snapshot in ("after_load", "restored"):
                self.assertGreaterEqual(figure[snapshot]["journal_held_mib"], 0, (store, figure))
            self.assertGreater(figure["lag_ticks"]["iopub_per_idle_client_per_s"], 0, (store, figure))
            self.assertEqual(figure["list"]["kernels"], results["meta"]["kernels"], (store, figure))
            self.assertTrue(_positive(figure["restart"]["all_served_s"]), (store, figure))
            self.assertTrue(_positive(figure["shutdown_all_s"]), (store, figure))
            self.assertEqual(figure["farm_kernels_left"], 0, (store, figure))
            # RSS, RSS per kernel, lag (GET /api and the in-gateway timer),
            # restart, RSS after it.
            self.assertEqual(len(figure["targets"]), 6, (store, figure))
            self.assertTrue(_positive(figure["lag_load"]["timer_lag"]["p99_ms"]), (store, figure["lag_load"]))
            self.assertFalse(pid_alive(figure["gateway_pid"]), f"the {store} gateway is still running")
        for path in results["meta"]["fixture_workdirs"]:
            self.assertFalse(os.path.exists(path), f"Redis fixture directory {path} left behind")


class _ReplyWithoutIdle:
    """
    Channels of a kernel whose iopub dropped its last messages: every
    execute gets its first stream chunks and its reply, never the C{idle}.
    """

    def __init__(self, chunks_sent: int) -> None:
        from bench.channels import Tracker

        self.tracker = Tracker()
        self.chunks_sent = chunks_sent

    def _answer(self, msg_id: str) -> None:
        from bench.figures import CHUNK

        text = "".join("<%08d>" % i + "x" * (CHUNK - 10) for i in range(self.chunks_sent))
        self.tracker.dispatch("iopub", "stream", msg_id, {"name": "stdout", "text": text})
        self.tracker.dispatch("shell", "execute_reply", msg_id, {"status": "ok"})

    def send_shell(self, msg_type: str, content: dict[str, Any]) -> str:
        import asyncio
        import uuid

        msg_id = uuid.uuid4().hex
        asyncio.get_running_loop().call_soon(self._answer, msg_id)
        return msg_id


class IdleLostTests(SynchronousTestCase):
    """
    A stream run whose C{idle} never comes (the kernel's iopub dropped it)
    ends after L{bench.figures.IDLE_GRACE} and fails the run as lost output,
    instead of waiting out the 600 s timeout (two runs hung so).
    """

    def channels(self, chunks_sent: int) -> Any:
        from bench.channels import _Channels

        class Channels(_ReplyWithoutIdle, _Channels):
            pass

        return Channels(chunks_sent)

    def test_execute_stops_waiting_after_the_grace(self) -> None:
        import asyncio

        from bench.channels import IdleLost

        channels = self.channels(3)

        async def run() -> BaseException:
            try:
                await channels.execute("x", timeout=5, idle_grace=0.01)
            except IdleLost as e:
                return e
            raise AssertionError("no IdleLost")

        error = asyncio.run(asyncio.wait_for(run(), 10))
        self.assertEqual(error.pending.reply, {"status": "ok"})
        self.assertEqual(channels.tracker.pending, {})

    def test_stream_figure_reports_the_lost_idle(self) -> None:
        import asyncio

        from bench import figures
        from bench.report import summarise
        from bench.sides import StartedKernel

        self.patch(figures, "IDLE_GRACE", 0.01)
        kernels = {"gateway": StartedKernel("gateway", self.channels(4), 0.0)}
        result = asyncio.run(asyncio.wait_for(figures.stream(kernels, "stream_one_write", 5, 2), 10))
        self.assertEqual((result["gateway"]["idle_lost"], result["gateway"]["lost"]), (2, 1))

        result["gateway"]["lost"] = 0
        problems = summarise({"stream_one_write": {"gateway": result["gateway"], "direct": dict(result["gateway"])}})
        self.assertEqual(len(problems), 1)
        self.assertIn("idle never came: gateway 2, direct 2", problems[0])


class PhaseOffsetsTests(SynchronousTestCase):
    """
    One function reads a launch's phases for every benchmark; a pod
    kernel's benchmark only names the steps differently.
    """

    def kernel(self) -> Any:
        from types import SimpleNamespace

        def event(phase: str, at: float, detail: str = "") -> Any:
            return SimpleNamespace(phase=SimpleNamespace(value=phase), at=at, detail=detail)

        return SimpleNamespace(phases=[
            event("queued", 10.0), event("submitted", 10.5, "pod kernel-1 created"),
            event("submitted", 11.0, "pod kernel-1 Pending, on node-a"), event("submitted", 11.5, "again, on node-a"),
            event("placed", 12.0), event("ready", 13.0),
        ])

    def test_first_time_of_each_phase(self) -> None:
        """
        By default each phase counts once, at its first event, in seconds
        from the first.
        """
        from bench.remote import _phase_offsets

        self.assertEqual(_phase_offsets(self.kernel()), {"submitted": 0.5, "placed": 2.0, "ready": 3.0})
        self.assertEqual(_phase_offsets(object()), {})

    def test_pod_names(self) -> None:
        """
        A pod's phases read as pod created, scheduled (the first
        C{submitted} naming a node), container started and the rest.
        """
        from bench.pods import pod_phase_names
        from bench.remote import _phase_offsets

        self.assertEqual(
            _phase_offsets(self.kernel(), pod_phase_names),
            {"pod created": 0.5, "scheduled": 1.0, "container started": 2.0, "ready": 3.0},
        )


class TakeTurnsTests(SynchronousTestCase):
    """
    C{bench/turns.py}: the starts of every kind interleave, and the first
    round only warms up.
    """

    def test_turns_and_warm_up(self) -> None:
        """
        Kinds take turns round by round in the order given, and each kind
        keeps its samples of every round but the first.
        """
        import io
        from contextlib import redirect_stdout

        from twisted.internet.defer import Deferred

        from bench.turns import Sample, summarize, seconds, take_turns

        order: list[str] = []

        def starter(kind: str) -> Any:
            async def start() -> Sample:
                order.append(kind)
                return Sample(float(len(order)), kind)
            return start

        with redirect_stdout(io.StringIO()) as out:
            samples = self.successResultOf(
                Deferred.fromCoroutine(take_turns({"local": starter("local"), "pod": starter("pod")}, 2))
            )
        self.assertEqual(order, ["local", "pod"] * 3)
        self.assertEqual(seconds(samples), {"local": [3.0, 5.0], "pod": [4.0, 6.0]})
        self.assertIn("pod   start 0: 2.000 s", out.getvalue())
        self.assertEqual(summarize(seconds(samples))["pod"], {"median": 5.0, "min": 4.0, "max": 6.0, "n": 2})


class StormTimingTests(SynchronousTestCase):
    def test_storm_timed_from_its_start(self) -> None:
        """
        A storm's time until the last kernel is ready counts from the
        storm's start, not from each kernel's own start: a side that
        spawns its kernels one after the other before its first await (as
        jupyter_client's C{start_kernel} does, C{Popen} waiting for each
        child) had the spawns before each kernel left out of its figure.
        """
        import asyncio

        from bench import figures
        from bench.sides import StartedKernel

        clock = [100.0]
        self.patch(figures.time, "perf_counter", lambda: clock[0])

        class SerialSpawns:
            name = "serial"

            async def start_kernel(self) -> StartedKernel:
                clock[0] += 1.0  # the spawn, blocking the event loop
                started = StartedKernel("k", None, 0.25, ready_at=clock[0] + 0.25)
                await asyncio.sleep(0)
                return started

            async def shutdown(self, kernel: StartedKernel) -> None:
                pass

        result = asyncio.run(asyncio.wait_for(figures.concurrent_starts([SerialSpawns()], 4, 1), 10))["serial"]
        self.assertEqual(result["ready"], 4)
        self.assertAlmostEqual(result["last_ready_s"], 4.25)
        self.assertAlmostEqual(result["median_ready_s"], 2.75)
        self.assertEqual(result["last_own_elapsed_s_runs"], [0.25])


_FAULTS_PER_MESSAGE = """
import json, resource
from bench import allocator
if CHOICE == "keep":
    allocator.keep_freed_memory()
payload = b'{"text":"' + b"x" * 20_000_000 + b'"}'

def one_message():
    # What a v1 client that slices the content out holds at its peak (as
    # JupyterLab's parser does): the frame, the content sliced out of it, the
    # decoded text and the parsed string.
    frame = payload + b" "
    content = frame[:-1]
    parsed = json.loads(content)
    del frame, content, parsed

one_message()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    one_message()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


class AllocatorTests(SynchronousTestCase):
    """
    C{--malloc keep} (bench/allocator.py).
    """

    def faults(self, choice: str) -> int:
        # A fresh interpreter: the allocator state is the whole process's.
        from tests.support.snippets import run_snippet

        return int(run_snippet(f"CHOICE = {choice!r}\n" + _FAULTS_PER_MESSAGE).stdout)

    def test_keep_stops_faulting_in_every_message(self) -> None:
        """
        With glibc's defaults, parsing one 20 MB message after another as
        a v1 client that slices the content out does faults fresh pages in
        for every message; keeping freed memory, the memory of the previous
        message is used again.
        """
        default, keep = self.faults("default"), self.faults("keep")
        self.assertGreater(default, 3 * 10_000, (default, keep))
        self.assertLess(keep, 1_000, (default, keep))

    def test_kernelspec_copy(self) -> None:
        """
        The kernels get the same settings through a copy of the kernelspec
        (its files too), which jupyter_client finds first on the path
        returned.
        """
        from jupyter_client.kernelspec import KernelSpecManager

        from bench import allocator

        workdir = self.mktemp()
        os.makedirs(workdir)
        name, data_dir = allocator.kernelspec_keeping_memory("python3", workdir)
        original = KernelSpecManager().get_kernel_spec("python3")
        self.patch(os, "environ", {**os.environ, "JUPYTER_PATH": data_dir})
        spec = KernelSpecManager().get_kernel_spec(name)
        self.assertEqual(spec.argv, original.argv)
        self.assertEqual({k: spec.env[k] for k in allocator.KEEP_ENV}, allocator.KEEP_ENV)
        self.assertEqual(sorted(os.listdir(spec.resource_dir)), sorted(os.listdir(original.resource_dir)))
