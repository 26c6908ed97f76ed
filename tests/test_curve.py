"""
CurveZMQ encryption of kernel channels (JEP 145, ipykernel 7.4): connection
info carries the keys, local kernels get a key pair when their kernelspec
declares support, egateway's remote launcher provisions one for version 2
launches, and the proof that traffic is encrypted: a client without the keys
gets nothing from the kernel while the gateway works, and a packet capture of
the kernel's ports does not contain the code or its output (while it does with
encryption off).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import uuid
from dataclasses import replace
from typing import Any

import zmq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from egateway.clusters.interface import LaunchError
from egateway.clusters.local import curve_keys_for, supports_curve
from egateway.errors import GatewayError
from egateway.kernels.launching import LaunchFailed
from egateway.kernels.specs import KernelSpec
from egateway.wire.channels import ConnectionInfo
from egateway.wire.link import KernelLink
from egateway.wire.protocol import Message, Signer, join_frames, split_frames
from tests.support.fakes import make_manager
from tests.support.gateway import InProcessGateway, pid_alive
from tests.support.wsclient import ChannelsClient
from tests.test_kernel_launcher import KernelHarness, launcher_argv

PORTS = {"shell_port": 40001, "iopub_port": 40002, "stdin_port": 40003, "control_port": 40004, "hb_port": 40005}


def spec(metadata: dict[str, Any], name: str = "k") -> KernelSpec:
    return KernelSpec(name=name, argv=("python",), display_name=name, language="python", resource_dir="/", metadata=metadata)


# -- a plain ZMQ client (what an eavesdropper or intruder on the host has) --------------


def ask_kernel_info_blocking(info: ConnectionInfo, use_curve: bool, timeout: float = 3.0) -> dict[str, Any] | None:
    """
    Send a correctly signed C{kernel_info_request} on the shell channel
    with pyzmq, as a CurveZMQ client of the kernel's key or in clear text.

    @return: the reply's content, or C{None} if nothing came back.
    """
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    # A DEALER whose connection failed its handshake (a clear-text client of
    # a CurveZMQ kernel) has no peer, and its send would block for ever,
    # holding the test's thread pool: a CI run hung there.
    sock.sndtimeo = int(timeout * 1000)
    try:
        if use_curve:
            assert info.curve_publickey is not None
            public, secret = zmq.curve_keypair()
            sock.curve_serverkey = info.curve_publickey
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        sock.connect(info.url("shell"))
        signer = Signer(info.key, info.signature_scheme)
        try:
            sock.send_multipart(join_frames(Message.build("kernel_info_request", {}, uuid.uuid4().hex), signer))
        except zmq.Again:
            return None
        if not sock.poll(timeout * 1000):
            return None
        _, message = split_frames(sock.recv_multipart(), signer)
        return message.content()
    finally:
        sock.close()
        context.term()


def listen_iopub_blocking(info: ConnectionInfo, seconds: float) -> int:
    """
    Subscribe to iopub without keys for C{seconds}; the number of messages
    received.
    """
    context = zmq.Context()
    sock = context.socket(zmq.SUB)
    sock.linger = 0
    sock.subscribe(b"")
    received = 0
    try:
        sock.connect(info.url("iopub"))
        while sock.poll(seconds * 1000):
            sock.recv_multipart()
            received += 1
    finally:
        sock.close()
        context.term()
    return received


# -- unit tests -----------------------------------------------------------------------


class ConnectionInfoTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """
        Curve keys read from a connection file come back out of to_dict, so
        the file written for the kernel and the persisted snapshot keep them.
        """
        public, secret = zmq.curve_keypair()
        data = {"ip": "127.0.0.1", "key": "k", **PORTS, "curve_publickey": public.decode(), "curve_secretkey": secret.decode()}
        info = ConnectionInfo.from_dict(data)
        self.assertEqual((info.curve_publickey, info.curve_secretkey), (public, secret))
        self.assertTrue(info.encrypted)
        self.assertEqual(ConnectionInfo.from_dict(info.to_dict()), info)
        self.assertEqual(info.to_dict()["curve_secretkey"], secret.decode())

    def test_classic_file_unchanged(self) -> None:
        """
        Without keys the dict is exactly the classic connection file.
        """
        info = ConnectionInfo.from_dict({"ip": "127.0.0.1", "key": "k", **PORTS})
        self.assertFalse(info.encrypted)
        self.assertNotIn("curve_publickey", info.to_dict())
        self.assertNotIn("curve_secretkey", info.to_dict())

    def test_bad_keys(self) -> None:
        """
        Keys that are not 40 Z85 characters, or a secret key alone, are
        refused as bad connection info.
        """
        public, secret = zmq.curve_keypair()
        for extra in (
            {"curve_publickey": "short"},
            {"curve_publickey": public.decode()[:-1] + "~"},
            {"curve_secretkey": secret.decode()},
        ):
            with self.assertRaises(ValueError):
                ConnectionInfo.from_dict({"ip": "127.0.0.1", "key": "k", **PORTS, **extra})


class PolicyTests(SynchronousTestCase):
    def test_declared_support(self) -> None:
        """
        supported_encryption may be a list or a string, any case.
        """
        self.assertTrue(supports_curve({"supported_encryption": ["curve"]}))
        self.assertTrue(supports_curve({"supported_encryption": "Curve"}))
        self.assertFalse(supports_curve({"supported_encryption": []}))
        self.assertFalse(supports_curve({}))

    def test_policies(self) -> None:
        """
        auto gives keys only to kernels that declare support, off to none,
        required refuses the others with 403.
        """
        capable, plain = spec({"supported_encryption": ["curve"]}), spec({})
        public, secret = curve_keys_for(capable, "auto") or (b"", b"")
        self.assertEqual(zmq.curve_public(secret), public)
        self.assertIsNone(curve_keys_for(plain, "auto"))
        self.assertIsNone(curve_keys_for(capable, "off"))
        self.assertIsNotNone(curve_keys_for(capable, "required"))
        with self.assertRaises(LaunchError) as caught:
            curve_keys_for(plain, "required")
        self.assertEqual(caught.exception.status, 403)
        self.assertIn("supported_encryption", str(caught.exception))

    def test_required_refuses_clear_sockets(self) -> None:
        """
        With encryption required, the channel factory refuses a TCP socket
        without a server key, so no code path can reach a kernel in clear.
        """
        from egateway.wire.zmq import ZmqChannelFactory

        channels = ZmqChannelFactory(reactor, require_encryption=True)
        self.addCleanup(channels.close)
        with self.assertRaises(GatewayError) as caught:
            channels.dealer("tcp://127.0.0.1:40001", b"id", lambda frames: None)
        self.assertEqual(caught.exception.status, 403)
        with self.assertRaises(GatewayError):
            channels.subscriber("tcp://127.0.0.1:40002", lambda frames: None)
        public, _ = zmq.curve_keypair()
        channels.dealer("tcp://127.0.0.1:40001", b"id", lambda frames: None, curve_serverkey=public).close()


# -- local kernels through the gateway -------------------------------------------------


class Capture(ProcessProtocol):
    """
    tcpdump writing loopback packets of some ports to a file.
    """

    def __init__(self) -> None:
        self.output = b""
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()

    def errReceived(self, data: bytes) -> None:
        self.output += data
        if b"listening on" in self.output and not self.ready.called:
            self.ready.callback(None)

    def processEnded(self, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(f"tcpdump ended: {self.output.decode(errors='replace')}"))
        self.ended.callback(None)


class LocalKernelTests(TestCase):
    timeout = 180

    async def gateway(self, **flags: Any) -> InProcessGateway:
        gateway = InProcessGateway(**flags)
        await gateway.start()

        async def stop() -> None:
            await gateway.stop()
            self.assertEqual(sorted(p for p in gateway.pids if pid_alive(p)), [], "kernels outlived the test")

        self.addCleanup(stop)
        return gateway

    async def kernel(self, gateway: InProcessGateway, name: str | None = None) -> tuple[dict[str, Any], Any]:
        model = await gateway.start_kernel(name)
        self.addCleanup(gateway.request, "DELETE", f"api/kernels/{model['id']}")
        return model, gateway.manager.kernels[model["id"]].process

    async def test_kernel_refuses_clients_without_keys(self) -> None:
        """
        A local ipykernel started by the gateway gets CurveZMQ keys in its
        connection file; the gateway runs code on it, a client with the
        HMAC key but no CurveZMQ gets no answer and hears nothing on iopub,
        and the same client with the server key is answered.
        """
        gateway = await self.gateway()
        model, process = await self.kernel(gateway)
        with open(process.connection_file) as f:
            written = json.load(f)
        info = process.connection_info
        self.assertTrue(info.encrypted)
        self.assertEqual(written["curve_publickey"].encode(), info.curve_publickey)
        self.assertEqual(zmq.curve_public(written["curve_secretkey"].encode()), info.curve_publickey)
        client = await ChannelsClient.connect(gateway.url, model["id"])
        self.addCleanup(lambda: client.closed.called or client.drop())
        self.assertEqual((await client.execute("print('through the gateway')"))["stdout"].strip(), "through the gateway")

        eavesdropping = deferToThread(listen_iopub_blocking, info, 3.0)
        await client.execute("for i in range(5): print(i)")
        self.assertIsNone(await deferToThread(ask_kernel_info_blocking, info, False))
        self.assertEqual(await eavesdropping, 0, "a subscriber without keys received iopub messages")
        reply = await deferToThread(ask_kernel_info_blocking, info, True, 15.0)
        self.assertIsNotNone(reply, "a CurveZMQ client with the server key was not answered")
        self.assertEqual(reply["status"], "ok")

    async def test_off_means_clear_text(self) -> None:
        """
        With kernel_encryption off the kernel has no keys and any client
        with the HMAC key is answered (the control for the test above).
        """
        gateway = await self.gateway(kernel_encryption="off")
        _, process = await self.kernel(gateway)
        self.assertFalse(process.connection_info.encrypted)
        reply = await deferToThread(ask_kernel_info_blocking, process.connection_info, False, 15.0)
        self.assertIsNotNone(reply)

    async def test_required_refuses_undeclared_kernelspec(self) -> None:
        """
        With encryption required, a kernelspec that does not declare
        CurveZMQ support is refused with 403 and a message naming the
        setting; one that does starts encrypted.
        """
        specs = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(specs, "plain"))
        with open(os.path.join(specs, "plain", "kernel.json"), "w") as f:
            json.dump(
                {"argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                 "display_name": "plain", "language": "python"},
                f,
            )
        gateway = await self.gateway(kernel_encryption="required", kernelspec_path=specs)
        code, body = await gateway.request("POST", "api/kernels", {"name": "plain"})
        self.assertEqual(code, 403, body)
        self.assertIn("kernel_encryption is required", body["message"])
        _, process = await self.kernel(gateway, "python3")
        self.assertTrue(process.connection_info.encrypted)

    async def test_capture_shows_no_clear_text(self) -> None:
        """
        tcpdump on loopback, filtered to the kernel's ports: with CurveZMQ
        neither the code nor its output appears in the captured bytes;
        with encryption off both do.
        """
        tcpdump = shutil.which("tcpdump")
        if tcpdump is None:
            raise SkipTest("tcpdump is not installed (apt-get install tcpdump)")
        if os.geteuid() != 0:
            raise SkipTest("capturing on loopback needs root")
        for setting, visible in (("auto", False), ("off", True)):
            gateway = await self.gateway(kernel_encryption=setting)
            model, process = await self.kernel(gateway)
            client = await ChannelsClient.connect(gateway.url, model["id"])
            self.addCleanup(lambda client=client: client.closed.called or client.drop())
            info = process.connection_info
            ports = [getattr(info, f"{name}_port") for name in ("shell", "iopub", "control", "stdin")]
            pcap = os.path.abspath(self.mktemp()) + ".pcap"
            capture = Capture()
            argv = [tcpdump, "-i", "lo", "--immediate-mode", "-U", "-n", "-s", "0", "-w", pcap,
                    " or ".join(f"tcp port {port}" for port in ports)]
            transport = reactor.spawnProcess(capture, tcpdump, argv, env={"PATH": os.environ.get("PATH", "")})
            self.addCleanup(lambda capture=capture, transport=transport: capture.ended.called or transport.signalProcess("KILL"))
            await capture.ready.addTimeout(20, reactor)
            secret_code = f"SECRETCODE{uuid.uuid4().hex[:8]}"
            secret_output = f"SECRETOUT{uuid.uuid4().hex[:8]}"
            result = await client.execute(f"x = '{secret_code}'\nprint('{secret_output[:6]}' + '{secret_output[6:]}')")
            self.assertEqual(result["stdout"].strip(), secret_output)
            # Let the last packets reach the capture file, then stop it.
            await deferLater(reactor, 0.5, lambda: None)
            transport.signalProcess("INT")
            await capture.ended.addTimeout(20, reactor)
            with open(pcap, "rb") as f:
                captured = f.read()
            self.assertGreater(len(captured), 1000, f"the capture saw no kernel traffic: {capture.output!r} {ports}")
            for marker in (secret_code, secret_output):
                self.assertEqual(
                    marker.encode() in captured, visible,
                    f"kernel_encryption={setting}: {marker} {'missing from' if visible else 'visible in'} the capture",
                )
            client._proto.sendClose()
            await client.closed.addTimeout(10, reactor)


# -- remote kernels: egateway's launcher provisions keys for version 2 --------------------


def spawn_launcher(
    case: TestCase, token: bool, env: dict[str, str] | None = None, python: str = sys.executable
) -> tuple[KernelHarness, Any]:
    """
    Start egateway's launcher with C{python} (a version 2 launch with
    C{token}) and C{env} over the environment (without the caller's
    C{EG_KERNEL_ENCRYPTION}); returns the harness and the pending launch.
    The launcher is stopped (TERM) at the end of the test.
    """
    harness = KernelHarness(case)
    kernel_id = str(uuid.uuid4())
    pending = harness.listener.expect(kernel_id, accept_v1=not token, hosts=["127.0.0.1"])
    original = harness.environment

    def environment(value: str | None) -> dict[str, str]:
        result = original(value)
        result.pop("EG_KERNEL_ENCRYPTION", None)
        # trial -j hands its workers its own sys.path in PYTHONPATH, which
        # would put this environment's ipykernel before C{python}'s.
        result.pop("PYTHONPATH", None)
        result.update(env or {})
        return result

    async def stop() -> None:
        if not harness.process.ended.called:
            os.kill(harness.process.pid, signal.SIGTERM)
            await harness.process.ended.addTimeout(30, reactor)

    harness.environment = environment  # type: ignore[method-assign]
    harness.spawn([python, *launcher_argv(harness.listener, kernel_id)[1:]], pending.token if token else None)
    case.addCleanup(stop)
    return harness, pending


class LauncherCurveTests(TestCase):
    timeout = 180

    async def launch(self, token: bool, env: dict[str, str] | None = None) -> tuple[KernelHarness, dict[str, Any]]:
        harness, pending = spawn_launcher(self, token, env)
        return harness, await harness.receive(pending)

    async def test_version_2_kernel_is_encrypted(self) -> None:
        """
        A version 2 launch reports a CurveZMQ key; the gateway's own link
        (txzmq, as a CurveZMQ client) gets kernel_info while a client without
        the keys gets nothing.
        """
        from egateway.wire.zmq import ZmqChannelFactory

        harness, raw = await self.launch(token=True)
        info = ConnectionInfo.from_dict(dict(raw, ip="127.0.0.1"))
        self.assertTrue(info.encrypted)
        channels = ZmqChannelFactory(reactor, require_encryption=True)
        self.addCleanup(channels.close)
        link = KernelLink(info, channels, reactor, lambda message: None, "remote")
        self.addCleanup(link.close)
        deadline = reactor.seconds() + 30
        while True:
            try:
                reply = await link.request("shell", "kernel_info_request", {}, 2.0)
                break
            except TimeoutError:
                self.assertLess(reactor.seconds(), deadline, harness.process.tail())
        self.assertEqual(reply.content()["status"], "ok")
        self.assertIsNone(await deferToThread(ask_kernel_info_blocking, info, False))

    async def test_opt_out_and_version_1(self) -> None:
        """
        EG_KERNEL_ENCRYPTION=off on the kernel host, or a version 1 launch
        (Enterprise Gateway, which would not use the keys), gives a clear
        text kernel that a plain client can talk to.
        """
        for token, env in ((True, {"EG_KERNEL_ENCRYPTION": "off"}), (False, {})):
            harness, raw = await self.launch(token=token, env=env)
            self.assertNotIn("curve_publickey", raw)
            # Said why when the gateway can show it; version 1 payloads stay as Enterprise Gateway's.
            said = "--kernel-encryption off (EG_KERNEL_ENCRYPTION) on the kernel's host" if token else None
            self.assertEqual(raw.get("encryption_reason"), said)
            info = ConnectionInfo.from_dict(dict(raw, ip="127.0.0.1"))
            reply = None
            deadline = reactor.seconds() + 30
            while reply is None and reactor.seconds() < deadline:
                reply = await deferToThread(ask_kernel_info_blocking, info, False, 2.0)
            self.assertIsNotNone(reply, harness.process.tail())
            os.kill(harness.process.pid, signal.SIGTERM)
            await harness.process.ended.addTimeout(30, reactor)

    def test_required_without_token_refused(self) -> None:
        """
        The launcher refuses to start a kernel it was told must be encrypted
        when the gateway is a version 1 one.
        """
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launchers", "python"))
        try:
            import launch_ipykernel
        finally:
            sys.path.pop(0)
        with self.assertRaises(launch_ipykernel.LaunchFailed):
            launch_ipykernel.curve_keys("required", version_2=False)
        self.assertIsNone(launch_ipykernel.curve_keys("auto", version_2=False))
        self.assertIsNone(launch_ipykernel.curve_keys("off", version_2=True))
        public, secret = launch_ipykernel.curve_keys("auto", version_2=True) or ("", "")
        self.assertEqual(zmq.curve_public(secret.encode()), public.encode())


# -- what the gateway does with a kernel that is not encrypted ---------------------------


class EncryptionStatusTests(SynchronousTestCase):
    """
    The kernel manager with a fake launcher whose kernels report no
    CurveZMQ key.
    """

    def manager(self, policy: str, reason: str = "") -> tuple[Any, Any, Clock]:
        clock = Clock()
        manager, launcher, _ = make_manager(clock, kernel_encryption=policy)
        plain = launcher._new_info

        def new_info() -> ConnectionInfo:
            return replace(plain(), encryption_reason=reason)

        launcher._new_info = new_info
        return manager, launcher, clock

    def test_auto_shows_reason_in_model(self) -> None:
        """
        With auto the kernel starts; its model says its channels are not
        encrypted and gives the launcher's reason, and a warning names it.
        """
        manager, _, _ = self.manager("auto", "ipykernel 6.29.5 bound the kernel's sockets without CurveZMQ")
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        kernel = self.successResultOf(Deferred.fromCoroutine(manager.start_kernel(None, None)))
        model = kernel.model()
        self.assertIs(model["encrypted"], False)
        self.assertEqual(model["encryption_reason"], "ipykernel 6.29.5 bound the kernel's sockets without CurveZMQ")
        warnings = [event for event in logged if "channels not encrypted" in event.get("log_format", "")]
        self.assertEqual(
            [(w["kernel_id"], w["reason"]) for w in warnings], [(kernel.id, model["encryption_reason"])]
        )

    def test_required_refuses_with_reason(self) -> None:
        """
        With required the launch fails with 403 and the reason (a generic
        one when the launcher gave none), and the started process is
        stopped.
        """
        for reason, expected in (("ipykernel 6 cannot", "ipykernel 6 cannot"), ("", "no CurveZMQ key")):
            manager, launcher, clock = self.manager("required", reason)
            failure = self.failureResultOf(Deferred.fromCoroutine(manager.start_kernel(None, None)), LaunchFailed)
            self.assertEqual(failure.value.status, 403)
            self.assertIn("kernel_encryption is required", str(failure.value))
            self.assertIn(expected, str(failure.value))
            clock.advance(10)
            self.assertEqual([p.exited for p in launcher.processes], [True])
            self.assertEqual(manager.kernels, {})

    def test_encrypted_model(self) -> None:
        """
        A kernel with a CurveZMQ key is shown encrypted, without a reason;
        the reason a launcher sent is kept only for kernels without keys,
        survives a snapshot, is never written into a connection file, and
        reaches the model printable and bounded.
        """
        public, secret = zmq.curve_keypair()
        data = {"ip": "127.0.0.1", "key": "k", **PORTS, "encryption_reason": "why"}
        self.assertEqual(ConnectionInfo.from_dict(data).cleartext_reason, "why")
        self.assertNotIn("encryption_reason", ConnectionInfo.from_dict(data).to_dict())
        self.assertEqual(ConnectionInfo.from_dict(ConnectionInfo.from_dict(data).snapshot()).cleartext_reason, "why")
        hostile = ConnectionInfo.from_dict(dict(data, encryption_reason="a\x1b[2J\nb" + "x" * 5000))
        self.assertEqual(hostile.cleartext_reason[:8], "a [2J bx")
        self.assertLessEqual(len(hostile.cleartext_reason), 500)
        self.assertEqual(ConnectionInfo.from_dict(dict(data, encryption_reason=["no"])).encryption_reason, "")
        keyed = ConnectionInfo.from_dict(dict(data, curve_publickey=public.decode()))
        self.assertEqual((keyed.encrypted, keyed.cleartext_reason), (True, ""))
        manager, launcher, _ = self.manager("auto")
        launcher._new_info = lambda: keyed
        kernel = self.successResultOf(Deferred.fromCoroutine(manager.start_kernel(None, None)))
        self.assertIs(kernel.model()["encrypted"], True)
        self.assertNotIn("encryption_reason", kernel.model())
