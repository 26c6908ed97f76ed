"""
Slurm's job output, parsed without running anything: what a kernel job
asks for (C{job_resources}, checked and bounded), sbatch's arguments and
environment, C{sbatch --parsable}, C{squeue} and C{scontrol} output, job
states and pending reasons, and the inventory's job list.  The commands
run in L{egateway.clusters.slurm_commands}; this module only reads and
writes their text, so all of it is testable without Slurm.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from egateway.clusters.commands import CommandResult
from egateway.clusters.impersonation import Account
from egateway.clusters.interface import ENV_NAME as NAME, LaunchError
from egateway.names import KERNEL_ID_PATTERN

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
        if not KERNEL_ID_PATTERN.match(kernel_id):
            continue
        if state not in RUNNING_STATES and state not in WAITING_STATES:
            continue
        jobs.append(KernelJob(job_id, state, node, kernel_id))
    return jobs


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
The whole batch script, piped to sbatch (which reads it from
C{/dev/stdin}, see L{sbatch_arguments}).  No user-supplied value is part of
it: the argv reaches it as arguments.  The token arrives in the job's
environment and leaves it before the kernel-side launcher starts: it gets
the token on its stdin instead (C{EG_LAUNCH_TOKEN_STDIN=1}), so the
kernel's initial environment (C{/proc/<pid>/environ}, readable for the
kernel's whole life) does not hold it.
"""


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


def submitted_job_id(result: CommandResult, resources: JobResources) -> str:
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


def _already_gone(result: CommandResult) -> bool:
    text = result.stderr.lower()
    return b"invalid job id" in text or b"already completing or completed" in text or b"job is completed" in text
