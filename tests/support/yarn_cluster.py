"""
One real YARN (L{tests.fixtures.yarn.YarnCluster}) shared by every YARN test of a trial process: started by the
first test that asks for it (~10 s), torn down when the process exits, with its leftovers reported on stderr then.
Each test kills the applications it started and checks that it did.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile

from tests.fixtures._support import PerProcess
from tests.fixtures.yarn import YarnCluster
from tests.support.remote_kernels import LAUNCHER, launcher_argv, write_spec

JEG_YARN_SPEC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures",
                             "jeg_kernelspecs", "spark_python_yarn_cluster")
"""
Enterprise Gateway's C{spark_python_yarn_cluster} kernelspec layout (kernel.json, bin/run.sh), our own files.
"""

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
    Kernelspecs C{yarn} (no Spark context), C{yarn_spark} (an eager one) and C{yarn_lazy} (a lazy one)
    submitting to C{cluster}.
    """
    env = {**cluster.env(), "SPARK_HOME": spark_home()}
    config = {"spark_opts": spark_opts(cluster)}
    write_spec(directory, "yarn", launcher_argv(), "yarn", config=config, env=env)
    for name, mode in (("yarn_spark", "eager"), ("yarn_lazy", "lazy")):
        write_spec(
            directory, name,
            launcher_argv() + ["--spark-context-initialization-mode", mode], "yarn", config=config, env=env,
        )


def install_jeg_yarn_spec(directory: str, cluster: YarnCluster) -> str:
    """
    Install C{spark_python_yarn_cluster} into the kernelspec directory C{directory} as an operator installs
    Enterprise Gateway's: run.sh unchanged, the launcher as C{scripts/launch_ipykernel.py}, and in kernel.json
    this installation's paths, the cluster's endpoint (in the process proxy's config, in the
    C{.../ws/v1/cluster} form) and the cluster's Spark options appended to SPARK_OPTS. Returns the spec's name.
    """
    name = os.path.basename(JEG_YARN_SPEC)
    target = os.path.join(directory, name)
    shutil.copytree(JEG_YARN_SPEC, target)
    os.makedirs(os.path.join(target, "scripts"))
    shutil.copy(LAUNCHER, os.path.join(target, "scripts", "launch_ipykernel.py"))
    with open(os.path.join(target, "kernel.json")) as f:
        spec = json.load(f)
    spec["argv"][0] = os.path.join(target, "bin", "run.sh")
    spec["metadata"]["process_proxy"]["config"]["yarn_endpoint"] = cluster.web_url + "/ws/v1/cluster"
    env = spec["env"]
    env.update(cluster.env(), SPARK_HOME=spark_home(), PYSPARK_PYTHON=sys.executable)
    env["SPARK_OPTS"] += " " + " ".join(shlex.quote(part) for part in spark_opts(cluster)) + (
        f" --conf spark.yarn.appMasterEnv.PYSPARK_PYTHON={shlex.quote(sys.executable)}"
    )
    with open(os.path.join(target, "kernel.json"), "w") as f:
        json.dump(spec, f, indent=2)
    return name
