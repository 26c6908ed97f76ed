"""
Integration tests for C{launchers/python/launch_ipykernel.py}: the launcher
runs as a real process on loopback, reports to a real L{ResponseListener},
and its kernel is driven with jupyter_client.

The helpers here are shared with C{tests.test_jeg_launcher_compat}.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import signal
import sys
from typing import Any, Callable, Sequence

from jupyter_client import BlockingKernelClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, race
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from egateway.clusters.comm import CommClient, CommError, comm_key, request_mac
from egateway.clusters.response import ResponseListener
from egateway.observe import detached
from tests.support.polling import eventually
from tests.test_handshake import keys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "launchers", "python", "launch_ipykernel.py")


# -- helpers shared with the Enterprise Gateway compatibility test ---------


class LauncherProcess(ProcessProtocol):
    """
    A launcher child process: its output is kept for failure messages,
    C{ended} fires with C{(exit code, signal)}.
    """

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[tuple[int | None, int | None]] = Deferred()
        self.pid = 0

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        self.ended.callback((getattr(value, "exitCode", None), getattr(value, "signal", None)))

    def tail(self) -> str:
        return self.output.decode("utf-8", "replace")[-3000:]


def _stat(pid: int) -> tuple[str, int] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return fields[0].decode(), int(fields[2])


def group_members(pgid: int) -> list[int]:
    """
    Live (non-zombie) processes in process group C{pgid}.
    """
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[1] == pgid and stat[0] != "Z":
                members.append(int(entry))
    return members


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """
    Poll an external fact (a process going away) with a bounded deadline.
    """
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await deferLater(reactor, 0.05, lambda: None)


class KernelHarness:
    """
    What a launcher test holds on to: the listener, the process, the kernel
    client (used from one dedicated thread, since it blocks), and the clean-up
    that guarantees nothing survives the test.
    """

    def __init__(self, case: TestCase, listener: ResponseListener | None = None) -> None:
        self.case = case
        self.listener = listener or self.make_listener(case)
        self.workdir = case.mktemp()
        os.makedirs(self.workdir)
        self.process = LauncherProcess()
        self.info: dict[str, Any] = {}
        self.client: BlockingKernelClient | None = None
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="kernel-client")
        self.pool.start()
        case.addCleanup(self._cleanup)

    @staticmethod
    def make_listener(case: TestCase, **kwargs: Any) -> ResponseListener:
        """
        A listener on loopback; version 1 is allowed (as an operator may)
        unless C{accept_v1=False}, so launches that allow it can test it.
        """
        kwargs.setdefault("accept_v1", True)
        listener = ResponseListener(reactor, ip="127.0.0.1", port=0, keys=keys(), **kwargs)
        listener.startService()
        case.addCleanup(listener.stopService)
        return listener

    def environment(self, token: str | None) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("EG_LAUNCH_TOKEN", "JPY_PARENT_PID")
        }
        env.update(TMPDIR=self.workdir, IPYTHONDIR=os.path.join(self.workdir, "ipython"))
        if token is not None:
            env["EG_LAUNCH_TOKEN"] = token
        return env

    def spawn(self, argv: Sequence[str], token: str | None) -> None:
        reactor.spawnProcess(self.process, argv[0], list(argv), env=self.environment(token))

    async def receive(self, pending: Any, timeout: float = 60) -> dict[str, Any]:
        """
        Wait for the connection info, failing early (with the launcher's
        output) if the launcher dies first.
        """
        index, result = await race([detached(pending.received), detached(self.process.ended)]).addTimeout(
            timeout, reactor
        )
        if index == 1:
            raise AssertionError(f"the launcher exited {result} before reporting:\n{self.process.tail()}")
        self.info = dict(result)
        return self.info

    def run(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, self.pool, function, *args)

    async def connect(self, ip: str = "127.0.0.1") -> None:
        info = dict(self.info, ip=ip)

        def connect_blocking() -> BlockingKernelClient:
            client = BlockingKernelClient()
            client.load_connection_info(info)
            client.start_channels()
            client.wait_for_ready(timeout=30)
            return client

        self.client = await self.run(connect_blocking)

    async def execute(self, code: str, on_output: Callable[[dict], None] | None = None) -> tuple[dict, list[str]]:
        """
        Run a cell; returns the reply content and the text it printed or
        returned.
        """
        client = self.client
        assert client is not None
        outputs: list[str] = []

        def hook(message: dict) -> None:
            content = message["content"]
            if message["msg_type"] == "stream":
                outputs.append(content["text"])
            elif message["msg_type"] == "execute_result":
                outputs.append(content["data"]["text/plain"])
            if on_output is not None:
                on_output(message)

        reply = await self.run(lambda: client.execute_interactive(code, timeout=60, output_hook=hook))
        return reply["content"], outputs

    async def interrupt_sleep(self, comm: CommClient) -> dict:
        """
        Start C{time.sleep(60)}, interrupt it through the comm port once it
        has started, and return the cell's reply.
        """
        started: Deferred[None] = Deferred()

        def on_output(message: dict) -> None:
            if message["msg_type"] == "stream" and "sleeping" in message["content"]["text"]:
                reactor.callFromThread(lambda: started.called or started.callback(None))

        running = Deferred.fromCoroutine(self.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(60)", on_output))
        await started.addTimeout(30, reactor)
        await comm.signal(signal.SIGINT)
        reply, _ = await running
        return reply

    async def shut_down(self, comm: CommClient, timeout: float = 30) -> tuple[int | None, int | None]:
        """
        Shut the kernel down as the gateway does (Jupyter C{shutdown_request},
        then the comm port's shutdown) and wait for the process to end.
        """
        client = self.client
        assert client is not None
        await self.run(client.shutdown)
        try:
            await comm.shutdown()
        except CommError:
            pass  # the listener may already be gone with its kernel
        return await self.process.ended.addTimeout(timeout, reactor)

    async def _cleanup(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await self.run(client.stop_channels)
        self.pool.stop()
        if not self.process.ended.called and self.process.pid:
            for target in {self.process.pid, *group_members(self.info.get("pgid", -1))}:
                try:
                    os.kill(target, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            await self.process.ended.addTimeout(30, reactor)
        pgid = self.info.get("pgid")
        if pgid:
            # The comm listener (a grandchild) exits on its own once it
            # sees the kernel's end: give it a moment, bounded.
            try:
                await eventually(lambda: not group_members(pgid), "the kernel's process group to empty", timeout=10)
            except AssertionError:
                pass
            leftovers = group_members(pgid)
            for pid in leftovers:
                os.kill(pid, signal.SIGKILL)
            self.case.assertEqual(leftovers, [], "processes of the kernel outlived the test")


def launcher_argv(listener: ResponseListener, kernel_id: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        LAUNCHER,
        "--kernel-id",
        kernel_id,
        "--response-address",
        listener.response_address,
        "--public-key",
        listener.public_key,
        "--ip",
        "127.0.0.1",
        *extra,
    ]


class _RawComm(Protocol):
    """
    A hand-made version 2 exchange: answer the challenge with C{answer}
    (given the raw challenge) and collect the reply lines.
    """

    def __init__(self, answer: Callable[[bytes], bytes]) -> None:
        self.answer = answer
        self.buffer = b""
        self.done: Deferred[None] = Deferred()
        self.sent = b""
        self.lines: list[dict] = []

    def dataReceived(self, data: bytes) -> None:
        first = b"\n" not in self.buffer
        self.buffer += data
        if first and b"\n" in self.buffer:
            challenge = base64.b64decode(json.loads(self.buffer.split(b"\n")[0])["challenge"])
            self.sent = self.answer(challenge)
            self.transport.write(self.sent)

    def connectionLost(self, reason: Any = None) -> None:
        self.lines = [json.loads(line) for line in self.buffer.split(b"\n") if line.strip()]
        self.done.callback(None)


# -- the tests -------------------------------------------------------------


class LaunchIPyKernelTests(TestCase):
    timeout = 180

    async def start(self, kernel_id: str, version: int, *extra: str) -> tuple[KernelHarness, Any]:
        harness = KernelHarness(self)
        pending = harness.listener.expect(kernel_id, accept_v1=version == 1, hosts=["127.0.0.1"])
        token = pending.token if version == 2 else None
        harness.spawn(launcher_argv(harness.listener, kernel_id, *extra), token)
        info = await harness.receive(pending)
        self.assertEqual(pending.version, version)
        self.assertEqual(info["kernel_id"], kernel_id)
        self.assertEqual(info["pid"], harness.process.pid)
        self.assertEqual(info["pgid"], info["pid"], "the launcher leads its own process group")
        return harness, pending

    def comm(self, harness: KernelHarness, pending: Any, **kwargs: Any) -> CommClient:
        return CommClient(
            reactor, "127.0.0.1", harness.info["comm_port"], kernel_id=pending.kernel_id,
            token=pending.comm_token, timeout=10, **kwargs
        )

    async def lifecycle(self, harness: KernelHarness, pending: Any) -> CommClient:
        """
        Execute, interrupt a sleeping cell, execute again: the kernel
        survives an interrupt.
        """
        await harness.connect()
        reply, outputs = await harness.execute("import os\nos.getpid(), 6 * 7")
        self.assertEqual(reply["status"], "ok")
        self.assertEqual(outputs, [f"({harness.info['pid']}, 42)"])
        comm = self.comm(harness, pending)
        self.assertTrue(await comm.alive())
        reply = await harness.interrupt_sleep(comm)
        self.assertEqual((reply["status"], reply.get("ename")), ("error", "KeyboardInterrupt"))
        reply, outputs = await harness.execute("'still here'")
        self.assertEqual(outputs, ["'still here'"])
        return comm

    async def finish(self, harness: KernelHarness, comm: CommClient) -> None:
        """
        Shut down; the launcher exits 0, its group is empty, its connection
        file is gone and the comm port is closed.
        """
        pgid = harness.info["pgid"]
        members = group_members(pgid)
        self.assertGreaterEqual(len(members), 2, "the kernel and its comm listener run")
        code, signum = await harness.shut_down(comm)
        self.assertEqual((code, signum), (0, None), harness.process.tail())
        await wait_until(lambda: not group_members(pgid), 10, f"process group {pgid} to empty")
        self.assertEqual(glob.glob(os.path.join(harness.workdir, "kernel-*.json")), [])
        self.assertFalse(await comm.alive())

    async def test_version_2(self) -> None:
        """
        With a launch token the launcher reports over version 2, inside its
        port range, hides the token from the kernel, and obeys the
        authenticated comm port through a full lifecycle.
        """
        harness, pending = await self.start("kernel-v2", 2, "--port-range", "42000..42999")
        ports = [harness.info[f"{name}_port"] for name in ("shell", "iopub", "stdin", "control", "hb", "comm")]
        self.assertEqual(len(set(ports)), 6)
        for port in ports:
            self.assertTrue(42000 <= port <= 42999, ports)
        comm = await self.lifecycle(harness, pending)
        reply, outputs = await harness.execute("import os\nos.environ.get('EG_LAUNCH_TOKEN')")
        self.assertEqual(outputs, [], "the launch token must not reach the kernel's environment")
        await self.finish(harness, comm)

    async def test_version_1(self) -> None:
        """
        Without a token the launcher speaks Enterprise Gateway's version 1
        handshake and comm protocol through a full lifecycle.
        """
        harness, pending = await self.start("kernel-v1", 1)
        self.assertIsNone(pending.comm_token)
        comm = await self.lifecycle(harness, pending)
        await self.finish(harness, comm)

    async def test_comm_v2_refuses_forgery_and_replay(self) -> None:
        """
        A version 2 launcher ignores plain version 1 requests, requests
        under the wrong key, and a valid request replayed on a new
        connection.
        """
        harness, pending = await self.start("kernel-comm", 2)
        port = harness.info["comm_port"]
        with self.assertRaises(CommError) as raised:
            await CommClient(reactor, "127.0.0.1", port, kernel_id="kernel-comm", token="forged", timeout=10).signal(9)
        self.assertIn("authentication failed", str(raised.exception))

        key = comm_key(pending.token, "kernel-comm")

        def answer(challenge: bytes) -> bytes:
            text = json.dumps({"signum": 0})
            return json.dumps({"request": text, "mac": request_mac(key, challenge, text)}).encode() + b"\n"

        async def exchange(answer: Callable[[bytes], bytes]) -> _RawComm:
            raw = _RawComm(answer)
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), raw)
            await raw.done.addTimeout(10, reactor)
            return raw

        genuine = await exchange(answer)
        self.assertEqual(genuine.lines[1], {"ok": True, "alive": True})
        replayed = await exchange(lambda challenge: genuine.sent)
        self.assertEqual(replayed.lines[1], {"ok": False, "alive": True, "error": "authentication failed"})

        # A version 1 request cannot tell it was ignored; the next version 2
        # answer (requests are served in order) shows the kernel alive.
        await CommClient(reactor, "127.0.0.1", port, timeout=5).signal(signal.SIGKILL)
        self.assertTrue(await self.comm(harness, pending).alive())
        self.assertFalse(harness.process.ended.called)
        await harness.connect()
        await self.finish(harness, self.comm(harness, pending))

    async def test_killed_kernel_leaves_nothing(self) -> None:
        """
        When the kernel process is killed outright, its comm listener exits
        too, and the comm port then reports the kernel dead.
        """
        harness, pending = await self.start("kernel-killed", 2)
        comm = self.comm(harness, pending)
        pgid = harness.info["pgid"]
        self.assertEqual(len(group_members(pgid)), 2)
        os.kill(harness.info["pid"], signal.SIGKILL)
        self.assertEqual(await harness.process.ended.addTimeout(30, reactor), (None, signal.SIGKILL))
        await wait_until(lambda: not group_members(pgid), 10, "the comm listener to exit")
        self.assertFalse(await comm.alive())

    async def test_terminate_through_comm(self) -> None:
        """
        SIGTERM through the comm port ends the kernel and removes its
        connection file.
        """
        harness, pending = await self.start("kernel-term", 1)
        comm = self.comm(harness, pending)
        await comm.signal(signal.SIGTERM)
        self.assertEqual(await harness.process.ended.addTimeout(30, reactor), (None, signal.SIGTERM))
        await wait_until(lambda: not group_members(harness.info["pgid"]), 10, "the comm listener to exit")
        self.assertEqual(glob.glob(os.path.join(harness.workdir, "kernel-*.json")), [])

    async def test_refused_launch_exits(self) -> None:
        """
        A launcher whose payload the gateway refuses (version 1 while
        disabled) stops its kernel instead of running unreachable.
        """
        listener = KernelHarness.make_listener(self, accept_v1=False)
        harness = KernelHarness(self, listener)
        pending = listener.expect("kernel-refused", accept_v1=True, hosts=["127.0.0.1"])
        pending.received.addErrback(lambda f: None)
        harness.spawn(launcher_argv(listener, "kernel-refused"), None)
        code, signum = await harness.process.ended.addTimeout(60, reactor)
        self.assertEqual((code, signum), (1, None))
        self.assertIn("refused the connection info", harness.process.tail())
        self.assertFalse(pending.received.called)
        self.assertEqual(group_members(harness.process.pid), [])
        self.assertEqual(glob.glob(os.path.join(harness.workdir, "kernel-*.json")), [])

    async def test_bad_arguments(self) -> None:
        """
        Missing required arguments and a bad port range stop the launcher
        with a message saying which.
        """
        harness = KernelHarness(self)
        cases = [
            ([sys.executable, LAUNCHER, "--kernel-id", "k"], "--public-key is required"),
            ([sys.executable, LAUNCHER, "--RemoteProcessProxy.public-key", "x"], "--kernel-id is required"),
            (launcher_argv(harness.listener, "k", "--port-range", "5000..5010"), "fewer than 100 ports"),
            (launcher_argv(harness.listener, "k", "--port-range", "a..b"), "not of the form lo..hi"),
            (
                [sys.executable, LAUNCHER, "--kernel-id", "k", "--public-key", "bm90IGEga2V5",
                 "--response-address", harness.listener.response_address],
                "--public-key is not a base64 DER public key",
            ),
            (
                [sys.executable, LAUNCHER, "--kernel-id", "k", "--public-key", "x",
                 "--response-address", "nowhere"],
                "--response-address 'nowhere' is not ip:port",
            ),
        ]
        for argv, message in cases:
            process = LauncherProcess()
            reactor.spawnProcess(process, argv[0], argv, env=harness.environment(None))
            self.assertEqual(await process.ended.addTimeout(30, reactor), (1, None))
            self.assertIn(message, process.tail())


BOOTSTRAP = os.path.join(REPO, "launchers", "bootstrap", "bootstrap-kernel.sh")


class BootstrapTests(TestCase):
    timeout = 120

    def environment(self, harness: KernelHarness, **values: str) -> dict[str, str]:
        env = harness.environment(None)
        env.update(KERNEL_LAUNCHERS_DIR=os.path.join(REPO, "launchers"), **values)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        return env

    async def test_python_kernel(self) -> None:
        """
        The container entry point starts a working kernel from Enterprise
        Gateway's environment contract (plus a launch token), keeps it
        interruptible, and forwards SIGTERM to the kernel's whole group.
        The token reaches the launcher on stdin: the kernel's initial
        environment (C{/proc/<pid>/environ}, readable for its whole life)
        does not hold it.
        """
        harness = KernelHarness(self)
        pending = harness.listener.expect("kernel-boot")
        env = self.environment(
            harness,
            KERNEL_LANGUAGE="Python",
            KERNEL_ID="kernel-boot",
            RESPONSE_ADDRESS=harness.listener.response_address,
            EG_PUBLIC_KEY=harness.listener.public_key,
            EG_LAUNCH_TOKEN=pending.token,
        )
        reactor.spawnProcess(harness.process, BOOTSTRAP, [BOOTSTRAP, "--ip", "127.0.0.1"], env=env)
        info = await harness.receive(pending)
        self.assertEqual(pending.version, 2)
        self.assertNotEqual(info["pid"], harness.process.pid, "the shell stays the parent")
        with open(f"/proc/{info['pid']}/environ", "rb") as f:
            self.assertNotIn(pending.token.encode(), f.read(), "the token is in the kernel's initial environment")
        await harness.connect()
        comm = CommClient(reactor, "127.0.0.1", info["comm_port"], kernel_id="kernel-boot", token=pending.comm_token)
        reply = await harness.interrupt_sleep(comm)
        self.assertEqual(reply.get("ename"), "KeyboardInterrupt")
        os.kill(harness.process.pid, signal.SIGTERM)
        code, signum = await harness.process.ended.addTimeout(30, reactor)
        self.assertEqual((code, signum), (128 + signal.SIGTERM, None))
        await wait_until(lambda: not group_members(info["pgid"]), 10, "the kernel's group to empty")

    async def test_refuses_bad_environment(self) -> None:
        """
        Unsupported languages and missing variables stop the script with a
        message naming the problem; hostile values stay inert data.
        """
        harness = KernelHarness(self)
        marker = os.path.join(harness.workdir, "pwned")
        base = {
            "KERNEL_ID": "k",
            "RESPONSE_ADDRESS": "127.0.0.1:9",
            "PUBLIC_KEY": "x",
        }
        cases = [
            (dict(base, KERNEL_LANGUAGE="scala"), "KERNEL_LANGUAGE=scala is not supported"),
            (dict(base, KERNEL_LANGUAGE="cobol"), "unknown KERNEL_LANGUAGE=cobol"),
            ({k: v for k, v in base.items() if k != "PUBLIC_KEY"} | {"KERNEL_LANGUAGE": "python"}, "PUBLIC_KEY"),
            (dict(base, KERNEL_LANGUAGE="python", KERNEL_LAUNCHERS_DIR=harness.workdir), "no launch_ipykernel.py"),
            (dict(base, KERNEL_LANGUAGE=f"$(touch {marker})"), "unknown KERNEL_LANGUAGE=$(touch"),
        ]
        for values, message in cases:
            process = LauncherProcess()
            env = self.environment(harness)
            env.update(values)
            reactor.spawnProcess(process, BOOTSTRAP, [BOOTSTRAP], env=env)
            self.assertEqual(await process.ended.addTimeout(30, reactor), (1, None))
            self.assertIn(message, process.tail())
        self.assertFalse(os.path.exists(marker))
