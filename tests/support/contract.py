"""
The launcher contract as a test mixin: every launcher (local, SSH, Slurm,
...) runs these tests against its real back end.

A test case mixes in L{LauncherContract} with C{trial.unittest.TestCase}
and provides:

  - C{async def make_launcher()} returning the launcher under test;
  - C{make_request(kernel_id, spec_name="working")} returning a
    L{LaunchRequest} for a kernelspec that starts a real ipykernel;
  - C{broken_request(kernel_id)}: a request whose kernel dies at once;
  - C{async def leftovers(placement)}: processes (or jobs) of that kernel
    still alive on the back end, as a list (empty when all is gone).
"""

from __future__ import annotations

import json
import signal
import uuid
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from egateway.clusters.interface import ExitStatus, IKernelProcess, LaunchError, LaunchRequest, Phase
from egateway.wire.link import KernelLink
from egateway.wire.protocol import Message, WireError


def request_for(kernel_id: str, spec: Any, env: dict[str, str] | None = None, timeout: float = 30) -> tuple[LaunchRequest, list]:
    """
    A launch request and the list its phases are reported into.
    """
    phases: list = []
    request = LaunchRequest(
        kernel_id=kernel_id,
        spec=spec,
        env={"KERNEL_ID": kernel_id, "PATH": "/usr/bin:/bin", **(env or {})},
        config=spec.launcher_config,
        username="tester",
        report=lambda phase, detail: phases.append((phase, detail)),
        timeout=timeout,
    )
    return request, phases


class KernelProbe:
    """
    Talks to a launched kernel over real ZMQ, as the manager would.
    """

    def __init__(self, process: IKernelProcess) -> None:
        from egateway.wire.zmq import ZmqChannelFactory

        self.channels = ZmqChannelFactory(reactor)
        self.iopub: list[Message] = []
        self.link = KernelLink(process.connection_info, self.channels, reactor, self.iopub.append)

    async def ready(self, timeout: float = 30) -> Message:
        deadline = reactor.seconds() + timeout
        while True:
            try:
                reply = await self.link.request("shell", "kernel_info_request", {}, 1.0)
            except Exception:
                if reactor.seconds() > deadline:
                    raise
                continue
            if self.link.iopub_seen:
                return reply
            await deferLater(reactor, 0.05, lambda: None)

    async def execute(self, code: str, timeout: float = 30) -> dict[str, Any]:
        content = {"code": code, "silent": False, "store_history": False, "user_expressions": {}, "allow_stdin": False}
        reply = await self.link.request("shell", "execute_request", content, timeout)
        return reply.content()

    def close(self) -> None:
        self.link.close()
        self.channels.close()


class LauncherContract:
    timeout = 120

    async def make_launcher(self) -> Any:
        raise NotImplementedError()

    def make_request(self, kernel_id: str, spec_name: str = "working") -> tuple[LaunchRequest, list]:
        raise NotImplementedError()

    def broken_request(self, kernel_id: str) -> tuple[LaunchRequest, list]:
        raise NotImplementedError()

    async def leftovers(self, process: IKernelProcess) -> list:
        raise NotImplementedError()

    launch_is_pending = True
    """
    Whether C{launch} returns before the kernel reports (remote launchers);
    only then can a launch in progress be cancelled.
    """

    async def launched(self) -> tuple[Any, IKernelProcess, list, KernelProbe]:
        launcher = await self.make_launcher()
        kernel_id = str(uuid.uuid4())
        request, phases = self.make_request(kernel_id)
        d = launcher.launch(request)
        d.addTimeout(60, reactor)
        process = await d
        self.addCleanup(self._discard, process)
        probe = KernelProbe(process)
        self.addCleanup(probe.close)
        await probe.ready()
        process.ready()
        return launcher, process, phases, probe

    async def _discard(self, process: IKernelProcess) -> None:
        await process.terminate(3)
        await process.cleanup()

    async def test_launch_reports_connection_and_placement(self) -> None:
        """
        A launch fires with connection info the gateway can use, a placement
        naming the host and pid, and the phases it passed through.
        """
        _, process, phases, probe = await self.launched()
        reply = await probe.execute("6 * 7")
        self.assertEqual(reply["status"], "ok")
        self.assertTrue(process.placement.pid)
        self.assertTrue(process.placement.host)
        reached = [phase for phase, _ in phases]
        self.assertIn(Phase.SUBMITTED, reached)
        self.assertIn(Phase.CONNECTION_INFO, reached)
        self.assertEqual(reached.index(Phase.CONNECTION_INFO), len(reached) - 1)

    async def assert_no_leftovers(self, process: Any, timeout: float = 15.0) -> None:
        """
        Nothing of C{process} is left on its host, within C{timeout} seconds:
        a killed kernel's session processes take a moment to exit under load.
        """
        deadline = reactor.seconds() + timeout
        left = await self.leftovers(process)
        while left and reactor.seconds() < deadline:
            await deferLater(reactor, 0.2, lambda: None)
            left = await self.leftovers(process)
        self.assertEqual(left, [])

    async def test_poll_signal_terminate(self) -> None:
        """
        poll says alive; SIGINT interrupts a running cell; terminate ends the
        kernel, when_exited fires, poll says gone, nothing is left.
        """
        _, process, _, probe = await self.launched()
        self.assertTrue((await process.poll()).alive)
        running = Deferred.fromCoroutine(probe.execute("import time; time.sleep(60)", timeout=30))
        await deferLater(reactor, 1.0, lambda: None)
        await process.signal(signal.SIGINT)
        reply = await running
        self.assertEqual(reply.get("ename"), "KeyboardInterrupt")
        exited = process.when_exited()
        status = await process.terminate(5)
        self.assertIsInstance(status, ExitStatus)
        # The gateway's own stop is never an outside decision.
        self.assertFalse(status.decision)
        self.assertIsInstance(await exited, ExitStatus)
        self.assertFalse((await process.poll()).alive)
        await process.cleanup()
        await process.cleanup()
        await self.assert_no_leftovers(process)

    async def test_snapshot_and_restore(self) -> None:
        """
        A JSON round trip of the snapshot lets a fresh launcher reattach: the
        restored kernel answers and can be stopped through it.
        """
        _, process, _, probe = await self.launched()
        await probe.execute("x = 41")
        snapshot = json.loads(json.dumps(process.snapshot()))
        process.detach()
        self.assertTrue((await process.poll()).alive, "detaching stopped the kernel")
        other = await self.make_launcher()
        restored = await other.restore(process.kernel_id, snapshot)
        self.assertEqual(restored.connection_info, process.connection_info)
        self.assertTrue((await restored.poll()).alive)
        second = KernelProbe(restored)
        self.addCleanup(second.close)
        await second.ready()
        reply = await second.execute("x + 1")
        self.assertEqual(reply["status"], "ok")
        await restored.terminate(5)
        await restored.cleanup()
        self.assertFalse((await process.poll()).alive)
        await self.assert_no_leftovers(process)

    async def test_failed_launch_leaves_nothing(self) -> None:
        """
        A kernel that dies at once either fails the launch or exits at once;
        either way cleanup leaves nothing behind.
        """
        launcher = await self.make_launcher()
        request, _ = self.broken_request(str(uuid.uuid4()))
        d = launcher.launch(request)
        d.addTimeout(60, reactor)
        try:
            process = await d
        except LaunchError:
            return
        status = await process.when_exited()
        self.assertIsInstance(status, ExitStatus)
        await process.cleanup()
        await self.assert_no_leftovers(process)

    async def test_cancelled_launch_leaves_nothing(self) -> None:
        """
        Cancelling a launch in progress (what the manager does on timeout)
        removes what it started.
        """
        if not self.launch_is_pending:
            return
        launcher = await self.make_launcher()
        request, phases = self.make_request(str(uuid.uuid4()))
        d = launcher.launch(request)
        while Phase.PLACED not in [p for p, _ in phases]:
            await deferLater(reactor, 0.05, lambda: None)
            self.assertFalse(d.called, "the launch finished before it could be cancelled")
        d.cancel()
        with self.assertRaises(Exception):
            await d
        await deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(await self.placed_leftovers(phases), [])

    async def placed_leftovers(self, phases: list) -> list:
        """
        What remains of a launch cancelled after it was placed (the phase
        detail names where).
        """
        raise NotImplementedError()


__all__ = ["LauncherContract", "KernelProbe", "request_for", "WireError"]
