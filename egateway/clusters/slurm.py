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

import math
import os
import re
import shutil
import signal as signals
import socket
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

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
    RemoteKernelProcess,
    _int,
    await_connection_info,
    connection_info,
    expect_launch,
    launcher_argv,
    reported_id,
    response_listener,
)
from egateway.kernels.env import NAME
from egateway.observe import detached

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

COMMAND_TIMEOUT = 30.0
"""
Seconds any one Slurm command may take before it is killed.
"""

MAX_OUTPUT = 1 << 20

COMPLETING_CHECKS = 15
COMPLETING_INTERVAL = 0.2
"""
How long to wait for a job in COMPLETING to reach its final state before
describing how it ended.
"""

RUNNING_STATES = frozenset({"RUNNING", "SUSPENDED", "STOPPED", "SIGNALING", "RESIZING", "STAGE_OUT"})
"""
Job states in which the kernel process exists.
"""

WAITING_STATES = frozenset(
    {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
)
"""
Job states before the batch script starts.
"""

NEVER_STARTS = frozenset(
    {
        "PartitionConfig",
        "PartitionNodeLimit",
        "PartitionTimeLimit",
        "BadConstraints",
        "DependencyNeverSatisfied",
        "InvalidAccount",
        "InvalidQOS",
        "AccountNotAllowed",
        "QOSNotAllowed",
        "MaxMemPerLimit",
    }
)
"""
Pending reasons that waiting cannot fix: the request exceeds what the
partition, its nodes, the account or the QOS allow.
"""

_NEVER_STARTS_PATTERN = re.compile(r"^(?:(?:QOS|Assoc)Max\w*PerJob(?:Limit)?|QOSMin\w+)$")
"""
Per-job QOS and association limits (C{QOSMaxCpuPerJobLimit},
C{AssocMaxWallDurationPerJobLimit}, C{QOSMinGRES}, ...): a job over them
stays pending for ever.
"""

SLURM_INPUT_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SCANCEL_", "SCONTROL_", "SINFO_")
"""
Environment variables Slurm's commands read as options; never passed on
from a kernel's environment.
"""

TOKEN_ENV = "EG_LAUNCH_TOKEN"

_NAME_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_KERNEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_MEMORY = re.compile(r"^([0-9]{1,12})\s*([KMGT]?)B?$", re.IGNORECASE)
_TIME = re.compile(
    r"^(?:(?P<days>[0-9]{1,4})-(?P<dh>[0-9]{1,4})(?::(?P<dm>[0-9]{1,4})(?::(?P<ds>[0-9]{1,4}))?)?"
    r"|(?P<a>[0-9]{1,7})(?::(?P<b>[0-9]{1,4})(?::(?P<c>[0-9]{1,4}))?)?)$"
)
_UNITS_MB = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024, "": 1}
_UNLIMITED = ("UNLIMITED", "INFINITE")


# -- values and bounds -------------------------------------------------


def parse_memory(text: str) -> int:
    """
    A Slurm memory size (C{512M}, C{4G}, C{4096}; no unit means MB) in MB,
    rounded up.

    @raise ValueError: malformed or zero (C{--mem=0} means "all the node's
        memory" to Slurm).
    """
    match = _MEMORY.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a memory size such as 512M or 4G")
    megabytes = math.ceil(int(match.group(1)) * _UNITS_MB[match.group(2).upper()])
    if megabytes <= 0:
        raise ValueError(f"{text!r} is not a positive memory size")
    return megabytes


def parse_time_limit(text: str) -> int | None:
    """
    A Slurm time limit (C{minutes}, C{minutes:seconds},
    C{hours:minutes:seconds}, C{days-hours}, C{days-hours:minutes},
    C{days-hours:minutes:seconds}) in seconds; C{None} for C{UNLIMITED}.

    @raise ValueError: malformed, or zero (which Slurm reads as no limit).
    """
    stripped = text.strip()
    if stripped.upper() in _UNLIMITED:
        return None
    match = _TIME.match(stripped)
    if not match:
        raise ValueError(
            f"{text!r} is not a Slurm time limit (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)"
        )
    g = {k: int(v) if v is not None else None for k, v in match.groupdict().items()}
    if g["days"] is not None:
        seconds = g["days"] * 86400 + g["dh"] * 3600 + (g["dm"] or 0) * 60 + (g["ds"] or 0)
    elif g["c"] is not None:
        seconds = g["a"] * 3600 + g["b"] * 60 + g["c"]
    elif g["b"] is not None:
        seconds = g["a"] * 60 + g["b"]
    else:
        seconds = g["a"] * 60
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a positive time limit")
    return seconds


def check_name(text: str) -> str:
    """
    A partition, account or QOS name: letters, digits, C{_ . -}, at most
    64 characters, one name (no lists).

    @raise ValueError: otherwise.
    """
    if not _NAME_VALUE.match(text):
        raise ValueError(f"{text[:80]!r} is not a valid name (letters, digits, _ . -; one name)")
    return text


def never_starts(reason: str) -> bool:
    """
    Whether a job pending for C{reason} can never start as submitted.
    """
    return reason in NEVER_STARTS or bool(_NEVER_STARTS_PATTERN.match(reason))


def _whole_number(text: str) -> int:
    number = int(text.strip())
    if number < 0:
        raise ValueError(f"{text!r} is negative")
    return number


def _listed(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return []


@dataclass(frozen=True)
class JobResources:
    """
    What a kernel job asks Slurm for, validated.

    @ivar from_client: names of the C{KERNEL_*} values that were used; a
        request Slurm cannot satisfy is then the client's (400) rather than
        the operator's (500) problem.
    """

    partition: str = ""
    account: str = ""
    qos: str = ""
    time_limit: str = ""
    cpus: int = 0
    memory_mb: int = 0
    gpus: int = 0
    extra: tuple[str, ...] = ()
    from_client: tuple[str, ...] = ()

    def options(self) -> list[str]:
        """
        The sbatch options, one argument each.
        """
        options = ["--nodes=1", "--ntasks=1"]
        for flag, value in (("--partition", self.partition), ("--account", self.account), ("--qos", self.qos),
                            ("--time", self.time_limit)):
            if value:
                options.append(f"{flag}={value}")
        if self.cpus:
            options.append(f"--cpus-per-task={self.cpus}")
        if self.memory_mb:
            options.append(f"--mem={self.memory_mb}M")
        if self.gpus:
            options.append(f"--gres=gpu:{self.gpus}")
        return options + list(self.extra)

    def describe(self) -> str:
        """
        The request in words, for logs and errors: C{"partition debug, 2 CPUs, 4096 MB"}.
        """
        parts = [
            f"partition {self.partition}" if self.partition else "",
            f"account {self.account}" if self.account else "",
            f"QOS {self.qos}" if self.qos else "",
            f"{self.cpus} CPU{'s' if self.cpus != 1 else ''}" if self.cpus else "",
            f"{self.memory_mb} MB" if self.memory_mb else "",
            f"{self.gpus} GPU{'s' if self.gpus != 1 else ''}" if self.gpus else "",
            f"time limit {self.time_limit}" if self.time_limit else "",
        ]
        return ", ".join(p for p in parts if p)


CLIENT_VALUES = {
    "partition": "KERNEL_SLURM_PARTITION",
    "account": "KERNEL_SLURM_ACCOUNT",
    "qos": "KERNEL_SLURM_QOS",
    "time_limit": "KERNEL_SLURM_TIME",
    "cpus": "KERNEL_CPUS",
    "memory": "KERNEL_MEMORY",
    "gpus": "KERNEL_GPUS",
}
"""
The C{KERNEL_*} values a client may set, by the kernelspec key each
overrides.
"""


def job_resources(env: Mapping[str, str], config: Mapping[str, Any], settings: Any) -> JobResources:
    """
    The resources of one kernel job: a client's C{KERNEL_*} value, else the
    kernelspec's config, else the gateway's setting.

    Client values are bounded:
      - C{KERNEL_SLURM_PARTITION}, C{KERNEL_SLURM_ACCOUNT},
        C{KERNEL_SLURM_QOS}: one of the kernelspec's C{allowed_partitions},
        C{allowed_accounts}, C{allowed_qos} (none allowed when it lists
        none);
      - C{KERNEL_CPUS}: 1 to C{max_cpus}; C{KERNEL_GPUS}: 0 to C{max_gpus};
        C{KERNEL_MEMORY}: up to C{max_memory}; C{KERNEL_SLURM_TIME}: up to
        C{max_time_limit}, never unlimited (kernelspec keys, defaulting to
        the gateway's C{slurm_max_*} settings).

    @raise LaunchError: status 400 for a client's value, 500 for the
        kernelspec's or the gateway's.
    """
    used: list[str] = []

    def pick(key: str, default: Any) -> tuple[Any, str]:
        name = CLIENT_VALUES[key]
        if name in env and str(env[name]).strip() != "":
            used.append(name)
            return str(env[name]).strip(), name
        value = config.get(key)
        if value is not None and value != "":
            return value, f"kernelspec config {key!r}"
        return default, f"setting slurm_{key}"

    def fail(source: str, message: str) -> LaunchError:
        return LaunchError(f"{source}: {message}", status=400 if source.startswith("KERNEL_") else 500)

    def bound(key: str, parse: Callable[[str], Any]) -> tuple[Any, str]:
        """
        The kernelspec's C{max_*} bound, else the gateway's, parsed.
        """
        value = config.get(key)
        source = f"kernelspec config {key!r}"
        if value is None or value == "":
            value, source = getattr(settings, f"slurm_{key}"), f"setting slurm_{key}"
        try:
            return parse(str(value)), str(value)
        except ValueError as e:
            raise fail(source, str(e)) from None

    values: dict[str, Any] = {}
    for key, allowed_key, default in (
        ("partition", "allowed_partitions", settings.slurm_partition),
        ("account", "allowed_accounts", settings.slurm_account),
        ("qos", "allowed_qos", settings.slurm_qos),
    ):
        value, source = pick(key, default)
        value = str(value)
        if not value:
            values[key] = ""
            continue
        try:
            check_name(value)
        except ValueError as e:
            raise fail(source, str(e)) from None
        if source.startswith("KERNEL_"):
            allowed = _listed(config.get(allowed_key))
            if value not in allowed:
                raise fail(
                    source,
                    f"{value!r} is not allowed for this kernelspec"
                    + (f" (allowed: {', '.join(allowed)})" if allowed else f" (its {allowed_key} is empty)"),
                )
        values[key] = value

    value, source = pick("time_limit", settings.slurm_time_limit)
    value = str(value)
    if value:
        try:
            seconds = parse_time_limit(value)
            if source.startswith("KERNEL_"):
                limit, limit_text = bound("max_time_limit", parse_time_limit)
                if seconds is None:
                    raise ValueError("an unlimited time is not allowed")
                if limit is not None and seconds > limit:
                    raise ValueError(f"{value!r} is longer than the limit {limit_text}")
        except ValueError as e:
            raise fail(source, str(e)) from None
    values["time_limit"] = value

    for key, lowest in (("cpus", 1), ("gpus", 0)):
        value, source = pick(key, None)
        if value is None:
            values[key] = 0
            continue
        try:
            number = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value).strip())
        except ValueError:
            raise fail(source, f"{str(value)[:40]!r} is not a whole number") from None
        if not lowest <= number <= 100_000:
            raise fail(source, f"{number} is out of range (at least {lowest})")
        if source.startswith("KERNEL_"):
            limit, _ = bound(f"max_{key}", _whole_number)
            if number > limit:
                raise fail(source, f"{number} is more than the {limit} allowed")
        values[key] = number

    value, source = pick("memory", "")
    memory_mb = 0
    if value not in ("", None, 0):
        try:
            memory_mb = parse_memory(str(value))
            if source.startswith("KERNEL_"):
                limit, limit_text = bound("max_memory", parse_memory)
                if memory_mb > limit:
                    raise ValueError(f"{value!r} is more than the {limit_text} allowed")
        except ValueError as e:
            raise fail(source, str(e)) from None

    extra = config.get("sbatch_options") or []
    if not isinstance(extra, list) or not all(isinstance(o, str) and o.startswith("--") and "\n" not in o
                                              for o in extra):
        raise fail("kernelspec config 'sbatch_options'", "must be a list of --option=value strings")

    return JobResources(
        partition=values["partition"],
        account=values["account"],
        qos=values["qos"],
        time_limit=values["time_limit"],
        cpus=values["cpus"],
        memory_mb=memory_mb,
        gpus=values["gpus"],
        extra=tuple(extra),
        from_client=tuple(used),
    )


def job_environment(kernel_env: Mapping[str, str], token: str, slurm_conf: str) -> dict[str, str]:
    """
    sbatch's environment, which the job inherits (C{--export=ALL}): the
    kernel's variables without Slurm's own input variables, the launch
    token and C{SLURM_CONF}.
    """
    env = {
        name: value
        for name, value in kernel_env.items()
        if NAME.match(name) and not name.startswith(SLURM_INPUT_PREFIXES) and name != TOKEN_ENV
    }
    env[TOKEN_ENV] = token
    if slurm_conf:
        env["SLURM_CONF"] = slurm_conf
    return env


COMMENT_PREFIX = "egateway:"
"""
Kernel jobs' comment is this followed by the gateway id.
"""

INVENTORY_FORMAT = "%i|%T|%N|%j|%k"


def job_comment(gateway_id: str) -> str:
    return f"{COMMENT_PREFIX}{gateway_id}"


@dataclass(frozen=True)
class KernelJob:
    """
    A kernel job of this gateway found by L{parse_inventory}.
    """

    job_id: str
    state: str
    node: str
    kernel_id: str


def parse_inventory(stdout: bytes, gateway_id: str, name_prefix: str) -> list[KernelJob]:
    """
    The pending and running kernel jobs of gateway C{gateway_id} in
    C{squeue -o INVENTORY_FORMAT} output: comment C{egateway:<id>}, name
    C{name_prefix} followed by a kernel id.  A line with a C{|} too many
    (another user's job name or comment holding one) is skipped, so no
    other job can pass for one of ours.
    """
    comment = job_comment(gateway_id)
    jobs = []
    for line in stdout.decode("utf-8", "replace").splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5:
            continue
        job_id, state, node, name, found_comment = (part.strip() for part in parts)
        if found_comment != comment or not job_id.isdigit() or not name.startswith(name_prefix):
            continue
        kernel_id = name[len(name_prefix):]
        if not _KERNEL_ID.match(kernel_id):
            continue
        if state not in RUNNING_STATES and state not in WAITING_STATES:
            continue
        jobs.append(KernelJob(job_id, state, node, kernel_id))
    return jobs


def sbatch_arguments(
    resources: JobResources,
    job_name: str,
    output: str,
    workdir: str,
    argv: Sequence[str],
    submit_as: Account | None = None,
    comment: str = "",
) -> list[str]:
    """
    sbatch's arguments: fixed options, the resources, the batch script
    from stdin, then the kernel-side launcher's argv as its arguments.

    @param submit_as: the account the job runs as (C{--uid}, C{--gid},
        numeric: the ids the gateway checked), or C{None} for the gateway's.
    @param comment: the job's comment (the gateway id tag), or none.
    """
    options = [
        "--parsable",
        f"--job-name={job_name}",
        f"--output={output}",
        "--open-mode=append",
        "--export=ALL",
        "--no-requeue",
    ]
    if comment:
        options.append(f"--comment={comment}")
    if workdir:
        options.append(f"--chdir={workdir}")
    if submit_as is not None:
        options += [f"--uid={submit_as.uid}", f"--gid={submit_as.gid}"]
    return [*options, *resources.options(), "/dev/stdin", *argv]


def parse_job_id(stdout: bytes) -> str:
    """
    The job id from C{sbatch --parsable} (C{"12"} or C{"12;cluster"}).

    @raise ValueError: no job id in the output.
    """
    lines = stdout.decode("utf-8", "replace").strip().splitlines()
    job_id = lines[-1].split(";")[0].strip() if lines else ""
    if not job_id.isdigit():
        raise ValueError(f"sbatch printed no job id: {stdout[:200]!r}")
    return job_id


# -- Slurm's commands ----------------------------------------------------


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.code == 0

    @property
    def error(self) -> str:
        """
        stderr as one line, Slurm's C{"sbatch: error: "} prefixes removed.
        """
        lines = self.stderr.decode("utf-8", "replace").strip().splitlines()
        cleaned = [re.sub(r"^\w+: error: ", "", line).strip() for line in lines]
        return "; ".join(line for line in cleaned if line)

    def describe(self) -> str:
        name = os.path.basename(self.argv[0]) if self.argv else "command"
        if self.timed_out:
            return f"{name} did not finish within {COMMAND_TIMEOUT:g} s"
        how = f"exited with code {self.code}" if self.code is not None else f"was killed by signal {self.signal}"
        return f"{name} {how}" + (f": {self.error}" if self.error else "")


class SlurmCommandError(Exception):
    """
    A Slurm command could not run or failed in a way that says nothing
    about the job (the controller is unreachable).
    """


class _Collector(ProcessProtocol):
    def __init__(self, argv: Sequence[str], stdin: bytes, done: Deferred[CommandResult]) -> None:
        self.argv = tuple(argv)
        self.stdin = stdin
        self.done = done
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.size = 0
        self.timed_out = False
        self.timer: Any = None

    def connectionMade(self) -> None:
        if self.stdin:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def _keep(self, into: list[bytes], data: bytes) -> None:
        if self.size < MAX_OUTPUT:
            into.append(data[: MAX_OUTPUT - self.size])
            self.size += len(data)

    def outReceived(self, data: bytes) -> None:
        self._keep(self.out, data)

    def errReceived(self, data: bytes) -> None:
        self._keep(self.err, data)

    def kill(self) -> None:
        try:
            self.transport.signalProcess("KILL")
        except Exception:
            pass

    def expire(self) -> None:
        self.timer = None
        self.timed_out = True
        self.kill()

    def processEnded(self, reason: Failure) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if self.done.called:
            return
        value = reason.value
        self.done.callback(
            CommandResult(
                argv=self.argv,
                code=getattr(value, "exitCode", None),
                signal=getattr(value, "signal", None),
                stdout=b"".join(self.out),
                stderr=b"".join(self.err),
                timed_out=self.timed_out,
            )
        )


class SlurmCommands:
    """
    Runs Slurm's client commands as child processes with a fixed
    environment (only C{PATH}, C{LC_ALL=C} and C{SLURM_CONF}, so no
    C{SQUEUE_FORMAT} of the gateway's changes what we parse).
    """

    def __init__(self, reactor: Any, bin_dir: str, slurm_conf: str, path: str) -> None:
        self._reactor = reactor
        self._bin_dir = bin_dir
        self.slurm_conf = slurm_conf
        self._path = path
        self._found: dict[str, str] = {}

    def executable(self, name: str) -> str:
        """
        @raise LaunchError: the command is not installed where we look.
        """
        found = self._found.get(name)
        if found is None:
            if self._bin_dir:
                candidate = os.path.join(self._bin_dir, name)
                found = candidate if os.access(candidate, os.X_OK) else None
                where = f"in slurm_bin_dir {self._bin_dir}"
            else:
                found = shutil.which(name, path=self._path)
                where = "on the gateway's PATH"
            if found is None:
                raise LaunchError(
                    f"Slurm's {name} was not found {where}; install the Slurm client commands or set "
                    "slurm_bin_dir (EG_SLURM_BIN_DIR)"
                )
            self._found[name] = found
        return found

    def environment(self) -> dict[str, str]:
        env = {"PATH": self._path, "LC_ALL": "C"}
        if self.slurm_conf:
            env["SLURM_CONF"] = self.slurm_conf
        return env

    def run(
        self,
        name: str,
        args: Sequence[str],
        *,
        stdin: bytes = b"",
        env: Mapping[str, str] | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> Deferred[CommandResult]:
        """
        Run C{name} with C{args}.  Fires with a L{CommandResult} whatever
        the exit status; cancelling kills the command.

        @raise LaunchError: synchronously, if the command is not installed.
        """
        argv = [self.executable(name), *args]
        done: Deferred[CommandResult] = Deferred(lambda _: collector.kill())
        collector = _Collector(argv, stdin, done)
        try:
            self._reactor.spawnProcess(
                collector, argv[0], argv, env=dict(env if env is not None else self.environment())
            )
        except OSError as e:
            raise LaunchError(f"cannot run {argv[0]}: {e}") from None
        collector.timer = self._reactor.callLater(timeout, collector.expire)
        return done


@dataclass(frozen=True)
class JobState:
    """
    One line of C{squeue}: the job's state, its pending reason (or
    C{None}) and the node it runs or ran on.
    """

    job_id: str
    state: str
    node: str
    reason: str
    name: str = ""

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES

    @property
    def waiting(self) -> bool:
        return self.state in WAITING_STATES

    @property
    def ended(self) -> bool:
        return not self.running and not self.waiting

    @property
    def has_reason(self) -> bool:
        return self.reason not in ("", "None", "(null)")


SQUEUE_FORMAT = "%i|%T|%N|%j|%r"


def parse_squeue(stdout: bytes, job_id: str) -> JobState | None:
    """
    The line for C{job_id} in C{squeue -o SQUEUE_FORMAT} output.
    """
    for line in stdout.decode("utf-8", "replace").splitlines():
        parts = line.strip().split("|", 4)
        if len(parts) == 5 and parts[0] == job_id:
            return JobState(job_id, parts[1].strip(), parts[2].strip(), parts[4].strip(), parts[3].strip())
    return None


def _field(text: str, key: str) -> str:
    match = re.search(rf"(?:^|\s){re.escape(key)}=(\S*)", text)
    return match.group(1) if match else ""


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


@implementer(ILauncher, ILauncherInventory)
class SlurmLauncher:
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

    def launch(self, request: LaunchRequest) -> Deferred[IKernelProcess]:
        return Deferred.fromCoroutine(self._launch(request))

    async def _launch(self, request: LaunchRequest) -> IKernelProcess:
        if not _KERNEL_ID.match(request.kernel_id):
            raise LaunchError(f"kernel id {request.kernel_id[:80]!r} cannot name a Slurm job", status=400)
        resources = job_resources(request.env, request.config, self._settings)
        self.commands.executable("sbatch")
        account = await self._account(request.username) if self.impersonation.enabled else None
        listener = response_listener(self._context)
        pending = expect_launch(listener, request)
        argv = launcher_argv(
            request.spec,
            request.kernel_id,
            listener,
            str(request.config.get("port_range") or self._kernels.port_range),
            self._settings.slurm_python,
        )
        log_path = self.log_path(request.kernel_id)
        submitting: Deferred[CommandResult] | None = None
        job_id: str | None = None
        env = job_environment(request.env, pending.token, self.commands.slurm_conf)
        workdir = request.cwd
        if account is not None:
            env = self.impersonation.local_env(env, account)
            workdir = workdir or (account.home if account.home_exists else "/")
        else:
            env = self.impersonation.exported(env)
        submit_as = account if account is not None and account.uid != os.geteuid() else None
        try:
            submitting = self.commands.run(
                "sbatch",
                sbatch_arguments(
                    resources,
                    self.job_name(request.kernel_id),
                    log_path,
                    workdir,
                    argv,
                    submit_as=submit_as,
                    comment=job_comment(self._gateway_id) if self._gateway_id else "",
                ),
                stdin=BATCH_SCRIPT,
                env=env,
            )
            result = await detached(submitting)
            job_id = self._submitted(result, resources)
            _log.info(
                "kernel {kernel_id}: submitted as Slurm job {job_id} ({resources})",
                kernel_id=request.kernel_id,
                job_id=job_id,
                resources=resources.describe() or "cluster defaults",
            )
            request.report(Phase.SUBMITTED, f"Slurm job {job_id}")
            state = await self._wait_until_running(request, job_id, resources, log_path)
            node = state.node
            address = await self.node_address(node)
            pending.expect_from([address])
            request.report(Phase.PLACED, f"{node} ({address}), Slurm job {job_id}")
            info = await await_connection_info(
                pending,
                self._reactor,
                lambda: self._ended_before_reporting(job_id or "", log_path),
                interval=self._settings.slurm_poll_interval,
            )
            conn = connection_info(info, address)
            request.report(Phase.CONNECTION_INFO, f"{address} (payload v{pending.version})")
            return SlurmKernelProcess(
                launcher=self,
                job_id=job_id,
                node=node,
                log_path=log_path,
                kernel_id=request.kernel_id,
                info=conn,
                placement=Placement(
                    host=node,
                    ip=address,
                    # As the launcher reports them, for the model only: the
                    # gateway signals a job through Slurm, never by pid.
                    pid=reported_id(info.get("pid")),
                    pgid=reported_id(info.get("pgid")),
                    extra={"job_id": job_id},
                ),
                reactor=self._reactor,
                poll_interval=self._kernels.poll_interval,
                comm_port=_int(info.get("comm_port")),
                comm_token=pending.comm_token,
                pending=pending,
            )
        except BaseException:
            pending.cancel()
            if job_id is None and submitting is not None:
                # Cancelled while sbatch ran: it may still submit the job.
                try:
                    job_id = parse_job_id((await submitting).stdout)
                except Exception:
                    job_id = None
            if job_id is not None:
                _log.info(
                    "kernel {kernel_id}: cancelling Slurm job {job_id} of a failed launch",
                    kernel_id=request.kernel_id,
                    job_id=job_id,
                )
                await self.cancel_quietly(job_id)
            raise

    async def _account(self, username: str) -> Account:
        """
        The checked account a job for C{username} runs as.

        @raise LaunchError: 403 for a user who may not be impersonated; 500
            when the gateway, not being root, cannot submit for another user.
        """
        account = await self.impersonation.local_account(self._reactor, username)
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

        return await deferToThreadPool(self._reactor, self._reactor.getThreadPool(), read_blocking)

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


def _already_gone(result: CommandResult) -> bool:
    text = result.stderr.lower()
    return b"invalid job id" in text or b"already completing or completed" in text or b"job is completed" in text


__all__ = [
    "JobResources",
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
