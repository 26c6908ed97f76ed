"""
An egateway running inside the test's own reactor, on a free loopback port,
with real ipykernel kernels; and checks that no kernel process outlives a
test.
"""

from __future__ import annotations

import json
import os
from typing import Any

import treq
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from egateway.validation import load_config
from tests.support.daemon import pid_alive
from egateway.tap import build_service


class InProcessGateway:
    """
    @ivar url: the base URL, e.g. C{http://127.0.0.1:40123/}.
    """

    def __init__(
        self, env: dict[str, str] | None = None, file_values: dict[str, Any] | None = None, **flags: Any
    ) -> None:
        """
        @param file_values: what a config file would hold (its tables).
        """
        settings = {
            "listen": "tcp:0:interface=127.0.0.1",
            "response_port": 0,
            "persistence": "false",
            **flags,
        }
        values = {key.replace("_", "-"): str(value) for key, value in settings.items()}
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("EG_", "KG_"))}
        environ.update(env or {})
        self.config = load_config(file_values or {}, environ, values)
        self.service = build_service(self.config, reactor)
        self.manager = self.service.manager
        self.url = ""
        self.pids: set[int] = set()
        self.manager.listeners.append(self._record)
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def _record(self, event: str, kernel: Any) -> None:
        if kernel.process is not None and kernel.process.placement.pid:
            self.pids.add(kernel.process.placement.pid)

    async def start(self) -> "InProcessGateway":
        self.service.startService()
        listener = self.service.getServiceNamed("http")
        port = await listener._waitingForPort
        self.url = f"http://127.0.0.1:{port.getHost().port}{self.config.server.base_url}"
        return self

    async def stop(self) -> None:
        for kernel in self.manager.kernels.values():
            if kernel.process is not None:
                self.pids.add(kernel.process.placement.pid)
        await self.service.stopService()
        await self.pool.closeCachedConnections()

    def headers(self, token: str | None = None) -> dict[bytes, list[bytes]]:
        return {b"Authorization": [f"token {token}".encode()]} if token else {}

    async def request(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        """
        An HTTP request to the gateway; returns the status and the decoded
        JSON body (or C{None}).
        """
        data = json.dumps(body).encode() if body is not None else None
        response = await treq.request(
            method, self.url + path.lstrip("/"), data=data, headers=self.headers(token), pool=self.pool
        )
        content = await response.content()
        parsed = json.loads(content) if content else None
        return response.code, parsed

    async def interrupted_sleep(self, client: Any, kernel_id: str, **options: Any) -> dict[str, Any]:
        """
        C{client.interrupted_sleep} with the interrupt sent through the
        REST API (which must answer 204); the cell's C{execute_reply}
        content.
        """
        async def interrupt() -> None:
            code, body = await self.request("POST", f"api/kernels/{kernel_id}/interrupt")
            assert code == 204, (code, body)

        return await client.interrupted_sleep(interrupt, **options)

    async def start_kernel(self, name: str | None = None, env: dict[str, str] | None = None, token: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if name:
            body["name"] = name
        if env:
            body["env"] = env
        code, model = await self.request("POST", "api/kernels", body, token)
        assert code == 201, (code, model)
        self.pids.add(model["placement"]["pid"])
        return model


class GatewayTestCase(TestCase):
    """
    Starts an in-process gateway per test (with C{gateway_settings}) and, at
    the end, stops it and asserts every kernel process it started is gone.
    """

    timeout = 120
    gateway_settings: dict[str, Any] = {}
    gateway_env: dict[str, str] = {}
    gateway_file: dict[str, Any] = {}
    """
    What a config file would hold (its tables, such as C{pools}).
    """

    async def setUp(self) -> None:
        self.gateway = InProcessGateway(env=self.gateway_env, file_values=self.gateway_file, **self.gateway_settings)
        await self.gateway.start()
        self.addCleanup(self._stop_and_check)

    async def _stop_and_check(self) -> None:
        await self.gateway.stop()
        leaked = sorted(pid for pid in self.gateway.pids if pid_alive(pid))
        self.assertEqual(leaked, [], "kernel processes outlived the test")
