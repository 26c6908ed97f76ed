"""
The conductor launcher (IBM Spectrum Conductor) against an emulator of the
Conductor REST calls it makes (tests/support/conductor_emulator.py): no real
Conductor can run here, so these tests show the launcher speaks the API as
Enterprise Gateway uses it (submit, state and host, kill) and handles its
answers; they do not show a real Conductor answers the same way.  The
emulator runs each submitted driver (egateway's Python launcher) as a
local process, which reports its connection info to the gateway as a
driver in Conductor would.
"""

from __future__ import annotations

import os
import sys

from tests.support import remote_kernels
from tests.support.conductor_emulator import ConductorEmulator
from tests.support.daemon import pid_alive
from tests.support.gateway import GatewayTestCase
from tests.support.polling import eventually
from tests.support.wsclient import ChannelsClient

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from egateway.clusters.conductor import ConductorLauncher
from egateway.clusters.interface import LauncherContext, LaunchSettings
from egateway.config import build_config
from egateway.kernels.specs import KernelSpec
from tests.support.contract import LauncherContract, request_for

CREDENTIAL = "conductor-test-credential"


class ConductorTestCase(GatewayTestCase):
    """
    A gateway whose kernelspec C{conductor} submits egateway's Python
    launcher to the emulator.
    """

    timeout = 120
    credential = CREDENTIAL

    async def setUp(self) -> None:
        self.conductor = ConductorEmulator(reactor, CREDENTIAL)
        url = self.conductor.listen()
        self.addCleanup(self.conductor.stop)
        specs = os.path.abspath(self.mktemp())
        remote_kernels.write_spec(
            specs, "conductor", remote_kernels.launcher_argv(python=sys.executable), "conductor", config={}
        )
        self.gateway_settings = {
            "kernelspec_path": specs,
            "response_ip": "127.0.0.1",
            "conductor_endpoint": url,
            "conductor_credential": self.credential,
            "conductor_poll_interval": 0.2,
            "poll_interval": 1,
            "shutdown_wait": 3,
            "terminate_wait": 3,
            "launch_timeout": 30,
        }
        await super().setUp()

    async def start(self) -> dict:
        code, model = await self.gateway.request("POST", "api/kernels", {"name": "conductor"})
        self.assertEqual(code, 201, model)
        return model

    def driver(self, model: dict):
        return self.conductor.drivers[model["placement"]["driver_id"]]


class ConductorLaunchTests(ConductorTestCase):
    async def test_submit_run_interrupt_delete(self) -> None:
        """
        A kernel is submitted as a cluster-mode Spark application named
        after the kernel id with the credential, placed on the driver's
        host once Conductor reports it, runs code, is interrupted through
        its comm port, and deleting it leaves its driver ended and no
        process.
        """
        model = await self.start()
        driver = self.driver(model)
        self.assertEqual(driver.name, model["id"])
        method, path, submission = self.conductor.requests[0]
        self.assertEqual((method, path), ("POST", "/v1/submissions/create"))
        self.assertEqual(submission["sparkProperties"]["spark.submit.deployMode"], "cluster")
        self.assertEqual(submission["appResource"], remote_kernels.LAUNCHER)
        self.assertEqual(submission["sparkProperties"]["spark.pyspark.python"], sys.executable)
        self.assertEqual(model["placement"]["application_id"], driver.application_id)
        self.assertEqual(model["placement"]["host"], "127.0.0.1")
        self.assertIn("payload v2", [p for p in model["phases"] if p["phase"] == "connection info received"][0]["detail"])

        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        self.assertEqual((await client.execute("6 * 7"))["result"]["text/plain"], "42")
        reply = await self.gateway.interrupted_sleep(client, model["id"])
        self.assertEqual(reply["ename"], "KeyboardInterrupt")
        await client.close()

        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
        await eventually(lambda: driver.ended, "the driver process to end")
        self.assertIn(driver.state, ("FINISHED", "KILLED"))
        self.assertFalse(pid_alive(driver.pid))

    async def test_killed_in_conductor_makes_kernel_dead(self) -> None:
        """
        A driver killed by an operator in Conductor makes the kernel dead
        with Conductor's state, and it is not restarted (a decision).
        """
        model = await self.start()
        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        self.conductor.kill_from_outside(model["placement"]["driver_id"])
        status = await client.wait_for(
            lambda m: m.get("msg_type") == "status" and m["content"]["execution_state"] == "dead", timeout=20
        )
        self.assertIn(f"Conductor application {model['placement']['application_id']} ended: KILLED",
                      status["content"]["reason"])
        await client.close()
        code, body = await self.gateway.request("GET", f"api/kernels/{model['id']}")
        self.assertEqual((code, body["state"], body["restarts"]), (200, "dead", 0))


class ConductorRefusalTests(ConductorTestCase):
    async def test_refused_submission_is_quoted(self) -> None:
        """
        A submission Conductor does not accept fails the launch at once
        with Conductor's message, and nothing runs.
        """
        self.conductor.refuse_submissions = "Insufficient resources in instance group ig1"
        code, body = await self.gateway.request("POST", "api/kernels", {"name": "conductor"})
        self.assertEqual(code, 500, body)
        self.assertIn("Insufficient resources in instance group ig1", body["message"])
        self.assertEqual(self.conductor.drivers, {})


class WrongCredentialTests(ConductorTestCase):
    credential = "wrong"

    async def test_wrong_credential(self) -> None:
        """
        A credential Conductor refuses fails the launch with 403 and
        Conductor's message.
        """
        code, body = await self.gateway.request("POST", "api/kernels", {"name": "conductor"})
        self.assertEqual(code, 403, body)
        self.assertIn("Invalid credential", body["message"])
        self.assertEqual(body["reason"], "Forbidden")


class WaitingTests(ConductorTestCase):
    async def test_waiting_application_times_out_and_is_killed(self) -> None:
        """
        An application Conductor keeps WAITING (no host) past the launch
        timeout fails the launch with that state in the error, and its
        driver is killed.
        """
        self.conductor.hold_waiting = True
        code, body = await self.gateway.request("POST", "api/kernels", {"name": "conductor", "env": {"KERNEL_LAUNCH_TIMEOUT": "3"}})
        self.assertEqual(code, 504, body)
        self.assertIn("application app-20261206000000-0001 WAITING", body["message"])
        (driver,) = self.conductor.drivers.values()
        await eventually(lambda: driver.ended, "the waiting driver to be killed")
        self.assertEqual(driver.state, "KILLED")


class ConductorLauncherContract(LauncherContract, TestCase):
    """
    The conductor launcher against the launcher contract, on the emulator.
    """

    timeout = 120

    async def setUp(self) -> None:
        self.conductor = ConductorEmulator(reactor, CREDENTIAL)
        url = self.conductor.listen()
        self.addCleanup(self.conductor.stop)
        self.config = build_config({}, {}, {
            "response-ip": "127.0.0.1", "response-port": "0", "conductor-endpoint": url,
            "conductor-credential": CREDENTIAL, "conductor-poll-interval": "0.2", "poll-interval": "1",
        })
        self.services: dict = {}
        self._launchers: list = []
        self.addCleanup(self._stop)

        def spec(name: str, argv: list[str]) -> KernelSpec:
            return KernelSpec.from_json(name, "/nonexistent", {
                "argv": argv, "language": "python", "metadata": {"egateway": {"launcher": "conductor"}},
            })

        self.working = spec("working", remote_kernels.launcher_argv(python=sys.executable))
        self.broken = spec("broken", [sys.executable, "/nonexistent/x.py"])

    async def _stop(self) -> None:
        listener = self.services.get("response")
        if listener is not None and listener.running:
            await listener.stopService()
        for launcher in self._launchers:
            await launcher.stop()

    async def make_launcher(self) -> ConductorLauncher:
        launcher = ConductorLauncher(LauncherContext(
            reactor=reactor, runtime_dir="", ports=None, section=self.config.conductor,
            shared=LaunchSettings.from_config(self.config), services=self.services,
        ))
        self._launchers.append(launcher)
        return launcher

    def make_request(self, kernel_id: str, spec_name: str = "working"):
        return request_for(kernel_id, self.working, timeout=30)

    def broken_request(self, kernel_id: str):
        return request_for(kernel_id, self.broken, timeout=30)

    def _running(self) -> list:
        return [d.driver_id for d in self.conductor.drivers.values() if not d.ended or pid_alive(d.pid)]

    async def leftovers(self, process) -> list:
        try:
            await eventually(lambda: not self._running(), "the drivers to end", timeout=10)
        except AssertionError:
            pass
        return self._running()

    async def placed_leftovers(self, phases: list) -> list:
        return await self.leftovers(None)
