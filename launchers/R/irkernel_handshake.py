#!/usr/bin/env python3
"""
The handshake half of egateway's R kernel launcher (C{launch_IRkernel.R}
runs this, then starts IRkernel with the connection file it prints).

Why Python and not R: the version 2 payload needs RSA-OAEP with SHA-256
and AES-256-GCM, and R's C{openssl} package (2.0.5 in Debian 12) only
offers OAEP with SHA-1; and the comm port must be served while IRkernel
runs, which a single-threaded R process cannot do, so Enterprise Gateway's
R launcher also serves it from Python.  This helper reuses egateway's
Python launcher (C{../python/launch_ipykernel.py}, or the directory in
C{EG_PYTHON_LAUNCHER_DIR}) for the arguments, the ports, the payload and
the comm listener, so both launchers speak exactly the same protocol.

It is started by the R process (whose pid is in C{EG_KERNEL_PID}) with the
R launcher's arguments as a JSON list in C{EG_LAUNCHER_ARGV} (so no
argument passes through the shell R's C{system2} uses), and with R's stdin,
where the launch token is when C{EG_LAUNCH_TOKEN_STDIN=1}.  It parses the
arguments as the Python launcher does, hands them to
C{../python/kernel_handshake.py} (ports, connection file, the comm listener
that reports once IRkernel listens), prints the connection file's path and
exits.

IRkernel has no CurveZMQ support, so its channels are signed, not
encrypted, and a version 2 payload says so (C{encryption_reason}).
"""

from __future__ import annotations

import json
import os
import sys

LAUNCHER_DIR_ENV = "EG_PYTHON_LAUNCHER_DIR"
ARGV_ENV = "EG_LAUNCHER_ARGV"
KERNEL_PID_ENV = "EG_KERNEL_PID"
R_ONLY_OPTIONS = ("--customAppName", "--RemoteProcessProxy.customAppName")
"""
Options of Enterprise Gateway's R launcher that the Python launcher does
not know; taken out before its parser runs.
"""
UNENCRYPTED = "IRkernel cannot encrypt its channels (it has no CurveZMQ support)"

sys.path.insert(
    0,
    os.environ.get(LAUNCHER_DIR_ENV)
    or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"),
)
import launch_ipykernel as base  # noqa: E402
import kernel_handshake  # noqa: E402

LOG = base.LOG


def launcher_arguments(raw: str) -> list[str]:
    """
    The R launcher's arguments (a JSON list of strings), without the
    options only R uses.
    """
    try:
        argv = json.loads(raw)
    except ValueError:
        raise base.LaunchFailed(f"{ARGV_ENV} is not a JSON list") from None
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise base.LaunchFailed(f"{ARGV_ENV} is not a JSON list of strings")
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in R_ONLY_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(option + "=" for option in R_ONLY_OPTIONS)):
            kept.append(arg)
    return kept


def main() -> int:
    level = os.environ.get("LOG_LEVEL", os.environ.get("EG_LOG_LEVEL", "INFO"))
    import logging

    logging.basicConfig(
        format="[%(levelname)1.1s %(asctime)s irkernel_handshake] %(message)s",
        level=int(level) if level.isdigit() else level.upper(),
        stream=sys.stderr,
    )
    try:
        kernel_pid = int(os.environ.get(KERNEL_PID_ENV, ""))
    except ValueError:
        LOG.error("%s is not set to the R process's pid", KERNEL_PID_ENV)
        return 1
    try:
        args = base.parse_arguments(launcher_arguments(os.environ.get(ARGV_ENV, "[]")))
        print(kernel_handshake.start(args, kernel_pid, UNENCRYPTED), flush=True)
        return 0
    except base.LaunchFailed as e:
        LOG.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
