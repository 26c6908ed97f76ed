"""
The measurements.  Each function measures one figure on one side (a
L{bench.sides.GatewaySide} or L{bench.sides.DirectSide}) and returns plain
data for the report; the two sides run one after the other, never at once.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

from bench.channels import IdleLost
from bench.sides import StartedKernel

CHUNK = 10_000
IDLE_GRACE = 30.0
"""
Seconds a stream run waits for the C{idle} after the reply before it
counts the run as having lost output (L{IdleLost}) rather than waiting out
the 600 s timeout.
"""
_MARK = re.compile(r"<(\d{8})>")


@dataclass(frozen=True)
class Sizes:
    """
    How much of everything to do; C{--quick} shrinks it.
    """

    starts: int = 10
    warmup: int = 100
    roundtrips: int = 1000
    pipelined: int = 2000
    stream_chunks: int = 2000
    repeats: int = 9
    concurrent: int = 50
    concurrent_rounds: int = 2

    @classmethod
    def quick(cls) -> "Sizes":
        return cls(starts=2, warmup=20, roundtrips=100, pipelined=200, stream_chunks=200,
                   repeats=1, concurrent=5, concurrent_rounds=1)


def percentile(values: list[float], fraction: float) -> float:
    """
    Nearest-rank percentile.
    """
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-fraction * len(ordered) // 1))))
    return ordered[rank - 1]


async def kernel_start(sides: list[Any], n: int) -> dict[str, dict[str, Any]]:
    """
    Figure 1: start to first C{kernel_info_reply}, median of C{n} starts
    per side, one at a time, the sides taking turns so that a change in
    background load hits both alike.  One unmeasured start per side first
    warms the page cache and the imports.
    """
    samples: dict[str, list[float]] = {side.name: [] for side in sides}
    shutdowns: dict[str, list[float]] = {side.name: [] for side in sides}
    for round_ in range(n + 1):
        for side in sides:
            kernel = await side.start_kernel()
            begin = time.perf_counter()
            await side.shutdown(kernel)
            if round_:
                samples[side.name].append(kernel.elapsed)
                shutdowns[side.name].append(time.perf_counter() - begin)
    return {
        name: {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "max_s": max(values),
            "samples_s": values,
            "shutdown_median_s": statistics.median(shutdowns[name]),
            "n": n,
        }
        for name, values in samples.items()
    }


async def roundtrip(
    kernels: dict[str, StartedKernel], warmup: int, n: int, block: int = 100
) -> dict[str, dict[str, Any]]:
    """
    Figure 2: C{1+1} from request sent to C{execute_reply} and iopub
    C{idle} both received, one at a time; the sides take turns in blocks of
    C{block}.
    """
    for kernel in kernels.values():
        for _ in range(warmup):
            await kernel.channels.execute("1+1")
    times: dict[str, list[float]] = {name: [] for name in kernels}
    while any(len(t) < n for t in times.values()):
        for name, kernel in kernels.items():
            channels = kernel.channels
            for _ in range(min(block, n - len(times[name]))):
                begin = time.perf_counter()
                await channels.execute("1+1")
                times[name].append((time.perf_counter() - begin) * 1000)
    return {
        name: {
            "p50_ms": percentile(ms, 0.50),
            "p90_ms": percentile(ms, 0.90),
            "p99_ms": percentile(ms, 0.99),
            "mean_ms": statistics.fmean(ms),
            "max_ms": max(ms),
            "n": n,
            "warmup": warmup,
        }
        for name, ms in times.items()
    }


async def pipelined(kernels: dict[str, StartedKernel], n: int, repeats: int) -> dict[str, dict[str, Any]]:
    """
    Figure 3: send C{n} executes, then collect every reply and C{idle};
    median of C{repeats} bursts per side, the sides taking turns.
    """
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in kernels}
    for _ in range(repeats):
        for name, kernel in kernels.items():
            channels = kernel.channels
            begin = time.perf_counter()
            pendings = [channels.start_execute("1+1") for _ in range(n)]
            await channels.flush()
            done = await asyncio.wait_for(asyncio.gather(*(p.done for p in pendings)), 600)
            elapsed = max(done) - begin
            failed = sum(1 for p in pendings if (p.reply or {}).get("status") != "ok")
            runs[name].append({"executes_per_s": n / elapsed, "elapsed_s": elapsed, "failed": failed})
    result = {}
    for name, items in runs.items():
        middle = sorted(items, key=lambda r: r["executes_per_s"])[len(items) // 2]
        result[name] = {
            **middle,
            "executes_per_s_runs": [r["executes_per_s"] for r in items],
            "failed": sum(r["failed"] for r in items),
            "n": n,
            "repeats": repeats,
        }
    return result


def _stream_setup(chunks: int) -> str:
    return (
        "import sys as _bench_sys\n"
        f"_bench_c = ['<%08d>' % _i + 'x' * {CHUNK - 10} for _i in range({chunks})]\n"
        "_bench_s = ''.join(_bench_c)\n"
    )


STREAM_CASES: dict[str, tuple[str, Callable[[int], str]]] = {
    "stream_one_write": (
        "_bench_sys.stdout.write(_bench_s); _bench_sys.stdout.flush()",
        lambda chunks: f"{chunks * CHUNK / 1e6:g} MB in one write",
    ),
    "stream_flushed_writes": (
        "for _bench_x in _bench_c:\n"
        "    _bench_sys.stdout.write(_bench_x); _bench_sys.stdout.flush()",
        lambda chunks: f"{chunks} flushed {CHUNK // 1000} kB writes",
    ),
}


async def stream_setup(kernels: dict[str, StartedKernel], chunks: int) -> None:
    for kernel in kernels.values():
        await kernel.channels.execute(_stream_setup(chunks))


async def stream(
    kernels: dict[str, StartedKernel], case: str, chunks: int, repeats: int
) -> dict[str, dict[str, Any]]:
    """
    Figure 4: stdout throughput, from the request sent to its reply and
    C{idle}; median of C{repeats} runs per side, the sides taking turns.
    Every 10 kB chunk carries its number, so a lost or truncated message
    shows as missing chunk numbers whatever way the kernel batches writes.
    """
    code, _ = STREAM_CASES[case]
    expected_bytes = chunks * CHUNK
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in kernels}
    for _ in range(repeats):
        for name, kernel in kernels.items():
            begin = time.perf_counter()
            try:
                pending = await kernel.channels.execute(code, timeout=600, keep_text=True, idle_grace=IDLE_GRACE)
                elapsed = pending.done.result() - begin
                idle_lost = False
            except IdleLost as e:
                pending, elapsed, idle_lost = e.pending, time.perf_counter() - begin, True
            text = "".join(pending.stream_texts)
            seen = {int(m) for m in _MARK.findall(text)}
            runs[name].append(
                {
                    "mb_per_s": expected_bytes / 1e6 / elapsed,
                    "elapsed_s": elapsed,
                    "messages": pending.stream_messages,
                    "bytes_received": pending.stream_chars,
                    "chunks_lost": len(set(range(chunks)) - seen),
                    "idle_lost": idle_lost,
                }
            )
            del text, pending
    result = {}
    for name, items in runs.items():
        middle = sorted(items, key=lambda r: r["mb_per_s"])[len(items) // 2]
        result[name] = {
            "mb_per_s": middle["mb_per_s"],
            "mb_per_s_runs": [r["mb_per_s"] for r in items],
            "elapsed_s": middle["elapsed_s"],
            "bytes_expected": expected_bytes,
            "bytes_received": [r["bytes_received"] for r in items],
            "messages_expected": chunks if case == "stream_flushed_writes" else None,
            "messages_received": [r["messages"] for r in items],
            "lost": max(r["chunks_lost"] for r in items),
            "idle_lost": sum(r["idle_lost"] for r in items),
            "bytes_ok": all(r["bytes_received"] == expected_bytes for r in items),
            "repeats": repeats,
        }
    return result


async def _storm(side: Any, n: int, when_all_ready: Callable[[], None] | None) -> dict[str, Any]:
    """
    Start C{n} kernels at once on C{side}; each kernel's time is from the
    storm's start to its first C{kernel_info_reply} (its C{ready_at}), not
    from when its own start began: jupyter_client's C{start_kernel} spawns
    the kernel (C{Popen}, which waits for the child's C{exec}) before its
    first real C{await}, so the direct side's 50 starts begin one after
    the other, about 50 ms apart on a busy machine, and a kernel's own
    C{elapsed} leaves out the spawns before it (measured: the last of 50
    ready 7.7 s after its own start, 8.8 s after the storm's).  The
    gateway's starts all begin at once (each awaits its POST), so its
    kernels' own times already included the gateway's spawning them.
    """
    begin = time.perf_counter()
    results = await asyncio.gather(*(side.start_kernel() for _ in range(n)), return_exceptions=True)
    ready = [r for r in results if isinstance(r, StartedKernel)]
    errors = [r for r in results if not isinstance(r, StartedKernel)]
    if when_all_ready is not None:
        when_all_ready()
    begin_stop = time.perf_counter()
    await asyncio.gather(*(side.shutdown(r) for r in ready), return_exceptions=True)
    for error in errors:
        if isinstance(error, asyncio.CancelledError):
            raise error
    return {
        "ready": len(ready),
        "last_ready_s": max((r.ready_at - begin for r in ready), default=0.0),
        "median_ready_s": statistics.median([r.ready_at - begin for r in ready]) if ready else None,
        "last_own_elapsed_s": max((r.elapsed for r in ready), default=0.0),
        "shutdown_all_s": time.perf_counter() - begin_stop,
        "errors": [f"{type(e).__name__}: {e}"[:300] for e in errors],
    }


async def concurrent_starts(
    sides: list[Any],
    n: int,
    rounds: int,
    when_all_ready: Callable[[str], None] | None = None,
    progress: Callable[[str], None] = lambda text: None,
) -> dict[str, dict[str, Any]]:
    """
    Figure 5: C{n} kernels started at once; all must become ready, in
    every round; the time until the last is ready counts from the storm's
    start (see L{_storm}).  The sides alternate A B B A ..., because the first storm
    of a run is slower (memory first touched in the VM, caches) and
    whichever side went first would carry it.  With every kernel up,
    C{when_all_ready(side_name)} is called (the gateway's RSS), then all are
    shut down at once.
    """
    runs: dict[str, list[dict[str, Any]]] = {side.name: [] for side in sides}
    for round_ in range(rounds):
        for side in sides if round_ % 2 == 0 else sides[::-1]:
            progress(f"{side.name}: {n} concurrent kernel starts (round {round_ + 1} of {rounds})")
            hook = (lambda name=side.name: when_all_ready(name)) if when_all_ready else None
            runs[side.name].append(await _storm(side, n, hook))
    result = {}
    for name, items in runs.items():
        errors = sorted({e for item in items for e in item["errors"]})
        result[name] = {
            "requested": n,
            "ready": min(item["ready"] for item in items),
            "last_ready_s": statistics.median(item["last_ready_s"] for item in items),
            "last_ready_s_runs": [item["last_ready_s"] for item in items],
            "last_own_elapsed_s_runs": [item["last_own_elapsed_s"] for item in items],
            "ready_runs": [item["ready"] for item in items],
            "median_ready_s": statistics.median(
                item["median_ready_s"] for item in items if item["median_ready_s"] is not None
            ) if any(item["median_ready_s"] is not None for item in items) else None,
            "shutdown_all_s": statistics.median(item["shutdown_all_s"] for item in items),
            "errors": errors[:5],
            "rounds": rounds,
        }
    return result
