"""
Fuzzing the REST API of a real daemon with schemathesis, driven by the
OpenAPI document the daemon serves.

Three schemathesis runs go at once, each a child process with its own
credentials: the gateway's token, none (schemathesis then sends no
C{Authorization} header, an empty one or random strings), and a well-formed
wrong token.  Every response must conform to the document (status code,
content type, headers, body schema), none may be a server error, and every
request must be answered within the per-request timeout.

Why not schemathesis's C{positive_data_acceptance} and
C{negative_data_rejection} checks: they judge how tightly the request
schemas describe what the server accepts, and the Jupyter API is lenient by
design (unknown body keys are ignored; an unknown profile is a 400 although
any string fits the schema; OpenAPI 3.0 cannot say which names C{env}
admits).  Why not C{ensure_resource_availability}: its stateful scenarios
delete a session's kernel and then expect the session to be there still,
while a session goes with its kernel (as in jupyter_server, which drops a
session whose kernel is gone); the links it infers cannot say so.

The daemon allows three kernels, so most generated starts are refused at
once (403) and the run stays bounded; the kernels it did start are deleted
at the end, and the daemon's cleanup fails the test if any process is left.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import SkipTest, TestCase

from tests.support.daemon import ChildProcess, _bounded, start_gateway

TOKEN = "fuzz-t0ken-Jd83kq"
MINIMUM_REQUESTS = 5000
REQUEST_TIMEOUT = 15.0
"""
Seconds a single request may take before schemathesis reports it (a hang);
a kernel start takes about a second on a loaded machine.
"""
RUN_TIMEOUT = 240.0

CHECKS = [
    "--checks", "all",
    "--exclude-checks", "positive_data_acceptance,negative_data_rejection,ensure_resource_availability",
]


@dataclass
class FuzzRun:
    """
    One schemathesis run: its credentials, how many examples per operation,
    and what came of it.
    """

    name: str
    header: str | None
    max_examples: int
    phases: str = "examples,coverage,fuzzing,stateful"
    exit_code: int | None = None
    log_path: str = ""
    statuses: Counter[Any] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)
    scenario_errors: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    def config(self) -> str:
        """
        The run's schemathesis.toml.  Restarting a real kernel takes about
        half a second, so restarts get few examples.
        """
        return (
            f"[generation]\nmax-examples = {self.max_examples}\n\n"
            '[[operations]]\ninclude-path-regex = "/restart$"\n'
            "generation.max-examples = 5\n"
        )

    def read_report(self, directory: str) -> None:
        """
        Count every request of the run's NDJSON report by status, and note
        server errors, requests without an answer and scenarios that ended
        in an error.
        """
        for path in glob.glob(os.path.join(directory, "*.ndjson")):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    event = json.loads(line)
                    finished = event.get("ScenarioFinished")
                    if finished is None:
                        continue
                    recorder = finished.get("recorder", {})
                    if finished.get("status") == "error":
                        self.scenario_errors.append(f"{finished.get('phase')} {recorder.get('label')}")
                    for interaction in recorder.get("interactions", {}).values():
                        request = interaction["request"]
                        what = f"{request['method']} {request['uri']}"
                        response = interaction.get("response")
                        if not response:
                            self.statuses["no answer"] += 1
                            self.unanswered.append(what)
                            continue
                        status = response["status_code"]
                        self.statuses[status] += 1
                        if status >= 500:
                            self.server_errors.append(f"{what} -> {status}")


class SchemathesisFuzz(TestCase):
    timeout = 420

    async def test_fuzz(self) -> None:
        """
        At least 5,000 generated requests with valid, missing and wrong
        credentials get answers conforming to the served OpenAPI document,
        no server error and no hang, and leave no kernel behind.
        """
        try:
            import schemathesis  # noqa: F401
        except ImportError:
            raise SkipTest("schemathesis is not installed (pip install '.[test]')")
        gateway = await start_gateway(
            self,
            token=TOKEN,
            flags={
                "max-kernels": "3",
                "list-kernels": "true",
                # So the document lists /metrics, and it is fuzzed too.
                "metrics-token": "metrics-t0ken",
                # Wrong credentials keep reaching the authenticators instead
                # of the 429 fast path; test_auth covers the limit.
                "auth-failure-limit": "0",
            },
        )
        workdir = gateway.workdir
        document = os.path.join(workdir, "openapi.json")
        with open(document, "w", encoding="utf-8") as f:
            json.dump(await gateway.api.call("GET", "api/openapi.json"), f)

        runs = [
            FuzzRun("valid token", f"Authorization: token {TOKEN}", 130),
            FuzzRun("no or generated credentials", None, 70),
            FuzzRun("wrong token", "Authorization: token not-the-t0ken", 60, phases="coverage,fuzzing"),
        ]
        started = reactor.seconds()
        await gatherResults(
            [Deferred.fromCoroutine(self._fuzz(run, gateway.url, document, workdir)) for run in runs]
        )
        elapsed = reactor.seconds() - started

        for kernel_id in await gateway.kernel_ids():
            await gateway.api.call("DELETE", f"api/kernels/{kernel_id}", expect=204)
        self.assertEqual(await gateway.kernel_ids(), [])
        self.assertEqual(gateway.kernel_processes(), [])

        total = Counter[Any]()
        for run in runs:
            total.update(run.statuses)
        summary = "; ".join(
            f"{run.name}: {run.requests} requests {dict(sorted(run.statuses.items(), key=str))}"
            for run in runs
        )
        print(
            f"\nfuzz: {sum(total.values())} requests in {elapsed:.1f} s; "
            f"{dict(sorted(total.items(), key=str))}\nfuzz: {summary}"
        )
        for run in runs:
            self.assertEqual(run.server_errors, [], f"{run.name}: server errors")
            self.assertEqual(run.unanswered, [], f"{run.name}: requests without an answer")
            self.assertEqual(
                (run.exit_code, run.scenario_errors),
                (0, []),
                f"{run.name}: schemathesis found problems; its output ends:\n{_tail(run.log_path)}",
            )
        self.assertGreaterEqual(sum(total.values()), MINIMUM_REQUESTS)

    async def _fuzz(self, run: FuzzRun, url: str, document: str, workdir: str) -> None:
        """
        Run schemathesis against C{url} in a child process, bounded by
        L{RUN_TIMEOUT}, and read its report into C{run}.
        """
        slug = run.name.replace(" ", "-")
        directory = os.path.join(workdir, f"fuzz-{slug}")
        os.makedirs(directory)
        config = os.path.join(directory, "schemathesis.toml")
        with open(config, "w", encoding="utf-8") as f:
            f.write(run.config())
        argv = [
            os.path.join(os.path.dirname(sys.executable), "schemathesis"),
            "--no-color",
            "--config-file", config,
            "run", document,
            "--url", url,
            *CHECKS,
            "--phases", run.phases,
            "--request-timeout", str(REQUEST_TIMEOUT),
            # One worker: schemathesis's threads race in Python 3.11's
            # ast.parse; three processes keep two cores busy anyway.
            "--workers", "1",
            "--no-shrink",
            "--suppress-health-check", "all",
            "--generation-database", "none",
            "--report", "ndjson",
            "--report-dir", directory,
        ]
        if run.header is not None:
            argv += ["--header", run.header]
        process = ChildProcess(f"schemathesis ({run.name})", os.path.join(directory, "output.log"), reactor)
        run.log_path = process.log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EG_", "KG_"))}
        process.start(argv, env, directory)
        try:
            await _bounded(process.when_ended(), RUN_TIMEOUT, reactor)
        except TimeoutError:
            await process.stop(5)
            self.fail(f"schemathesis ({run.name}) did not finish within {RUN_TIMEOUT:g} s:\n{_tail(run.log_path)}")
        run.exit_code = process.code
        run.read_report(directory)


def _tail(path: str, size: int = 6000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(no output: {e})"
