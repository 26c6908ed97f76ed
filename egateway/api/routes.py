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
from egateway.api.openapi import openapi_document
from egateway.api.websocket import ChannelsEndpoint
from egateway.errors import BadRequest, Forbidden, GatewayError, NotFound
from egateway.kernels.manager import KernelManager
from egateway.kernels.sessions import SessionManager
from egateway.kernels.specs import KernelSpec

_log = Logger()

class _UUIDText(BaseConverter):
    """
    A UUID path segment, passed to the route as the string it is.
    """

    regex = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"


def _uuid(name: str) -> str:
    return f"<uuidtext:{name}>"


def _read_file_blocking(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


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
    ) -> None:
        self.kernels = kernels
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
        app.route(b + "api/sessions", methods=["GET"])(self.list_sessions)
        app.route(b + "api/sessions", methods=["POST"])(self.create_session)
        session = b + "api/sessions/" + _uuid("session_id")
        app.route(session, methods=["GET"])(self.get_session)
        app.route(session, methods=["PATCH"])(self.update_session)
        app.route(session, methods=["DELETE"])(self.delete_session)
        app.handle_errors(GatewayError)(self._gateway_error)
        app.handle_errors(HTTPException)(self._http_error)
        app.handle_errors(Exception)(self._unexpected_error)

    def resource(self) -> Any:
        return self.app.resource()

    # -- errors ----------------------------------------------------------

    def _gateway_error(self, request: IRequest, failure: Failure) -> bytes:
        return write_error(request, failure.value)

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
        return write_json(request, openapi_document(self.base_url))

    # -- kernelspecs -------------------------------------------------------

    async def list_kernelspecs(self, request: IRequest) -> bytes:
        specs = await self.specs.all()
        return write_json(
            request,
            {
                "default": self.specs.default_name,
                "kernelspecs": {
                    name: spec.model(self.base_url) for name, spec in sorted(specs.items())
                },
            },
        )

    async def _spec(self, name: str) -> KernelSpec:
        specs = await self.specs.all()
        spec = specs.get(name)
        if spec is None:
            raise NotFound(f"Kernel spec {name} not found")
        return spec

    async def get_kernelspec(self, request: IRequest, name: str) -> bytes:
        spec = await self._spec(name)
        return write_json(request, spec.model(self.base_url))

    async def kernelspec_resource(self, request: IRequest, name: str, resource: str) -> bytes:
        spec = await self._spec(name)
        root = os.path.realpath(spec.resource_dir)
        path = os.path.realpath(os.path.join(root, resource))
        if not path.startswith(root + os.sep) or not os.path.isfile(path):
            raise NotFound(f"kernelspec {name} has no resource {resource}")
        data = await deferToThreadPool(self._reactor, self._threadpool, _read_file_blocking, path)
        kind, _ = mimetypes.guess_type(path)
        request.setHeader(b"content-type", (kind or "application/octet-stream").encode())
        request.setHeader(b"cache-control", b"max-age=300")
        return b"" if request.method == b"HEAD" else data

    # -- kernels -----------------------------------------------------------

    async def list_kernel_models(self, request: IRequest) -> bytes:
        if not self.list_kernels:
            raise Forbidden("listing kernels is disabled (EG_LIST_KERNELS)")
        return write_json(request, await self.kernels.list_models())

    async def start_kernel(self, request: IRequest) -> bytes:
        body = json_body(request)
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        kernel = await self.kernels.start_kernel(body.get("name"), body.get("env"))
        request.setHeader(
            b"location", f"{self.base_url}api/kernels/{kernel.id}".encode("utf-8")
        )
        return write_json(request, kernel.model(), 201)

    async def get_kernel(self, request: IRequest, kernel_id: str) -> bytes:
        return write_json(request, (await self.kernels.find(kernel_id)).model())

    async def delete_kernel(self, request: IRequest, kernel_id: str) -> bytes:
        await self.kernels.find(kernel_id)
        await self.kernels.shutdown(kernel_id)
        request.setResponseCode(204)
        return b""

    async def interrupt_kernel(self, request: IRequest, kernel_id: str) -> bytes:
        await self.kernels.find(kernel_id)
        await self.kernels.interrupt(kernel_id)
        request.setResponseCode(204)
        return b""

    async def restart_kernel(self, request: IRequest, kernel_id: str) -> bytes:
        await self.kernels.find(kernel_id)
        kernel = await self.kernels.restart(kernel_id)
        return write_json(request, kernel.model())

    async def kernel_channels(self, request: IRequest, kernel_id: str) -> Any:
        await self.kernels.find(kernel_id)
        return self.channels.resource_for(request, kernel_id)

    # -- sessions ----------------------------------------------------------

    def list_sessions(self, request: IRequest) -> bytes:
        if not self.list_kernels:
            raise Forbidden("listing sessions is disabled (EG_LIST_KERNELS)")
        return write_json(
            request, [self.sessions.model(session) for session in self.sessions.list()]
        )

    async def create_session(self, request: IRequest) -> bytes:
        session, created = await self.sessions.create(json_body(request))
        request.setHeader(
            b"location", f"{self.base_url}api/sessions/{session.id}".encode("utf-8")
        )
        return write_json(request, self.sessions.model(session), 201)

    def get_session(self, request: IRequest, session_id: str) -> bytes:
        return write_json(request, self.sessions.model(self.sessions.get(session_id)))

    async def update_session(self, request: IRequest, session_id: str) -> bytes:
        session = await self.sessions.update(session_id, json_body(request))
        return write_json(request, self.sessions.model(session))

    async def delete_session(self, request: IRequest, session_id: str) -> bytes:
        await self.sessions.delete(session_id)
        request.setResponseCode(204)
        return b""
