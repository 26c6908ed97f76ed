#!/usr/bin/env python
"""
Benchmark egateway's remote kernels: SSH hosts and Slurm jobs, in one run.

    python bench/remote.py [--quick] [--slurm] [--only start,roundtrip,slurm] [--json out.json]

Brings up two SSH hosts (network namespaces with their own sshd, the test
fixture C{tests.fixtures.SSHHosts}) and, with C{--slurm}, a two-node Slurm
cluster (C{tests.fixtures.SlurmCluster}); runs egateway in this process's
own Twisted reactor, so that a remote kernel's connection info can be read
from the kernel manager and jupyter_client pointed at the very kernel the
gateway serves; measures; and removes every kernel, the gateways, the hosts
and the cluster at the end, also after an error, Ctrl-C or SIGTERM.  See
C{bench/README.md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.channels import EXECUTE_CONTENT  # noqa: E402
from bench.figures import percentile  # noqa: E402
from bench.gateway import sweep  # noqa: E402
from bench.report import fmt, ratio, render, row  # noqa: E402
from bench.run import (  # noqa: E402
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    _versions,
    add_output_options,
    end_of_run,
    finish,
    work_directory,
)
from tests.support.daemon import _bounded, pid_alive  # noqa: E402
from tests.support.remote_kernels import launcher_argv, write_spec  # noqa: E402

FIGURES = ("start", "roundtrip", "slurm")
LOCAL_SPEC = "python3"
SSH_SPEC = "bench-ssh"
SLURM_SPEC = "bench-slurm"
ROUNDTRIP_TARGET = 1.1
MAX_BLOCK = 200


@dataclass(frozen=True)
class Sizes:
    """
    How much of everything to do; C{--quick} shrinks the starts, not the
    round trips (a p99 needs a few hundred samples).
    """

    starts: int = 10
    warmup: int = 100
    roundtrips: int = 1000
    block: int = 100
    slurm_starts: int = 10

    @classmethod
    def quick(cls) -> "Sizes":
        return cls(starts=2, warmup=50, roundtrips=500, slurm_starts=2)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/remote.py",
        description="Measure egateway's remote kernels (SSH hosts, Slurm) against local "
        "kernels and direct jupyter_client, in one run.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--slurm", action="store_true", help="also measure Slurm job submit to ready (the slurm figure)"
    )
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated figures to measure, from: {', '.join(FIGURES)} "
        "(default: start,roundtrip, plus slurm with --slurm)",
    )
    add_output_options(
        parser,
        workdir_help="directory for kernelspecs, the gateways' data and the kernels' logs",
        launch_timeout_help="the gateways' launch_timeout (default 120 s, as bench/run.py)",
    )
    parser.add_argument(
        "--slurm-poll-interval",
        type=float,
        default=None,
        help="the gateway's slurm_poll_interval, how often it asks squeue whether a kernel's "
        "job runs yet (default: the gateway's default)",
    )
    parser.add_argument(
        "--keep-gateway-iopub",
        action="store_true",
        help="let the gateway go on reading the kernel's iopub during the direct side's turns "
        "(it then relays every message of the direct requests in this process, slowing the "
        "direct side; by default it is paused meanwhile)",
    )
    sizes = parser.add_argument_group("sizes (defaults; --quick uses smaller ones)")
    for name, help_text in (
        ("starts", "measured kernel starts per kind (local, SSH), after one unmeasured each"),
        ("warmup", "warm-up executes per side before the round trips"),
        ("roundtrips", "measured round trips per side"),
        ("block", "round trips per turn; the sides take turns"),
        ("slurm-starts", "measured Slurm kernel starts, after one unmeasured"),
    ):
        sizes.add_argument(f"--{name}", type=int, help=help_text)
    args = parser.parse_args(argv)
    selected = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(selected) - set(FIGURES))
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
    if not selected:
        selected = ["start", "roundtrip"] + (["slurm"] if args.slurm else [])
    args.selected = [name for name in FIGURES if name in selected]
    base = Sizes.quick() if args.quick else Sizes()
    overrides = {f: getattr(args, f) for f in asdict(base) if getattr(args, f, None) is not None}
    args.sizes = replace(base, **overrides)
    for name, value in asdict(args.sizes).items():
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.sizes.block > MAX_BLOCK:
        parser.error(f"--block must be at most {MAX_BLOCK} (see --keep-gateway-iopub in bench/README.md)")
    return args


# -- pieces ---------------------------------------------------------------


async def _within(work: Any, seconds: float, what: str, reactor: Any) -> Any:
    """
    Await C{work} (a Deferred or coroutine) for at most C{seconds}; the
    L{TimeoutError} then says what was waited for.
    """
    from twisted.internet.defer import ensureDeferred

    try:
        return await _bounded(ensureDeferred(work), seconds, reactor)
    except TimeoutError as e:
        raise TimeoutError(f"{what}: {e}") from None


def _write_spec(directory: str, name: str, launcher: str, config: dict[str, Any]) -> None:
    """
    A kernelspec that starts egateway's kernel launcher through C{launcher}
    (the argv of C{tests/test_ssh.py} and C{tests/test_slurm.py}).
    """
    write_spec(directory, name, launcher_argv(), launcher, config=config, display_name=f"{name} (benchmark)")


def _phase_names(event: Any) -> list[str]:
    return [event.phase.value]


def _phase_offsets(kernel: Any, names: Callable[[Any], list[str]] = _phase_names) -> dict[str, float]:
    """
    Seconds from a launch's first phase to the first time it reached each
    later one (C{submitted}, C{placed}, C{connection info received}, ...),
    from the kernel manager's own record.

    @param names: what a phase event counts as (by default its phase's
        name; a launcher's benchmark may name the steps of its own
        C{submitted}, for example), the first time of each kept.
    """
    events = list(getattr(kernel, "phases", []))
    if not events:
        return {}
    start = events[0].at
    offsets: dict[str, float] = {}
    for event in events[1:]:
        for name in names(event):
            offsets.setdefault(name, event.at - start)
    return offsets


def _median_offsets(samples: list[dict[str, float]]) -> dict[str, float]:
    names: list[str] = []
    for sample in samples:
        names += [n for n in sample if n not in names]
    return {
        name: statistics.median(s[name] for s in samples if name in s)
        for name in names
    }


@dataclass
class Started:
    """
    A kernel that answered C{kernel_info} over the channels WebSocket:
    C{post_s} from the POST to its 201, C{ready_s} to that first reply.
    """

    kernel_id: str
    client: Any
    post_s: float
    ready_s: float
    host: str = ""
    phases: dict[str, float] = field(default_factory=dict)


class Gateway:
    """
    One egateway in this process's reactor (the tests'
    L{tests.support.gateway.InProcessGateway}), with bounded REST calls and
    channel clients that are closed with it.
    """

    def __init__(self, reactor: Any, workdir: str, launch_timeout: float, protocol: str, **settings: Any) -> None:
        from tests.support.gateway import InProcessGateway

        self.reactor = reactor
        self.token = secrets.token_hex(16)
        self.launch_timeout = launch_timeout
        self.v1 = protocol == "v1"
        self.clients: list[Any] = []
        self.inner = InProcessGateway(
            data_dir=os.path.join(workdir, "gateway-runtime"),
            auth_token=self.token,
            launch_timeout=launch_timeout,
            **settings,
        )
        self.started = False

    @property
    def manager(self) -> Any:
        return self.inner.manager

    async def start(self) -> None:
        self.started = True
        await _within(self.inner.start(), 60, "starting the gateway", self.reactor)

    async def request(self, method: str, path: str, body: Any, expect: tuple[int, ...], timeout: float) -> Any:
        code, reply = await _within(
            self.inner.request(method, path, body, self.token), timeout, f"{method} {path}", self.reactor
        )
        if code not in expect:
            detail = reply.get("message", reply) if isinstance(reply, dict) else reply
            raise RuntimeError(f"{method} {path} -> {code}: {detail}")
        return reply

    async def start_kernel(self, spec: str) -> Started:
        """
        C{POST /api/kernels} (it answers once the kernel is ready), then the
        channels WebSocket and one C{kernel_info} round trip: what a
        notebook server does before it shows a kernel as ready, and the
        figure C{bench/run.py} reports for local kernels.
        """
        from tests.support.wsclient import ChannelsClient

        begin = time.perf_counter()
        model = await self.request("POST", "api/kernels", {"name": spec}, (201,), self.launch_timeout + 30)
        posted = time.perf_counter()
        kernel_id = model["id"]
        client = await _within(
            ChannelsClient.connect(self.inner.url, kernel_id, v1=self.v1, token=self.token, timeout=30),
            35,
            f"the channels WebSocket of kernel {kernel_id}",
            self.reactor,
        )
        self.clients.append(client)
        msg_id = client.send("kernel_info_request", {})
        await client.wait_for(
            lambda m: (m.get("parent_header") or {}).get("msg_id") == msg_id
            and m["header"]["msg_type"] == "kernel_info_reply",
            timeout=30,
        )
        ready = time.perf_counter()
        kernel = self.manager.kernels.get(kernel_id)
        return Started(
            kernel_id,
            client,
            posted - begin,
            ready - begin,
            (model.get("placement") or {}).get("host", ""),
            _phase_offsets(kernel) if kernel is not None else {},
        )

    async def shutdown(self, started: Started) -> float:
        """
        Close the kernel's WebSocket and delete it; seconds the DELETE took.
        """
        await self.close_client(started.client)
        begin = time.perf_counter()
        await self.request("DELETE", f"api/kernels/{started.kernel_id}", None, (204, 404), 90)
        return time.perf_counter() - begin

    async def close_client(self, client: Any) -> None:
        if client in self.clients:
            self.clients.remove(client)
        await client.close()

    async def stop(self) -> None:
        """
        Close every client, then stop the gateway, which shuts every kernel
        it still has down.
        """
        for client in list(self.clients):
            try:
                await self.close_client(client)
            except Exception:
                pass
        if self.started:
            self.started = False
            await _within(self.inner.stop(), 90, "stopping the gateway", self.reactor)


def pause_iopub(reactor: Any, kernel: Any) -> Callable[[], None] | None:
    """
    Stop the gateway reading C{kernel}'s iopub for a while; a function
    that resumes it, or C{None} if this gateway's link has no subscriber
    to pause.

    The gateway stays subscribed, and the kernel's messages wait in ZMQ's
    queues (its default high-water mark, 1000 messages, holds the 4 or 5
    iopub messages of up to 200 executes: C{--block} is capped there).
    Read, every message of the direct side's requests would be relayed to
    the WebSocket client in this same thread (about as much CPU as the
    direct client's own work), competing with the direct client for the
    GIL and the cores, which a direct client in real life never does.
    """
    subscriber = getattr(getattr(kernel, "link", None), "_iopub", None)
    if subscriber is None or not callable(getattr(subscriber, "doRead", None)):
        return None
    reactor.removeReader(subscriber)
    scheduled = getattr(subscriber, "read_scheduled", None)
    if scheduled is not None and scheduled.active():
        scheduled.cancel()
        subscriber.read_scheduled = None

    def resume() -> None:
        reactor.addReader(subscriber)
        subscriber.doRead()

    return resume


class DirectClient:
    """
    jupyter_client's C{BlockingKernelClient} on a kernel the gateway
    serves, driven from one worker thread of its own (ZMQ sockets belong to
    one thread), so it never blocks the reactor.

    The timed loop reads the client's own channels (C{shell_channel} and
    C{iopub_channel}: poll, receive, C{Session.deserialize}) rather than
    C{get_shell_msg}/C{get_iopub_msg}, which run a fresh asyncio loop per
    message through C{run_sync}: that overhead is jupyter_client's
    convenience layer, not the cost of talking to the kernel, and would
    flatter the gateway.
    """

    def __init__(self, reactor: Any, connection_info: dict[str, Any]) -> None:
        from twisted.python.threadpool import ThreadPool

        self.reactor = reactor
        self.info = connection_info
        self.client: Any = None
        self.stopping = threading.Event()
        self.pool = ThreadPool(1, 1, "bench-direct")
        self.pool.start()

    def _call(self, f: Callable[..., Any], *args: Any) -> Any:
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self.reactor, self.pool, f, *args)

    async def connect(self, timeout: float) -> None:
        await self._call(self._connect_blocking, timeout)

    def _connect_blocking(self, timeout: float) -> None:
        from jupyter_client.blocking import BlockingKernelClient

        client = BlockingKernelClient()
        client.load_connection_info(self.info)
        client.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
        self.client = client
        client.wait_for_ready(timeout=timeout)

    async def executes(self, n: int, timeout: float = 30.0) -> tuple[list[float], float]:
        """
        C{n} executes of C{1+1}, one at a time; each one's milliseconds
        from request to both C{execute_reply} and iopub C{idle}, and the
        worker thread's CPU seconds.
        """
        return await self._call(self._executes_blocking, n, timeout)

    def _executes_blocking(self, n: int, timeout: float) -> tuple[list[float], float]:
        client = self.client
        shell, iopub = client.shell_channel, client.iopub_channel
        # The other side's turn left its iopub messages queued here; they
        # must not be charged to the first timed request.
        while iopub.msg_ready():
            iopub.get_msg(timeout=0)
        times = []
        cpu = time.thread_time()
        for _ in range(n):
            if self.stopping.is_set():
                raise RuntimeError("stopped")
            begin = time.perf_counter()
            msg_id = client.execute("1+1", **EXECUTE_CONTENT)
            reply = None
            while reply is None:
                msg = shell.get_msg(timeout=timeout)
                if msg["parent_header"].get("msg_id") == msg_id:
                    reply = msg
            idle = False
            while not idle:
                msg = iopub.get_msg(timeout=timeout)
                idle = (
                    msg["parent_header"].get("msg_id") == msg_id
                    and msg["header"]["msg_type"] == "status"
                    and msg["content"].get("execution_state") == "idle"
                )
            times.append((time.perf_counter() - begin) * 1000)
            if reply["content"].get("status") != "ok":
                raise RuntimeError(f"direct execute failed: {reply['content']}")
        return times, time.thread_time() - cpu

    def close(self) -> None:
        """
        Stop the worker (it finishes its current request; a blocked read
        gives up after its timeout) and close the sockets.
        """
        self.stopping.set()
        self.pool.stop()
        if self.client is not None:
            try:
                self.client.stop_channels()
            except Exception:
                pass
            self.client = None


# -- the run ----------------------------------------------------------------


class RemoteBenchmark:
    """
    One run: the fixtures and gateways it brought up, and the results so far.
    """

    def __init__(self, args: argparse.Namespace, results: dict[str, Any], workdir: str, reactor: Any) -> None:
        self.args = args
        self.sizes: Sizes = args.sizes
        self.results = results
        self.figures: dict[str, Any] = results["figures"]
        self.workdir = workdir
        self.reactor = reactor
        self.main: Any = None
        self.interrupted = False
        self.fixtures: list[tuple[str, Any]] = []

    def progress(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def interrupt(self) -> None:
        """
        Ctrl-C or SIGTERM: the first cancels the measurement, whose cleanup
        then runs; later ones only say that it does.
        """
        if self.interrupted or self.main is None:
            print("cleaning up kernels, gateways, hosts and cluster; please wait", file=sys.stderr, flush=True)
            return
        self.interrupted = True
        print("interrupted: cleaning up; please wait", file=sys.stderr, flush=True)
        self.main.cancel()

    async def run(self) -> None:
        selected = self.args.selected
        if "start" in selected or "roundtrip" in selected:
            await self._ssh_phase()
        if "slurm" in selected:
            await self._slurm_phase()

    # -- SSH ---------------------------------------------------------------

    async def _ssh_phase(self) -> None:
        from tests.fixtures import SSHHosts

        specs = os.path.join(self.workdir, "kernelspecs-ssh")
        logs = os.path.join(self.workdir, "kernel-logs")
        os.makedirs(logs, exist_ok=True)
        hosts = SSHHosts(self._fixture_dir(), ("h1", "h2"))
        gateway: Gateway | None = None
        try:
            self.progress("SSH hosts: starting two sshd hosts in network namespaces")
            self.fixtures.append(("SSH hosts", hosts))
            hosts.up()
            self.results["meta"]["ssh_hosts"] = {h.name: h.ip for h in hosts.hosts}
            _write_spec(specs, SSH_SPEC, "ssh", {"remote_hosts": ",".join(h.ip for h in hosts.hosts)})
            gateway = Gateway(
                self.reactor,
                self.workdir,
                self.args.launch_timeout,
                self.args.protocol,
                kernelspec_path=specs,
                response_ip=hosts.bridge_ip,
                ssh_key_files=hosts.client_key_path,
                ssh_known_hosts=hosts.known_hosts_path,
                remote_user=hosts.user,
                kernel_log_dir=logs,
                poll_interval=1,
            )
            await gateway.start()
            if "start" in self.args.selected:
                await self._starts(gateway)
            if "roundtrip" in self.args.selected:
                await self._roundtrips(gateway)
        finally:
            if gateway is not None:
                await self._stop_gateway(gateway, "SSH")
            if hosts.hosts:

                def on_hosts() -> list[str]:
                    return [
                        f"{host.name}: {_describe(pid)}"
                        for host in hosts.hosts
                        for pid in hosts.pids(host.name)
                        if pid_alive(pid)
                    ]

                left = await self._settle(on_hosts, 15)
                if left:
                    self.results["problems"].append(f"kernel processes left on the SSH hosts: {left}")
            self._down(hosts, "SSH hosts")

    async def _starts(self, gateway: Gateway) -> None:
        """
        Local and SSH kernel starts, taking turns so that a change in
        background load hits both alike; one unmeasured start of each
        first (imports, page cache, the first SSH connection to each host).
        """
        n = self.sizes.starts
        self.progress(f"kernel starts: 1 + {n} local and 1 + {n} on the SSH hosts, taking turns")
        kinds = {"local": LOCAL_SPEC, "ssh": SSH_SPEC}
        samples: dict[str, list[Started]] = {kind: [] for kind in kinds}
        shutdowns: dict[str, list[float]] = {kind: [] for kind in kinds}
        # Two unmeasured SSH starts: round-robin sends the first two kernels
        # to different hosts, and each host's first start pays for its
        # connection and a cold page cache there.
        for spec in (LOCAL_SPEC, SSH_SPEC, SSH_SPEC):
            await gateway.shutdown(await gateway.start_kernel(spec))
        for _ in range(n):
            for kind, spec in kinds.items():
                started = await gateway.start_kernel(spec)
                shutdowns[kind].append(await gateway.shutdown(started))
                samples[kind].append(started)
        figure = {}
        for kind, items in samples.items():
            ready = [s.ready_s for s in items]
            figure[kind] = {
                "median_s": statistics.median(ready),
                "min_s": min(ready),
                "max_s": max(ready),
                "samples_s": ready,
                "post_median_s": statistics.median(s.post_s for s in items),
                "phases_median_s": _median_offsets([s.phases for s in items]),
                "hosts": sorted({s.host for s in items}),
                "shutdown_median_s": statistics.median(shutdowns[kind]),
                "n": n,
            }
        figure["ratio"] = ratio(figure["ssh"]["median_s"], figure["local"]["median_s"])
        self.figures["start"] = figure

    async def _roundtrips(self, gateway: Gateway) -> None:
        """
        C{1+1} on one SSH kernel: through the gateway's WebSocket (in this
        reactor) and with jupyter_client straight to the kernel's sockets
        (in a worker thread), in blocks that take turns, never at once.
        The reactor thread's CPU time is recorded for both turns: during the
        direct side's it is the gateway relaying the kernel's iopub
        messages, which competes with the direct client for the GIL.
        """
        sizes = self.sizes
        self.progress(f"round trips on an SSH kernel: {sizes.warmup} warm-up + {sizes.roundtrips} per side")
        started = await gateway.start_kernel(SSH_SPEC)
        kernel = gateway.manager.kernels[started.kernel_id]
        info = kernel.process.connection_info
        self.results["meta"]["roundtrip_kernel"] = {
            "host": started.host,
            "ip": info.ip,
            "curve_encrypted": info.curve_publickey is not None,
        }
        direct = DirectClient(self.reactor, info.to_dict())
        try:
            await direct.connect(timeout=60)
            client = started.client
            gateway_ms: list[float] = []
            direct_ms: list[float] = []
            cpu = {"gateway_turns_reactor_s": 0.0, "direct_turns_reactor_s": 0.0, "direct_worker_s": 0.0}
            for _ in range(sizes.warmup):
                await self._gateway_execute(client)
            await direct.executes(sizes.warmup)
            while len(gateway_ms) < sizes.roundtrips or len(direct_ms) < sizes.roundtrips:
                count = min(sizes.block, sizes.roundtrips - len(gateway_ms))
                reactor_cpu = time.thread_time()
                for _ in range(count):
                    begin = time.perf_counter()
                    await self._gateway_execute(client)
                    gateway_ms.append((time.perf_counter() - begin) * 1000)
                cpu["gateway_turns_reactor_s"] += time.thread_time() - reactor_cpu
                count = min(sizes.block, sizes.roundtrips - len(direct_ms))
                resume = None if self.args.keep_gateway_iopub else pause_iopub(self.reactor, kernel)
                try:
                    reactor_cpu = time.thread_time()
                    times, worker_cpu = await direct.executes(count)
                    cpu["direct_turns_reactor_s"] += time.thread_time() - reactor_cpu
                    cpu["direct_worker_s"] += worker_cpu
                    direct_ms += times
                finally:
                    if resume is not None:
                        resume()
                if resume is not None:
                    # What the gateway kept queued reaches the WebSocket
                    # client now, before this request's reply and idle.
                    await self._gateway_execute(client)
            self.results["meta"]["gateway_iopub_in_direct_turns"] = (
                "read (--keep-gateway-iopub)" if self.args.keep_gateway_iopub
                else "paused" if resume is not None else "read (could not pause it)"
            )
        finally:
            direct.close()
        await gateway.shutdown(started)
        n = sizes.roundtrips
        figure: dict[str, Any] = {}
        for side, ms, cpu_note in (
            ("gateway", gateway_ms, {"reactor_cpu_us_per_execute": cpu["gateway_turns_reactor_s"] * 1e6 / n}),
            (
                "direct",
                direct_ms,
                {
                    "worker_cpu_us_per_execute": cpu["direct_worker_s"] * 1e6 / n,
                    "reactor_cpu_us_per_execute": cpu["direct_turns_reactor_s"] * 1e6 / n,
                },
            ),
        ):
            figure[side] = {
                "p50_ms": percentile(ms, 0.50),
                "p90_ms": percentile(ms, 0.90),
                "p99_ms": percentile(ms, 0.99),
                "mean_ms": statistics.fmean(ms),
                "max_ms": max(ms),
                "n": n,
                "warmup": sizes.warmup,
                **cpu_note,
            }
        figure["ratio"] = ratio(figure["gateway"]["p50_ms"], figure["direct"]["p50_ms"])
        figure["ratio_p99"] = ratio(figure["gateway"]["p99_ms"], figure["direct"]["p99_ms"])
        figure["target"] = f"<= {ROUNDTRIP_TARGET:g}x"
        figure["met"] = None if figure["ratio"] is None else figure["ratio"] <= ROUNDTRIP_TARGET
        self.figures["roundtrip"] = figure

    async def _gateway_execute(self, client: Any) -> None:
        result = await client.execute("1+1", timeout=30)
        if result["reply"].get("status") != "ok":
            raise RuntimeError(f"execute through the gateway failed: {result['reply']}")

    # -- Slurm -------------------------------------------------------------

    async def _slurm_phase(self) -> None:
        from tests.fixtures import SlurmCluster

        specs = os.path.join(self.workdir, "kernelspecs-slurm")
        logs = os.path.join(self.workdir, "slurm-logs")
        os.makedirs(logs, exist_ok=True)
        cluster = SlurmCluster(self._fixture_dir(), nodes=2, cpus=2)
        gateway: Gateway | None = None
        try:
            self.progress("Slurm: starting slurmctld and two slurmd nodes")
            self.fixtures.append(("Slurm cluster", cluster))
            cluster.up()
            self.results["meta"]["slurm_nodes"] = {n.name: n.ip for n in cluster.nodes}
            _write_spec(specs, SLURM_SPEC, "slurm", {"cpus": 1})
            settings: dict[str, Any] = {
                "kernelspec_path": specs,
                "response_ip": cluster.controller_ip,
                "slurm_conf": cluster.conf_path,
                "slurm_log_dir": logs,
                "poll_interval": 1,
            }
            if self.args.slurm_poll_interval is not None:
                settings["slurm_poll_interval"] = self.args.slurm_poll_interval
            gateway = Gateway(self.reactor, self.workdir, self.args.launch_timeout, self.args.protocol, **settings)
            self.results["meta"]["slurm_poll_interval"] = gateway.inner.config.slurm.slurm_poll_interval
            await gateway.start()
            await self._slurm_starts(gateway)
        finally:
            if gateway is not None:
                await self._stop_gateway(gateway, "Slurm")
            if cluster.nodes:

                def kernel_jobs() -> list[str]:
                    out = cluster.run(["squeue", "-h", "-o", "%A %j %T"], timeout=10).stdout
                    return [line for line in out.splitlines() if " egateway-" in line]

                try:
                    # A cancelled job stays COMPLETING until its processes are gone.
                    left = await self._settle(kernel_jobs, 20)
                    if left:
                        self.results["problems"].append(f"kernel jobs left on Slurm: {left}")
                except Exception as e:
                    self.results["problems"].append(f"could not list Slurm jobs: {e}")
            self._down(cluster, "Slurm cluster")

    async def _slurm_starts(self, gateway: Gateway) -> None:
        n = self.sizes.slurm_starts
        self.progress(f"Slurm kernel starts: 1 + {n}, one at a time")
        await gateway.shutdown(await gateway.start_kernel(SLURM_SPEC))
        samples: list[Started] = []
        shutdowns: list[float] = []
        for _ in range(n):
            started = await gateway.start_kernel(SLURM_SPEC)
            shutdowns.append(await gateway.shutdown(started))
            samples.append(started)
        ready = [s.ready_s for s in samples]
        self.figures["slurm"] = {
            "gateway": {
                "median_s": statistics.median(ready),
                "min_s": min(ready),
                "max_s": max(ready),
                "samples_s": ready,
                "post_median_s": statistics.median(s.post_s for s in samples),
                "post_samples_s": [s.post_s for s in samples],
                "phases_median_s": _median_offsets([s.phases for s in samples]),
                "nodes": sorted({s.host for s in samples}),
                "shutdown_median_s": statistics.median(shutdowns),
                "n": n,
            }
        }

    # -- cleanup -----------------------------------------------------------

    async def _stop_gateway(self, gateway: Gateway, name: str) -> None:
        try:
            await gateway.stop()
        except BaseException as e:
            self.results["problems"].append(f"stopping the {name} gateway: {type(e).__name__}: {e}")

    def _fixture_dir(self) -> str:
        """
        A fixture's own work directory: short (its unix sockets live below
        it) and outside ours, because its C{down()} removes it whole.
        """
        path = tempfile.mkdtemp(prefix="egw-bench-", dir="/tmp")
        self.results["meta"].setdefault("fixture_workdirs", []).append(path)
        return path

    async def _settle(self, left: Callable[[], list[str]], timeout: float) -> list[str]:
        """
        Poll C{left} until it is empty or C{timeout} has passed (a kernel
        that was told to shut down takes a moment to exit); what is left.
        """
        from twisted.internet.task import deferLater

        deadline = time.monotonic() + timeout
        while True:
            found = left()
            if not found or time.monotonic() > deadline:
                return found
            await deferLater(self.reactor, 0.2, lambda: None)

    def _down(self, fixture: Any, name: str) -> None:
        """
        Take a fixture down (blocking: nothing else runs by then) and record
        whatever of it is left.
        """
        if (name, fixture) not in self.fixtures:
            return
        self.fixtures.remove((name, fixture))
        try:
            fixture.down()
        except Exception as e:
            self.results["problems"].append(f"{name}: {e}")
        left = fixture.leftovers()
        if left:
            self.results["leaked_processes"] += [f"{name}: {item}" for item in left]


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"{pid} " + f.read().replace(b"\0", b" ").decode("utf-8", "replace")[:160]
    except OSError:
        return str(pid)


# -- report -------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    figures = results["figures"]
    sizes = results["meta"]["sizes"]
    rows: list[tuple[str, ...]] = [("figure", "remote", "local / direct", "ratio", "target")]
    start = figures.get("start")
    if start:
        ssh, local = start["ssh"], start["local"]
        rows.append(row(f"kernel start -> first kernel_info_reply, median of {sizes['starts']} "
                        "(SSH host / local)", fmt(ssh["median_s"], "s"), fmt(local["median_s"], "s"),
                        start["ratio"], "", None))
        rows.append(row("kernel start -> 201 (SSH host / local)", fmt(ssh["post_median_s"], "s"),
                        fmt(local["post_median_s"], "s"),
                        ratio(ssh["post_median_s"], local["post_median_s"]), "", None))
    rt = figures.get("roundtrip")
    if rt:
        g, d = rt["gateway"], rt["direct"]
        rows.append(row(f"execute '1+1' on an SSH kernel, p50 of {g['n']} (gateway / direct)",
                        fmt(g["p50_ms"], "ms"), fmt(d["p50_ms"], "ms"), rt["ratio"], rt["target"], rt["met"]))
        rows.append(row("execute '1+1' on an SSH kernel, p99 (gateway / direct)",
                        fmt(g["p99_ms"], "ms"), fmt(d["p99_ms"], "ms"), rt["ratio_p99"], "", None))
    slurm = (figures.get("slurm") or {}).get("gateway")
    if slurm:
        rows.append(row(f"Slurm job: POST -> 201, median of {slurm['n']}", fmt(slurm["post_median_s"], "s"),
                        "", None, "", None))
        rows.append(row("Slurm job: POST -> first kernel_info_reply", fmt(slurm["median_s"], "s"),
                        "", None, "", None))
        phases = slurm["phases_median_s"]
        if "submitted" in phases and "ready" in phases:
            rows.append(row("Slurm job: sbatch done -> kernel ready (gateway's phases)",
                            fmt(phases["ready"] - phases["submitted"], "s"), "", None, "", None))
    text = render(rows, results.get("skipped", {})) if len(rows) > 1 else "(no figure measured)"
    if rt:
        iopub = results["meta"].get("gateway_iopub_in_direct_turns", "")
        text += (
            f"\nCPU per execute: {rt['gateway']['reactor_cpu_us_per_execute']:.0f} us in the reactor thread in the "
            f"gateway's turns (gateway and WebSocket client); in the direct turns "
            f"{rt['direct']['worker_cpu_us_per_execute']:.0f} us in the direct client's thread and "
            f"{rt['direct']['reactor_cpu_us_per_execute']:.0f} us in the reactor thread (gateway's iopub {iopub})"
        )
    if slurm:
        phases = ", ".join(f"{name} {value:.2f} s" for name, value in slurm["phases_median_s"].items())
        text += f"\nSlurm launch phases after the POST (medians): {phases}; nodes used: {', '.join(slurm['nodes'])}"
    if start:
        phases = ", ".join(f"{name} {value:.2f} s" for name, value in start["ssh"]["phases_median_s"].items())
        text += f"\nSSH launch phases after the POST (medians): {phases}"
    return text


# -- main ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    workdir = work_directory(args, "egw-remote-bench-")
    results: dict[str, Any] = {
        "meta": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "quick": args.quick,
            "protocol": args.protocol,
            "gateway": "in-process (this script's Twisted reactor)",
            "launch_timeout": args.launch_timeout,
            "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
            "sizes": asdict(args.sizes),
            "selected": args.selected,
            "versions": _versions(),
            "platform": platform.platform(),
            "workdir": workdir,
        },
        "figures": {},
        "skipped": {},
        "problems": [],
        "leaked_processes": [],
    }
    from twisted.internet import reactor
    from twisted.internet.defer import CancelledError, Deferred

    bench = RemoteBenchmark(args, results, workdir, reactor)
    outcome: dict[str, Any] = {}

    def begin() -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: reactor.callFromThread(bench.interrupt))
        bench.main = Deferred.fromCoroutine(bench.run())

        def finished(result: Any) -> None:
            outcome["result"] = result
            reactor.stop()

        bench.main.addBoth(finished)

    reactor.callWhenRunning(begin)
    reactor.run()
    for name, fixture in list(bench.fixtures):
        # The reactor stopped under the measurement (the gateway's fatal
        # error handler stops it), so its cleanup never ran.
        bench._down(fixture, name)
    status = 0
    failure = outcome.get("result")
    if bench.interrupted or (failure is not None and getattr(failure, "check", None) and failure.check(CancelledError)):
        results["error"] = "interrupted"
        status = EXIT_INTERRUPTED
    elif failure is not None and hasattr(failure, "getTraceback"):
        results["error"] = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        print(failure.getTraceback(), file=sys.stderr)
        status = EXIT_ERROR
    elif "result" not in outcome:
        results["error"] = "the reactor stopped before the measurement finished"
        status = EXIT_ERROR
    leaked = sweep(workdir)
    results["leaked_processes"] += leaked
    if results["leaked_processes"]:
        results["problems"].append(f"{len(results['leaked_processes'])} process(es) or resources left behind")
    end_of_run(args, results, workdir, [workdir])
    heading = (
        f"egateway remote-kernel benchmark: protocol {args.protocol}, {os.cpu_count()} CPUs"
        f"{', quick' if args.quick else ''}"
    )
    return finish(args, results, status, heading, table(results), list(results["problems"]))


if __name__ == "__main__":
    sys.exit(main())
