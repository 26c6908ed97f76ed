"""
Kernel starts of several kinds measured in turns through one gateway, each
against a local kernel: the loop, the local kernelspec and the report that
C{bench/docker.py}, C{bench/yarn.py}, C{bench/pods.py} and
C{bench/pools.py} share.

Kinds take turns (local, docker, swarm, local, ...) rather than running
one after the other, so a change of the machine's load during the run
weighs on every kind alike; the first round warms up (imports, page cache,
images, watches) and is not counted.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, Sequence

from tests.support.remote_kernels import kernelspec


@dataclass
class Sample:
    """
    One start: C{seconds} as the kind measures it, and what else it
    reported (the kernel's model, its phases ...) in C{detail}.
    """

    seconds: float
    detail: Any = None


Starter = Callable[[], Awaitable[Sample]]


def write_local_spec(directory: str, name: str = "local") -> None:
    """
    A kernelspec C{name} in C{directory} starting this Python's ipykernel
    on this machine: the baseline every kind is set against.
    """
    os.makedirs(os.path.join(directory, name))
    with open(os.path.join(directory, name, "kernel.json"), "w") as f:
        json.dump(kernelspec(name, [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]), f)


async def post_and_delete(gateway: Any, spec: str, env: Mapping[str, str] | None = None) -> Sample:
    """
    C{POST /api/kernels} for C{spec} (the gateway answers once the kernel
    is ready), then C{DELETE} it; the seconds until the 201, with the
    kernel's model as the detail.

    @param gateway: a L{tests.support.gateway.InProcessGateway}, started.
    @raise RuntimeError: the POST did not answer 201.
    """
    body: dict[str, Any] = {"name": spec}
    if env is not None:
        body["env"] = dict(env)
    started = time.perf_counter()
    code, model = await gateway.request("POST", "api/kernels", body)
    elapsed = time.perf_counter() - started
    if code != 201:
        raise RuntimeError(f"{spec}: POST /api/kernels answered {code}: {model}")
    await gateway.request("DELETE", f"api/kernels/{model['id']}")
    return Sample(elapsed, model)


async def take_turns(
    starters: Mapping[str, Starter],
    starts: int,
    describe: Callable[[str, Sample], str] | None = None,
) -> dict[str, list[Sample]]:
    """
    C{starts + 1} rounds, each starting one kernel of every kind in
    C{starters}' order; the samples per kind, the first round left out.

    Each round's figures are printed as they come, with C{describe}'s
    text after the seconds.
    """
    width = max(len(kind) for kind in starters)
    samples: dict[str, list[Sample]] = {kind: [] for kind in starters}
    for round_ in range(starts + 1):
        for kind, start in starters.items():
            sample = await start()
            if round_:  # the first round warms up
                samples[kind].append(sample)
            extra = f"  {describe(kind, sample)}" if describe is not None else ""
            print(f"  {kind:{width}} start {round_}: {sample.seconds:.3f} s{extra}", flush=True)
    return samples


async def posts_in_turns(
    kinds: Sequence[str], starts: int, describe: Callable[[str, Sample], str] | None = None, **settings: Any
) -> dict[str, list[Sample]]:
    """
    L{take_turns} with L{post_and_delete} for each kernelspec in C{kinds},
    through one in-process gateway started with C{settings} for the run.
    """
    from tests.support.gateway import InProcessGateway

    gateway = InProcessGateway(**settings)
    await gateway.start()
    try:
        return await take_turns(
            {kind: lambda kind=kind: post_and_delete(gateway, kind) for kind in kinds}, starts, describe
        )
    finally:
        await gateway.stop()


def seconds(samples: Mapping[str, list[Sample]]) -> dict[str, list[float]]:
    """
    The seconds of each kind's samples.
    """
    return {kind: [s.seconds for s in items] for kind, items in samples.items()}


def summarize(samples: Mapping[str, list[float]]) -> dict[str, dict[str, float]]:
    """
    The median, minimum, maximum and count of each kind's seconds.
    """
    return {
        kind: {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
        for kind, values in samples.items()
    }


def print_summary(summary: Mapping[str, Mapping[str, float]], starts: int, baseline: str = "local") -> None:
    """
    One line a kind: median, minimum, maximum and the median's ratio to
    C{baseline}'s, of C{starts} starts per kind after one warm-up.
    """
    width = max(len(kind) for kind in summary)
    print(f"\nPOST /api/kernels -> ready (s), {starts} starts per kind after one warm-up:")
    for kind, figures in summary.items():
        ratio = figures["median"] / summary[baseline]["median"]
        print(f"  {kind:{width}} median {figures['median']:.3f}  min {figures['min']:.3f}  max {figures['max']:.3f}"
              f"  ({ratio:.2f}x {baseline})")


def run_in_reactor(work: Callable[[Any], Awaitable[Any]]) -> Any:
    """
    Run C{work(reactor)} in the global reactor until it ends; what it
    returned, or the L{Failure} it raised.
    """
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    outcome: list[Any] = []
    d = Deferred.fromCoroutine(work(reactor))
    d.addBoth(outcome.append).addBoth(lambda _: reactor.stop())
    reactor.run()
    return outcome[0] if outcome else None


def run_with_fixture(
    fixture: Any, write_specs: Callable[[str], None], work: Callable[[Any, str], Awaitable[Any]]
) -> Any:
    """
    Bring C{fixture} up (a test fixture with C{up}, C{down} and
    C{leftovers}), write the kernelspecs into a new directory, run
    C{work(reactor, directory)} in the reactor and remove it all again,
    also after an error; what L{run_in_reactor} returned.
    """
    specs = tempfile.mkdtemp(prefix="egw-specs-")
    try:
        fixture.up()
        write_specs(specs)
        return run_in_reactor(lambda reactor: work(reactor, specs))
    finally:
        fixture.down()
        shutil.rmtree(specs, ignore_errors=True)
        left = fixture.leftovers()
        if left:
            print(f"left behind: {left}", file=sys.stderr)
