"""
Kernels as Slurm jobs: the sbatch options and value checks without Slurm
(synchronous, with a scripted stand-in for Slurm's commands), then a real
Slurm cluster (slurmctld, two slurmd nodes in network namespaces) for the
launcher contract and for kernels started through an in-process gateway.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from types import SimpleNamespace
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from egateway.clusters.interface import LaunchError, LauncherContext, LaunchSettings, Phase, Placement
from egateway.clusters.commands import CommandResult
from egateway.clusters.slurm import SlurmKernelProcess, SlurmLauncher
from egateway.clusters.slurm_jobs import (
    BATCH_SCRIPT,
    JobResources,
    JobState,
    job_environment,
    job_resources,
    never_starts,
    parse_job_id,
    parse_memory,
    parse_squeue,
    parse_time_limit,
    sbatch_arguments,
)
from egateway.config import build_config
from egateway.kernels.specs import KernelSpec
from egateway.wire.channels import ConnectionInfo
from tests.fixtures import SlurmCluster
from tests.fixtures.system import SLURM_PACKAGES, require_packages
from tests.fixtures._network import BridgedNamespaces
from tests.support.contract import LauncherContract, request_for
from tests.support.forgery import Gate, forged_v1, pending_launch, run_here, send_from
from tests.support.gateway import GatewayTestCase, pid_alive
from tests.support.polling import eventually
from tests.support.remote_kernels import interrupt_sleeping_cell, kernelspec, launcher_argv, write_spec
from tests.support.wsclient import ChannelsClient
from tests.support.threads import started_pool

ACTIVE = "PD,CF,R,CG,S,ST,SI,RS,RQ,RH,RF,RD,SO"
"""
squeue's short names of every state in which a job still holds (or waits
for) a node.
"""



def slurm_spec(name: str, config: dict[str, Any], argv: list[str] | None = None) -> dict[str, Any]:
    return kernelspec(name, argv or launcher_argv(), "slurm", config=config)


# -- no Slurm at all ------------------------------------------------------


def settings(**overrides: Any) -> Any:
    values = {"slurm-" + k.replace("_", "-"): str(v) for k, v in overrides.items()}
    return build_config({}, {}, values).slurm


class ValueTests(SynchronousTestCase):
    def test_memory(self) -> None:
        """
        Memory sizes read as Slurm reads them (no unit: MB), rounded up to
        whole MB; zero (Slurm's "all the memory") and garbage are refused.
        """
        self.assertEqual(parse_memory("512"), 512)
        self.assertEqual(parse_memory("512M"), 512)
        self.assertEqual(parse_memory("4g"), 4096)
        self.assertEqual(parse_memory("2GB"), 2048)
        self.assertEqual(parse_memory("1T"), 1024 * 1024)
        self.assertEqual(parse_memory("1500K"), 2)
        for bad in ("0", "0G", "-1G", "4 GiB", "1e3", "", "4G,8G", "12Q"):
            self.assertRaises(ValueError, parse_memory, bad)

    def test_time_limits(self) -> None:
        """
        Every Slurm time format parses to seconds; zero (Slurm's "no limit")
        and garbage are refused; UNLIMITED is recognised as no limit.
        """
        self.assertEqual(parse_time_limit("90"), 90 * 60)
        self.assertEqual(parse_time_limit("90:30"), 90 * 60 + 30)
        self.assertEqual(parse_time_limit("8:00:00"), 8 * 3600)
        self.assertEqual(parse_time_limit("1-12"), 36 * 3600)
        self.assertEqual(parse_time_limit("1-0:30"), 86400 + 1800)
        self.assertEqual(parse_time_limit("2-01:02:03"), 2 * 86400 + 3723)
        self.assertIsNone(parse_time_limit("UNLIMITED"))
        for bad in ("0", "0:00", "1:2:3:4", "-5", "8h", "", "1-", "--time=5"):
            self.assertRaises(ValueError, parse_time_limit, bad)

    def test_never_starts(self) -> None:
        """
        Reasons that waiting cannot fix are told apart from ordinary waits.
        """
        for reason in ("PartitionConfig", "PartitionTimeLimit", "QOSMaxCpuPerJobLimit",
                       "AssocMaxWallDurationPerJobLimit", "QOSMinGRES", "InvalidAccount"):
            self.assertTrue(never_starts(reason), reason)
        for reason in ("Resources", "Priority", "None", "ReqNodeNotAvail, UnavailableNodes:n1", "QOSGrpCpuLimit",
                       "AssocMaxJobsLimit", "JobHeldUser", "BeginTime", "Dependency"):
            self.assertFalse(never_starts(reason), reason)

    def test_squeue_and_sbatch_output(self) -> None:
        """
        The job's own squeue line is found (reasons may contain spaces), and
        sbatch's job id is read with or without a cluster name.
        """
        out = b"7|RUNNING|n2|egateway-k|None\n12|PENDING||egateway-x|ReqNodeNotAvail, UnavailableNodes:n1\n"
        state = parse_squeue(out, "12")
        self.assertEqual((state.state, state.node, state.reason, state.name),
                         ("PENDING", "", "ReqNodeNotAvail, UnavailableNodes:n1", "egateway-x"))
        self.assertTrue(state.waiting)
        self.assertTrue(parse_squeue(out, "7").running)
        self.assertIsNone(parse_squeue(out, "1"))
        self.assertEqual(parse_job_id(b"42\n"), "42")
        self.assertEqual(parse_job_id(b"42;cluster\n"), "42")
        self.assertRaises(ValueError, parse_job_id, b"sbatch: error: nope\n")


class BatchScriptTests(SynchronousTestCase):
    def test_token_on_stdin_not_in_the_environment(self) -> None:
        """
        The batch script hands the launch token to the launcher on its
        stdin: the launcher's initial environment (it becomes the kernel)
        has neither the token nor its variable; arguments pass unchanged.
        """
        show = (
            "import json, os, sys; print(json.dumps([sys.stdin.readline().strip(), "
            "os.environ.get('EG_LAUNCH_TOKEN_STDIN'), b'the-token' in open('/proc/self/environ', 'rb').read(), "
            "sys.argv[1:]]))"
        )
        directory = self.mktemp()
        os.makedirs(directory)
        script = os.path.join(directory, "batch.sh")
        with open(script, "wb") as f:
            f.write(BATCH_SCRIPT)
        result = subprocess.run(
            ["sh", script, sys.executable, "-c", show, "a b", "$x"],
            env=dict(os.environ, EG_LAUNCH_TOKEN="the-token"), capture_output=True, timeout=30, check=True,
        )
        self.assertEqual(json.loads(result.stdout), ["the-token", "1", False, ["a b", "$x"]])


class ResourceTests(SynchronousTestCase):
    def test_precedence(self) -> None:
        """
        A client's KERNEL_* value beats the kernelspec's config, which beats
        the gateway's setting; a request with nothing set asks for nothing
        beyond one task on one node.
        """
        gateway = settings(partition="batch", account="lab", time_limit="1:00:00")
        spec = {"partition": "interactive", "cpus": 2, "memory": "4G", "allowed_partitions": ["gpu", "interactive"]}
        resources = job_resources({"KERNEL_SLURM_PARTITION": "gpu", "KERNEL_CPUS": "3"}, spec, gateway)
        self.assertEqual(
            resources.options(),
            ["--nodes=1", "--ntasks=1", "--partition=gpu", "--account=lab", "--time=1:00:00",
             "--cpus-per-task=3", "--mem=4096M"],
        )
        self.assertEqual(resources.from_client, ("KERNEL_SLURM_PARTITION", "KERNEL_CPUS"))
        self.assertEqual(job_resources({}, {}, settings()).options(), ["--nodes=1", "--ntasks=1"])
        self.assertEqual(job_resources({"KERNEL_CPUS": ""}, {}, settings()).from_client, ())

    def test_client_values_within_bounds(self) -> None:
        """
        Client values up to the kernelspec's maxima (or the gateway's) are
        accepted, GPUs as a gres request.
        """
        spec = {"max_cpus": 16, "max_memory": "64G", "max_gpus": 2, "max_time_limit": "2-00:00:00",
                "allowed_accounts": "lab, other", "allowed_qos": ["high"]}
        env = {"KERNEL_CPUS": "16", "KERNEL_MEMORY": "64G", "KERNEL_GPUS": "2", "KERNEL_SLURM_TIME": "1-12:00:00",
               "KERNEL_SLURM_ACCOUNT": "other", "KERNEL_SLURM_QOS": "high"}
        self.assertEqual(
            job_resources(env, spec, settings()).options(),
            ["--nodes=1", "--ntasks=1", "--account=other", "--qos=high", "--time=1-12:00:00",
             "--cpus-per-task=16", "--mem=65536M", "--gres=gpu:2"],
        )
        self.assertEqual(job_resources({"KERNEL_CPUS": "4"}, {}, settings()).cpus, 4)

    def test_client_values_refused(self) -> None:
        """
        Malformed or out-of-bounds client values fail with 400, naming the
        variable and never echoing more than a short prefix of the value.
        """
        spec = {"allowed_partitions": ["debug"], "max_cpus": 8}
        cases = {
            "KERNEL_CPUS": ["0", "9", "-1", "two", "1.5", "1 --mem=0", "9" * 50],
            "KERNEL_MEMORY": ["0", "9G", "all", "4G --gres=gpu:8"],
            "KERNEL_GPUS": ["1", "-1", "x"],
            "KERNEL_SLURM_TIME": ["UNLIMITED", "0", "1-00:00:01", "5 --qos=high"],
            "KERNEL_SLURM_PARTITION": ["other", "debug,gpu", "--partition=x", "de bug", "-debug"],
            "KERNEL_SLURM_ACCOUNT": ["lab"],
            "KERNEL_SLURM_QOS": ["high"],
        }
        for name, values in cases.items():
            for value in values:
                with self.assertRaises(LaunchError, msg=f"{name}={value!r}") as caught:
                    job_resources({name: value}, spec, settings())
                self.assertEqual(caught.exception.status, 400, f"{name}={value!r}")
                self.assertIn(name, str(caught.exception))

    def test_bad_kernelspec_values(self) -> None:
        """
        A kernelspec's own malformed values fail with 500 (the operator's
        problem), naming the key; its values are not bounded by the maxima.
        """
        for config in ({"cpus": "many"}, {"memory": "lots"}, {"time_limit": "8h"}, {"partition": "a b"},
                       {"sbatch_options": "--exclusive"}, {"sbatch_options": ["exclusive"]}):
            with self.assertRaises(LaunchError) as caught:
                job_resources({}, config, settings())
            self.assertEqual(caught.exception.status, 500)
            self.assertIn("kernelspec config", str(caught.exception))
        for config, env in (({"max_memory": "lots"}, {"KERNEL_MEMORY": "1G"}),
                            ({"max_cpus": "many"}, {"KERNEL_CPUS": "1"}),
                            ({"max_time_limit": "8h"}, {"KERNEL_SLURM_TIME": "60"})):
            with self.assertRaises(LaunchError) as caught:
                job_resources(env, config, settings())
            self.assertEqual(caught.exception.status, 500)
            self.assertIn(f"kernelspec config {next(iter(config))!r}", str(caught.exception))
        self.assertEqual(job_resources({}, {"cpus": 64}, settings()).cpus, 64)
        self.assertEqual(
            job_resources({}, {"sbatch_options": ["--constraint=fast"]}, settings()).options()[-1],
            "--constraint=fast",
        )

    def test_sbatch_arguments(self) -> None:
        """
        sbatch reads the constant script from stdin; the kernel's argv follows
        it verbatim, one argument each, after every option.
        """
        hostile = ["python", "x'; touch /tmp/p; echo '", "$(id)", "--partition=evil", "a b"]
        resources = JobResources(partition="debug", cpus=2)
        args = sbatch_arguments(resources, "egateway-k", "/logs/kernel-k.log", "", hostile)
        self.assertEqual(
            args,
            ["--parsable", "--job-name=egateway-k", "--output=/logs/kernel-k.log", "--open-mode=append",
             "--export=ALL", "--no-requeue", "--nodes=1", "--ntasks=1", "--partition=debug",
             "--cpus-per-task=2", "/dev/stdin", *hostile],
        )
        self.assertTrue(BATCH_SCRIPT.startswith(b"#!/bin/sh\n"))
        self.assertIn(b'exec "$@"', BATCH_SCRIPT)

    def test_job_environment(self) -> None:
        """
        The job gets the kernel's variables and the launch token, but none of
        Slurm's own input variables, which would act as sbatch options.
        """
        env = job_environment(
            {"KERNEL_USERNAME": "ann", "PATH": "/bin", "SBATCH_PARTITION": "evil", "SLURM_CONF": "/evil",
             "SALLOC_ACCOUNT": "x", "EG_LAUNCH_TOKEN": "forged", "bad name": "x"},
            "the-token",
            "/etc/slurm/slurm.conf",
        )
        self.assertEqual(
            env,
            {"KERNEL_USERNAME": "ann", "PATH": "/bin", "EG_LAUNCH_TOKEN": "the-token",
             "SLURM_CONF": "/etc/slurm/slurm.conf"},
        )


class FakeListener:
    running = True
    response_address = "10.0.0.1:8877"
    public_key = "cHVibGlj"

    def __init__(self) -> None:
        self.pending: list[Any] = []

    def expect(self, kernel_id: str, **kw: Any) -> Any:
        pending = SimpleNamespace(
            token="tok", version=None, comm_token=None, received=Deferred(), cancelled=False, hosts=None,
        )
        pending.cancel = lambda: setattr(pending, "cancelled", True)
        pending.expect_from = lambda hosts: setattr(pending, "hosts", list(hosts))
        self.pending.append(pending)
        return pending


class ScriptedCommands:
    """
    Slurm's commands as a script: each call is recorded and answered by
    C{answer(name, args)}, a L{CommandResult} or a Deferred of one.
    """

    slurm_conf = "/etc/slurm/slurm.conf"

    def __init__(self, answer: Callable[[str, list[str]], Any]) -> None:
        self.answer = answer
        self.calls: list[tuple[str, list[str], dict[str, Any]]] = []

    def executable(self, name: str) -> str:
        return f"/usr/bin/{name}"

    def run(self, name: str, args: list[str], **kw: Any) -> Deferred[CommandResult]:
        self.calls.append((name, list(args), kw))
        result = self.answer(name, list(args))
        return result if isinstance(result, Deferred) else succeed(result)

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]


def ok(stdout: bytes = b"", stderr: bytes = b"") -> CommandResult:
    return CommandResult(("x",), 0, None, stdout, stderr)


def squeue_says(state: str, reason: str = "None", node: str = "") -> Callable[[str, list[str]], Any]:
    def answer(name: str, args: list[str]) -> Any:
        if name == "sbatch":
            return ok(b"12\n")
        if name == "squeue":
            return ok(f"12|{state}|{node}|egateway-k|{reason}\n".encode())
        return ok()

    return answer


class LaunchFlowTests(SynchronousTestCase):
    """
    The launch's decisions, with Slurm scripted and time on a Clock.
    """

    def launcher(
        self, answer: Callable[[str, list[str]], Any], **flags: str
    ) -> tuple[SlurmLauncher, ScriptedCommands, Clock]:
        clock = Clock()
        config = build_config({}, {}, {"slurm-poll-interval": "0.5", **flags})
        context = LauncherContext(reactor=clock, runtime_dir="", ports=None, section=config.slurm,
                                  shared=LaunchSettings.from_config(config),
                                  services={"response": FakeListener()})
        launcher = SlurmLauncher(context)
        commands = ScriptedCommands(answer)
        launcher.slurm.commands = commands  # type: ignore[assignment]
        return launcher, commands, clock

    def request(self, env: dict[str, str] | None = None) -> tuple[Any, list]:
        spec = KernelSpec.from_json("s", "/nonexistent", slurm_spec("s", {"max_cpus": 64}))
        return request_for(str(uuid.uuid4()), spec, env=env)

    def test_never_starts_fails_fast_and_cancels(self) -> None:
        """
        A job pending with PartitionConfig fails the launch at the first
        poll, with 400 when the client's value caused it, and is cancelled.
        """
        launcher, commands, clock = self.launcher(squeue_says("PENDING", "PartitionConfig"))
        request, phases = self.request({"KERNEL_CPUS": "64"})
        failure = self.failureResultOf(launcher.launch(request), LaunchError)
        self.assertEqual(failure.value.status, 400)
        self.assertIn("can never start", str(failure.value))
        self.assertIn("PartitionConfig", str(failure.value))
        self.assertIn("64 CPUs", str(failure.value))
        self.assertEqual(commands.names(), ["sbatch", "squeue", "scancel"])
        self.assertEqual(commands.calls[-1][1], ["12"])
        self.assertEqual(phases, [(Phase.SUBMITTED, "Slurm job 12"),
                                  (Phase.SUBMITTED, "Slurm job 12 pending: PartitionConfig")])

    def test_pending_until_cancelled(self) -> None:
        """
        A job pending for Resources keeps being polled, its reason reported
        once; cancelling the launch (the manager's timeout) cancels the job.
        """
        launcher, commands, clock = self.launcher(squeue_says("PENDING", "Resources"))
        request, phases = self.request()
        d = launcher.launch(request)
        clock.pump([0.5] * 10)
        self.assertNoResult(d)
        self.assertEqual(commands.names().count("squeue"), 11)
        self.assertEqual(phases[-1], (Phase.SUBMITTED, "Slurm job 12 pending: Resources"))
        self.assertEqual(len(phases), 2)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(commands.calls[-1][:2], ("scancel", ["12"]))

    def test_cancelled_while_sbatch_runs(self) -> None:
        """
        A launch cancelled while sbatch still runs waits for sbatch's answer
        and cancels the job it submitted.
        """
        submitted: Deferred[CommandResult] = Deferred()
        launcher, commands, clock = self.launcher(lambda name, args: submitted if name == "sbatch" else ok())
        request, _ = self.request()
        d = launcher.launch(request)
        d.cancel()
        self.assertNoResult(d)
        submitted.callback(ok(b"77\n"))
        self.failureResultOf(d, CancelledError)
        self.assertEqual(commands.calls[-1][:2], ("scancel", ["77"]))

    def test_refused_submission(self) -> None:
        """
        sbatch's refusal is quoted without its "sbatch: error:" noise, and
        nothing is left to cancel.
        """
        refused = CommandResult(("sbatch",), 1, None, b"",
                                b"sbatch: error: Batch job submission failed: Invalid partition name specified\n")
        launcher, commands, clock = self.launcher(lambda name, args: refused)
        request, _ = self.request({"KERNEL_CPUS": "2"})
        failure = self.failureResultOf(launcher.launch(request), LaunchError)
        self.assertEqual(failure.value.status, 400)
        self.assertIn("Slurm refused the kernel job (asked for 2 CPUs): sbatch exited with code 1: "
                      "Batch job submission failed: Invalid partition name specified", str(failure.value))
        self.assertEqual(commands.names(), ["sbatch"])

    def test_submission_carries_no_secret_on_the_command_line(self) -> None:
        """
        The launch token reaches sbatch only through its environment, and
        the batch script through its stdin.
        """
        launcher, commands, clock = self.launcher(squeue_says("PENDING", "Priority"))
        request, _ = self.request({"KERNEL_USERNAME": "ann"})
        d = launcher.launch(request)
        name, args, kw = commands.calls[0]
        self.assertEqual(name, "sbatch")
        self.assertNotIn("tok", " ".join(args))
        self.assertEqual(kw["env"]["EG_LAUNCH_TOKEN"], "tok")
        self.assertEqual(kw["env"]["KERNEL_USERNAME"], "ann")
        self.assertEqual(kw["stdin"], BATCH_SCRIPT)
        self.assertIn(f"--job-name=egateway-{request.kernel_id}", args)
        d.cancel()
        self.failureResultOf(d, CancelledError)

    def test_how_jobs_end(self) -> None:
        """
        A job's end is told in Slurm's terms: its state, reason, exit code or
        signal, and whether the gateway cancelled it; a job still COMPLETING
        is asked again for its final state.
        """
        shown = {"13": b"JobId=13 JobState=FAILED Reason=NonZeroExitCode ExitCode=2:0 NodeList=n2",
                 "14": b"JobId=14 JobState=CANCELLED Reason=None ExitCode=0:15 NodeList=n1",
                 "15": b"JobId=15 JobState=TIMEOUT Reason=TimeLimit ExitCode=0:1 NodeList=n1"}
        final = [b"16|COMPLETED|n1|egateway-k|None\n"]

        def answer(name: str, args: list[str]) -> Any:
            if name == "scontrol":
                return ok(shown.get(args[-1], b"JobId=16 JobState=COMPLETED Reason=None ExitCode=0:0"))
            return ok(final[0])

        launcher, commands, clock = self.launcher(answer)

        def told(state: JobState, by_gateway: bool = False) -> str:
            return self.successResultOf(Deferred.fromCoroutine(launcher.slurm.describe_end(state.job_id, state, by_gateway)))

        self.assertEqual(told(JobState("13", "FAILED", "n2", "NonZeroExitCode")),
                         "Slurm job 13 on n2 ended FAILED (reason NonZeroExitCode, exit code 2)")
        self.assertEqual(told(JobState("14", "CANCELLED", "n1", "None")),
                         "Slurm job 14 on n1 was CANCELLED outside the gateway (signal 15)")
        self.assertEqual(told(JobState("14", "CANCELLED", "n1", "None"), by_gateway=True),
                         "Slurm job 14 on n1 was CANCELLED (signal 15)")
        self.assertEqual(told(JobState("15", "TIMEOUT", "n1", "TimeLimit")),
                         "Slurm job 15 on n1 reached its time limit (TIMEOUT) (reason TimeLimit, signal 1)")
        self.assertEqual(told(JobState("16", "COMPLETED", "", "None")), "Slurm job 16 ended COMPLETED")
        d = Deferred.fromCoroutine(launcher.slurm.describe_end("16", JobState("16", "COMPLETING", "n1", "None")))
        self.assertNoResult(d)
        clock.advance(0.2)
        self.assertEqual(self.successResultOf(d), "Slurm job 16 on n1 ended COMPLETED")
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(launcher.slurm.describe_end("17", None))),
                         "Slurm job 17 is no longer known to Slurm")

    def test_only_an_outside_cancel_is_a_decision(self) -> None:
        """
        A job CANCELLED by someone else ends its kernel as a decision (not to
        be undone by a restart); one the gateway cancelled, a time limit or a
        failure is not.
        """
        lines = {"14": b"14|CANCELLED|n1|egateway-k|None\n", "15": b"15|TIMEOUT|n1|egateway-k|TimeLimit\n",
                 "13": b"13|FAILED|n2|egateway-k|NonZeroExitCode\n"}

        def answer(name: str, args: list[str]) -> Any:
            if name == "squeue":
                return ok(lines[args[args.index("-j") + 1]])
            return ok(b"ExitCode=0:15")

        launcher, _, clock = self.launcher(answer)
        info = ConnectionInfo(ip="10.0.0.1", shell_port=1, iopub_port=2, stdin_port=3, control_port=4,
                              hb_port=5, key=b"k")

        def liveness(job_id: str, by_gateway: bool = False) -> Any:
            process = SlurmKernelProcess(launcher=launcher, job_id=job_id, node="n1", log_path="",
                                         kernel_id="k", info=info, placement=Placement(), reactor=clock,
                                         poll_interval=1)
            self.addCleanup(process.detach)
            process._cancelled = by_gateway
            return self.successResultOf(Deferred.fromCoroutine(process._check_alive()))

        outside = liveness("14")
        self.assertEqual((outside.alive, outside.decision), (False, True))
        self.assertIn("CANCELLED outside the gateway", outside.reason)
        self.assertFalse(liveness("14", by_gateway=True).decision)
        self.assertFalse(liveness("15").decision)
        self.assertFalse(liveness("13").decision)

    def test_missing_commands(self) -> None:
        """
        Slurm's commands missing from slurm_bin_dir fail the launch saying
        where the gateway looked and which setting to change.
        """
        config = build_config({}, {}, {"slurm-bin-dir": "/nonexistent/bin"})
        launcher = SlurmLauncher(LauncherContext(
            reactor=Clock(), runtime_dir="", ports=None, services={"response": FakeListener()},
            section=config.slurm, shared=LaunchSettings.from_config(config),
        ))
        request, _ = self.request()
        failure = self.failureResultOf(launcher.launch(request), LaunchError)
        self.assertIn("sbatch was not found in slurm_bin_dir /nonexistent/bin", str(failure.value))
        self.assertIn("EG_SLURM_BIN_DIR", str(failure.value))

    def test_bad_values_submit_nothing(self) -> None:
        """
        A malformed client value fails before sbatch runs.
        """
        launcher, commands, clock = self.launcher(squeue_says("RUNNING", node="n1"))
        request, _ = self.request({"KERNEL_MEMORY": "lots"})
        failure = self.failureResultOf(launcher.launch(request), LaunchError)
        self.assertEqual(failure.value.status, 400)
        self.assertEqual(commands.calls, [])


# -- a real Slurm cluster -------------------------------------------------




class SlurmMixin:
    """
    A two-node Slurm cluster per test (2 CPUs per node), torn down after
    it; every test must leave no job of its own holding a node.
    """

    slurm: SlurmCluster

    def start_slurm(self) -> None:
        require_packages(*SLURM_PACKAGES)
        self.slurm = SlurmCluster(tempfile.mkdtemp(prefix="egw-", dir="/tmp"), nodes=2, cpus=2)
        self.slurm.up()
        self.addCleanup(self._down)
        self.logs = os.path.abspath(self.mktemp())
        os.makedirs(self.logs)

    def _down(self) -> None:
        self.slurm.down()
        self.assertEqual(self.slurm.leftovers(), [])

    def jobs(self, states: str = ACTIVE) -> dict[str, tuple[str, str]]:
        """
        Kernel jobs (by name prefix) in C{states}: C{{job id: (state, name)}}.
        """
        out = self.slurm.run(["squeue", "-h", "-t", states, "-o", "%i|%T|%j"], check=True).stdout
        found = {}
        for line in out.splitlines():
            job_id, state, name = line.split("|", 2)
            if name.startswith("egateway-"):
                found[job_id] = (state, name)
        return found

    async def no_kernel_jobs(self) -> None:
        await eventually(lambda: not self.jobs(), "kernel jobs to leave the nodes", timeout=20)


class SlurmLauncherContract(SlurmMixin, LauncherContract, TestCase):
    """
    The Slurm launcher against the launcher contract, on real Slurm.
    """

    timeout = 120

    async def setUp(self) -> None:
        self.start_slurm()
        self.config = build_config(
            {},
            {},
            {
                "response-ip": self.slurm.controller_ip,
                "response-port": "0",
                "slurm-conf": self.slurm.conf_path,
                "slurm-log-dir": self.logs,
                "slurm-poll-interval": "0.2",
                "poll-interval": "1",
            },
        )
        self.services: dict[str, Any] = {}
        self.addCleanup(self._stop_listener)
        self.working = KernelSpec.from_json("working", "/nonexistent", slurm_spec("working", {}))
        self.broken = KernelSpec.from_json(
            "broken", "/nonexistent", slurm_spec("broken", {}, [sys.executable, "/nonexistent/x.py"])
        )

    async def _stop_listener(self) -> None:
        listener = self.services.get("response")
        if listener is not None and listener.running:
            await listener.stopService()

    async def make_launcher(self) -> Any:
        return SlurmLauncher(
            LauncherContext(reactor=reactor, runtime_dir="", ports=None, section=self.config.slurm,
                            shared=LaunchSettings.from_config(self.config),
                            services=self.services, threadpool=started_pool(self))
        )

    def make_request(self, kernel_id: str, spec_name: str = "working"):
        return request_for(kernel_id, self.working, timeout=30)

    def broken_request(self, kernel_id: str):
        return request_for(kernel_id, self.broken, timeout=30)

    async def leftovers(self, process: Any) -> list:
        """
        The kernel's job while it holds a node, and its process while it lives
        (the nodes share this host's process table).
        """
        def left() -> list:
            held = [f"job {job_id} {state}" for job_id, (state, _) in self.jobs().items()
                    if job_id == process.job_id]
            return held + ([process.placement.pid] if pid_alive(process.placement.pid) else [])

        try:
            await eventually(lambda: not left(), "the job to end", timeout=10)
        except AssertionError:
            pass
        return left()

    async def placed_leftovers(self, phases: list) -> list:
        try:
            await self.no_kernel_jobs()
        except AssertionError:
            pass
        return list(self.jobs())

    async def test_signal_through_slurm_and_outside_cancel(self) -> None:
        """
        Without the comm port, scancel --signal=INT interrupts a running cell
        and the kernel lives on; a job cancelled outside the gateway ends the
        kernel with Slurm's state, and can no longer be restored.
        """
        launcher, process, _, probe = await self.launched()
        self.assertEqual(self.jobs()[process.job_id][0], "RUNNING")
        running = Deferred.fromCoroutine(probe.execute("import time; time.sleep(60)", timeout=30))
        await deferLater(reactor, 1.0, lambda: None)
        await process._signal_directly(signal.SIGINT)
        self.assertEqual((await running).get("ename"), "KeyboardInterrupt")
        self.assertEqual((await probe.execute("1 + 1"))["status"], "ok")

        snapshot = json.loads(json.dumps(process.snapshot()))
        self.assertEqual(snapshot["job_id"], process.job_id)
        exited = process.when_exited()
        self.slurm.run(["scancel", process.job_id], check=True)
        status = await exited
        self.assertIn(f"Slurm job {process.job_id} on {process.node} was CANCELLED outside the gateway",
                      status.describe())
        self.assertTrue(status.decision)
        with self.assertRaises(LaunchError) as caught:
            await (await self.make_launcher()).restore(process.kernel_id, snapshot)
        self.assertIn("no longer running", str(caught.exception))
        self.assertIn("CANCELLED", str(caught.exception))


class SlurmGatewayTestCase(SlurmMixin, GatewayTestCase):
    """
    A gateway whose kernelspecs run kernels as jobs on the cluster.
    """

    timeout = 120
    extra_settings: dict[str, Any] = {}

    async def setUp(self) -> None:
        self.start_slurm()
        self.addCleanup(self.no_kernel_jobs)
        self.specs = os.path.abspath(self.mktemp())
        self.write_specs()
        self.gateway_settings = {
            "kernelspec_path": self.specs,
            "response_ip": self.slurm.controller_ip,
            "slurm_conf": self.slurm.conf_path,
            "slurm_log_dir": self.logs,
            "slurm_poll_interval": 0.2,
            "list_kernels": "true",
            "shutdown_wait": 3,
            "terminate_wait": 3,
            "poll_interval": 0.5,
            **self.extra_settings,
        }
        await super().setUp()

    def write_specs(self) -> None:
        """
        The kernelspecs in C{self.specs}.
        """
        config = {"cpus": 1, "max_cpus": 16, "allowed_partitions": ["debug"]}
        write_spec(self.specs, "slurm", launcher_argv(), "slurm", config=config)
        write_spec(self.specs, "broken", [sys.executable, "/nonexistent/launch.py", "{kernel_id}"], "slurm")

    async def start(self, env: dict[str, str] | None = None) -> dict[str, Any]:
        body = {"name": "slurm", **({"env": env} if env else {})}
        code, model = await self.gateway.request("POST", "api/kernels", body)
        self.assertEqual(code, 201, model)
        return model


class KernelJobTests(SlurmGatewayTestCase):
    async def test_kernels_on_two_nodes_interrupt_shutdown(self) -> None:
        """
        Two kernels asking for a whole node each (KERNEL_CPUS=2) run as jobs
        on different nodes and say so; a running cell is interrupted and the
        kernel survives; shutting both down leaves no job and no process.
        """
        first = await self.start({"KERNEL_CPUS": "2", "KERNEL_SLURM_PARTITION": "debug"})
        second = await self.start({"KERNEL_CPUS": "2"})
        models = {m["placement"]["host"]: m for m in (first, second)}
        self.assertEqual(set(models), {"n1", "n2"})
        for node, model in models.items():
            self.assertEqual(model["placement"]["ip"], self.slurm.node(node).ip)
            self.assertEqual(self.jobs()[model["placement"]["job_id"]],
                             ("RUNNING", f"egateway-{model['id']}"))
            phases = [p["phase"] for p in model["phases"]]
            self.assertEqual(phases[0], "queued")
            self.assertEqual(set(phases[1:-4]), {"submitted"})
            self.assertEqual(phases[-4:], ["placed", "connection info received", "connected", "ready"])
            self.assertEqual(model["phases"][1]["detail"], f"Slurm job {model['placement']['job_id']}")
            client = await ChannelsClient.connect(self.gateway.url, model["id"])
            result = await client.execute(
                "import os, json; print(json.dumps([os.environ.get(k) for k in "
                "('SLURMD_NODENAME', 'SLURM_JOB_ID', 'SLURM_CPUS_PER_TASK', 'EG_LAUNCH_TOKEN', 'KERNEL_ID')]"
                " + [b'EG_LAUNCH_TOKEN=' in open('/proc/self/environ', 'rb').read()]))"
            )
            # The token is not even in the kernel's initial environment.
            self.assertEqual(
                json.loads(result["stdout"]), [node, model["placement"]["job_id"], "2", None, model["id"], False]
            )
            await client.close()

        client = await ChannelsClient.connect(self.gateway.url, first["id"])
        await client.execute("x = 1")
        code, reply = await interrupt_sleeping_cell(client, self.gateway, first["id"])
        self.assertEqual(code, 204)
        self.assertEqual(reply["ename"], "KeyboardInterrupt")
        self.assertEqual((await client.execute("x + 1"))["result"]["text/plain"], "2")

        code, restarted = await self.gateway.request("POST", f"api/kernels/{first['id']}/restart")
        self.assertEqual(code, 200, restarted)
        old_job, new_job = first["placement"]["job_id"], restarted["placement"]["job_id"]
        self.assertNotEqual(new_job, old_job)
        self.assertEqual(self.jobs()[new_job][0], "RUNNING")
        self.assertEqual((await client.execute("'x' in dir()"))["result"]["text/plain"], "False")
        await eventually(lambda: old_job not in self.jobs(), "the old job to end")
        self.assertFalse(pid_alive(first["placement"]["pid"]))
        first = restarted
        await client.close()

        for model in (first, second):
            code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
            self.assertEqual(code, 204)
        await self.no_kernel_jobs()
        for model in (first, second):
            self.assertFalse(pid_alive(model["placement"]["pid"]))
            state = self.jobs("all")[model["placement"]["job_id"]][0]
            self.assertIn(state, ("COMPLETED", "CANCELLED", "FAILED"))


class ForgedHandshakeTests(SlurmGatewayTestCase):
    """
    Forged connection info while a kernel job is placed and its launcher
    has not reported yet, even with the operator's response_accept_v1 on.
    """

    extra_settings = {"response_accept_v1": "true"}

    def on_node(self, node: str) -> Callable[[list[str]], Any]:
        """
        Run an argv in node C{node}'s network namespace, as a user of that
        node would.
        """
        netns = BridgedNamespaces.netns_path(self.slurm.node(node).netns)
        return lambda argv: run_here(["nsenter", f"--net={netns}", "--", *argv])

    async def test_forged_v1_refused(self) -> None:
        """
        Version 1 connection info forged from the job's kernel id (which
        squeue shows every user) and the public key is refused, sent from
        the job's own node, from the other node or from the gateway's host;
        the genuine launcher's version 2 payload then delivers.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        gate = Gate(directory)
        write_spec(self.specs, "gated", gate.argv(launcher_argv()), "slurm", config={"cpus": 1})
        starting = Deferred.fromCoroutine(self.gateway.request("POST", "api/kernels", {"name": "gated"}))
        kernel, listener = await pending_launch(self.gateway)
        [node] = [e.detail.split()[0] for e in kernel.phases if e.phase == Phase.PLACED]
        other = ({"n1", "n2"} - {node}).pop()
        forged = forged_v1(kernel.id, listener.public_key)
        for where, run in ((node, self.on_node(node)), (other, self.on_node(other)), ("gateway", run_here)):
            self.assertEqual(await send_from(run, listener.response_address, forged), "ERROR refused", where)
        await gate.open()
        code, model = await starting
        self.assertEqual(code, 201, model)
        self.assertEqual(model["placement"]["host"], node)
        self.assertIn("payload v2", [p for p in model["phases"] if p["phase"] == "connection info received"][0]["detail"])
        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        result = await client.execute("import os; print(os.environ['SLURMD_NODENAME'])")
        await client.close()
        self.assertEqual(result["stdout"].strip(), node)
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)


class OutsideCancelTests(SlurmGatewayTestCase):
    async def test_scancel_makes_kernel_dead(self) -> None:
        """
        A kernel whose job is cancelled with scancel from outside becomes
        dead with Slurm's account of it, and its clients are told why; with
        the default restart_limit it is not resubmitted, since the
        cancellation was the operator's decision.
        """
        model = await self.start()
        job_id = model["placement"]["job_id"]
        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        self.slurm.run(["scancel", job_id], check=True)
        status = await client.wait_for(
            lambda m: m.get("msg_type") == "status" and m["content"]["execution_state"] == "dead", timeout=15
        )
        expected = f"Slurm job {job_id} on {model['placement']['host']} was CANCELLED outside the gateway"
        self.assertIn(expected, status["content"]["reason"])
        code, body = await self.gateway.request("GET", f"api/kernels/{model['id']}")
        self.assertEqual(code, 200)
        self.assertEqual(body["state"], "dead")
        self.assertIn(expected, body["reason"])
        self.assertEqual(body["restarts"], 0)
        await client.close()
        self.assertFalse(pid_alive(model["placement"]["pid"]))
        self.assertEqual([job for job, (_, name) in self.jobs("all").items() if name.endswith(model["id"])],
                         [job_id])


class SchedulingTests(SlurmGatewayTestCase):
    extra_settings = {"launch_timeout": 6}

    async def test_bad_impossible_failing_and_pending_requests(self) -> None:
        """
        Malformed KERNEL_* values are refused before anything is submitted; a
        request no node can hold fails fast with Slurm's reason; a job whose
        launcher dies at once fails fast quoting Slurm's state and the job's
        output; a job still pending at the launch timeout is cancelled and
        the error says it was pending and why.
        """
        for env, words in (
            ({"KERNEL_CPUS": "two"}, "KERNEL_CPUS"),
            ({"KERNEL_CPUS": "17"}, "more than the 16 allowed"),
            ({"KERNEL_SLURM_PARTITION": "other"}, "not allowed"),
            ({"KERNEL_MEMORY": "0"}, "KERNEL_MEMORY"),
        ):
            code, body = await self.gateway.request("POST", "api/kernels", {"name": "slurm", "env": env})
            self.assertEqual(code, 400, body)
            self.assertIn(words, body["message"])
        self.assertEqual(self.jobs("all"), {})

        started = reactor.seconds()
        code, body = await self.gateway.request("POST", "api/kernels", {"name": "slurm", "env": {"KERNEL_CPUS": "8"}})
        self.assertEqual(code, 400, body)
        self.assertLess(reactor.seconds() - started, 4)
        self.assertIn("can never start", body["message"])
        self.assertIn("PartitionConfig", body["message"])
        self.assertEqual([state for state, _ in self.jobs("all").values()], ["CANCELLED"])

        started = reactor.seconds()
        code, body = await self.gateway.request("POST", "api/kernels", {"name": "broken"})
        self.assertEqual(code, 500, body)
        self.assertLess(reactor.seconds() - started, 5)
        self.assertRegex(body["message"], r"Slurm job \d+ on n\d ended FAILED \(reason NonZeroExitCode, exit code 2\) "
                                          r"before the kernel sent its connection info; its output ")
        self.assertIn("No such file or directory", body["message"])
        self.assertEqual(sorted(state for state, _ in self.jobs("all").values()), ["CANCELLED", "FAILED"])

        blocker = self.slurm.run(
            ["sbatch", "--parsable", "-N", "2", "--ntasks-per-node=2", "-J", "blocker", "-o", "/dev/null",
             "--wrap", "sleep 300"],
            check=True,
        ).stdout.strip()
        self.slurm.wait_for_job(blocker, ["RUNNING"])
        started = reactor.seconds()
        code, body = await self.gateway.request("POST", "api/kernels", {"name": "slurm"})
        self.assertEqual(code, 504, body)
        self.assertGreaterEqual(reactor.seconds() - started, 5.5)
        self.assertIn("timed out after 6 s", body["message"])
        self.assertRegex(body["message"], r"last phase: submitted \(Slurm job \d+ pending: Resources\)")
        states = sorted(state for state, _ in self.jobs("all").values())
        self.assertEqual(states, ["CANCELLED", "CANCELLED", "FAILED"])
        self.assertEqual(self.gateway.manager.kernels, {})


class GatewayRestartTests(SlurmGatewayTestCase):
    async def test_restarted_gateway_reattaches_to_the_job(self) -> None:
        """
        A gateway that stops keeping its kernels, and a new one started on
        the same data directory, reattaches to the running job: same kernel
        id, same job, state kept; deleting it then cancels the job.
        """
        from tests.support.gateway import InProcessGateway

        data_dir = os.path.abspath(self.mktemp())
        settings = {**self.gateway_settings, "persistence": "true", "data_dir": data_dir}
        first = InProcessGateway(**{**settings, "on_stop": "keep"})
        await first.start()
        code, model = await first.request("POST", "api/kernels", {"name": "slurm"})
        self.assertEqual(code, 201, model)
        job = model["placement"]["job_id"]
        client = await ChannelsClient.connect(first.url, model["id"])
        await client.execute("x = 42")
        await client.close()
        await first.stop()
        self.assertEqual(self.jobs()[job][0], "RUNNING")

        second = InProcessGateway(**{**settings, "on_stop": "shutdown"})
        await second.start()
        self.addCleanup(second.stop)
        for _ in range(100):
            code, again = await second.request("GET", f"api/kernels/{model['id']}")
            if code == 200 and again["state"] == "running":
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual((again["state"], again["placement"]["job_id"]), ("running", job))
        client = await ChannelsClient.connect(second.url, model["id"])
        self.assertEqual((await client.execute("x"))["result"]["text/plain"], "42")
        await client.close()
        code, _ = await second.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
        await eventually(lambda: job not in self.jobs(), "the job to end")
