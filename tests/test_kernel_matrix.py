"""
The kernel side against the versions kernel hosts really have: ipykernel 6.29
with jupyter_client 7 and 8, and the newest ipykernel 7 (with jupyter_client
8), each in a virtualenv of its own (L{tests.fixtures.kernelenvs}), for local
kernels, and for egateway's and Enterprise Gateway's launchers on SSH hosts
and on Slurm nodes.

Every kernel must run code in its own environment, and its model must say
whether its channels are encrypted: egateway's launcher encrypts where the
installed ipykernel really binds its sockets with CurveZMQ (7.4 and newer)
and falls back to signed clear text, saying why, where it does not;
Enterprise Gateway's launcher (version 1) never encrypts.  With
C{kernel_encryption = "required"} such kernels are refused with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Coroutine

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from egateway.wire.channels import ConnectionInfo
from tests.fixtures.kernelenvs import (
    BUILD_TIMEOUT,
    IPYKERNEL_6_JUPYTER_CLIENT_8,
    IPYKERNEL_7_JUPYTER_CLIENT_8,
    MATRIX,
    KernelEnv,
)
from tests.support import remote_kernels
from tests.support.gateway import GatewayTestCase
from tests.support.polling import eventually
from tests.support.remote_kernels import jeg_launcher_argv, launcher_argv
from tests.support.wsclient import ChannelsClient
from tests.test_curve import ask_kernel_info_blocking, spawn_launcher
from tests.test_jeg_launcher_compat import Unavailable, jeg_launcher
from tests.test_kernel_launcher import KernelHarness
from tests.test_slurm import SlurmGatewayTestCase
from tests.test_ssh import SSHTestCase

TIMEOUT = len(MATRIX) * BUILD_TIMEOUT + 180
"""
Room for building every environment on a machine that has none yet.
"""

NOT_CAPABLE = "bound the kernel's sockets without CurveZMQ"
NO_KEYS_FROM_LAUNCHER = "provided no CurveZMQ key"
NOT_DECLARED = "does not declare CurveZMQ support"

WHICH = (
    "import ipykernel, jupyter_client, sys; print(ipykernel.__version__, jupyter_client.__version__, sys.executable)"
)


async def build_environments() -> None:
    """
    Every environment of the matrix, built unless cached (in a thread: the
    build blocks).
    """
    for env in MATRIX:
        await deferToThread(env.ensure)


async def enterprise_gateway_launcher(case: TestCase) -> str:
    directory = os.path.abspath(case.mktemp())
    os.makedirs(directory)
    try:
        return await jeg_launcher(directory)
    except Unavailable as e:
        case.fail(str(e))


async def together(*steps: Coroutine[Any, Any, None]) -> None:
    """
    Run C{steps} at once (kernels start in parallel); the first failure is
    the test's.
    """
    await gatherResults([Deferred.fromCoroutine(step) for step in steps], consumeErrors=True).addErrback(
        lambda failure: failure.value.subFailure
    )


def egateway_spec(env: KernelEnv) -> str:
    return f"egateway-{env.name}"


def jeg_spec(env: KernelEnv) -> str:
    return f"jeg-{env.name}"



ENTERPRISE_GATEWAY_LAUNCHER = {"kernel_launcher": "enterprise-gateway"}
"""
Marks a kernelspec in egateway's form as running Enterprise Gateway's
launcher, which answers in version 1 (taken once response_accept_v1 is on).
"""

def matrix_kernelspecs(case: TestCase) -> str:
    """
    A kernelspec directory with the kernelspec each environment's ipykernel
    installs (its python with C{-m ipykernel_launcher}), named after it.
    """
    specs = os.path.abspath(case.mktemp())
    for env in MATRIX:
        os.makedirs(os.path.join(specs, env.name))
        shutil.copy(env.kernelspec, os.path.join(specs, env.name, "kernel.json"))
    return specs


class MatrixChecks:
    """
    Starting a kernel through the gateway and checking what it runs on and
    what its model says about encryption.
    """

    gateway: Any

    async def check_kernel(self, name: str, env: KernelEnv, encrypted: bool, reason: str = "") -> None:
        """
        Kernelspec C{name} starts a kernel that runs code with C{env}'s
        python, ipykernel and jupyter_client; its model says C{encrypted},
        and otherwise why (containing C{reason}); it shuts down.
        """
        code, model = await self.gateway.request("POST", "api/kernels", {"name": name})
        self.assertEqual(code, 201, model)
        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        result = await client.execute(WHICH)
        await client.close()
        self.assertEqual(result["stdout"].split(), [env.ipykernel, env.jupyter_client, env.python], result)
        self.assertEqual(model["encrypted"], encrypted, model)
        if encrypted:
            self.assertNotIn("encryption_reason", model)
        else:
            self.assertIn(reason, model["encryption_reason"])
        code, listed = await self.gateway.request("GET", f"api/kernels/{model['id']}")
        self.assertEqual((code, listed["encrypted"]), (200, encrypted))
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)

    async def check_launchers(self, env: KernelEnv) -> None:
        """
        egateway's and Enterprise Gateway's launchers, side by side, on
        C{env}.
        """
        await together(
            self.check_kernel(egateway_spec(env), env, env.can_encrypt, NOT_CAPABLE),
            self.check_kernel(jeg_spec(env), env, False, NO_KEYS_FROM_LAUNCHER),
        )


class LauncherMatrix:
    """
    One test per environment: C{check_launchers} starts its kernels.
    """

    check_launchers: Callable[[KernelEnv], Coroutine[Any, Any, None]]

    async def test_ipykernel6_jupyter_client7(self) -> None:
        await self.check_launchers(MATRIX[0])

    async def test_ipykernel6_jupyter_client8(self) -> None:
        await self.check_launchers(MATRIX[1])

    async def test_ipykernel7_jupyter_client8(self) -> None:
        await self.check_launchers(MATRIX[2])


class LocalKernelMatrixTests(LauncherMatrix, MatrixChecks, GatewayTestCase):
    """
    Local kernels from the kernelspec each ipykernel installs (its python
    with C{-m ipykernel_launcher}; ipykernel 7.4 declares CurveZMQ support).
    """

    timeout = TIMEOUT

    async def setUp(self) -> None:
        await build_environments()
        self.gateway_settings = {"kernelspec_path": matrix_kernelspecs(self)}
        await super().setUp()

    async def check_launchers(self, env: KernelEnv) -> None:
        with open(env.kernelspec) as f:
            self.assertEqual(json.load(f)["argv"][0], env.python)
        await self.check_kernel(env.name, env, env.can_encrypt, NOT_DECLARED)


class BusyRestoreMatrixTests(LauncherMatrix, TestCase):
    """
    A gateway restarted while a kernel of each environment runs a cell
    serves it again before the cell ends: every ipykernel allowed on kernel
    hosts answers control from its own thread (see
    L{tests.test_persistence.restart_mid_cell}).
    """

    timeout = TIMEOUT

    async def setUp(self) -> None:
        await build_environments()
        self.specs = matrix_kernelspecs(self)

    async def check_launchers(self, env: KernelEnv) -> None:
        from tests.test_persistence import restart_mid_cell

        await restart_mid_cell(self, env.name, {"kernelspec-path": self.specs})


class SSHMatrixCase(MatrixChecks, SSHTestCase):
    """
    A gateway with kernelspecs of both launchers for every environment, on
    an SSH host (a network namespace sharing this filesystem, so the
    environments' paths work there).
    """

    timeout = TIMEOUT
    hosts = ("h1",)
    # Enterprise Gateway's launcher speaks version 1 only.
    extra_settings = {"response_accept_v1": "true"}

    async def setUp(self) -> None:
        await build_environments()
        self.jeg = await enterprise_gateway_launcher(self)
        await super().setUp()

    def write_specs(self, hosts: str) -> None:
        for env in MATRIX:
            remote_kernels.write_spec(
                self.specs, egateway_spec(env), launcher_argv(python=env.python), "ssh", config={"remote_hosts": hosts}
            )
            remote_kernels.write_spec(
                self.specs, jeg_spec(env), jeg_launcher_argv(self.jeg, env.python), "ssh",
                config={"remote_hosts": hosts, **ENTERPRISE_GATEWAY_LAUNCHER},
            )


class SSHKernelMatrixTests(LauncherMatrix, SSHMatrixCase):
    """
    Both launchers on an SSH host, for every environment.
    """


class RequiredEncryptionTests(SSHMatrixCase):
    """
    kernel_encryption = "required": kernels that cannot encrypt are refused
    with the reason, and nothing of them is left on the host.
    """

    extra_settings = {"response_accept_v1": "true", "kernel_encryption": "required"}

    async def refused(self, name: str, reason: str) -> None:
        code, body = await self.gateway.request("POST", "api/kernels", {"name": name})
        self.assertEqual(code, 403, body)
        self.assertIn("kernel_encryption is required", body["message"])
        self.assertIn(reason, body["message"])

    async def test_ipykernel6_jupyter_client8(self) -> None:
        """
        egateway's launcher on ipykernel 6.29 and Enterprise Gateway's are
        refused, each saying why; egateway's launcher on ipykernel 7.4
        starts an encrypted kernel.
        """
        env = IPYKERNEL_6_JUPYTER_CLIENT_8
        await together(
            self.refused(egateway_spec(env), f"ipykernel {env.ipykernel} with jupyter_client "
                         f"{env.jupyter_client} {NOT_CAPABLE}"),
            self.refused(jeg_spec(env), NO_KEYS_FROM_LAUNCHER),
            self.check_kernel(egateway_spec(IPYKERNEL_7_JUPYTER_CLIENT_8), IPYKERNEL_7_JUPYTER_CLIENT_8, True),
        )


class SlurmKernelMatrixTests(LauncherMatrix, MatrixChecks, SlurmGatewayTestCase):
    """
    Both launchers as Slurm jobs (the nodes share this filesystem).
    """

    timeout = TIMEOUT
    extra_settings = {"response_accept_v1": "true"}

    async def setUp(self) -> None:
        await build_environments()
        self.jeg = await enterprise_gateway_launcher(self)
        await super().setUp()

    def write_specs(self) -> None:
        config = {"cpus": 1}
        for env in MATRIX:
            remote_kernels.write_spec(self.specs, egateway_spec(env), launcher_argv(python=env.python), "slurm",
                                      config=config)
            remote_kernels.write_spec(self.specs, jeg_spec(env), jeg_launcher_argv(self.jeg, env.python), "slurm",
                                      config={**config, **ENTERPRISE_GATEWAY_LAUNCHER})


class LauncherProbeTests(TestCase):
    """
    egateway's launcher decides on CurveZMQ by what the kernel it started
    really bound, not by the traits ipykernel's application happens to
    have (jupyter_client 8.10 gives ipykernel 6 the curve traits).
    """

    timeout = TIMEOUT

    async def launch(self, env: KernelEnv, encryption: str = "auto") -> tuple[KernelHarness, Any]:
        python = await deferToThread(env.ensure)
        return spawn_launcher(self, True, {"EG_KERNEL_ENCRYPTION": encryption}, python)

    async def test_ipykernel6_falls_back_to_clear_text(self) -> None:
        """
        On ipykernel 6.29 with jupyter_client 8.10 the kernel starts (it
        used to die writing its connection file) and runs code; its
        connection info has no key and says why.
        """
        env = IPYKERNEL_6_JUPYTER_CLIENT_8
        harness, pending = await self.launch(env)
        info = await harness.receive(pending)
        self.assertNotIn("curve_publickey", info)
        self.assertIn(NOT_CAPABLE, info["encryption_reason"])
        self.assertIn(f"ipykernel {env.ipykernel}", info["encryption_reason"])
        # The launcher logs it before reporting, but its stderr may reach us
        # after the report under load.
        await eventually(lambda: NOT_CAPABLE in harness.process.tail(), "the launcher's log line", timeout=15)
        await harness.connect("127.0.0.1")
        reply, outputs = await harness.execute(WHICH)
        self.assertEqual(reply["status"], "ok")
        self.assertEqual(outputs[0].split(), [env.ipykernel, env.jupyter_client, env.python])

    async def test_ipykernel6_required_refused(self) -> None:
        """
        With EG_KERNEL_ENCRYPTION=required on ipykernel 6.29 the launcher
        exits without reporting, saying why.
        """
        harness, pending = await self.launch(IPYKERNEL_6_JUPYTER_CLIENT_8, "required")
        code, _ = await harness.process.ended.addTimeout(60, reactor)
        self.assertEqual(code, 1, harness.process.tail())
        self.assertIn("--kernel-encryption required, but ipykernel 6.29.5", harness.process.tail())
        self.assertFalse(pending.received.called)
        pending.cancel()

    async def test_ipykernel7_encrypts(self) -> None:
        """
        On ipykernel 7.4 the same launcher reports a CurveZMQ key and the
        kernel answers only CurveZMQ clients.
        """
        harness, pending = await self.launch(IPYKERNEL_7_JUPYTER_CLIENT_8)
        raw = await harness.receive(pending)
        self.assertNotIn("encryption_reason", raw)
        info = ConnectionInfo.from_dict(dict(raw, ip="127.0.0.1"))
        self.assertTrue(info.encrypted)
        reply = None
        deadline = reactor.seconds() + 30
        while reply is None and reactor.seconds() < deadline:
            reply = await deferToThread(ask_kernel_info_blocking, info, True, 2.0)
        self.assertIsNotNone(reply, harness.process.tail())
        self.assertIsNone(await deferToThread(ask_kernel_info_blocking, info, False, 2.0))
