"""
What a kernel's C{spark-submit --master yarn --deploy-mode cluster} is,
decided without running anything: its argv (a list, never a shell line),
the Spark properties that go in a private properties file rather than on
the command line (the launch token, the kernel's environment), the
client's memory values checked, and how a failed submit is quoted.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from egateway.clusters.interface import LaunchError
from egateway.clusters.local import PYTHON_NAMES
from egateway.clusters.yarn_apps import gateway_tag

_MEMORY = re.compile(r"^[1-9][0-9]{0,6}[kKmMgGtT]?$")
_APP_ID = re.compile(r"\bapplication_[0-9]+_[0-9]+\b")
_QUEUE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")

CLIENT_MEMORY = {"KERNEL_DRIVER_MEMORY": "--driver-memory", "KERNEL_EXECUTOR_MEMORY": "--executor-memory"}
"""
Enterprise Gateway's request variables for a kernel application's memory,
and the spark-submit options they become (which win over the kernelspec's
C{--conf spark.driver.memory=...}).
"""

FORWARDED_PREFIXES = ("KERNEL_",)
"""
Variables of the kernel's environment the kernel sees inside its YARN
container (through C{spark.yarn.appMasterEnv.*}): the client's
C{KERNEL_*} values, as Enterprise Gateway's kernels see them.
"""


@dataclass
class Submission:
    """
    One kernel's spark-submit: C{argv} to run, C{properties} for its
    C{--properties-file} (C{None}: the kernelspec's own script submits, as
    Enterprise Gateway's C{run.sh} does), and the client values used.
    """

    argv: list[str]
    properties: dict[str, str] | None
    from_client: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


def is_python(program: str) -> bool:
    name = os.path.basename(program)
    return name in PYTHON_NAMES or name.startswith("python")


def submission(
    argv: Sequence[str],
    *,
    spark_submit: str,
    kernel_id: str,
    gateway_id: str,
    env: Mapping[str, str],
    config: Mapping[str, Any],
    am_wait_time: str,
    token: str,
    proxy_user: str = "",
    properties_file: str = "",
) -> Submission:
    """
    The submission of a kernelspec whose argv runs a Python kernel
    launcher (C{python launch_ipykernel.py ...}): spark-submit runs that
    script as the application's driver, in the ApplicationMaster's
    container.  Any other argv (Enterprise Gateway's C{run.sh}) runs as it
    is, with the kernel's environment, and submits by itself.

    @raise LaunchError: 400 for a malformed client memory value or queue.
    """
    if len(argv) < 2 or not is_python(argv[0]) or not argv[1].endswith(".py"):
        return Submission(list(argv), None)
    python, script, arguments = argv[0], argv[1], list(argv[2:])
    properties = {
        "spark.yarn.tags": f"{kernel_id},{gateway_tag(gateway_id)}" if gateway_id else kernel_id,
        "spark.yarn.submit.waitAppCompletion": "false",
        "spark.yarn.maxAppAttempts": "1",
        "spark.yarn.am.waitTime": am_wait_time,
        "spark.yarn.appMasterEnv.PYSPARK_PYTHON": python,
        "spark.pyspark.python": python,
        "spark.yarn.appMasterEnv.KERNEL_ID": kernel_id,
    }
    for name, value in env.items():
        if name.startswith(FORWARDED_PREFIXES):
            properties[f"spark.yarn.appMasterEnv.{name}"] = value
    if token:
        properties["spark.yarn.appMasterEnv.EG_LAUNCH_TOKEN"] = token
    from_client = []
    memory = []
    for name, option in CLIENT_MEMORY.items():
        value = str(env.get(name) or "").strip()
        if value:
            if not _MEMORY.match(value):
                raise LaunchError(f"{name}={value[:40]!r} is not a memory size such as 512m or 2g", status=400)
            memory += [option, value]
            from_client.append(name)
    queue = str(env.get("KERNEL_QUEUE") or config.get("queue") or "").strip()
    if queue:
        if not _QUEUE.match(queue):
            raise LaunchError(f"YARN queue {queue[:80]!r} is not a queue name", status=400)
        properties["spark.yarn.queue"] = queue
        if env.get("KERNEL_QUEUE"):
            from_client.append("KERNEL_QUEUE")
    spark_opts = config.get("spark_opts") or []
    if isinstance(spark_opts, str):
        spark_opts = spark_opts.split()
    command = [spark_submit, "--master", "yarn", "--deploy-mode", "cluster", "--name", kernel_id]
    if properties_file:
        command += ["--properties-file", properties_file]
    if proxy_user:
        command += ["--proxy-user", proxy_user]
    command += [str(option) for option in spark_opts]
    command += memory
    command += [script, *arguments]
    return Submission(command, properties, tuple(from_client))


def properties_text(properties: Mapping[str, str]) -> str:
    """
    A Java properties file of C{properties}, escaped so every value is
    read back exactly (backslashes, separators, non-Latin-1 characters).
    """
    return "".join(f"{_escape(key, True)}={_escape(value, False)}\n" for key, value in properties.items())


def _escape(text: str, key: bool) -> str:
    out = []
    for i, char in enumerate(text):
        if char == "\\":
            out.append("\\\\")
        elif char in "=:#!" and (key or i == 0):
            out.append("\\" + char)
        elif char == " " and (key or i == 0):
            out.append("\\ ")
        elif char in "\t\n\r\f":
            out.append({"\t": "\\t", "\n": "\\n", "\r": "\\r", "\f": "\\f"}[char])
        elif ord(char) > 0x7E or ord(char) < 0x20:
            encoded = char.encode("utf-16-be")
            out.extend(f"\\u{int.from_bytes(encoded[j:j + 2], 'big'):04x}" for j in range(0, len(encoded), 2))
        else:
            out.append(char)
    return "".join(out)


def submitted_app_id(output: str) -> str:
    """
    The application id spark-submit printed, or C{""}.
    """
    found = _APP_ID.findall(output)
    return found[-1] if found else ""


def submit_error(output: str) -> str:
    """
    The lines of spark-submit's output that say why it failed (its
    exceptions and errors), else its last lines.
    """
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    wanted = [
        line for line in lines
        if ("Exception" in line or "Error" in line or line.startswith("ERROR") or "error:" in line.lower())
        and not line.startswith("at ")
    ]
    chosen = (wanted or lines)[-3:]
    return " | ".join(re.sub(r"^Exception in thread \"main\" ", "", line) for line in chosen)[:2000]


__all__ = ["Submission", "is_python", "properties_text", "submission", "submit_error", "submitted_app_id"]
