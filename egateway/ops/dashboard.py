"""
The admin dashboard: a page at C{/admin} showing every kernel (with the
launch phases of those still starting), the users and their quotas in use,
the remote hosts and their back-off, and the store; with buttons to
interrupt, restart and shut down a kernel, cull now and drain.

The page is static package data (L{STATIC}); its data comes from admin API
routes: C{GET /api/admin/overview} (everything at once) and C{GET
/api/admin/events} (Server-Sent Events fed by the kernel manager's change
listeners, so the page never polls the whole list).

Authentication is the API's.  A browser cannot send C{Authorization} when it
navigates, so the first load carries C{?token=}; the answer sets it as a
cookie (C{HttpOnly}, C{SameSite=Strict}, C{Secure} over TLS) and the page
removes it from the address bar.  The cookie is honoured only on the
dashboard's own paths (L{AdminCookie}), never on the rest of the API, and
an action sent with it (any method but GET/HEAD) must carry the
C{X-Egateway-Dashboard} header, which only the page's script sets: another
site can make a browser send neither the cookie (C{SameSite=Strict}) nor
that header (a CORS preflight would be needed).  Why a cookie rather than
the script sending the header: C{EventSource} cannot send headers, and a
reload or a bookmark of C{/admin} keeps working without the token staying in
the address bar or the history.

Who may use it: an admin (C{admin_users}/C{admin_groups}, or an
authenticator that says so), as for drain (L{egateway.ops.health}).  A
credential naming no user (the shared token, or none at all) is no admin,
so a gateway without user accounts has no dashboard.  Everyone else is
answered 403.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence
from urllib.parse import quote, unquote

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from zope.interface import implementer

from egateway import __version__
from egateway.errors import Forbidden, GatewayError, NotFound, error_body, write_json
from egateway.kernels.kernel import Kernel, iso
from egateway.kernels.policy import ENDED, caller_of
from egateway.kernels.state import KernelState
from egateway.ops import audit

_log = Logger()

STATIC = {
    "dashboard.html": "text/html; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}
"""
The page's files (package data in C{egateway/ops/static/}), by name, with
their content types.
"""

COOKIE = "egateway_admin"
ACTION_HEADER = b"x-egateway-dashboard"
KEEPALIVE = 15.0
"""
Seconds between SSE comments on an idle stream, so proxies keep it open.
"""
SUMMARY_DELAY = 0.25
"""
Seconds a summary (users, hosts, store) waits after a kernel change, so a
burst of changes sends one.
"""

CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _read_blocking(name: str) -> bytes:
    with open(os.path.join(os.path.dirname(__file__), "static", name), "rb") as f:
        return f.read()


def require_admin(request: IRequest) -> None:
    """
    @raise Forbidden: the caller is not a verified admin.
    """
    caller = caller_of(getattr(request, "gateway_user", None))
    if caller is None or not caller.admin:
        who = f"{caller.username!r} is not one" if caller is not None else "this credential names no user"
        raise Forbidden(f"the admin dashboard is for admins (admin_users, admin_groups); {who}")


class AdminDashboard(Service):
    """
    The dashboard's routes, and the event streams open to its pages.

    A service so that stopping the gateway ends every stream (it is started
    after the HTTP listener, so it stops before it).
    """

    name = "dashboard"

    def __init__(
        self,
        *,
        manager: Any,
        cull: Callable[[], int],
        base_url: str,
        reactor: Any,
        threadpool: Any,
        remote_hosts: Sequence[str] = (),
    ) -> None:
        """
        @param cull: one culling pass now; returns how many kernels it
            culled.
        @param remote_hosts: the configured SSH pool, shown with the hosts
            of each remote launcher in use.
        """
        self._manager = manager
        self._cull = cull
        self._base_url = base_url
        self._remote_hosts = list(remote_hosts)
        self._reactor = reactor
        self._threadpool = threadpool
        self._files: dict[str, bytes] = {}
        self._streams: dict[IRequest, Deferred[bytes]] = {}
        self._summary_pending: Any = None
        self._keepalive = LoopingCall(self._write_all, b": keepalive\n\n")
        self._keepalive.clock = reactor
        manager.change_listeners.append(self._kernel_changed)
        manager.listeners.append(self._kernel_event)

    def register(self, app: Any) -> None:
        b = self._base_url
        uuid = "<uuidtext:kernel_id>"
        app.route(b + "admin", methods=["GET"])(self.page)
        app.route(b + "admin/static/<string:name>", methods=["GET"])(self.static)
        app.route(b + "api/admin/overview", methods=["GET"])(self.overview)
        app.route(b + "api/admin/events", methods=["GET"])(self.events)
        app.route(b + "api/admin/cull", methods=["POST"])(self.cull)
        for action in ("interrupt", "restart", "shutdown"):
            app.route(f"{b}api/admin/kernels/{uuid}/{action}", methods=["POST"])(getattr(self, action))

    def stopService(self) -> None:
        super().stopService()
        if self._keepalive.running:
            self._keepalive.stop()
        if self._summary_pending is not None and self._summary_pending.active():
            self._summary_pending.cancel()
        for request, done in list(self._streams.items()):
            self._streams.pop(request, None)
            request.write(b"event: bye\ndata: {}\n\n")
            done.callback(b"")

    # -- the page ----------------------------------------------------------

    async def _file(self, name: str) -> bytes:
        data = self._files.get(name)
        if data is None:
            data = await deferToThreadPool(self._reactor, self._threadpool, _read_blocking, name)
            self._files[name] = data
        return data

    def _serve_file(self, request: IRequest, name: str, data: bytes) -> bytes:
        request.setHeader(b"content-type", STATIC[name].encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-security-policy", CSP)
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"x-frame-options", b"DENY")
        return data

    async def page(self, request: IRequest) -> bytes:
        require_admin(request)
        data = await self._file("dashboard.html")
        token = request.args.get(b"token", [b""])[0] if request.args else b""
        if token:
            cookie = (
                f"{COOKIE}={quote(token.decode('utf-8', 'replace'), safe='')}; Path={self._base_url}; "
                "HttpOnly; SameSite=Strict"
            )
            if request.isSecure():
                cookie += "; Secure"
            request.setHeader(b"set-cookie", cookie.encode("ascii"))
        return self._serve_file(request, "dashboard.html", data)

    async def static(self, request: IRequest, name: str) -> bytes:
        require_admin(request)
        if name not in STATIC or name == "dashboard.html":
            raise NotFound(f"the dashboard has no file {name!r}")
        return self._serve_file(request, name, await self._file(name))

    # -- data --------------------------------------------------------------

    async def overview(self, request: IRequest) -> bytes:
        require_admin(request)
        overview = self.summary()
        overview["kernels"] = await self._manager.list_models()
        return write_json(request, overview)

    def summary(self) -> dict[str, Any]:
        """
        Everything but the kernels: the gateway, users and quotas, hosts,
        the store, culling.
        """
        manager = self._manager
        settings = manager.policy.settings
        kernels = [k for k in manager.kernels.values() if k.state not in ENDED]
        users: dict[str, dict[str, Any]] = {}
        groups: dict[str, int] = {}
        for kernel in kernels:
            entry = users.setdefault(
                kernel.owner, {"user": kernel.owner, "kernels": 0, "launching": 0, "groups": set()}
            )
            entry["kernels"] += 1
            entry["launching"] += kernel.state == KernelState.LAUNCHING
            entry["groups"].update(kernel.owner_groups)
            for group in kernel.owner_groups:
                groups[group] = groups.get(group, 0) + 1
        return {
            "gateway": {"version": __version__, "now": iso(self._reactor.seconds()), "kernels": len(kernels)},
            "quotas": {
                "max_kernels": manager.settings.max_kernels,
                "max_kernels_per_user": settings.max_kernels_per_user,
                "max_kernels_per_group": settings.max_kernels_per_group,
                "max_concurrent_launches_per_user": settings.max_concurrent_launches_per_user,
            },
            "users": [
                {**entry, "groups": sorted(entry["groups"])} for _, entry in sorted(users.items())
            ],
            "groups": [{"group": g, "kernels": n} for g, n in sorted(groups.items())],
            "hosts": self._hosts(),
            "store": self._store(),
        }

    def _hosts(self) -> list[dict[str, Any]]:
        """
        The hosts of each remote launcher built so far (those with a
        L{HostHealth}): the configured pool, the hosts its kernels run on
        and any host with a failure on record; with health, back-off and
        how many of this gateway's kernels each runs.
        """
        hosts = []
        for launcher in self._manager.launchers.built():
            health = getattr(launcher, "health", None)
            if health is None:
                continue
            placed: dict[str, int] = {}
            for kernel in self._manager.kernels.values():
                if kernel.launcher_name == launcher.name and kernel.process is not None and kernel.state not in ENDED:
                    host = kernel.process.placement.to_dict().get("host")
                    if host:
                        placed[host] = placed.get(host, 0) + 1
            for entry in health.status([*self._remote_hosts, *placed]):
                hosts.append({"launcher": launcher.name, **entry, "kernels": placed.get(entry["host"], 0)})
        return hosts

    def _store(self) -> dict[str, Any]:
        persistence = self._manager.persistence
        if persistence is None:
            return {"persistence": False}
        store = persistence.store
        return {
            "persistence": True,
            "kind": type(store).__name__,
            "shared": persistence.shared,
            "open": type(store).__name__ != "_NotOpen",
            "keeps_kernels": persistence.keeps_kernels,
            "unsaved": len(getattr(persistence, "_unsaved", ())),
        }

    # -- live updates ----------------------------------------------------------

    def events(self, request: IRequest) -> Deferred[bytes]:
        """
        Server-Sent Events: C{kernel} (a kernel's model, on each change),
        C{removed} (C{{"id"}}), C{summary} (as in the overview, after
        changes); a comment every L{KEEPALIVE} seconds.  The stream lasts
        until the client leaves or the gateway stops.
        """
        require_admin(request)
        accept = (request.getHeader(b"accept") or b"").lower()
        if b"text/event-stream" not in accept:
            raise NotAcceptable("this is an event stream: send Accept: text/event-stream")
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        done: Deferred[bytes] = Deferred(lambda d: self._streams.pop(request, None))
        self._streams[request] = done
        request.write(b"retry: 2000\n" + _event("summary", self.summary()))
        if not self._keepalive.running:
            self._keepalive.start(KEEPALIVE, now=False)
        return done

    def _write_all(self, data: bytes) -> None:
        for request in list(self._streams):
            try:
                request.write(data)
            except Exception:
                _log.failure("writing to a dashboard event stream")
                self._streams.pop(request, None)
        if not self._streams and self._keepalive.running:
            self._keepalive.stop()

    def _kernel_changed(self, kernel: Kernel) -> None:
        if not self._streams:
            return
        if kernel.state == KernelState.GONE or self._manager.kernels.get(kernel.id) is not kernel:
            # A kernel still registering (its first phase) is shown too.
            if kernel.state != KernelState.LAUNCHING:
                return
        self._write_all(_event("kernel", kernel.model()))
        self._summary_soon()

    def _kernel_event(self, name: str, kernel: Kernel) -> None:
        if not self._streams:
            return
        if self._manager.kernels.get(kernel.id) is kernel and kernel.state != KernelState.GONE:
            self._write_all(_event("kernel", kernel.model()))
        else:
            self._write_all(_event("removed", {"id": kernel.id, "reason": kernel.reason}))
        self._summary_soon()

    def _summary_soon(self) -> None:
        if self._summary_pending is None or not self._summary_pending.active():
            self._summary_pending = self._reactor.callLater(SUMMARY_DELAY, self._send_summary)

    def _send_summary(self) -> None:
        if self._streams:
            self._write_all(_event("summary", self.summary()))

    # -- actions ---------------------------------------------------------------

    async def _act(self, request: IRequest, kernel_id: str, action: str) -> Kernel:
        require_admin(request)
        kernel = await self._manager.find(kernel_id)
        audit.event(
            f"kernel.{action}", **audit.actor(request), kernel_id=kernel_id, owner=kernel.owner, via="dashboard"
        )
        return kernel

    async def interrupt(self, request: IRequest, kernel_id: str) -> bytes:
        await self._act(request, kernel_id, "interrupt")
        await self._manager.interrupt(kernel_id)
        request.setResponseCode(204)
        return b""

    async def restart(self, request: IRequest, kernel_id: str) -> bytes:
        await self._act(request, kernel_id, "restart")
        kernel = await self._manager.restart(kernel_id)
        return write_json(request, kernel.model())

    async def shutdown(self, request: IRequest, kernel_id: str) -> bytes:
        await self._act(request, kernel_id, "shutdown")
        await self._manager.shutdown(kernel_id, reason="shut down from the admin dashboard")
        request.setResponseCode(204)
        return b""

    def cull(self, request: IRequest) -> bytes:
        require_admin(request)
        culled = self._cull()
        audit.event("kernels.culled", **audit.actor(request), count=culled, via="dashboard")
        return write_json(request, {"culled": culled})


class NotAcceptable(GatewayError):
    status = 406


def _event(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode("utf-8")


def _is_dashboard_path(path: bytes, base_url: str) -> bool:
    b = base_url.encode("utf-8")
    return path == b + b"admin" or path.startswith(b + b"admin/") or path.startswith(b + b"api/admin/")


@implementer(IResource)
class AdminCookie:
    """
    The site's root: lets the dashboard's cookie stand for the
    C{Authorization} header on the dashboard's paths, and refuses an action
    sent with the cookie but without the page's header; then hands the
    request to the front resource, which authenticates it as usual.
    """

    isLeaf = True

    def __init__(self, front: IResource, base_url: str) -> None:
        self._front = front
        self._base_url = base_url

    def getChildWithDefault(self, name: bytes, request: IRequest) -> IResource:
        return self

    def putChild(self, path: bytes, child: IResource) -> None:
        raise NotImplementedError()

    def render(self, request: IRequest) -> Any:
        if _is_dashboard_path(request.path, self._base_url):
            cookie = request.getCookie(COOKIE.encode("ascii"))
            presented = request.getHeader(b"authorization") or (request.args or {}).get(b"token")
            if cookie and not presented:
                if request.method not in (b"GET", b"HEAD", b"OPTIONS") and not request.getHeader(ACTION_HEADER):
                    request.setHeader(b"x-content-type-options", b"nosniff")
                    audit.refused(request, 403, "dashboard action without its header")
                    return error_body(
                        request,
                        403,
                        "Forbidden",
                        "a dashboard action must carry the X-Egateway-Dashboard header (sent by the page)",
                    )
                token = unquote(cookie.decode("ascii", "replace"))
                request.requestHeaders.setRawHeaders(b"authorization", [f"token {token}".encode("utf-8")])
        return self._front.render(request)
