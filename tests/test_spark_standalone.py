"""
Spark client mode on an SSH host against a real Spark standalone cluster
(Enterprise Gateway's "YARN client mode"/distributed form, with a standalone
master): the kernelspec's argv runs launchers/spark/submit_kernel.sh on the
host, whose C{spark-submit --master spark://... --deploy-mode client} runs
egateway's Python launcher as the driver, with a lazily created Spark
session.  The master and worker (pip's pyspark, tests/fixtures/spark.py)
listen on the SSH hosts' bridge address, so the driver in the host's
namespace reaches them and the executor reaches the driver back.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from tests.fixtures.spark import SparkStandalone, spark_home
from tests.support import remote_kernels
from tests.support.wsclient import ChannelsClient
from tests.test_ssh import SSHTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBMIT = os.path.join(ROOT, "launchers", "spark", "submit_kernel.sh")


class SparkStandaloneClientModeTests(SSHTestCase):
    timeout = 300
    hosts = ("h1",)

    def write_specs(self, hosts: str) -> None:
        # The cluster needs the bridge address, known only once the hosts are up (here).
        self.spark = SparkStandalone(tempfile.mkdtemp(prefix="egw-", dir="/tmp"), host=self.ssh.bridge_ip)
        self.spark.up()
        self.addCleanup(self.spark.down)
        with open(os.path.join(ROOT, "etc", "kernelspecs", "spark_python_standalone", "kernel.json")) as f:
            example = json.load(f)
        argv = [SUBMIT if arg.endswith("/submit_kernel.sh") else arg for arg in example["argv"]]
        argv[argv.index("spark://spark-master:7077")] = self.spark.master_url
        argv[argv.index("/opt/egateway/launchers/python/launch_ipykernel.py")] = remote_kernels.LAUNCHER
        remote_kernels.write_spec(
            self.specs,
            "spark",
            argv,
            "ssh",
            config={"remote_hosts": hosts},
            env={
                **example["env"],
                "SPARK_HOME": spark_home(),
                "PYSPARK_PYTHON": sys.executable,
                # The test hosts' names do not resolve: the driver is told its address.
                "SPARK_LOCAL_IP": self.ips["h1"],
            },
        )

    async def test_spark_job_runs_on_the_worker(self) -> None:
        """
        A kernel started from the example kernelspec is a Spark driver on
        the SSH host: spark.range(100) summed on the standalone worker's
        executor gives 4950, the executor ran in the worker's directory,
        and deleting the kernel leaves nothing on the host.
        """
        model = await self.start_remote("spark")
        self.assertEqual(model["placement"]["host"], self.ips["h1"])
        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        result = await client.execute("spark.range(100).groupBy().sum().collect()[0][0]", timeout=180)
        self.assertEqual(result["result"]["text/plain"], "4950", result)
        result = await client.execute("sc.range(100).sum()", timeout=120)
        self.assertEqual(result["result"]["text/plain"], "4950", result)
        where = await client.execute(
            "import os; print(sc.parallelize([0], 1).map(lambda _: os.getcwd()).collect()[0]); "
            "print(sc.master); import socket; print(socket.gethostname())",
            timeout=120,
        )
        executor_cwd, master, driver_host = where["stdout"].split()
        self.assertTrue(executor_cwd.startswith(self.spark.worker_dir + "/"), executor_cwd)
        self.assertEqual(master, self.spark.master_url)
        self.assertEqual(driver_host, "h1")
        await client.close()
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
