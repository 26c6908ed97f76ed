#!/usr/bin/env python
"""
Benchmark warm pools: POST /api/kernels -> 201 for a kernel taken from a
warm pool and bound, against a cold start of the same kernelspec, in the
same run and the same gateway.

    python bench/pools.py [--starts 10] [--ssh] [--json out.json]

Runs egateway in this process's reactor with a pool of one kernel per
kernelspec (C{[pools.<spec>] size = 1}): a local ipykernel, and with
C{--ssh} one on an SSH host of the test fixture (C{tests.fixtures.SSHHosts},
an sshd in a network namespace).  Warm and cold starts take turns.  A warm
start sends C{KERNEL_USERNAME} (bound at take time); a cold start also sends
C{KERNEL_BENCH_COLD}, a C{KERNEL_*} value binding cannot apply, so the very
same gateway starts that kernel afresh.  Before each warm start the pool is
refilled (not timed); each kernel is deleted after its start.  Prints the
median (p50) per kind with the ratio warm / cold against the targets
(p50 <= 50 ms and <= 0.05 x cold), and removes everything it started, also
after an error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.turns import Sample, post_and_delete, run_in_reactor, take_turns, write_local_spec  # noqa: E402
from tests.support.remote_kernels import launcher_argv, write_spec  # noqa: E402

TARGET_SECONDS = 0.050
TARGET_RATIO = 0.05
WAIT = 120.0
TEMPERATURES = ("warm", "cold")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="POST -> 201 from a warm pool against a cold start")
    parser.add_argument("--starts", type=int, default=10, help="measured starts per kind and temperature")
    parser.add_argument("--ssh", action="store_true", help="also measure kernels on an SSH host (fixture)")
    parser.add_argument("--json", help="also write the samples and medians here")
    return parser.parse_args(argv)


async def measure(reactor: Any, args: argparse.Namespace, kinds: list[str], **settings: Any) -> dict[str, Any]:
    from tests.support.gateway import InProcessGateway

    gateway = InProcessGateway(
        file_values={"pools": {kind: {"size": 1} for kind in kinds}}, shutdown_wait=3, terminate_wait=3, **settings
    )
    await gateway.start()
    pools = gateway.service.getServiceNamed("pools")

    async def start(kind: str, temperature: str) -> Sample:
        await pools.when_ready(kind).addTimeout(WAIT, reactor)
        env = {"KERNEL_USERNAME": "bench", **({"KERNEL_BENCH_COLD": "1"} if temperature == "cold" else {})}
        sample = await post_and_delete(gateway, kind, env)
        if temperature == "warm" and sample.detail.get("pool") != kind:
            raise RuntimeError(f"{kind}: the warm start was not served from the pool: {sample.detail}")
        if temperature == "cold" and "pool" in sample.detail:
            raise RuntimeError(f"{kind}: the cold start came from the pool")
        return sample

    # Warm and cold take turns, kind after kind.
    starters = {
        f"{kind} {temperature}": lambda kind=kind, temperature=temperature: start(kind, temperature)
        for kind in kinds for temperature in TEMPERATURES
    }
    try:
        samples = await take_turns(starters, args.starts)
    finally:
        await gateway.stop()
    return {
        kind: {temperature: [s.seconds for s in samples[f"{kind} {temperature}"]] for temperature in TEMPERATURES}
        for kind in kinds
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    specs = tempfile.mkdtemp(prefix="egw-pool-specs-")
    hosts: Any = None
    fixture_dir = ""
    try:
        write_local_spec(specs)
        kinds = ["local"]
        settings: dict[str, Any] = {"kernelspec_path": specs}
        if args.ssh:
            from tests.fixtures import SSHHosts

            fixture_dir = tempfile.mkdtemp(prefix="egw-pool-ssh-", dir="/tmp")
            hosts = SSHHosts(fixture_dir, ("h1",))
            hosts.up()
            write_spec(specs, "ssh", launcher_argv(), "ssh", config={"remote_hosts": hosts.hosts[0].ip})
            kinds.append("ssh")
            settings.update(
                response_ip=hosts.bridge_ip,
                ssh_key_files=hosts.client_key_path,
                ssh_known_hosts=hosts.known_hosts_path,
                remote_user=hosts.user,
            )
        result = run_in_reactor(lambda reactor: measure(reactor, args, kinds, **settings))
    finally:
        if hosts is not None:
            hosts.down()
        shutil.rmtree(specs, ignore_errors=True)
        if fixture_dir:
            shutil.rmtree(fixture_dir, ignore_errors=True)
    if not isinstance(result, dict):
        print(f"benchmark failed: {result}", file=sys.stderr)
        return 1
    summary: dict[str, Any] = {}
    met = True
    print(f"\nPOST /api/kernels -> 201, p50 of {args.starts} starts per kind after one warm-up round:")
    for kind, by in result.items():
        warm, cold = statistics.median(by["warm"]), statistics.median(by["cold"])
        ok = warm <= TARGET_SECONDS and warm <= TARGET_RATIO * cold
        met = met and ok
        summary[kind] = {"warm_p50_s": warm, "cold_p50_s": cold, "ratio": warm / cold, "target_met": ok}
        print(
            f"  {kind:6} warm {warm * 1000:7.1f} ms  cold {cold * 1000:7.1f} ms  warm/cold {warm / cold:.3f}"
            f"  (targets <= {TARGET_SECONDS * 1000:.0f} ms and <= {TARGET_RATIO} x cold: {'met' if ok else 'NOT met'})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"samples": result, "summary": summary}, f, indent=2)
    return 0 if met else 2


if __name__ == "__main__":
    sys.exit(main())
