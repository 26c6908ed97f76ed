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
import sys
import tempfile
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import turns  # noqa: E402
from tests.fixtures.docker import DockerDaemon  # noqa: E402
from tests.support.remote_kernels import launcher_argv, write_spec  # noqa: E402

KINDS = ("local", "docker", "swarm")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="POST -> ready for local, container and Swarm kernels")
    parser.add_argument("--starts", type=int, default=10, help="measured starts per kind (default 10)")
    parser.add_argument("--json", help="also write the samples and medians here")
    return parser.parse_args(argv)


def write_specs(directory: str, docker: DockerDaemon) -> None:
    config = {"image_name": docker.image, "network": docker.network, "mounts": ["/usr:/usr:ro"],
              "user": "65534:65534"}
    turns.write_local_spec(directory)
    write_spec(directory, "docker", launcher_argv(), "docker", config=config)
    write_spec(directory, "swarm", launcher_argv(), "docker-swarm", config={**config, "network": "host"})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    docker = DockerDaemon(tempfile.mkdtemp(prefix="egw-", dir="/tmp"), swarm=True)

    async def measure(reactor: Any, specs: str) -> dict[str, list[float]]:
        return turns.seconds(await turns.posts_in_turns(
            KINDS, args.starts, kernelspec_path=specs, response_ip=docker.gateway_ip, docker_host=docker.docker_host,
            docker_poll_interval=0.05, shutdown_wait=3, terminate_wait=3,
        ))

    result = turns.run_with_fixture(docker, lambda specs: write_specs(specs, docker), measure)
    if not isinstance(result, dict):
        print(f"benchmark failed: {result}", file=sys.stderr)
        return 1
    summary = turns.summarize(result)
    turns.print_summary(summary, args.starts)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"samples": result, "summary": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
