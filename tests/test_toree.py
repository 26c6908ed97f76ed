"""
Scala kernels: Apache Toree 0.5.0 on Spark 3.5 (pip's toree and pyspark,
tests/fixtures/kernelenvs.ToreeEnv) started on a real SSH host by
launchers/scala/launch_toree.py, which reports its connection info with the
same version 2 handshake as the Python launcher and becomes spark-submit.
"""

from __future__ import annotations

import os
import sys

from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from tests.fixtures.kernelenvs import ToreeEnv
from tests.fixtures.spark import SPARK_PACKAGES
from tests.fixtures.system import require_packages
from tests.support import remote_kernels
from tests.support.wsclient import ChannelsClient
from tests.test_ssh import SSHTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launchers", "scala", "launch_toree.py")


class ToreeOverSSHTests(SSHTestCase):
    timeout = 400
    hosts = ("h1",)
    # Toree answers kernel_info once its Scala interpreter is up (20-60 s on a busy 2-core machine).
    extra_settings = {"launch_timeout": 240}

    async def setUp(self) -> None:
        require_packages(*SPARK_PACKAGES)
        self.toree = await deferToThread(ToreeEnv().ensure)
        await super().setUp()

    def write_specs(self, hosts: str) -> None:
        argv = [*remote_kernels.launcher_argv(LAUNCHER), "--spark-context-initialization-mode", "lazy",
                "--toree-jar", self.toree.toree_jar,
                "--", "--master", "local[1]", "--conf", "spark.ui.enabled=false"]
        remote_kernels.write_spec(
            self.specs, "scala", argv, "ssh", config={"remote_hosts": hosts},
            env={"SPARK_HOME": self.toree.spark_home, "SPARK_LOCAL_IP": self.ips["h1"]},
        )

    async def test_scala_on_spark(self) -> None:
        """
        A Toree kernel on an SSH host reports with the authenticated
        version 2 handshake, runs a Spark job in Scala (the sum of 1 to
        100 is 5050.0) and leaves nothing on the host when deleted.
        """
        model = await self.start_remote("scala")
        phases = [p for p in model["phases"] if p["phase"] == "connection info received"]
        self.assertIn("payload v2", phases[0]["detail"])
        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        result = await client.execute("sc.parallelize(1 to 100).sum", timeout=180)
        self.assertEqual(result["result"]["text/plain"], "5050.0", result)
        await client.close()
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
