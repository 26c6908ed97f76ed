"""
systemd's service notification protocol (C{sd_notify(3)}), in the few lines
it takes: datagrams of C{KEY=value} lines sent to the UNIX socket named by
C{NOTIFY_SOCKET}.  No dependency on libsystemd.

Under C{Type=notify} the unit counts as started only once the gateway says
C{READY=1}: after its listeners are bound and the kernels of its store are
restored, so C{systemctl start} (and units ordered after it) wait for a
gateway that can actually serve.  With C{WatchdogSec}, systemd passes
C{WATCHDOG_USEC} and restarts a gateway that stops pinging; the pings come
from the reactor, so a reactor blocked for half the interval misses one.
Without C{NOTIFY_SOCKET} (not under systemd) nothing is sent.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any, Mapping

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

_log = Logger()


def notify_address(environ: Mapping[str, str]) -> str | bytes | None:
    """
    The address in C{NOTIFY_SOCKET}: a path, or an abstract socket name
    (written with a leading C{@}); C{None} when unset or not a UNIX socket.
    """
    value = environ.get("NOTIFY_SOCKET", "")
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """
    Seconds between watchdog pings (half of C{WATCHDOG_USEC}, as
    C{sd_watchdog_enabled(3)} recommends), or C{None} when systemd asks
    no pings of this process.
    """
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    watched = environ.get("WATCHDOG_PID", "")
    if usec <= 0 or (watched and watched != str(pid)):
        return None
    return usec / 2e6


class SystemdNotifier(Service):
    """
    Tells systemd when the gateway is ready, keeps its watchdog fed, and
    says when the gateway stops.  Added after the HTTP listener, so it
    starts once the listener is bound and stops first.

    Also takes SIGHUP when nothing else does (C{ExecReload} sends it):
    without TLS there is nothing to reload, and SIGHUP's default action
    would end the gateway.
    """

    name = "systemd"

    def __init__(
        self,
        reactor: Any,
        ready: "Deferred[None]",
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """
        @param ready: fires once the kernels of the store are restored
            (already fired without persistence).
        @param environ: where C{NOTIFY_SOCKET} and C{WATCHDOG_*} are read
            (default: the process environment).
        """
        self._reactor = reactor
        self._ready = ready
        self._environ = os.environ if environ is None else environ
        self._address = notify_address(self._environ)
        self._socket: socket.socket | None = None
        self._watchdog: LoopingCall | None = None
        self._complained = False

    def send(self, *lines: str) -> None:
        """
        Send one notification (C{"READY=1"}, C{"WATCHDOG=1"} ...).  A
        datagram that cannot be sent is logged once and dropped: systemd
        gone is no reason to stop serving.
        """
        if self._address is None:
            return
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)
        try:
            self._socket.sendto("\n".join(lines).encode(), self._address)
        except OSError as e:
            if not self._complained:
                self._complained = True
                _log.warn("cannot notify systemd at {address}: {error}", address=self._address, error=str(e))

    def startService(self) -> None:
        super().startService()
        if signal.getsignal(signal.SIGHUP) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGHUP, self._on_sighup)
        if self._address is None:
            return
        interval = watchdog_interval(self._environ, os.getpid())
        if interval is not None:
            self._watchdog = LoopingCall(self.send, "WATCHDOG=1")
            self._watchdog.clock = self._reactor
            self._watchdog.start(interval, now=True)
        self._ready.addCallbacks(self._became_ready, self._not_ready)

    def _became_ready(self, _: Any) -> None:
        if self.running:
            self.send("READY=1", f"MAINPID={os.getpid()}", "STATUS=serving")
            _log.info("told systemd the gateway is ready")

    def _not_ready(self, failure: Any) -> None:
        _log.failure("the gateway did not become ready; systemd is not told it is", failure)

    def _on_sighup(self, signum: int, frame: Any) -> None:
        # A signal handler may only hand work to the reactor.
        self._reactor.callFromThread(
            _log.info, "SIGHUP: nothing to reload (certificate files are reloaded when TLS is on)"
        )

    def stopService(self) -> Any:
        self.send("STOPPING=1", "STATUS=stopping")
        if signal.getsignal(signal.SIGHUP) == self._on_sighup:
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
        # The watchdog keeps being fed while the rest stops: systemd still
        # watches a stopping service (TimeoutStopSec bounds the stop).
        return super().stopService()
