"""
R kernels (Debian's R and IRkernel): the shipped local kernelspec, and
kernels on real SSH hosts (sshd in network namespaces) started by
launchers/R/launch_IRkernel.R, which reports its connection info with the
same version 2 handshake as the Python launcher.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from tests.fixtures.system import require_packages
from tests.support import remote_kernels
from tests.support.gateway import GatewayTestCase
from tests.support.wsclient import ChannelsClient
from tests.test_ssh import SSHTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R_PACKAGES = ("r-base-core", "r-cran-irkernel")
R_LAUNCHER = os.path.join(ROOT, "launchers", "R", "launch_IRkernel.R")


def r_launcher_argv() -> list[str]:
    """
    The R launcher with the placeholders the gateway fills in.
    """
    return ["Rscript", R_LAUNCHER, *remote_kernels.launcher_argv()[2:]]


async def shown(client: ChannelsClient, code: str) -> str:
    """
    Run R C{code}; the text IRkernel shows for its value (IRkernel sends a
    value as C{display_data}, not C{execute_result}).
    """
    result = await client.execute(code, timeout=60)
    assert result["reply"]["status"] == "ok", result
    shown = [
        m["content"]["data"].get("text/plain", "")
        for m in client.replies_to(result["msg_id"])
        if m.get("msg_type") in ("display_data", "execute_result")
    ]
    return "".join(shown)


class LocalRKernelTests(GatewayTestCase):
    """
    The example kernelspec etc/kernelspecs/ir_local on the local launcher.
    """

    async def setUp(self) -> None:
        require_packages(*R_PACKAGES)
        specs = tempfile.mkdtemp(prefix="egw-rspecs-")
        os.makedirs(os.path.join(specs, "ir"))
        with open(os.path.join(ROOT, "etc", "kernelspecs", "ir_local", "kernel.json")) as f:
            spec = json.load(f)
        with open(os.path.join(specs, "ir", "kernel.json"), "w") as f:
            json.dump(spec, f)
        self.gateway_settings = {"kernelspec_path": specs, "shutdown_wait": 3, "terminate_wait": 3}
        await super().setUp()

    async def test_one_plus_one(self) -> None:
        """
        An R kernel started from the shipped local kernelspec answers 1+1
        with R's [1] 2 and shuts down.
        """
        model = await self.gateway.start_kernel("ir")
        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        self.assertEqual(await shown(client, "1+1"), "[1] 2")
        await client.close()
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)


class SSHRKernelTests(SSHTestCase):
    """
    R kernels on SSH hosts through launchers/R/launch_IRkernel.R.
    """

    hosts = ("h1",)

    async def setUp(self) -> None:
        require_packages(*R_PACKAGES)
        await super().setUp()

    def write_specs(self, hosts: str) -> None:
        remote_kernels.write_spec(
            self.specs,
            "ir",
            r_launcher_argv(),
            "ssh",
            config={"remote_hosts": hosts},
            env={"EG_LAUNCHER_PYTHON": sys.executable},
        )

    async def test_one_plus_one_over_ssh(self) -> None:
        """
        An R kernel on an SSH host reports its connection info with the
        authenticated version 2 handshake, runs 1+1 on that host, is
        interrupted through its comm port, and leaves nothing behind
        when deleted.
        """
        model = await self.start_remote("ir")
        self.assertEqual(model["placement"]["host"], self.ips["h1"])
        phases = [p for p in model["phases"] if p["phase"] == "connection info received"]
        self.assertIn("payload v2", phases[0]["detail"])
        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        self.assertEqual(await shown(client, "1+1"), "[1] 2")
        host = await client.execute("cat(Sys.info()[['nodename']])")
        self.assertEqual(host["stdout"], "h1")

        reply = await self.gateway.interrupted_sleep(
            client, model["id"], code="cat('sleeping\\n'); Sys.sleep(60)", noop="invisible(NULL)"
        )
        self.assertEqual(reply["status"], "abort")  # IRkernel's answer to an interrupted cell
        self.assertEqual(await shown(client, "2*21"), "[1] 42")
        await client.close()

        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
