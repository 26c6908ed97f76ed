"""
One watch per namespace: the kernel pods of a namespace, kept current by
listing them once and then watching from the list's resource version, as
an informer does, and handed to whoever follows a pod.

Every kernel's launch and liveness reads this cache and is told of each
change; nothing polls the API per kernel.  A watch that drops (the API
server's timeout, a network error) resumes from the last resource version
it saw; one that is told its version is too old (410 Gone) lists again.
Errors are retried with a backoff on the reactor's clock.

The blocking parts (the list, the streaming watch) run in the launcher's
thread pool; each event is handed to the reactor thread with
C{callFromThread}, so the cache and the followers are only ever touched
there.
"""

from __future__ import annotations

import json
import socket
from typing import Any, Callable, Mapping

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from egateway.observe import OneShotObserver

_log = Logger()

WATCH_SECONDS = 240
"""
How long one watch request lasts before the API server ends it and it is
resumed (the server's own limit is larger; a shorter one bounds how long a
silently dead connection goes unnoticed).
"""

BACKOFF_FIRST = 0.5
BACKOFF_MOST = 30.0

PodFollower = Callable[[Mapping[str, Any] | None], None]
"""
Called with the pod's latest state, or C{None} once it is deleted.
"""


class WatchFailed(Exception):
    """
    The watch could not list its namespace at all (the API unreachable,
    the rights missing); it has stopped.
    """


class Gone(Exception):
    """
    The watch's resource version is too old (410): list again.
    """


class PodApi:
    """
    The two blocking calls a namespace watch needs, on a kubernetes client
    C{CoreV1Api}: for pods (C{selector} a label selector), or with
    C{kind="event"} for events (C{selector} a field selector).  Only ever
    called in a worker thread.
    """

    def __init__(self, core: Any, request_timeout: float, kind: str = "pod") -> None:
        self.core = core
        self.request_timeout = request_timeout
        self._list = core.list_namespaced_event if kind == "event" else core.list_namespaced_pod
        self._selector = "field_selector" if kind == "event" else "label_selector"

    def list_blocking(self, namespace: str, selector: str) -> tuple[list[dict[str, Any]], str]:
        response = self._list(
            namespace, _preload_content=False, _request_timeout=self.request_timeout, **{self._selector: selector}
        )
        body = json.loads(response.data)
        return list(body.get("items") or []), str((body.get("metadata") or {}).get("resourceVersion") or "")

    def watch_blocking(
        self,
        namespace: str,
        selector: str,
        version: str,
        deliver: Callable[[str, dict[str, Any]], None],
        started: Callable[[Any], None],
    ) -> str:
        """
        Stream changes after C{version} until the server ends the watch;
        returns the last resource version seen.

        @param started: given the open response, so another thread can cut
            the connection to stop the watch.
        @raise Gone: the version is too old.
        """
        response = self._list(
            namespace,
            **{self._selector: selector},
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_SECONDS,
            _preload_content=False,
            _request_timeout=(self.request_timeout, WATCH_SECONDS + 30),
        )
        started(response)
        try:
            buffer = b""
            for chunk in response.stream(amt=None, decode_content=True):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            raise Gone(obj.get("message", ""))
                        raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('message')}")
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                    if kind != "BOOKMARK":
                        deliver(kind, obj)
        finally:
            response.release_conn()
        return version


def cut(response: Any) -> None:
    """
    End a blocked streaming read from another thread: shut the socket down
    (closing it from here could wait for the reading thread's lock).
    """
    connection = getattr(response, "connection", None) or getattr(response, "_connection", None)
    sock = getattr(connection, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class NamespaceWatch:
    """
    The kernel pods (label C{selector}) of one namespace; see the module
    docstring.  L{start} once, L{synced} to wait for the first list,
    L{follow} a pod by name, L{stop} at the end.
    """

    def __init__(
        self,
        reactor: Any,
        pool: Any,
        api: PodApi,
        namespace: str,
        selector: str,
        key: Callable[[Mapping[str, Any]], str] | None = None,
    ) -> None:
        self._key = key or (lambda obj: str((obj.get("metadata") or {}).get("name") or ""))
        self._reactor = reactor
        self._pool = pool
        self._api = api
        self.namespace = namespace
        self._selector = selector
        self.pods: dict[str, dict[str, Any]] = {}
        self._followers: dict[str, list[PodFollower]] = {}
        self._synced: OneShotObserver[None] = OneShotObserver()
        self._version = ""
        self._response: Any = None
        self._stopping = False
        self._running: Deferred[None] | None = None
        self.opened = 0
        """
        How many watch requests have been opened (one more after each drop).
        """

    def start(self) -> None:
        if self._running is None:
            self._running = Deferred.fromCoroutine(self._run())
            self._running.addErrback(
                lambda f: f.trap(CancelledError) if self._stopping else _log.failure(
                    "watch of kernel pods in namespace {namespace} ended", f, namespace=self.namespace
                )
            )

    def synced(self) -> Deferred[None]:
        """
        Fires once the pods have been listed (the cache is complete); fails
        with L{WatchFailed} if the first list failed (the watch then stops).
        """
        return self._synced.when_fired()

    def follow(self, name: str, follower: PodFollower) -> Callable[[], None]:
        """
        Call C{follower} with every change of pod C{name} from now on; the
        return value stops that.
        """
        self._followers.setdefault(name, []).append(follower)

        def unfollow() -> None:
            followers = self._followers.get(name, [])
            if follower in followers:
                followers.remove(follower)
            if not followers:
                self._followers.pop(name, None)

        return unfollow

    def stop(self) -> Deferred[None] | None:
        """
        End the watch; fires once its thread has returned.
        """
        self._stopping = True
        if self._response is not None:
            cut(self._response)
        running, self._running = self._running, None
        if running is not None and not running.called:
            # Waiting out a backoff, or a list call that cannot be cut: stop now (the thread, if any, ends by
            # itself, its result dropped).
            running.cancel()
        return running

    # -- the loop ----------------------------------------------------------

    async def _run(self) -> None:
        delay = BACKOFF_FIRST
        while not self._stopping:
            try:
                if not self._version:
                    await self._list()
                self._version = await deferToThreadPool(
                    self._reactor,
                    self._pool,
                    self._api.watch_blocking,
                    self.namespace,
                    self._selector,
                    self._version,
                    self._from_thread,
                    self._opened,
                )
                delay = BACKOFF_FIRST
            except CancelledError:
                raise
            except Gone:
                _log.info("watch of namespace {namespace}: resource version too old, listing again",
                          namespace=self.namespace)
                self._version = ""
            except Exception as e:
                if self._stopping:
                    break
                if not self._synced.fired:
                    # The first list failed: whoever waits for it learns why now, not at its timeout.
                    self._synced.fire(WatchFailed(f"cannot list kernel pods in namespace {self.namespace}: {e}"))
                    break
                _log.warn(
                    "watch of kernel pods in namespace {namespace} failed: {error}; retrying in {delay:.1f}s",
                    namespace=self.namespace,
                    error=str(e),
                    delay=delay,
                )
                await deferLater(self._reactor, delay, lambda: None)
                delay = min(delay * 2, BACKOFF_MOST)
            finally:
                self._response = None

    async def _list(self) -> None:
        items, version = await deferToThreadPool(
            self._reactor, self._pool, self._api.list_blocking, self.namespace, self._selector
        )
        current = {str((p.get("metadata") or {}).get("name") or ""): p for p in items}
        for name in set(self.pods) - set(current):
            self._changed("DELETED", self.pods[name])
        for pod in current.values():
            self._changed("MODIFIED", pod)
        self._version = version
        if not self._synced.fired:
            self._synced.fire(None)

    def _opened(self, response: Any) -> None:
        self._response = response
        self.opened += 1
        if self._stopping:
            cut(response)

    def _from_thread(self, kind: str, pod: dict[str, Any]) -> None:
        self._reactor.callFromThread(self._changed, kind, pod)

    def _changed(self, kind: str, pod: dict[str, Any]) -> None:
        own = str((pod.get("metadata") or {}).get("name") or "")
        name = self._key(pod)
        if not own or not name:
            return
        if kind == "DELETED":
            self.pods.pop(own, None)
            state: dict[str, Any] | None = None
        else:
            self.pods[own] = pod
            state = pod
        for follower in list(self._followers.get(name, [])):
            try:
                follower(state)
            except Exception:
                _log.failure("pod {pod}: a follower failed", pod=name)


__all__ = ["Gone", "WatchFailed", "NamespaceWatch", "PodApi", "PodFollower", "WATCH_SECONDS", "cut"]
