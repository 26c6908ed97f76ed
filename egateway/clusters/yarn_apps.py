"""
Following kernel applications on YARN: one poll loop for every
application of the gateway (one C{GET /apps} per interval, not one per
kernel), feeding one L{ApplicationWatch} per kernel that knows the
application's last report and fires once when it ends.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from egateway.clusters.interface import ExitStatus
from egateway.clusters.yarn_api import FINAL_STATES, ResourceManagers, YarnAPIError
from egateway.observe import OneShotObserver

_log = Logger()

GATEWAY_TAG_PREFIX = "egateway-gateway:"
"""
Kernel applications carry the tag C{egateway-gateway:<gateway id>} (and
the kernel id as another tag), so the inventory finds them.  YARN lowers
tags' case; gateway and kernel ids are lower-case already.
"""


def gateway_tag(gateway_id: str) -> str:
    return f"{GATEWAY_TAG_PREFIX}{gateway_id}".lower()


def describe_end(app: dict[str, Any]) -> str:
    """
    C{"YARN application X KILLED: <diagnostics>"}.
    """
    state = app.get("state", "?")
    final = app.get("finalStatus", "")
    how = f"YARN application {app.get('id')} {state}" + (f" ({final})" if final and final != state else "")
    diagnostics = " | ".join(line.strip() for line in str(app.get("diagnostics") or "").splitlines() if line.strip())
    return how + (f": {diagnostics}" if diagnostics else "")


class ApplicationWatch:
    """
    One kernel's application as the poll loop last saw it.

    @ivar stopping: the gateway itself is ending the application, so its
        end is not someone else's decision.
    @ivar tagged: the application carries the gateway's tag (the gateway
        built its spark-submit); an application a kernelspec's own script
        submitted (Enterprise Gateway's C{run.sh}) does not.
    """

    def __init__(self, kernel_id: str, app_id: str = "", started: int = 0, tagged: bool = True) -> None:
        self.kernel_id = kernel_id
        self.app_id = app_id
        self.started = started
        self.tagged = tagged
        self.app: dict[str, Any] | None = None
        self.stopping = False
        self.status: ExitStatus | None = None
        self._ended: OneShotObserver[ExitStatus] = OneShotObserver()
        self.on_report: Callable[[dict[str, Any]], None] = lambda app: None

    @property
    def state(self) -> str:
        return str((self.app or {}).get("state", ""))

    def report(self, app: dict[str, Any]) -> None:
        self.app = app
        self.app_id = str(app.get("id") or self.app_id)
        self.on_report(app)
        if app.get("state") in FINAL_STATES:
            self.end(app)

    def end(self, app: dict[str, Any]) -> None:
        if self.status is not None:
            return
        state = app.get("state")
        # KILLED or FAILED outside the gateway is YARN's (or an operator's)
        # decision: the kernel is dead, not restarted into the same fate.
        decided = not self.stopping and state in ("KILLED", "FAILED")
        self.status = ExitStatus(reason=describe_end(app), decision=decided)
        self._ended.fire(self.status)

    def when_ended(self) -> Deferred[ExitStatus]:
        return self._ended.when_fired()


class ApplicationPoller:
    """
    The one loop asking the ResourceManager about every watched
    application; it asks nothing while nothing is watched.
    """

    def __init__(self, reactor: Any, rms: ResourceManagers, gateway_id: str, interval: float) -> None:
        self._reactor = reactor
        self._rms = rms
        self._gateway_id = gateway_id
        self._interval = interval
        self._watches: dict[str, ApplicationWatch] = {}
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self._inflight: Deferred[None] | None = None
        self._stopped = False
        self.connected = False

    def watch(self, watch: ApplicationWatch) -> Callable[[], None]:
        """
        Follow C{watch}'s application (by id, or until it has one by its
        kernel id as name); returns the way to stop.
        """
        self._watches[watch.kernel_id] = watch
        if not self._loop.running and not self._stopped:
            # Started once and stopped only with the launcher: a loop
            # restarted while its last query is still out would run twice.
            self._loop.start(self._interval, now=False).addErrback(
                lambda f: _log.failure("YARN: application polling failed", f)
            )

        def unwatch() -> None:
            if self._watches.get(watch.kernel_id) is watch:
                del self._watches[watch.kernel_id]

        return unwatch

    def watching(self, watch: ApplicationWatch) -> bool:
        """
        Whether the loop follows C{watch} and last reached the RM: then its
        silence means the application lives.
        """
        return self.connected and not self._stopped and self._watches.get(watch.kernel_id) is watch

    def _tick(self) -> Deferred[None]:
        self._inflight = Deferred.fromCoroutine(self._poll())
        return self._inflight

    async def _poll(self) -> None:
        if not self._watches:
            return
        watches = list(self._watches.values())
        started = min((w.started for w in watches if w.started), default=0)
        # Untagged applications are only in the listing without the tag filter.
        tagged = self._gateway_id and all(w.tagged for w in watches)
        try:
            apps = await self._rms.applications(
                applicationTags=gateway_tag(self._gateway_id) if tagged else None,
                startedTimeBegin=started or None,
            )
        except CancelledError:
            raise
        except YarnAPIError as e:
            if self.connected:
                _log.warn("YARN: cannot follow kernel applications: {error}", error=str(e))
            self.connected = False
            return
        self.connected = True
        by_id = {str(app.get("id")): app for app in apps}
        for watch in watches:
            if self._watches.get(watch.kernel_id) is not watch or watch.status is not None:
                continue  # unwatched while the query was out, or over
            app = by_id.get(watch.app_id) if watch.app_id else newest_named(apps, watch.kernel_id, watch.started)
            if app is None and watch.app_id:
                # Older than the listing's window, or the RM forgot it.
                try:
                    app = await self._rms.application(watch.app_id)
                except YarnAPIError:
                    continue
                if app is None:
                    watch.end({"id": watch.app_id, "state": "KILLED",
                               "diagnostics": "the ResourceManager no longer knows the application"})
                    continue
            if app is not None:
                watch.report(app)

    async def stop(self) -> None:
        """
        Stop polling, once the query under way (if any) has answered, so
        its connection is not returned to a pool being closed.
        """
        self._stopped = True
        if self._loop.running:
            self._loop.stop()
        inflight = self._inflight
        if inflight is not None and not inflight.called:
            try:
                await inflight
            except Exception as e:
                _log.info("YARN: the last application poll failed: {error}", error=str(e))


def newest_named(apps: list[dict[str, Any]], kernel_id: str, since: int = 0) -> dict[str, Any] | None:
    """
    The newest application started at C{since} (ms) or later whose name is
    (or contains, as Enterprise Gateway's run.sh names them) the kernel id:
    restarts reuse the name, so an older one is the previous launch's.
    """
    named = [
        app for app in apps
        if kernel_id in str(app.get("name", "")) and int(app.get("startedTime") or 0) >= since
    ]
    return max(named, key=lambda app: (int(app.get("startedTime") or 0), str(app.get("id")))) if named else None


__all__ = ["ApplicationPoller", "ApplicationWatch", "describe_end", "gateway_tag", "newest_named"]
