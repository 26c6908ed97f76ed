"""
egateway under systemd: the unit file in etc/ (checked by systemd-analyze, its
kill semantics reproduced on a real daemon and its kernels), and the service
notifications (READY=1, WATCHDOG=1) a real daemon sends to a NOTIFY_SOCKET
the test binds.

systemd is not PID 1 on the test machines, so the unit is not run by systemd
itself: what matters of it (who gets KillSignal, what is SIGKILLed once the
main process has exited) is applied by the test as systemd's KillMode=
documents it, to the daemon's whole process tree (the unit's control group).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import tomllib

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from egateway.ops.systemd import SystemdNotifier, notify_address, watchdog_interval
from tests.support.daemon import pid_alive, start_gateway
from tests.support.polling import eventually
from tests.test_persistence import get_x, set_x

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(ROOT, "etc", "egateway.service")
IMPERSONATION_DROP_IN = os.path.join(ROOT, "etc", "egateway-impersonation.conf")


def unit_settings(path: str) -> dict[str, list[str]]:
    """
    The [Service] settings of a unit file, each with every value given (a
    unit may repeat a key).
    """
    found: dict[str, list[str]] = {}
    section = ""
    for raw in open(path).read().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service":
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def unit_value(settings: dict[str, list[str]], key: str, default: str = "") -> str:
    return settings.get(key, [default])[-1]


def analyzable_copy(test: SynchronousTestCase, drop_in: bool) -> str:
    """
    The unit (and optionally the impersonation drop-in) in a temporary
    directory, with ExecStart naming this environment's twistd, since
    systemd-analyze checks that the command exists.
    """
    directory = os.path.abspath(test.mktemp())
    os.makedirs(directory)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    text = open(UNIT).read().replace("/opt/egateway/bin/twistd", twistd)
    path = os.path.join(directory, "egateway.service")
    with open(path, "w") as f:
        f.write(text)
    if drop_in:
        os.makedirs(path + ".d")
        shutil.copy(IMPERSONATION_DROP_IN, os.path.join(path + ".d", "impersonation.conf"))
    return path


def socket_path(test: SynchronousTestCase) -> str:
    """
    A path for a UNIX socket, short enough for sun_path (trial's temporary
    directories are not), removed after the test.
    """
    directory = tempfile.mkdtemp(prefix="egw-", dir="/tmp")
    test.addCleanup(shutil.rmtree, directory, True)
    return os.path.join(directory, "notify")


def analyze(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("systemd-analyze") is None:
        raise AssertionError("systemd-analyze is missing: run .ci/install-system-packages (package systemd)")
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


class UnitFileTests(SynchronousTestCase):
    def test_unit_keeps_kernels_and_talks_to_systemd(self) -> None:
        """
        The unit leaves kernels alone when the gateway stops (KillMode=process),
        waits for READY=1 (Type=notify), watches the gateway (WatchdogSec),
        reloads with SIGHUP, and keeps the data directory on persistent
        storage; the example configuration suggests no directory under /run.
        """
        settings = unit_settings(UNIT)
        self.assertEqual(unit_value(settings, "KillMode", "control-group"), "process")
        self.assertEqual(unit_value(settings, "Type"), "notify")
        self.assertGreater(int(unit_value(settings, "WatchdogSec", "0")), 0)
        self.assertRegex(unit_value(settings, "ExecReload"), r"kill -HUP \$MAINPID$")
        self.assertEqual(unit_value(settings, "StateDirectory"), "egateway")
        self.assertIn("EG_DATA_DIR=%S/egateway", settings["Environment"])
        example = tomllib.loads(
            "\n".join(
                line[2:] if re.match(r"^# data_dir = ", line) else line
                for line in open(os.path.join(ROOT, "etc", "egateway.toml")).read().splitlines()
            )
        )
        self.assertFalse(example["server"]["data_dir"].startswith(("/run", "/tmp", "/var/run")))
        for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
            self.assertEqual(unit_value(settings, key), "yes", key)
        self.assertEqual(unit_value(settings, "ProtectSystem"), "strict")
        self.assertTrue(unit_value(settings, "RestrictAddressFamilies"))
        drop_in = unit_settings(IMPERSONATION_DROP_IN)
        self.assertEqual(unit_value(drop_in, "User"), "root")
        self.assertIn("EG_IMPERSONATION_ENABLED=true", drop_in["Environment"])

    def test_systemd_analyze(self) -> None:
        """
        systemd-analyze verify finds nothing to say about the unit, with and
        without the impersonation drop-in, and security rates the unit's
        sandbox well (exposure at most 2.0 as the gateway's own user, 4.0
        with root for impersonation; 10 is an unsandboxed root service).
        """
        for drop_in, most in ((False, 2.0), (True, 4.0)):
            path = analyzable_copy(self, drop_in)
            verified = analyze("verify", "--man=no", "--generators=no", path)
            self.assertEqual((verified.returncode, verified.stdout + verified.stderr), (0, ""))
            rated = analyze("security", "--offline=true", "--no-pager", path)
            match = re.search(r"Overall exposure level for egateway\.service: ([0-9.]+)", rated.stdout)
            self.assertIsNotNone(match, rated.stdout + rated.stderr)
            self.assertLessEqual(float(match.group(1)), most, rated.stdout)


class NotificationUnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = socket_path(self)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.server.bind(self.path)
        self.server.setblocking(False)
        self.addCleanup(self.server.close)

    def received(self) -> list[str]:
        found = []
        while True:
            try:
                found.append(self.server.recv(4096).decode())
            except BlockingIOError:
                return found

    def test_ready_after_restore_and_watchdog_at_half_interval(self) -> None:
        """
        READY=1 waits for the kernels to be restored; WATCHDOG=1 goes out at
        half of WATCHDOG_USEC from the clock; STOPPING=1 at the stop.
        """
        from twisted.internet.task import Clock

        clock = Clock()
        restored: Deferred[None] = Deferred()
        environ = {"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}
        notifier = SystemdNotifier(clock, restored, environ)
        notifier.startService()
        self.addCleanup(lambda: notifier.running and notifier.stopService())
        self.assertEqual(self.received(), ["WATCHDOG=1"])
        clock.advance(4.9)
        self.assertEqual(self.received(), [])
        clock.advance(0.1)
        self.assertEqual(self.received(), ["WATCHDOG=1"])
        restored.callback(None)
        ready = self.received()
        self.assertEqual(len(ready), 1)
        self.assertIn("READY=1", ready[0].splitlines())
        notifier.stopService()
        self.assertIn("STOPPING=1", self.received()[0].splitlines())

    def test_environment(self) -> None:
        """
        Abstract socket names start with @; the watchdog is for the process
        WATCHDOG_PID names, if any.
        """
        self.assertEqual(notify_address({"NOTIFY_SOCKET": "@sd"}), b"\0sd")
        self.assertIsNone(notify_address({}))
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "3000000"}, 7), 1.5)
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "8"}, 7))
        self.assertIsNone(watchdog_interval({}, 7))


class Collector(DatagramProtocol):
    def __init__(self) -> None:
        self.messages: list[list[str]] = []

    def datagramReceived(self, data: bytes, addr: object) -> None:
        self.messages.append(data.decode().splitlines())

    def seen(self, line: str) -> int:
        return sum(line in message for message in self.messages)


def process_tree(root: int) -> set[int]:
    """
    C{root} and every process descended from it: what the unit's control
    group holds (kernels run in sessions of their own, but stay in it).
    """
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    parents[int(entry)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


class RunningUnderSystemdTests(TestCase):
    timeout = 120

    async def test_restart_keeps_kernels_and_notifies(self) -> None:
        """
        A daemon stopped as the unit's KillMode and KillSignal say (systemctl
        restart) leaves its kernel running; the next one, given a
        NOTIFY_SOCKET and WATCHDOG_USEC, sends READY=1 only once that kernel
        is restored (it is listed running, with its state, at that moment),
        pings the watchdog, survives SIGHUP (ExecReload), and says STOPPING=1.
        """
        settings = unit_settings(UNIT)
        kill_mode = unit_value(settings, "KillMode", "control-group")
        kill_signal = getattr(signal, unit_value(settings, "KillSignal", "SIGTERM"))
        flags = {"list-kernels": "true", "persistence": "true", "on-stop": "keep"}
        first = await start_gateway(self, flags=flags)
        model = await first.api.call("POST", "api/kernels", {}, expect=201)
        await set_x(first.url, model["id"], 42)
        (kernel_pid, _), = first.kernel_processes(model["id"])
        group = process_tree(first.pid)
        self.assertIn(kernel_pid, group)

        # systemctl stop: KillSignal to the main process (to all with
        # control-group), then SIGKILL to what is left (mixed, control-group).
        for pid in group if kill_mode == "control-group" else {first.pid}:
            os.kill(pid, kill_signal)
        await first.process.when_ended()
        if kill_mode in ("mixed", "control-group"):
            for pid in group:
                if pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
        first.process.report = "stopped as systemd does"
        await first.api.close()
        self.assertTrue(pid_alive(kernel_pid), f"KillMode={kill_mode} killed the kept kernel")

        address = socket_path(self)
        collector = Collector()
        port = reactor.listenUNIXDatagram(address, collector)
        self.addCleanup(port.stopListening)
        second = await start_gateway(
            self,
            flags={**flags, "on-stop": "shutdown", "data-dir": first.data_dir},
            env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"},
        )
        second.data_dir = first.data_dir
        await eventually(lambda: collector.seen("READY=1"), "READY=1")
        listed = await second.api.call("GET", "api/kernels")
        self.assertEqual([(k["id"], k["state"]) for k in listed], [(model["id"], "running")])
        self.assertEqual(await get_x(second.url, model["id"]), "42")
        await eventually(lambda: collector.seen("WATCHDOG=1") >= 3, "three watchdog pings", timeout=10)
        self.assertEqual(collector.seen("READY=1"), 1)

        second.process.send_signal(signal.SIGHUP)
        await eventually(lambda: "SIGHUP" in open(second.process.log_path).read(), "SIGHUP logged")
        self.assertEqual(len(await second.api.call("GET", "api/kernels")), 1)
        report = await second.stop()
        self.assertTrue(report.graceful, report.describe())
        self.assertEqual(collector.seen("STOPPING=1"), 1)
        self.assertFalse(pid_alive(kernel_pid))
