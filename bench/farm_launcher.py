"""
The launcher of the benchmark's kernel farm (C{bench/kernel_farm.py}).

Registered only by C{bench/scale.py}: it writes an C{egateway.launchers}
entry point (C{bench-farm = bench.farm_launcher:FarmLauncher}) into a
C{.dist-info} directory of its work directory and puts that directory on
the PYTHONPATH of the gateway it starts.  egateway itself does not ship it.

A kernelspec names it as any launcher::

    "metadata": {"egateway": {"launcher": "bench-farm", "config": {"socket": "/path/farm.sock"}}}

Every kernel is a request to the farm over one UNIX-socket connection per
gateway (JSON lines with request ids); the farm's C{ended} events fire the
kernels' exits, and a lost connection to the farm ends every kernel.
"""

from __future__ import annotations

import itertools
import json
import os
import signal as signals
from typing import Any, Mapping

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from zope.interface import implementer

from egateway.clusters.interface import (
    ExitStatus,
    IKernelProcess,
    ILauncher,
    LaunchError,
    LaunchRequest,
    LauncherContext,
    Liveness,
    Phase,
    Placement,
)
from egateway.observe import OneShotObserver
from egateway.wire.channels import ConnectionInfo

_log = Logger()

NAME = "bench-farm"

GC_LOG_ENV = "EGW_BENCH_GC_LOG"
"""
With this variable set (by C{bench/scale.py}), the gateway that loads this
launcher appends every garbage collection of the oldest generation, and
every younger one over 5 ms, to the file it names: C{wall-clock generation
milliseconds collected}.  Instrumentation of the benchmark only.
"""


def _trace_gc(path: str) -> None:
    import gc
    import time

    log = open(path, "a", buffering=1)
    started = [0.0]

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took = (time.perf_counter() - started[0]) * 1000
        if info["generation"] == 2 or took > 5:
            log.write(f"{time.time():.3f} {info['generation']} {took:.1f} {info['collected']}\n")

    gc.callbacks.append(callback)


GC_GARBAGE_ENV = "EGW_BENCH_GC_GARBAGE"
"""
With this variable set as well, every collection keeps what it frees
(C{gc.DEBUG_SAVEALL}) and the trace adds, per collection that freed
anything, the ten commonest types among it: what makes reference cycles.
Slows the gateway; for finding cycles, not for figures.
"""


def _census_garbage(log: Any) -> None:
    import collections
    import gc

    gc.set_debug(gc.DEBUG_SAVEALL)

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase != "stop" or not gc.garbage:
            return
        counts = collections.Counter(_describe(o) for o in gc.garbage)
        gc.garbage.clear()
        log.write(f"# garbage {sum(counts.values())}: {counts.most_common(10)}\n")

    gc.callbacks.append(callback)


def _describe(o: Any) -> str:
    name = type(o).__name__
    if name == "function":
        return f"function {o.__qualname__}"
    if name == "cell":
        try:
            return f"cell of {type(o.cell_contents).__name__}"
        except ValueError:
            return "cell (empty)"
    if name == "frame":
        return f"frame {o.f_code.co_qualname if hasattr(o.f_code, 'co_qualname') else o.f_code.co_name}"
    return name


GC_HEAP_ENV = "EGW_BENCH_GC_HEAP"
"""
With this variable set as well (to a generation: 2, or 1 for the middle
generation's collections too), the trace adds, before each of the first
three collections of that generation or older, how many objects the
collection will walk and the twenty commonest types among them.
"""


def _census_heap(log: Any, oldest: int) -> None:
    import collections
    import gc

    left = [3]

    def callback(phase: str, info: dict[str, Any]) -> None:
        generation = info["generation"]
        if phase != "start" or generation < oldest or not left[0]:
            return
        left[0] -= 1
        walked = [o for g in range(generation + 1) for o in gc.get_objects(g)]
        counts = collections.Counter(_describe(o) for o in walked)
        log.write(f"# heap before a generation {generation} collection: {len(walked)} objects to walk "
                  f"({gc.get_freeze_count()} frozen): {counts.most_common(20)}\n")

    gc.callbacks.append(callback)


LAG_LOG_ENV = "EGW_BENCH_LAG_LOG"
"""
With this variable set (by C{bench/scale.py}), the gateway that loads this
launcher runs a timer every L{LAG_INTERVAL} seconds and appends, once a
second, how late each firing was to the file it names (C{wall-clock
milliseconds...}, one line per second): the reactor's lag as the reactor
itself sees it, at a finer grain than the gateway's own metric (one 1 s
timer).  Instrumentation of the benchmark only.
"""

LAG_INTERVAL = 0.01


def _trace_lag(path: str) -> None:
    import time

    from twisted.internet import reactor

    log = open(path, "a", buffering=1)
    late: list[float] = []
    state = {"due": 0.0, "flushed": 0.0}

    def fire() -> None:
        now = time.monotonic()
        late.append((now - state["due"]) * 1000)
        if now - state["flushed"] >= 1.0:
            log.write(f"{time.time():.3f} " + " ".join(f"{ms:.2f}" for ms in late) + "\n")
            late.clear()
            state["flushed"] = now
        state["due"] = now + LAG_INTERVAL
        reactor.callLater(LAG_INTERVAL, fire)

    def start() -> None:
        state["flushed"] = time.monotonic()
        state["due"] = state["flushed"] + LAG_INTERVAL
        reactor.callLater(LAG_INTERVAL, fire)

    reactor.callWhenRunning(start)


if os.environ.get(LAG_LOG_ENV):
    _trace_lag(os.environ[LAG_LOG_ENV])

if os.environ.get(GC_LOG_ENV):
    _trace_gc(os.environ[GC_LOG_ENV])
    if os.environ.get(GC_GARBAGE_ENV):
        _census_garbage(open(os.environ[GC_LOG_ENV], "a", buffering=1))
    if os.environ.get(GC_HEAP_ENV):
        _census_heap(open(os.environ[GC_LOG_ENV], "a", buffering=1), int(os.environ[GC_HEAP_ENV]))


class _FarmProtocol(LineOnlyReceiver):
    """
    Requests to the farm and their answers, matched by id; C{ended} events
    go to C{on_ended}.
    """

    MAX_LENGTH = 1 << 20
    delimiter = b"\n"

    def __init__(self, on_ended: Any, on_lost: Any) -> None:
        self._ids = itertools.count(1)
        self._pending: dict[int, Deferred[dict[str, Any]]] = {}
        self._on_ended = on_ended
        self._on_lost = on_lost

    def call(self, op: str, **fields: Any) -> Deferred[dict[str, Any]]:
        request_id = next(self._ids)
        waiting: Deferred[dict[str, Any]] = Deferred()
        self._pending[request_id] = waiting
        self.sendLine(json.dumps({"id": request_id, "op": op, **fields}).encode())
        return waiting

    def lineReceived(self, line: bytes) -> None:
        message = json.loads(line)
        if message.get("event") == "ended":
            self._on_ended(str(message.get("kernel")))
            return
        waiting = self._pending.pop(message.get("id"), None)
        if waiting is None:
            return
        if message.get("ok"):
            waiting.callback(message)
        else:
            waiting.errback(LaunchError(f"kernel farm: {message.get('error')}"))

    def connectionLost(self, reason: Any = None) -> None:
        pending, self._pending = self._pending, {}
        for waiting in pending.values():
            waiting.errback(LaunchError("the kernel farm closed its connection"))
        self._on_lost()


@implementer(IKernelProcess)
class FarmKernelProcess:
    def __init__(self, launcher: "FarmLauncher", kernel_id: str, socket_path: str, info: ConnectionInfo,
                 farm_pid: int) -> None:
        self._launcher = launcher
        self.kernel_id = kernel_id
        self.socket_path = socket_path
        self.connection_info = info
        self.placement = Placement(host="bench-farm", ip=info.ip, pid=farm_pid, extra={"simulated": True})
        self._exited: OneShotObserver[ExitStatus] = OneShotObserver()

    def ended(self, status: ExitStatus) -> None:
        if not self._exited.fired:
            self._exited.fire(status)
            self._launcher.forget(self)

    def when_exited(self) -> Deferred[ExitStatus]:
        return self._exited.when_fired()

    def poll(self) -> Deferred[Liveness]:
        if self._exited.fired:
            return succeed(Liveness(False, "ended"))
        d = self._launcher.call(self.socket_path, "alive", kernel=self.kernel_id)
        return d.addCallback(lambda answer: Liveness(bool(answer["alive"]), "" if answer["alive"] else "gone"))

    def signal(self, signum: int) -> Deferred[None]:
        if signum in (signals.SIGTERM, signals.SIGKILL):
            return self.terminate(0).addCallback(lambda _: None)
        return self._launcher.call(self.socket_path, "signal", kernel=self.kernel_id).addCallback(lambda _: None)

    async def _terminate(self) -> ExitStatus:
        if not self._exited.fired:
            await self._launcher.call(self.socket_path, "stop", kernel=self.kernel_id)
            self.ended(ExitStatus(signal=signals.SIGTERM))
        return await self.when_exited()

    def terminate(self, grace: float) -> Deferred[ExitStatus]:
        return Deferred.fromCoroutine(self._terminate())

    def ready(self) -> None:
        pass

    def cleanup(self) -> Deferred[None]:
        return succeed(None)

    def snapshot(self) -> dict:
        return {"socket": self.socket_path, "connection_info": self.connection_info.snapshot()}

    def detach(self) -> None:
        self._launcher.forget(self)


@implementer(ILauncher)
class FarmLauncher:
    """
    Kernels served by the benchmark's kernel farm.
    """

    name = NAME

    def __init__(self, context: LauncherContext) -> None:
        self._reactor = context.reactor
        self._connections: dict[str, OneShotObserver[_FarmProtocol]] = {}
        self._farm_pids: dict[str, OneShotObserver[int]] = {}
        self._kernels: dict[str, FarmKernelProcess] = {}

    def _connect(self, path: str) -> Deferred[_FarmProtocol]:
        connection = self._connections.get(path)
        if connection is None:
            connection = self._connections[path] = OneShotObserver()
            protocol = _FarmProtocol(self._ended, lambda: self._lost(path))

            def failed(failure: Any) -> None:
                self._connections.pop(path, None)
                connection.fire(LaunchError(f"cannot reach the kernel farm at {path}: {failure.getErrorMessage()}"))

            connectProtocol(UNIXClientEndpoint(self._reactor, path), protocol).addCallbacks(connection.fire, failed)
        return connection.when_fired()

    def call(self, path: str, op: str, **fields: Any) -> Deferred[dict[str, Any]]:
        async def go() -> dict[str, Any]:
            protocol = await self._connect(path)
            return await protocol.call(op, **fields)

        return Deferred.fromCoroutine(go())

    def _ended(self, kernel_id: str) -> None:
        process = self._kernels.get(kernel_id)
        if process is not None:
            process.ended(ExitStatus(code=0, reason="the kernel ended (shutdown request or stop)"))

    def _lost(self, path: str) -> None:
        self._connections.pop(path, None)
        for process in [p for p in self._kernels.values() if p.socket_path == path]:
            process.ended(ExitStatus(reason="the kernel farm went away"))

    def forget(self, process: FarmKernelProcess) -> None:
        if self._kernels.get(process.kernel_id) is process:
            del self._kernels[process.kernel_id]

    def _pid(self, path: str) -> Deferred[int]:
        """
        The farm's pid, asked once per farm: 1,000 kernels restored at
        once all wait on the one question.  (Each used to ask for itself,
        and the farm's C{stats} lists its 16,000 descriptors: 1,000 of them
        kept the farm busy for 20 s of a restart, which the benchmark
        counted against the gateway.)
        """
        pid = self._farm_pids.get(path)
        if pid is None:
            pid = self._farm_pids[path] = OneShotObserver()

            def failed(failure: Any) -> None:
                # Ask again next time.
                self._farm_pids.pop(path, None)
                pid.fire(failure)

            self.call(path, "stats").addCallbacks(lambda answer: pid.fire(int(answer["pid"])), failed)
        return pid.when_fired()

    async def _launch(self, request: LaunchRequest) -> IKernelProcess:
        path = str(request.config.get("socket", ""))
        if not path:
            raise LaunchError("the bench-farm kernelspec names no farm socket (config.socket)")
        answer = await self.call(path, "start", kernel=request.kernel_id)
        info = ConnectionInfo.from_dict(
            {**answer["connection_info"], "encryption_reason": "benchmark kernel farm on loopback"}
        )
        request.report(Phase.CONNECTION_INFO, "bench-farm")
        return self._adopt(request.kernel_id, path, info, await self._pid(path))

    def _adopt(self, kernel_id: str, path: str, info: ConnectionInfo, pid: int) -> FarmKernelProcess:
        process = FarmKernelProcess(self, kernel_id, path, info, pid)
        self._kernels[kernel_id] = process
        return process

    def launch(self, request: LaunchRequest) -> Deferred[IKernelProcess]:
        return Deferred.fromCoroutine(self._launch(request))

    async def _restore(self, kernel_id: str, snapshot: Mapping[str, Any]) -> IKernelProcess:
        try:
            path = str(snapshot["socket"])
            info = ConnectionInfo.from_dict(snapshot["connection_info"])
        except (KeyError, TypeError, ValueError) as e:
            raise LaunchError(f"bad bench-farm snapshot: {e}") from None
        answer = await self.call(path, "alive", kernel=kernel_id)
        if not answer["alive"]:
            raise LaunchError("the kernel farm no longer serves this kernel")
        return self._adopt(kernel_id, path, info, await self._pid(path))

    def restore(self, kernel_id: str, snapshot: Mapping[str, Any]) -> Deferred[IKernelProcess]:
        return Deferred.fromCoroutine(self._restore(kernel_id, snapshot))

    def stop(self) -> None:
        connections, self._connections = self._connections, {}
        for connection in connections.values():
            if connection.fired:
                connection.when_fired().addCallback(lambda protocol: protocol.transport.loseConnection())
