"""
What holding many kernels needs of the gateway (found by C{bench/scale.py}),
and the benchmark's simulated kernels checked against jupyter_client.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ZMQ_DEFAULT_MAX_SOCKETS = 1023


def _allow_open_files(test: SynchronousTestCase, wanted: int) -> None:
    """
    Raise this process's soft open-file limit to C{wanted} for the test
    (within the hard limit), restoring it afterwards.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        test.fail(f"the test needs {wanted} open files; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    test.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))


class SocketLimitTests(SynchronousTestCase):
    def test_more_sockets_than_libzmq_default(self) -> None:
        """
        The gateway's ZMQ context holds as many sockets as the process may
        open files, not libzmq's default 1023: with that default a gateway
        could not link a 342nd kernel (3 sockets each), whatever its
        C{LimitNOFILE}.
        """
        from egateway.wire.zmq import ZmqChannelFactory

        count = ZMQ_DEFAULT_MAX_SOCKETS + 100
        _allow_open_files(self, count + 500)
        channels = ZmqChannelFactory(reactor)
        self.addCleanup(channels.close)
        sockets: list = []
        self.addCleanup(lambda: [sock.close() for sock in sockets])
        for _ in range(count):
            sockets.append(channels.subscriber("inproc://egateway-test-socket-limit", lambda frames: None))
        self.assertEqual(len(sockets), count)


def _farm_call(path: str, request: dict) -> dict:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(30)
        conn.connect(path)
        conn.sendall(json.dumps({"id": 1, **request}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


class KernelFarmTests(SynchronousTestCase):
    """
    The benchmark's simulated kernels answer jupyter_client as a kernel
    does, each on its own ports with its own key.
    """

    def setUp(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="egw-farm-test-")
        self.socket_path = os.path.join(self.workdir, "farm.sock")
        ready = os.path.join(self.workdir, "ready")
        process = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "bench", "kernel_farm.py"), "--socket", self.socket_path,
             "--ready-file", ready],
            stdin=subprocess.DEVNULL,
        )

        def stop() -> None:
            process.terminate()
            process.wait(30)
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)

        self.addCleanup(stop)
        give_up = time.monotonic() + 30
        while not os.path.exists(ready):
            self.assertIsNone(process.poll(), "the farm exited")
            self.assertLess(time.monotonic(), give_up, "the farm did not start in 30 s")
            time.sleep(0.05)

    def _client(self, kernel_id: str):  # type: ignore[no-untyped-def]
        from jupyter_client.blocking import BlockingKernelClient

        info = _farm_call(self.socket_path, {"op": "start", "kernel": kernel_id})["connection_info"]
        client = BlockingKernelClient()
        client.load_connection_info(info)
        client.start_channels()
        self.addCleanup(client.stop_channels)
        client.wait_for_ready(timeout=30)
        return client, info

    def test_execute_sequence(self) -> None:
        """
        An execute is answered as ipykernel answers it: busy,
        execute_input, stdout, the reply, idle; every message signed with
        the kernel's key (jupyter_client checks each signature).
        """
        client, info = self._client("k1")
        other, other_info = self._client("k2")
        self.assertNotEqual(info["key"], other_info["key"])
        self.assertNotEqual(info["shell_port"], other_info["shell_port"])
        msg_id = client.execute("1+1")
        reply = client.get_shell_msg(timeout=10)
        self.assertEqual(reply["parent_header"]["msg_id"], msg_id)
        self.assertEqual(reply["content"]["status"], "ok")
        seen = []
        while not seen or seen[-1] != ("status", "idle"):
            msg = client.get_iopub_msg(timeout=10)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            seen.append((msg["msg_type"], msg["content"].get("execution_state") or msg["content"].get("name")))
        self.assertEqual(
            seen, [("status", "busy"), ("execute_input", None), ("stream", "stdout"), ("status", "idle")]
        )

    def test_heartbeat_and_shutdown(self) -> None:
        """
        The heartbeat echoes; a shutdown request is answered and ends the
        kernel (the farm no longer serves it).
        """
        client, _ = self._client("k3")
        give_up = time.monotonic() + 10
        while not client.hb_channel.is_beating():
            self.assertLess(time.monotonic(), give_up)
            time.sleep(0.1)
        client.shutdown()
        reply = client.get_control_msg(timeout=10)
        self.assertEqual(reply["msg_type"], "shutdown_reply")
        self.assertFalse(_farm_call(self.socket_path, {"op": "alive", "kernel": "k3"})["alive"])


class FarmLauncherTests(SynchronousTestCase):
    def test_farm_pid_asked_once(self) -> None:
        """
        Kernels restored at once wait on one question for the farm's pid,
        not one each: the farm's C{stats} lists its 16,000 descriptors, and
        1,000 of them took 20 s of a benchmarked restart.  A failed question
        is asked again next time.
        """
        from types import SimpleNamespace

        from twisted.internet.defer import Deferred

        from bench.farm_launcher import FarmLauncher

        launcher = FarmLauncher(SimpleNamespace(reactor=Clock()))
        asked: list[Deferred] = []
        self.patch(launcher, "call", lambda path, op, **fields: asked.append(Deferred()) or asked[-1])
        waiting = [launcher._pid("/farm.sock") for _ in range(3)]
        self.assertEqual(len(asked), 1)
        asked[0].errback(OSError("farm away"))
        for d in waiting:
            self.failureResultOf(d, OSError)
        again = launcher._pid("/farm.sock")
        asked[1].callback({"pid": 4242})
        self.assertEqual((self.successResultOf(again), self.successResultOf(launcher._pid("/farm.sock"))), (4242, 4242))
        self.assertEqual(len(asked), 2)


class HeldMessageTests(SynchronousTestCase):
    def test_parts_leave_the_collectors_view(self) -> None:
        """
        A message received from a kernel, as journals and iopub rings hold
        it, keeps one object the garbage collector tracks (itself), not
        three: once a collection has seen them, its parts and buffers are
        untracked.  A full collection walks every tracked object while the
        reactor waits, and with 1,000 kernels the journals hold ~100,000
        messages (a 1.7 s stall with the Redis store, bench/scale.py).
        """
        from egateway.wire.protocol import DELIMITER, Message, Signer, join_frames, split_frames

        signer = Signer(b"key")
        frames = [b"ident", *join_frames(Message.build("stream", {"text": "x"}, "s"), signer), b"buffer"]
        self.assertEqual(frames[1], DELIMITER)
        _, message = split_frames(frames, signer, True)
        gc.collect()
        self.assertEqual(
            (gc.is_tracked(message.parts), gc.is_tracked(message.buffers), list(message.buffers)),
            (False, False, [b"buffer"]),
        )


class HeapFreezeTests(SynchronousTestCase):
    def test_freezes_once_when_running(self) -> None:
        """
        The start-up heap is frozen out of garbage collection once, on the
        reactor's first turn after the services started, not before, and
        not again after a restart of the service.
        """
        from egateway.ops.heap import HeapFreeze

        frozen = []
        clock = Clock()
        service = HeapFreeze(clock, freeze=lambda: frozen.append(True))
        service.startService()
        self.assertEqual(frozen, [])
        clock.advance(0)
        self.assertEqual(frozen, [True])
        service.stopService()
        service.startService()
        clock.advance(0)
        self.assertEqual(frozen, [True])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_young_collections_rarer(self) -> None:
        """
        Once running, the youngest generation is collected every
        L{YOUNG_THRESHOLD} allocations rather than Python's 700, so full
        collections (each walking every kernel's objects with the reactor
        stalled) are that much rarer; the older thresholds stay.
        """
        from egateway.ops.heap import YOUNG_THRESHOLD, HeapFreeze

        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        gc.set_threshold(700, *before[1:])
        clock = Clock()
        HeapFreeze(clock, freeze=lambda: None).startService()
        clock.advance(0)
        self.assertEqual(gc.get_threshold(), (YOUNG_THRESHOLD, *before[1:]))

    def test_not_when_stopped_before_running(self) -> None:
        """
        A gateway stopped before its reactor ran freezes nothing.
        """
        from egateway.ops.heap import HeapFreeze

        frozen = []
        clock = Clock()
        service = HeapFreeze(clock, freeze=lambda: frozen.append(True))
        service.startService()
        service.stopService()
        clock.advance(1)
        self.assertEqual(frozen, [])


class GatewayHeapTests(TestCase):
    async def test_gateway_freezes_its_startup_heap(self) -> None:
        """
        A gateway freezes its start-up objects: full collections then walk
        only what it made since (bench/scale.py measured 300 ms full
        collections, each stalling the reactor, before).
        """
        from tests.support.gateway import InProcessGateway

        gc.unfreeze()
        self.addCleanup(gc.unfreeze)
        gateway = InProcessGateway()
        await gateway.start()
        self.addCleanup(gateway.stop)
        # After the call HeapFreeze scheduled when the gateway started.
        await deferLater(reactor, 0, lambda: None)
        self.assertGreater(gc.get_freeze_count(), 0)


class DescriptorLimitTests(TestCase):
    """
    A real gateway (C{twistd}) under a low open-file limit, launching real
    ipykernels until it runs short.
    """

    timeout = 180

    async def test_refused_at_once_when_short_of_descriptors(self) -> None:
        """
        A gateway whose open files run short refuses the next kernel at
        once with 503 naming the limit, starts nothing for it, and starts
        kernels again once one is shut down; stopped while short, it still
        stops every kernel (those it cannot open a socket to for their
        C{shutdown_request} by signal: they were left running).  Before, the kernel started,
        libzmq failed to connect to it in its own thread without a word,
        and the launch ended at the launch timeout (here 90 s, past the
        request's 30 s bound) as a kernel that did not answer.
        """
        from tests.support.daemon import start_gateway

        gateway = await start_gateway(self, flags={"launch-timeout": "90"}, open_files=110, reactor=reactor)
        started: list[str] = []
        for _ in range(30):
            reply = await gateway.api.request("POST", "api/kernels", {"name": "python3"}, timeout=30)
            if reply.code != 201:
                break
            started.append(reply.json()["id"])
        else:
            self.fail("30 kernels started under a 110 open-file limit")
        self.assertEqual(reply.code, 503, reply.body)
        self.assertEqual(reply.json()["reason"], "Service Unavailable")
        self.assertIn("file descriptors", reply.json()["message"])
        self.assertIn("LimitNOFILE", reply.json()["message"])
        self.assertGreater(len(started), 2)
        self.assertEqual(sorted(m["id"] for m in await gateway.api.call("GET", "api/kernels")), sorted(started))
        self.assertEqual(
            sorted(kernel_id for kernel_id in started if gateway.kernel_processes(kernel_id)), sorted(started)
        )
        self.assertEqual(len(gateway.kernel_processes()), len(started))

        await gateway.api.call("DELETE", f"api/kernels/{started[0]}", expect=204)
        model = await gateway.api.call("POST", "api/kernels", {"name": "python3"}, expect=201)
        self.assertEqual(model["execution_state"], "idle")
