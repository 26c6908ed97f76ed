"""
What the SSH launcher runs on a host, and how it reads the answers: the
start script (token and environment on stdin, the pid and start time
printed), the checked kill (a pid signalled only while it is still the
process the gateway started), the inventory script and its output, and
whom commands run as (L{RunAs}).  Nothing here opens a connection: the
launcher (L{egateway.clusters.ssh}) runs these over its SSH pool.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Mapping

from egateway.clusters.impersonation import Impersonation
from egateway.clusters.interface import ENV_NAME as NAME, LaunchError
from egateway.clusters.remote import signal_name
from egateway.clusters.sshclient import shell_command

START_SCRIPT = r"""
IFS= read -r token || token=""
setsid=$(command -v setsid) && nohup=$(command -v nohup) || { echo "setsid or nohup missing" >&2; exit 127; }
while IFS= read -r assignment && [ -n "$assignment" ]; do export "$assignment"; done
log="$1"; shift
mask=$(umask); umask 077; : >>"$log"; umask "$mask"
if [ -n "$token" ]; then
    EG_LAUNCH_TOKEN_STDIN=1; export EG_LAUNCH_TOKEN_STDIN
    printf '%s\n' "$token" | "$setsid" "$nohup" "$@" >>"$log" 2>&1 &
else
    "$setsid" "$nohup" "$@" </dev/null >>"$log" 2>&1 &
fi
pid=$!
stat=""
[ -r "/proc/$pid/stat" ] && read -r stat <"/proc/$pid/stat"
set -- ${stat##*")"}
if [ $# -ge 20 ]; then shift 19; echo "$pid $1"; else echo "$pid"; fi
"""
"""
Run on the host with C{sh -c}.  Its stdin carries the launch token (one
line, possibly empty), then the kernel's environment as C{NAME=value}
lines, then an empty line; its arguments are the log file and the argv.  It
creates the log file readable by its owner only, starts the argv detached
in a new session (its leader: pid, process group and session are one
number) with output to the log file and the token on its stdin, and prints
the pid and the process's start time (clock ticks since boot, field 22 of
C{/proc/<pid>/stat}).  C{setsid} and C{nohup} are looked up before the
kernel's environment (which may set C{PATH}) applies.  No user-supplied
value is part of this text.
"""


CHECKED_KILL_SCRIPT = r"""
pid="$1"; start="$2"; kernel="$3"; signal="$4"; target="$5"
if [ -e "/proc/$pid" ]; then
    if [ -n "$start" ]; then
        stat=""
        read -r stat <"/proc/$pid/stat" || true
        set -- ${stat##*")"}
        if [ $# -lt 20 ]; then set -- ; else shift 19; fi
        if [ "${1:-}" != "$start" ]; then
            echo "egateway: process $pid is no longer kernel $kernel (started at ${1:-?}, not $start)" >&2
            exit 3
        fi
    elif ! tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF "KERNEL_ID=$kernel"; then
        echo "egateway: process $pid is not kernel $kernel" >&2
        exit 3
    fi
elif [ -z "$start" ]; then
    echo "egateway: process $pid is gone; kernel $kernel's group cannot be verified" >&2
    exit 3
fi
exec kill -s "$signal" -- "$target"
"""
"""
Run on the host with C{sh -c} and the arguments pid, start time (may be
empty), kernel id, signal name and kill target (C{pid} or C{-pgid}): signal
the target only if the process C{pid} is still the one the gateway started
(same start time; without a recorded start time, its environment carries
C{KERNEL_ID=<kernel id>}).  A leader that is gone while its group lives on
(its pid cannot be reused until the group is empty) is signalled when the
start time was recorded.  Exits 3 when the process is not the kernel.
"""

NOT_THE_KERNEL = 3


INVENTORY_SCRIPT = r"""
import json, os, sys
tag = ("EGATEWAY_ID=" + sys.argv[1]).encode()
def netns(pid):
    try:
        return os.readlink("/proc/%s/ns/net" % pid)
    except OSError:
        return None
here = netns("self")
for name in os.listdir("/proc"):
    if not name.isdigit() or int(name) == os.getpid():
        continue
    try:
        with open("/proc/%s/environ" % name, "rb") as f:
            env = f.read().split(b"\0")
        if tag not in env or netns(name) != here:
            continue
        with open("/proc/%s/stat" % name, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        if fields[0] == b"Z":
            continue
        kernel = [e[10:].decode("ascii", "replace") for e in env if e.startswith(b"KERNEL_ID=")]
        print(json.dumps({"pid": int(name), "pgid": int(fields[2]), "kernel_id": kernel[0] if kernel else ""}))
    except (OSError, IndexError, ValueError):
        continue
"""
"""
Run on a host with C{python -c}, the gateway id as its one argument: one
JSON line per live process whose environment holds C{EGATEWAY_ID=<id>}, in
the same network namespace as the script (the host's, not a container's,
nor another test host's sharing the machine).
"""


@dataclass(frozen=True)
class RemoteKernelFound:
    """
    The processes of one kernel found on a host, with their process groups.
    """

    kernel_id: str
    host: str
    pids: tuple[int, ...]
    pgids: tuple[int, ...]


def parse_inventory(host: str, output: bytes) -> list[RemoteKernelFound]:
    """
    L{INVENTORY_SCRIPT}'s output, grouped by kernel.  Lines that are not
    what the script prints, and kernel ids that are not UUIDs, are
    skipped: what a host says reaches a kill command and a file name.
    """
    pids: dict[str, set[int]] = {}
    pgids: dict[str, set[int]] = {}
    for line in output.decode("utf-8", "replace").splitlines():
        try:
            item = json.loads(line)
            pid, pgid, kernel_id = int(item["pid"]), int(item["pgid"]), str(item["kernel_id"])
        except (ValueError, TypeError, KeyError):
            continue
        if pid <= 1 or pgid <= 1 or not _is_uuid(kernel_id):
            continue
        pids.setdefault(kernel_id, set()).add(pid)
        pgids.setdefault(kernel_id, set()).add(pgid)
    return [
        RemoteKernelFound(kernel_id, host, tuple(sorted(pids[kernel_id])), tuple(sorted(pgids[kernel_id])))
        for kernel_id in sorted(pids)
    ]


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def kill_argv(signum: int, target: str) -> list[str]:
    """
    C{kill} in the one form that dash's, bash's and procps' C{kill} all
    take (C{kill -s NAME -- target}; dash refuses C{kill -N -- target}):
    the command runs under the login user's shell, or behind sudo.
    """
    return ["kill", "-s", signal_name(signum), "--", target]


def start_input(token: str, env: Mapping[str, str]) -> bytes:
    """
    L{START_SCRIPT}'s stdin: the token line, one C{NAME=value} line per
    variable, and the empty line that ends them.

    @raise LaunchError: a value holds a newline or NUL (it cannot be one
        line; client values never do, a kernelspec's or the gateway's
        inherited ones might), or a name is not a variable name.
    """
    lines = [token]
    for name, value in env.items():
        if not NAME.match(name) or "\n" in value or "\r" in value or "\0" in value:
            raise LaunchError(
                f"environment variable {name[:80]!r} cannot be passed to an SSH kernel: its name is not a "
                "variable name or its value holds a line break or NUL"
            )
        lines.append(f"{name}={value}")
    return ("\n".join(lines) + "\n\n").encode("utf-8")


@dataclass(frozen=True)
class RunAs:
    """
    Whom a kernel's commands run as on its host.

    @ivar login: the user to log in as (C{None}: C{remote_user}).
    @ivar prefix: the command (C{sudo_command}) that runs the rest as the
        kernel's user, or nothing.
    @ivar user: the kernel's user when impersonated, else empty.
    """

    login: str | None = None
    prefix: tuple[str, ...] = ()
    user: str = ""

    def command(self, argv: list[str]) -> str:
        """
        One shell command line running C{argv} as this user, every
        argument quoted.
        """
        return shell_command([*self.prefix, *argv])

    @classmethod
    def for_user(cls, impersonation: Impersonation, username: str) -> "RunAs":
        """
        How to run as C{username} under the impersonation settings.

        @raise LaunchError: 403, a user who may not be impersonated.
        """
        if not impersonation.enabled:
            return cls()
        user = impersonation.check_name(username)
        if impersonation.ssh_mode == "login":
            return cls(login=user, user=user)
        return cls(prefix=tuple(impersonation.sudo_argv(user)), user=user)


@dataclass(frozen=True)
class StartedProcess:
    """
    What the start script reported: the pid (also the process group and
    session), and its start time when the host has C{/proc}.
    """

    pid: int
    start_time: str = ""

    @classmethod
    def parse(cls, output: bytes) -> "StartedProcess":
        """
        @raise ValueError: the output is not what L{START_SCRIPT} prints.
        """
        fields = output.decode("utf-8", "replace").strip().splitlines()[-1].split()
        pid = int(fields[0])
        start = fields[1] if len(fields) > 1 else ""
        if pid <= 1 or len(fields) > 2 or (start and not start.isdigit()):
            raise ValueError(output)
        return cls(pid, start)


def checked_kill_argv(
    signum: int, pid: int, kernel_id: str, start_time: str = "", group: bool = True
) -> list[str]:
    """
    Signal the kernel started as C{pid} (its whole group by default), only
    if C{pid} is still that process; see L{CHECKED_KILL_SCRIPT}.

    @raise LaunchError: C{pid} names no single process (0, 1, negative).
    """
    if pid <= 1:
        raise LaunchError(f"refusing to signal pid {pid} for kernel {kernel_id}: it names no single kernel")
    target = f"-{pid}" if group else str(pid)
    name = kill_argv(signum, target)[2]
    return ["sh", "-c", CHECKED_KILL_SCRIPT, "egateway-kill", str(pid), start_time, kernel_id, name, target]
