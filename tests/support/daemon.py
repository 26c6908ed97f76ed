"""
Real daemons for integration tests, each a child process listening on a free
loopback port: egateway under C{twistd -n egateway}, and a C{jupyter server}
pointed at it with C{--gateway-url}.

Why child processes and not the gateway inside trial's reactor: these tests
check what an operator gets from the command line (the twistd plugin, flags,
environment, SIGTERM handling) and that nothing outlives the daemon.

Each daemon:
  - writes its output to a log file in the test's temporary directory, and a
    failure to start quotes the end of that log;
  - runs with its own directory named on its command line (egateway's
    C{--data-dir} holds every kernel's connection file, so each kernel's
    command line names it too), which is how anything it leaves behind is
    found in C{/proc};
  - is stopped with SIGTERM, then SIGKILL after a grace period, and then
    anything left that names its directory is killed by pid.

Use L{start_gateway} and L{start_jupyter_server} from an C{async def setUp}.
They register their own cleanup with the test case, which fails the test if
the daemon did not stop by itself or left a process behind.  Cleanups run in
reverse, so start the gateway first: the notebook server then stops first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectError, ConnectionClosed, ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, ResponseNeverReceived
from treq.client import HTTPClient

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""
The checkout under test; the daemon imports egateway and finds its twistd
plugin (C{twisted/plugins/}) from here.
"""

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """
    A TCP port nothing listens on right now.  Another process could take it
    before the daemon binds it, so L{start_gateway} retries on a busy port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    """
    Whether C{pid} is a process that has not exited (zombies count as gone).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


def processes_mentioning(marker: str) -> list[tuple[int, str]]:
    """
    Live processes (not this one) whose command line contains C{marker}, as
    C{(pid, command line)}.  A test's temporary directory or a kernel id
    makes a marker that only that test's processes carry.
    """
    found = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if needle in cmdline and pid_alive(int(entry)):
            found.append((int(entry), cmdline.replace(b"\0", b" ").decode("utf-8", "replace").strip()))
    return found


def _clean_environment(drop_prefixes: Sequence[str]) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(tuple(drop_prefixes))}


# -- processes -------------------------------------------------------------


@dataclass
class ExitReport:
    """
    How a daemon ended.

    @ivar forced: it did not exit within its grace period after SIGTERM and
        was killed.
    @ivar leftovers: processes that named the daemon's directory after it
        exited (they have been killed since).
    """

    name: str
    code: int | None
    signal: int | None
    forced: bool
    leftovers: list[tuple[int, str]] = field(default_factory=list)

    @property
    def graceful(self) -> bool:
        """
        It stopped on SIGTERM by itself and left nothing behind.  twistd
        re-raises the signal it stopped on, so "killed by SIGTERM" counts.
        """
        stopped = self.code == 0 or self.signal in (signal.SIGTERM, signal.SIGINT)
        return stopped and not self.forced and not self.leftovers

    def describe(self) -> str:
        how = f"exit code {self.code}" if self.code is not None else f"signal {self.signal}"
        text = f"{self.name} ended with {how}"
        if self.forced:
            text += " after SIGKILL (it ignored SIGTERM for the whole grace period)"
        if self.leftovers:
            text += "; left behind (now killed): " + "; ".join(
                f"pid {pid}: {cmd}" for pid, cmd in self.leftovers
            )
        return text


class ChildProcess(ProcessProtocol):
    """
    One daemon started with C{spawnProcess}; its stdout and stderr go to
    C{log_path}.
    """

    def __init__(self, name: str, log_path: str, reactor: Any) -> None:
        self.name = name
        self.log_path = log_path
        self._reactor = reactor
        self._log = open(log_path, "ab")
        self.pid: int | None = None
        self.code: int | None = None
        self.signal: int | None = None
        self.ended = False
        self._waiters: list[Deferred[None]] = []
        self.report: ExitReport | None = None
        self.dump_signal: int | None = None
        """
        A signal that makes the process write its threads' stacks to its
        log, sent before SIGKILL so the log says where it was stuck.
        """

    def start(self, argv: Sequence[str], env: Mapping[str, str], cwd: str) -> None:
        self._log.write(f"$ {' '.join(argv)}\n".encode())
        self._log.flush()
        try:
            transport = IReactorProcess(self._reactor).spawnProcess(
                self, argv[0], list(argv), env=dict(env), path=cwd
            )
        except BaseException:
            self._log.close()
            raise
        self.pid = transport.pid

    def outReceived(self, data: bytes) -> None:
        self._log.write(data)
        self._log.flush()

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if isinstance(reason.value, ProcessDone):
            self.code = 0
        else:
            self.code = reason.value.exitCode
            self.signal = reason.value.signal
        self.ended = True
        self._log.close()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def when_ended(self) -> Deferred[None]:
        if self.ended:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def log_tail(self, size: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - size))
                return f.read().decode("utf-8", "replace")
        except OSError as e:
            return f"(no log: {e})"

    def send_signal(self, signum: int) -> None:
        if self.ended or self.transport is None:
            return
        try:
            self.transport.signalProcess(signum)
        except ProcessExitedAlready:
            pass

    async def stop(self, grace: float, marker: str | None = None) -> ExitReport:
        """
        SIGTERM, then SIGKILL if it is still running after C{grace} seconds;
        then kill, by pid, any process still naming C{marker}.  Stopping
        again returns the first report.
        """
        if self.report is not None:
            return self.report
        forced = False
        if not self.ended:
            self.send_signal(signal.SIGTERM)
            try:
                await _bounded(self.when_ended(), grace, self._reactor)
            except TimeoutError:
                forced = True
                if self.dump_signal is not None:
                    self.send_signal(self.dump_signal)
                    try:
                        await _bounded(self.when_ended(), 2, self._reactor)
                    except TimeoutError:
                        pass
                self.send_signal(signal.SIGKILL)
                await _bounded(self.when_ended(), 10, self._reactor)
        leftovers = processes_mentioning(marker) if marker else []
        for pid, _ in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.report = ExitReport(self.name, self.code, self.signal, forced, leftovers)
        return self.report


def _bounded(d: Deferred[Any], seconds: float, reactor: Any) -> Deferred[Any]:
    """
    C{d}, failing with the builtin L{TimeoutError} after C{seconds} (not
    Twisted's own C{defer.TimeoutError}, which C{addTimeout} raises).
    """

    def translate(failure: Failure) -> Failure:
        failure.trap(defer.TimeoutError)
        raise TimeoutError(f"no answer within {seconds:g} s")

    return d.addTimeout(seconds, reactor).addErrback(translate)


# -- HTTP ------------------------------------------------------------------


@dataclass
class Reply:
    code: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class HttpApi:
    """
    JSON over HTTP to one server, with its token; every call is bounded.
    Connections are pooled and closed by L{close}, so trial finds the
    reactor clean.
    """

    def __init__(self, reactor: Any, base_url: str, token: str | None, timeout: float = 30) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.token = token
        self.timeout = timeout
        self._reactor = reactor
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.retryAutomatically = False
        self._client = HTTPClient(Agent(reactor, pool=self._pool))

    def headers(self, token: str | None) -> dict[bytes, list[bytes]]:
        headers = {b"Content-Type": [b"application/json"]}
        if token:
            headers[b"Authorization"] = [f"token {token}".encode()]
        return headers

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout: float | None = None,
        token: Any = ...,
    ) -> Reply:
        """
        C{method} C{path} (relative to the base URL) with C{body} as JSON.
        C{token} overrides the server's token (C{None}: send none).

        @raise TimeoutError: no complete answer within C{timeout} seconds.
        """
        data = json.dumps(body).encode() if body is not None else None
        used_token = self.token if token is ... else token

        async def call() -> Reply:
            response = await self._client.request(
                method,
                self.base_url + path.lstrip("/"),
                data=data,
                headers=self.headers(used_token),
            )
            content = await response.content()
            headers = {
                k.decode().lower(): v[-1].decode("latin-1")
                for k, v in response.headers.getAllRawHeaders()
            }
            return Reply(response.code, content, headers)

        return await _bounded(Deferred.fromCoroutine(call()), timeout or self.timeout, self._reactor)

    async def call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        """
        Like L{request}, but the status must be C{expect}; returns the
        decoded JSON body.
        """
        reply = await self.request(method, path, body)
        if reply.code != expect:
            raise AssertionError(
                f"{method} {self.base_url}{path.lstrip('/')}: expected {expect}, "
                f"got {reply.code}: {reply.body[:2000]!r}"
            )
        return reply.json()

    def close(self) -> Deferred[None]:
        return self._pool.closeCachedConnections()


async def wait_until_answers(
    api: HttpApi, path: str, process: ChildProcess, timeout: float, reactor: IReactorTime
) -> None:
    """
    Poll C{GET path} until it answers 200, the process exits, or C{timeout}
    passes.  Polling is the only way to learn another process is ready.

    @raise RuntimeError: the process exited or never answered; the message
        quotes its log.
    """
    deadline = reactor.seconds() + timeout
    last = "no answer"
    while True:
        if process.ended:
            raise RuntimeError(
                f"{process.name} exited (code {process.code}, signal {process.signal}) "
                f"before answering; its log ends:\n{process.log_tail()}"
            )
        remaining = deadline - reactor.seconds()
        if remaining <= 0:
            raise RuntimeError(
                f"{process.name} did not answer GET {path} within {timeout:g} s ({last}); "
                f"its log ends:\n{process.log_tail()}"
            )
        try:
            # A daemon on loopback answers in milliseconds; a short bound
            # keeps a silent listener on a stolen port from hiding our
            # process's exit for long.
            reply = await api.request("GET", path, timeout=min(2.0, remaining))
        except (ConnectError, ConnectionClosed, ResponseFailed, ResponseNeverReceived, TimeoutError) as e:
            last = f"{type(e).__name__}"
        else:
            if reply.code == 200 and not process.ended:
                return
            last = f"status {reply.code}: {reply.body[:200]!r}"
        await deferLater(reactor, 0.1, lambda: None)


# -- the daemons -----------------------------------------------------------


class _Daemon:
    """
    What both daemons share: a directory, a process, a port, an API client.
    """

    name = "daemon"
    stop_grace = 20.0

    def __init__(self, reactor: Any, workdir: str, port: int, token: str | None) -> None:
        self.reactor = reactor
        self.workdir = workdir
        self.port = port
        self.token = token
        self.url = f"http://{LOOPBACK}:{port}/"
        self.process = ChildProcess(self.name, os.path.join(workdir, f"{self.name}.log"), reactor)
        self.api = HttpApi(reactor, self.url, token)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    async def stop(self) -> ExitReport:
        """
        Stop the daemon (SIGTERM, then SIGKILL after C{stop_grace}) and kill
        whatever it left behind.
        """
        try:
            await self.api.close()
        finally:
            report = await self.process.stop(self.stop_grace, marker=self.workdir)
        return report

    async def _cleanup(self, test: TestCase) -> None:
        if self.process.report is not None:
            # The test stopped it and judged the report itself.
            await self.api.close()
            return
        report = await self.stop()
        if not report.graceful:
            test.fail(f"{report.describe()}; log: {self.process.log_path}, ending:\n{self.process.log_tail(6000)}")


class GatewayDaemon(_Daemon):
    """
    egateway under C{twistd -n egateway}.

    @ivar data_dir: egateway's C{--data-dir}; every kernel's connection file
        is there, so every kernel's command line names it.
    """

    name = "egateway"

    def __init__(self, reactor: Any, workdir: str, port: int, token: str | None) -> None:
        super().__init__(reactor, workdir, port, token)
        self.data_dir = os.path.join(workdir, "runtime")

    def kernel_processes(self, kernel_id: str | None = None) -> list[tuple[int, str]]:
        """
        Live kernel processes this gateway started (all, or the one with
        C{kernel_id}).
        """
        found = processes_mentioning(self.data_dir + os.sep)
        if kernel_id is not None:
            found = [(pid, cmd) for pid, cmd in found if kernel_id in cmd]
        return found

    async def kernel_ids(self) -> list[str]:
        """
        The ids in the gateway's own C{GET /api/kernels} (needs
        C{--list-kernels true}).
        """
        return [model["id"] for model in await self.api.call("GET", "api/kernels")]


async def start_gateway(
    test: TestCase,
    *,
    token: str | None = None,
    flags: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    reactor: Any = None,
    ready_timeout: float = 30,
    port: int | None = None,
    open_files: int | None = None,
) -> GatewayDaemon:
    """
    Start C{twistd -n egateway} on a free loopback port and wait until
    C{GET /api} answers.  The test's cleanup stops it and fails the test if
    it needed SIGKILL or a kernel outlived it.

    @param token: the gateway's auth token (given as C{EG_AUTH_TOKEN}, so it
        does not show in C{ps}).
    @param flags: more command-line settings, e.g. C{{"list-kernels": "true"}}.
    @param env: more environment; C{EG_*}/C{KG_*} from the test's own
        environment are dropped so a developer's settings do not leak in.
    @param port: listen on this port (a gateway restarted where its clients
        expect it) rather than on a free one.
    @param open_files: run it with this open-file limit (util-linux's
        C{prlimit}, which then runs it in its own place).
    """
    if reactor is None:
        from twisted.internet import reactor
    workdir = os.path.abspath(test.mktemp())
    os.makedirs(workdir)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    environ = _clean_environment(("EG_", "KG_"))
    environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p
    )
    if token:
        environ["EG_AUTH_TOKEN"] = token
    environ.update(env or {})
    limit = [shutil.which("prlimit") or "prlimit", f"--nofile={open_files}", "--"] if open_files else []

    def make(free: int) -> GatewayDaemon:
        gateway = GatewayDaemon(reactor, workdir, free, token)
        os.makedirs(gateway.data_dir, mode=0o700, exist_ok=True)
        return gateway

    def argv_for(gateway: GatewayDaemon) -> list[str]:
        return [
            *limit,
            sys.executable,
            twistd,
            "--nodaemon",
            "--pidfile=",
            "egateway",
            f"--listen=tcp:{gateway.port}:interface={LOOPBACK}",
            f"--data-dir={gateway.data_dir}",
            "--response-port=0",
            "--on-stop=shutdown",
            *(f"--{name}={value}" for name, value in (flags or {}).items()),
        ]

    return await _start_daemon(
        test, reactor, make, argv_for, environ, workdir, ready_timeout, "Address already in use", port
    )


_D = TypeVar("_D", bound=_Daemon)


async def _start_daemon(
    test: TestCase,
    reactor: Any,
    make: Callable[[int], _D],
    argv_for: Callable[[_D], list[str]],
    environ: Mapping[str, str],
    workdir: str,
    ready_timeout: float,
    port_taken: str,
    port: int | None = None,
) -> _D:
    """
    Start the daemon C{make} builds for a port (C{port}, else a free one)
    with the command line C{argv_for} gives it, and wait until its C{GET
    /api} answers.  Another process may take a free port before the daemon
    binds it (it happened in busy runs; its log then says C{port_taken}):
    that daemon is stopped and judged here, so its cleanup does not fail
    the test, and another port is tried, three in all.
    """
    last_error: Exception | None = None
    for attempt in range(3):
        daemon = make(port or free_port())
        daemon.process.start(argv_for(daemon), environ, workdir)
        test.addCleanup(daemon._cleanup, test)
        try:
            await wait_until_answers(daemon.api, "api", daemon.process, ready_timeout, reactor)
        except RuntimeError as e:
            if port is None and daemon.process.ended and port_taken in daemon.process.log_tail():
                await daemon.stop()
                last_error = e
                continue
            raise
        return daemon
    raise RuntimeError(f"{daemon.name} found no free port in 3 attempts: {last_error}")


class JupyterServer(_Daemon):
    """
    C{jupyter server} (jupyter_server 2.x), optionally with C{--gateway-url}.

    @ivar root_dir: its C{root_dir} (notebooks and session paths live here).
    """

    name = "jupyter-server"

    def __init__(self, reactor: Any, workdir: str, port: int, token: str | None) -> None:
        super().__init__(reactor, workdir, port, token)
        self.root_dir = os.path.join(workdir, "root")


OFFLINE_JUPYTER_SERVER = {
    "LabApp": {
        "extension_manager": "readonly",
        "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
        "news_url": None,
    }
}
"""
The notebook server's configuration for tests: JupyterLab's defaults reach
PyPI from the server (the "pypi" extension manager lists extensions through
XML-RPC in an executor thread, and the update check fetches
C{pypi.org/pypi/jupyterlab/json}).  Tests send nothing off the machine, and
a blocking XML-RPC call still in flight when the server is told to stop
holds its exit (Python joins the executor's threads): SIGTERM then seemed
ignored for the whole grace period (CI, twice, with a JupyterLab page
freshly opened).
"""

DAEMON_ANYIO_THREADS = """\
# Written by egateway's tests (tests/support/daemon.py).  anyio's worker
# threads are not daemon threads, and jupyter_server's stop on SIGTERM (the
# event loop stopped from a signal) never tells them to end: a server that
# used one in its last seconds (GET /api/nbconvert, which JupyterLab asks
# for each time it loads a page, runs in one) then waits in
# threading._shutdown until SIGKILL (anyio 4.16, jupyter_server 2.21; CI on
# 2026-12-07, the thread's stack dumped by SIGUSR2).  Nothing of the server
# outlives its process either way; this only lets it exit.
import anyio._backends._asyncio as _anyio_asyncio

_worker_init = _anyio_asyncio.WorkerThread.__init__


def _daemon_worker_init(self, *args, **kwargs):
    _worker_init(self, *args, **kwargs)
    self.daemon = True


_anyio_asyncio.WorkerThread.__init__ = _daemon_worker_init
"""
"""
A C{jupyter_server_config.py} for the tests' notebook servers (see its
comment): without it, a server that JupyterLab had just loaded a page from
ignored SIGTERM.
"""


async def start_jupyter_server(
    test: TestCase,
    *,
    token: str,
    gateway: GatewayDaemon | None = None,
    args: Sequence[str] = (),
    reactor: Any = None,
    ready_timeout: float = 45,
) -> JupyterServer:
    """
    Start C{jupyter server} on a free loopback port, with its own token and
    its own Jupyter config, data and runtime directories (nothing from the
    user's), and wait until its C{GET /api} answers.  With C{gateway}, its
    kernels are the gateway's (C{--gateway-url}, and the gateway's token in
    C{JUPYTER_GATEWAY_AUTH_TOKEN}).  The test's cleanup stops it.
    """
    if reactor is None:
        from twisted.internet import reactor
    workdir = os.path.abspath(test.mktemp())
    os.makedirs(workdir)
    environ = _clean_environment(("JUPYTER_", "JPY_", "KERNEL_", "EG_", "KG_"))
    for sub in ("config", "data", "runtime"):
        path = os.path.join(workdir, sub)
        os.makedirs(path)
        environ[f"JUPYTER_{sub.upper()}_DIR"] = path
    environ["JUPYTER_PLATFORM_DIRS"] = "1"
    with open(os.path.join(workdir, "config", "jupyter_server_config.json"), "w") as f:
        json.dump(OFFLINE_JUPYTER_SERVER, f)
    with open(os.path.join(workdir, "config", "jupyter_server_config.py"), "w") as f:
        f.write(DAEMON_ANYIO_THREADS)
    if gateway is not None and gateway.token:
        environ["JUPYTER_GATEWAY_AUTH_TOKEN"] = gateway.token

    def make(free: int) -> JupyterServer:
        server = JupyterServer(reactor, workdir, free, token)
        os.makedirs(server.root_dir, exist_ok=True)
        server.process.dump_signal = signal.SIGUSR2
        return server

    def argv_for(server: JupyterServer) -> list[str]:
        argv = [
            sys.executable,
            "-c",
            # jupyter_server, able to show where it is stuck (SIGUSR2: every
            # thread's stack to its log) if it ignores SIGTERM.
            "import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR2, all_threads=True); "
            "from jupyter_server.serverapp import main; sys.exit(main())",
            "--no-browser",
            f"--ServerApp.ip={LOOPBACK}",
            f"--ServerApp.port={server.port}",
            "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={server.root_dir}",
            "--ServerApp.terminals_enabled=False",
            f"--IdentityProvider.token={token}",
        ]
        if os.geteuid() == 0:
            argv.append("--allow-root")
        if gateway is not None:
            argv.append(f"--gateway-url={gateway.url.rstrip('/')}")
        return [*argv, *args]

    return await _start_daemon(test, reactor, make, argv_for, environ, workdir, ready_timeout, "is not available")
