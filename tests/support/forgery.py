"""
What an attacker on a kernel host does to a pending remote launch, for the
SSH and Slurm handshake tests: forge version 1 connection info from the
kernel id and public key (both visible on the host while the kernel
launches) and send it from a chosen network namespace; and a gate that
holds a kernel-side launcher back until the test has sent its forgeries, so
the forgery deterministically arrives first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Callable, Sequence

from twisted.internet.threads import deferToThread

from egateway.clusters.handshake import encode_v1
from egateway.clusters.interface import Phase
from tests.support.polling import eventually

SENDER = r"""
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
with socket.create_connection((host.strip("[]"), int(port)), timeout=10) as s:
    s.sendall(sys.argv[2].encode())
    s.shutdown(socket.SHUT_WR)
    s.settimeout(20)
    answer = b""
    while True:
        chunk = s.recv(100)
        if not chunk:
            break
        answer += chunk
print(answer.decode().strip() or "(no answer)")
"""
"""
Sends one payload as a launcher does and prints the gateway's answer.
"""

GATE = 'read go <"$0"; exec "$@"'
"""
C{sh -c GATE fifo argv...}: wait until the test writes a line to the FIFO,
then become C{argv}.
"""


def forged_v1(kernel_id: str, public_key: str) -> str:
    """
    Version 1 connection info for C{kernel_id} pointing at an attacker's
    ports, made from nothing but the kernel id and the public key.
    """
    info = {
        "kernel_id": kernel_id,
        "ip": "0.0.0.0",
        "transport": "tcp",
        "signature_scheme": "hmac-sha256",
        "key": "attacker",
        "shell_port": 40001,
        "iopub_port": 40002,
        "stdin_port": 40003,
        "control_port": 40004,
        "hb_port": 40005,
        "pid": 4242,
        "pgid": 4242,
    }
    return encode_v1(info, public_key).decode("ascii")


def run_here(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """
    Run C{argv} in the gateway's own network namespace.
    """
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)


async def send_from(run: Callable[[list[str]], Any], address: str, payload: str) -> str:
    """
    Send C{payload} to C{address} with C{run} (a blocking function running
    an argv where the attacker is: L{run_here}, or a fixture's C{run} on a
    host), in a thread so the gateway in this reactor can answer; returns
    the gateway's answer.
    """
    result = await deferToThread(run, [sys.executable, "-c", SENDER, address, payload])
    if result.returncode != 0:
        raise AssertionError(f"the sender failed: {result.stderr[-2000:]}")
    return result.stdout.strip()


class Gate:
    """
    A FIFO a gated launcher waits on (the file system is shared with the
    fixtures' hosts and nodes).
    """

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "gate")
        os.mkfifo(self.path)

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["sh", "-c", GATE, self.path, *argv]

    async def open(self) -> None:
        """
        Let the launcher go.  Opening the FIFO for writing waits for its
        reader, so this runs in a thread.
        """

        def write_blocking() -> None:
            with open(self.path, "w") as fifo:
                fifo.write("go\n")

        await deferToThread(write_blocking)


def placed_kernel(gateway: Any) -> Any:
    """
    The kernel of C{gateway} whose launch has reached the placed phase and
    still waits for its connection info, or C{None}.
    """
    for kernel in gateway.manager.kernels.values():
        phases = [event.phase for event in kernel.phases]
        if Phase.PLACED in phases and Phase.CONNECTION_INFO not in phases:
            return kernel
    return None


async def pending_launch(gateway: Any, timeout: float = 60) -> tuple[Any, Any]:
    """
    Wait until a launch of C{gateway} is placed and waiting for its
    connection info; returns the kernel and the gateway's response
    listener.
    """
    kernel = await eventually(lambda: placed_kernel(gateway), "a launch to be placed", timeout=timeout)
    listener = gateway.manager.launchers._context.services["response"]
    return kernel, listener


__all__ = ["Gate", "forged_v1", "pending_launch", "run_here", "send_from"]
