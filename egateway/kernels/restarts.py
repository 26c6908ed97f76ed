"""
The restart policy: what happens when a kernel dies, and requested restarts.

Separate from the manager because it is policy, with its own state (the
recent failures of each kernel): a kernel that dies is restarted up to
C{restart_limit} times within L{STABLE_AFTER} seconds, unless the cluster's
operator ended it on purpose; past the limit it is declared dead.  A
requested restart passes admission again when it revives a dead kernel.
Restarts run as the manager's operations, so they never overlap another
operation on the same kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from egateway.clusters.interface import ExitStatus, IKernelProcess
from egateway.errors import Conflict
from egateway.kernels.admission import AdmissionControl
from egateway.kernels.kernel import Kernel
from egateway.kernels.launching import Launching
from egateway.kernels.policy import ENDED
from egateway.kernels.shutdown import Stopping
from egateway.kernels.state import KernelState

if TYPE_CHECKING:
    from egateway.kernels.interfaces import IKernelTable

_log = Logger()

STABLE_AFTER = 30.0
"""
Seconds a restarted kernel must stay up before its failures are forgiven.
"""


class RestartPolicy:
    """
    Watches running kernels and restarts them.
    """

    def __init__(
        self,
        *,
        manager: IKernelTable,
        clock: IReactorTime,
        launching: Launching,
        admission: AdmissionControl,
        stopping: Stopping,
    ) -> None:
        """
        @param manager: whose kernels, operations and settings these are.
        """
        self._manager = manager
        self._clock = clock
        self._launching = launching
        self._admission = admission
        self._stopping = stopping
        self._recent_failures: dict[str, list[float]] = {}

    def watch(self, kernel: Kernel, process: IKernelProcess) -> None:
        """
        Restart C{kernel} automatically if C{process}, its ready process,
        exits while it runs, it is still this gateway's, and no other
        operation is under way on it.
        """
        manager = self._manager

        def exited(status: ExitStatus) -> None:
            if kernel.process is not process or kernel.state != KernelState.RUNNING:
                return
            if kernel.pooled:
                # Its pool replaces it.
                return
            if not manager.running or manager.kernels.get(kernel.id) is not kernel:
                # Kept for the next gateway, or no longer ours.
                return
            if manager.current_operation(kernel.id) is not None:
                return
            manager.last_exit[kernel.id] = status
            manager.start_operation(kernel, "auto-restart", self.auto_restart, status, observed=False)

        process.when_exited().addCallback(exited)

    async def auto_restart(self, kernel: Kernel, status: ExitStatus | None) -> None:
        """
        The step of an automatic restart of C{kernel}, which ended with
        C{status}: relaunch it, or declare it dead when it was ended on
        purpose or has died too often.  Sharing runs it too, for a kernel
        whose gateway went away while restarting it.
        """
        why = (status or ExitStatus(reason="ended")).describe()
        if status is not None and status.decision:
            # Cancelled or deleted on purpose by the cluster's operator:
            # restarting would undo their decision.
            _log.warn(
                "kernel {kernel_id} was ended outside the gateway: {why}; not restarting it",
                kernel_id=kernel.id,
                why=why,
            )
            await self.declare_dead(kernel, f"kernel {why}; not restarted (ended on purpose, not a crash)")
            return
        now = self._clock.seconds()
        failures = [t for t in self._recent_failures.get(kernel.id, []) if now - t < STABLE_AFTER]
        failures.append(now)
        self._recent_failures[kernel.id] = failures
        limit = self._manager.settings.restart_limit
        _log.warn(
            "kernel {kernel_id} died: {why} ({n} of {limit} restarts)",
            kernel_id=kernel.id,
            why=why,
            n=len(failures),
            limit=limit,
        )
        if len(failures) > limit:
            await self.declare_dead(kernel, f"kernel {why}; restart limit ({limit}) reached")
            return
        kernel.reason = f"kernel {why}"
        kernel.transition(KernelState.RESTARTING, why)
        kernel.broadcast_status("restarting", f"kernel {why}; restarting ({len(failures)} of {limit})")
        old = kernel.process
        if old is not None:
            await self._launching.discard(kernel, old)
        try:
            await self._launching.launch(kernel)
        except Exception as e:
            await self.declare_dead(kernel, f"kernel {why}; restart failed: {e}")
            return
        self._restarted(kernel, "auto-restarted")

    def forget(self, kernel_id: str) -> None:
        """
        C{kernel_id} is gone: forget its failures.
        """
        self._recent_failures.pop(kernel_id, None)

    def restart(self, kernel_id: str) -> Deferred[Kernel]:
        """
        Restart keeping the kernel id; connected clients stay connected and
        see C{starting}, then the new kernel's C{idle} (no C{restarting}:
        see L{_restart}).

        A restart requested while one is in progress waits on that one.

        @raise NotFound: no such kernel.
        @raise Conflict: it is shutting down.
        """
        manager = self._manager
        kernel = manager.get(kernel_id)
        current = manager.current_operation(kernel_id)
        if current is not None and current.name in ("restart", "auto-restart"):
            return current.observe().addCallback(lambda _: kernel)
        if kernel.state in (KernelState.SHUTTING_DOWN, KernelState.GONE):
            raise Conflict(f"kernel {kernel_id} is shutting down")
        return manager.start_operation(kernel, "restart", self._restart).observe()

    async def _restart(self, kernel: Kernel) -> Kernel:
        if kernel.state == KernelState.LAUNCHING or kernel.id not in self._manager.kernels:
            raise Conflict(f"kernel {kernel.id} is not running")
        if kernel.state in ENDED:
            self._admission.admit_revival(kernel)
        kernel.transition(KernelState.RESTARTING, "restart requested")
        # Not "restarting": Jupyter clients (JupyterLab, jupyter_server) read
        # that as "the server auto-restarted a kernel that died", and
        # JupyterLab then shows its "appears to have died" dialog.  A
        # requested restart looks like jupyter_server's: the new kernel
        # starting, then idle.
        kernel.broadcast_status("starting", "restart requested")
        if kernel.process is not None:
            await self._stopping.stop_process(kernel, restart=True)
        try:
            await self._launching.launch(kernel)
        except Exception as e:
            await self.declare_dead(kernel, f"restart failed: {e}")
            raise
        kernel.reason = ""
        self._restarted(kernel, "restarted")
        return kernel

    def _restarted(self, kernel: Kernel, event: str) -> None:
        """
        A relaunched kernel is ready: running again, and its clients told
        it is C{idle}.  Jupyter clients ignore the statuses that answer
        C{kernel_info_request}s (jupyter_server's C{untracked_message_types}),
        and the new kernel's C{starting} comes before anyone's request, so
        without this JupyterLab shows C{Starting} until a cell runs.

        @param event: what to tell the manager's watchers: C{restarted}
            (requested) or C{auto-restarted} (after a death).
        """
        kernel.restart_count += 1
        kernel.transition(KernelState.RUNNING, "restarted")
        kernel.broadcast_status("idle")
        self._manager.emit(event, kernel)

    async def declare_dead(self, kernel: Kernel, reason: str) -> None:
        """
        C{kernel} will not run again unless restarted on request: dead,
        with C{reason}, its clients told, its process removed.
        """
        kernel.reason = reason
        kernel.transition(KernelState.DEAD, reason)
        kernel.broadcast_status("dead", reason)
        if kernel.process is not None:
            await self._launching.discard(kernel, kernel.process)
        self._manager.emit("dead", kernel)
