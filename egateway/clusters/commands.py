"""
The one way a launcher runs a cluster's command-line tools (sbatch,
squeue, scancel, and the kubectl, docker or yarn of launchers to come): a
child process started with C{spawnProcess} from an argv list (never a
shell, never blocking the reactor), its output bounded, killed when it
outlives its timeout or when the caller cancels, and its outcome one
L{CommandResult} whatever the exit status.  Commands run over SSH go
through conch instead (L{egateway.clusters.sshclient}).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from egateway.clusters.interface import LaunchError

COMMAND_TIMEOUT = 30.0
"""
Seconds any one command may take before it is killed.
"""

MAX_OUTPUT = 1 << 20
"""
Bytes of a command's output (stdout and stderr together) that are kept.
"""


@dataclass(frozen=True)
class CommandResult:
    """
    How a command ended: its exit code or signal, its (bounded) output,
    and whether it was killed for taking longer than C{timeout} seconds.
    """

    argv: tuple[str, ...]
    code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    timeout: float = COMMAND_TIMEOUT

    @property
    def ok(self) -> bool:
        return self.code == 0

    @property
    def error(self) -> str:
        """
        stderr as one line, C{"<tool>: error: "} prefixes removed.
        """
        lines = self.stderr.decode("utf-8", "replace").strip().splitlines()
        cleaned = [re.sub(r"^\w+: error: ", "", line).strip() for line in lines]
        return "; ".join(line for line in cleaned if line)

    def describe(self) -> str:
        name = os.path.basename(self.argv[0]) if self.argv else "command"
        if self.timed_out:
            return f"{name} did not finish within {self.timeout:g} s"
        how = f"exited with code {self.code}" if self.code is not None else f"was killed by signal {self.signal}"
        return f"{name} {how}" + (f": {self.error}" if self.error else "")


class _Collector(ProcessProtocol):
    def __init__(self, argv: Sequence[str], stdin: bytes, done: Deferred[CommandResult], timeout: float) -> None:
        self.argv = tuple(argv)
        self.stdin = stdin
        self.done = done
        self.timeout = timeout
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
                timeout=self.timeout,
            )
        )


def run_command(
    reactor: Any,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    stdin: bytes = b"",
    timeout: float = COMMAND_TIMEOUT,
) -> Deferred[CommandResult]:
    """
    Run C{argv} (its first element an absolute path) with exactly C{env}.
    Fires with a L{CommandResult} whatever the exit status; cancelling
    kills the command.

    @raise LaunchError: synchronously, if the command cannot be started.
    """
    argv = list(argv)
    done: Deferred[CommandResult] = Deferred(lambda _: collector.kill())
    collector = _Collector(argv, stdin, done, timeout)
    try:
        reactor.spawnProcess(collector, argv[0], argv, env=dict(env))
    except OSError as e:
        raise LaunchError(f"cannot run {argv[0]}: {e}") from None
    collector.timer = reactor.callLater(timeout, collector.expire)
    return done


class CommandSet:
    """
    A cluster's command-line tools, each found once (in C{bin_dir} when the
    operator set one, else on C{path}) and run with a fixed environment
    (C{PATH}, C{LC_ALL=C} and the tools' own settings, so nothing in the
    gateway's environment changes what is parsed).
    """

    def __init__(
        self,
        reactor: Any,
        *,
        owner: str,
        bin_dir: str,
        bin_dir_setting: str,
        install_hint: str,
        path: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._reactor = reactor
        self._owner = owner
        self._bin_dir = bin_dir
        self._bin_dir_setting = bin_dir_setting
        self._install_hint = install_hint
        self._path = path
        self._env = dict(env or {})
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
                where = f"in {self._bin_dir_setting} {self._bin_dir}"
            else:
                found = shutil.which(name, path=self._path)
                where = "on the gateway's PATH"
            if found is None:
                raise LaunchError(f"{self._owner} {name} was not found {where}; {self._install_hint}")
            self._found[name] = found
        return found

    def environment(self) -> dict[str, str]:
        return {"PATH": self._path, "LC_ALL": "C", **self._env}

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
        Run C{name} with C{args} (see L{run_command}); C{env} replaces the
        fixed environment.

        @raise LaunchError: synchronously, if the command is not installed.
        """
        return run_command(
            self._reactor, [self.executable(name), *args], env=env if env is not None else self.environment(),
            stdin=stdin, timeout=timeout,
        )


__all__ = ["COMMAND_TIMEOUT", "MAX_OUTPUT", "CommandResult", "CommandSet", "run_command"]
