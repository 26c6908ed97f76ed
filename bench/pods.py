#!/usr/bin/env python
"""
Benchmark egateway's pod kernels on a real single-node Kubernetes v1.20.

    python bench/pods.py [--quick] [--starts 10] [--concurrent 50] [--json out.json]

Brings up the test cluster (C{tests.fixtures.kubecluster}: etcd,
kube-apiserver, controller-manager, scheduler, kubelet, containerd, a CNI
bridge; the Kubernetes binaries must have been built by
C{.ci/build-kubernetes}), runs egateway in this process's reactor, and
measures, taking turns with local kernels in the same run:

  - C{start}: POST to the first C{kernel_info_reply} over the channels
    WebSocket, median of N, for a pod kernel and a local kernel, with the
    pod's phases (pod created, scheduled, container started = placed,
    connection info, connected, ready) as medians from the kernel manager's
    own record;
  - C{concurrent}: N pod kernels started at once: how many became ready and
    the time until the last did, then the time to delete them all.

Everything (kernels, the gateway, the cluster) is removed at the end, also
after an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.remote import Gateway, _median_offsets, _phase_offsets, _within  # noqa: E402
from bench.turns import Sample, seconds, summarize, take_turns  # noqa: E402
from tests.support.remote_kernels import launcher_argv, write_spec  # noqa: E402

LOCAL_SPEC = "python3"
POD_SPEC = "bench-pod"


def pod_phase_names(event: Any) -> list[str]:
    """
    What a pod kernel's phase event counts as: its C{submitted} events are
    the pod's creation and, the first naming a node, its scheduling;
    C{placed} is the container running with an IP.
    """
    name = event.phase.value
    if name == "submitted":
        return ["pod created"] + (["scheduled"] if ", on " in event.detail else [])
    return [{"placed": "container started"}.get(name, name)]


async def measure(reactor: Any, args: argparse.Namespace, cluster: Any, workdir: str) -> dict[str, Any]:
    specs = os.path.join(workdir, "kernelspecs")
    volumes, mounts = cluster.kernel_volumes()
    write_spec(specs, POD_SPEC, launcher_argv(), "kubernetes",
               config={"image_name": cluster.kernel_image, "image_pull_policy": "Never", "volumes": volumes,
                       "volume_mounts": mounts})
    gateway = Gateway(
        reactor, workdir, 120.0, "legacy",
        kernelspec_path=specs,
        response_ip=cluster.host_ip,
        kubernetes_config=cluster.kubeconfig,
        kubernetes_namespace="default",
        kubernetes_delete_grace=2,
        persistence="false",
    )
    results: dict[str, Any] = {"load_average_at_start": os.getloadavg()[0]}
    try:
        await gateway.start()

        async def start_and_delete(kind: str, spec: str) -> Sample:
            started = await gateway.start_kernel(spec)
            if kind == "pod":
                started.phases = _phase_offsets(gateway.manager.kernels.get(started.kernel_id), pod_phase_names)
            await gateway.shutdown(started)
            return Sample(started.ready_s, started)

        # The first round, unmeasured, warms up imports, the page cache and the namespace's watches.
        samples = await take_turns(
            {kind: lambda kind=kind, spec=spec: start_and_delete(kind, spec)
             for kind, spec in (("local", LOCAL_SPEC), ("pod", POD_SPEC))},
            args.starts,
        )
        ready = seconds(samples)
        start: dict[str, Any] = {}
        for kind, figures in summarize(ready).items():
            start[kind] = {"median_s": figures["median"], "min_s": figures["min"], "max_s": figures["max"],
                           "samples_s": ready[kind], "n": figures["n"]}
        start["pod"]["phases_median_s"] = _median_offsets([s.detail.phases for s in samples["pod"]])
        results["start"] = start

        from twisted.internet.defer import DeferredList, ensureDeferred

        n = args.concurrent
        begin = time.perf_counter()
        outcomes = await DeferredList([ensureDeferred(gateway.start_kernel(POD_SPEC)) for _ in range(n)],
                                      consumeErrors=True)
        all_ready = time.perf_counter() - begin
        ready_kernels = [value for ok, value in outcomes if ok]
        errors = [str(value.value)[:200] for ok, value in outcomes if not ok]
        begin = time.perf_counter()
        await DeferredList([ensureDeferred(gateway.shutdown(s)) for s in ready_kernels], consumeErrors=True)
        results["concurrent"] = {
            "n": n,
            "ready": len(ready_kernels),
            "until_last_ready_s": all_ready,
            "ready_median_s": statistics.median(s.ready_s for s in ready_kernels) if ready_kernels else None,
            "delete_all_s": time.perf_counter() - begin,
            "errors": errors[:5],
        }
    finally:
        await _within(gateway.stop(), 120, "stopping the gateway", reactor)
    return results


def table(results: dict[str, Any]) -> str:
    start, concurrent = results["start"], results["concurrent"]
    lines = [
        f"load average at start: {results['load_average_at_start']:.2f}",
        f"start (POST to kernel_info_reply, median of {start['pod']['n']}):",
        f"  local kernel  {start['local']['median_s']:.3f} s (min {start['local']['min_s']:.3f}, "
        f"max {start['local']['max_s']:.3f})",
        f"  pod kernel    {start['pod']['median_s']:.3f} s (min {start['pod']['min_s']:.3f}, "
        f"max {start['pod']['max_s']:.3f}); ratio {start['pod']['median_s'] / start['local']['median_s']:.2f}",
        "  pod phases (median seconds from the request): "
        + ", ".join(f"{k} {v:.3f}" for k, v in start["pod"]["phases_median_s"].items()),
        f"concurrent: {concurrent['ready']}/{concurrent['n']} pod kernels ready, the last after "
        f"{concurrent['until_last_ready_s']:.2f} s; all deleted in {concurrent['delete_all_s']:.2f} s",
    ]
    if concurrent["errors"]:
        lines.append(f"  errors: {concurrent['errors']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark pod kernels on a real single-node Kubernetes.")
    parser.add_argument("--quick", action="store_true", help="2 starts and 5 concurrent kernels")
    parser.add_argument("--starts", type=int, default=10, help="measured starts per side (default 10)")
    parser.add_argument("--concurrent", type=int, default=50, help="pod kernels started at once (default 50)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.starts, args.concurrent = 2, 5

    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react

    from tests.fixtures.kubecluster import KubeCluster

    workdir = tempfile.mkdtemp(prefix="egw-bench-k8s-")
    cluster = KubeCluster(tempfile.mkdtemp(prefix="egk-", dir="/tmp"))
    print("bringing up the cluster (about 21 s) ...", flush=True)
    began = time.perf_counter()
    try:
        cluster.up()
        print(f"cluster up in {time.perf_counter() - began:.1f} s", flush=True)
        outcome: dict[str, Any] = {}

        async def run(_: Any) -> None:
            outcome.update(await measure(reactor, args, cluster, workdir))

        try:
            react(lambda r: ensureDeferred(run(r)))
        except SystemExit as e:
            if e.code not in (0, None):
                return int(e.code)
        print(table(outcome))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(outcome, f, indent=2)
        return 0 if outcome["concurrent"]["ready"] == outcome["concurrent"]["n"] else 3
    finally:
        began = time.perf_counter()
        cluster.down()
        print(f"cluster down in {time.perf_counter() - began:.1f} s; left behind: {cluster.leftovers() or 'nothing'}")
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
