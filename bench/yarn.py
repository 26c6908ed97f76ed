#!/usr/bin/env python
"""
Benchmark kernel starts on YARN: POST /api/kernels until the answer (the
gateway answers once the kernel replied to kernel_info) for a local
kernel, a YARN cluster-mode kernel without a Spark context and one with an
eager Spark context, in one run, with the phases of each YARN start.

    python bench/yarn.py [--starts 5] [--json out.json]

Brings up the test fixture's YARN (C{tests.fixtures.yarn.YarnCluster}: one
ResourceManager and one NodeManager JVM), runs egateway in this process's
reactor, starts one unmeasured kernel per kind, then C{--starts} kernels
per kind taking turns, deleting each before the next, and prints the
median, minimum and maximum per kind and the median time from the POST to
each phase: submitted (spark-submit returned), accepted, running (only
with a Spark context: without one the ApplicationMaster never registers),
placed (the AM's host known), connection info, ready.  Everything it
started is removed at the end, also after an error.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from datetime import datetime
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import turns  # noqa: E402
from tests.fixtures.yarn import YarnCluster  # noqa: E402
from tests.support.yarn_cluster import write_yarn_specs  # noqa: E402

KINDS = ("local", "yarn", "yarn_spark")
PHASES = ("submitted", "accepted", "running", "placed", "connection info received", "ready")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="POST -> ready for local and YARN kernels")
    parser.add_argument("--starts", type=int, default=5, help="measured starts per kind (default 5)")
    parser.add_argument("--json", help="also write the samples and medians here")
    return parser.parse_args(argv)


def phase_times(model: dict[str, Any]) -> dict[str, float]:
    """
    Seconds from the kernel's first phase (queued) to the first of each of L{PHASES}.
    """
    def at(text: str) -> float:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()

    phases = model.get("phases") or []
    start = at(phases[0]["at"])
    found: dict[str, float] = {}
    for phase in phases:
        name = phase["phase"]
        if name == "submitted":
            for state in ("accepted", "running"):
                if f" {state.upper()}" in phase["detail"]:
                    found.setdefault(state, at(phase["at"]) - start)
        found.setdefault(name, at(phase["at"]) - start)
    return {name: found[name] for name in PHASES if name in found}


def _phases(samples: dict[str, list[turns.Sample]]) -> dict[str, list[dict[str, float]]]:
    return {kind: [phase_times(s.detail) for s in items] for kind, items in samples.items()}


def write_specs(directory: str, cluster: YarnCluster) -> None:
    write_yarn_specs(directory, cluster)
    turns.write_local_spec(directory)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cluster = YarnCluster(tempfile.mkdtemp(prefix="egw-", dir="/tmp"))

    async def measure(reactor: Any, specs: str) -> dict[str, Any]:
        samples = await turns.posts_in_turns(
            KINDS, args.starts, lambda kind, sample: str(phase_times(sample.detail)),
            kernelspec_path=specs, yarn_endpoint=cluster.web_url, yarn_poll_interval=0.1,
            shutdown_wait=3, terminate_wait=3, launch_timeout=120,
        )
        return {"samples": turns.seconds(samples), "phases": _phases(samples)}

    result = turns.run_with_fixture(cluster, lambda specs: write_specs(specs, cluster), measure)
    if not isinstance(result, dict):
        print(f"benchmark failed: {result}", file=sys.stderr)
        return 1
    samples = result["samples"]
    summary = turns.summarize(samples)
    turns.print_summary(summary, args.starts)
    medians: dict[str, dict[str, float]] = {}
    for kind in ("yarn", "yarn_spark"):
        runs = result["phases"][kind]
        medians[kind] = {
            name: statistics.median(run[name] for run in runs if name in run)
            for name in PHASES if any(name in run for run in runs)
        }
        print(f"  {kind:10} phases (median s from POST): "
              + ", ".join(f"{name} {value:.2f}" for name, value in medians[kind].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"samples": samples, "phases": result["phases"], "summary": summary,
                       "phase_medians": medians}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
