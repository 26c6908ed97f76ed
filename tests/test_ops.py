"""
Operating the gateway: health and readiness probes, draining for rolling
upgrades (admin API and SIGUSR1).

The routes run in memory (StubTreq, Clock) over fake launchers; the daemon
tests drive a real C{twistd egateway} with real kernels and a real Redis.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from typing import Any

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from egateway.ops.health import Drain, Readiness
from egateway.store.crypto import SecretBox
from egateway.tap import build_api, expose_probes
from tests.fixtures import RedisServer
from tests.fixtures.system import REDIS_PACKAGES, require_packages
from tests.support.daemon import GatewayDaemon, Reply, free_port, start_gateway
from tests.support.stubapi import assert_json_error
from tests.support.wsclient import ChannelsClient
from tests.test_api import APITestCase
from tests.test_tenancy import TenancyTestCase


class Probes(APITestCase):
    flags = {"auth-token": "s3cret", "auth-failure-limit": "0"}

    def setUp(self) -> None:
        super().setUp()
        # As build_service wires them.
        self.api, front = build_api(self.config, self.manager, self.clock, ThreadPool())
        expose_probes(front, self.api.ops, self.config.server.base_url)
        self.stub = StubTreq(front)

    def test_healthz_and_readyz_need_no_token(self) -> None:
        """
        With token authentication on, both probes answer 200 without a token
        and say nothing beyond their status.
        """
        for path, status in (("/healthz", "ok"), ("/readyz", "ready")):
            code, body, headers = self.call("GET", path)
            self.assertEqual((code, body), (200, {"status": status}))
            self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])

    def test_only_the_probes_are_public(self) -> None:
        """
        Paths near the probes' and the drain switch still need the token.
        """
        for method, path in (
            ("GET", "/healthz/x"),
            ("GET", "/readyz/"),
            ("GET", "//healthz"),
            ("POST", "/api/admin/drain"),
            ("GET", "/api/admin/drain"),
        ):
            assert_json_error(self, self.call(method, path), 401)
        self.assertFalse(self.api.ops.drain.draining)

    def test_readyz_during_drain(self) -> None:
        """
        While draining, /readyz answers a JSON 503 with Retry-After and
        /healthz stays 200; after the drain, /readyz is 200 again.
        """
        self.api.ops.drain.set(True, by="test")
        result = self.call("GET", "/readyz")
        assert_json_error(self, result, 503)
        self.assertEqual(result[2].getRawHeaders(b"retry-after"), [b"30"])
        self.assertEqual(self.call("GET", "/healthz")[0], 200)
        self.api.ops.drain.set(False, by="test")
        self.assertEqual(self.call("GET", "/readyz")[0], 200)


class AdminDrain(TenancyTestCase):
    def test_drain_refuses_new_kernels_and_serves_old_ones(self) -> None:
        """
        An admin drains the gateway: new kernels (and sessions) are refused
        with a JSON 503 and Retry-After, existing ones are still served;
        undrain admits new kernels again.
        """
        model = self.start("alice")
        code, body, _ = self.call("POST", "/api/admin/drain", user="carol")
        self.assertEqual((code, body), (200, {"draining": True}))
        code, body, headers = self.call("POST", "/api/kernels", {}, user="alice")
        self.refused((code, body, headers), 503, "draining")
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"30"])
        self.refused(self.call("POST", "/api/sessions", {"path": "a.ipynb", "type": "notebook"}, "alice"), 503)
        code, got, _ = self.call("GET", f"/api/kernels/{model['id']}", user="alice")
        self.assertEqual((code, got["id"]), (200, model["id"]))
        self.assertEqual(self.call("POST", f"/api/kernels/{model['id']}/restart", user="alice")[0], 200)
        self.assertEqual(self.call("GET", "/api/admin/drain", user="carol")[1], {"draining": True})
        code, body, _ = self.call("POST", "/api/admin/undrain", user="carol")
        self.assertEqual((code, body), (200, {"draining": False}))
        self.start("alice")

    def test_only_admins_drain(self) -> None:
        """
        A user who is not an administrator can neither drain, undrain nor
        look: 403, and the gateway keeps admitting kernels.
        """
        for method in ("POST", "DELETE", "GET"):
            self.refused(self.call(method, "/api/admin/drain", user="alice"), 403, "administrator")
        self.start("bob")
        self.assertEqual(self.call("DELETE", "/api/admin/drain", user="carol")[1], {"draining": False})


class ReadinessChecks(SynchronousTestCase):
    def test_store_that_does_not_answer(self) -> None:
        """
        A store that does not answer within the timeout makes the gateway
        not ready, once the timeout passes on the clock; probes arriving
        meanwhile share one store round trip.
        """
        from twisted.internet.task import Clock

        clock = Clock()
        asked: list[Deferred[Any]] = []

        class Persistence:
            class store:
                @staticmethod
                def load_kernel(kernel_id: str) -> Deferred[Any]:
                    asked.append(Deferred())
                    return asked[-1]

        readiness = Readiness(clock, Drain(30), lambda: Persistence, 2.0)
        probes = [Deferred.fromCoroutine(readiness.problems()) for _ in range(3)]
        self.assertNoResult(probes[0])
        self.assertEqual(len(asked), 1)
        clock.advance(2.0)
        for probe in probes:
            self.assertEqual(self.successResultOf(probe), ["the store did not answer within 2 s"])
        d = Deferred.fromCoroutine(readiness.problems())
        asked[-1].callback(None)
        self.assertEqual((self.successResultOf(d), len(asked)), ([], 2))


async def until(condition: Any, what: str, timeout: float = 20.0) -> None:
    """
    Poll another process until C{condition()} (a coroutine function) is
    true; there is no event to wait on across processes.
    """
    deadline = reactor.seconds() + timeout
    while not await condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.1, lambda: None)


async def status_of(gateway: GatewayDaemon, path: str) -> Reply:
    return await gateway.api.request("GET", path, token=None)


class DaemonDrain(TestCase):
    timeout = 120

    async def test_sigusr1_drains(self) -> None:
        """
        SIGUSR1 drains a real daemon: /readyz turns 503, a new kernel is
        refused with 503 + Retry-After, an existing kernel still runs code.
        """
        audit_log = os.path.abspath(self.mktemp())
        gateway = await start_gateway(self, token="s3cret", flags={"audit-log": audit_log})

        async def ready() -> bool:
            return (await status_of(gateway, "readyz")).code == 200

        async def not_ready() -> bool:
            return (await status_of(gateway, "readyz")).code == 503

        # The API can answer a moment before the store is open, and /readyz
        # is 503 until the store answers its probe.
        await until(ready, "/readyz to answer 200 once started")
        model = await gateway.api.call("POST", "api/kernels", {}, expect=201)
        os.kill(gateway.pid, signal.SIGUSR1)

        await until(not_ready, "/readyz to answer 503 after SIGUSR1")
        refused = await gateway.api.request("POST", "api/kernels", {})
        self.assertEqual(refused.code, 503, refused.body)
        self.assertEqual(set(refused.json()), {"reason", "message"})
        self.assertEqual(refused.headers["retry-after"], "30")
        client = await ChannelsClient.connect(gateway.url, model["id"], token="s3cret")
        self.addCleanup(client.close)
        result = await client.execute("6 * 7")
        self.assertEqual(result["result"]["text/plain"], "42")
        self.assertEqual((await status_of(gateway, "healthz")).code, 200)

        async def audited() -> bool:
            return any(json.loads(line)["kind"] == "gateway.drain" for line in read_lines(audit_log))

        await until(audited, "the drain in the audit log")


class StoreReadiness(TestCase):
    timeout = 120

    async def test_readyz_follows_redis(self) -> None:
        """
        With kernels kept in Redis, /readyz answers 503 while Redis is
        stopped and 200 again once it is back; /healthz stays 200.
        """
        require_packages(*REDIS_PACKAGES)
        redis = RedisServer(tempfile.mkdtemp(prefix="egw-", dir="/tmp"))
        redis.up()
        self.addCleanup(redis.down)
        gateway = await start_gateway(
            self,
            flags={"persistence": "true", "store-url": redis.url, "readiness-timeout": "1"},
            env={"EG_STORE_KEY": SecretBox.generate_key()},
        )

        async def ready() -> bool:
            return (await status_of(gateway, "readyz")).code == 200

        # The API answers a moment before the store is open.
        await until(ready, "/readyz to answer 200 once the store is open")
        redis.stop()
        reply = await status_of(gateway, "readyz")
        self.assertEqual(reply.code, 503, reply.body)
        self.assertEqual(reply.json(), {"reason": "Service Unavailable", "message": "not ready"})
        self.assertEqual((await status_of(gateway, "healthz")).code, 200)
        redis.start()
        await until(ready, "/readyz to answer 200 once Redis is back")


# -- logs --------------------------------------------------------------------


class JsonRecords(SynchronousTestCase):
    def test_record_fields(self) -> None:
        """
        A JSON record has time, level, namespace, the rendered message and
        the event's plain fields, but no credential and no object dumps.
        """
        from twisted.logger import LogLevel

        from egateway.ops.logs import json_record

        record = json_record(
            {
                "log_format": "kernel {kernel_id} started for {user}",
                "log_level": LogLevel.warn,
                "log_namespace": "egateway.kernels",
                "log_time": 0.5,
                "kernel_id": "k1",
                "user": "alice",
                "launcher": "local",
                "auth_token": "s3cret",
                "spec": object(),
            }
        )
        self.assertEqual(
            record,
            {
                "time": "1970-01-01T00:00:00.500Z",
                "level": "warn",
                "namespace": "egateway.kernels",
                "message": "kernel k1 started for alice",
                "kernel_id": "k1",
                "user": "alice",
                "launcher": "local",
            },
        )

    def test_level(self) -> None:
        """
        With log_level warn, info events are dropped and warnings kept.
        """
        import io

        from twisted.logger import Logger, LogPublisher

        from egateway.ops.logs import MainLog, filtered

        stream = io.StringIO()
        publisher = LogPublisher(filtered(MainLog("json", stream=stream), "warn"))
        log = Logger(namespace="t", observer=publisher)
        log.info("quiet {kernel_id}", kernel_id="k1")
        log.warn("loud {kernel_id}", kernel_id="k2")
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        self.assertEqual([(r["message"], r["kernel_id"]) for r in lines], [("loud k2", "k2")])


    def test_under_twist(self) -> None:
        """
        Under twist, --log-format=json on egateway's side makes twist write
        egateway's JSON lines at egateway's level; with egateway's log
        settings left alone, twist's own log options stay in charge.
        """
        import io

        from twisted.logger import LogLevel

        from egateway.config import build_config
        from egateway.ops.logs import install

        stream = io.StringIO()
        twist_options: dict[str, Any] = {"fileLogObserverFactory": None, "logFile": stream, "logLevel": LogLevel.info}
        self.assertIsNone(install(build_config({}, {}, {}).ops, dict(twist_options), None))
        settings = build_config({}, {}, {"log-format": "json", "log-level": "warn"}).ops
        main = install(settings, twist_options, None)
        self.assertEqual(twist_options["logLevel"], LogLevel.warn)
        observer = twist_options["fileLogObserverFactory"](stream)
        self.assertIs(observer, main)
        observer({"log_format": "kernel {kernel_id}", "log_level": LogLevel.warn, "log_namespace": "t", "kernel_id": "k"})
        self.assertEqual(json.loads(stream.getvalue())["kernel_id"], "k")


def read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


class DaemonLogs(TestCase):
    timeout = 120

    async def test_json_lines_carry_the_kernel_id(self) -> None:
        """
        Under twistd with --log-format=json, every line of the log file is a
        JSON object, a kernel's own output is logged with its kernel_id, and
        its state changes with its user and launcher.
        """
        log_file = os.path.abspath(self.mktemp())
        gateway = await start_gateway(self, flags={"log-format": "json", "log-file": log_file})
        model = await gateway.api.call("POST", "api/kernels", {}, expect=201)
        client = await ChannelsClient.connect(gateway.url, model["id"])
        self.addCleanup(client.close)
        await client.execute("import sys; print('output-marker-7e1', file=sys.__stderr__, flush=True)")

        async def marker_logged() -> bool:
            return any("output-marker-7e1" in line for line in read_lines(log_file))

        await until(marker_logged, "the kernel's output line in the log")
        records = [json.loads(line) for line in read_lines(log_file)]
        for record in records:
            self.assertLessEqual({"time", "level", "namespace", "message"}, set(record))
        output = [r for r in records if "output-marker-7e1" in r["message"]]
        self.assertEqual(output[0]["kernel_id"], model["id"])
        states = [r for r in records if r.get("kernel_id") == model["id"] and "launcher" in r]
        self.assertTrue(states, "no kernel state change with its launcher")
        self.assertEqual(states[0]["launcher"], model["launcher"])
        self.assertEqual(states[0]["user"], model["username"])

    async def test_sighup_reopens_the_logs(self) -> None:
        """
        After logrotate's rename and SIGHUP, the main log and the audit log
        write new lines to new files at their old paths.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        main, audit_log = os.path.join(directory, "main.log"), os.path.join(directory, "audit.log")
        gateway = await start_gateway(
            self, token="s3cret", flags={"log-file": main, "audit-log": audit_log}
        )
        os.rename(main, main + ".1")
        os.rename(audit_log, audit_log + ".1")
        os.kill(gateway.pid, signal.SIGHUP)

        async def reopened() -> bool:
            return any("log files reopened" in line for line in read_lines(main))

        await until(reopened, "the main log to be reopened")
        self.assertEqual((await gateway.api.request("GET", "api", token="wrong")).code, 401)

        async def audited() -> bool:
            return any("auth.failure" in line for line in read_lines(audit_log))

        await until(audited, "the audit event in the new audit file")
        self.assertFalse(any("log files reopened" in line for line in read_lines(main + ".1")))


# -- packaging ---------------------------------------------------------------

CONSOLE_SCRIPT = "from egateway.cli import main; main()"
"""
What the installed C{egateway} script runs (setup.cfg's entry point).
"""


async def run_to_end(test: TestCase, argv: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """
    Run a command in a fresh directory until it exits; its exit code and
    output (without the command line the log starts with).
    """
    from tests.support.daemon import ChildProcess

    workdir = os.path.abspath(test.mktemp())
    os.makedirs(workdir)
    process = ChildProcess("command", os.path.join(workdir, "command.log"), reactor)
    process.start(argv, gateway_environment(env), workdir)
    ended = process.when_ended()
    ended.addTimeout(timeout, reactor)
    await ended
    output = process.log_tail(100000).split("\n", 1)[1]
    return process.code, output


def gateway_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    from tests.support.daemon import REPO_ROOT

    environ = {k: v for k, v in os.environ.items() if not k.startswith(("EG_", "KG_"))}
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    environ.update(extra or {})
    return environ


class Packaging(TestCase):
    timeout = 120

    def test_entry_point(self) -> None:
        """
        setup.cfg installs the egateway console script that these tests run.
        """
        import configparser

        from tests.support.daemon import REPO_ROOT

        parser = configparser.ConfigParser()
        parser.read(os.path.join(REPO_ROOT, "setup.cfg"))
        scripts = parser["options.entry_points"]["console_scripts"].split("\n")
        self.assertIn("egateway = egateway.cli:main", [line.strip() for line in scripts])

    async def test_help_groups_settings(self) -> None:
        """
        egateway --help lists the settings under their sections, each with
        its default.
        """
        code, output = await run_to_end(self, [sys.executable, "-c", CONSOLE_SCRIPT, "--help"], {})
        self.assertEqual(code, 0, output)
        for section in ("[server]", "[auth]", "[kernels]", "[store]", "[ops]"):
            self.assertIn(f"\n{section}\n", output)
        self.assertLess(output.index("[server]"), output.index("--listen="))
        self.assertLess(output.index("--listen="), output.index("[auth]"))
        self.assertIn("--listen=  [default: tcp:8888:interface=127.0.0.1]", output)
        self.assertIn("--drain-retry-after=  [default: 30; env EG_DRAIN_RETRY_AFTER]", output)

    async def test_console_script_runs_the_daemon(self) -> None:
        """
        The console script serves the API in the foreground, leaves no
        twistd.pid in its directory, and stops cleanly on SIGTERM.
        """
        await self._serves_without_pidfile([sys.executable, "-c", CONSOLE_SCRIPT])

    async def test_readme_command_leaves_no_pidfile(self) -> None:
        """
        The README's `twistd -n egateway` writes no twistd.pid in the
        current directory.
        """
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        await self._serves_without_pidfile([sys.executable, twistd, "-n", "egateway"])

    async def _serves_without_pidfile(self, command: list[str]) -> None:
        from tests.support.daemon import ChildProcess, HttpApi, free_port, wait_until_answers

        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        port = free_port()
        process = ChildProcess("egateway", os.path.join(workdir, "egateway.log"), reactor)
        argv = [
            *command,
            f"--listen=tcp:{port}:interface=127.0.0.1",
            f"--data-dir={os.path.abspath(self.mktemp())}",
            "--response-port=0",
        ]
        process.start(argv, gateway_environment(), workdir)
        api = HttpApi(reactor, f"http://127.0.0.1:{port}/", None)
        self.addCleanup(api.close)
        try:
            await wait_until_answers(api, "healthz", process, 30, reactor)
            self.assertEqual(os.listdir(workdir), ["egateway.log"])
        finally:
            report = await process.stop(20, marker=workdir)
        self.assertTrue(report.graceful, f"{report.describe()}: {process.log_tail()}")

    async def test_data_directory_that_cannot_be_created(self) -> None:
        """
        A service account whose home cannot hold the data directory gets a
        one-line error naming it, and a non-zero exit, not a traceback.
        """
        home = os.path.abspath(self.mktemp())
        with open(home, "w") as f:
            f.write("a file, not a directory\n")
        code, output = await run_to_end(
            self,
            [sys.executable, "-c", CONSOLE_SCRIPT, "--listen=tcp:0:interface=127.0.0.1", "--response-port=0"],
            {"HOME": home, "XDG_DATA_HOME": "", "EG_PERSISTENCE": "true"},
        )
        self.assertNotEqual(code, 0)
        self.assertNotIn("Traceback", output)
        # twistd sends stderr to its log, so the line has a log prefix.
        errors = [line for line in output.splitlines() if "egateway: " in line]
        self.assertEqual(len(errors), 1, output)
        self.assertIn(f"egateway: cannot create the data directory {home}/.local", errors[0])


# -- manhole -----------------------------------------------------------------


def write_key_pair(directory: str, name: str) -> str:
    """
    A fresh Ed25519 key pair for OpenSSH's ssh (private key mode 0600);
    returns the private key's path (the public key is next to it, .pub).
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from twisted.conch.ssh.keys import Key

    key = Key(Ed25519PrivateKey.generate())
    path = os.path.join(directory, name)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as f:
        f.write(key.toString("openssh"))
    with open(path + ".pub", "wb") as f:
        f.write(key.public().toString("openssh") + b" test@" + name.encode() + b"\n")
    return path


class SSHClient(ProcessProtocol):
    """
    OpenSSH's ssh with a pseudo-terminal, driven as a person would: wait for
    some text, type a line.
    """

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[int | None] = Deferred()
        self._expected: list[tuple[bytes, Deferred[None]]] = []

    @classmethod
    def start(cls, test: TestCase, port: int, key: str, workdir: str) -> "SSHClient":
        client = cls()
        test.addCleanup(client.stop)
        argv = [
            "ssh", "-tt", "-F", "/dev/null", "-i", key, "-p", str(port),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10", "operator@127.0.0.1",
        ]
        reactor.spawnProcess(client, "/usr/bin/ssh", argv, env={"PATH": os.environ["PATH"]}, path=workdir)
        return client

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for text, waiter in list(self._expected):
            if text in self.output:
                self._expected.remove((text, waiter))
                waiter.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None))
        for _, waiter in self._expected:
            waiter.errback(AssertionError(f"ssh ended; it printed {self.output[-2000:]!r}"))
        self._expected = []

    def expect(self, text: str, timeout: float = 20) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        if text.encode() in self.output:
            waiter.callback(None)
        else:
            self._expected.append((text.encode(), waiter))
            waiter.addTimeout(timeout, reactor)
        return waiter

    async def stop(self) -> None:
        if not self.ended.called:
            self.transport.signalProcess("KILL")
        await self.exit_code()

    async def exit_code(self) -> int | None:
        """
        Wait (bounded) for ssh to exit; its exit code.
        """
        waiter: Deferred[int | None] = Deferred()
        self.ended.addBoth(lambda result: (waiter.callback(result), result)[1] if not waiter.called else result)
        return await waiter.addTimeout(20, reactor)

    def type(self, line: str) -> None:
        self.transport.write(line.encode() + b"\r")


class Manhole(TestCase):
    timeout = 120

    async def test_listed_key_only(self) -> None:
        """
        Against a running daemon, ssh with the listed key gets a prompt where
        kernels() lists the live kernel; another key is refused.  The login,
        the command and the refusal are in the audit log.
        """
        require_packages("openssh-client")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        good = write_key_pair(directory, "operator")
        other = write_key_pair(directory, "stranger")
        audit_log = os.path.join(directory, "audit.log")
        port = free_port()
        gateway = await start_gateway(
            self,
            flags={
                "manhole-listen": f"tcp:{port}:interface=127.0.0.1",
                "manhole-authorized-keys": good + ".pub",
                "audit-log": audit_log,
            },
        )
        model = await gateway.api.call("POST", "api/kernels", {}, expect=201)

        client = SSHClient.start(self, port, good, directory)
        await client.expect(">>> ")
        client.type("kernels()")
        await client.expect(model["id"])
        client.type("show(" + repr(model["id"][:8]) + ")")
        await client.expect("launcher")
        client.transport.write(b"\x04")
        # The manhole hangs up on ^D without an exit status: ssh says 255.
        await client.exit_code()

        refused = SSHClient.start(self, port, other, directory)
        self.assertEqual(await refused.exit_code(), 255)
        self.assertIn(b"Permission denied (publickey)", refused.output)
        self.assertNotIn(b">>> ", refused.output)

        async def audited() -> bool:
            kinds = [json.loads(line)["kind"] for line in read_lines(audit_log)]
            return {"manhole.login", "manhole.command", "manhole.refused"} <= set(kinds)

        await until(audited, "the manhole's audit events")
        commands = [json.loads(line) for line in read_lines(audit_log)]
        self.assertIn("kernels()", [r.get("command") for r in commands if r["kind"] == "manhole.command"])

    def test_settings(self) -> None:
        """
        The manhole listens on loopback or a UNIX socket only, and only with
        an authorized_keys file.
        """
        from egateway.config import ConfigError
        from egateway.validation import load_config

        keys = {"manhole-authorized-keys": "/etc/egateway/manhole_keys"}
        for listen in ("tcp:2222", "tcp:2222:interface=0.0.0.0", "ssl:2222:interface=127.0.0.1"):
            self.assertRaises(ConfigError, load_config, {}, {}, {"manhole-listen": listen, **keys})
        self.assertRaises(ConfigError, load_config, {}, {}, {"manhole-listen": "unix:/run/m"})
        for listen in ("tcp:2222:interface=127.0.0.1", "tcp6:2222:interface=\\:\\:1", "unix:/run/m"):
            load_config({}, {}, {"manhole-listen": listen, **keys})
