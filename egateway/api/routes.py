"""
The Kernel Gateway REST API, compatible with Kernel Gateway and Enterprise
Gateway clients (jupyter_server's gateway client among them).

Routes only translate between HTTP and the kernel manager: no kernel logic
lives here.  Every error is JSON C{{"reason", "message"}}.
"""

from __future__ import annotations

import mimetypes
import os
from typing import Any

from klein import Klein
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import BaseConverter

from egateway import __version__
from egateway.api.http import error_body, json_body, write_error, write_json
from egateway.api.identity import ANONYMOUS, Identity, launch_username
from egateway.api.openapi import openapi_document
from egateway.api.websocket import ChannelsEndpoint
from egateway.errors import BadRequest, Forbidden, GatewayError, NotFound, TooManyRequests
from egateway.kernels.kernel import Kernel, SessionTaken
from egateway.kernels.manager import KernelManager
from egateway.kernels.policy import Acl, Caller, caller_of
from egateway.kernels.profiles import ProfileRefusal
from egateway.kernels.sessions import SessionManager
from egateway.kernels.specs import KernelSpec
from egateway.ops import audit
from egateway.ops.health import Draining

_log = Logger()

class _UUIDText(BaseConverter):
    """
    A UUID path segment, passed to the route as the string it is.
    """

    regex = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"


def _uuid(name: str) -> str:
    return f"<uuidtext:{name}>"


def _read_resource_blocking(resource_dir: str, resource: str) -> tuple[str, bytes] | None:
    """
    The path and content of C{resource} in C{resource_dir}; C{None} when
    there is no such file inside it (a path leaving it included).  Every
    step touches the disk (symlinks, stat, read): all of it runs in a
    thread.
    """
    root = os.path.realpath(resource_dir)
    path = os.path.realpath(os.path.join(root, resource))
    if not path.startswith(root + os.sep) or not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            return path, f.read()
    except (FileNotFoundError, IsADirectoryError):
        return None


class GatewayAPI:
    """
    @ivar app: the Klein application; its C{resource()} serves the routes.
    """

    def __init__(
        self,
        *,
        kernels: KernelManager,
        sessions: SessionManager,
        channels: ChannelsEndpoint,
        base_url: str,
        list_kernels: bool,
        reactor: Any,
        threadpool: Any,
        metrics: Any = None,
    ) -> None:
        """
        @param metrics: the L{egateway.ops.metrics.GatewayMetrics} to serve
            at C{/metrics} (behind the front resource's own rule for it), or
            C{None}.
        """
        self.kernels = kernels
        self.metrics = metrics
        self.specs = kernels.specs
        self.sessions = sessions
        self.channels = channels
        self.base_url = base_url
        self.list_kernels = list_kernels
        self._reactor = reactor
        self._threadpool = threadpool
        self.app = Klein()
        self.app.url_map.converters["uuidtext"] = _UUIDText
        self._register()

    def _register(self) -> None:
        app, b = self.app, self.base_url
        app.route(b + "api", methods=["GET"])(self.api_version)
        app.route(b + "api/openapi.json", methods=["GET"])(self.openapi)
        app.route(b + "api/swagger.json", methods=["GET"])(self.openapi)
        app.route(b + "api/kernelspecs", methods=["GET"])(self.list_kernelspecs)
        app.route(b + "api/kernelspecs/<string:name>", methods=["GET"])(self.get_kernelspec)
        app.route(b + "kernelspecs/<string:name>/<path:resource>", methods=["GET", "HEAD"])(
            self.kernelspec_resource
        )
        app.route(b + "api/kernels", methods=["GET"])(self.list_kernel_models)
        app.route(b + "api/kernels", methods=["POST"])(self.start_kernel)
        kernel = b + "api/kernels/" + _uuid("kernel_id")
        app.route(kernel, methods=["GET"])(self.get_kernel)
        app.route(kernel, methods=["DELETE"])(self.delete_kernel)
        app.route(kernel + "/interrupt", methods=["POST"])(self.interrupt_kernel)
        app.route(kernel + "/restart", methods=["POST"])(self.restart_kernel)
        app.route(kernel + "/channels", methods=["GET"])(self.kernel_channels)
        app.route(kernel + "/acl", methods=["PUT"])(self.set_kernel_acl)
        app.route(b + "api/profiles", methods=["GET"])(self.list_profiles)
        app.route(b + "api/sessions", methods=["GET"])(self.list_sessions)
        app.route(b + "api/sessions", methods=["POST"])(self.create_session)
        session = b + "api/sessions/" + _uuid("session_id")
        app.route(session, methods=["GET"])(self.get_session)
        app.route(session, methods=["PATCH"])(self.update_session)
        app.route(session, methods=["DELETE"])(self.delete_session)
        if self.metrics is not None:
            app.route(b + "metrics", methods=["GET"])(self.metrics_page)
        app.handle_errors(GatewayError)(self._gateway_error)
        app.handle_errors(HTTPException)(self._http_error)
        app.handle_errors(Exception)(self._unexpected_error)

    def resource(self) -> Any:
        return self.app.resource()

    # -- errors ----------------------------------------------------------

    def _gateway_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        if error.status in (401, 403, 429) or isinstance(error, ProfileRefusal):
            # Every refusal a route or the kernel manager decides is audited
            # here, once.
            audit.refused(request, error.status, error.message)
        if isinstance(error, (TooManyRequests, Draining)) and error.retry_after:
            request.setHeader(b"retry-after", str(error.retry_after).encode("ascii"))
        return write_error(request, error)

    def _http_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        if isinstance(error, MethodNotAllowed):
            allowed = ", ".join(error.valid_methods or [])
            request.setHeader(b"allow", allowed.encode())
            return error_body(request, 405, "Method Not Allowed", f"use one of: {allowed}")
        if error.code in (404, 308, 301):
            path = request.path.decode("utf-8", "replace")
            return error_body(request, 404, "Not Found", f"no such resource: {path}")
        return error_body(request, error.code or 500, error.name, error.description or "")

    def _unexpected_error(self, request: IRequest, failure: Failure) -> bytes:
        _log.failure(
            "unexpected error serving {method} {path}",
            failure,
            method=request.method.decode(),
            path=request.path.decode("utf-8", "replace"),
        )
        return error_body(
            request, 500, "Internal Server Error", "Unknown server error; see the gateway log"
        )

    # -- api ---------------------------------------------------------------

    def api_version(self, request: IRequest) -> bytes:
        return write_json(request, {"version": "2.0.0", "gateway_version": __version__})

    def openapi(self, request: IRequest) -> bytes:
        return write_json(request, openapi_document(self.base_url, metrics=self.metrics is not None))

    def metrics_page(self, request: IRequest) -> bytes:
        if not getattr(request, "metrics_access", False):
            # The front resource did not apply the metrics rule to it.
            raise NotFound(f"no such resource: {request.path.decode('utf-8', 'replace')}")
        from egateway.api.metrics import CONTENT_TYPE

        request.setHeader(b"content-type", CONTENT_TYPE)
        return self.metrics.exposition()

    # -- kernelspecs -------------------------------------------------------

    async def list_kernelspecs(self, request: IRequest) -> bytes:
        specs = await self.specs.all()
        user = _launching_user(request)
        policy = self.kernels.policy
        return write_json(
            request,
            {
                "default": self.specs.default_name,
                "kernelspecs": {
                    name: spec.model(self.base_url)
                    for name, spec in sorted(specs.items())
                    if user is None or policy.may_launch(user.username, user.groups, user.admin, spec)
                },
            },
        )

    async def _spec(self, name: str) -> KernelSpec:
        specs = await self.specs.all()
        spec = specs.get(name)
        if spec is None:
            raise NotFound(f"Kernel spec {name} not found")
        return spec

    async def _visible_spec(self, request: IRequest, name: str) -> KernelSpec:
        """
        The kernelspec, if the caller may launch it; else the 404 of an
        unknown one (as C{/api/kernelspecs} leaves it out).
        """
        spec = await self._spec(name)
        user = _launching_user(request)
        if user is not None and not self.kernels.policy.may_launch(user.username, user.groups, user.admin, spec):
            raise NotFound(f"Kernel spec {name} not found")
        return spec

    async def get_kernelspec(self, request: IRequest, name: str) -> bytes:
        spec = await self._visible_spec(request, name)
        return write_json(request, spec.model(self.base_url))

    async def kernelspec_resource(self, request: IRequest, name: str, resource: str) -> bytes:
        spec = await self._visible_spec(request, name)
        if "\0" in resource:
            # No file has one, and os.path refuses it with ValueError.
            raise NotFound(f"kernelspec {name} has no resource {resource!r}")
        found = await deferToThreadPool(
            self._reactor, self._threadpool, _read_resource_blocking, spec.resource_dir, resource
        )
        if found is None:
            raise NotFound(f"kernelspec {name} has no resource {resource}")
        path, data = found
        kind, _ = mimetypes.guess_type(path)
        request.setHeader(b"content-type", (kind or "application/octet-stream").encode())
        request.setHeader(b"cache-control", b"max-age=300")
        return b"" if request.method == b"HEAD" else data

    # -- kernels -----------------------------------------------------------

    async def list_kernel_models(self, request: IRequest) -> bytes:
        if not self.list_kernels:
            raise Forbidden(LISTING_OFF.format(what="kernels"))
        return write_json(request, await self.kernels.list_models(_caller(request)))

    async def start_kernel(self, request: IRequest) -> bytes:
        body = json_body(request)
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        username = launch_username(_identity(request), body.get("env"))
        kernel = await self.kernels.start_kernel(
            body.get("name"), body.get("env"), username=username, caller=_caller(request), profile=body.get("profile")
        )
        request.setHeader(
            b"location", f"{self.base_url}api/kernels/{kernel.id}".encode("utf-8")
        )
        return write_json(request, kernel.model(), 201)

    async def _kernel(self, request: IRequest, kernel_id: str) -> Kernel:
        """
        The kernel, if the caller may see it (its owner, an admin, or
        someone it is shared with); else the 404 of an unknown id (or 403
        without C{hide_kernels}).
        """
        kernel = await self.kernels.find(kernel_id)
        try:
            self.kernels.policy.check_access(_caller(request), kernel)
        except NotFound as e:
            # Hidden, so the error handler would not record it.
            audit.refused(request, 404, f"kernel {kernel_id} belongs to {kernel.owner}", hidden=True)
            raise e from None
        return kernel

    async def get_kernel(self, request: IRequest, kernel_id: str) -> bytes:
        return write_json(request, (await self._kernel(request, kernel_id)).model())

    async def delete_kernel(self, request: IRequest, kernel_id: str) -> bytes:
        kernel = await self._kernel(request, kernel_id)
        await self.kernels.shutdown(kernel_id)
        audit.event("kernel.shutdown", **audit.actor(request), kernel_id=kernel_id, owner=kernel.username)
        request.setResponseCode(204)
        return b""

    async def interrupt_kernel(self, request: IRequest, kernel_id: str) -> bytes:
        await self._kernel(request, kernel_id)
        await self.kernels.interrupt(kernel_id)
        request.setResponseCode(204)
        return b""

    async def restart_kernel(self, request: IRequest, kernel_id: str) -> bytes:
        await self._kernel(request, kernel_id)
        kernel = await self.kernels.restart(kernel_id)
        return write_json(request, kernel.model())

    async def kernel_channels(self, request: IRequest, kernel_id: str) -> Any:
        """
        Upgrade to the kernel's channels WebSocket.  The kernel is found and
        the request read here, once; the WebSocket serves that
        L{ChannelRequest} without looking either up again.  Every refusal
        is a JSON error before the upgrade.
        """
        kernel = await self._kernel(request, kernel_id)
        channel = self.channels.accept(request, kernel)
        session = channel.session_id
        caller = _caller(request)
        user = caller.username if caller is not None else ""
        try:
            kernel.check_session_user(session, user)
        except SessionTaken as e:
            raise Forbidden(str(e)) from None
        if self.kernels.sharing is not None and session:
            await self.kernels.sharing.take_over_session(kernel, session, channel.resume_after, user)
        audit.event(
            "websocket.connect", **audit.actor(request), kernel_id=kernel_id, owner=kernel.username, session=session
        )
        return self.channels.resource_for(channel)

    async def set_kernel_acl(self, request: IRequest, kernel_id: str) -> bytes:
        """
        Share a kernel: C{{"users": [...], "groups": [...]}} replaces whom
        it is shared with.  Its owner or an admin only.
        """
        kernel = await self._kernel(request, kernel_id)
        self.kernels.policy.check_owner(_caller(request), kernel)
        acl = Acl.parse(json_body(request))
        self.kernels.set_acl(kernel, acl)
        audit.event(
            "kernel.shared", **audit.actor(request), kernel_id=kernel_id, owner=kernel.owner,
            users=list(acl.users), groups=list(acl.groups),
        )
        return write_json(request, kernel.model())

    # -- profiles ------------------------------------------------------------

    def list_profiles(self, request: IRequest) -> bytes:
        """
        The profiles the caller may use (for an anonymous caller, those of
        C{?user=}, as for kernelspecs), each with what it lets a client
        override and its limits.
        """
        policy = self.kernels.policy
        user = _launching_user(request) or Caller("")
        profiles = policy.usable_profiles(user.username, user.groups, user.admin)
        return write_json(
            request,
            {
                "require_profile": policy.settings.require_profile,
                "profiles": [
                    profile.describe(default=profile.default_rank(user.username, user.groups) > 0)
                    for profile in profiles
                ],
            },
        )

    # -- sessions ----------------------------------------------------------

    def list_sessions(self, request: IRequest) -> bytes:
        if not self.list_kernels:
            raise Forbidden(LISTING_OFF.format(what="sessions"))
        return write_json(
            request, [self.sessions.model(session) for session in self.sessions.list(_caller(request))]
        )

    async def create_session(self, request: IRequest) -> bytes:
        body = json_body(request)
        username = launch_username(_identity(request), _session_kernel_env(body))
        session, created = await self.sessions.create(body, username=username, caller=_caller(request))
        request.setHeader(
            b"location", f"{self.base_url}api/sessions/{session.id}".encode("utf-8")
        )
        return write_json(request, self.sessions.model(session), 201)

    def get_session(self, request: IRequest, session_id: str) -> bytes:
        return write_json(request, self.sessions.model(self.sessions.get(session_id, _caller(request))))

    async def update_session(self, request: IRequest, session_id: str) -> bytes:
        body = json_body(request)
        username = launch_username(_identity(request), _session_kernel_env(body))
        session = await self.sessions.update(session_id, body, username=username, caller=_caller(request))
        return write_json(request, self.sessions.model(session))

    async def delete_session(self, request: IRequest, session_id: str) -> bytes:
        kernel_id = self.sessions.get(session_id, _caller(request)).kernel_id
        await self.sessions.delete(session_id, _caller(request))
        audit.event("kernel.shutdown", **audit.actor(request), kernel_id=kernel_id, session_id=session_id)
        request.setResponseCode(204)
        return b""


def _identity(request: IRequest) -> Identity:
    return getattr(request, "gateway_user", ANONYMOUS)


LISTING_OFF = (
    "listing {what} is turned off on this gateway; its operator turns it on with list_kernels = true "
    "(--list-kernels=true, EG_LIST_KERNELS=true)"
)


def _caller(request: IRequest) -> Caller | None:
    """
    The verified user making C{request}, or C{None} (anonymous, or a
    credential naming no user): see L{egateway.kernels.policy}.
    """
    return caller_of(getattr(request, "gateway_user", None))


def _launching_user(request: IRequest) -> Caller | None:
    """
    Whom to show kernelspecs and profiles for: the verified user (an admin
    may look as another with C{?user=}); for other callers the C{?user=}
    they name, as Enterprise Gateway's advisory filter; C{None} for no
    filter.
    """
    caller = _caller(request)
    named = request.args.get(b"user", [b""])[0].decode("utf-8", "replace")[:255] if request.args else ""
    if caller is not None and not (caller.admin and named):
        return caller
    return Caller(named) if named else None


def _session_kernel_env(body: Any) -> Any:
    """
    The C{env} of a session request's C{kernel}, where there is one.
    """
    kernel = body.get("kernel") if isinstance(body, dict) else None
    return kernel.get("env") if isinstance(kernel, dict) else None
