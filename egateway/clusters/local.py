"""
Kernels as child processes of the gateway.

The kernel runs in a session of its own (through C{setsid}), so a Ctrl-C in
the gateway's terminal does not interrupt every kernel, and signals reach the
kernel's whole process group.  Its argv comes from the kernelspec with
placeholders substituted, never through a shell.  Its output goes to a file
the gateway follows into its own log, tagged with the kernel id; the last
lines are kept to explain an early exit.

Kernel channels are encrypted with CurveZMQ as jupyter_client's
C{transport_encryption} does (JEP 145): for a kernelspec whose metadata lists
C{"curve"} in C{supported_encryption} (ipykernel 7.4 does), a fresh key pair
per kernel goes into the connection file (C{curve_publickey},
C{curve_secretkey}); the kernel binds its sockets as CurveZMQ servers with
it and the gateway connects as a client of the public key.  The setting
C{kernel_encryption} (auto, off, required) decides.

With impersonation (L{egateway.clusters.impersonation}) the kernel runs as
its user's account: the gateway, running as root, resolves the account in
a thread (NSS may ask a directory service) and refuses prohibited users
with 403; C{spawnProcess(uid=, gid=)} switches to the account's uid and
primary gid in the child after C{initgroups(3)} has set its supplementary
groups; C{HOME}, C{USER} and C{LOGNAME} come from the account, and the
kernel starts in its home directory (C{/} when there is none).  Its
connection and output files live in C{impersonation_runtime_dir} (mode
0711, the gateway's), each owned by the user with mode 0600: the kernel
reads its connection file by name, and no other user can list the
directory or read another kernel's files.

Every kernel carries the gateway installation's id (C{EGATEWAY_ID}) and
its kernelspec's name (C{EGATEWAY_KERNELSPEC}) in its environment.  The
launcher's inventory (L{ILauncherInventory}) lists the processes whose
command line names a connection file C{kernel-<uuid>.json} in one of this
gateway's runtime directories and whose environment carries its id; with
the connection file still there, such a kernel can be adopted.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal as signals
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from twisted.internet import error as twisted_errors
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from egateway.clusters.impersonation import (
    EXPORTED,
    Account,
    Impersonation,
    open_private_blocking,
    prepare_runtime_dir_blocking,
)
from egateway.clusters.interface import (
    GATEWAY_ID_ENV,
    ExitStatus,
    Found,
    IKernelProcess,
    ILauncher,
    ILauncherInventory,
    LaunchError,
    LaunchRequest,
    LauncherContext,
    Liveness,
    Phase,
    Placement,
    check_gateway_id,
    substitute_argv,
)
from egateway.clusters.ports import PortAllocator, PortExhausted
from egateway.observe import OneShotObserver
from egateway.wire.channels import ConnectionInfo

_log = Logger()

PYTHON_NAMES = {"python", "python3"} | {f"python3.{n}" for n in range(6, 20)}
TAIL_LINES = 20
TAIL_BYTES = 64 * 1024
"""
How much of its output's end a stopping kernel's log reads at most.
"""

SPEC_ENV = "EGATEWAY_KERNELSPEC"
"""
The kernelspec a local kernel was started from, in its environment: what
adopting it needs (a restart runs the kernelspec's argv again).
"""

LAUNCHER_NAMES = frozenset({GATEWAY_ID_ENV, SPEC_ENV, EXPORTED})
"""
Variables the launcher adds to a kernel's environment (not the manager's).
"""

REAP_POLL = 0.2
"""
Seconds between checks that a reaped kernel has gone.
"""

_CONNECTION_FILE = re.compile(r"^kernel-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.json\Z")


def python_executable(argv0: str) -> str:
    """
    As jupyter_client does, run kernelspecs that say C{python} with the
    gateway's own interpreter, so the default spec works in a virtualenv.
    """
    return sys.executable if argv0 in PYTHON_NAMES else argv0


def supports_curve(metadata: Mapping[str, Any]) -> bool:
    """
    Whether a kernelspec declares CurveZMQ support: C{"curve"} in
    C{metadata.supported_encryption} (a list or a single string).
    """
    declared = metadata.get("supported_encryption")
    if isinstance(declared, str):
        declared = [declared]
    if not isinstance(declared, (list, tuple)):
        return False
    return "curve" in {str(item).strip().lower() for item in declared}


def curve_keys_for(spec: Any, policy: str) -> tuple[bytes, bytes] | None:
    """
    A new CurveZMQ key pair (Z85 public, secret) for a kernel of C{spec},
    or C{None} when its channels stay in clear text.

    @raise LaunchError: C{policy} is C{required} and the kernel or this
        libzmq cannot encrypt.
    """
    import zmq

    if policy == "off":
        return None
    if not supports_curve(spec.metadata):
        if policy == "required":
            raise LaunchError(
                f"kernel_encryption is required, but kernelspec {spec.name!r} does not declare CurveZMQ "
                "support (metadata.supported_encryption: [\"curve\"])",
                status=403,
            )
        return None
    if not zmq.has("curve"):
        if policy == "required":
            raise LaunchError("kernel_encryption is required, but this gateway's libzmq lacks CurveZMQ")
        return None
    return zmq.curve_keypair()


def cleartext_reason(spec: Any, policy: str) -> str:
    """
    Why L{curve_keys_for} gave a kernel of C{spec} no keys under C{policy},
    for its model and the log.
    """
    import zmq

    if policy == "off":
        return "kernel_encryption is off"
    if not supports_curve(spec.metadata):
        return (
            f"kernelspec {spec.name!r} does not declare CurveZMQ support "
            "(metadata.supported_encryption: [\"curve\"], as ipykernel 7.4 or newer installs it)"
        )
    if not zmq.has("curve"):
        return "this gateway's libzmq lacks CurveZMQ"
    return ""


PF_EXITING = 0x4
"""
The flag of C{/proc/PID/stat} (its ninth field) of a process that is
exiting (Linux's C{include/linux/sched.h}).
"""


def _stat_fields(path: str) -> list[bytes]:
    """
    The fields of a C{/proc/PID/stat} after the command name: the state
    first, then the parent, the process group...  The name is cut at the
    last parenthesis, since it may hold spaces and parentheses itself.

    @raise OSError: no such process.
    @raise IndexError: not a stat file.
    """
    with open(path, "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def _pid_alive(pid: int, marker: str, proc: str = "/proc") -> bool:
    """
    Is C{pid} alive and still the process we started (its command line
    mentions C{marker})?  Guards against a recycled pid.

    A process that is exiting has released its memory, and so shows an
    empty command line, well before it is a zombie: it still holds its
    files and sockets (the kernel closes them next, which takes a while
    for a kernel's dozen sockets on a busy machine) and still counts as
    alive, so that a caller waiting for it to be gone waits for that.
    """
    try:
        # The command line first: once it reads empty the process has begun
        # exiting, so the flags read after it say so (read before it, they
        # could predate the exit and the empty command line follow).
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        fields = _stat_fields(f"{proc}/{pid}/stat")
        if fields[0] == b"Z":
            return False
        if marker and marker.encode() not in cmdline:
            return not cmdline and bool(int(fields[6]) & PF_EXITING)
        return True
    except (OSError, IndexError, ValueError):
        return False


@dataclass(frozen=True)
class LocalKernelFound:
    """
    A kernel process found by L{find_local_kernels_blocking}.

    @ivar pids: its processes naming the connection file (usually one).
    @ivar pgid: the process group of the first; the kernel's own when the
        launcher started it in a session of its own (C{pgid} in C{pids}).
    @ivar env: its environment without the launcher's variables.
    @ivar connection_info: the connection file's contents, or C{None} if
        it is gone or unreadable.
    """

    kernel_id: str
    pids: tuple[int, ...]
    pgid: int
    connection_file: str
    spec_name: str
    env: Mapping[str, str]
    connection_info: Mapping[str, Any] | None

    @property
    def pid(self) -> int:
        return self.pgid if self.pgid in self.pids else self.pids[0]

    @property
    def log_file(self) -> str:
        return self.connection_file[: -len(".json")] + ".log"


def _connection_file_in(argv: Sequence[bytes], directories: set[str]) -> tuple[str, str] | None:
    """
    The kernel id and path of the C{kernel-<uuid>.json} in one of
    C{directories} that a command line names (as C{-f PATH}, C{--f=PATH}
    or a bare argument), or C{None}.
    """
    for raw in argv:
        text = raw.decode("utf-8", "surrogateescape").rsplit("=", 1)[-1]
        directory, base = os.path.split(text)
        match = _CONNECTION_FILE.match(base)
        if match and directory and os.path.realpath(directory) in directories:
            return match.group(1), text
    return None


def find_local_kernels_blocking(
    runtime_dirs: Sequence[str], gateway_id: str, proc: str = "/proc"
) -> list[LocalKernelFound]:
    """
    The kernel processes of gateway C{gateway_id} on this machine: their
    command line names a connection file in one of C{runtime_dirs} and
    their environment holds C{EGATEWAY_ID=gateway_id}.  A process whose
    environment cannot be read is not counted (whose it is is unknown).
    Reads C{/proc} and the connection files: run it in a thread.
    """
    tag = f"{GATEWAY_ID_ENV}={gateway_id}".encode()
    directories = {os.path.realpath(d) for d in runtime_dirs if d}
    found: dict[str, LocalKernelFound] = {}
    try:
        names = os.listdir(proc)
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(os.path.join(proc, name, "cmdline"), "rb") as f:
                named = _connection_file_in(f.read().split(b"\0"), directories)
            if named is None:
                continue
            with open(os.path.join(proc, name, "environ"), "rb") as f:
                environ = f.read().split(b"\0")
            if tag not in environ:
                continue
            fields = _stat_fields(os.path.join(proc, name, "stat"))
            if fields[0] == b"Z":
                continue
            pgid = int(fields[2])
        except (OSError, IndexError, ValueError):
            continue
        kernel_id, connection_file = named
        pid = int(name)
        earlier = found.get(kernel_id)
        if earlier is not None:
            found[kernel_id] = LocalKernelFound(
                kernel_id,
                tuple(sorted((*earlier.pids, pid))),
                pgid if pid == pgid else earlier.pgid,
                earlier.connection_file,
                earlier.spec_name,
                earlier.env,
                earlier.connection_info,
            )
            continue
        env: dict[str, str] = {}
        for entry in environ:
            key, sep, value = entry.decode("utf-8", "replace").partition("=")
            if sep and key:
                env[key] = value
        try:
            with open(connection_file, "rb") as f:
                info = json.load(f)
            if not isinstance(info, dict):
                info = None
        except (OSError, ValueError):
            info = None
        found[kernel_id] = LocalKernelFound(
            kernel_id,
            (pid,),
            pgid,
            connection_file,
            env.get(SPEC_ENV, ""),
            {k: v for k, v in env.items() if k not in LAUNCHER_NAMES},
            info,
        )
    return sorted(found.values(), key=lambda f: f.kernel_id)


def remove_kernel_files(kernel_id: str, paths: Sequence[str]) -> None:
    """
    Remove a kernel's connection and output files; one already gone is
    fine, one that cannot be removed is logged (never raised: the kernel
    is stopped either way).
    """
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            _log.warn("kernel {kernel_id}: could not remove {path}: {error}", kernel_id=kernel_id, path=path, error=str(e))


def kernel_file_paths(runtime_dir: str, kernel_id: str) -> tuple[str, str]:
    """
    A kernel's connection file and output file.
    """
    return (
        os.path.join(runtime_dir, f"kernel-{kernel_id}.json"),
        os.path.join(runtime_dir, f"kernel-{kernel_id}.log"),
    )


def create_private_files_blocking(paths: Sequence[str], account: Account) -> None:
    """
    Create C{paths}, each C{account}'s alone (owner change and all, in the
    thread pool before the launch opens them).
    """
    for path in paths:
        os.close(open_private_blocking(path, os.O_WRONLY, account))


def _open_kernel_file(path: str, flags: int, private_to: Account | None) -> int:
    """
    Open (creating, mode 0600) one of a kernel's files.  When the kernel
    runs as the user C{private_to}, the file was made theirs by
    L{create_private_files_blocking}; it is opened as it is, never
    through a symbolic link.
    """
    if private_to is not None:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    return os.open(path, flags | os.O_CREAT, 0o600)


class KernelLog:
    """
    Follows a kernel's output file, logging each new line tagged with the
    kernel id and keeping the last lines to explain an early exit.

    Kernels write to a file rather than to a pipe to the gateway: a kernel
    must outlive a gateway restart, and ipykernel wedges when its stdout pipe
    breaks.  The file is opened once and kept open; each tick asks its size
    (an C{fstat} of the open descriptor) and reads only the bytes appended
    since the last tick, at most L{CHUNK} of them, so a quiet kernel costs no
    read at all and the reactor never re-reads what it already logged.
    """

    INTERVAL = 1.0
    CHUNK = 64 * 1024

    def __init__(self, kernel_id: str, path: str, clock: Any, from_end: bool = False) -> None:
        self.kernel_id = kernel_id
        self.path = path
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.watchers: list[Callable[[str], None]] = []
        """
        Called with each new line of output.
        """
        self._partial = b""
        self._offset = 0
        self._fd: int | None = None
        self._open()
        if from_end and self._fd is not None:
            self._offset = os.fstat(self._fd).st_size
        self._loop = LoopingCall(self.read)
        self._loop.clock = clock
        self._loop.start(self.INTERVAL, now=False)

    def _open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            # Not there (yet, or any more): the next tick tries again.
            self._fd = None

    def read(self, limit: int | None = None) -> None:
        """
        Log what the kernel appended since the last read (at most C{limit}
        bytes; default L{CHUNK}).
        """
        if self._fd is None:
            self._open()
            if self._fd is None:
                return
        try:
            size = os.fstat(self._fd).st_size
            if size < self._offset:
                # Truncated: start again from its beginning.
                self._offset = 0
            if size == self._offset:
                return
            data = os.pread(self._fd, min(size - self._offset, limit or self.CHUNK), self._offset)
        except OSError:
            return
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for raw in lines:
            self._line(raw)

    def _line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip()
        if line:
            self.tail.append(line)
            _log.info("kernel {kernel_id}: {line}", kernel_id=self.kernel_id, line=line)
            for watcher in list(self.watchers):
                watcher(line)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self._fd is None and not self._partial:
            return
        # The last words of a kernel that exits explain why: read its end
        # (a kernel that flooded its output is not read through here).
        if self._fd is not None:
            try:
                size = os.fstat(self._fd).st_size
            except OSError:
                size = self._offset
            if size - self._offset > TAIL_BYTES:
                self._offset, self._partial = size - TAIL_BYTES, b""
        self.read(limit=TAIL_BYTES)
        if self._partial:
            self._line(self._partial)
            self._partial = b""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _KernelProcessProtocol(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[ExitStatus] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        signal = getattr(value, "signal", None)
        if signal is not None:
            self.ended.callback(ExitStatus(signal=signal))
        else:
            self.ended.callback(ExitStatus(code=getattr(value, "exitCode", None)))


BIND_FAILED = "Address already in use"
"""
What a kernel prints when one of its ports was taken between our choice and
its bind (by a process outside the gateway's allocator).
"""


def explained(status: ExitStatus, log: KernelLog, bind_failed: bool = False) -> ExitStatus:
    """
    An exit status with the end of the kernel's output as its reason.

    @param bind_failed: the gateway killed the kernel because it could not
        bind its ports: a fresh launch on other ports can succeed.
    """
    log.stop()
    tail = " | ".join(list(log.tail)[-5:])
    if bind_failed:
        return ExitStatus(
            code=status.code,
            signal=status.signal,
            reason=f"could not bind its ports ({tail})",
            retryable=True,
        )
    if status.code not in (None, 0) and tail:
        return ExitStatus(
            code=status.code,
            reason=f"exited with code {status.code}: {tail}",
            retryable=BIND_FAILED in tail,
        )
    return status


@implementer(IKernelProcess)
class LocalKernelProcess:
    def __init__(
        self,
        kernel_id: str,
        connection_info: ConnectionInfo,
        connection_file: str,
        pid: int,
        ports: list[int],
        allocator: PortAllocator,
        reactor: Any,
        protocol: _KernelProcessProtocol | None,
        log: KernelLog,
    ) -> None:
        self.kernel_id = kernel_id
        self.connection_info = connection_info
        self.connection_file = connection_file
        self.log = log
        self.placement = Placement(host="localhost", ip=connection_info.ip, pid=pid, pgid=pid)
        self._ports = ports
        self._allocator = allocator
        self._reactor = reactor
        self._protocol = protocol
        self._exit: ExitStatus | None = None
        self._exited: OneShotObserver[ExitStatus] = OneShotObserver()
        self._watch: LoopingCall | None = None
        self._bind_failed = False
        if protocol is not None:
            protocol.ended.addCallback(lambda status: self._ended(explained(status, log, self._bind_failed)))
            log.watchers.append(self._starting_line)
        else:
            # Restored: not our child, so we learn of its end by polling.
            self._watch = LoopingCall(self._check_alive)
            self._watch.clock = reactor
            self._watch.start(1.0, now=False)

    @property
    def pid(self) -> int:
        return self.placement.pid

    def _starting_line(self, line: str) -> None:
        """
        A line of output before the kernel is ready.  ipykernel that fails
        to bind a port prints the error and may then hang instead of
        exiting (its threads keep it alive), so the launch would wait for
        its timeout: kill it now, and its exit says a retry can succeed.
        """
        if BIND_FAILED in line and self._exit is None and not self._bind_failed:
            self._bind_failed = True
            _log.warn("kernel {kernel_id}: a port was taken; stopping it to retry", kernel_id=self.kernel_id)
            self.signal(signals.SIGKILL)

    def _check_alive(self) -> None:
        if not _pid_alive(self.pid, self.connection_file):
            self._ended(ExitStatus(reason="the kernel process is gone"))

    def _ended(self, status: ExitStatus) -> ExitStatus:
        if self._exit is None:
            self._exit = status
            self.log.stop()
            if self._watch is not None and self._watch.running:
                self._watch.stop()
            self._allocator.release(self._ports)
            self._exited.fire(status)
        return status

    def when_exited(self) -> Deferred[ExitStatus]:
        return self._exited.when_fired()

    def poll(self) -> Deferred[Liveness]:
        if self._exit is not None:
            return succeed(Liveness(False, self._exit.describe()))
        if not _pid_alive(self.pid, "" if self._protocol else self.connection_file):
            return succeed(Liveness(False, "the kernel process is gone"))
        return succeed(Liveness(True))

    def signal(self, signum: int) -> Deferred[None]:
        if self._exit is None:
            try:
                os.killpg(self.pid, signum)
            except ProcessLookupError:
                pass
            except PermissionError as e:
                raise LaunchError(f"cannot signal kernel process {self.pid}: {e}")
        return succeed(None)

    def terminate(self, grace: float) -> Deferred[ExitStatus]:
        if self._exit is not None:
            return succeed(self._exit)
        exited = self.when_exited()
        self.signal(signals.SIGTERM)
        kill = self._reactor.callLater(grace, self.signal, signals.SIGKILL)

        def stop_kill(status: ExitStatus) -> ExitStatus:
            if kill.active():
                kill.cancel()
            return status

        return exited.addCallback(stop_kill)

    def ready(self) -> None:
        self._allocator.release(self._ports)
        if self._starting_line in self.log.watchers:
            self.log.watchers.remove(self._starting_line)

    def cleanup(self) -> Deferred[None]:
        self._allocator.release(self._ports)
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        self.log.stop()
        remove_kernel_files(self.kernel_id, (self.connection_file, self.log.path))
        return succeed(None)

    def detach(self) -> None:
        """
        Stop watching the kernel without stopping it (the gateway is going
        away and the kernel stays).
        """
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        self.log.stop()

    def snapshot(self) -> dict:
        return {
            "pid": self.pid,
            "connection_file": self.connection_file,
            "log_file": self.log.path,
            "connection_info": self.connection_info.snapshot(),
        }


@implementer(ILauncher, ILauncherInventory)
class LocalLauncher:
    """
    Starts kernels as processes on the gateway's machine.
    """

    name = "local"

    def __init__(self, context: LauncherContext) -> None:
        self._reactor = context.reactor
        self._run_blocking = context.run_blocking
        self._runtime_dir = context.runtime_dir
        self._ports: PortAllocator = context.ports
        self._setsid = shutil.which("setsid")
        self._gateway_id = context.shared.gateway_id
        self._encryption = context.shared.kernels.kernel_encryption
        self._terminate_wait = context.shared.kernels.terminate_wait
        self.impersonation = Impersonation(context.shared.impersonation)
        self._user_files_dir: str | None = None

    def launch(self, request: LaunchRequest) -> Deferred[IKernelProcess]:
        if self.impersonation.enabled:
            return Deferred.fromCoroutine(self._launch_as_user(request))
        try:
            return succeed(self._start(request))
        except LaunchError as e:
            return Deferred.fromCoroutine(_raise(e))

    async def _launch_as_user(self, request: LaunchRequest) -> LocalKernelProcess:
        """
        Start the kernel as C{request.username}'s account.

        @raise LaunchError: 403 for a user who may not be impersonated; 500
            when the gateway cannot switch users (it does not run as root).
        """
        account = await self.impersonation.local_account(self._run_blocking, request.username)
        euid = os.geteuid()
        if account.uid == euid:
            # The gateway already runs as this user: nothing to switch.
            return self._start(request, account)
        if euid != 0:
            raise LaunchError(
                f"cannot start a local kernel as {account.name!r}: impersonation needs the gateway to run as "
                f"root, and it runs as uid {euid}"
            )
        if self._user_files_dir is None:
            self._user_files_dir = await self._run_blocking(
                prepare_runtime_dir_blocking, self.impersonation.runtime_dir
            )
        paths = kernel_file_paths(self._user_files_dir, request.kernel_id)
        try:
            await self._run_blocking(create_private_files_blocking, paths, account)
        except OSError as e:
            remove_kernel_files(request.kernel_id, paths)
            raise LaunchError(f"cannot create the kernel's files in {self._user_files_dir}: {e.strerror}")
        try:
            return self._start(request, account, self._user_files_dir)
        except BaseException:
            remove_kernel_files(request.kernel_id, paths)
            raise

    def _start(
        self, request: LaunchRequest, account: Account | None = None, user_files_dir: str | None = None
    ) -> LocalKernelProcess:
        """
        @param account: the account to run the kernel as (impersonation).
        @param user_files_dir: where its files go when the kernel runs as
            another user than the gateway; they are then that user's.
        """
        runtime_dir = user_files_dir or self._runtime_dir
        private_to = account if user_files_dir else None
        curve = curve_keys_for(request.spec, self._encryption)
        try:
            ports = self._ports.reserve(5)
        except PortExhausted as e:
            raise LaunchError(f"no free ports for the kernel: {e}")
        info = ConnectionInfo(
            ip=self._ports.host,
            shell_port=ports[0],
            iopub_port=ports[1],
            stdin_port=ports[2],
            control_port=ports[3],
            hb_port=ports[4],
            key=secrets.token_hex(32).encode("ascii"),
            curve_publickey=curve[0] if curve else None,
            curve_secretkey=curve[1] if curve else None,
            encryption_reason="" if curve else cleartext_reason(request.spec, self._encryption),
        )
        connection_file, log_path = kernel_file_paths(runtime_dir, request.kernel_id)
        try:
            fd = _open_kernel_file(connection_file, os.O_WRONLY | os.O_TRUNC, private_to)
            with os.fdopen(fd, "w") as f:
                json.dump(info.to_dict(), f)
        except OSError as e:
            self._ports.release(ports)
            raise LaunchError(f"cannot write connection file {connection_file}: {e.strerror}")
        spec = request.spec
        argv = substitute_argv(
            spec.argv,
            {
                "connection_file": connection_file,
                "kernel_id": request.kernel_id,
                "resource_dir": spec.resource_dir,
                "prefix": sys.prefix,
            },
        )
        argv[0] = python_executable(argv[0])
        if self._setsid:
            argv = [self._setsid, *argv]
        protocol = _KernelProcessProtocol()
        try:
            output = _open_kernel_file(log_path, os.O_WRONLY | os.O_APPEND, private_to)
        except OSError as e:
            self._ports.release(ports)
            os.unlink(connection_file)
            raise LaunchError(f"cannot open the kernel's output file {log_path}: {e.strerror}")
        stdin = os.open(os.devnull, os.O_RDONLY)
        if account is not None:
            env = self.impersonation.local_env(request.env, account)
            cwd = request.cwd or (account.home if account.home_exists else "/")
        else:
            env = self.impersonation.exported(request.env)
            cwd = request.cwd or None
        if self._gateway_id:
            env[GATEWAY_ID_ENV] = self._gateway_id
            env[SPEC_ENV] = spec.name
        switch: dict[str, int] = {"uid": account.uid, "gid": account.gid} if private_to is not None else {}
        try:
            transport = self._reactor.spawnProcess(
                protocol,
                argv[0],
                argv,
                env=env,
                path=cwd,
                childFDs={0: stdin, 1: output, 2: output},
                **switch,
            )
        except (OSError, twisted_errors.ProcessExitedAlready) as e:
            self._ports.release(ports)
            os.unlink(connection_file)
            raise LaunchError(f"cannot start {argv[0]}: {e}")
        finally:
            os.close(output)
            os.close(stdin)
        request.report(Phase.SUBMITTED, f"pid {transport.pid}")
        request.report(Phase.PLACED, "localhost")
        request.report(
            Phase.CONNECTION_INFO,
            f"{info.ip} ports {ports[0]}-{ports[-1]}{', CurveZMQ' if info.encrypted else ''}",
        )
        return LocalKernelProcess(
            request.kernel_id,
            info,
            connection_file,
            transport.pid,
            ports,
            self._ports,
            self._reactor,
            protocol,
            KernelLog(request.kernel_id, log_path, self._reactor),
        )

    def restore(self, kernel_id: str, snapshot: Mapping[str, Any]) -> Deferred[IKernelProcess]:
        try:
            pid = int(snapshot["pid"])
            connection_file = str(snapshot["connection_file"])
            info = ConnectionInfo.from_dict(snapshot["connection_info"])
        except (KeyError, TypeError, ValueError) as e:
            return Deferred.fromCoroutine(_raise(LaunchError(f"bad local snapshot: {e}")))
        log_path = str(snapshot.get("log_file") or connection_file.replace(".json", ".log"))
        if not _pid_alive(pid, connection_file):
            for leftover in (connection_file, log_path):
                try:
                    os.unlink(leftover)
                except OSError:
                    pass
            return Deferred.fromCoroutine(
                _raise(LaunchError(f"kernel process {pid} is no longer running"))
            )
        log = KernelLog(kernel_id, log_path, self._reactor, from_end=True)
        return succeed(
            LocalKernelProcess(kernel_id, info, connection_file, pid, [], self._ports, self._reactor, None, log)
        )

    # -- inventory ---------------------------------------------------------

    def inventory(self, gateway_id: str, hints: Sequence[Mapping[str, Any]] = ()) -> Deferred[list[Found]]:
        """
        This machine's kernel processes of C{gateway_id}, found in a thread
        (see L{find_local_kernels_blocking}); each adoptable while its
        connection file is readable.
        """
        try:
            check_gateway_id(gateway_id)
        except ValueError as e:
            return Deferred.fromCoroutine(_raise(LaunchError(str(e))))
        directories = [self._runtime_dir]
        if self.impersonation.enabled:
            directories.append(self.impersonation.runtime_dir)
        scanning = self._run_blocking(find_local_kernels_blocking, directories, gateway_id)
        return scanning.addCallback(lambda kernels: [self._found(kernel) for kernel in kernels])

    def _found(self, kernel: LocalKernelFound) -> Found:
        snapshot = None
        if kernel.connection_info is not None:
            snapshot = {
                "pid": kernel.pid,
                "connection_file": kernel.connection_file,
                "log_file": kernel.log_file,
                "connection_info": dict(kernel.connection_info),
            }
        pids = ", ".join(str(pid) for pid in kernel.pids)
        return Found(
            kernel_id=kernel.kernel_id,
            launcher=self.name,
            description=f"local process {pids} ({kernel.connection_file})",
            reap=lambda: Deferred.fromCoroutine(self._reap(kernel)),
            snapshot=snapshot,
            spec_name=kernel.spec_name,
            env=kernel.env,
        )

    async def _reap(self, kernel: LocalKernelFound) -> None:
        """
        SIGTERM, then SIGKILL after C{terminate_wait}, to the kernel's
        process group (its own session) or else its processes; then its
        connection and output files go.

        @raise LaunchError: the kernel could not be signalled or outlived
            SIGKILL.
        """
        own_group = kernel.pgid in kernel.pids

        def alive() -> bool:
            return any(_pid_alive(pid, kernel.connection_file) for pid in kernel.pids)

        def group_alive() -> bool:
            try:
                os.killpg(kernel.pgid, 0)
                return True
            except (ProcessLookupError, PermissionError):
                return False

        def send(signum: int, group: bool) -> None:
            try:
                if group:
                    os.killpg(kernel.pgid, signum)
                else:
                    for pid in kernel.pids:
                        if _pid_alive(pid, kernel.connection_file):
                            os.kill(pid, signum)
            except ProcessLookupError:
                pass
            except PermissionError as e:
                raise LaunchError(f"cannot signal kernel process {kernel.pid}: {e}") from None

        for signum, wait in ((signals.SIGTERM, self._terminate_wait), (signals.SIGKILL, 5.0)):
            if not alive():
                break
            send(signum, own_group)
            deadline = self._reactor.seconds() + wait
            while alive() and self._reactor.seconds() < deadline:
                await deferLater(self._reactor, REAP_POLL, lambda: None)
        if alive():
            raise LaunchError(f"kernel process {kernel.pid} outlived SIGKILL")
        if own_group and group_alive():
            # What the kernel started in its session goes with it.
            send(signals.SIGKILL, True)
        remove_kernel_files(kernel.kernel_id, (kernel.connection_file, kernel.log_file))


async def _raise(error: Exception) -> Any:
    raise error
