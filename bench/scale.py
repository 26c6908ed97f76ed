#!/usr/bin/env python
"""
Many kernels on one gateway: what each connected kernel costs the gateway,
how late its reactor runs under load, and how long listing, restoring after
a restart and shutting down all of them take.

    python bench/scale.py [--kernels 1000] [--stores sqlite,redis] [--json out.json]
    python bench/scale.py --launcher local --kernels 200 --stores sqlite   # real ipykernels

With the default C{--launcher farm} the kernels are simulated: one process,
C{bench/kernel_farm.py}, serves all of them, each on its own five ports with
its own key and HMAC (1,000 ipykernel processes do not fit in memory).  The
gateway reaches them through a launcher that only this benchmark registers
(C{bench/farm_launcher.py}, an C{egateway.launchers} entry point written into
the work directory and put on the gateway's PYTHONPATH).  With C{--launcher
local} the kernels are real ipykernels started by egateway's local
launcher.  See C{bench/README.md}.
"""

from __future__ import annotations

import argparse
import datetime
import asyncio
import json
import re
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Awaitable, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import httpclient  # noqa: E402
from bench.channels import GatewayChannels  # noqa: E402
from bench.farm_launcher import GC_LOG_ENV, LAG_LOG_ENV, NAME as FARM_LAUNCHER  # noqa: E402
from bench.gateway import GatewayProcess, processes_mentioning, rss_kib, sweep, cpu_seconds  # noqa: E402
from bench.kernel_farm import raise_nofile  # noqa: E402
from bench.run import add_output_options, end_of_run, finish, run_guarded, run_meta, work_directory  # noqa: E402

SIMULATED_NOTE = (
    "kernels are SIMULATED: one process (bench/kernel_farm.py) serves all of them, each with its own "
    "five ports, key and HMAC, speaking the kernel wire protocol; the gateway reaches them through the "
    "'bench-farm' launcher, registered only by this benchmark (an entry point in the work directory)"
)
REAL_NOTE = "kernels are real ipykernel processes started by egateway's local launcher"

MIB = 1 << 20

TARGETS = {
    "rss_mb": 250.0,
    "rss_per_kernel_mb": 0.2,
    "lag_p99_ms": 20.0,
    "restore_s": 30.0,
}


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def _progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


async def bounded(items: list[Any], limit: int, work: Callable[[Any], Awaitable[Any]]) -> list[Any]:
    """
    C{work(item)} for every item, at most C{limit} at once; the results
    (an exception in place of a result that failed).
    """
    gate = asyncio.Semaphore(limit)

    async def one(item: Any) -> Any:
        async with gate:
            return await work(item)

    return await asyncio.gather(*(one(item) for item in items), return_exceptions=True)


def write_entry_point(workdir: str) -> str:
    """
    A directory holding a C{.dist-info} that registers the farm launcher in
    the C{egateway.launchers} group; on the gateway's PYTHONPATH it is what
    makes C{bench-farm} a launcher, for that gateway only.
    """
    root = os.path.join(workdir, "entry-points")
    info = os.path.join(root, "egateway_bench_farm-0.dist-info")
    os.makedirs(info, exist_ok=True)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: egateway-bench-farm\nVersion: 0\n")
    with open(os.path.join(info, "entry_points.txt"), "w") as f:
        f.write(f"[egateway.launchers]\n{FARM_LAUNCHER} = bench.farm_launcher:FarmLauncher\n")
    return root


def write_farm_kernelspec(workdir: str, socket_path: str) -> str:
    root = os.path.join(workdir, "kernelspecs")
    spec = os.path.join(root, "bench-farm")
    os.makedirs(spec, exist_ok=True)
    with open(os.path.join(spec, "kernel.json"), "w") as f:
        json.dump(
            {
                "argv": [sys.executable, "-c", "raise SystemExit('served by bench/kernel_farm.py')"],
                "display_name": "Simulated kernel (benchmark farm)",
                "language": "python",
                "metadata": {"egateway": {"launcher": FARM_LAUNCHER, "config": {"socket": socket_path}}},
            },
            f,
        )
    return root


class FarmProcess:
    """
    The kernel farm, a child process of the benchmark.
    """

    def __init__(self, workdir: str) -> None:
        # A short directory of its own: a UNIX socket's path has at most
        # 107 bytes, and the work directory may be deep (a test's).
        self.socket_dir = tempfile.mkdtemp(prefix="egw-farm-", dir="/tmp")
        self.socket = os.path.join(self.socket_dir, "farm.sock")
        self.ready_file = os.path.join(workdir, "farm.ready")
        self.log_path = os.path.join(workdir, "farm.log")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        argv = [sys.executable, os.path.join(REPO, "bench", "kernel_farm.py"), "--socket", self.socket,
                "--ready-file", self.ready_file]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        give_up = time.monotonic() + 30
        while not os.path.exists(self.ready_file):
            if self.process.poll() is not None or time.monotonic() > give_up:
                raise RuntimeError(f"the kernel farm did not start; see {self.log_path}")
            time.sleep(0.05)

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(self.socket)
        try:
            writer.write(json.dumps({"id": 1, "op": op, **fields}).encode() + b"\n")
            while True:
                answer = json.loads(await asyncio.wait_for(reader.readline(), 30))
                if answer.get("id") == 1:
                    return answer
        finally:
            writer.close()

    def stop(self) -> str:
        try:
            return self._stop()
        finally:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def _stop(self) -> str:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return "not running"
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
            return "stopped"
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            return "killed"


STALL_LINE = re.compile(
    r"(?P<at>\S+) \[egateway\.ops\.stalls#warn\] the reactor was blocked for about (?P<seconds>[\d.]+)s.*?"
    r"its thread ran (?P<cpu>[\d.]+)s on a CPU"
)

GATEWAY_CPUS: set[int] = set()
"""
With C{--pin-gateway}: the CPU the gateway and the probe run on; every
other process of the run is kept off it.
"""


def pin(pid: int, cpus: set[int]) -> None:
    """
    Every thread of process C{pid} on C{cpus} (threads it starts later
    inherit its main thread's CPUs).
    """
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, FileNotFoundError):
            pass  # a thread that ended meanwhile


class LagProbe:
    """
    C{bench/lagprobe.py} in its own process for the duration of a phase.
    """

    def __init__(self, url: str, token: str, interval: float) -> None:
        self._argv = [sys.executable, os.path.join(REPO, "bench", "lagprobe.py"), url, token, str(interval)]
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> "LagProbe":
        self._process = subprocess.Popen(self._argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        if GATEWAY_CPUS:
            pin(self._process.pid, GATEWAY_CPUS)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def finish(self) -> dict[str, Any]:
        assert self._process is not None
        self._process.send_signal(signal.SIGTERM)
        out, _ = self._process.communicate(timeout=30)
        data = json.loads(out or b'{"ms": [], "errors": 0}')
        samples = data["ms"]
        return {
            "samples": len(samples),
            "errors": data["errors"],
            "p50_ms": percentile(samples, 0.5),
            "p99_ms": percentile(samples, 0.99),
            "max_ms": max(samples) if samples else None,
        }


def metric_value(metrics_text: str, name: str) -> float | None:
    """
    The value of the unlabelled sample C{name} on a C{/metrics} page.
    """
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def lag_histogram(metrics_text: str) -> dict[str, float]:
    """
    The gateway's own C{egateway_reactor_lag_seconds} histogram (cumulative
    bucket counts by upper bound), from a C{/metrics} page.
    """
    buckets = {}
    for line in metrics_text.splitlines():
        if line.startswith("egateway_reactor_lag_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[bound] = float(line.rsplit(" ", 1)[1])
    return buckets


def histogram_quantile(before: dict[str, float], after: dict[str, float], fraction: float) -> str | None:
    """
    The bucket bound below which C{fraction} of the observations made
    between two scrapes fall (Prometheus' buckets are all we have).
    """
    if not after:
        return None
    delta = {bound: after[bound] - before.get(bound, 0.0) for bound in after}
    total = delta.get("+Inf", 0.0)
    if total <= 0:
        return None
    for bound, count in sorted(delta.items(), key=lambda item: float(item[0])):
        if count >= fraction * total:
            return f"<= {float(bound) * 1000:g} ms" if bound != "+Inf" else "> 10 s"
    return None


class ScaleRun:
    """
    One store's pass: a gateway, N kernels each with a WebSocket client, the
    load phase, listing, a restart, the shutdown of all.
    """

    def __init__(self, args: argparse.Namespace, store: str, workdir: str, figures: dict[str, Any],
                 farm: FarmProcess | None, redis_url: str, store_key: str, extra_path: tuple[str, ...],
                 kernelspec_dir: str) -> None:
        self.args = args
        self.store = store
        self.workdir = workdir
        self.figures = figures
        self.farm = farm
        self.kernelspec = "bench-farm" if farm is not None else args.kernelspec
        config = f'kernelspec_path = ["{kernelspec_dir}"]\n' if kernelspec_dir else ""
        if store == "redis":
            config += f'[store]\nstore_url = "{redis_url}"\nstore_key = "{store_key}"\non_stop = "keep"\n'
        else:
            config += '[store]\non_stop = "keep"\n'
        config += '[metrics]\nmetrics_networks = ["127.0.0.1"]\n'
        config += f'[ops]\nstall_warning = {args.stall_warning}\n'
        if args.turn_budget is not None:
            config += f'turn_budget = {args.turn_budget}\n'
        self.gateway = GatewayProcess(workdir, args.launch_timeout, stop_timeout=120.0, extra_config=config,
                                      extra_path=extra_path, profile_dir=args.profile)
        self.kernels: list[str] = []
        self.clients: dict[str, GatewayChannels] = {}

    @property
    def base(self) -> str:
        return self.gateway.url.rstrip("/")

    def _snapshot(self) -> dict[str, Any]:
        pid = self.gateway.pid
        return {"rss_mib": (rss_kib(pid) or 0) / 1024, "fds": fd_count(pid), "cpu_s": cpu_seconds(pid)}

    async def _journal_held_mib(self) -> float | None:
        """
        What the gateway's journals and iopub rings hold
        (C{egateway_journal_held_bytes}), in MiB.
        """
        text = (await self._api("GET", "/metrics", 200)).body.decode()
        value = metric_value(text, "egateway_journal_held_bytes")
        return None if value is None else value / (1 << 20)

    async def _api(self, method: str, path: str, status: Any, body: Any = None, timeout: float = 120) -> Any:
        return await httpclient.expect(method, self.base + path, status, body=body, token=self.gateway.token,
                                       timeout=timeout)

    # -- kernels and clients --------------------------------------------------

    async def _start_one(self, _: int) -> str:
        response = await self._api("POST", "/api/kernels", 201, body={"name": self.kernelspec},
                                   timeout=self.args.launch_timeout + 30)
        kernel_id = response.json()["id"]
        self.kernels.append(kernel_id)
        return kernel_id

    async def _connect_one(self, kernel_id: str) -> None:
        ws_base = "ws" + self.gateway.url[4:]
        channels = await GatewayChannels.connect(ws_base, kernel_id, self.gateway.token, self.args.protocol,
                                                 timeout=60)
        self.clients[kernel_id] = channels
        if await channels.kernel_info(timeout=60) is None:
            raise RuntimeError(f"kernel {kernel_id}: no kernel_info_reply over the WebSocket in 60 s")

    async def _close_clients(self) -> None:
        clients, self.clients = self.clients, {}
        await bounded(list(clients.values()), 100, lambda c: c.close())

    @staticmethod
    def _failures(results: list[Any], what: str) -> None:
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(results)} {what} failed; first: {failed[0]!r}")

    async def _connect_all(self) -> float:
        start = time.perf_counter()
        self._failures(await bounded(self.kernels, self.args.connect_concurrency, self._connect_one),
                       "WebSocket connections")
        return time.perf_counter() - start

    # -- phases ----------------------------------------------------------------

    def _gc_pauses(self, since: float, until: float) -> dict[str, Any]:
        """
        The gateway's oldest-generation collections (and younger ones over
        5 ms) between two wall-clock times, from the farm launcher's trace.
        """
        pauses: list[tuple[int, float]] = []
        try:
            with open(self.gc_log) as f:
                for line in f:
                    if line.startswith("#"):
                        continue  # a garbage census (EGW_BENCH_GC_GARBAGE)
                    at, generation, took, _ = line.split()
                    if since <= float(at) <= until:
                        pauses.append((int(generation), float(took)))
        except OSError:
            return {}
        full = [took for generation, took in pauses if generation == 2]
        return {"full_collections": len(full), "full_max_ms": max(full, default=0.0),
                "full_total_ms": sum(full), "young_over_5ms": len(pauses) - len(full)}

    def _timer_lag(self, since: float, until: float) -> dict[str, Any]:
        """
        How late the farm launcher's 10 ms timer in the gateway fired
        between two wall-clock times: p50, p99 and max (ms).
        """
        samples: list[float] = []
        try:
            with open(self.lag_log) as f:
                for line in f:
                    at, *late = line.split()
                    if since <= float(at) <= until:
                        samples.extend(float(ms) for ms in late)
        except OSError:
            return {}
        if not samples:
            return {}
        return {"p50_ms": percentile(samples, 0.5), "p99_ms": percentile(samples, 0.99), "max_ms": max(samples),
                "samples": len(samples)}

    def _stalls(self, since: float, until: float) -> dict[str, Any]:
        """
        The stalls the gateway's stall watch reported between two wall-clock
        times (C{--stall-warning}): how many, the longest, and how many its
        reactor thread spent mostly waiting for a CPU rather than working.
        """
        stalls: list[tuple[float, float]] = []
        try:
            with open(self.gateway.log_path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    found = STALL_LINE.match(line)
                    if found is None:
                        continue
                    at = datetime.datetime.fromisoformat(found["at"]).timestamp()
                    if since <= at <= until + 1:
                        stalls.append((float(found["seconds"]), float(found["cpu"])))
        except OSError:
            return {}
        return {"count": len(stalls), "longest_s": max((s for s, _ in stalls), default=0.0),
                "waiting": sum(1 for s, cpu in stalls if cpu < s / 2)}

    async def run(self) -> None:
        n = self.args.kernels
        fig = self.figures
        self.gc_log = os.path.join(self.workdir, "gc.log")
        self.lag_log = os.path.join(self.workdir, "lag.log")
        if self.farm is not None:
            os.makedirs(self.workdir, exist_ok=True)
            os.environ[GC_LOG_ENV] = self.gc_log
            os.environ[LAG_LOG_ENV] = self.lag_log
        _progress(f"[{self.store}] starting the gateway")
        await asyncio.to_thread(self.gateway.start)
        if GATEWAY_CPUS:
            pin(self.gateway.pid, GATEWAY_CPUS)
        fig["gateway_pid"] = self.gateway.pid
        # Warm up (imports, first launch, first WebSocket) before the idle
        # figure, so that per-kernel costs do not carry one-time ones.
        await self._start_one(0)
        await self._connect_all()
        await self._close_clients()
        await self._api("DELETE", f"/api/kernels/{self.kernels.pop()}", 204)
        await asyncio.sleep(1)
        fig["idle"] = self._snapshot()

        _progress(f"[{self.store}] starting {n} kernels, {self.args.start_concurrency} at a time")
        start = time.perf_counter()
        self._failures(await bounded(list(range(n)), self.args.start_concurrency, self._start_one), "starts")
        fig["start_all_s"] = time.perf_counter() - start
        await asyncio.sleep(2)
        fig["started"] = self._snapshot()
        _progress(f"[{self.store}] {n} kernels started in {fig['start_all_s']:.1f} s (RSS "
                  f"{fig['started']['rss_mib']:.1f} MiB); connecting a client to each")
        fig["connect_all_s"] = await self._connect_all()
        await asyncio.sleep(2)
        fig["connected"] = self._snapshot()
        idle, connected = fig["idle"], fig["connected"]
        fig["rss_per_kernel_mib"] = (connected["rss_mib"] - idle["rss_mib"]) / n
        fig["rss_per_kernel_without_client_mib"] = (fig["started"]["rss_mib"] - idle["rss_mib"]) / n
        fig["fds_per_kernel"] = (connected["fds"] - idle["fds"]) / n
        if self.farm is not None:
            fig["farm"] = {k: v for k, v in (await self.farm.call("stats")).items() if k != "id"}
        _progress(f"[{self.store}] RSS {connected['rss_mib']:.1f} MiB ({fig['rss_per_kernel_mib']:.3f} MiB per "
                  f"kernel above idle), {connected['fds']} fds")

        fig["lag_quiet"] = await self._lag_phase(self.args.quiet_seconds, load=False)
        if self.farm is not None:
            fig["lag_ticks"] = await self._lag_phase(self.args.quiet_seconds, load=False, ticks=True)
        fig["lag_load"] = await self._lag_phase(self.args.load_seconds, load=True, ticks=True)
        fig["after_load"] = {**self._snapshot(), "journal_held_mib": await self._journal_held_mib()}
        fig["list"] = await self._list_times()

        await self._restart()
        # With a shared store the restored gateway's iopub rings refill at
        # once (each kernel's statuses), up to journal_total_bytes: how much
        # of the RSS they are.
        fig["restored"] = {**self._snapshot(), "journal_held_mib": await self._journal_held_mib()}
        await self._shutdown_all()

    async def _lag_phase(self, seconds: float, load: bool, ticks: bool = False) -> dict[str, Any]:
        """
        C{seconds} of probing the reactor from outside; with C{ticks}, every
        kernel publishes a status a second (farm only); with C{load},
        C{--clients} clients execute in a loop meanwhile.
        """
        what = "load" if load else "ticks" if ticks else "quiet"
        _progress(f"[{self.store}] {what}: {seconds:g} s of reactor probing"
                  + (f", {self.args.clients} clients executing" if load else "")
                  + (", status ticks on" if ticks and self.farm is not None else ""))
        result: dict[str, Any] = {"seconds": seconds}
        metrics_before = lag_histogram((await self._api("GET", "/metrics", 200)).body.decode())
        # The clients that do not execute: what they receive is the ticks.
        listeners = list(self.clients.values())[self.args.clients if load else 0 :] or list(self.clients.values())
        iopub_before = sum(c.tracker.iopub_seen for c in listeners)
        cpu_before = cpu_seconds(self.gateway.pid) or 0.0
        if ticks and self.farm is not None:
            await self.farm.call("tick", rate=1.0)
        executes = 0
        stop = asyncio.Event()

        async def loop(channels: GatewayChannels) -> None:
            nonlocal executes
            while not stop.is_set():
                await channels.execute("1+1", timeout=60)
                executes += 1

        wall_start = time.time()
        with LagProbe(self.gateway.url, self.gateway.token, self.args.probe_interval) as probe:
            loops = [asyncio.ensure_future(loop(c)) for c in list(self.clients.values())[: self.args.clients]] \
                if load else []
            started = time.perf_counter()
            await asyncio.sleep(seconds)
            stop.set()
            done = await asyncio.gather(*loops, return_exceptions=True)
            elapsed = time.perf_counter() - started
            result["probe"] = probe.finish()
        if ticks and self.farm is not None:
            await self.farm.call("tick", rate=0)
        result["gc"] = self._gc_pauses(wall_start, time.time())
        result["stalls"] = self._stalls(wall_start, time.time())
        result["timer_lag"] = self._timer_lag(wall_start, time.time())
        self._failures(list(done), "execute loops")
        metrics_after = lag_histogram((await self._api("GET", "/metrics", 200)).body.decode())
        result["gateway_cpu_percent"] = ((cpu_seconds(self.gateway.pid) or 0.0) - cpu_before) / elapsed * 100
        result["load_average"] = os.getloadavg()[0]
        delivered = sum(c.tracker.iopub_seen for c in listeners) - iopub_before
        result["iopub_per_idle_client_per_s"] = delivered / len(listeners) / elapsed
        result["gateway_cpu_s"] = (cpu_seconds(self.gateway.pid) or 0.0) - cpu_before
        if load:
            result["executes_per_s"] = executes / elapsed
            result["clients"] = min(self.args.clients, len(self.clients))
        result["metric_lag_p50"] = histogram_quantile(metrics_before, metrics_after, 0.5)
        result["metric_lag_p99"] = histogram_quantile(metrics_before, metrics_after, 0.99)
        probe_figures = result["probe"]
        _progress(f"[{self.store}] {what}: GET /api p50 {_ms(probe_figures['p50_ms'])}, p99 "
                  f"{_ms(probe_figures['p99_ms'])}, gateway CPU {result['gateway_cpu_percent']:.0f} %"
                  + (f", {result['executes_per_s']:.0f} executes/s" if load else ""))
        return result

    async def _list_times(self, repeats: int = 5) -> dict[str, Any]:
        times, size, count = [], 0, 0
        for _ in range(repeats):
            start = time.perf_counter()
            response = await self._api("GET", "/api/kernels", 200)
            times.append(time.perf_counter() - start)
            size, count = len(response.body), len(response.json())
        _progress(f"[{self.store}] GET /api/kernels: {count} kernels, {size} bytes, median "
                  f"{statistics.median(times) * 1000:.0f} ms")
        return {"median_ms": statistics.median(times) * 1000, "max_ms": max(times) * 1000, "kernels": count,
                "bytes": size}

    async def _listed_running(self) -> int:
        try:
            response = await self._api("GET", "/api/kernels", 200, timeout=30)
        except (httpclient.HTTPFailure, OSError, asyncio.TimeoutError):
            return 0
        wanted = set(self.kernels)
        return sum(1 for k in response.json() if k["id"] in wanted and k.get("state") == "running")

    async def _restart(self) -> None:
        """
        Stop the gateway (kernels kept), start it again on the same store,
        and time until every kernel is listed running and has answered a
        new client's C{kernel_info} over its WebSocket.
        """
        fig = self.figures
        n = len(self.kernels)
        await self._close_clients()
        _progress(f"[{self.store}] restart: stopping the gateway (on_stop keep)")
        start = time.perf_counter()
        fig["gateway_stop"] = await asyncio.to_thread(self.gateway.stop)
        fig["stop_s"] = time.perf_counter() - start
        start = time.perf_counter()
        await asyncio.to_thread(self.gateway.start, 120.0)
        if GATEWAY_CPUS:
            pin(self.gateway.pid, GATEWAY_CPUS)
        restart: dict[str, Any] = {"api_answers_s": time.perf_counter() - start}
        fig["gateway_pid"] = self.gateway.pid
        give_up = start + self.args.restore_deadline
        while True:
            running = await self._listed_running()
            if running == n:
                break
            if time.perf_counter() > give_up:
                raise RuntimeError(f"after the restart only {running} of {n} kernels were running "
                                   f"within {self.args.restore_deadline:g} s")
            await asyncio.sleep(0.2)
        restart["all_listed_running_s"] = time.perf_counter() - start
        await self._connect_all()
        restart["all_served_s"] = time.perf_counter() - start
        fig["restart"] = restart
        _progress(f"[{self.store}] restart: /api after {restart['api_answers_s']:.1f} s, all {n} running after "
                  f"{restart['all_listed_running_s']:.1f} s, all served (kernel_info over WebSocket) after "
                  f"{restart['all_served_s']:.1f} s")

    async def _shutdown_all(self) -> None:
        await self._close_clients()
        n = len(self.kernels)
        _progress(f"[{self.store}] deleting {n} kernels, {self.args.delete_concurrency} at a time")
        start = time.perf_counter()
        kernels, self.kernels = self.kernels, []
        results = await bounded(kernels, self.args.delete_concurrency,
                                lambda k: self._api("DELETE", f"/api/kernels/{k}", (204, 404)))
        self.figures["shutdown_all_s"] = time.perf_counter() - start
        self._failures(results, "deletes")
        if self.farm is not None:
            self.figures["farm_kernels_left"] = (await self.farm.call("stats"))["kernels"]
        _progress(f"[{self.store}] all deleted in {self.figures['shutdown_all_s']:.1f} s")

    async def close(self) -> list[str]:
        """
        After an error: delete what is left, stop the gateway.
        """
        problems = []
        await self._close_clients()
        if self.kernels and self.gateway.process is not None:
            results = await bounded(self.kernels, 50,
                                    lambda k: self._api("DELETE", f"/api/kernels/{k}", (204, 404)))
            problems += [f"delete: {r!r}" for r in results if isinstance(r, BaseException)][:5]
        self.figures["gateway_final_stop"] = await asyncio.to_thread(self.gateway.stop)
        return problems


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/scale.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--launcher", choices=("farm", "local"), default="farm",
                        help="farm: simulated kernels in one process (default); local: real ipykernels")
    parser.add_argument("--kernels", type=int, default=1000, help="kernels held at once (default 1000)")
    parser.add_argument("--stores", default="sqlite,redis", help="stores to measure, in turn (sqlite, redis)")
    parser.add_argument("--clients", type=int, default=50, help="clients executing in a loop (default 50)")
    parser.add_argument("--load-seconds", type=float, default=30.0, help="length of the load phase")
    parser.add_argument("--quiet-seconds", type=float, default=10.0, help="length of the quiet probe phase")
    parser.add_argument("--probe-interval", type=float, default=0.02, help="pause between GET /api probes")
    parser.add_argument("--start-concurrency", type=int, default=0,
                        help="kernel starts at once (default 25 farm, 6 local)")
    parser.add_argument("--connect-concurrency", type=int, default=50)
    parser.add_argument("--delete-concurrency", type=int, default=50)
    parser.add_argument("--restore-deadline", type=float, default=300.0,
                        help="give up waiting for the restored kernels after this many seconds")
    parser.add_argument("--kernelspec", default="python3", help="kernelspec for --launcher local")
    parser.add_argument("--profile", default="", metavar="DIR",
                        help="run each gateway under cProfile (twistd --profiler cprofile), stats in DIR")
    parser.add_argument("--quick", action="store_true", help="20 kernels, 5 clients, short phases")
    parser.add_argument("--turn-budget", type=float, default=None, metavar="S",
                        help="the gateway's [ops] turn_budget (default: the gateway's own; 0: Twisted's own "
                             "turns), to compare reactor turns")
    parser.add_argument("--stall-warning", type=float, default=0.1, metavar="S",
                        help="the gateway's stall_warning: stalls of the reactor this long or longer are logged "
                             "with the reactor's stack and counted per phase (default 0.1 s)")
    parser.add_argument("--pin-gateway", action="store_true",
                        help="run the gateway (and the probe) on a CPU of its own, and the farm, the clients and "
                             "redis-server on the others, as when they run on other machines (farm only)")
    add_output_options(parser, "directory for configs, logs, the farm's socket and the stores",
                       "the gateway's launch_timeout (default 120 s)")
    args = parser.parse_args(argv)
    if args.profile:
        args.profile = os.path.abspath(args.profile)
        os.makedirs(args.profile, exist_ok=True)
    args.stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if not args.stores or set(args.stores) - {"sqlite", "redis"}:
        parser.error("--stores takes sqlite and/or redis")
    if args.quick:
        args.kernels, args.clients, args.load_seconds, args.quiet_seconds = 20, 5, 5.0, 2.0
    if not args.start_concurrency:
        args.start_concurrency = 25 if args.launcher == "farm" else 6
    if args.kernels < 1 or args.clients < 0:
        parser.error("--kernels must be at least 1")
    if args.pin_gateway and args.launcher != "farm":
        # Local kernels are the gateway's children: they would share its CPU.
        parser.error("--pin-gateway needs the farm launcher")
    if args.pin_gateway and len(os.sched_getaffinity(0)) < 2:
        parser.error("--pin-gateway needs at least two CPUs")
    args.selected = args.stores
    return args


def targets(store: dict[str, Any]) -> list[tuple[str, Any, str, bool | None]]:
    """
    Each target: (name, measured, target, met).
    """
    rows = []

    def add(name: str, value: Any, target: str, met: bool | None) -> None:
        rows.append((name, value, target, met))

    def rss_target(name: str, mib: float, target: str, digits: int = 1) -> None:
        # The targets are in MB; RSS is read in MiB.
        mb = mib * MIB / 1e6
        add(name, round(mb, digits), f"<= {TARGETS[target]:g}", mb <= TARGETS[target])

    connected = store.get("connected")
    if connected:
        rss_target("gateway RSS with all kernels connected (MB)", connected["rss_mib"], "rss_mb")
        rss_target("RSS per kernel above idle (MB)", store["rss_per_kernel_mib"], "rss_per_kernel_mb", 3)
    load = store.get("lag_load")
    if load and load["probe"]["p99_ms"] is not None:
        add("reactor lag under load, GET /api p99 (ms)", round(load["probe"]["p99_ms"], 1),
            f"<= {TARGETS['lag_p99_ms']:g}", load["probe"]["p99_ms"] <= TARGETS["lag_p99_ms"])
    if load and load.get("timer_lag"):
        add("reactor lag under load, 10 ms timer p99 (ms)", round(load["timer_lag"]["p99_ms"], 1),
            f"<= {TARGETS['lag_p99_ms']:g}", load["timer_lag"]["p99_ms"] <= TARGETS["lag_p99_ms"])
    restart = store.get("restart")
    if restart:
        add("restart to all kernels served (s)", round(restart["all_served_s"], 1), f"<= {TARGETS['restore_s']:g}",
            restart["all_served_s"] <= TARGETS["restore_s"])
    restored = store.get("restored")
    if restored:
        rss_target("gateway RSS after the restart, all served (MB)", restored["rss_mib"], "rss_mb")
    return rows


def _held(snapshot: dict[str, Any]) -> str:
    held = snapshot.get("journal_held_mib")
    return ", journals and iopub rings holding " + (f"{held:.1f} MiB" if held is not None else "(not scraped)")


def render(results: dict[str, Any]) -> str:
    lines = [f"NOTE: {results['meta']['kernels_are']}"]
    for store, fig in results["figures"].items():
        n = results["meta"]["kernels"]
        lines.append(f"\n== {store} store, {n} kernels, each with a WebSocket client ==")
        if "idle" in fig:
            lines.append(f"idle gateway: RSS {fig['idle']['rss_mib']:.1f} MiB, {fig['idle']['fds']} fds")
        if "connected" in fig:
            c = fig["connected"]
            lines.append(f"connected:    RSS {c['rss_mib']:.1f} MiB ({fig['rss_per_kernel_mib']:.3f} MiB/kernel), "
                         f"{c['fds']} fds ({fig['fds_per_kernel']:.1f}/kernel)")
            lines.append(f"start all: {fig['start_all_s']:.1f} s; connect all clients: {fig['connect_all_s']:.1f} s")
        if "started" in fig:
            lines.append(f"kernels up, no client: RSS {fig['started']['rss_mib']:.1f} MiB "
                         f"({fig['rss_per_kernel_without_client_mib']:.3f} MiB/kernel), {fig['started']['fds']} fds")
        for phase in ("lag_quiet", "lag_ticks", "lag_load"):
            if phase in fig:
                p = fig[phase]
                lines.append(
                    f"{phase}: GET /api p50 {_ms(p['probe']['p50_ms'])} p99 {_ms(p['probe']['p99_ms'])} "
                    f"max {_ms(p['probe']['max_ms'])} ({p['probe']['samples']} probes); reactor-lag metric p50 "
                    f"{p['metric_lag_p50']} p99 {p['metric_lag_p99']}; gateway CPU {p['gateway_cpu_percent']:.0f} %; "
                    f"iopub msgs/s per non-executing client {p['iopub_per_idle_client_per_s']:.2f}; "
                    f"machine load average {p['load_average']:.1f}"
                    + (f"; {p['executes_per_s']:.0f} executes/s by {p['clients']} clients" if "executes_per_s" in p
                       else "")
                )
                if p.get("timer_lag"):
                    t = p["timer_lag"]
                    lines.append(f"  reactor lag (a 10 ms timer in the gateway, {t['samples']} firings): p50 "
                                 f"{_ms(t['p50_ms'])} p99 {_ms(t['p99_ms'])} max {_ms(t['max_ms'])}")
                if p.get("gc"):
                    g = p["gc"]
                    lines.append(f"  gateway GC: {g['full_collections']} full collections, longest "
                                 f"{g['full_max_ms']:.0f} ms, {g['full_total_ms']:.0f} ms in all; "
                                 f"{g['young_over_5ms']} younger ones over 5 ms")
                if p.get("stalls"):
                    st = p["stalls"]
                    lines.append(f"  reactor stalls of {results['meta']['stall_warning']:g} s or more (the gateway's stall watch): "
                                 f"{st['count']}, longest {st['longest_s']:.2f} s, {st['waiting']} of them mostly "
                                 "waiting for a CPU")
        if "after_load" in fig:
            after = fig["after_load"]
            lines.append(f"after the load: RSS {after['rss_mib']:.1f} MiB" + _held(after))
        if "list" in fig:
            lst = fig["list"]
            lines.append(f"GET /api/kernels: median {lst['median_ms']:.0f} ms, max {lst['max_ms']:.0f} ms "
                         f"({lst['kernels']} kernels, {lst['bytes']} bytes)")
        if "restart" in fig:
            r = fig["restart"]
            lines.append(f"restart: stop {fig['stop_s']:.1f} s; /api answers {r['api_answers_s']:.1f} s, all running "
                         f"{r['all_listed_running_s']:.1f} s, all served {r['all_served_s']:.1f} s after start; "
                         f"RSS then {fig['restored']['rss_mib']:.1f} MiB" + _held(fig["restored"]))
        if "shutdown_all_s" in fig:
            lines.append(f"shutdown all (DELETE each): {fig['shutdown_all_s']:.1f} s")
        for name, value, target, met in targets(fig):
            lines.append(f"  {name}: {value}  target {target}  {'ok' if met else 'MISSED'}")
    return "\n".join(lines)


def bring_up(fixture: Any, attempts: int = 5) -> None:
    """
    C{fixture.up()}, again while test runs on the machine hold the fixtures'
    allocation lock (each attempt waits 30 s for it).
    """
    from tests.fixtures import FixtureError

    for attempt in range(attempts):
        try:
            fixture.up()
            return
        except FixtureError as e:
            if "allocation lock" not in str(e) or attempt == attempts - 1:
                raise
            _progress(f"waiting for the fixtures' allocation lock: {e}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    nofile = raise_nofile()
    workdir = work_directory(args, "egw-scale-bench-")
    meta = run_meta(args, workdir, {"kernels": args.kernels, "clients": args.clients})
    meta.update(kernels=args.kernels, launcher=args.launcher, nofile=nofile, stall_warning=args.stall_warning, turn_budget=args.turn_budget,
                kernels_are=SIMULATED_NOTE if args.launcher == "farm" else REAL_NOTE)
    results: dict[str, Any] = {"meta": meta, "figures": {}, "problems": [], "leaked_processes": []}
    if args.pin_gateway:
        cpus = sorted(os.sched_getaffinity(0))
        GATEWAY_CPUS.add(cpus[0])
        os.sched_setaffinity(0, set(cpus[1:]))  # this process and all it starts, until pinned
        meta["pinned"] = {"gateway_and_probe_cpus": cpus[:1], "other_cpus": cpus[1:]}
        print(f"NOTE: gateway and probe pinned to CPU {cpus[0]}; farm, clients and redis on {cpus[1:]}", flush=True)
    farm = FarmProcess(workdir) if args.launcher == "farm" else None
    redis: Any = None
    print(f"NOTE: {meta['kernels_are']}", flush=True)

    async def measure() -> None:
        from egateway.store.crypto import SecretBox

        extra_path: tuple[str, ...] = ()
        kernelspec_dir = ""
        if farm is not None:
            extra_path = (write_entry_point(workdir),)
            kernelspec_dir = write_farm_kernelspec(workdir, farm.socket)
        for store in args.stores:
            redis_url = redis.url if redis is not None else ""
            run = ScaleRun(args, store, os.path.join(workdir, store), results["figures"].setdefault(store, {}),
                           farm, redis_url, SecretBox.generate_key(), extra_path, kernelspec_dir)
            try:
                await run.run()
            finally:
                results["problems"].extend(await run.close())

    def work() -> None:
        nonlocal redis
        if farm is not None:
            _progress("starting the kernel farm")
            farm.start()
        if "redis" in args.stores:
            from tests.fixtures import RedisServer

            redis = RedisServer(tempfile.mkdtemp(prefix="egw-bench-", dir="/tmp"))
            meta["fixture_workdirs"] = [redis.workdir]
            _progress("starting redis-server")
            bring_up(redis)
        asyncio.run(measure())

    def cleanup(status: int) -> None:
        if farm is not None:
            meta["farm_stop"] = farm.stop()
        if redis is not None:
            try:
                redis.down()
            except Exception as e:
                results["problems"].append(f"redis: {e}")
            results["leaked_processes"] += [f"redis: {item}" for item in redis.leftovers()]
        for store in args.stores:
            results["leaked_processes"] += sweep(os.path.join(workdir, store))
        results["leaked_processes"] += [f"{pid} {cmd[:120]}" for pid, cmd in processes_mentioning([workdir])]
        if results["leaked_processes"]:
            results["problems"].append(f"{len(results['leaked_processes'])} process(es) left behind")
        end_of_run(args, results, workdir, [workdir])

    status = run_guarded(results, work, cleanup)
    checks = [f"{store}: {fig['farm_kernels_left']} kernels left in the farm after deleting all"
              for store, fig in results["figures"].items() if fig.get("farm_kernels_left")]
    for fig in results["figures"].values():
        fig["targets"] = [{"name": n, "value": v, "target": t, "met": m} for n, v, t, m in targets(fig)]
    heading = (f"egateway scale benchmark: {args.kernels} kernels ({args.launcher}), stores {', '.join(args.stores)}, "
               f"{os.cpu_count()} CPUs, RLIMIT_NOFILE {nofile}"
               + (f"; gateway and probe on CPU {sorted(GATEWAY_CPUS)[0]}, the rest on the others" if GATEWAY_CPUS
                  else ""))
    return finish(args, results, status, heading, render(results), checks)


if __name__ == "__main__":
    sys.exit(main())
