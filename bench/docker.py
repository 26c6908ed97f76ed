#!/usr/bin/env python
"""
Benchmark kernel starts in containers: POST /api/kernels until the answer
(the gateway answers once the kernel replied to kernel_info) for a local
kernel, a Docker container kernel and a Swarm service kernel, in one run.

    python bench/docker.py [--starts 10] [--json out.json]

Brings up the test fixture's private Docker engine with a one-node swarm
(C{tests.fixtures.docker.DockerDaemon}), runs egateway in this process's
reactor, starts one unmeasured kernel per kind, then C{--starts} kernels
per kind taking turns (local, docker, swarm, local, ...), deleting each
before the next, and prints the median, minimum and maximum per kind.
Everything it started is removed at the end, also after an error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.fixtures.docker import DockerDaemon  # noqa: E402
from tests.support.remote_kernels import kernelspec, launcher_argv, write_spec  # noqa: E402

KINDS = ("local", "docker", "swarm")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="POST -> ready for local, container and Swarm kernels")
    parser.add_argument("--starts", type=int, default=10, help="measured starts per kind (default 10)")
    parser.add_argument("--json", help="also write the samples and medians here")
    return parser.parse_args(argv)


def write_specs(directory: str, docker: DockerDaemon) -> None:
    config = {"image_name": docker.image, "network": docker.network, "mounts": ["/usr:/usr:ro"],
              "user": "65534:65534"}
    os.makedirs(os.path.join(directory, "local"))
    with open(os.path.join(directory, "local", "kernel.json"), "w") as f:
        json.dump(kernelspec("local", [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]), f)
    write_spec(directory, "docker", launcher_argv(), "docker", config=config)
    write_spec(directory, "swarm", launcher_argv(), "docker-swarm", config={**config, "network": "host"})


async def measure(reactor: Any, args: argparse.Namespace, docker: DockerDaemon, specs: str) -> dict[str, Any]:
    from tests.support.gateway import InProcessGateway

    gateway = InProcessGateway(
        kernelspec_path=specs, response_ip=docker.gateway_ip, docker_host=docker.docker_host,
        docker_poll_interval=0.05, shutdown_wait=3, terminate_wait=3,
    )
    await gateway.start()
    samples: dict[str, list[float]] = {kind: [] for kind in KINDS}
    try:
        for round_ in range(args.starts + 1):
            for kind in KINDS:
                started = time.monotonic()
                code, model = await gateway.request("POST", "api/kernels", {"name": kind})
                elapsed = time.monotonic() - started
                if code != 201:
                    raise RuntimeError(f"{kind} kernel did not start: {code} {model}")
                await gateway.request("DELETE", f"api/kernels/{model['id']}")
                if round_:  # the first round warms up
                    samples[kind].append(elapsed)
                print(f"  {kind:7} start {round_}: {elapsed:.3f} s", flush=True)
    finally:
        await gateway.stop()
    return samples


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    docker = DockerDaemon(tempfile.mkdtemp(prefix="egw-", dir="/tmp"), swarm=True)
    specs = tempfile.mkdtemp(prefix="egw-specs-")
    outcome: list[Any] = []
    try:
        docker.up()
        write_specs(specs, docker)
        d = Deferred.fromCoroutine(measure(reactor, args, docker, specs))
        d.addBoth(outcome.append).addBoth(lambda _: reactor.stop())
        reactor.run()
    finally:
        docker.down()
        shutil.rmtree(specs, ignore_errors=True)
        left = docker.leftovers()
        if left:
            print(f"left behind: {left}", file=sys.stderr)
    result = outcome[0] if outcome else None
    if not isinstance(result, dict):
        print(f"benchmark failed: {result}", file=sys.stderr)
        return 1
    summary = {
        kind: {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
        for kind, values in result.items()
    }
    print(f"\nPOST /api/kernels -> ready (s), {args.starts} starts per kind after one warm-up:")
    for kind, figures in summary.items():
        ratio = figures["median"] / summary["local"]["median"]
        print(f"  {kind:7} median {figures['median']:.3f}  min {figures['min']:.3f}  max {figures['max']:.3f}"
              f"  ({ratio:.2f}x local)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"samples": result, "summary": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
