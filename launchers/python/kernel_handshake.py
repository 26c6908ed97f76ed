"""
The handshake for kernels that are not ipykernel (IRkernel, Apache Toree),
shared by their launchers (C{launchers/R}, C{launchers/scala}): what
C{launch_ipykernel.py} does around its kernel, done beside a kernel that
cannot do it itself.

C{start} parses nothing itself: given the parsed arguments (as
C{launch_ipykernel.parse_arguments} makes them) and the pid of the process
that runs the kernel (or will, after an exec), it picks five free ports (in
the port range; these kernels cannot bind port 0 and report what they got),
writes the connection file, binds the comm port and forks the comm
listener, detached from the caller's output.  The listener waits until the
kernel listens on all five ports (so, as with the Python launcher, the
gateway never hears of ports the kernel failed to get), sends the
connection info (with the kernel's pid and process group) and serves the
comm port until the kernel process ends, which it sees through a pidfd
however it ends; then it removes the connection file.  If the gateway
refuses the payload it stops the kernel.

It lives beside C{launch_ipykernel.py} and imports it.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import time

import launch_ipykernel as base

LOG = base.LOG

BIND_TIMEOUT = 120.0
"""
Seconds the listener waits for the kernel to bind its ports (R's or the
JVM's start-up included).
"""


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
            raise base.LaunchFailed("the kernel ended before binding its ports")
        if time.monotonic() > deadline:
            raise base.LaunchFailed(f"the kernel did not bind its ports {ports} within {timeout:g}s")


def report_and_serve(args, info: dict, kernel_pid: int, kernel_gone_fd: int, comm_socket, key, unencrypted: str,
                     connection_file: str) -> int:
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
            info["encryption_reason"] = unencrypted
        if args.response_address:
            payload = base.encrypt_payload(info, args.public_key, args.launch_token)
            base.send_connection_info(args.response_address, payload, args.response_ca, args.response_server_name)
            LOG.info("connection info sent to %s", args.response_address)
        base.CommListener(comm_socket, kernel_pid, kernel_gone_fd, key, "none").serve()
        return 0
    except base.LaunchFailed as e:
        LOG.error("%s; stopping the kernel", e)
        try:
            os.kill(kernel_pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        return 1
    except BaseException:
        LOG.exception("the kernel's comm listener failed")
        return 1
    finally:
        # The kernel has ended (or never will report): its connection file goes.
        base._remove(connection_file)
        logging.shutdown()


def start(args, kernel_pid: int, unencrypted: str) -> str:
    """
    Write the connection file for the kernel that process C{kernel_pid}
    runs (or is about to become, through exec), fork the listener; the
    file's path.  C{unencrypted} says why the kernel's channels cannot be
    encrypted.
    """
    if args.kernel_encryption == "required":
        raise base.LaunchFailed(f"--kernel-encryption required, but {unencrypted}")
    low, high = base.parse_port_range(args.port_range)
    if args.response_address:
        base.parse_address(args.response_address)
        base.load_public_key(args.public_key)
    try:
        kernel_gone_fd = os.pidfd_open(kernel_pid)
    except (AttributeError, OSError) as e:
        raise base.LaunchFailed(f"cannot watch the R process {kernel_pid}: {e}") from None
    comm_socket = base.bind_in_range(args.ip, low, high, set())
    # The kernel cannot bind port 0 and report what it got: ports are chosen first.
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
                status = report_and_serve(
                    args, info, kernel_pid, kernel_gone_fd, comm_socket, key, unencrypted, connection_file
                )
            else:
                status = 0
        finally:
            os._exit(status)
    os.wait()
    comm_socket.close()
    os.close(kernel_gone_fd)
    return connection_file
