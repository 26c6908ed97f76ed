"""
Kernels as Slurm batch jobs.

A launch submits the kernelspec's kernel-side launcher
(C{launchers/python/launch_ipykernel.py}) with C{sbatch}, then follows the
job with C{squeue} until Slurm starts it: the job id is reported as the
C{submitted} phase, each new pending reason again as C{submitted}
(C{"Slurm job 12 pending: Resources"}), the node as C{placed}.  The node's
address comes from Slurm (C{scontrol show node}, C{NodeAddr}); the kernel
binds every address and reports its connection info to the response
listener, and the gateway connects to the node's address.  Interrupts go
through the kernel's comm port, or C{scancel --signal=INT --full} without
one; stopping a kernel is C{scancel}.

Every Slurm command is a child process (C{spawnProcess}) with an argv list,
never a shell and never on the reactor thread.  The batch script is a
constant (C{exec "$@"}) piped to sbatch as C{/dev/stdin}; the kernelspec's
argv follows as the script's arguments, so each stays one argument and no
value is ever parsed by a shell.  Everything that becomes an sbatch option
(partition, account, QOS, time limit, CPUs, memory, GPUs) is checked first,
whether it comes from the kernelspec, the gateway's settings or a client's
C{KERNEL_*} value; a client's value must also lie within the bounds the
kernelspec or the gateway sets (see L{job_resources}).  A malformed or
out-of-bounds client value fails the launch with status 400 before
anything is submitted.

The launch token: the job runs with C{--export=ALL} and sbatch's own
environment is built here from nothing but the kernel's environment (names
of Slurm's own input variables, C{SBATCH_*}, C{SLURM_*}, ..., removed so a
client cannot smuggle in sbatch options) plus C{EG_LAUNCH_TOKEN}.  So the
token is never on a command line (visible in C{ps} on the gateway host)
nor in a file the gateway writes: it travels inside Slurm's job record,
which only the job's owner (the gateway's user) and Slurm's administrators
can read, and the batch script hands it to the kernel-side launcher on
its stdin rather than in its environment (see L{BATCH_SCRIPT}).  (On a cluster that stores job environments in its accounting
database, C{AccountingStoreFlags=job_env}, C{sacct --env-vars} shows them
to whoever may see the job: such sites want C{PrivateData=jobs}.)
C{--export=NAME,...} would pass the same values but also implies
C{--get-user-env}, a login shell run on the node for every kernel.

Scheduling outcomes are reported in Slurm's words: a job pending for a
reason that waiting cannot fix (L{NEVER_STARTS}, e.g. C{PartitionConfig}
for more CPUs than any node has) is cancelled at once and the launch fails
quoting the reason; a job still pending when the launch times out is
cancelled by the cleanup, and the manager's timeout message quotes the
last phase, C{"Slurm job 12 pending: Resources"}; a job that ends while
the kernel runs (cancelled outside the gateway, time limit, node failure)
ends the kernel with Slurm's state and reason.

With impersonation, the gateway (running as root) checks the kernel's user
against the local account database (L{egateway.clusters.impersonation}:
prohibited users, uid 0, gid 0 and uids below C{min_uid} are refused with
403) and submits with C{sbatch --uid=<uid> --gid=<gid>}: sbatch drops to
that user once the job is accepted, the job and its output file are the
user's, and C{HOME}, C{USER} and C{LOGNAME} in the job's environment are
the account's.  The job starts in the user's home directory (or C{/}).
C{squeue}, C{scontrol} and C{scancel} keep running as root, which Slurm
lets see and cancel every job.  A gateway that does not run as root
cannot submit for another user: Slurm allows C{--uid} to root only, and
cancelling another user's job needs a Slurm operator; such a gateway
refuses impersonated launches with a message saying so.

Every kernel job carries the gateway installation's id as its comment
(C{--comment=egateway:<id>}, shown by C{squeue -o %k}).  The inventory
(L{ILauncherInventory}) lists the pending and running jobs with this
gateway's comment and a name of C{slurm_job_name_prefix} and a kernel id;
what it finds can be reaped (C{scancel}) but not adopted.
"""

from __future__ import annotations

import os
import signal as signals
import socket
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from egateway.clusters.commands import CommandResult, CommandSet
from egateway.clusters.impersonation import Account, Impersonation
from egateway.clusters.interface import (
    Found,
    ILauncher,
    ILauncherInventory,
    IKernelProcess,
    LaunchError,
    LaunchRequest,
    LauncherContext,
    Liveness,
    Phase,
    Placement,
    check_gateway_id,
)
from egateway.clusters.remote import (
    Placed,
    RemoteKernelProcess,
    RemoteLaunch,
    RemoteLauncher,
    _int,
    connection_info,
    launcher_argv,
    reported_id,
)
from egateway.clusters.slurm_jobs import (
    _KERNEL_ID,
    INVENTORY_FORMAT,
    SQUEUE_FORMAT,
    JobResources,
    JobState,
    KernelJob,
    _already_gone,
    _field,
    check_name,
    job_comment,
    job_environment,
    job_resources,
    never_starts,
    parse_inventory,
    parse_job_id,
    parse_memory,
    parse_squeue,
    parse_time_limit,
    sbatch_arguments,
)
from egateway.observe import detached
from egateway.wire.channels import ConnectionInfo

_log = Logger()

BATCH_SCRIPT = b"""#!/bin/sh
# egateway kernel job: run the arguments, each as given, the launch token on their stdin.
token="${EG_LAUNCH_TOKEN:-}"
unset EG_LAUNCH_TOKEN
if [ -z "$token" ]; then exec "$@"; fi
EG_LAUNCH_TOKEN_STDIN=1
export EG_LAUNCH_TOKEN_STDIN
exec "$@" <<EOF
$token
EOF
"""
"""
The whole batch script.  No user-supplied value is part of it: the argv
reaches it as arguments.  The token arrives in the job's environment and
leaves it before the kernel-side launcher starts: it gets the token on its
stdin instead (C{EG_LAUNCH_TOKEN_STDIN=1}), so the kernel's initial
environment (C{/proc/<pid>/environ}, readable for the kernel's whole life)
does not hold it.
"""

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


# -- the kernel ----------------------------------------------------------


class SlurmKernelProcess(RemoteKernelProcess):
    """
    A kernel running as Slurm job C{job_id} on C{node}.
    """

    def __init__(self, *, launcher: "SlurmLauncher", job_id: str, node: str, log_path: str, **kw: Any) -> None:
        super().__init__(**kw)
        self._launcher = launcher
        self.job_id = job_id
        self.node = node
        self.log_path = log_path
        self._cancelled = False

    async def _check_alive(self) -> Liveness:
        state = await self._launcher.job_state(self.job_id)
        if state is not None and state.running:
            return Liveness(True)
        state = await self._launcher.final_state(self.job_id, state)
        why = await self._launcher.describe_end(self.job_id, state, by_gateway=self._cancelled)
        # scancel by an administrator (or the job's user) is a decision;
        # a time limit, a node failure or a crash is not.
        decided = state is not None and state.state == "CANCELLED" and not self._cancelled
        return Liveness(False, f"ended: {why}", decision=decided)

    async def _signal_directly(self, signum: int) -> None:
        if signum in (signals.SIGTERM, signals.SIGKILL):
            self._cancelled = True
        await self._launcher.signal_job(self.job_id, signum)

    async def _release(self) -> None:
        self._cancelled = True
        await self._launcher.cancel_quietly(self.job_id)

    def snapshot(self) -> dict:
        return {
            **super().snapshot(),
            "launcher": "slurm",
            "job_id": self.job_id,
            "node": self.node,
            "log_path": self.log_path,
        }


@dataclass
class _JobLaunch:
    """
    What a Slurm launch's steps keep: the checked request, then sbatch
    under way and the job it submitted.
    """

    resources: JobResources
    account: Account | None
    log_path: str
    submitting: Deferred[CommandResult] | None = None
    job_id: str | None = None


@implementer(ILauncher, ILauncherInventory)
class SlurmLauncher(RemoteLauncher):
    """
    Starts kernels as Slurm batch jobs; see the module docstring.
    """

    name = "slurm"

    def __init__(self, context: LauncherContext) -> None:
        config = context.settings["config"]
        self._context = context
        self._reactor = context.reactor
        self._gateway_id = str(context.settings.get("gateway_id") or "")
        self._settings = config.slurm
        self._kernels = config.kernels
        self.impersonation = Impersonation.from_config(config)
        self.commands = SlurmCommands(
            context.reactor,
            self._settings.slurm_bin_dir,
            self._settings.slurm_conf or os.environ.get("SLURM_CONF", ""),
            os.environ.get("PATH", os.defpath),
        )

    # -- Slurm queries shared with the kernels ---------------------------

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
            try:
                name = signals.Signals(signum).name.removeprefix("SIG")
            except ValueError:
                name = str(int(signum))
            args = [f"--signal={name}", "--full", job_id]
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
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
            return address
        except OSError:
            return await self._reactor.resolve(address)

    # -- launching ----------------------------------------------------------

    def job_name(self, kernel_id: str) -> str:
        return f"{self._settings.slurm_job_name_prefix}{kernel_id}"

    def log_path(self, kernel_id: str) -> str:
        return f"{self._settings.slurm_log_dir.rstrip('/')}/kernel-{kernel_id}.log"

    # -- the launch's steps (the sequence is RemoteLauncher's) ---------------

    @property
    def _poll_interval(self) -> float:  # type: ignore[override]
        return self._settings.slurm_poll_interval

    async def _prepare(self, request: LaunchRequest) -> "_JobLaunch":
        if not _KERNEL_ID.match(request.kernel_id):
            raise LaunchError(f"kernel id {request.kernel_id[:80]!r} cannot name a Slurm job", status=400)
        resources = job_resources(request.env, request.config, self._settings)
        self.commands.executable("sbatch")
        account = await self._account(request.username) if self.impersonation.enabled else None
        return _JobLaunch(resources, account, self.log_path(request.kernel_id))

    async def _submit(self, launch: RemoteLaunch) -> None:
        request, job = launch.request, launch.state
        argv = launcher_argv(
            request.spec,
            request.kernel_id,
            launch.listener,
            str(request.config.get("port_range") or self._kernels.port_range),
            self._settings.slurm_python,
        )
        env = job_environment(request.env, launch.pending.token, self.commands.slurm_conf)
        workdir = request.cwd
        account = job.account
        if account is not None:
            env = self.impersonation.local_env(env, account)
            workdir = workdir or (account.home if account.home_exists else "/")
        else:
            env = self.impersonation.exported(env)
        submit_as = account if account is not None and account.uid != os.geteuid() else None
        job.submitting = self.commands.run(
            "sbatch",
            sbatch_arguments(
                job.resources,
                self.job_name(request.kernel_id),
                job.log_path,
                workdir,
                argv,
                submit_as=submit_as,
                comment=job_comment(self._gateway_id) if self._gateway_id else "",
            ),
            stdin=BATCH_SCRIPT,
            env=env,
        )
        result = await detached(job.submitting)
        job.job_id = self._submitted(result, job.resources)
        _log.info(
            "kernel {kernel_id}: submitted as Slurm job {job_id} ({resources})",
            kernel_id=request.kernel_id,
            job_id=job.job_id,
            resources=job.resources.describe() or "cluster defaults",
        )
        request.report(Phase.SUBMITTED, f"Slurm job {job.job_id}")

    async def _await_placement(self, launch: RemoteLaunch) -> Placed:
        job = launch.state
        state = await self._wait_until_running(launch.request, job.job_id, job.resources, job.log_path)
        address = await self.node_address(state.node)
        return Placed(state.node, address, f"{state.node} ({address}), Slurm job {job.job_id}")

    async def _launch_ended(self, launch: RemoteLaunch) -> str | None:
        return await self._ended_before_reporting(launch.state.job_id or "", launch.state.log_path)

    def _kernel(
        self, launch: RemoteLaunch, placed: Placed, info: ConnectionInfo, payload: Mapping[str, Any]
    ) -> IKernelProcess:
        job = launch.state
        return SlurmKernelProcess(
            launcher=self,
            job_id=job.job_id,
            node=placed.host,
            log_path=job.log_path,
            placement=Placement(
                host=placed.host,
                ip=placed.address,
                # As the launcher reports them, for the model only: the
                # gateway signals a job through Slurm, never by pid.
                pid=reported_id(payload.get("pid")),
                pgid=reported_id(payload.get("pgid")),
                extra={"job_id": job.job_id},
            ),
            **self._kernel_arguments(launch, info, payload, self._kernels.poll_interval),
        )

    async def _abandon(self, launch: RemoteLaunch) -> None:
        job = launch.state
        job_id = job.job_id
        if job_id is None and job.submitting is not None:
            # Cancelled while sbatch ran: it may still submit the job.
            try:
                job_id = parse_job_id((await job.submitting).stdout)
            except Exception:
                job_id = None
        if job_id is not None:
            _log.info(
                "kernel {kernel_id}: cancelling Slurm job {job_id} of a failed launch",
                kernel_id=launch.request.kernel_id,
                job_id=job_id,
            )
            await self.cancel_quietly(job_id)

    async def _account(self, username: str) -> Account:
        """
        The checked account a job for C{username} runs as.

        @raise LaunchError: 403 for a user who may not be impersonated; 500
            when the gateway, not being root, cannot submit for another user.
        """
        account = await self.impersonation.local_account(self._context.run_blocking, username)
        euid = os.geteuid()
        if account.uid != euid and euid != 0:
            raise LaunchError(
                f"cannot submit a Slurm job for {account.name!r}: sbatch --uid needs the gateway to run as "
                f"root, and it runs as uid {euid}"
            )
        return account

    def _submitted(self, result: CommandResult, resources: JobResources) -> str:
        """
        The job id sbatch printed.

        @raise LaunchError: sbatch refused the job (400 if the client's
            values were part of the request).
        """
        if not result.ok:
            status = 400 if resources.from_client and not result.timed_out and result.code is not None else 500
            asked = f" (asked for {resources.describe()})" if resources.describe() else ""
            raise LaunchError(f"Slurm refused the kernel job{asked}: {result.describe()}", status=status)
        try:
            return parse_job_id(result.stdout)
        except ValueError as e:
            raise LaunchError(str(e)) from None

    async def _wait_until_running(
        self, request: LaunchRequest, job_id: str, resources: JobResources, log_path: str
    ) -> JobState:
        """
        Poll squeue until the job runs, reporting each new pending reason.

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
                raise LaunchError(await self._failure_story(job_id, state, log_path))
            if state.has_reason and state.reason != reported:
                reported = state.reason
                request.report(Phase.SUBMITTED, f"Slurm job {job_id} pending: {state.reason}")
                if never_starts(state.reason):
                    asked = f" for {resources.describe()}" if resources.describe() else ""
                    raise LaunchError(
                        f"Slurm job {job_id}{asked} can never start: it is pending with reason "
                        f"{state.reason}; the job was cancelled",
                        status=400 if resources.from_client else 500,
                    )
            await deferLater(self._reactor, self._settings.slurm_poll_interval, lambda: None)

    async def _ended_before_reporting(self, job_id: str, log_path: str) -> str | None:
        """
        C{None} while the job runs; otherwise how it ended, with the end of
        its output file when the gateway can read it (a shared file system).
        """
        try:
            state = await self.job_state(job_id)
        except SlurmCommandError:
            return None
        if state is not None and state.running:
            return None
        return await self._failure_story(job_id, state, log_path)

    async def _failure_story(self, job_id: str, state: JobState | None, log_path: str) -> str:
        """
        How a job ended before its kernel reported, with the end of its
        output file when the gateway can read it (a shared file system).
        """
        explanation = f"{await self.describe_end(job_id, state)} before the kernel sent its connection info"
        tail = await self._log_tail(log_path)
        return explanation + (f"; its output {log_path} ends: {tail}" if tail else "")

    async def _log_tail(self, path: str, lines: int = 5) -> str:
        def read_blocking() -> str:
            try:
                with open(path, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - 8192))
                    text = f.read().decode("utf-8", "replace")
            except OSError:
                return ""
            return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])

        return await self._context.run_blocking(read_blocking)

    # -- restoring --------------------------------------------------------

    def restore(self, kernel_id: str, snapshot: Mapping[str, Any]) -> Deferred[IKernelProcess]:
        return Deferred.fromCoroutine(self._restore(kernel_id, snapshot))

    async def _restore(self, kernel_id: str, snapshot: Mapping[str, Any]) -> IKernelProcess:
        try:
            job_id = str(snapshot["job_id"])
            node = str(snapshot["node"])
            info = connection_info(snapshot["connection_info"], str(snapshot["ip"]))
        except (KeyError, TypeError) as e:
            raise LaunchError(f"bad slurm snapshot: missing {e}") from None
        if not job_id.isdigit():
            raise LaunchError(f"bad slurm snapshot: job id {job_id!r}")
        try:
            state = await self.job_state(job_id)
        except SlurmCommandError as e:
            raise LaunchError(f"kernel {kernel_id}: cannot ask Slurm about job {job_id}: {e}") from None
        if state is None or not state.running:
            raise LaunchError(
                f"kernel {kernel_id} is no longer running: {await self.describe_end(job_id, state)}"
                if state is None or state.ended
                else f"kernel {kernel_id}: Slurm job {job_id} is {state.state}, not running"
            )
        if not state.name.endswith(kernel_id):
            raise LaunchError(f"Slurm job {job_id} is {state.name!r}, not the job of kernel {kernel_id}")
        return SlurmKernelProcess(
            launcher=self,
            job_id=job_id,
            node=node,
            log_path=str(snapshot.get("log_path") or self.log_path(kernel_id)),
            kernel_id=kernel_id,
            info=info,
            placement=Placement(
                host=node,
                ip=info.ip,
                pid=_int(snapshot.get("pid")),
                pgid=_int(snapshot.get("pgid")),
                extra={"job_id": job_id},
            ),
            reactor=self._reactor,
            poll_interval=self._kernels.poll_interval,
            comm_port=_int(snapshot.get("comm_port")),
            comm_token=snapshot.get("comm_token"),
        )


    # -- inventory --------------------------------------------------------

    def inventory(self, gateway_id: str, hints: Sequence[Mapping[str, Any]] = ()) -> Deferred[list[Found]]:
        return Deferred.fromCoroutine(self._inventory(gateway_id))

    async def _inventory(self, gateway_id: str) -> list[Found]:
        """
        @raise LaunchError: squeue is missing or failed.
        """
        try:
            check_gateway_id(gateway_id)
        except ValueError as e:
            raise LaunchError(str(e)) from None
        result = await self.commands.run("squeue", ["-h", "-t", "all", "-o", INVENTORY_FORMAT])
        if not result.ok:
            raise LaunchError(f"cannot list kernel jobs: {result.describe()}")
        return [
            Found(
                kernel_id=job.kernel_id,
                launcher=self.name,
                description=f"Slurm job {job.job_id} ({job.state}{f' on {job.node}' if job.node else ''})",
                reap=lambda job=job: Deferred.fromCoroutine(self._reap(job)),
            )
            for job in parse_inventory(result.stdout, gateway_id, self._settings.slurm_job_name_prefix)
        ]

    async def _reap(self, job: KernelJob) -> None:
        """
        Cancel the job and wait (bounded) until Slurm no longer runs it.

        @raise LaunchError: scancel failed, or the job still runs.
        """
        result = await self.commands.run("scancel", [job.job_id])
        if not result.ok and not _already_gone(result):
            raise LaunchError(f"cannot cancel Slurm job {job.job_id}: {result.describe()}")
        deadline = self._reactor.seconds() + self._kernels.terminate_wait + 10.0
        while True:
            try:
                state = await self.job_state(job.job_id)
            except SlurmCommandError:
                state = JobState(job.job_id, job.state, job.node, "")
            if state is None or state.ended:
                return
            if self._reactor.seconds() >= deadline:
                raise LaunchError(f"Slurm job {job.job_id} is still {state.state} after scancel")
            await deferLater(self._reactor, self._settings.slurm_poll_interval, lambda: None)



__all__ = [
    "BATCH_SCRIPT",
    "CommandResult",
    "JobResources",
    "check_name",
    "parse_job_id",
    "parse_squeue",
    "JobState",
    "KernelJob",
    "SlurmCommands",
    "SlurmKernelProcess",
    "SlurmLauncher",
    "job_comment",
    "job_environment",
    "job_resources",
    "never_starts",
    "parse_inventory",
    "parse_memory",
    "parse_time_limit",
    "sbatch_arguments",
]
