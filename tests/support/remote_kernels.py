"""
The argv of a remote kernelspec: egateway's Python kernel launcher, with
the placeholders the gateway fills in at launch.
"""

from __future__ import annotations

import os
import sys

LAUNCHER = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "launchers",
    "python",
    "launch_ipykernel.py",
)


def launcher_argv(script: str = LAUNCHER) -> list[str]:
    """
    Run C{script} (by default the repository's launcher) with this
    interpreter, reporting back to the gateway's response address.
    """
    return [
        sys.executable,
        script,
        "--kernel-id", "{kernel_id}",
        "--response-address", "{response_address}",
        "--public-key", "{public_key}",
        "--port-range", "{port_range}",
    ]
