"""
Stopping kernels: shutdown, and the signals sent to a running kernel.

Separate from the manager because ending a process is its own sequence,
shared by a shutdown and a requested restart: C{shutdown_request} on the
control channel, then the launcher's terminate (TERM, then KILL after its
grace period), then cleanup, tolerating a kernel that already exited.  The
interrupt lives here too: it is the other signal a running kernel gets,
chosen per its kernelspec.
"""

from __future__ import annotations

import signal as signals
from typing import TYPE_CHECKING, Mapping

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from egateway.errors import Conflict
from egateway.kernels.kernel import Kernel
from egateway.kernels.launching import TIMEOUTS, Launching
from egateway.kernels.state import KernelState
from egateway.wire.link import KernelLink
from egateway.wire.protocol import Message

if TYPE_CHECKING:
    from egateway.kernels.interfaces import IKernelTable

_log = Logger()


def interrupt_signal(spec_env: Mapping[str, str]) -> int:
    """
    SIGINT, or the signal a kernelspec names in C{EG_ALTERNATE_SIGINT}.
    """
    name = spec_env.get("EG_ALTERNATE_SIGINT", "")
    if name:
        try:
            return int(getattr(signals, name if name.startswith("SIG") else f"SIG{name}"))
        except AttributeError:
            _log.warn("unknown EG_ALTERNATE_SIGINT {name}; using SIGINT", name=name)
    return signals.SIGINT


class Stopping:
    """
    Shuts kernels down and interrupts them.
    """

    def __init__(self, *, manager: IKernelTable, clock: IReactorTime, launching: Launching) -> None:
        """
        @param manager: whose kernels, operations and settings these are.
        """
        self._manager = manager
        self._clock = clock
        self._launching = launching

    def shutdown(self, kernel_id: str, reason: str = "shutdown requested") -> Deferred[None]:
        """
        Shut a kernel down: C{shutdown_request}, then SIGTERM, then SIGKILL,
        each after its grace period; then remove it.  A launch in progress
        is cancelled, and removes what it started.  A shutdown requested
        while one is in progress waits on that one.

        @raise NotFound: no such kernel.
        """
        manager = self._manager
        kernel = manager.get(kernel_id)
        current = manager.current_operation(kernel_id)
        if current is not None and current.name == "shutdown":
            return current.observe()
        if current is not None and current.name == "launch":
            current.cancel()
        return manager.start_operation(kernel, "shutdown", self._shutdown, reason).observe()

    async def _shutdown(self, kernel: Kernel, reason: str) -> None:
        if kernel.id not in self._manager.kernels:
            return
        kernel.transition(KernelState.SHUTTING_DOWN, reason)
        kernel.reason = reason
        kernel.close_clients(reason)
        if kernel.process is not None:
            await self.stop_process(kernel, restart=False)
        kernel.transition(KernelState.GONE)
        self._manager.remove(kernel)

    async def stop_process(self, kernel: Kernel, restart: bool) -> None:
        """
        Stop the kernel's process politely, then firmly, and clean up.

        @param restart: what the C{shutdown_request} tells the kernel.
        """
        process = kernel.process
        assert process is not None
        exited = process.when_exited()
        if kernel.link is None or self._ask_to_shut_down(kernel, kernel.link, restart):
            exited.addTimeout(self._manager.settings.shutdown_wait, self._clock)
            try:
                await exited
            except (*TIMEOUTS, CancelledError):
                pass
        await self._launching.discard(kernel, process)

    def _ask_to_shut_down(self, kernel: Kernel, link: KernelLink, restart: bool) -> bool:
        """
        Send the kernel its C{shutdown_request} through C{link}; C{False} if
        it could not be sent (no socket to send it with: a gateway out of
        file descriptors cannot open one), so that its process is stopped
        by signal at once rather than left running.
        """
        try:
            link.send("control", Message.build("shutdown_request", {"restart": restart}, link.session))
        except Exception as e:
            _log.warn(
                "kernel {kernel_id}: cannot send shutdown_request ({error}); stopping its process by signal",
                kernel_id=kernel.id,
                error=str(e),
            )
            return False
        return True

    async def interrupt(self, kernel: Kernel) -> None:
        """
        Interrupt per the kernelspec's C{interrupt_mode}: an
        C{interrupt_request} message, or a signal.

        @raise Conflict: if the kernel is not running.
        """
        if kernel.state != KernelState.RUNNING or kernel.process is None:
            raise Conflict(f"kernel {kernel.id} is {kernel.state.value}, not running")
        if kernel.spec.interrupt_mode == "message" and kernel.link is not None:
            kernel.link.send("control", Message.build("interrupt_request", {}, kernel.link.session))
            return
        await kernel.process.signal(interrupt_signal(kernel.spec.env))
