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

from twisted.trial.unittest import TestCase

from tests.fixtures.system import require_packages
from tests.support import remote_kernels
from tests.support.gateway import GatewayTestCase, InProcessGateway
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


def local_r_specs(case: TestCase) -> str:
    """
    A kernelspec directory (in C{case}'s temporary directory) with the
    example etc/kernelspecs/ir_local as C{ir}.
    """
    specs = os.path.abspath(case.mktemp())
    os.makedirs(os.path.join(specs, "ir"))
    with open(os.path.join(ROOT, "etc", "kernelspecs", "ir_local", "kernel.json")) as f:
        spec = json.load(f)
    with open(os.path.join(specs, "ir", "kernel.json"), "w") as f:
        json.dump(spec, f)
    return specs


class RestoredRKernelTests(TestCase):
    timeout = 120

    async def test_restored_after_a_restart(self) -> None:
        """
        An R kernel outlives a gateway restart (on_stop = "keep") and the
        next gateway restores it idle, with its state: IRkernel leaves the
        control probe unanswered (it serves control on its one thread and
        ignores kernel_info_request there) and answers the shell one.
        """
        from tests.test_persistence import kill_processes_mentioning

        require_packages(*R_PACKAGES)
        data_dir = os.path.abspath(self.mktemp())
        self.addCleanup(kill_processes_mentioning, data_dir + os.sep)
        settings = {"persistence": "true", "data_dir": data_dir, "kernelspec_path": local_r_specs(self)}
        first = await InProcessGateway(on_stop="keep", **settings).start()
        model = await first.start_kernel("ir")
        client = await ChannelsClient.connect(first.url, model["id"])
        self.assertEqual(await shown(client, "x <- 41; x"), "[1] 41")
        await client.close()
        await first.stop()

        second = await InProcessGateway(on_stop="shutdown", **settings).start()
        self.addCleanup(second.stop)
        code, restored = await second.request("GET", f"api/kernels/{model['id']}")
        self.assertEqual((code, restored["state"], restored["execution_state"]), (200, "running", "idle"), restored)
        client = await ChannelsClient.connect(second.url, model["id"])
        self.assertEqual(await shown(client, "x + 1"), "[1] 42")
        await client.close()


class LocalRKernelTests(GatewayTestCase):
    """
    The example kernelspec etc/kernelspecs/ir_local on the local launcher.
    """

    async def setUp(self) -> None:
        require_packages(*R_PACKAGES)
        self.gateway_settings = {"kernelspec_path": local_r_specs(self), "shutdown_wait": 3, "terminate_wait": 3}
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
