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

A launcher may also provide L{ILauncherInventory}: listing the kernels it
finds running for this gateway installation (tagged with its gateway id),
so the reconciler (L{egateway.kernels.reconcile}) can adopt or reap those
the kernel store no longer knows.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from egateway.config import Config, ImpersonationConfig, KernelsConfig, ResponseConfig
from egateway.errors import GatewayError
from egateway.names import ENV_NAME, check_gateway_id  # noqa: F401 (launchers import them from here)
from egateway.wire.channels import ConnectionInfo


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
    @ivar decision: the kernel was ended on purpose by someone other than
        the gateway (a Slurm job cancelled, a YARN application killed, a
        pod deleted by the cluster's operator).  That is a decision, not a
        crash: the manager declares the kernel dead with C{reason} instead
        of restarting it.  A process killed by a signal is a crash (the
        signal may come from the OOM killer as well as from a person), so
        local and SSH launchers leave this false.
    """

    code: int | None = None
    signal: int | None = None
    reason: str = ""
    retryable: bool = False
    decision: bool = False

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
    """
    Whether a kernel lives; when it does not, C{reason} says how it ended
    and C{decision} whether it was ended on purpose outside the gateway
    (see L{ExitStatus.decision}).
    """

    alive: bool
    reason: str = ""
    decision: bool = False


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
        new Deferred.  A launcher whose cluster says who ended a kernel
        sets L{ExitStatus.decision} when it was not the gateway, so the
        kernel is not restarted against the operator's will.
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


GATEWAY_ID_ENV = "EGATEWAY_ID"
"""
The variable local and SSH kernels carry in their environment, naming the
gateway installation that started them, so its reconciler finds them (and
never another installation's) after their store records are gone.
"""


@dataclass(frozen=True)
class Found:
    """
    A kernel a launcher found running for this gateway installation (see
    L{ILauncherInventory}).

    @ivar description: where and what, for the log (C{"local process 123
        (/var/lib/egateway/runtime/kernel-....json)"}).
    @ivar reap: stops everything of the kernel (politely, then firmly)
        and removes its files; tolerates a kernel already gone.
    @ivar snapshot: what L{ILauncher.restore} needs to reattach, or
        C{None} when this launcher cannot reattach to what it found.
    @ivar spec_name: the kernelspec it was started from, when known.
    @ivar env: its environment as found (without the launcher's own
        variables), when known: what a restart of an adopted kernel uses.
    """

    kernel_id: str
    launcher: str
    description: str
    reap: Callable[[], "Deferred[None]"]
    snapshot: Mapping[str, Any] | None = None
    spec_name: str = ""
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def adoptable(self) -> bool:
        return self.snapshot is not None


class ILauncherInventory(Interface):
    """
    Optional for launchers: listing the kernels running for a gateway
    installation, whether or not the gateway still knows them.
    """

    def inventory(gateway_id: str, hints: Sequence[Mapping[str, Any]]) -> "Deferred[list[Found]]":
        """
        Every kernel found running that was started with C{gateway_id}
        (and nothing started with another id).  A launcher that finds
        several processes of one kernel reports the kernel once.

        @param hints: the launcher configs of the kernelspecs naming this
            launcher (where to look: an SSH kernelspec's C{remote_hosts}).
        @raise LaunchError: the launcher cannot look (its cluster's
            commands are missing or fail); places it cannot reach are
            logged and skipped instead.
        """


@dataclass(frozen=True)
class LaunchSettings:
    """
    The settings every launcher shares, beside its own section.

    @ivar gateway_id: this installation's id, which launchers tag the
        kernels they start with (empty: no tag).
    @ivar kernels: the C{[kernels]} section (port range, stop waits,
        encryption).
    @ivar impersonation: the C{[impersonation]} section.
    @ivar response: the C{[response]} section, for the response listener
        remote launchers share.
    """

    gateway_id: str = ""
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    impersonation: ImpersonationConfig = field(default_factory=ImpersonationConfig)
    response: ResponseConfig = field(default_factory=ResponseConfig)

    @classmethod
    def from_config(cls, config: Config, gateway_id: str = "") -> "LaunchSettings":
        return cls(gateway_id, config.kernels, config.impersonation, config.response)


@dataclass
class LauncherContext:
    """
    What the gateway gives a launcher at construction: its own
    configuration section and the shared launch settings, never the whole
    configuration (L{egateway.clusters.registry} hands each launcher its
    section).

    @ivar section: the launcher's own section (L{egateway.config.SSHConfig}
        for C{ssh}, L{egateway.config.SlurmConfig} for C{slurm}); C{None}
        for a launcher that has none.
    @ivar threadpool: the gateway's pool for blocking work (see
        L{egateway.services.BlockingPool}); use it through L{run_blocking}.
    """

    reactor: Any
    runtime_dir: str
    ports: Any
    section: Any = None
    shared: LaunchSettings = field(default_factory=LaunchSettings)
    services: dict[str, Any] = field(default_factory=dict)
    threadpool: Any = None

    def run_blocking(self, f: Callable[..., Any], *args: Any) -> "Deferred[Any]":
        """
        C{f(*args)} in the gateway's thread pool, never on the reactor.

        @raise RuntimeError: the context was built without a pool.
        """
        from twisted.internet.threads import deferToThreadPool

        if self.threadpool is None:
            raise RuntimeError("this launcher context has no thread pool for blocking work")
        return deferToThreadPool(self.reactor, self.threadpool, f, *args)


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
