"""
Health, readiness and drain: what load balancers, orchestrators and
operators doing a rolling upgrade ask of a gateway.

  - C{GET /healthz}: the process is alive and its reactor turns (it could
    not answer otherwise).  A failing liveness probe means "restart me".
  - C{GET /readyz}: the store answers, the HTTP listener is up and the
    gateway is not draining.  A failing readiness probe means "send new
    work elsewhere", so it turns 503 during a drain while existing kernels
    keep being served.
  - Drain (SIGUSR1, or C{POST /api/admin/drain} by an admin): new kernels
    are refused with 503 and C{Retry-After}; C{DELETE /api/admin/drain}
    (or C{POST /api/admin/undrain}) admits them again.

Both probes are unauthenticated (the front resource lets exactly these two
paths through) and their bodies carry no data: why a gateway is not ready
goes to the log, once per change, not to whoever asks.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from twisted.application.service import IService
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from egateway.errors import Forbidden, Unavailable, write_json
from egateway.kernels.policy import caller_of
from egateway.observe import Operation
from egateway.ops import audit

_log = Logger()

HEALTH_PATHS = ("healthz", "readyz")
"""
The probe routes, relative to the base URL; the only unauthenticated ones.
"""

_PROBE_KERNEL_ID = "00000000-0000-0000-0000-000000000000"
"""
A kernel id no gateway makes (not a version 4 UUID): reading it is a round
trip to the store that finds nothing.
"""


class Draining(Unavailable):
    """
    A new kernel was asked of a draining gateway; the client should retry
    (on another gateway, or here after C{retry_after} seconds).
    """

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            "this gateway is draining for maintenance and starts no new kernels; "
            "retry (another gateway behind the same address may take it)"
        )
        self.retry_after = retry_after


class Drain:
    """
    Whether the gateway admits new kernels.  Existing kernels, their
    WebSockets, restarts and shutdowns are unaffected.

    @ivar draining: new kernels are refused.
    """

    def __init__(self, retry_after: int) -> None:
        self.retry_after = retry_after
        self.draining = False

    def set(self, draining: bool, by: str) -> None:
        """
        Start (C{True}) or end a drain; C{by} says who asked, for the log.
        """
        if draining == self.draining:
            return
        self.draining = draining
        if draining:
            _log.warn(
                "draining (asked by {by}): new kernels are refused with 503, existing ones are served, "
                "/readyz answers 503; stop the gateway once its kernels are gone or moved",
                by=by,
            )
        else:
            _log.info("drain ended (asked by {by}): new kernels are admitted again", by=by)

    def check(self) -> None:
        """
        A kernel manager admission check.

        @raise Draining: while draining.
        """
        if self.draining:
            raise Draining(self.retry_after)


class Readiness:
    """
    Decides whether the gateway is ready for new work, and logs why not
    when that changes.

    @ivar listeners: services that must be running (the HTTP listener).
    """

    def __init__(
        self,
        clock: IReactorTime,
        drain: Drain,
        store: Callable[[], Any],
        timeout: float,
        listeners: Sequence[IService] = (),
    ) -> None:
        """
        @param store: returns the persistence object (with a C{store}), or
            C{None} when the gateway keeps no store.
        """
        self._clock = clock
        self._drain = drain
        self._store = store
        self._timeout = timeout
        self.listeners = list(listeners)
        self._last_problems: list[str] | None = None
        self._probe: Operation[str] | None = None

    async def problems(self) -> list[str]:
        """
        Why the gateway is not ready; empty when it is.
        """
        found = []
        if self._drain.draining:
            found.append("draining")
        for listener in self.listeners:
            if not listener.running:
                found.append(f"listener {listener.name} is not running")
        if self._probe is None or self._probe.done:
            # Probes come unauthenticated, perhaps many at once: at most one
            # store round trip is in flight, and every probe waits on it.
            self._probe = Operation("store probe", self._store_trouble())
        trouble = await self._probe.observe()
        if trouble:
            found.append(trouble)
        self._note(found)
        return found

    async def _store_trouble(self) -> str:
        persistence = self._store()
        if persistence is None:
            return ""
        try:
            probe: Deferred[Any] = persistence.store.load_kernel(_PROBE_KERNEL_ID)
            await probe.addTimeout(self._timeout, self._clock)
        except CancelledError:
            raise
        except defer.TimeoutError:
            return f"the store did not answer within {self._timeout:g} s"
        except Exception as e:
            return f"the store is unavailable: {e}"
        return ""

    def _note(self, found: list[str]) -> None:
        if found == self._last_problems:
            return
        if found:
            _log.warn("not ready: {problems}", problems="; ".join(found))
        elif self._last_problems is not None:
            _log.info("ready again")
        self._last_problems = found


class OpsRoutes:
    """
    The probe and drain routes, registered on the API's Klein app so they
    share its JSON errors and its OpenAPI check.
    """

    def __init__(self, drain: Drain, readiness: Readiness) -> None:
        self.drain = drain
        self.readiness = readiness

    def register(self, app: Any, base_url: str) -> None:
        b = base_url
        app.route(b + "healthz", methods=["GET"])(self.healthz)
        app.route(b + "readyz", methods=["GET"])(self.readyz)
        app.route(b + "api/admin/drain", methods=["GET"])(self.drain_status)
        app.route(b + "api/admin/drain", methods=["POST"])(self.start_drain)
        app.route(b + "api/admin/drain", methods=["DELETE"])(self.end_drain)
        app.route(b + "api/admin/undrain", methods=["POST"])(self.end_drain)

    @staticmethod
    def public_paths(base_url: str) -> frozenset[bytes]:
        """
        The request paths the front resource serves without authentication.
        """
        return frozenset((base_url + path).encode("utf-8") for path in HEALTH_PATHS)

    def healthz(self, request: IRequest) -> bytes:
        return _status(request, 200, "ok")

    async def readyz(self, request: IRequest) -> bytes:
        if await self.readiness.problems():
            request.setHeader(b"retry-after", str(self.drain.retry_after).encode("ascii"))
            raise Unavailable("not ready")
        return _status(request, 200, "ready")

    def drain_status(self, request: IRequest) -> bytes:
        _admin_only(request)
        return _drain_body(request, self.drain)

    def start_drain(self, request: IRequest) -> bytes:
        self._set(request, True)
        return _drain_body(request, self.drain)

    def end_drain(self, request: IRequest) -> bytes:
        self._set(request, False)
        return _drain_body(request, self.drain)

    def drain_on_signal(self) -> None:
        """
        SIGUSR1: drain, as an administrator's C{POST /api/admin/drain} would.
        """
        audit.event("gateway.drain", user="SIGUSR1", address="local")
        self.drain.set(True, by="SIGUSR1")

    def _set(self, request: IRequest, draining: bool) -> None:
        fields = _admin_only(request)
        audit.event("gateway.drain" if draining else "gateway.undrain", **fields)
        self.drain.set(draining, by=f"{fields['user']} from {fields['address']}")


def _admin_only(request: IRequest) -> dict[str, Any]:
    """
    The audit fields of the caller, who must be an administrator.

    @raise Forbidden: for anyone else (a gateway without user accounts has
        no administrators: drain it with SIGUSR1).
    """
    caller = caller_of(getattr(request, "gateway_user", None))
    if caller is None or not caller.admin:
        raise Forbidden("only an administrator may drain the gateway (or send it SIGUSR1)")
    return audit.actor(request)


def _status(request: IRequest, code: int, status: str) -> bytes:
    request.setHeader(b"cache-control", b"no-store")
    return write_json(request, {"status": status}, code)


def _drain_body(request: IRequest, drain: Drain) -> bytes:
    return write_json(request, {"draining": drain.draining})
