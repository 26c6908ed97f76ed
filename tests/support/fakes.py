"""
In-memory stand-ins for unit tests of the kernel manager and API logic.

These are for Clock-driven logic tests only: every behaviour they stand in
for is also exercised against real ipykernel kernels in the integration
tests.  A L{FakeKernelServer} speaks the Jupyter wire protocol (signed
frames) over an in-memory L{FakeChannels} transport: it answers
C{kernel_info_request} and C{shutdown_request} and publishes C{status} on
iopub.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from egateway.clusters.interface import (
    ExitStatus,
    IKernelProcess,
    ILauncher,
    LaunchRequest,
    Liveness,
    Phase,
    Placement,
)
from egateway.wire.channels import ConnectionInfo, IChannelFactory, IChannelSocket
from egateway.wire.protocol import Message, Signer, join_frames, split_frames


class FakeKernelServer:
    """
    The kernel side of one fake kernel.

    @ivar responsive: when false, requests go unanswered (a hung kernel).
    @ivar running: the header of the cell running on shell, if any: shell
        requests wait until L{end_cell} (control is answered meanwhile, as
        ipykernel 6 and newer do from a thread of their own).
    @ivar holding: when true, shell requests wait (a slow shell loop, no
        cell) until L{answer_held}.
    @ivar received: every message received, as C{(channel, Message)}.
    """

    def __init__(self, info: ConnectionInfo) -> None:
        self.info = info
        self.signer = Signer(info.key, info.signature_scheme)
        self.responsive = True
        self.running: dict[str, Any] | None = None
        self.holding = False
        self._waiting: list[tuple[str, bytes, Message]] = []
        self.received: list[tuple[str, Message]] = []
        self.dealers: dict[bytes, dict[str, "FakeSocket"]] = {}
        self.subscribers: list["FakeSocket"] = []
        self.on_shutdown: Any = None

    def publish(self, msg_type: str, content: dict[str, Any], parent: dict[str, Any] | None = None) -> None:
        self.publish_message(Message.build(msg_type, content, "fake-kernel", parent=parent))

    def publish_message(self, message: Message, signature: bytes | None = None) -> None:
        """
        Publish C{message} on iopub, signed, or with C{signature} in place
        of its signature (a forgery).
        """
        frames = join_frames(message, self.signer)
        if signature is not None:
            frames[1] = signature
        for sub in list(self.subscribers):
            sub.deliver(frames)

    def reply(self, identity: bytes, channel: str, msg_type: str, content: dict[str, Any], parent: Message) -> None:
        sock = self.dealers.get(identity, {}).get(channel)
        if sock is None:
            return
        message = Message.build(msg_type, content, "fake-kernel", parent=parent.header)
        sock.deliver(join_frames(message, self.signer))

    def run_cell(self, header: dict[str, Any]) -> None:
        """
        A cell (the request with C{header}) starts running on shell.
        """
        self.running = header
        self.publish("status", {"execution_state": "busy"}, header)

    def end_cell(self) -> None:
        """
        The running cell ends; the shell requests that waited are answered.
        """
        assert self.running is not None
        header, self.running = self.running, None
        self.publish("status", {"execution_state": "idle"}, header)
        self.answer_held()

    def answer_held(self) -> None:
        """
        Answer the shell requests that waited.
        """
        self.holding = False
        waiting, self._waiting = self._waiting, []
        for channel, identity, message in waiting:
            self._answer(channel, identity, message)

    def handle(self, channel: str, identity: bytes, frames: Sequence[bytes]) -> None:
        _, message = split_frames(frames, self.signer)
        self.received.append((channel, message))
        if not self.responsive:
            return
        if channel == "shell" and (self.running is not None or self.holding):
            self._waiting.append((channel, identity, message))
            return
        self._answer(channel, identity, message)

    def _answer(self, channel: str, identity: bytes, message: Message) -> None:
        kind = message.msg_type
        if kind == "kernel_info_request":
            self.publish("status", {"execution_state": "busy"}, message.header)
            self.reply(identity, channel, "kernel_info_reply", {"status": "ok"}, message)
            self.publish("status", {"execution_state": "idle"}, message.header)
        elif kind == "shutdown_request":
            self.reply(identity, channel, "shutdown_reply", {"status": "ok"}, message)
            if self.on_shutdown is not None:
                self.on_shutdown()
        elif kind == "execute_request":
            self.publish("status", {"execution_state": "busy"}, message.header)
            self.reply(identity, channel, "execute_reply", {"status": "ok"}, message)
            self.publish("status", {"execution_state": "idle"}, message.header)


@implementer(IChannelSocket)
class FakeSocket:
    def __init__(self, network: "FakeChannels", url: str, channel: str, identity: bytes, on_frames: Any) -> None:
        self.network = network
        self.url = url
        self.channel = channel
        self.identity = identity
        self.on_frames = on_frames
        self.closed = False

    def deliver(self, frames: Sequence[bytes]) -> None:
        if not self.closed:
            self.on_frames(list(frames))

    def send(self, frames: Sequence[bytes]) -> None:
        if self.closed:
            return
        server = self.network.servers.get(self.url)
        if server is not None:
            server.handle(self.channel, self.identity, frames)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            server = self.network.servers.get(self.url)
            if server is not None:
                if self in server.subscribers:
                    server.subscribers.remove(self)
                server.dealers.get(self.identity, {}).pop(self.channel, None)


@implementer(IChannelFactory)
class FakeChannels:
    """
    Routes sockets to the L{FakeKernelServer} listening on their URL.
    """

    def __init__(self) -> None:
        self.servers: dict[str, FakeKernelServer] = {}
        self.sockets: list[FakeSocket] = []
        self.closed = False

    def serve(self, info: ConnectionInfo) -> FakeKernelServer:
        server = FakeKernelServer(info)
        for channel in ("shell", "iopub", "stdin", "control", "hb"):
            self.servers[info.url(channel)] = server
        return server

    def _channel_of(self, url: str) -> str:
        server = self.servers.get(url)
        if server is None:
            return "?"
        for channel in ("shell", "iopub", "stdin", "control", "hb"):
            if server.info.url(channel) == url:
                return channel
        return "?"

    def dealer(self, url: str, identity: bytes, on_frames: Any, curve_serverkey: bytes | None = None) -> IChannelSocket:
        sock = FakeSocket(self, url, self._channel_of(url), identity, on_frames)
        self.sockets.append(sock)
        server = self.servers.get(url)
        if server is not None:
            server.dealers.setdefault(identity, {})[sock.channel] = sock
        return sock

    def subscriber(self, url: str, on_frames: Any, curve_serverkey: bytes | None = None) -> IChannelSocket:
        sock = FakeSocket(self, url, "iopub", b"", on_frames)
        self.sockets.append(sock)
        server = self.servers.get(url)
        if server is not None:
            server.subscribers.append(sock)
        return sock

    def open_sockets(self) -> list[FakeSocket]:
        return [s for s in self.sockets if not s.closed]

    def close(self) -> None:
        self.closed = True


@implementer(IKernelProcess)
class FakeProcess:
    """
    A launched fake kernel whose end the test controls.
    """

    def __init__(self, launcher: "FakeLauncher", kernel_id: str, info: ConnectionInfo) -> None:
        self.launcher = launcher
        self.kernel_id = kernel_id
        self.connection_info = info
        self.placement = Placement(host="fakehost", ip=info.ip, pid=4242)
        self.signals: list[int] = []
        self.terminations = 0
        self.cleaned = False
        self.is_ready = False
        self.ignores_term = False
        self._exit: ExitStatus | None = None
        self._waiters: list[Deferred[ExitStatus]] = []

    def exit(self, status: ExitStatus) -> None:
        if self._exit is None:
            self._exit = status
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(status)

    @property
    def exited(self) -> bool:
        return self._exit is not None

    def when_exited(self) -> Deferred[ExitStatus]:
        if self._exit is not None:
            return succeed(self._exit)
        waiter: Deferred[ExitStatus] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def poll(self) -> Deferred[Liveness]:
        return succeed(Liveness(self._exit is None))

    def signal(self, signum: int) -> Deferred[None]:
        self.signals.append(signum)
        if signum == 9:
            self.exit(ExitStatus(signal=9))
        elif signum == 15 and not self.ignores_term:
            self.exit(ExitStatus(signal=15))
        return succeed(None)

    def terminate(self, grace: float) -> Deferred[ExitStatus]:
        self.terminations += 1
        if self._exit is not None:
            return succeed(self._exit)
        exited = self.when_exited()
        self.signal(15)
        if not self.exited:
            self.launcher.clock.callLater(grace, self.signal, 9)
        return exited

    def ready(self) -> None:
        self.is_ready = True

    def cleanup(self) -> Deferred[None]:
        self.cleaned = True
        return succeed(None)

    def snapshot(self) -> dict:
        return {"kernel_id": self.kernel_id, "port": self.connection_info.shell_port}

    def detach(self) -> None:
        self.detached = True


@implementer(ILauncher)
class FakeLauncher:
    """
    Launches fake kernels served on a L{FakeChannels} network.

    @ivar hold: when true, launches stay pending until the test fires them
        with L{release}.
    """

    name = "fake"

    def __init__(self, clock: Any, channels: FakeChannels) -> None:
        self.clock = clock
        self.channels = channels
        self.processes: list[FakeProcess] = []
        self.pending: list[tuple[LaunchRequest, Deferred[IKernelProcess]]] = []
        self.cancelled: list[str] = []
        self.hold = False
        self.fail_with: Exception | None = None
        self.unresponsive = False
        self._port = 30000

    def _new_info(self) -> ConnectionInfo:
        self._port += 10
        return ConnectionInfo(
            ip="10.0.0.1",
            shell_port=self._port,
            iopub_port=self._port + 1,
            stdin_port=self._port + 2,
            control_port=self._port + 3,
            hb_port=self._port + 4,
            key=b"secret-key",
        )

    def launch(self, request: LaunchRequest) -> Deferred[IKernelProcess]:
        if self.fail_with is not None:
            from twisted.internet.defer import fail

            return fail(self.fail_with)
        request.report(Phase.SUBMITTED, "fake job 1")
        if self.hold:
            d: Deferred[IKernelProcess] = Deferred(lambda _: self.cancelled.append(request.kernel_id))
            self.pending.append((request, d))
            return d
        return succeed(self._start(request))

    def release(self, index: int = 0) -> None:
        request, d = self.pending.pop(index)
        d.callback(self._start(request))

    def _start(self, request: LaunchRequest) -> FakeProcess:
        info = self._new_info()
        server = self.channels.serve(info)
        server.responsive = not self.unresponsive
        process = FakeProcess(self, request.kernel_id, info)
        server.on_shutdown = lambda: self.clock.callLater(0.1, process.exit, ExitStatus(code=0))
        process.server = server  # type: ignore[attr-defined]
        request.report(Phase.CONNECTION_INFO, "fake")
        self.processes.append(process)
        return process

    def restore(self, kernel_id: str, snapshot: Mapping[str, Any]) -> Deferred[IKernelProcess]:
        """
        The process this launcher started for C{kernel_id} (a gateway
        reattaching to it).
        """
        return succeed(next(p for p in reversed(self.processes) if p.kernel_id == kernel_id))


class StaticSpecs:
    """
    A kernelspec catalog over fixed specs (the real one scans the disk in a
    thread; its tests are in test_specs).
    """

    def __init__(self, *specs: Any, default: str = "") -> None:
        self._specs = {spec.name: spec for spec in specs}
        self.default_name = default or (specs[0].name if specs else "python3")

    def all(self) -> Deferred[dict[str, Any]]:
        return succeed(dict(self._specs))

    async def get(self, name: str) -> Any:
        from egateway.kernels.specs import NoSuchKernelSpec

        try:
            return self._specs[name]
        except KeyError:
            raise NoSuchKernelSpec(name) from None


def fake_spec(name: str = "fake", **fields: Any) -> Any:
    from egateway.kernels.specs import KernelSpec

    data = {
        "argv": ["fake-kernel", "{connection_file}"],
        "display_name": f"Fake {name}",
        "language": "python",
        "metadata": {"egateway": {"launcher": "fake"}},
        **fields,
    }
    return KernelSpec.from_json(name, "/nonexistent", data)


class RecordingClient:
    """
    A kernel client (as a WebSocket would be) that records what it gets.
    """

    def __init__(self) -> None:
        self.messages: list[tuple[str, Message]] = []
        self.seqs: list[int] = []
        self.gone: list[str] = []
        self.ahead: list[tuple[str, Message, int]] = []
        self.withdrawn: list[Message] = []

    def deliver(self, channel: str, message: Message, seq: int = 0) -> None:
        self.messages.append((channel, message))
        self.seqs.append(seq)

    def kernel_gone(self, reason: str) -> None:
        self.gone.append(reason)

    def replaced(self) -> None:
        self.gone.append("replaced")

    def deliver_ahead(self, channel: str, message: Message, seq: int) -> None:
        self.ahead.append((channel, message, seq))

    def withdraw(self, message: Message) -> None:
        self.withdrawn.append(message)

    def statuses(self) -> list[dict[str, Any]]:
        return [
            m.content() for channel, m in self.messages if channel == "iopub" and m.msg_type == "status"
        ]


def make_manager(
    clock: Any,
    *specs: Any,
    persistence: Any = None,
    sharing: Any = None,
    journal_total_bytes: int = 0,
    **settings: Any,
) -> tuple[Any, FakeLauncher, FakeChannels]:
    """
    A L{KernelManager} over fakes, started.

    @param persistence: its persistence factory (default: none).
    @param sharing: its sharing factory (default: none).
    """
    from egateway.clusters.interface import LauncherContext
    from egateway.clusters.registry import LauncherRegistry
    from egateway.config import KernelsConfig
    from egateway.kernels.manager import KernelManager

    channels = FakeChannels()
    launcher = FakeLauncher(clock, channels)
    registry = LauncherRegistry(
        LauncherContext(reactor=clock, runtime_dir="/nonexistent", ports=None),
        extra={"fake": lambda context: launcher},
    )
    manager = KernelManager(
        clock=clock,
        specs=StaticSpecs(*(specs or (fake_spec(),))),
        launchers=registry,
        channels=lambda: channels,
        settings=KernelsConfig(**settings),
        gateway_env={"PATH": "/usr/bin", "EG_AUTH_TOKEN": "secret", "OTHER": "x"},
        default_username="gatewayuser",
        persistence=persistence,
        sharing=sharing,
        journal_total_bytes=journal_total_bytes,
    )
    manager.startService()
    return manager, launcher, channels
