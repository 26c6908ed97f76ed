"""
The launcher contract: what every way of starting a kernel (a local process,
an SSH host, a Slurm job, a YARN application, a pod, a container) provides
to the kernel manager.

A launcher is a long-lived object, one per kind, created at start-up with a
L{LauncherContext}.  C{launch} starts one kernel and fires with an
L{IKernelProcess} once the kernel's connection information is known and its
placement recorded; the manager then connects and waits for C{kernel_info}.
Cancelling the C{launch} Deferred (the manager does so on timeout) must
remove everything the launch started.

Launchers report progress as L{Phase} events.  The manager logs them, keeps
them on the kernel (they appear in its REST model) and quotes the last one in
the error a client gets when a launch fails.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from egateway.errors import GatewayError
from egateway.wire.connection import ConnectionInfo


class Phase(str, enum.Enum):
    """
    Launch phases, in the order a launch passes through them.  Not every
    launcher passes through every phase (a local process is never queued).
    """

    QUEUED = "queued"
    SUBMITTED = "submitted"
    PLACED = "placed"
    CONNECTION_INFO = "connection info received"
    CONNECTED = "connected"
    READY = "ready"


@dataclass(frozen=True)
class PhaseEvent:
    phase: Phase
    at: float
    detail: str = ""

    def describe(self) -> str:
        return f"{self.phase.value}" + (f" ({self.detail})" if self.detail else "")

    def to_dict(self, iso: Callable[[float], str]) -> dict[str, str]:
        return {"phase": self.phase.value, "at": iso(self.at), "detail": self.detail}


PhaseReporter = Callable[[Phase, str], None]


@dataclass(frozen=True)
class Placement:
    """
    Where a kernel runs, as far as its launcher knows.  Launchers fill what
    applies; C{extra} carries launcher-specific identifiers (job id, pod,
    application id).
    """

    host: str = ""
    ip: str = ""
    pid: int = 0
    pgid: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {k: v for k, v in (("host", self.host), ("ip", self.ip), ("pid", self.pid)) if v}
        result.update(self.extra)
        return result


@dataclass(frozen=True)
class ExitStatus:
    """
    How a kernel ended.

    @ivar retryable: the launch failed for a reason a fresh attempt can fix
        (a port taken between our check and the kernel's bind).
    """

    code: int | None = None
    signal: int | None = None
    reason: str = ""
    retryable: bool = False

    def describe(self) -> str:
        import signal as signals

        if self.reason:
            return self.reason
        if self.signal is not None:
            try:
                name = signals.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"killed by signal {self.signal} ({name})"
        if self.code is not None:
            return f"exited with code {self.code}"
        return "ended"


@dataclass(frozen=True)
class Liveness:
    alive: bool
    reason: str = ""


@dataclass(frozen=True)
class LaunchRequest:
    """
    Everything a launcher needs to start one kernel.

    @ivar env: the kernel's complete environment, already filtered and
        validated by the manager; launchers add only their own variables.
    @ivar config: the kernelspec's launcher configuration.
    @ivar report: call with each phase reached.
    """

    kernel_id: str
    spec: Any
    env: Mapping[str, str]
    config: Mapping[str, Any]
    username: str
    report: PhaseReporter
    timeout: float
    cwd: str = ""


class LaunchError(GatewayError):
    """
    A launch failed.  The message says why in terms an operator can act on;
    C{status} is the HTTP status the client should see.
    """

    status = 500


class IKernelProcess(Interface):
    """
    A launched kernel, as its launcher controls it.
    """

    connection_info: ConnectionInfo = Attribute("Where the kernel's sockets listen.")
    placement: Placement = Attribute("Where the kernel runs.")

    def when_exited() -> "Deferred[ExitStatus]":
        """
        Fires once the launcher knows the kernel has ended (by watching the
        process, or by polling its cluster manager).  Each call returns a
        new Deferred.
        """

    def poll() -> "Deferred[Liveness]":
        """
        Ask now whether the kernel is alive.
        """

    def signal(signum: int) -> "Deferred[None]":
        """
        Deliver a signal to the kernel process (interrupts among them).
        """

    def terminate(grace: float) -> "Deferred[ExitStatus]":
        """
        Stop the kernel: SIGTERM (or the cluster manager's cancel), then
        SIGKILL after C{grace} seconds.  Tolerates a kernel already gone.
        """

    def ready() -> None:
        """
        The kernel answered C{kernel_info}: release anything held only for
        the launch (port reservations).
        """

    def cleanup() -> "Deferred[None]":
        """
        Remove everything the launch created (files, jobs, tunnels).
        Idempotent; called after every launch, failed or not.
        """

    def snapshot() -> dict:
        """
        A JSON-able record from which L{ILauncher.restore} in a later gateway
        process can reattach to this kernel.
        """

    def detach() -> None:
        """
        Stop watching the kernel and let it run on: the gateway is stopping
        and a later one will restore it from its snapshot.
        """


class ILauncher(Interface):
    """
    One way of starting kernels.
    """

    name: str = Attribute("The name kernelspecs use to choose this launcher.")

    def launch(request: LaunchRequest) -> "Deferred[IKernelProcess]":
        """
        Start a kernel.  Fails with L{LaunchError}.  Cancelling the Deferred
        removes whatever was started.
        """

    def restore(kernel_id: str, snapshot: Mapping[str, Any]) -> "Deferred[IKernelProcess]":
        """
        Reattach to a kernel launched by an earlier gateway process.  Fails
        with L{LaunchError} if it is gone.
        """


@dataclass
class LauncherContext:
    """
    What the gateway gives every launcher at construction.
    """

    reactor: Any
    runtime_dir: str
    ports: Any
    settings: Mapping[str, Any] = field(default_factory=dict)
    services: dict[str, Any] = field(default_factory=dict)


LauncherFactory = Callable[[LauncherContext], ILauncher]


def substitute_argv(argv: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """
    Replace C{{name}} placeholders in each argument; unknown placeholders
    stay as they are (as in Enterprise Gateway).  Values never pass through
    a shell: each argument stays one argument.
    """
    import re

    pattern = re.compile(r"\{([A-Za-z0-9_]+)\}")

    def one(arg: str) -> str:
        return pattern.sub(lambda m: values.get(m.group(1), m.group(0)), arg)

    return [one(arg) for arg in argv]
