"""
The dashboard's view of an SSH host pool, with real sshd hosts in network
namespaces: a host whose sshd is down shows as backed off, with its
failures, while the kernel runs on the other.
"""

from __future__ import annotations

import os
from typing import Any

from tests.test_ssh import SSHTestCase
from tests.test_tenancy import token_of, write_tokens


class BackedOffHost(SSHTestCase):
    async def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        tokens = os.path.join(directory, "tokens.toml")
        write_tokens(tokens)
        self.extra_settings = {"user_tokens_file": tokens, "host_backoff": 300}
        await super().setUp()

    async def test_down_host_backed_off(self) -> None:
        """
        With h1's sshd stopped, a kernel starts on h2; the admin's overview
        lists both hosts of the pool, h1 backed off with one failure and
        h2 up, running the kernel.
        """
        self.ssh.stop_sshd("h1")
        code, model = await self.gateway.request("POST", "api/kernels", {"name": "remote"}, token=token_of("alice"))
        self.assertEqual(code, 201, model)
        kid = model["id"]
        self.assertEqual(model["placement"]["host"], self.ips["h2"])
        code, overview = await self.gateway.request("GET", "api/admin/overview", token=token_of("carol"))
        self.assertEqual(code, 200, overview)
        hosts: dict[str, Any] = {h["host"]: h for h in overview["hosts"]}
        h1, h2 = hosts[self.ips["h1"]], hosts[self.ips["h2"]]
        self.assertEqual((h1["launcher"], h1["up"], h1["failures"]), ("ssh", False, 1))
        self.assertGreater(h1["backoff_remaining"], 0)
        self.assertEqual((h2["up"], h2["failures"]), (True, 0))
        self.assertEqual(h2["kernels"], 1)
        self.assertEqual([k["id"] for k in overview["kernels"]], [kid])
        code, _ = await self.gateway.request("GET", "api/admin/overview", token=token_of("alice"))
        self.assertEqual(code, 403)
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{kid}", token=token_of("carol"))
        self.assertEqual(code, 204)
