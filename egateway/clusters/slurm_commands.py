"""
Slurm's client commands as the Slurm launcher runs them: submitting a
kernel job (C{sbatch}), following it (C{squeue}, C{scontrol}) until it
runs or ends, saying how it ended in Slurm's words, signalling and
cancelling it (C{scancel}), finding the node's address, and the
inventory's job list.  Each is a child process through
L{egateway.clusters.commands} (an argv, never a shell, never on the
reactor thread); what they print is read by L{egateway.clusters.slurm_jobs}.
"""

from __future__ import annotations

import os
import signal as signals
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from egateway.clusters.commands import CommandResult, CommandSet
from egateway.clusters.interface import LaunchError
from egateway.clusters.remote import resolve_address, signal_name, wait_until, with_log_tail
from egateway.clusters.slurm_jobs import (
    BATCH_SCRIPT,
    INVENTORY_FORMAT,
    SQUEUE_FORMAT,
    JobResources,
    JobState,
    KernelJob,
    _already_gone,
    _field,
    never_starts,
    parse_inventory,
    parse_squeue,
)

_log = Logger()

COMPLETING_CHECKS = 15
COMPLETING_INTERVAL = 0.2
"""
How long to wait for a job in COMPLETING to reach its final state before
describing how it ended.
"""


class SlurmCommandError(Exception):
    """
    A Slurm command could not run or failed in a way that says nothing
    about the job (the controller is unreachable).
    """


class SlurmCommands(CommandSet):
    """
    Slurm's client commands, with C{SLURM_CONF} in their fixed environment
    (so no C{SQUEUE_FORMAT} of the gateway's changes what we parse).
    """

    def __init__(self, reactor: Any, bin_dir: str, slurm_conf: str, path: str) -> None:
        super().__init__(
            reactor,
            owner="Slurm's",
            bin_dir=bin_dir,
            bin_dir_setting="slurm_bin_dir",
            install_hint="install the Slurm client commands or set slurm_bin_dir (EG_SLURM_BIN_DIR)",
            path=path,
            env={"SLURM_CONF": slurm_conf} if slurm_conf else {},
        )
        self.slurm_conf = slurm_conf


class SlurmClient:
    """
    What the launcher and its kernels ask of Slurm, through C{commands}
    (a L{SlurmCommands}), polling every C{poll_interval} seconds.
    """

    def __init__(
        self,
        reactor: Any,
        commands: SlurmCommands,
        poll_interval: float,
        run_blocking: Callable[..., Deferred[Any]],
    ) -> None:
        """
        @param run_blocking: runs a blocking call in the gateway's thread
            pool (L{LauncherContext.run_blocking}).
        """
        self._reactor = reactor
        self.commands = commands
        self._poll_interval = poll_interval
        self._run_blocking = run_blocking

    # -- one job ------------------------------------------------------------

    def submit(self, arguments: Sequence[str], env: Mapping[str, str]) -> Deferred[CommandResult]:
        """
        sbatch with C{arguments} (L{sbatch_arguments}), L{BATCH_SCRIPT} on
        its stdin and exactly C{env} as its (and so the job's) environment.
        """
        return self.commands.run("sbatch", arguments, stdin=BATCH_SCRIPT, env=env)

    async def job_state(self, job_id: str) -> JobState | None:
        """
        The job's line in C{squeue} (finished jobs included while Slurm
        remembers them, C{MinJobAge}); C{None} once Slurm has forgotten it.

        @raise SlurmCommandError: squeue failed for another reason.
        """
        result = await self.commands.run("squeue", ["-h", "-t", "all", "-j", job_id, "-o", SQUEUE_FORMAT])
        if result.ok:
            return parse_squeue(result.stdout, job_id)
        if b"Invalid job id" in result.stderr:
            return None
        raise SlurmCommandError(result.describe())

    async def final_state(self, job_id: str, state: JobState | None) -> JobState | None:
        """
        C{state}, or once a job in COMPLETING has reached its final state
        (waiting a few seconds at most), that one.
        """
        for _ in range(COMPLETING_CHECKS):
            if state is None or state.state != "COMPLETING":
                break
            # Its processes are being reaped; the final state follows shortly.
            await deferLater(self._reactor, COMPLETING_INTERVAL, lambda: None)
            try:
                state = await self.job_state(job_id) or state
            except SlurmCommandError:
                break
        return state

    async def describe_end(self, job_id: str, state: JobState | None, by_gateway: bool = False) -> str:
        """
        How a job ended, in Slurm's words: C{"Slurm job 12 on n1 was
        CANCELLED outside the gateway (signal 15)"}.
        """
        state = await self.final_state(job_id, state)
        if state is None:
            return f"Slurm job {job_id} is no longer known to Slurm"
        details: list[str] = []
        if state.has_reason:
            details.append(f"reason {state.reason}")
        try:
            shown = await self.commands.run("scontrol", ["-o", "show", "job", job_id])
            exit_code = _field(shown.stdout.decode("utf-8", "replace"), "ExitCode") if shown.ok else ""
        except LaunchError:
            exit_code = ""
        code, _, sig = exit_code.partition(":")
        if sig not in ("", "0"):
            details.append(f"signal {sig}")
        elif code not in ("", "0"):
            details.append(f"exit code {code}")
        where = f" on {state.node}" if state.node else ""
        verb = {"CANCELLED": "was CANCELLED", "TIMEOUT": "reached its time limit (TIMEOUT)"}.get(
            state.state, f"ended {state.state}"
        )
        if state.state == "CANCELLED" and not by_gateway:
            verb += " outside the gateway"
        return f"Slurm job {job_id}{where} {verb}" + (f" ({', '.join(details)})" if details else "")

    async def wait_until_running(
        self, job_id: str, resources: JobResources, log_path: str, report: Callable[[str], None]
    ) -> JobState:
        """
        Poll squeue until the job runs, C{report}ing each new pending reason.

        @raise LaunchError: the job ended first, or is pending for a reason
            that waiting cannot fix (it is cancelled by the caller).
        """
        reported = ""
        while True:
            try:
                state = await self.job_state(job_id)
            except SlurmCommandError as e:
                _log.warn("Slurm job {job_id}: cannot query its state: {error}", job_id=job_id, error=str(e))
                state = JobState(job_id, "PENDING", "", "")
            if state is None:
                raise LaunchError(f"Slurm job {job_id} disappeared before it started")
            if state.running and state.node:
                return state
            if state.ended:
                raise LaunchError(await self.failure_story(job_id, state, log_path))
            if state.has_reason and state.reason != reported:
                reported = state.reason
                report(f"Slurm job {job_id} pending: {state.reason}")
                if never_starts(state.reason):
                    asked = f" for {resources.describe()}" if resources.describe() else ""
                    raise LaunchError(
                        f"Slurm job {job_id}{asked} can never start: it is pending with reason "
                        f"{state.reason}; the job was cancelled",
                        status=400 if resources.from_client else 500,
                    )
            await deferLater(self._reactor, self._poll_interval, lambda: None)

    async def ended_before_reporting(self, job_id: str, log_path: str) -> str | None:
        """
        C{None} while the job runs (or Slurm cannot be asked); otherwise how
        it ended (L{failure_story}).
        """
        try:
            state = await self.job_state(job_id)
        except SlurmCommandError:
            return None
        if state is not None and state.running:
            return None
        return await self.failure_story(job_id, state, log_path)

    async def failure_story(self, job_id: str, state: JobState | None, log_path: str) -> str:
        """
        How a job ended before its kernel reported, with the end of its
        output file when the gateway can read it (a shared file system).
        """
        explanation = f"{await self.describe_end(job_id, state)} before the kernel sent its connection info"
        return with_log_tail(explanation, f"output {log_path}", await self._log_end(log_path))

    async def _log_end(self, path: str) -> str:
        """
        The last 8 KiB of the job's output file, read in a thread, or
        nothing when the gateway cannot read it.
        """

        def read_blocking() -> str:
            try:
                with open(path, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - 8192))
                    return f.read().decode("utf-8", "replace")
            except OSError:
                return ""

        return await self._run_blocking(read_blocking)

    async def signal_job(self, job_id: str, signum: int) -> None:
        """
        TERM and KILL cancel the job; other signals go to every process of
        the job's batch step (C{scancel --signal=... --full}).

        @raise LaunchError: scancel failed (not for a job already gone).
        """
        if signum == signals.SIGKILL:
            args = ["--signal=KILL", "--full", job_id]
        elif signum == signals.SIGTERM:
            args = [job_id]
        else:
            args = [f"--signal={signal_name(signum)}", "--full", job_id]
        result = await self.commands.run("scancel", args)
        if not result.ok and not _already_gone(result):
            raise LaunchError(f"cannot signal Slurm job {job_id}: {result.describe()}")
        if signum == signals.SIGKILL:
            await self.cancel_quietly(job_id)

    async def cancel_quietly(self, job_id: str) -> None:
        """
        C{scancel job_id}, logging rather than raising a failure.
        """
        try:
            result = await self.commands.run("scancel", [job_id])
        except LaunchError as e:
            _log.warn("cannot cancel Slurm job {job_id}: {error}", job_id=job_id, error=str(e))
            return
        if not result.ok and not _already_gone(result):
            _log.warn(
                "cannot cancel Slurm job {job_id}: {error}; cancel it by hand (scancel {job_id})",
                job_id=job_id,
                error=result.describe(),
            )

    async def node_address(self, node: str) -> str:
        """
        The address Slurm reaches C{node} at (its C{NodeAddr}), resolved if
        it is a name.

        @raise LaunchError: Slurm does not know the node.
        """
        result = await self.commands.run("scontrol", ["-o", "show", "node", node])
        address = _field(result.stdout.decode("utf-8", "replace"), "NodeAddr") if result.ok else ""
        if not address:
            raise LaunchError(f"cannot find the address of Slurm node {node}: {result.describe()}")
        return await resolve_address(self._reactor, address)

    # -- the inventory ------------------------------------------------------

    async def kernel_jobs(self, gateway_id: str, name_prefix: str) -> list[KernelJob]:
        """
        The pending and running kernel jobs of C{gateway_id}.

        @raise LaunchError: squeue is missing or failed.
        """
        result = await self.commands.run("squeue", ["-h", "-t", "all", "-o", INVENTORY_FORMAT])
        if not result.ok:
            raise LaunchError(f"cannot list kernel jobs: {result.describe()}")
        return parse_inventory(result.stdout, gateway_id, name_prefix)

    async def reap(self, job: KernelJob, timeout: float) -> None:
        """
        Cancel the job and wait (C{timeout} seconds at most) until Slurm no
        longer runs it.

        @raise LaunchError: scancel failed, or the job still runs.
        """
        result = await self.commands.run("scancel", [job.job_id])
        if not result.ok and not _already_gone(result):
            raise LaunchError(f"cannot cancel Slurm job {job.job_id}: {result.describe()}")
        state: JobState | None = None

        async def ended() -> bool:
            nonlocal state
            try:
                state = await self.job_state(job.job_id)
            except SlurmCommandError:
                state = JobState(job.job_id, job.state, job.node, "")
            return state is None or state.ended

        if not await wait_until(self._reactor, ended, timeout, self._poll_interval):
            raise LaunchError(f"Slurm job {job.job_id} is still {state.state} after scancel")


__all__ = ["COMPLETING_CHECKS", "COMPLETING_INTERVAL", "SlurmClient", "SlurmCommandError", "SlurmCommands"]
