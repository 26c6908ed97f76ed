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
never a shell and never on the reactor thread
(L{egateway.clusters.slurm_commands}, which also reads job states and tells
how a job ended; L{egateway.clusters.slurm_jobs} parses their output).  The batch script is a
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
its stdin rather than in its environment (see
L{egateway.clusters.slurm_jobs.BATCH_SCRIPT}).  (On a cluster that stores job environments in its accounting
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
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from egateway.clusters.commands import CommandResult
from egateway.clusters.impersonation import Account
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
)
from egateway.clusters.remote import (
    Placed,
    RemoteKernelProcess,
    RemoteLaunch,
    RemoteLauncher,
    as_int,
    kernel_log,
    reported_id,
)
from egateway.clusters.slurm_commands import SlurmClient, SlurmCommandError, SlurmCommands
from egateway.clusters.slurm_jobs import (
    JobResources,
    job_comment,
    job_environment,
    job_resources,
    parse_job_id,
    sbatch_arguments,
    submitted_job_id,
)
from egateway.names import KERNEL_ID_PATTERN
from egateway.observe import detached
from egateway.wire.channels import ConnectionInfo

_log = Logger()


class SlurmKernelProcess(RemoteKernelProcess):
    """
    A kernel running as Slurm job C{job_id} on C{node}.
    """

    def __init__(self, *, launcher: "SlurmLauncher", job_id: str, node: str, log_path: str, **kw: Any) -> None:
        super().__init__(**kw)
        self._slurm = launcher.slurm
        self.job_id = job_id
        self.node = node
        self.log_path = log_path
        self._cancelled = False

    async def _check_alive(self) -> Liveness:
        state = await self._slurm.job_state(self.job_id)
        if state is not None and state.running:
            return Liveness(True)
        state = await self._slurm.final_state(self.job_id, state)
        why = await self._slurm.describe_end(self.job_id, state, by_gateway=self._cancelled)
        # scancel by an administrator (or the job's user) is a decision;
        # a time limit, a node failure or a crash is not.
        decided = state is not None and state.state == "CANCELLED" and not self._cancelled
        return Liveness(False, f"ended: {why}", decision=decided)

    async def _signal_directly(self, signum: int) -> None:
        if signum in (signals.SIGTERM, signals.SIGKILL):
            self._cancelled = True
        await self._slurm.signal_job(self.job_id, signum)

    async def _release(self) -> None:
        self._cancelled = True
        await self._slurm.cancel_quietly(self.job_id)

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
        super().__init__(context)
        self._settings = settings = context.section
        commands = SlurmCommands(
            context.reactor,
            settings.slurm_bin_dir,
            settings.slurm_conf or os.environ.get("SLURM_CONF", ""),
            os.environ.get("PATH", os.defpath),
        )
        self.slurm = SlurmClient(context.reactor, commands, settings.slurm_poll_interval, context.run_blocking)

    def job_name(self, kernel_id: str) -> str:
        return f"{self._settings.slurm_job_name_prefix}{kernel_id}"

    def log_path(self, kernel_id: str) -> str:
        return kernel_log(self._settings.slurm_log_dir, kernel_id)

    # -- the launch's steps (the sequence is RemoteLauncher's) ---------------

    @property
    def _poll_interval(self) -> float:  # type: ignore[override]
        return self._settings.slurm_poll_interval

    async def _prepare(self, request: LaunchRequest) -> "_JobLaunch":
        if not KERNEL_ID_PATTERN.match(request.kernel_id):
            raise LaunchError(f"kernel id {request.kernel_id[:80]!r} cannot name a Slurm job", status=400)
        resources = job_resources(request.env, request.config, self._settings)
        self.slurm.commands.executable("sbatch")
        account = await self._account(request.username) if self.impersonation.enabled else None
        return _JobLaunch(resources, account, self.log_path(request.kernel_id))

    async def _submit(self, launch: RemoteLaunch) -> None:
        request, job = launch.request, launch.state
        argv = self._launcher_argv(request, launch.listener, self._settings.slurm_python)
        env = job_environment(request.env, launch.pending.token, self.slurm.commands.slurm_conf)
        workdir = request.cwd
        account = job.account
        if account is not None:
            env = self.impersonation.local_env(env, account)
            workdir = workdir or (account.home if account.home_exists else "/")
        else:
            env = self.impersonation.exported(env)
        submit_as = account if account is not None and account.uid != os.geteuid() else None
        job.submitting = self.slurm.submit(
            sbatch_arguments(
                job.resources,
                self.job_name(request.kernel_id),
                job.log_path,
                workdir,
                argv,
                submit_as=submit_as,
                comment=job_comment(self._gateway_id) if self._gateway_id else "",
            ),
            env,
        )
        result = await detached(job.submitting)
        job.job_id = submitted_job_id(result, job.resources)
        _log.info(
            "kernel {kernel_id}: submitted as Slurm job {job_id} ({resources})",
            kernel_id=request.kernel_id,
            job_id=job.job_id,
            resources=job.resources.describe() or "cluster defaults",
        )
        request.report(Phase.SUBMITTED, f"Slurm job {job.job_id}")

    async def _await_placement(self, launch: RemoteLaunch) -> Placed:
        job = launch.state
        state = await self.slurm.wait_until_running(
            job.job_id, job.resources, job.log_path, lambda detail: launch.request.report(Phase.SUBMITTED, detail)
        )
        address = await self.slurm.node_address(state.node)
        return Placed(state.node, address, f"{state.node} ({address}), Slurm job {job.job_id}")

    async def _launch_ended(self, launch: RemoteLaunch) -> str | None:
        return await self.slurm.ended_before_reporting(launch.state.job_id or "", launch.state.log_path)

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
            **self._kernel_arguments(launch, info, payload),
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
            await self.slurm.cancel_quietly(job_id)

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

    async def _restore(self, kernel_id: str, snapshot: Mapping[str, Any]) -> IKernelProcess:
        arguments = self._restored_arguments(kernel_id, snapshot)
        job_id, node = self._snapshot_fields(snapshot, "job_id", "node")
        if not job_id.isdigit():
            raise LaunchError(f"bad slurm snapshot: job id {job_id!r}")
        try:
            state = await self.slurm.job_state(job_id)
        except SlurmCommandError as e:
            raise LaunchError(f"kernel {kernel_id}: cannot ask Slurm about job {job_id}: {e}") from None
        if state is None or not state.running:
            raise LaunchError(
                f"kernel {kernel_id} is no longer running: {await self.slurm.describe_end(job_id, state)}"
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
            placement=Placement(
                host=node,
                ip=arguments["info"].ip,
                pid=as_int(snapshot.get("pid")),
                pgid=as_int(snapshot.get("pgid")),
                extra={"job_id": job_id},
            ),
            **arguments,
        )

    async def _find(self, gateway_id: str, hints: Sequence[Mapping[str, Any]]) -> list[Found]:
        timeout = self._kernels.terminate_wait + 10.0
        return [
            self._found(
                job.kernel_id,
                f"Slurm job {job.job_id} ({job.state}{f' on {job.node}' if job.node else ''})",
                lambda job=job: self.slurm.reap(job, timeout),
            )
            for job in await self.slurm.kernel_jobs(gateway_id, self._settings.slurm_job_name_prefix)
        ]


__all__ = ["SlurmKernelProcess", "SlurmLauncher"]
