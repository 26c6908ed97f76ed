"""
The kernel manager's lifecycle logic, driven by a Clock over fake launchers
and fake kernels.  The same behaviours are exercised with real ipykernel
kernels in test_integration.
"""

from __future__ import annotations

import dataclasses
import signal
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from egateway.clusters.interface import ExitStatus, LaunchError
from egateway.errors import BadRequest, Conflict, LimitReached, NotFound
from egateway.kernels.culling import Culler
from egateway.config import CullingConfig, KernelsConfig
from egateway.kernels.admission import Admission
from egateway.kernels.launching import LaunchFailed, LaunchTimedOut
from egateway.kernels.state import KernelState
from tests.support.fakes import RecordingClient, fake_spec, make_manager


def start(manager, name=None, env=None) -> Deferred:
    return Deferred.fromCoroutine(manager.start_kernel(name, env))


def shown_states(client: RecordingClient) -> list[str]:
    """
    The statuses JupyterLab acts on: not those answering a
    C{kernel_info_request} (jupyter_server's C{untracked_message_types}).
    """
    return [
        m.content()["execution_state"]
        for channel, m in client.messages
        if channel == "iopub"
        and m.msg_type == "status"
        and m.parent_header().get("msg_type") != "kernel_info_request"
    ]


class LaunchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.manager, self.launcher, self.channels = make_manager(self.clock)

    def test_ready_after_kernel_info(self) -> None:
        """
        A launch fires once the kernel answered kernel_info, with every phase
        recorded and the launcher told the kernel is ready.
        """
        kernel = self.successResultOf(start(self.manager))
        self.assertEqual(kernel.state, KernelState.RUNNING)
        self.assertEqual(
            [event.phase.value for event in kernel.phases],
            ["queued", "submitted", "connection info received", "connected", "ready"],
        )
        self.assertTrue(self.launcher.processes[0].is_ready)
        self.assertEqual(kernel.execution_state, "idle")
        self.assertIn(kernel.id, self.manager.kernels)

    def test_unknown_kernelspec(self) -> None:
        """
        Asking for a kernelspec that does not exist is a 404, and nothing is
        launched.
        """
        failure = self.failureResultOf(start(self.manager, "nope"), NotFound)
        self.assertIn("nope", str(failure.value))
        self.assertEqual(self.launcher.processes, [])

    def test_malformed_env(self) -> None:
        """
        An env that is not an object, or has a value with shell metacharacters,
        is a 400 and launches nothing.
        """
        self.failureResultOf(start(self.manager, env=["KERNEL_X"]), BadRequest)
        failure = self.failureResultOf(start(self.manager, env={"KERNEL_X": "$(id)"}), BadRequest)
        self.assertIn("KERNEL_X", str(failure.value))
        self.assertNotIn("$(id)", str(failure.value))
        self.failureResultOf(start(self.manager, env={"KERNEL_ID": "not-a-uuid"}), BadRequest)
        self.assertEqual(self.launcher.processes, [])

    def test_kernel_id_from_env(self) -> None:
        """
        A client may choose the kernel id with KERNEL_ID; a second kernel
        with the same id is a conflict.
        """
        kid = "0b5e3a0c-1d8e-4f55-9b9e-3f0e6c1a2b3c"
        kernel = self.successResultOf(start(self.manager, env={"KERNEL_ID": kid}))
        self.assertEqual(kernel.id, kid)
        self.failureResultOf(start(self.manager, env={"KERNEL_ID": kid}), Conflict)

    def test_environment_is_filtered(self) -> None:
        """
        The kernel gets KERNEL_* client values, allow-listed gateway variables
        and the gateway's own, never the whole gateway environment nor the
        auth token.
        """
        kernel = self.successResultOf(
            start(self.manager, env={"KERNEL_USERNAME": "alice", "KERNEL_FOO": "1", "NOT_KERNEL": "x"})
        )
        env = kernel.env
        self.assertEqual(env["KERNEL_USERNAME"], "alice")
        self.assertEqual(env["KERNEL_FOO"], "1")
        self.assertEqual(env["KERNEL_ID"], kernel.id)
        self.assertEqual(env["KERNEL_GATEWAY"], "1")
        self.assertEqual(env["PATH"], "/usr/bin")
        self.assertNotIn("NOT_KERNEL", env)
        self.assertNotIn("EG_AUTH_TOKEN", env)
        self.assertNotIn("OTHER", env)
        self.assertEqual(kernel.username, "alice")

    def test_max_kernels_counts_launches_in_progress(self) -> None:
        """
        With max_kernels=2 and two launches still in progress, a third request
        is refused at once with 403, and the first two still complete.
        """
        self.manager, self.launcher, _ = make_manager(self.clock, max_kernels=2)
        self.launcher.hold = True
        first, second = start(self.manager), start(self.manager)
        failure = self.failureResultOf(start(self.manager), LimitReached)
        self.assertEqual(failure.value.status, 403)
        self.assertIn("2", str(failure.value))
        self.launcher.release()
        self.launcher.release()
        self.successResultOf(first)
        self.successResultOf(second)

    def test_launches_are_independent(self) -> None:
        """
        A launch that is stuck does not delay another one.
        """
        self.launcher.hold = True
        stuck = start(self.manager)
        self.launcher.hold = False
        quick = start(self.manager)
        self.successResultOf(quick)
        self.assertNoResult(stuck)
        self.clock.advance(31)
        self.failureResultOf(stuck, LaunchTimedOut)

    def test_launch_timeout_names_the_phase_and_cancels(self) -> None:
        """
        A launch that does not produce a kernel in time fails with 504, a
        message naming the wait and the last phase, and the launcher's work is
        cancelled; the kernel is no longer listed.
        """
        self.launcher.hold = True
        d = start(self.manager)
        self.clock.advance(29)
        self.assertNoResult(d)
        self.clock.advance(2)
        failure = self.failureResultOf(d, LaunchTimedOut)
        self.assertEqual(failure.value.status, 504)
        self.assertIn("timed out after 30 s", str(failure.value))
        self.assertIn("last phase: submitted (fake job 1)", str(failure.value))
        self.assertEqual(len(self.launcher.cancelled), 1)
        self.assertEqual(self.manager.kernels, {})

    def test_client_launch_timeout(self) -> None:
        """
        A start request's KERNEL_LAUNCH_TIMEOUT replaces launch_timeout (as
        in Enterprise Gateway), cut to max_launch_timeout; one that is not a
        positive number is a 400 and nothing starts.
        """
        self.manager.settings = KernelsConfig(launch_timeout=30, max_launch_timeout=100)
        self.launcher.hold = True
        for asked, waited in (("5", 5), ("3600", 100)):
            d = start(self.manager, env={"KERNEL_LAUNCH_TIMEOUT": asked})
            self.clock.advance(waited - 0.5)
            self.assertNoResult(d)
            self.clock.advance(1)
            self.assertIn(f"timed out after {waited} s", str(self.failureResultOf(d, LaunchTimedOut).value))
        for bad in ("soon", "0", "-3", "nan", "inf"):
            failure = self.failureResultOf(start(self.manager, env={"KERNEL_LAUNCH_TIMEOUT": bad}), BadRequest)
            self.assertIn("KERNEL_LAUNCH_TIMEOUT", str(failure.value))
        self.assertEqual(len(self.launcher.cancelled), 2)
        self.assertEqual(self.manager.kernels, {})

    def test_kernel_info_timeout_removes_the_process(self) -> None:
        """
        A kernel that never answers kernel_info times out; its process is
        terminated and cleaned up and its sockets closed.
        """
        self.launcher.unresponsive = True
        d = start(self.manager)
        self.clock.advance(31)
        failure = self.failureResultOf(d, LaunchTimedOut)
        self.assertIn("kernel_info", str(failure.value))
        process = self.launcher.processes[0]
        self.assertTrue(process.exited)
        self.assertTrue(process.cleaned)
        self.assertEqual(self.channels.open_sockets(), [])
        self.assertEqual(self.manager.kernels, {})

    def slow_kernels(self, delay: float) -> list[Any]:
        """
        Kernels launched from now on answer every request C{delay} seconds
        after it arrives; returns the list their servers are added to (each
        with the times requests C{arrived}).
        """
        servers: list[Any] = []
        serve = self.channels.serve

        def slow(info: Any) -> Any:
            server = serve(info)
            handle = server.handle
            server.arrived = []

            def later(*args: Any) -> None:
                server.arrived.append(self.clock.seconds())
                self.clock.callLater(delay, handle, *args)

            server.handle = later
            servers.append(server)
            return server

        self.patch(self.channels, "serve", slow)
        return servers

    def kernel_info_sent(self, server: Any) -> list[Any]:
        return [m for channel, m in server.received if m.msg_type == "kernel_info_request"]

    def test_slow_kernel_ready_at_its_first_reply(self) -> None:
        """
        A kernel answering 2.5 s after each request (a loaded host, or a
        gateway restoring 1,000 kernels) is ready at its first reply: the
        probes sent meanwhile do not replace the first one, and go out
        after 1 s, then 2 s more (not every second).  Each probe used to be
        dropped after a second, so such a kernel never matched a reply and
        was sent one a second until the launch timed out.
        """
        servers = self.slow_kernels(2.5)
        d = start(self.manager)
        self.clock.pump([0.5] * 6)
        kernel = self.successResultOf(d)
        self.assertEqual(kernel.state, KernelState.RUNNING)
        ready = [e.at for e in kernel.phases if e.phase.value == "ready"]
        self.assertEqual(len(ready), 1)
        self.assertAlmostEqual(ready[0] - kernel.started, 2.5, delta=0.15)
        self.assertEqual(servers[0].arrived, [kernel.started, kernel.started + 1])

    def test_probe_socket_released_once_ready(self) -> None:
        """
        Once ready, a kernel keeps only its iopub subscription open to the
        gateway (the shell socket of the readiness probe costs about 35 kB
        and two descriptors a kernel and would be idle): the next request
        of the gateway's own opens a shell socket again, and is answered.
        """
        kernel = self.successResultOf(start(self.manager))
        self.assertEqual([s.channel for s in self.channels.open_sockets()], ["iopub"])
        reply = self.successResultOf(kernel.link.request("shell", "kernel_info_request", {}, 5))
        self.assertEqual(reply.msg_type, "kernel_info_reply")
        self.assertEqual(sorted(s.channel for s in self.channels.open_sockets()), ["iopub", "shell"])

    def test_unanswered_probes_back_off(self) -> None:
        """
        A kernel that never answers is probed at 0, 1, 3, 7, 15 and 23 s
        (the wait doubling up to 8 s) until the 30 s launch timeout: 6
        probes, not 30.
        """
        self.launcher.unresponsive = True
        d = start(self.manager)
        self.clock.pump([0.5] * 62)
        self.failureResultOf(d, LaunchTimedOut)
        server = self.launcher.processes[0].server
        self.assertEqual(len(self.kernel_info_sent(server)), 6)

    def test_probe_timing_out_still_answers(self) -> None:
        """
        A kernel that drops the first probes (it was not listening yet) is
        ready once it answers a later one.
        """
        self.launcher.unresponsive = True
        d = start(self.manager)
        self.clock.pump([1, 1])
        self.assertNoResult(d)
        server = self.launcher.processes[0].server
        server.responsive = True
        self.clock.advance(1)
        kernel = self.successResultOf(d)
        self.assertEqual(kernel.state, KernelState.RUNNING)
        self.assertEqual(len(self.kernel_info_sent(server)), 3)

    def test_early_exit_fails_the_launch(self) -> None:
        """
        A kernel process that dies before answering fails the launch with how
        it ended, and is cleaned up.
        """
        self.launcher.unresponsive = True
        d = start(self.manager)
        process = self.launcher.processes[0]
        process.exit(ExitStatus(code=1, reason="exited with code 1: ModuleNotFoundError: ipykernel"))
        failure = self.failureResultOf(d, LaunchFailed)
        self.assertIn("ModuleNotFoundError", str(failure.value))
        self.assertTrue(process.cleaned)

    def test_launcher_error_is_reported(self) -> None:
        """
        A launcher's own error reaches the client with its status and the
        last phase.
        """
        self.launcher.fail_with = LaunchError("no host reachable", status=503)
        failure = self.failureResultOf(start(self.manager), LaunchFailed)
        self.assertEqual(failure.value.status, 503)
        self.assertIn("no host reachable; last phase: queued", str(failure.value))

    def test_shutdown_during_launch_cancels_it(self) -> None:
        """
        Deleting a kernel that is still launching cancels the launch; the
        request that started it is told so.
        """
        self.launcher.hold = True
        d = start(self.manager)
        kernel_id = next(iter(self.manager.kernels))
        self.successResultOf(self.manager.shutdown(kernel_id))
        self.assertEqual(self.launcher.cancelled, [kernel_id])
        failure = self.failureResultOf(d, LaunchFailed)
        self.assertIn("shut down while launching", str(failure.value))
        self.assertEqual(self.manager.kernels, {})


class BusyRestoreTests(SynchronousTestCase):
    """
    A kernel reattached (a gateway restarted, or attaching on demand) while
    a cell runs on its shell is ready once its control channel answers.
    """

    def setUp(self) -> None:
        from egateway.kernels.persistence import record_of
        from egateway.wire.protocol import Message

        self.clock = Clock()
        self.manager, self.launcher, _ = make_manager(self.clock)
        kernel = self.successResultOf(start(self.manager))
        self.server = self.launcher.processes[0].server
        self.cell = Message.build("execute_request", {"code": "train()"}, "a-client").header
        self.server.run_cell(self.cell)
        # The gateway that held it is gone; this one finds its record.
        self.record = record_of(kernel, "gateway")
        self.spec = kernel.spec
        kernel.set_link(None)
        del self.manager.kernels[kernel.id]

    def restore(self) -> Deferred:
        return Deferred.fromCoroutine(self.manager.restore_kernel(self.record, self.spec))

    def restore_busy(self) -> Any:
        """
        Restore it: control answers at once, shell (busy) does not, and the
        grace shell is given runs out.
        """
        from egateway.kernels.launching import SHELL_GRACE

        restoring = self.restore()
        self.assertNoResult(restoring)
        self.clock.advance(SHELL_GRACE)
        return self.successResultOf(restoring)

    def test_ready_and_busy_while_a_cell_runs(self) -> None:
        """
        Restored while a cell runs: running and busy, though shell has not
        answered; the cell's own idle makes it idle, and the shell probe
        answered after it does not make it busy again.
        """
        kernel = self.restore_busy()
        self.assertEqual((kernel.state, kernel.execution_state), (KernelState.RUNNING, "busy"))
        probes = [channel for channel, m in self.server.received[-2:] if m.msg_type == "kernel_info_request"]
        self.assertEqual(probes, ["shell", "control"])
        seen: list[str] = []
        kernel.on_iopub_observers.append(lambda message: seen.append(kernel.execution_state))
        self.server.end_cell()
        self.assertEqual(seen, ["idle", "idle", "idle"])

    def test_control_statuses_are_not_the_kernels_state(self) -> None:
        """
        The statuses the kernel publishes about a control request (the
        probe's, a client's) while a cell runs leave the kernel busy; a
        client gets those about its own request, not the probe's.
        """
        from egateway.wire.protocol import Message

        kernel = self.restore_busy()
        client = RecordingClient()
        session = kernel.attach(client, "a-session")
        asked = Message.build("kernel_info_request", {}, "a-client")
        session.send("control", asked)
        self.assertEqual(kernel.execution_state, "busy")
        parents = [m.parent_header().get("msg_id") for _, m in client.messages if m.msg_type == "status"]
        self.assertEqual(parents, [asked.msg_id, asked.msg_id])
        self.assertEqual([c for c, m in client.messages if m.msg_type == "kernel_info_reply"], ["control"])

    def test_idle_kernel_answering_control_first(self) -> None:
        """
        An idle kernel whose shell answers a moment after its control is
        ready then, and idle; one that answers within the grace but after
        it, is idle once it has answered.
        """
        self.server.end_cell()
        self.server.holding = True  # shell holds the probe a moment...
        restoring = self.restore()
        self.assertNoResult(restoring)
        self.server.answer_held()  # ...then answers it
        self.assertEqual(self.successResultOf(restoring).execution_state, "idle")

    def test_idle_kernel_answering_shell_after_the_grace(self) -> None:
        """
        A kernel whose shell answers only after the grace is taken for
        busy, then is idle once the shell probe's statuses come; a client
        told busy meanwhile is told idle (by the gateway: Jupyter clients
        ignore statuses about a kernel_info_request).
        """
        self.server.end_cell()
        self.server.holding = True
        kernel = self.restore_busy()
        self.assertEqual(kernel.execution_state, "busy")
        client = RecordingClient()
        kernel.attach(client, "a-session")
        self.server.answer_held()
        self.assertEqual(kernel.execution_state, "idle")
        told = [
            m.content()["execution_state"] for _, m in client.messages if m.header["session"].startswith("egateway-")
        ]
        self.assertEqual(told, ["idle"])


class ShutdownTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.manager, self.launcher, self.channels = make_manager(
            self.clock, shutdown_wait=5, terminate_wait=5
        )
        self.kernel = self.successResultOf(start(self.manager))
        self.process = self.launcher.processes[0]

    def test_polite_shutdown(self) -> None:
        """
        A kernel that honours shutdown_request is never signalled.
        """
        d = self.manager.shutdown(self.kernel.id)
        control = [m.msg_type for ch, m in self.process.server.received if ch == "control"]
        self.assertEqual(control, ["shutdown_request"])
        self.clock.advance(0.1)
        self.successResultOf(d)
        self.assertEqual(self.process.signals, [])
        self.assertTrue(self.process.cleaned)
        self.assertEqual(self.manager.kernels, {})
        self.assertEqual(self.channels.open_sockets(), [])

    def test_escalation(self) -> None:
        """
        A hung kernel gets SIGTERM after the shutdown wait and SIGKILL after
        the terminate wait.
        """
        self.process.server.responsive = False
        self.process.ignores_term = True
        d = self.manager.shutdown(self.kernel.id)
        self.clock.advance(4.9)
        self.assertEqual(self.process.signals, [])
        self.clock.advance(0.2)
        self.assertEqual(self.process.signals, [signal.SIGTERM])
        self.clock.advance(5)
        self.assertEqual(self.process.signals, [signal.SIGTERM, signal.SIGKILL])
        self.successResultOf(d)
        self.assertTrue(self.process.cleaned)

    def test_clients_are_told(self) -> None:
        """
        Connected clients are closed with the reason the kernel went.
        """
        client = RecordingClient()
        self.kernel.attach(client)
        self.process.server.on_shutdown = lambda: self.process.exit(ExitStatus(code=0))
        self.successResultOf(self.manager.shutdown(self.kernel.id, reason="bye now"))
        self.assertEqual(client.gone, ["bye now"])
        self.assertEqual(self.kernel.connections, 0)

    def test_second_shutdown_observes_the_first(self) -> None:
        """
        Two shutdown requests share one shutdown.
        """
        self.process.server.responsive = False
        first = self.manager.shutdown(self.kernel.id)
        second = self.manager.shutdown(self.kernel.id)
        self.clock.advance(5.1)
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(self.process.signals.count(signal.SIGTERM), 1)

    def test_unknown_kernel(self) -> None:
        """
        Shutting down a kernel that does not exist is a 404.
        """
        self.assertRaises(NotFound, self.manager.shutdown, "0b5e3a0c-1d8e-4f55-9b9e-3f0e6c1a2b3c")


class RestartTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.manager, self.launcher, self.channels = make_manager(self.clock, restart_limit=2)
        self.kernel = self.successResultOf(start(self.manager))
        self.client = RecordingClient()
        self.attachment = self.kernel.attach(self.client, "session-1")

    def test_restart_keeps_id_and_clients(self) -> None:
        """
        A restart relaunches under the same id; the connected client stays
        attached, sees 'starting', and its messages sent meanwhile reach the
        new kernel.
        """
        from egateway.wire.protocol import Message

        self.launcher.hold = True
        d = self.manager.restart(self.kernel.id)
        self.clock.advance(0.1)
        self.assertEqual(self.kernel.state, KernelState.RESTARTING)
        self.assertIn({"execution_state": "starting", "reason": "restart requested"}, self.client.statuses())
        self.assertEqual(self.kernel.model()["execution_state"], "starting")
        self.attachment.send("shell", Message.build("execute_request", {"code": "1"}, "client"))
        self.launcher.release()
        kernel = self.successResultOf(d)
        self.assertIs(kernel, self.kernel)
        self.assertEqual(kernel.state, KernelState.RUNNING)
        self.assertEqual(kernel.restart_count, 1)
        new = self.launcher.processes[1]
        self.assertIn("execute_request", [m.msg_type for ch, m in new.server.received if ch == "shell"])
        self.assertIn("idle", [s["execution_state"] for s in self.client.statuses()])
        self.assertTrue(self.launcher.processes[0].cleaned)

    def test_requested_restart_is_not_reported_as_a_death(self) -> None:
        """
        A requested restart never sends 'restarting', which Jupyter clients
        read as "the kernel died and the server restarted it" (JupyterLab
        then shows its "appears to have died" dialog).
        """
        restarted = self.manager.restart(self.kernel.id)
        self.clock.advance(0.1)
        self.successResultOf(restarted)
        self.assertEqual(shown_states(self.client), ["starting", "idle"])

    def test_concurrent_restarts_coalesce(self) -> None:
        """
        A restart requested while one is in progress waits on it instead of
        restarting again.
        """
        self.launcher.hold = True
        first = self.manager.restart(self.kernel.id)
        self.clock.advance(0.1)
        second = self.manager.restart(self.kernel.id)
        self.launcher.release()
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(len(self.launcher.processes), 2)

    def test_auto_restart_after_death(self) -> None:
        """
        A kernel that dies is relaunched under the same id; its clients hear
        why.
        """
        self.launcher.processes[0].exit(ExitStatus(signal=9))
        self.assertEqual(self.kernel.state, KernelState.RUNNING)
        self.assertEqual(len(self.launcher.processes), 2)
        reasons = [s.get("reason", "") for s in self.client.statuses()]
        self.assertTrue(any("killed by signal 9 (SIGKILL)" in r for r in reasons), reasons)
        self.assertEqual(self.kernel.restart_count, 1)

    def test_idle_after_auto_restart(self) -> None:
        """
        After an automatic restart clients see 'restarting', then 'idle'
        once the new kernel is ready (JupyterLab otherwise shows the new
        kernel's 'starting' until a cell runs).
        """
        self.launcher.processes[0].exit(ExitStatus(signal=9))
        self.assertEqual(shown_states(self.client), ["restarting", "idle"])

    def test_idle_comes_after_the_new_kernel_starting(self) -> None:
        """
        The 'idle' that ends a restart comes after the new kernel's own
        'starting', even when that reaches iopub after the kernel_info reply
        (ipykernel 7 welcomes a subscriber on iopub first): JupyterLab shows
        the last status it tracks.
        """
        from egateway.wire.protocol import split_frames
        from tests.support.fakes import FakeKernelServer

        answer = FakeKernelServer.handle
        clock = self.clock

        def iopub_late(server: FakeKernelServer, channel: str, identity: bytes, frames: Any) -> None:
            _, message = split_frames(frames, server.signer)
            if message.msg_type != "kernel_info_request":
                return answer(server, channel, identity, frames)
            server.publish("iopub_welcome", {})
            server.reply(identity, channel, "kernel_info_reply", {"status": "ok"}, message)

            def published() -> None:
                server.publish("status", {"execution_state": "starting"})
                server.publish("status", {"execution_state": "busy"}, message.header)
                server.publish("status", {"execution_state": "idle"}, message.header)

            clock.callLater(0.02, published)

        self.patch(FakeKernelServer, "handle", iopub_late)
        self.launcher.processes[0].exit(ExitStatus(signal=9))
        self.clock.pump([0.01] * 20)
        self.assertEqual(self.kernel.state, KernelState.RUNNING)
        self.assertEqual(shown_states(self.client), ["restarting", "starting", "idle"])

    def test_resumed_client_hears_the_state(self) -> None:
        """
        A client reconnecting to its session is told the kernel's state
        after what it missed (JupyterLab otherwise shows 'Unknown' after a
        reconnect), unnumbered; a new session is not.
        """
        self.kernel.detach(self.attachment, self.client)
        back = RecordingClient()
        self.kernel.attach(back, "session-1")
        self.assertEqual(shown_states(back), ["idle"])
        self.assertEqual(back.seqs, [0])
        fresh = RecordingClient()
        self.kernel.attach(fresh, "session-2")
        self.assertEqual(fresh.messages, [])

    def test_resumed_client_while_restarting(self) -> None:
        """
        A client reconnecting while the kernel restarts (as JupyterLab does
        on 'restarting') hears nothing until the new kernel is ready, then
        'idle'.
        """
        self.launcher.hold = True
        self.launcher.processes[0].exit(ExitStatus(signal=9))
        self.kernel.detach(self.attachment, self.client)
        back = RecordingClient()
        self.kernel.attach(back, "session-1")
        self.assertEqual(shown_states(back), [])
        self.launcher.release()
        self.assertEqual(shown_states(back), ["idle"])

    def test_dead_when_restarts_run_out(self) -> None:
        """
        Past the restart limit the kernel is declared dead with the reason, and
        stays listed (until deleted or culled).
        """
        for n in range(3):
            self.launcher.processes[n].exit(ExitStatus(code=1))
        self.assertEqual(self.kernel.state, KernelState.DEAD)
        self.assertIn("restart limit (2) reached", self.kernel.reason)
        self.assertEqual(self.client.statuses()[-1]["execution_state"], "dead")
        self.assertIn(self.kernel.id, self.manager.kernels)
        self.assertEqual(self.kernel.model()["execution_state"], "dead")

    def test_outside_decision_is_not_undone(self) -> None:
        """
        A kernel its cluster's operator ended on purpose (a job cancelled, a
        pod deleted) is declared dead with the reason instead of being
        launched again, whatever restarts remain.
        """
        why = "Slurm job 12 on n1 was CANCELLED outside the gateway (signal 15)"
        self.launcher.processes[0].exit(ExitStatus(reason=why, decision=True))
        self.assertEqual(self.kernel.state, KernelState.DEAD)
        self.assertEqual(len(self.launcher.processes), 1)
        self.assertIn(why, self.kernel.reason)
        self.assertIn("not restarted", self.kernel.reason)
        self.assertEqual(self.client.statuses()[-1]["execution_state"], "dead")
        self.assertIn(why, self.client.statuses()[-1]["reason"])
        self.assertEqual(self.kernel.restart_count, 0)

    def test_failures_forgiven_when_stable(self) -> None:
        """
        Deaths far apart do not add up to the limit.
        """
        for n in range(4):
            self.launcher.processes[n].exit(ExitStatus(code=1))
            self.clock.advance(60)
        self.assertEqual(self.kernel.state, KernelState.RUNNING)


class InterruptTests(SynchronousTestCase):
    def test_signal_mode(self) -> None:
        """
        Interrupting a signal-mode kernel sends SIGINT to its process.
        """
        manager, launcher, _ = make_manager(Clock())
        kernel = self.successResultOf(start(manager))
        self.successResultOf(Deferred.fromCoroutine(manager.interrupt(kernel.id)))
        self.assertEqual(launcher.processes[0].signals, [signal.SIGINT])

    def test_alternate_signal(self) -> None:
        """
        EG_ALTERNATE_SIGINT in the kernelspec env picks another signal.
        """
        spec = fake_spec("alt", env={"EG_ALTERNATE_SIGINT": "SIGUSR2"})
        manager, launcher, _ = make_manager(Clock(), spec)
        kernel = self.successResultOf(start(manager, "alt"))
        self.successResultOf(Deferred.fromCoroutine(manager.interrupt(kernel.id)))
        self.assertEqual(launcher.processes[0].signals, [signal.SIGUSR2])

    def test_message_mode(self) -> None:
        """
        A message-mode kernel gets interrupt_request on control, no signal.
        """
        spec = fake_spec("msg", interrupt_mode="message")
        manager, launcher, _ = make_manager(Clock(), spec)
        kernel = self.successResultOf(start(manager, "msg"))
        self.successResultOf(Deferred.fromCoroutine(manager.interrupt(kernel.id)))
        process = launcher.processes[0]
        self.assertEqual(process.signals, [])
        self.assertIn("interrupt_request", [m.msg_type for ch, m in process.server.received if ch == "control"])


class CullingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.manager, self.launcher, _ = make_manager(self.clock)
        self.kernel = self.successResultOf(start(self.manager))
        self.process = self.launcher.processes[0]
        self.process.server.on_shutdown = lambda: self.process.exit(ExitStatus(code=0))

    def culler(self, running: bool = True, **settings) -> Culler:
        culler = Culler(self.manager, CullingConfig(cull_idle_timeout=600, cull_interval=60, **settings), self.clock)
        if running:
            culler.startService()
            self.addCleanup(culler.stopService)
        return culler

    def test_idle_kernel_culled_and_clients_told(self) -> None:
        """
        A kernel idle past the timeout is shut down at the next check, and its
        clients are told why first.
        """
        self.culler(cull_connected=True)
        client = RecordingClient()
        self.kernel.attach(client)
        self.clock.advance(600)
        self.assertIn(self.kernel.id, self.manager.kernels)
        self.clock.advance(60)
        self.assertNotIn(self.kernel.id, self.manager.kernels)
        self.assertTrue(client.statuses()[-1]["reason"].startswith("culled: idle for"))
        self.assertTrue(client.gone[0].startswith("culled"))

    def test_activity_postpones_culling(self) -> None:
        """
        Activity within the timeout keeps the kernel.
        """
        self.culler()
        self.clock.advance(590)
        self.kernel.touch()
        self.clock.advance(70)
        self.assertIn(self.kernel.id, self.manager.kernels)

    def test_connected_and_busy_kernels_kept_by_default(self) -> None:
        """
        Without cull_connected / cull_busy, connected or busy kernels stay.
        """
        culler = self.culler(running=False)
        client = RecordingClient()
        attachment = self.kernel.attach(client, "s")
        self.clock.advance(700)
        self.assertEqual(culler.reason_to_cull(self.kernel), "")
        self.kernel.detach(attachment, client)
        self.kernel.execution_state = "busy"
        self.assertEqual(culler.reason_to_cull(self.kernel), "")
        self.kernel.execution_state = "idle"
        self.assertNotEqual(culler.reason_to_cull(self.kernel), "")

    def test_cull_busy(self) -> None:
        """
        With cull_busy, a busy idle-for-long kernel is culled.
        """
        culler = self.culler(running=False, cull_busy=True)
        self.clock.advance(700)
        self.kernel.execution_state = "busy"
        self.assertIn("culled", culler.reason_to_cull(self.kernel))

    def test_dead_kernels_are_culled(self) -> None:
        """
        Dead kernels go at the next check regardless of the idle timeout.
        """
        self.manager, self.launcher, _ = make_manager(self.clock, restart_limit=0)
        kernel = self.successResultOf(start(self.manager))
        self.launcher.processes[0].exit(ExitStatus(code=1))
        self.assertEqual(kernel.state, KernelState.DEAD)
        self.culler()
        self.clock.advance(60)
        self.assertNotIn(kernel.id, self.manager.kernels)


class _HeldStore:
    """
    A kernel store whose writes wait until the test lets them finish.
    """

    shared = False

    def __init__(self) -> None:
        self.saving: list[Deferred] = []
        self.saved: list[str] = []

    def save_kernel(self, record) -> Deferred:
        d: Deferred = Deferred()
        self.saving.append(d)
        d.addCallback(lambda _: self.saved.append(record.kernel_id))
        return d

    def delete_kernel(self, kernel_id) -> Deferred:
        return Deferred()

    def journal_delete(self, kernel_id) -> Deferred:
        return Deferred()

    def finish(self) -> None:
        saving, self.saving = self.saving, []
        for d in saving:
            if not d.called:
                d.callback(None)


class CancellationTests(SynchronousTestCase):
    """
    Operations belong to the manager: a request that goes away, or an
    operation that is cancelled, never leaves a kernel half-done.
    """

    def setUp(self) -> None:
        from egateway.kernels.persistence import KernelPersistence

        self.clock = Clock()
        self.store = _HeldStore()

        def persistence(manager):
            persistence = KernelPersistence(lambda: self.store, False, manager, self.clock, "gw", "shutdown")
            persistence.store = self.store
            persistence.opened = True
            return persistence

        self.manager, self.launcher, _ = make_manager(self.clock, max_kernels=1, persistence=persistence)
        self.persistence = self.manager.persistence

    def test_client_gone_while_the_record_is_written(self) -> None:
        """
        A client that disconnects while its kernel's first record is being
        written does not leave that kernel launching for ever: the launch
        goes on and the kernel runs (and counts against max_kernels as a
        running kernel, not a stuck one).
        """
        request = start(self.manager)
        [kernel_id] = list(self.manager.kernels)
        request.cancel()
        self.failureResultOf(request)
        self.store.finish()
        kernel = self.manager.kernels[kernel_id]
        self.assertEqual(kernel.state, KernelState.RUNNING)
        shutdown = self.manager.shutdown(kernel_id)
        self.clock.advance(1)
        self.successResultOf(shutdown)
        self.assertEqual(self.manager.kernels, {})
        self.store.finish()
        again = start(self.manager)
        self.store.finish()
        self.successResultOf(again)

    def test_cancelled_admission_writes_nothing(self) -> None:
        """
        A launch cancelled while the store is still opening is not recorded
        afterwards (its cancellation is not swallowed by the wait).
        """
        starting = start(self.manager)
        self.store.finish()
        kernel = self.successResultOf(starting)
        self.store.saving.clear()
        self.persistence.opened = False
        self.persistence._opening = Deferred()
        admitting = Deferred.fromCoroutine(self.persistence.admit(kernel))
        admitting.cancel()
        self.failureResultOf(admitting, CancelledError)
        self.assertEqual(self.store.saving, [])

    def test_cancelled_operation_does_not_run_after_its_turn(self) -> None:
        """
        An operation cancelled while it waits for the one before it to end
        does not run its step once that one ends.
        """
        self.manager, self.launcher, _ = make_manager(self.clock)
        self.launcher.hold = True
        launching = start(self.manager)
        [kernel_id] = list(self.manager.kernels)
        kernel = self.manager.kernels[kernel_id]
        ran = []

        async def step(kernel):
            ran.append(kernel.id)

        queued = self.manager.start_operation(kernel, "test", step)
        queued.cancel()
        self.launcher.release()
        self.successResultOf(launching)
        self.assertEqual(ran, [])
        self.failureResultOf(queued.observe(), CancelledError)

    def test_unobserved_failure_is_logged(self) -> None:
        """
        An automatic restart that fails (nobody waits on it) leaves a log
        line with the error instead of vanishing.
        """
        self.manager, self.launcher, _ = make_manager(self.clock)
        kernel = self.successResultOf(start(self.manager))

        async def broken(kernel, status):
            raise RuntimeError("restart step broke")

        self.manager.restarts.auto_restart = broken
        self.launcher.processes[0].exit(ExitStatus(code=1))
        errors = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(len(errors), 1)
        self.assertIn("restart step broke", str(errors[0].value))
        self.assertIsNone(self.manager.current_operation(kernel.id))


class PendingPersistence:
    """
    A kernel store whose restore has not finished until the test says so.
    """

    keeps_kernels = False

    def __init__(self) -> None:
        from types import SimpleNamespace

        from egateway.observe import Operation

        self.store = SimpleNamespace(shared=False)
        self.restored: Deferred[None] = Deferred()
        self.restoring = Operation("restore", self.start())

    async def start(self) -> None:
        await self.restored

    async def stop(self) -> None:
        pass


class RestoringTests(SynchronousTestCase):
    """
    A restarted gateway answers HTTP a moment before it knows the kernels
    it restores from the store; jupyter_server's gateway client drops a
    kernel missing from the list (with the notebook open on it), so
    listings and lookups wait for the restore, for a bounded time.
    """

    kernel_id = "0b5e3a0c-1d8e-4f55-9b9e-3f0e6c1a2b3c"

    def setUp(self) -> None:
        from egateway.kernels.manager import RESTORE_WAIT

        self.wait = RESTORE_WAIT
        self.clock = Clock()
        self.persistence = PendingPersistence()
        self.manager, _, _ = make_manager(self.clock, persistence=lambda manager: self.persistence)
        self.listing = Deferred.fromCoroutine(self.manager.list_models())
        self.lookup = Deferred.fromCoroutine(self.manager.find(self.kernel_id))

    def test_wait_for_the_restore(self) -> None:
        """
        A listing and a lookup made while the store's kernels are restored
        answer once they are, with the restored kernel.
        """
        from types import SimpleNamespace

        self.assertNoResult(self.listing)
        self.assertNoResult(self.lookup)
        restored = SimpleNamespace(id=self.kernel_id, model=lambda: {"id": self.kernel_id})
        self.manager.kernels[self.kernel_id] = restored
        self.persistence.restored.callback(None)
        self.assertEqual(self.successResultOf(self.listing), [{"id": self.kernel_id}])
        self.assertIs(self.successResultOf(self.lookup), restored)

    def test_lookup_of_a_kernel_still_restoring(self) -> None:
        """
        A lookup of a kernel registered but still being restored (its
        model would say launching) waits for the restore too.
        """
        from types import SimpleNamespace

        restoring = SimpleNamespace(
            id=self.kernel_id, state=KernelState.LAUNCHING, pooled=False, model=lambda: {"id": self.kernel_id}
        )
        self.manager.kernels[self.kernel_id] = restoring
        lookup = Deferred.fromCoroutine(self.manager.find(self.kernel_id))
        self.assertNoResult(lookup)
        restoring.state = KernelState.RUNNING
        self.persistence.restored.callback(None)
        self.assertIs(self.successResultOf(lookup), restoring)
        self.assertEqual(self.successResultOf(self.listing), [{"id": self.kernel_id}])

    def test_bounded(self) -> None:
        """
        A restore that takes longer than the bound does not hold requests
        up: they answer with the kernels known so far.
        """
        self.clock.advance(self.wait)
        self.assertEqual(self.successResultOf(self.listing), [])
        self.failureResultOf(self.lookup, NotFound)


class AdmissionTests(SynchronousTestCase):
    """
    Admission hands the manager one typed, frozen decision, made against
    the kernels registered at that moment.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.manager, self.launcher, _ = make_manager(
            self.clock, max_kernels=1, launch_timeout=30, max_launch_timeout=100
        )

    def decide(self, env: dict[str, str]) -> Any:
        admission = self.manager.admission
        request = admission.check_request(None, env)
        spec = self.successResultOf(Deferred.fromCoroutine(admission.kernelspec(request)))
        return admission.decide(request, spec, None)

    def test_one_frozen_decision(self) -> None:
        """
        The decision names the kernel, whom it runs for, its environment,
        launcher and launch timeout; it cannot be changed, and deciding
        registers nothing.
        """
        decision = self.decide({"KERNEL_USERNAME": "alice", "KERNEL_LAUNCH_TIMEOUT": "50"})
        self.assertIsInstance(decision, Admission)
        self.assertEqual(
            (decision.username, decision.owner, decision.launcher_name, decision.timeout, decision.profile),
            ("alice", "alice", "fake", 50.0, None),
        )
        self.assertEqual(decision.env["KERNEL_ID"], decision.kernel_id)
        self.assertEqual(decision.env["KERNEL_USERNAME"], "alice")
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, decision, "owner", "mallory")
        self.assertEqual(self.manager.kernels, {})

    def test_counts_registered_kernels(self) -> None:
        """
        A decision made once max_kernels kernels are registered refuses.
        """
        self.successResultOf(start(self.manager))
        self.assertRaises(LimitReached, self.decide, {})


class FakeSharedPersistence:
    """
    Persistence on a store other gateways share, as far as leases and
    records go.
    """

    shared = True
    keeps_kernels = True
    instance_id = "here"
    restoring = None

    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self.store = self
        self.lease_holder = ""
        self.lease_tries = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def keep_all(self) -> None:
        pass

    async def admit(self, kernel: Any) -> None:
        pass

    def acquire_lease(self, kernel_id: str, holder: str, ttl: float) -> Deferred:
        from twisted.internet.defer import succeed

        self.lease_tries += 1
        if self.lease_holder in ("", holder):
            self.lease_holder = holder
            return succeed(True)
        return succeed(False)

    def release_lease(self, kernel_id: str, holder: str) -> Deferred:
        from twisted.internet.defer import succeed

        if self.lease_holder == holder:
            self.lease_holder = ""
        return succeed(None)

    def load_kernel(self, kernel_id: str) -> Deferred:
        from types import SimpleNamespace

        from twisted.internet.defer import succeed

        kernel = self.manager.kernels[kernel_id]
        return succeed(SimpleNamespace(restarts=kernel.restart_count, state="running", snapshot=kernel.process.snapshot()))


class ConstructionTests(SynchronousTestCase):
    """
    Persistence and sharing come in through the manager's constructor.
    """

    def test_factories(self) -> None:
        """
        The persistence factory is given the manager, the sharing factory
        the manager and that persistence; neither can be swapped afterwards,
        and a sharing factory may decline (a store of this gateway's alone).
        """
        from egateway.kernels.sharing import SharedKernels

        built: list[tuple[Any, ...]] = []

        def persistence(manager: Any) -> Any:
            built.append((manager,))
            return FakeSharedPersistence(manager)

        def sharing(manager: Any, persistence: Any) -> Any:
            built.append((manager, persistence))
            return SharedKernels(manager, persistence, Clock(), lease_ttl=10, journal_entries=0)

        manager, _, _ = make_manager(Clock(), persistence=persistence, sharing=sharing)
        self.assertEqual(built, [(manager,), (manager, manager.persistence)])
        self.assertIsInstance(manager.sharing, SharedKernels)
        self.assertRaises(AttributeError, setattr, manager, "persistence", None)
        self.assertRaises(AttributeError, setattr, manager, "sharing", None)
        alone, _, _ = make_manager(Clock(), persistence=persistence, sharing=lambda manager, persistence: None)
        self.assertIsNone(alone.sharing)


class SharedRestartTests(SynchronousTestCase):
    """
    A kernel that dies while another gateway holds its lease is restarted
    here once that gateway is gone.
    """

    def test_restart_after_the_other_gateway_is_gone(self) -> None:
        """
        The dead kernel waits while the other gateway holds its lease,
        then this gateway restarts it (counted against its restart limit)
        when the lease is free and nobody else relaunched it.
        """
        from egateway.kernels.sharing import FOLLOW_INTERVAL

        clock = Clock()
        manager, launcher = shared_manager(clock)
        store = manager.persistence
        kernel = self.successResultOf(start(manager))
        store.lease_holder = "elsewhere"
        launcher.processes[0].exit(ExitStatus(code=1))
        clock.advance(FOLLOW_INTERVAL)
        self.assertEqual((kernel.state, len(launcher.processes)), (KernelState.RUNNING, 1))
        store.lease_holder = ""
        clock.advance(FOLLOW_INTERVAL)
        self.assertEqual((kernel.state, kernel.restart_count), (KernelState.RUNNING, 1))
        self.assertEqual(len(launcher.processes), 2)
        self.assertEqual(store.lease_holder, "")


def shared_manager(clock: Clock) -> tuple[Any, Any]:
    """
    A manager and its fake launcher, on a fake store shared with other
    gateways (L{FakeSharedPersistence}), with its sharing service.
    """
    from egateway.kernels.sharing import SharedKernels

    manager, launcher, _ = make_manager(
        clock,
        persistence=FakeSharedPersistence,
        sharing=lambda manager, persistence: SharedKernels(manager, persistence, clock, lease_ttl=10, journal_entries=0),
    )
    return manager, launcher


class SharedListingTests(SynchronousTestCase):
    """
    With a shared store, a listing serves this gateway's kernels from
    memory and reads from the store only the records of the others.
    """

    def test_own_records_not_read(self) -> None:
        """
        The store is asked for every record but those of the kernels held
        here: each kernel held here is listed from memory (not from its
        possibly older record), another gateway's from its record.
        """
        import dataclasses as dc

        from tests.test_store import kernel_record

        clock = Clock()
        manager, _ = shared_manager(clock)
        store = manager.persistence
        kernel = self.successResultOf(start(manager))
        elsewhere = kernel_record("9b1e2f4c-0000-4000-8000-0000000000e1", gateway_id="gw-b")
        stale_own = dc.replace(elsewhere, kernel_id=kernel.id, state="dead")
        asked: list[Any] = []

        def load_kernels(skip: Any = ()) -> Deferred:
            from twisted.internet.defer import succeed

            asked.append(set(skip))
            return succeed([r for r in (elsewhere, stale_own) if r.kernel_id not in skip])

        store.load_kernels = load_kernels
        models = self.successResultOf(Deferred.fromCoroutine(manager.list_models()))
        self.assertEqual(asked, [{kernel.id}])
        by_id = {m["id"]: m for m in models}
        self.assertEqual(set(by_id), {kernel.id, elsewhere.kernel_id})
        self.assertEqual(by_id[kernel.id]["state"], "running")
        self.assertEqual(by_id[elsewhere.kernel_id]["gateway"], "gw-b")


class LayoutTests(SynchronousTestCase):
    """
    The manager's parts and its users go through its public interface.
    """

    def test_no_private_access_to_the_manager(self) -> None:
        """
        Outside manager.py, nothing reaches a private name of the manager.
        """
        import os
        import re

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        private = re.compile(r"\bmanager\._[a-z]\w*")
        found = []
        for top in ("egateway", "tests"):
            for directory, _, names in os.walk(os.path.join(root, top)):
                for name in names:
                    path = os.path.join(directory, name)
                    if not name.endswith(".py") or path.endswith(os.path.join("kernels", "manager.py")):
                        continue
                    with open(path, encoding="utf-8") as f:
                        for number, line in enumerate(f, 1):
                            if private.search(line) and "private.search" not in line:
                                found.append(f"{os.path.relpath(path, root)}:{number}: {line.strip()}")
        self.assertEqual(found, [])


class ModelTests(SynchronousTestCase):
    def test_times_formatted_once(self) -> None:
        """
        A kernel's model formats its start and launch phase times once (a
        thousand kernels' listing spent most of its time there); a new phase
        or a new activity time shows in the next model.
        """
        from egateway.clusters.interface import Phase
        from egateway.kernels import kernel as kernel_module

        clock = Clock()
        clock.advance(1_700_000_000)
        manager, _, _ = make_manager(clock)
        kernel = self.successResultOf(Deferred.fromCoroutine(manager.start_kernel()))
        formatted: list[float] = []
        original = kernel_module.iso

        def counting(timestamp: float) -> str:
            formatted.append(timestamp)
            return original(timestamp)

        self.patch(kernel_module, "iso", counting)
        first = kernel.model()
        del formatted[:]
        self.assertEqual(kernel.model(), first)
        self.assertEqual(formatted, [kernel.last_activity])
        clock.advance(2.5)
        kernel.report(Phase.READY, "again")
        kernel.touch()
        model = kernel.model()
        self.assertEqual(model["phases"][-1], {"phase": "ready", "at": original(clock.seconds()), "detail": "again"})
        self.assertEqual(model["last_activity"], original(clock.seconds()))
        self.assertEqual(model["started"], first["started"])


class RestoreSliceTests(SynchronousTestCase):
    def test_slices_per_turn(self) -> None:
        """
        Restores start a slice per reactor turn, all run at once, and the
        whole waits for every one (failed ones included).
        """
        from egateway.kernels.persistence import in_slices

        clock = Clock()
        pending: list[Deferred[None]] = []

        def start(item: int) -> Deferred[None]:
            pending.append(Deferred())
            return pending[-1]

        done = Deferred.fromCoroutine(in_slices(clock, list(range(120)), start, size=50))
        self.assertEqual(len(pending), 50)
        self.assertEqual(len(clock.getDelayedCalls()), 1)  # the rest waits for the next turn
        clock.advance(0)  # (Clock runs the turns it schedules meanwhile too)
        self.assertEqual(len(pending), 120)
        for d in pending[:-1]:
            d.callback(None)
        self.assertNoResult(done)
        pending[-1].errback(RuntimeError("its own to log"))
        self.successResultOf(done)
