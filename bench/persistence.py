#!/usr/bin/env python
"""
Benchmark what persistence costs: kernel start with the Redis store against
no store, and stdout streaming with the WebSocket journal against none.

    python bench/persistence.py [--quick] [--only start,stream] [--json out.json]

Starts a throwaway C{redis-server} on loopback (the test fixture
C{tests.fixtures.RedisServer}) and up to three C{twistd -n egateway}
daemons, each with its own private config, work directory and port:

  - C{plain}: C{persistence = false}, default journal bounds;
  - C{journal-off}: C{persistence = false}, C{journal_entries = 0};
  - C{redis}: the Redis store, default journal bounds (a shared store, so
    the journal is also copied to Redis).

The sides of each figure take turns, as in C{bench/run.py}.  Every kernel,
the gateways and Redis are removed at the end, also after an error, Ctrl-C
or SIGTERM.  See C{bench/README.md}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import figures as fig  # noqa: E402
from bench.gateway import GatewayProcess, cpu_seconds, sweep  # noqa: E402
from bench.report import HEADLINES, TITLES, fmt, ratio, render, row  # noqa: E402
from bench.run import (  # noqa: E402
    add_figure_options,
    add_output_options,
    add_size_options,
    end_of_run,
    finish,
    parse_figure_args,
    run_guarded,
    run_meta,
    work_directory,
)
from bench.sides import GatewaySide  # noqa: E402

FIGURES = ("start", "stream")
SIZES = ("starts", "warmup", "stream_chunks", "repeats")

JOURNAL_OFF = "journal_entries = 0\njournal_bytes = 0\n"
"""
C{journal_entries = 0} is the off switch: C{KernelSession.deliver} then
records nothing and C{SharedKernels} makes no Redis sink.  C{journal_bytes
= 0} alone would not do it (the newest message is always kept); it is set
too only so that the config reads as "off".
"""


@dataclass(frozen=True)
class Comparison:
    """
    One target: side C{measured} against side C{baseline}, on the gateway
    named for each.
    """

    measured: str
    baseline: str
    ratio_key: str = "ratio"


SIDES: dict[str, dict[str, str]] = {
    # figure: {side: gateway}
    "start": {"no_store": "plain", "redis": "redis"},
    "stream": {"journal_on": "plain", "journal_off": "journal-off", "journal_on_redis": "redis"},
}

COMPARISONS: dict[str, list[Comparison]] = {
    "start": [Comparison("redis", "no_store")],
    "stream": [
        Comparison("journal_on", "journal_off"),
        Comparison("journal_on_redis", "journal_off", "ratio_redis"),
    ],
}

LABELS = {
    "no_store": "no store",
    "redis": "Redis store",
    "journal_on": "journal on",
    "journal_off": "journal off",
    "journal_on_redis": "journal on + Redis",
}


def store_config(gateway: str, redis_url: str, store_key: str) -> str:
    """
    The C{[store]} section of each gateway.  The Redis one stops its kernels
    when it stops (C{on_stop = "shutdown"}), so that an interrupted run
    leaves no kernel waiting for a successor.
    """
    if gateway == "redis":
        return f'[store]\nstore_url = "{redis_url}"\nstore_key = "{store_key}"\non_stop = "shutdown"\n'
    return "[store]\npersistence = false\n" + (JOURNAL_OFF if gateway == "journal-off" else "")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/persistence.py",
        description="Measure kernel start with the Redis store and streaming with the WebSocket "
        "journal, each against the gateway without it, in one run.",
    )
    add_figure_options(parser, FIGURES)
    add_output_options(
        parser,
        workdir_help="directory for the gateways' configs, logs and connection files",
        launch_timeout_help="the gateways' launch_timeout (default 120 s, as bench/run.py)",
    )
    add_size_options(
        parser,
        ("starts", "measured kernel starts per side, after one unmeasured"),
        ("warmup", "warm-up executes per kernel before the streams"),
        ("stream-chunks", "10 kB chunks per stream case"),
        ("repeats", "runs of each stream case per side (median reported)"),
    )
    args = parse_figure_args(parser, argv, FIGURES)
    for name in ("starts", "stream_chunks", "repeats"):
        if getattr(args.sizes, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def needed_gateways(selected: list[str]) -> list[str]:
    """
    The gateways the selected figures run on, in a fixed order.
    """
    wanted = {gateway for figure in selected for gateway in SIDES[figure].values()}
    return [name for name in ("plain", "journal-off", "redis") if name in wanted]


class PersistenceBenchmark:
    """
    One run: Redis, the gateways, the figures selected and the results.
    """

    def __init__(self, args: argparse.Namespace, results: dict[str, Any], workdir: str) -> None:
        self.args = args
        self.sizes: fig.Sizes = args.sizes
        self.results = results
        self.meta: dict[str, Any] = results["meta"]
        self.figures: dict[str, dict[str, Any]] = results["figures"]
        self.workdir = workdir
        self.gateways: dict[str, GatewayProcess] = {}
        self.redis: Any = None

    def _progress(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    # -- bring-up and teardown (blocking: nothing else runs meanwhile) ----

    def bring_up(self) -> None:
        """
        Redis first (the Redis gateway connects to it as it starts), then
        each gateway; each is recorded before it starts so that
        L{tear_down} stops a half-started one too.
        """
        from egateway.store.crypto import SecretBox
        from tests.fixtures import RedisServer

        needed = needed_gateways(self.args.selected)
        url = ""
        if "redis" in needed:
            # Outside our work directory: the fixture wants a short path and
            # removes its directory whole.
            self.redis = RedisServer(tempfile.mkdtemp(prefix="egw-bench-", dir="/tmp"))
            self.meta["fixture_workdirs"] = [self.redis.workdir]
            self._progress("starting redis-server")
            self.redis.up()
            url = self.redis.url
        key = SecretBox.generate_key()
        for name in needed:
            gateway = GatewayProcess(
                os.path.join(self.workdir, name),
                self.args.launch_timeout,
                extra_config=store_config(name, url, key),
            )
            self.gateways[name] = gateway
            self._progress(f"starting gateway {name}")
            gateway.start()
            self.meta["gateway_pids"][name] = gateway.pid

    def tear_down(self, failed: bool) -> None:
        """
        Stop the gateways (a graceful stop shuts their kernels down, and the
        Redis one needs Redis meanwhile), then Redis; then kill whatever
        still names a gateway's directory, and record what was left.
        """
        for name, gateway in self.gateways.items():
            self.meta["gateway_stop"][name] = gateway.stop()
            if failed:
                print(f"gateway {name} log tail:\n{gateway.log_tail(15)}", file=sys.stderr)
        leaked = self.results["leaked_processes"]
        if self.redis is not None:
            try:
                self.redis.down()
            except Exception as e:
                self.results["problems"].append(f"redis: {e}")
            leaked += [f"redis: {item}" for item in self.redis.leftovers()]
        for name in self.gateways:
            leaked += sweep(os.path.join(self.workdir, name))
        if leaked:
            self.results["problems"].append(f"{len(leaked)} process(es) or resources left behind")

    # -- measuring ----------------------------------------------------------

    async def measure(self) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        sides: list[GatewaySide] = []
        try:
            if "start" in self.args.selected:
                await self._starts(self._sides("start", sides))
            if "stream" in self.args.selected:
                await self._streams(self._sides("stream", sides))
        finally:
            for side in sides:
                self.results["problems"].extend(await side.close())
            loop.remove_signal_handler(signal.SIGTERM)

    def _sides(self, figure: str, opened: list[GatewaySide]) -> list[GatewaySide]:
        """
        One L{GatewaySide} per side of C{figure}, named after the side,
        added to C{opened} for the final cleanup.
        """
        made = []
        for side_name, gateway_name in SIDES[figure].items():
            gateway = self.gateways[gateway_name]
            side = GatewaySide(gateway.url, gateway.token, self.args.kernelspec, self.args.protocol,
                               self.args.launch_timeout)
            side.name = side_name
            made.append(side)
        opened.extend(made)
        return made

    def _cpu(self) -> dict[str, float | None]:
        """
        CPU seconds so far of each gateway and of redis-server: the journal's
        cost shows there even where the MB/s hide it.
        """
        found = {name: gateway.cpu_seconds() for name, gateway in self.gateways.items()}
        if self.redis is not None and self.redis.pid is not None:
            found["redis-server"] = cpu_seconds(self.redis.pid)
        return found

    async def _starts(self, sides: list[GatewaySide]) -> None:
        self._progress(f"kernel starts: 1 + {self.sizes.starts} per side, taking turns")
        self.figures["start"] = await fig.kernel_start(sides, self.sizes.starts)

    async def _streams(self, sides: list[GatewaySide]) -> None:
        """
        One kernel per side, warmed up, then each stream case with the sides
        taking turns (C{bench.figures.stream}).
        """
        sizes = self.sizes
        kernels = {}
        try:
            for side in sides:
                kernels[side.name] = await side.start_kernel()
            for kernel in kernels.values():
                for _ in range(sizes.warmup):
                    await kernel.channels.execute("1+1")
            await fig.stream_setup(kernels, sizes.stream_chunks)
            for case in fig.STREAM_CASES:
                self._progress(f"{case}: {sizes.repeats} runs per side")
                before = self._cpu()
                self.figures[case] = await fig.stream(kernels, case, sizes.stream_chunks, sizes.repeats)
                after = self._cpu()
                self.figures[case]["cpu_s"] = {
                    name: after[name] - value
                    for name, value in before.items()
                    if value is not None and after.get(name) is not None
                }
        finally:
            for side in sides:
                if side.name in kernels:
                    await side.shutdown(kernels[side.name])


# -- checks and report ---------------------------------------------------------


def _figure_kind(name: str) -> str:
    return "stream" if name.startswith("stream") else name


def summarise(figures: dict[str, dict[str, Any]]) -> list[str]:
    """
    Add each comparison's ratio, target and C{met} to its figure (C{met} is
    false whenever a side lost output); return the lost output found, which
    fails the run.
    """
    problems = []
    for name, figure in figures.items():
        field, _, _, target, check = HEADLINES[name]
        figure["target"] = target
        lost = {}
        if _figure_kind(name) == "stream":
            lost = {side: figure[side]["lost"] for side in SIDES["stream"]
                    if figure[side]["lost"] or not figure[side]["bytes_ok"]}
            if lost:
                problems.append(f"{name}: output lost ({', '.join(f'{s} {n} chunks' for s, n in lost.items())})")
        for comparison in COMPARISONS[_figure_kind(name)]:
            value = ratio(figure[comparison.measured][field], figure[comparison.baseline][field])
            figure[comparison.ratio_key] = value
            met = None if value is None else bool(check(value))
            if comparison.measured in lost or comparison.baseline in lost:
                met = False
            figure["met" + comparison.ratio_key[len("ratio"):]] = met
    return problems


def table(results: dict[str, Any]) -> str:
    """
    One row per comparison: the measured side, the baseline, their ratio
    and the target.
    """
    sizes = results["meta"]["sizes"]
    rows: list[tuple[str, ...]] = [("figure", "measured", "baseline", "ratio", "target")]
    for name, figure in results["figures"].items():
        field, unit, _, target, _ = HEADLINES[name]
        title = TITLES[name].format(n=sizes["starts"], mb=sizes["stream_chunks"] * fig.CHUNK / 1e6,
                                    chunks=sizes["stream_chunks"])
        for comparison in COMPARISONS[_figure_kind(name)]:
            cells = []
            for side in (comparison.measured, comparison.baseline):
                cell = fmt(figure[side][field], unit)
                cells.append(cell + (f" lost {figure[side]['lost']}" if "lost" in figure[side] else ""))
            suffix = comparison.ratio_key[len("ratio"):]
            rows.append(row(f"{title} ({LABELS[comparison.measured]} / {LABELS[comparison.baseline]})",
                            *cells, figure[comparison.ratio_key], target, figure["met" + suffix]))
    text = render(rows, {}) if len(rows) > 1 else "(no figure measured)"
    for name, figure in results["figures"].items():
        if "cpu_s" in figure:
            spent = ", ".join(f"{process} {seconds:.2f} s" for process, seconds in figure["cpu_s"].items())
            text += f"\nCPU during {name} (all sides' turns): {spent}"
    return text


# -- main -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    workdir = work_directory(args, "egw-persist-bench-")
    meta = run_meta(args, workdir, {name: getattr(args.sizes, name) for name in SIZES})
    meta.update(kernelspec=args.kernelspec, launch_timeout=args.launch_timeout, gateway_pids={}, gateway_stop={})
    results: dict[str, Any] = {"meta": meta, "figures": {}, "problems": [], "leaked_processes": []}
    bench = PersistenceBenchmark(args, results, workdir)

    def work() -> None:
        bench.bring_up()
        asyncio.run(bench.measure())

    def cleanup(status: int) -> None:
        bench.tear_down(failed=bool(status))
        end_of_run(args, results, workdir, [workdir])

    status = run_guarded(results, work, cleanup)
    checks = summarise(results["figures"]) + results["problems"]
    heading = (
        f"egateway persistence benchmark: protocol {args.protocol}, kernelspec {args.kernelspec}, "
        f"{os.cpu_count()} CPUs{', quick' if args.quick else ''}"
    )
    return finish(args, results, status, heading, table(results), checks)


if __name__ == "__main__":
    sys.exit(main())
