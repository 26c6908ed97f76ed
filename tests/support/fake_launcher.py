"""
A launcher built on the remote-launch skeleton whose "cluster" is this
machine and whose bookkeeping is in memory: its steps start the
kernelspec's kernel-side launcher as a child process (the launch token on
its stdin, as SSH and Slurm deliver it) and signal it by pid.  The launcher
contract runs against it, so the skeleton's sequence is held to the same
contract as the real launchers, and a new launcher has a small example of
exactly what it must supply.
"""

from __future__ import annotations

import os
import signal as signals
from typing import Any, Mapping

from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from egateway.clusters.interface import (
    IKernelProcess,
    LaunchError,
    LaunchRequest,
    LauncherContext,
    Liveness,
    Phase,
    Placement,
)
from egateway.clusters.remote import Placed, RemoteKernelProcess, RemoteLaunch, RemoteLauncher
from egateway.wire.channels import ConnectionInfo


class _Child(ProcessProtocol):
    def __init__(self, stdin: bytes) -> None:
        self.stdin = stdin
        self.output: list[bytes] = []
        self.ended: str | None = None

    def connectionMade(self) -> None:
        self.transport.write(self.stdin)
        self.transport.closeStdin()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if sum(map(len, self.output)) < 65536:
            self.output.append(data)

    def processEnded(self, reason: Failure) -> None:
        self.ended = str(reason.value)


class FakeCluster:
    """
    The in-memory cluster: child processes by pid.
    """

    def __init__(self) -> None:
        self.children: dict[int, _Child] = {}

    def alive(self, pid: int) -> bool:
        child = self.children.get(pid)
        return child is not None and child.ended is None

    def kill(self, pid: int, signum: int) -> None:
        if self.alive(pid):
            os.kill(pid, signum)

    def leftovers(self) -> list[int]:
        return [pid for pid in self.children if self.alive(pid)]


class FakeKernelProcess(RemoteKernelProcess):
    def __init__(self, *, cluster: FakeCluster, **kw: Any) -> None:
        super().__init__(**kw)
        self.cluster = cluster

    async def _check_alive(self) -> Liveness:
        if self.cluster.alive(self.placement.pid):
            return Liveness(True)
        return Liveness(False, f"process {self.placement.pid} is gone")

    async def _signal_directly(self, signum: int) -> None:
        self.cluster.kill(self.placement.pid, signum)

    async def _release(self) -> None:
        self.cluster.kill(self.placement.pid, signals.SIGKILL)

    def snapshot(self) -> dict:
        return {**super().snapshot(), "launcher": "fake"}


class FakeLauncher(RemoteLauncher):
    """
    Only steps: prepare, submit, await placement, launch ended, kernel,
    abandon (and restore, which is not part of the launch sequence).
    """

    name = "fake"

    def __init__(self, context: LauncherContext, cluster: FakeCluster) -> None:
        super().__init__(context)
        self.cluster = cluster

    async def _prepare(self, request: LaunchRequest) -> dict[str, Any]:
        return {}

    async def _submit(self, launch: RemoteLaunch) -> None:
        request = launch.request
        argv = self._launcher_argv(request, launch.listener, "")
        child = _Child(f"{launch.pending.token}\n".encode())
        env = {**request.env, "EG_LAUNCH_TOKEN_STDIN": "1"}
        transport = self._reactor.spawnProcess(child, argv[0], argv, env=env)
        self.cluster.children[transport.pid] = child
        launch.state["pid"] = transport.pid
        request.report(Phase.SUBMITTED, f"pid {transport.pid}")

    async def _await_placement(self, launch: RemoteLaunch) -> Placed:
        return Placed("localhost", "127.0.0.1", f"localhost pid {launch.state['pid']}")

    async def _launch_ended(self, launch: RemoteLaunch) -> str | None:
        child = self.cluster.children[launch.state["pid"]]
        if child.ended is None:
            return None
        output = b"".join(child.output).decode("utf-8", "replace").strip().splitlines()[-3:]
        return f"the kernel launcher exited before sending connection info: {' | '.join(output)}"

    def _kernel(
        self, launch: RemoteLaunch, placed: Placed, info: ConnectionInfo, payload: Mapping[str, Any]
    ) -> IKernelProcess:
        pid = launch.state["pid"]
        return FakeKernelProcess(
            cluster=self.cluster,
            placement=Placement(host=placed.host, ip=placed.address, pid=pid, pgid=pid),
            **self._kernel_arguments(launch, info, payload),
        )

    async def _abandon(self, launch: RemoteLaunch) -> None:
        pid = launch.state.get("pid")
        if pid is not None:
            self.cluster.kill(pid, signals.SIGKILL)

    async def _restore(self, kernel_id: str, snapshot: Mapping[str, Any]) -> IKernelProcess:
        arguments = self._restored_arguments(kernel_id, snapshot)
        pid = int(snapshot["pid"])
        if not self.cluster.alive(pid):
            raise LaunchError(f"kernel {kernel_id} is no longer running")
        placement = Placement(host=str(snapshot["host"]), ip=arguments["info"].ip, pid=pid, pgid=pid)
        return FakeKernelProcess(cluster=self.cluster, placement=placement, **arguments)

    def stop(self) -> None:
        pass


__all__ = ["FakeCluster", "FakeLauncher"]
