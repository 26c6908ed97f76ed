"""
Shutting down idle kernels.

Every C{cull_interval} seconds each running kernel idle for longer than
C{cull_idle_timeout} is shut down, unless it is busy (and C{cull_busy} is
off) or has clients (and C{cull_connected} is off).  Dead kernels are removed
regardless.  Clients of a culled kernel are told why before it goes.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from egateway.config import CullingConfig
from egateway.kernels.kernel import Kernel
from egateway.kernels.manager import KernelManager
from egateway.kernels.state import KernelState

_log = Logger()


class Culler(Service):
    name = "culler"

    def __init__(self, manager: KernelManager, settings: CullingConfig, clock: Any) -> None:
        self._manager = manager
        self._settings = settings
        self._clock = clock
        self._loop: LoopingCall | None = None
        self.culls = {"idle": 0, "dead": 0}

    def startService(self) -> None:
        super().startService()
        if self._settings.cull_idle_timeout > 0:
            self._loop = LoopingCall(self.cull)
            self._loop.clock = self._clock
            self._loop.start(self._settings.cull_interval, now=False)
            _log.info(
                "culling kernels idle for {timeout:g} s, checking every {interval:g} s",
                timeout=self._settings.cull_idle_timeout,
                interval=self._settings.cull_interval,
            )

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def cull(self) -> None:
        """
        One pass over every kernel; a failure on one kernel is logged and
        the rest are still checked.
        """
        for kernel in list(self._manager.kernels.values()):
            try:
                reason = self.reason_to_cull(kernel)
                if reason:
                    self.cull_one(kernel, reason)
            except Exception:
                _log.failure("culling kernel {kernel_id}", kernel_id=kernel.id)

    def reason_to_cull(self, kernel: Kernel) -> str:
        """
        Why C{kernel} should go now, or C{""} if it should stay.
        """
        if kernel.state == KernelState.DEAD:
            return f"culled: the kernel is dead ({kernel.reason})"
        if kernel.state != KernelState.RUNNING or kernel.pooled:
            # A pooled kernel is idle by design; its pool keeps it.
            return ""
        settings = self._settings
        idle = self._clock.seconds() - kernel.last_activity
        if idle <= settings.cull_idle_timeout:
            return ""
        if kernel.execution_state == "busy" and not settings.cull_busy:
            return ""
        if kernel.connections and not settings.cull_connected:
            return ""
        return f"culled: idle for {idle:.0f} s (limit {settings.cull_idle_timeout:g} s)"

    def cull_one(self, kernel: Kernel, reason: str) -> None:
        _log.info("kernel {kernel_id} {reason}", kernel_id=kernel.id, reason=reason)
        self.culls["dead" if kernel.state == KernelState.DEAD else "idle"] += 1
        kernel.broadcast_status("dead", reason)
        self._manager.shutdown(kernel.id, reason=reason).addErrback(
            lambda f: _log.failure("culling kernel {kernel_id}", f, kernel_id=kernel.id)
        )
