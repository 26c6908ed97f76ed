"""
One real YARN (L{tests.fixtures.yarn.YarnCluster}) shared by every YARN test of a trial process: started by the
first test that asks for it (~10 s), torn down when the process exits, with its leftovers reported on stderr then.
Each test kills the applications it started and checks that it did.
"""

from __future__ import annotations

import os
import sys
import tempfile

from tests.fixtures._support import PerProcess
from tests.fixtures.yarn import YarnCluster
from tests.support.remote_kernels import launcher_argv, write_spec

MAX_ALLOCATION_MB = 2048
"""
The largest container the shared cluster grants (the node has 4096 MB): a kernel asking for more fails at once.
"""

def _start() -> YarnCluster:
    cluster = YarnCluster(tempfile.mkdtemp(prefix="egw-", dir="/tmp"), max_allocation_mb=MAX_ALLOCATION_MB)
    cluster.up()
    return cluster


shared_yarn = PerProcess("tests.support.yarn_cluster: the shared YARN", _start)
"""
The process's cluster, started on first use.
"""


def spark_home() -> str:
    import pyspark

    return os.path.dirname(os.path.abspath(pyspark.__file__))


def spark_opts(cluster: YarnCluster) -> list[str]:
    """
    The spark-submit options of the test kernelspecs: Spark's jars from the local pyspark (not uploaded on every
    launch), staging in the cluster's work directory, small containers, everything on 127.0.0.1.
    """
    home = spark_home()
    conf = {
        "spark.yarn.jars": f"local:{home}/jars/*",
        "spark.yarn.stagingDir": f"file://{cluster.staging_dir}",
        "spark.driver.memory": "512m",
        "spark.executor.memory": "512m",
        "spark.executor.instances": "1",
        "spark.ui.enabled": "false",
        "spark.yarn.appMasterEnv.SPARK_LOCAL_IP": "127.0.0.1",
        "spark.executorEnv.SPARK_LOCAL_IP": "127.0.0.1",
        "spark.executorEnv.PYSPARK_PYTHON": sys.executable,
    }
    return [part for key, value in conf.items() for part in ("--conf", f"{key}={value}")]


def write_yarn_specs(directory: str, cluster: YarnCluster) -> None:
    """
    Kernelspecs C{yarn} (no Spark context) and C{yarn_spark} (an eager one) submitting to C{cluster}.
    """
    env = {**cluster.env(), "SPARK_HOME": spark_home()}
    config = {"spark_opts": spark_opts(cluster)}
    write_spec(directory, "yarn", launcher_argv(), "yarn", config=config, env=env)
    write_spec(
        directory, "yarn_spark",
        launcher_argv() + ["--spark-context-initialization-mode", "eager"], "yarn", config=config, env=env,
    )
