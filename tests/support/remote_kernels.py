"""
Kernelspecs for tests and the benchmark: their JSON, written to a
kernelspec directory, and the argv of a remote kernelspec (egateway's
Python kernel launcher, with the placeholders the gateway fills in at
launch).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

LAUNCHER = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "launchers",
    "python",
    "launch_ipykernel.py",
)


def launcher_argv(script: str = LAUNCHER, python: str = sys.executable) -> list[str]:
    """
    Run C{script} (by default the repository's launcher) with C{python}
    (by default this interpreter), reporting back to the gateway's response
    address.
    """
    return [
        python,
        script,
        "--kernel-id", "{kernel_id}",
        "--response-address", "{response_address}",
        "--public-key", "{public_key}",
        "--port-range", "{port_range}",
    ]


def jeg_launcher_argv(script: str, python: str = sys.executable) -> list[str]:
    """
    Run Enterprise Gateway's launcher C{script} with C{python}, with the
    arguments of Enterprise Gateway's sample kernelspecs.
    """
    return [
        python,
        script,
        "--RemoteProcessProxy.kernel-id", "{kernel_id}",
        "--RemoteProcessProxy.response-address", "{response_address}",
        "--RemoteProcessProxy.public-key", "{public_key}",
        "--RemoteProcessProxy.port-range", "{port_range}",
        "--RemoteProcessProxy.spark-context-initialization-mode", "none",
    ]


def kernelspec(
    name: str,
    argv: list[str],
    launcher: str = "",
    config: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    display_name: str = "",
) -> dict[str, Any]:
    """
    A kernelspec's JSON; with C{launcher}, egateway's metadata naming it
    and its C{config}.
    """
    spec: dict[str, Any] = {"display_name": display_name or name, "language": "python", "argv": argv}
    if env is not None:
        spec["env"] = env
    if launcher:
        spec["metadata"] = {"egateway": {"launcher": launcher, "config": config or {}}}
    return spec


def write_spec(
    directory: str,
    name: str,
    argv: list[str],
    launcher: str = "",
    config: dict[str, Any] | None = None,
    **options: Any,
) -> None:
    """
    Write L{kernelspec} C{name} into the kernelspec directory C{directory}.
    """
    os.makedirs(os.path.join(directory, name), exist_ok=True)
    with open(os.path.join(directory, name, "kernel.json"), "w") as f:
        json.dump(kernelspec(name, argv, launcher, config, **options), f)


async def interrupt_sleeping_cell(client: Any, gateway: Any, kernel_id: str) -> tuple[int, dict[str, Any]]:
    """
    Start a cell that sleeps a minute on C{client}, interrupt the kernel
    through the gateway's API once it is busy, and return the interrupt's
    HTTP status and the cell's C{execute_reply} content (its C{ename} is
    C{KeyboardInterrupt} when the interrupt reached the kernel).
    """
    since = len(client.messages)
    sleeper = client.send(
        "execute_request",
        {"code": "import time; time.sleep(60)", "silent": False, "store_history": False,
         "user_expressions": {}, "allow_stdin": False},
    )
    await client.wait_for(
        lambda m: m.get("msg_type") == "status" and m["content"]["execution_state"] == "busy", since=since
    )
    code, _ = await gateway.request("POST", f"api/kernels/{kernel_id}/interrupt")
    reply = await client.wait_for(
        lambda m: m.get("msg_type") == "execute_reply" and m["parent_header"].get("msg_id") == sleeper,
        timeout=15,
    )
    return code, reply["content"]
