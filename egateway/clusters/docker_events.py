"""
One stream of the Docker engine's container events for every kernel of a
launcher, instead of asking the engine about each kernel in turn.

L{EngineEvents} opens C{GET /events} (container events of kernel
containers only: those labelled L{KERNEL_LABEL}) when the first kernel is
watched, hands each C{die}, C{oom}, C{kill} and C{destroy} event to the
watchers of that container, and reopens the stream after it breaks (the
engine restarted), from the time of the last event it saw, so no death is
missed.  While the stream is down, L{EngineEvents.connected} is false and
kernels ask the engine directly.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from egateway.clusters.docker_api import DockerAPIError, DockerEngine, Stream
from egateway.observe import Operation

_log = Logger()

KERNEL_LABEL = "org.egateway.kernel_id"
"""
The label every kernel container (and Swarm service) carries: the kernel's
id.  L{egateway.clusters.docker} sets it; the stream asks only for
containers that have it.
"""

WATCHED = ("die", "oom", "kill", "destroy")

RECONNECT_DELAY = 1.0

Watcher = Callable[[str, dict], None]
"""
Called with the event's action and its C{Actor.Attributes} (C{exitCode}
for C{die}, C{signal} for C{kill}).
"""


class EngineEvents:
    """
    The container event stream of one engine, shared by all its kernels.
    """

    def __init__(self, reactor: Any, engine: DockerEngine) -> None:
        self._reactor = reactor
        self._engine = engine
        self._watchers: dict[str, list[Watcher]] = {}
        self._stream: Stream | None = None
        self._since: int | None = None
        self._running = False
        self._opening: Operation[None] | None = None
        self.connected = False

    def watch(self, container_id: str, watcher: Watcher) -> Callable[[], None]:
        """
        Call C{watcher} with each event of C{container_id} (the full id);
        returns the function that stops watching.
        """
        self._watchers.setdefault(container_id, []).append(watcher)
        if not self._running:
            self._running = True
            self._reactor.callLater(0, self._run)

        def unwatch() -> None:
            watchers = self._watchers.get(container_id, [])
            if watcher in watchers:
                watchers.remove(watcher)
            if not watchers:
                self._watchers.pop(container_id, None)

        return unwatch

    async def started(self) -> None:
        """
        Open the stream now (if it is not open), so that events from here
        on are seen.

        @raise DockerAPIError: the engine cannot be reached.
        """
        self._running = True
        try:
            await self._open_once()
        except BaseException:
            # Not following: the next watch() or started() tries again.
            self._running = False
            raise

    def _run(self) -> None:
        Deferred.fromCoroutine(self._follow()).addErrback(
            lambda f: _log.failure("Docker event stream of {path} failed", f, path=self._engine.path)
        )

    async def _open_once(self) -> None:
        """
        Open the stream unless it is open; concurrent callers share one
        attempt, so there is never more than one stream.
        """
        if self._stream is not None:
            return
        opening = self._opening
        if opening is None:
            opening = self._opening = Operation("open the Docker event stream", self._open(), self._engine.path)
            opening.running.addBoth(self._forget_opening)
        await opening.observe()

    def _forget_opening(self, result: Any) -> Any:
        self._opening = None
        return result

    async def _open(self) -> None:
        query: dict[str, Any] = {
            "filters": {"type": ["container"], "event": list(WATCHED), "label": [KERNEL_LABEL]}
        }
        if self._since is not None:
            query["since"] = self._since
        self._stream = await self._engine.stream("/events", query, self._event)
        self.connected = True
        self._stream.done.addBoth(self._closed)

    def _closed(self, _: Any) -> None:
        self._stream = None
        self.connected = False
        if self._running:
            _log.info("Docker event stream of {path} ended; reopening it", path=self._engine.path)
            self._reactor.callLater(RECONNECT_DELAY, self._run)

    async def _follow(self) -> None:
        while self._running and self._stream is None:
            try:
                await self._open_once()
                return
            except CancelledError:
                raise
            except DockerAPIError as e:
                _log.warn(
                    "cannot follow the Docker engine's events: {error}; kernels are checked directly until "
                    "it answers",
                    error=str(e),
                )
                await deferLater(self._reactor, RECONNECT_DELAY * 5, lambda: None)

    def _event(self, event: Any) -> None:
        if not isinstance(event, dict):
            return
        if isinstance(event.get("time"), int):
            self._since = event["time"]
        actor = event.get("Actor") or {}
        container = str(actor.get("ID") or event.get("id") or "")
        action = str(event.get("Action") or event.get("status") or "")
        for watcher in list(self._watchers.get(container, ())):
            try:
                watcher(action, dict(actor.get("Attributes") or {}))
            except Exception:
                _log.failure("watcher of container {container} failed on {action}", container=container,
                             action=action)

    def stop(self) -> None:
        """
        Close the stream for good.
        """
        self._running = False
        if self._stream is not None:
            self._stream.stop()


__all__ = ["EngineEvents", "KERNEL_LABEL", "WATCHED"]
