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
where the launch token is when C{EG_LAUNCH_TOKEN_STDIN=1}.  It:

 1. parses Enterprise Gateway's arguments as the Python launcher does;
 2. picks five free ports (in the port range) and writes the connection
    file, and binds the comm port;
 3. forks the comm listener, detached from R's output capture, which waits
    until IRkernel listens on all five ports (so, as with the Python
    launcher, the gateway never hears of ports the kernel failed to get),
    then sends the connection info (with the R process's pid and process
    group) and serves the comm port until the R process ends, which it
    sees through a pidfd however R ends.  If the gateway refuses the
    payload it stops the R process;
 4. prints the connection file's path and exits.

IRkernel has no CurveZMQ support, so its channels are signed, not
encrypted, and a version 2 payload says so (C{encryption_reason}).
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time

LAUNCHER_DIR_ENV = "EG_PYTHON_LAUNCHER_DIR"
ARGV_ENV = "EG_LAUNCHER_ARGV"
KERNEL_PID_ENV = "EG_KERNEL_PID"
BIND_TIMEOUT = 120.0
"""
Seconds the listener waits for IRkernel to bind its ports (R's start-up
and package loading included).
"""
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


def listening_ports() -> set[int]:
    """
    The TCP ports something listens on in this network namespace.
    """
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == "0A":
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports


def wait_for_bind(ports: list[int], kernel_gone_fd: int, timeout: float = BIND_TIMEOUT) -> None:
    """
    Return once all C{ports} listen.

    @raise base.LaunchFailed: the kernel ended first, or took too long.
    """
    deadline = time.monotonic() + timeout
    while not set(ports) <= listening_ports():
        if select.select([kernel_gone_fd], [], [], 0.05)[0]:
            raise base.LaunchFailed("the R kernel ended before binding its ports")
        if time.monotonic() > deadline:
            raise base.LaunchFailed(f"the R kernel did not bind its ports {ports} within {timeout:g}s")


def report_and_serve(args, info: dict, kernel_pid: int, kernel_gone_fd: int, comm_socket, key) -> int:
    """
    The comm listener's process: send the connection info once IRkernel
    listens, then serve the comm port until the kernel ends.
    """
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        ports = [info[name] for name in ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")]
        wait_for_bind(ports, kernel_gone_fd)
        info.update(pid=kernel_pid, pgid=os.getpgid(kernel_pid), comm_port=comm_socket.getsockname()[1],
                    kernel_id=args.kernel_id)
        if args.launch_token:
            info["encryption_reason"] = UNENCRYPTED
        if args.response_address:
            payload = base.encrypt_payload(info, args.public_key, args.launch_token)
            base.send_connection_info(args.response_address, payload, args.response_ca, args.response_server_name)
            LOG.info("connection info sent to %s", args.response_address)
        base.CommListener(comm_socket, kernel_pid, kernel_gone_fd, key, "none").serve()
        return 0
    except base.LaunchFailed as e:
        LOG.error("%s; stopping the R kernel", e)
        try:
            os.kill(kernel_pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        return 1
    except BaseException:
        LOG.exception("the R kernel's comm listener failed")
        return 1
    finally:
        import logging

        logging.shutdown()


def start(args, kernel_pid: int) -> str:
    """
    Write the connection file, fork the listener; the file's path.
    """
    if args.kernel_encryption == "required":
        raise base.LaunchFailed(f"--kernel-encryption required, but {UNENCRYPTED}")
    low, high = base.parse_port_range(args.port_range)
    if args.response_address:
        base.parse_address(args.response_address)
        base.load_public_key(args.public_key)
    try:
        kernel_gone_fd = os.pidfd_open(kernel_pid)
    except (AttributeError, OSError) as e:
        raise base.LaunchFailed(f"cannot watch the R process {kernel_pid}: {e}") from None
    comm_socket = base.bind_in_range(args.ip, low, high, set())
    # IRkernel cannot bind port 0 and report what it got: ports are chosen first.
    ports = base.probe_ports(args.ip, low, high, {comm_socket.getsockname()[1]})
    connection_file = base.connection_file_for(args.connection_file, args.kernel_id)
    base.write_connection_file(connection_file, args.ip, ports)
    with open(connection_file) as f:
        info = json.load(f)
    key = base.comm_key(args.launch_token, args.kernel_id) if args.launch_token else None
    if os.fork() == 0:
        status = 1
        try:
            # It stays in R's process group, so the gateway's group signals reach it too.
            if os.fork() == 0:
                # Not R's output capture: R waits for EOF on our stdout.
                devnull = os.open(os.devnull, os.O_RDWR)
                os.dup2(devnull, 0)
                os.dup2(2, 1)
                os.close(devnull)
                status = report_and_serve(args, info, kernel_pid, kernel_gone_fd, comm_socket, key)
            else:
                status = 0
        finally:
            os._exit(status)
    os.wait()
    comm_socket.close()
    os.close(kernel_gone_fd)
    return connection_file


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
        print(start(args, kernel_pid), flush=True)
        return 0
    except base.LaunchFailed as e:
        LOG.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
