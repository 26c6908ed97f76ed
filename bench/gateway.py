"""
Running egateway for the benchmark: C{twistd -n egateway} as a child
process on a free loopback port, with a private TOML config, a private
runtime directory and its log in the benchmark's work directory.

Everything the benchmark starts has a path in the work directory on its
command line (the gateway's config, every kernel's connection file), which
is how L{sweep} finds anything left behind and kills it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int | None:
    """
    C{VmRSS} of C{pid} in KiB, or C{None} if it is gone.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """
    User plus system CPU time of C{pid} so far, or C{None} if it is gone.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _ancestors() -> set[int]:
    found, pid = set(), os.getpid()
    while pid > 1:
        found.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                pid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return found


def processes_mentioning(markers: list[str]) -> list[tuple[int, str]]:
    """
    Live processes (not zombies, not this one or its ancestors) whose
    command line contains one of C{markers}.
    """
    found = []
    needles = [marker.encode() for marker in markers]
    skip = _ancestors()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != b"Z" and any(needle in cmdline for needle in needles):
            found.append((int(entry), cmdline.replace(b"\0", b" ").decode("utf-8", "replace")))
    return found


def owned_markers(workdir: str) -> list[str]:
    """
    What only the processes this benchmark starts carry on their command
    line: the gateway's config file and the kernels' connection-file
    directories.
    """
    return [
        os.path.join(workdir, "egateway.toml"),
        os.path.join(workdir, "gateway-runtime") + os.sep,
        os.path.join(workdir, "direct-runtime") + os.sep,
    ]


def sweep(workdir: str) -> list[str]:
    """
    SIGKILL every process the benchmark started that is still running;
    what was killed.
    """
    killed = []
    for pid, cmdline in processes_mentioning(owned_markers(workdir)):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(f"{pid} {cmdline[:160]}")
        except ProcessLookupError:
            pass
    return killed


def _twistd_argv() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [sys.executable, script]
    found = shutil.which("twistd")
    if found:
        return [sys.executable, found]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class GatewayProcess:
    """
    One egateway daemon owned by the benchmark.

    @ivar url: its base URL once started.
    @ivar token: the random auth token it requires.
    """

    def __init__(
        self,
        workdir: str,
        launch_timeout: float,
        stop_timeout: float = 30.0,
        extra_config: str = "",
        extra_path: tuple[str, ...] = (),
        profile_dir: str = "",
        twistd_options: tuple[str, ...] = (),
    ) -> None:
        """
        @param extra_config: TOML appended to the private config, for the
            sections it does not write (C{[store]}, ...): what a benchmark
            comparing gateway settings varies.  It starts inside
            C{[kernels]}, so bare keys set that section's settings.
        @param extra_path: directories put on the daemon's PYTHONPATH
            (before the repository): where a benchmark registers a launcher
            of its own through an entry point only that daemon sees.
        @param profile_dir: run the daemon under twistd's cProfile, each
            start writing C{gateway-N.prof} here (read with C{pstats}).
        @param twistd_options: more options for C{twistd} itself.
        """
        self.workdir = workdir
        self.launch_timeout = launch_timeout
        self.stop_timeout = stop_timeout
        self.extra_config = extra_config
        self.extra_path = extra_path
        self.profile_dir = profile_dir
        self.starts = 0
        self.twistd_options = twistd_options
        self.token = secrets.token_hex(16)
        self.url = ""
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.log_path = os.path.join(workdir, "gateway.log")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _write_config(self, port: int) -> str:
        runtime = os.path.join(self.workdir, "gateway-runtime")
        os.makedirs(runtime, mode=0o700, exist_ok=True)
        path = os.path.join(self.workdir, "egateway.toml")
        with open(path, "w") as f:
            f.write(
                "[server]\n"
                f'listen = "tcp:{port}:interface=127.0.0.1"\n'
                f'data_dir = "{runtime}"\n'
                f"stop_timeout = {self.stop_timeout}\n"
                "[auth]\n"
                f'auth_token = "{self.token}"\n'
                "list_kernels = true\n"
                "[kernels]\n"
                f"launch_timeout = {self.launch_timeout}\n"
                f"{self.extra_config}"
            )
        return path

    def start(self, deadline: float = 60.0) -> None:
        """
        Start the daemon and wait until C{GET /api} answers.  A port taken
        between choosing and binding it is retried on another.

        @raise RuntimeError: the daemon exited or never answered; the
            message carries the end of its log.
        """
        for attempt in range(3):
            port = free_port()
            config = self._write_config(port)
            env = {k: v for k, v in os.environ.items() if not k.startswith(("EG_", "KG_"))}
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (*self.extra_path, REPO, os.environ.get("PYTHONPATH", "")) if p
            )
            self.starts += 1
            profile = []
            if self.profile_dir:
                path = os.path.join(self.profile_dir, f"gateway-{self.starts}.prof")
                profile = [f"--profile={path}", "--profiler=cprofile", "--savestats"]
            argv = [*_twistd_argv(), "-n", "--pidfile=", *profile, *self.twistd_options, "egateway", "--config", config]
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    argv,
                    cwd=self.workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.port = port
            self.url = f"http://127.0.0.1:{port}/"
            try:
                self._wait_until_serving(deadline)
                return
            except RuntimeError:
                if attempt == 2 or "Address already in use" not in self.log_tail():
                    raise
                self.stop()

    def _wait_until_serving(self, deadline: float) -> None:
        assert self.process is not None
        give_up = time.monotonic() + deadline
        request = urllib.request.Request(
            self.url + "api", headers={"Authorization": f"token {self.token}"}
        )
        while time.monotonic() < give_up:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"egateway exited with {self.process.returncode} at start-up:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"egateway did not answer GET /api in {deadline:g} s:\n{self.log_tail()}")

    def rss_kib(self) -> int | None:
        return rss_kib(self.pid) if self.process is not None else None

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.pid) if self.process is not None else None

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as f:
                data = f.read()[-20000:]
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    def stop(self) -> str:
        """
        SIGTERM (a graceful stop shuts its kernels down), then SIGKILL if
        it outlives its own stop timeout.  How it ended.
        """
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return "not running" if process is None else f"had exited ({process.returncode})"
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(self.stop_timeout + 10)
            return f"stopped ({code})"
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            return "killed after the stop timeout"
