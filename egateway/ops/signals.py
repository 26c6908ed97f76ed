"""
Operator signals: one service per signal the daemon acts on (SIGUSR1
drains, SIGHUP reopens the log files), each chaining to the handler that
was there before it, so the TLS certificate reload on SIGHUP keeps working.
"""

from __future__ import annotations

import signal
from typing import Any, Callable

from twisted.application.service import Service
from twisted.logger import Logger

_log = Logger()


class SignalAction(Service):
    """
    Runs C{action} in the reactor thread whenever the process receives
    C{signum}, while the service runs.
    """

    def __init__(self, reactor: Any, signum: int, action: Callable[[], Any]) -> None:
        self._reactor = reactor
        self._signum = signum
        self._action = action
        self._previous: Any = None
        self.name = f"signal-{signal.Signals(signum).name}"

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(self._signum, self._on_signal)

    def stopService(self) -> Any:
        if self._previous is not None:
            signal.signal(self._signum, self._previous)
            self._previous = None
        return super().stopService()

    def _on_signal(self, signum: int, frame: Any) -> None:
        # A signal handler may only hand work to the reactor.
        self._reactor.callFromThread(self._run)
        previous = self._previous
        if callable(previous):
            previous(signum, frame)

    def _run(self) -> None:
        try:
            self._action()
        except Exception:
            _log.failure("acting on {signal}", signal=self.name)
