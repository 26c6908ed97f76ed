#!/usr/bin/env python
"""
Benchmark egateway against jupyter_client talking to kernels directly.

    python bench/run.py [--quick] [--only start,roundtrip,...] [--json out.json]

Starts C{twistd -n egateway} on a free loopback port with a private config
(or uses C{--gateway-url}), measures every figure through the gateway and
then directly, one side after the other, prints each figure with the ratio
gateway / direct, and removes every kernel and the gateway at the end, also
after an error, Ctrl-C or SIGTERM.  See C{bench/README.md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, replace
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import allocator  # noqa: E402
from bench import figures as fig  # noqa: E402
from bench import httpclient  # noqa: E402
from bench.gateway import GatewayProcess, owned_markers, processes_mentioning, sweep  # noqa: E402
from bench.report import summarise, table  # noqa: E402
from bench.sides import DirectSide, GatewaySide  # noqa: E402

FIGURES = ("start", "roundtrip", "pipelined", "stream", "concurrent", "rss")
EXIT_ERROR = 1
EXIT_CHECK_FAILED = 3
EXIT_INTERRUPTED = 130

NO_CONNECTION_ENDPOINT = (
    "egateway exposes no kernel connection info (GET /api/kernels/{id} gives placement "
    "host/ip/pid only, no ports or key), so jupyter_client cannot be pointed at the "
    "gateway's kernel; direct side skipped"
)


def add_output_options(parser: argparse.ArgumentParser, workdir_help: str, launch_timeout_help: str) -> None:
    """
    The options every benchmark script has: the WebSocket protocol, a JSON
    copy of the results, the work directory and the gateways' launch
    timeout.
    """
    parser.add_argument(
        "--protocol",
        choices=("legacy", "v1"),
        default="legacy",
        help="WebSocket protocol: legacy JSON (default) or v1 (v1.kernel.websocket.jupyter.org)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--workdir", help=f"{workdir_help} (default: a temporary directory, removed afterwards)"
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temporary directory")
    parser.add_argument("--launch-timeout", type=float, default=120.0, help=launch_timeout_help)


def add_figure_options(parser: argparse.ArgumentParser, figures: tuple[str, ...]) -> None:
    """
    What to measure: C{--quick}, C{--only} (read by L{parse_figure_args})
    and C{--kernelspec}.
    """
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated figures to measure, from: {', '.join(figures)} (default: all)",
    )
    parser.add_argument("--kernelspec", default="python3", help="kernelspec to start (default python3)")


def add_size_options(parser: argparse.ArgumentParser, *sizes: tuple[str, str]) -> None:
    """
    One integer option per C{(name, help)}, overriding a field of the
    script's sizes (see L{chosen_sizes}).
    """
    group = parser.add_argument_group("sizes (defaults; --quick uses smaller ones)")
    for name, help_text in sizes:
        group.add_argument(f"--{name}", type=int, help=help_text)


def chosen_sizes(args: argparse.Namespace, base: Any) -> Any:
    """
    C{base} (a frozen dataclass of sizes) with the size options given.
    """
    overrides = {name: getattr(args, name) for name in asdict(base) if getattr(args, name, None) is not None}
    return replace(base, **overrides)


def selected_figures(parser: argparse.ArgumentParser, only: str, figures: tuple[str, ...]) -> list[str]:
    """
    The figures C{--only} names, in C{figures}' order (none: an empty
    list); a name not in C{figures} is a usage error.
    """
    selected = {name.strip() for name in only.split(",") if name.strip()}
    unknown = sorted(selected - set(figures))
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(figures)}")
    return [name for name in figures if name in selected]


def parse_figure_args(
    parser: argparse.ArgumentParser, argv: list[str], figures: tuple[str, ...]
) -> argparse.Namespace:
    """
    Parse C{argv}, adding C{selected} (the figures C{--only} names, all by
    default) and C{sizes} (L{fig.Sizes}, C{--quick}'s or the defaults, with
    the size options given).
    """
    args = parser.parse_args(argv)
    args.selected = selected_figures(parser, args.only, figures) or list(figures)
    args.sizes = chosen_sizes(args, fig.Sizes.quick() if args.quick else fig.Sizes())
    return args


def work_directory(args: argparse.Namespace, prefix: str) -> str:
    """
    The run's work directory: C{--workdir}, or a new temporary one.
    """
    workdir = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix=prefix)
    os.makedirs(workdir, exist_ok=True)
    return workdir


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Measure egateway against direct jupyter_client, in one run.",
    )
    add_figure_options(parser, FIGURES)
    parser.add_argument(
        "--direct-connection-from-gateway",
        action="store_true",
        help="measure the direct side on the gateway's own kernel, from connection info "
        "the gateway exposes (egateway has no such endpoint yet: the direct side is skipped)",
    )
    parser.add_argument(
        "--gateway-url",
        default="",
        help="measure an already running gateway at this URL instead of starting one "
        "(the RSS figure is then skipped)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("EG_AUTH_TOKEN", ""),
        help="auth token for --gateway-url (default: $EG_AUTH_TOKEN)",
    )
    parser.add_argument(
        "--curve",
        choices=("on", "off"),
        default="on",
        help="CurveZMQ on the kernel channels of both sides (default on: the gateway's kernel_encryption "
        "auto, jupyter_client's transport_encryption auto; off: off and disabled)",
    )
    parser.add_argument(
        "--malloc",
        choices=allocator.CHOICES,
        default="default",
        help="how both clients (this process) and both sides' kernels take memory from glibc: default, or "
        "keep what they free (no trimming, no fresh mapping per 20 MB block), so that a large-output "
        "figure does not hinge on where each process's peak falls against glibc's thresholds; the "
        "gateway is never changed (see bench/allocator.py)",
    )
    parser.add_argument(
        "--profile-gateway",
        metavar="PATH",
        help="run the private gateway under cProfile (twistd --profile) and write its stats to PATH "
        "(slows the gateway: for finding where its time goes, not for figures)",
    )
    add_output_options(
        parser,
        workdir_help="directory for the private config, logs and connection files",
        launch_timeout_help="launch_timeout of the private gateway, and how long the direct side waits "
        "for a kernel (default 120 s: 50 kernels starting at once on 2 cores can take "
        "longer than the gateway's 30 s default)",
    )
    add_size_options(
        parser,
        ("starts", "kernel starts for the start figure"),
        ("warmup", "warm-up executes before the round trips"),
        ("roundtrips", "measured round trips"),
        ("pipelined", "pipelined executes"),
        ("stream-chunks", "10 kB chunks per stream case"),
        ("repeats", "repetitions of the pipelined burst and of each stream case (median reported)"),
        ("concurrent", "kernels started at once"),
        ("concurrent-rounds", "storms per side, alternating A B B A"),
    )
    args = parse_figure_args(parser, argv, FIGURES)
    if args.gateway_url and not args.gateway_url.startswith(("http://", "https://")):
        parser.error("--gateway-url must start with http:// or https://")
    if args.gateway_url and args.malloc == "keep":
        parser.error("--malloc keep needs the private gateway: another gateway cannot see the kernelspec copy")
    return args


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("jupyter_client", "ipykernel", "pyzmq", "websockets", "twisted", "autobahn"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def _mib(kib: int | None) -> float | None:
    return None if kib is None else kib / 1024


class Benchmark:
    """
    One run: the sides, the figures selected, and the results so far.
    """

    def __init__(self, args: argparse.Namespace, results: dict[str, Any], gateway: GatewayProcess | None) -> None:
        self.args = args
        self.sizes: fig.Sizes = args.sizes
        self.results = results
        self.figures: dict[str, dict[str, Any]] = results["figures"]
        self.gateway = gateway

    def _put(self, figure: str, side: str, value: dict[str, Any]) -> None:
        self.figures.setdefault(figure, {})[side] = value

    async def _timed(self, figures: list[str], work: Any, per: dict[str, tuple[float, str]] | None = None) -> Any:
        """
        Await C{work}, charging the gateway process's CPU time meanwhile to
        C{figures} (the direct side's turns leave the gateway idle).
        """
        before = self.gateway.cpu_seconds() if self.gateway is not None else None
        result = await work
        after = self.gateway.cpu_seconds() if self.gateway is not None else None
        if before is not None and after is not None:
            for name in figures:
                entry = self.figures.setdefault(name, {})
                entry["gateway_cpu_s"] = after - before
                if per and name in per:
                    amount, unit = per[name]
                    entry[f"gateway_cpu_ms_per_{unit}"] = (after - before) * 1000 / amount
        return result

    def _progress(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        args = self.args
        url = args.gateway_url or self.gateway.url  # type: ignore[union-attr]
        token = args.token if args.gateway_url else self.gateway.token  # type: ignore[union-attr]
        about = await httpclient.expect("GET", url.rstrip("/") + "/api", 200, token=token, timeout=30)
        self.results["meta"]["gateway_version"] = about.json().get("gateway_version")
        gateway_side = GatewaySide(url, token, args.kernelspec, args.protocol, args.launch_timeout)
        sides: list[Any] = [gateway_side]
        if args.direct_connection_from_gateway:
            self.results["skipped"]["direct"] = NO_CONNECTION_ENDPOINT
        else:
            sides.append(
                DirectSide(
                    args.kernelspec, self.results["meta"]["workdir"], args.launch_timeout, args.curve == "on"
                )
            )
        try:
            await self._measure(sides)
        finally:
            for side in sides:
                self.results["problems"].extend(await side.close())
            loop.remove_signal_handler(signal.SIGTERM)

    async def _measure(self, sides: list[Any]) -> None:
        """
        The storms come before the per-kernel figures: the gateway's RSS
        never shrinks back (the allocator keeps freed memory), so measured
        after 20 MB streams it would show their high-water mark, not the
        cost of 50 kernels.
        """
        selected, sizes = self.args.selected, self.sizes
        if "start" in selected:
            self._progress(f"kernel starts: 1 + {sizes.starts} per side, taking turns")
            starts = fig.kernel_start(sides, sizes.starts)
            for name, value in (await self._timed(["start"], starts)).items():
                self._put("start", name, value)
        if "concurrent" in selected or ("rss" in selected and self.gateway is not None):
            storm_sides = sides if "concurrent" in selected else sides[:1]
            rounds = sizes.concurrent_rounds if "concurrent" in selected else 1
            work = fig.concurrent_starts(
                storm_sides, sizes.concurrent, rounds, self._rss_with_kernels, self._progress
            )
            result = await self._timed(["concurrent"], work, {"concurrent": (rounds * sizes.concurrent, "kernel")})
            if "concurrent" in selected:
                for name, value in result.items():
                    self._put("concurrent", name, value)
        per_kernel = [f for f in ("roundtrip", "pipelined", "stream") if f in selected]
        if per_kernel:
            kernels = {}
            try:
                for side in sides:
                    kernels[side.name] = await side.start_kernel()
                await self._on_kernels(kernels, per_kernel)
            finally:
                for side in sides:
                    if side.name in kernels:
                        await side.shutdown(kernels[side.name])
        if "rss" in selected and self.gateway is not None:
            rss = self.figures.setdefault("rss", {}).setdefault("gateway", {})
            rss["idle_after_mib"] = _mib(self.gateway.rss_kib())

    async def _on_kernels(self, kernels: dict[str, Any], per_kernel: list[str]) -> None:
        sizes = self.sizes
        if "roundtrip" in per_kernel:
            self._progress(f"round trips: {sizes.warmup} warm-up + {sizes.roundtrips} per side")
            work = fig.roundtrip(kernels, sizes.warmup, sizes.roundtrips)
            per = {"roundtrip": (sizes.warmup + sizes.roundtrips, "execute")}
            for name, value in (await self._timed(["roundtrip"], work, per)).items():
                self._put("roundtrip", name, value)
        else:
            for kernel in kernels.values():
                for _ in range(sizes.warmup):
                    await kernel.channels.execute("1+1")
        if "pipelined" in per_kernel:
            self._progress(f"pipelined: {sizes.repeats} x {sizes.pipelined} executes per side")
            work = fig.pipelined(kernels, sizes.pipelined, sizes.repeats)
            per = {"pipelined": (sizes.pipelined * sizes.repeats, "execute")}
            for name, value in (await self._timed(["pipelined"], work, per)).items():
                self._put("pipelined", name, value)
        if "stream" in per_kernel:
            await fig.stream_setup(kernels, sizes.stream_chunks)
            for case in fig.STREAM_CASES:
                self._progress(f"{case}: {sizes.repeats} runs per side")
                work = fig.stream(kernels, case, sizes.stream_chunks, sizes.repeats)
                per = {case: (sizes.stream_chunks * fig.CHUNK * sizes.repeats / 1e6, "mb")}
                for name, value in (await self._timed([case], work, per)).items():
                    self._put(case, name, value)

    def _rss_with_kernels(self, side_name: str) -> None:
        """
        With every kernel of a storm up: the gateway's RSS, the highest seen.
        """
        if side_name != "gateway" or self.gateway is None or "rss" not in self.args.selected:
            return
        rss = self.figures.setdefault("rss", {}).setdefault("gateway", {})
        now = _mib(self.gateway.rss_kib())
        if now is not None and now > (rss.get("with_kernels_mib") or 0):
            rss["with_kernels_mib"] = now
        rss["kernels"] = self.sizes.concurrent


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _cleaning_up(signum: int, frame: Any) -> None:
    print("cleaning up kernels and the gateway; please wait", file=sys.stderr, flush=True)


def run_meta(args: argparse.Namespace, workdir: str, sizes: dict[str, int]) -> dict[str, Any]:
    """
    What every benchmark's JSON says about its run: when, on what, with
    which sizes and figures, and how busy the machine was.
    """
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "protocol": args.protocol,
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "sizes": sizes,
        "selected": args.selected,
        "versions": _versions(),
        "workdir": workdir,
    }


def run_guarded(results: dict[str, Any], work: Callable[[], None], cleanup: Callable[[int], None]) -> int:
    """
    Run C{work()} with SIGTERM stopping it as Ctrl-C does, record an
    interruption or an error in C{results}, then C{cleanup(status)}
    whatever happened, with Ctrl-C and SIGTERM only saying that it is under
    way (a second Ctrl-C must not leave kernels behind).

    @return: 0, L{EXIT_INTERRUPTED} or L{EXIT_ERROR}.
    """
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    status = 0
    try:
        work()
    except (KeyboardInterrupt, asyncio.CancelledError):
        results["error"] = "interrupted"
        status = EXIT_INTERRUPTED
    except Exception as e:
        results["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
        status = EXIT_ERROR
    finally:
        signal.signal(signal.SIGINT, _cleaning_up)
        signal.signal(signal.SIGTERM, _cleaning_up)
        try:
            cleanup(status)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous_term)
    return status


def end_of_run(args: argparse.Namespace, results: dict[str, Any], workdir: str, markers: list[str]) -> None:
    """
    Record when the run ended and the load then; remove the temporary work
    directory unless asked to keep it or a process still names C{markers}.
    """
    results["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["meta"]["load_average_at_end"] = os.getloadavg()
    if not args.workdir and not args.keep_workdir and not processes_mentioning(markers):
        shutil.rmtree(workdir, ignore_errors=True)


def finish(
    args: argparse.Namespace, results: dict[str, Any], status: int, heading: str, text: str, checks: list[str]
) -> int:
    """
    Print C{heading} and C{text} (the table), a note if the machine was
    busy and what went wrong; write the JSON.

    @param checks: the failed correctness checks.
    @return: C{status}, or L{EXIT_CHECK_FAILED} for a run that finished
        with failed C{checks}.
    """
    results["checks_failed"] = checks
    print()
    print(heading)
    print(text)
    load = results["meta"]["load_average_at_start"][0]
    if load > 0.5:
        print(f"NOTE: load average was {load:.2f} at the start: other work on this machine skews the figures")
    for problem in dict.fromkeys(checks + results["problems"]):
        print(f"PROBLEM: {problem}")
    if "error" in results:
        print(f"ERROR: {results['error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    if status == 0 and checks:
        status = EXIT_CHECK_FAILED
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    workdir = work_directory(args, "egateway-bench-")
    meta = run_meta(args, workdir, asdict(args.sizes))
    try:
        args.kernelspec = allocator.apply(args.malloc, args.kernelspec, workdir)
    except Exception as e:
        print(f"bench/run.py: --malloc {args.malloc}: {e}", file=sys.stderr)
        return 2
    meta.update(
        kernelspec=args.kernelspec,
        curve=args.curve,
        malloc=args.malloc,
        gateway=args.gateway_url or "private twistd -n egateway",
        launch_timeout=None if args.gateway_url else args.launch_timeout,
    )
    results: dict[str, Any] = {"meta": meta, "figures": {}, "skipped": {}, "problems": []}
    if args.gateway_url and "rss" in args.selected:
        results["skipped"]["rss"] = "measuring an external gateway (--gateway-url): its process is not ours"
    gateway: GatewayProcess | None = None

    def work() -> None:
        nonlocal gateway
        if not args.gateway_url:
            profile = (
                ("--profile", os.path.abspath(args.profile_gateway), "--profiler", "cprofile", "--savestats")
                if args.profile_gateway
                else ()
            )
            gateway = GatewayProcess(
                workdir,
                args.launch_timeout,
                extra_config=f'kernel_encryption = "{"auto" if args.curve == "on" else "off"}"\n',
                twistd_options=profile,
            )
            gateway.start()
            results["meta"]["gateway_pid"] = gateway.pid
            if "rss" in args.selected:
                results["figures"]["rss"] = {"gateway": {"idle_mib": _mib(gateway.rss_kib())}}
        asyncio.run(Benchmark(args, results, gateway).run())

    def cleanup(status: int) -> None:
        if gateway is not None:
            results["meta"]["gateway_stop"] = gateway.stop()
            if status and gateway.log_path:
                print(f"gateway log tail:\n{gateway.log_tail(15)}", file=sys.stderr)
        leaked = sweep(workdir)
        results["leaked_processes"] = leaked
        if leaked:
            results["problems"].append(f"killed {len(leaked)} leftover process(es)")
        end_of_run(args, results, workdir, owned_markers(workdir))

    status = run_guarded(results, work, cleanup)
    heading = (
        f"egateway {results['meta'].get('gateway_version', '?')} benchmark: protocol {args.protocol}, "
        f"CurveZMQ {args.curve}, "
        f"{'malloc keep (clients, kernels), ' if args.malloc == 'keep' else ''}"
        f"kernelspec {args.kernelspec}, {os.cpu_count()} CPUs{', quick' if args.quick else ''}"
    )
    checks = summarise(results["figures"])
    return finish(args, results, status, heading, table(results), checks)


if __name__ == "__main__":
    sys.exit(main())
