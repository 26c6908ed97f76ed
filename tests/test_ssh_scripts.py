"""
The shell scripts the SSH launcher runs on kernel hosts, run here with the
real C{sh} (they are constant texts; only their arguments and stdin vary),
and the command line and stdin the launcher sends: what starts a kernel
must leave no secret in a process listing or in the kernel's environment,
and what signals a kernel must reach only the process the gateway started.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from egateway.clusters.interface import LaunchError, LauncherContext, LaunchSettings, Placement
from egateway.clusters.remote import reported_id
from egateway.clusters.ssh import SSHKernelProcess, SSHLauncher
from egateway.clusters.ssh_host import (
    CHECKED_KILL_SCRIPT,
    NOT_THE_KERNEL,
    START_SCRIPT,
    RunAs,
    StartedProcess,
    checked_kill_argv,
    start_input,
)
from egateway.clusters.sshclient import CommandResult
from egateway.config import build_config
from egateway.kernels.specs import KernelSpec
from egateway.wire.channels import ConnectionInfo
from tests.support.contract import request_for
from tests.test_handshake import INFO

KERNEL_ID = "5a1b2c3d-0000-4000-8000-000000000001"

SHOW = r"""
import json, os, sys
token = sys.stdin.readline().strip()
with open("/proc/self/environ", "rb") as f:
    environ = f.read()
with open(sys.argv[1], "w") as out:
    out.write(json.dumps({"token": token, "env": os.environ.get("KERNEL_X"),
                          "flag": os.environ.get("EG_LAUNCH_TOKEN_STDIN"),
                          "token_in_environ": b"s3cret-token" in environ,
                          "pid": os.getpid(), "pgid": os.getpgid(0)}))
"""
"""
Started by the start script: writes what it got to the FIFO it is given.
"""


def read_json_from_fifo(path: str, timeout: float = 20.0) -> Any:
    """
    The JSON object a writer sends through the FIFO C{path}, waiting at
    most C{timeout} seconds for it.  Opened read-write, so the open does
    not wait for the writer and its arrival is a select() away.
    """
    fd = os.open(path, os.O_RDWR)
    data = b""
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                raise AssertionError(f"nothing came through {path} within {timeout:g}s")
            data += os.read(fd, 65536)
            try:
                return json.loads(data)
            except ValueError:
                continue
    finally:
        os.close(fd)


def start_time(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[19]


def sh(argv: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["sh", "-c", *argv], input=stdin, capture_output=True, timeout=30, check=False)


class StartScriptTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="egw-start-")
        self.addCleanup(subprocess.run, ["rm", "-rf", self.dir])

    def run_start(self, token: str, env: dict[str, str], argv: list[str]) -> tuple[StartedProcess, str]:
        log = os.path.join(self.dir, "kernel.log")
        result = sh([START_SCRIPT, "egateway-launch", log, *argv], start_input(token, env))
        self.assertEqual(result.returncode, 0, result.stderr)
        started = StartedProcess.parse(result.stdout)
        return started, log

    def test_token_on_stdin_environment_off_the_command_line(self) -> None:
        """
        The kernel gets its environment and the token on stdin, not the
        token in its environment; it leads its own session and group; the
        script reports its pid and start time.
        """
        fifo = os.path.join(self.dir, "shown")
        os.mkfifo(fifo)
        started, log = self.run_start(
            "s3cret-token", {"KERNEL_X": "a b 'c' $d `e`", "PATH": "/nonexistent"},
            [sys.executable, "-c", SHOW, fifo],
        )
        shown = read_json_from_fifo(fifo)
        self.assertEqual(shown["token"], "s3cret-token")
        self.assertEqual(shown["env"], "a b 'c' $d `e`")
        self.assertEqual(shown["flag"], "1")
        self.assertFalse(shown["token_in_environ"])
        self.assertEqual((shown["pid"], shown["pgid"]), (started.pid, started.pid))
        self.assertTrue(started.start_time.isdigit())
        self.assertEqual(os.stat(log).st_mode & 0o777, 0o600)

    def test_refuses_values_that_are_not_one_line(self) -> None:
        """
        A value with a line break cannot travel as one line: the launch
        fails naming the variable rather than passing something else on.
        """
        for value in ("a\nb", "a\rb", "a\0b"):
            self.assertRaises(LaunchError, start_input, "t", {"KERNEL_X": value})
        self.assertRaises(LaunchError, start_input, "t", {"NOT A NAME": "x"})
        self.assertEqual(start_input("t", {"A": "1", "B": ""}), b"t\nA=1\nB=\n\n")


class CheckedKillTests(SynchronousTestCase):
    """
    L{CHECKED_KILL_SCRIPT} against real processes.
    """

    def sleeper(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(["sleep", "600"], start_new_session=True, env=env)
        self.addCleanup(process.wait)
        self.addCleanup(process.kill)
        return process

    def kill(self, pid: int, start: str, signum: int, group: bool = True) -> subprocess.CompletedProcess[bytes]:
        argv = checked_kill_argv(signum, pid, KERNEL_ID, start, group)
        self.assertEqual(argv[:3], ["sh", "-c", CHECKED_KILL_SCRIPT])
        return subprocess.run(argv, capture_output=True, timeout=30, check=False)

    def test_signals_the_process_it_started(self) -> None:
        """
        With the recorded start time the group is signalled.
        """
        process = self.sleeper()
        self.assertEqual(self.kill(process.pid, start_time(process.pid), 0).returncode, 0)
        self.assertEqual(self.kill(process.pid, start_time(process.pid), signal.SIGTERM).returncode, 0)
        self.assertEqual(process.wait(timeout=10), -signal.SIGTERM)

    def test_refuses_a_reused_pid(self) -> None:
        """
        A process under the pid with another start time (the pid was
        reused) is left alone.
        """
        process = self.sleeper()
        wrong = str(int(start_time(process.pid)) + 1)
        result = self.kill(process.pid, wrong, signal.SIGKILL)
        self.assertEqual(result.returncode, NOT_THE_KERNEL, result.stderr)
        self.assertIn(b"no longer kernel", result.stderr)
        self.assertIsNone(process.poll())

    def test_without_start_time_the_environment_decides(self) -> None:
        """
        A record without a start time (made before they were recorded)
        signals only a process whose environment carries the kernel id.
        """
        stranger = self.sleeper()
        result = self.kill(stranger.pid, "", signal.SIGKILL)
        self.assertEqual(result.returncode, NOT_THE_KERNEL)
        self.assertIsNone(stranger.poll())
        kernel = self.sleeper(dict(os.environ, KERNEL_ID=KERNEL_ID))
        self.assertEqual(self.kill(kernel.pid, "", signal.SIGKILL).returncode, 0)
        self.assertEqual(kernel.wait(timeout=10), -signal.SIGKILL)

    def test_no_pid_that_names_no_kernel(self) -> None:
        """
        0, 1 and negative numbers (C{kill -- -1} signals everything) are
        never turned into a kill command, nor accepted from a record.
        """
        for pid in (0, 1, -5):
            self.assertRaises(LaunchError, checked_kill_argv, signal.SIGKILL, pid, KERNEL_ID)
            self.assertEqual(reported_id(pid), 0)
        self.assertEqual(reported_id("4242"), 4242)
        self.assertRaises(ValueError, StartedProcess.parse, b"1 100\n")


class FakePool:
    """
    Records the commands an SSH launcher runs and answers each with
    C{answer}.
    """

    def __init__(self, answer: bytes = b"4242 9999\n") -> None:
        self.answer = answer
        self.calls: list[dict[str, Any]] = []

    def run(self, host: str, command: str, stdin: bytes = b"", timeout: float = 0, user: Any = None) -> Deferred[Any]:
        self.calls.append({"host": host, "command": command, "stdin": stdin})
        return succeed(CommandResult(0, None, self.answer, b""))


class LauncherCommandTests(SynchronousTestCase):
    def launcher(self) -> tuple[SSHLauncher, FakePool]:
        config = build_config({}, {}, {"remote-hosts": "10.1.2.3"})
        launcher = SSHLauncher(
            LauncherContext(reactor=None, runtime_dir="", ports=None, section=config.ssh,
                            shared=LaunchSettings.from_config(config), services={})
        )
        pool = FakePool()
        launcher.processes.pool = pool  # type: ignore[assignment]
        return launcher, pool

    def test_command_line_carries_no_value(self) -> None:
        """
        The remote command names the log file and the argv only: the
        token and every environment value go on stdin, so C{ps} on the
        host shows neither; the pid and start time come from the script.
        """
        launcher, pool = self.launcher()
        spec = KernelSpec.from_json("s", "/nonexistent", {"argv": ["python", "launch.py", "{kernel_id}"], "language": "python"})
        request, _ = request_for(KERNEL_ID, spec, env={"KERNEL_SECRETISH": "visible-nowhere-42"})
        listener = SimpleNamespace(response_address="10.0.0.1:8877", public_key="cHVi")
        pending = SimpleNamespace(token="the-launch-token", accept_v1=False)
        started = launcher._start_on("10.1.2.3", request, listener, pending, RunAs())
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(started)), StartedProcess(4242, "9999"))
        [call] = pool.calls
        self.assertNotIn("visible-nowhere-42", call["command"])
        self.assertNotIn("the-launch-token", call["command"])
        self.assertNotIn("KERNEL_SECRETISH", call["command"])
        lines = call["stdin"].decode().split("\n")
        self.assertEqual(lines[0], "the-launch-token")
        self.assertIn("KERNEL_SECRETISH=visible-nowhere-42", lines)
        self.assertEqual(lines[-2:], ["", ""])

    def test_signals_what_it_started_not_the_payload(self) -> None:
        """
        Signals go to the recorded process group, after the start-time
        check, whatever pid and pgid the payload named.
        """
        launcher, pool = self.launcher()
        process = SSHKernelProcess(
            launcher=launcher,
            host="10.1.2.3",
            start_time="9999",
            kernel_id=KERNEL_ID,
            info=ConnectionInfo.from_dict(dict(INFO, ip="10.1.2.3")),
            placement=Placement(host="10.1.2.3", ip="10.1.2.3", pid=4242, pgid=4242),
            reactor=Clock(),
            poll_interval=3600,
        )
        self.addCleanup(process.detach)
        self.successResultOf(process.signal(signal.SIGINT))
        [call] = pool.calls
        self.assertIn(" 4242 9999 " + KERNEL_ID + " INT -4242", call["command"].replace("'", ""))
