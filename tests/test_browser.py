"""
JupyterLab 4 in headless Chromium, through C{jupyter server --gateway-url}
at a real egateway daemon: what a notebook user sees.

The browser is driven by C{tests/browser/jupyterlab_driver.py}, a child
process (Playwright's sync API needs its own thread and event loop), which
checks each step on the page (status bar, dialogs, outputs) and saves a
screenshot of each under the test's temporary directory; the test prints
where.  What only the test can do (SIGKILL a kernel process, restart the
gateway) the driver asks for on its stdout, and the test answers on its
stdin.

Chromium is Debian's C{chromium} package (installed by
C{.ci/install-system-packages}); Playwright never downloads a browser.  A
missing Chromium fails the test rather than skipping it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.support.daemon import (
    REPO_ROOT,
    GatewayDaemon,
    JupyterServer,
    processes_mentioning,
    start_gateway,
    start_jupyter_server,
)

GATEWAY_TOKEN = "gateway-secret-token"
SERVER_TOKEN = "notebook-secret-token"
DRIVER = os.path.join(REPO_ROOT, "tests", "browser", "jupyterlab_driver.py")

STEP_TIMEOUT = 30.0
"""
Seconds the driver waits for any one thing on the page.
"""

DRIVER_TIMEOUT = 360.0
"""
Seconds the whole browser scenario may take.
"""

NOTEBOOK = {
    "cells": [{"cell_type": "code", "execution_count": None, "id": "first", "metadata": {}, "outputs": [], "source": ""}],
    "metadata": {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}},
    "nbformat": 4,
    "nbformat_minor": 5,
}

LAB_SETTINGS = {
    # No "get notified about Jupyter news?" toast over the page.
    os.path.join("@jupyterlab", "apputils-extension", "notification.jupyterlab-settings"): {"fetchNews": "false"},
}


def chromium_path() -> str | None:
    return shutil.which("chromium")


class Driver(ProcessProtocol):
    """
    The browser driver: its output lines, its questions, its end.
    """

    def __init__(self, on_ask: Any, marker: str) -> None:
        self.on_ask = on_ask
        self.marker = marker
        self.lines: list[str] = []
        self.stderr = b""
        self._partial = b""
        self.code: int | None = None
        self._waiters: list[Deferred[int]] = []

    def outReceived(self, data: bytes) -> None:
        self._partial += data
        *lines, self._partial = self._partial.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            print(f"browser: {line}", flush=True)
            if line.startswith("ASK "):
                self.on_ask(line[4:])

    def errReceived(self, data: bytes) -> None:
        self.stderr = (self.stderr + data)[-20000:]

    def answer(self, text: str) -> None:
        if self.code is None and self.transport is not None:
            self.transport.write(text.encode() + b"\n")

    def processEnded(self, reason: Failure) -> None:
        self.code = 0 if isinstance(reason.value, ProcessDone) else (reason.value.exitCode or -1)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self.code)

    def when_ended(self, timeout: float) -> Deferred[int]:
        """
        Fires with the exit status; fails after C{timeout} seconds.
        """
        if self.code is not None:
            return succeed(self.code)
        waiter: Deferred[int] = Deferred()
        self._waiters.append(waiter)
        return waiter.addTimeout(timeout, reactor)

    def describe(self) -> str:
        return "\n".join(self.lines[-60:]) + "\nstderr:\n" + self.stderr.decode("utf-8", "replace")[-4000:]

    async def stop(self) -> None:
        """
        SIGTERM (the driver then closes Chromium), SIGKILL after 15 s; then
        kill any Chromium left carrying the marker.
        """
        if self.code is None and self.transport is not None:
            try:
                self.transport.signalProcess("TERM")
                await self.when_ended(15)
            except ProcessExitedAlready:
                pass
            except Exception:
                self.transport.signalProcess("KILL")
        for pid, _ in processes_mentioning(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class JupyterLabInChromiumTests(TestCase):
    """
    One notebook user's session, step by step, as a person sees it.
    """

    timeout = DRIVER_TIMEOUT + 120

    gateway: GatewayDaemon
    server: JupyterServer

    async def setUp(self) -> None:
        chromium = chromium_path()
        if chromium is None:
            self.fail("chromium is not installed (Debian's chromium package; .ci/install-system-packages installs it)")
        self.chromium = chromium
        # Kernels live in a directory of their own, so they outlive the first
        # gateway's stop (which kills what names its own directory).
        self.kernels_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.kernels_dir, mode=0o700)
        self.addCleanup(self._kill_kernels_left)

    async def start_servers(self, **flags: str) -> None:
        """
        Start egateway (with C{flags}) and a notebook server using it, with
        a notebook to open.
        """
        self.flags = {"list-kernels": "true", "on-stop": "keep", "data-dir": self.kernels_dir, **flags}
        self.gateway = await start_gateway(self, token=GATEWAY_TOKEN, flags=self.flags, reactor=reactor)
        self.gateway.data_dir = self.kernels_dir
        settings = os.path.abspath(self.mktemp())
        for name, value in LAB_SETTINGS.items():
            os.makedirs(os.path.dirname(os.path.join(settings, name)), exist_ok=True)
            with open(os.path.join(settings, name), "w") as f:
                json.dump(value, f)
        self.server = await start_jupyter_server(
            self,
            token=SERVER_TOKEN,
            gateway=self.gateway,
            args=[f"--LabApp.user_settings_dir={settings}"],
            reactor=reactor,
        )
        with open(os.path.join(self.server.root_dir, "Untitled.ipynb"), "w") as f:
            json.dump(NOTEBOOK, f)

    def _kill_kernels_left(self) -> None:
        """
        The gateway keeps kernels when it stops (so they outlive its
        restart): a scenario that failed before shutting its kernel down
        leaves it running.  A passing one checks none is left.
        """
        for pid, _ in processes_mentioning(self.kernels_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def drive(self, scenario: str) -> None:
        """
        Run the driver's C{scenario} on the notebook, answering what it
        asks; fail with its output unless it passed.
        """
        shots = os.path.abspath(self.mktemp())
        print(f"\nscreenshots: {shots}", flush=True)
        url = f"{self.server.url}lab/tree/Untitled.ipynb?token={SERVER_TOKEN}"
        failures: list[str] = []

        def on_ask(action: str) -> None:
            def answered(result: Any) -> None:
                if isinstance(result, Failure):
                    failures.append(f"{action}: {result.getErrorMessage()}")
                    driver.answer(f"FAIL {result.getErrorMessage()}")
                else:
                    driver.answer("OK")

            ensureDeferred(self._do(action)).addBoth(answered)

        driver = Driver(on_ask, shots)
        argv = [
            sys.executable,
            DRIVER,
            f"--scenario={scenario}",
            f"--url={url}",
            f"--shots={shots}",
            f"--chromium={self.chromium}",
            f"--step-timeout={STEP_TIMEOUT}",
            f"--marker={shots}",
        ]
        reactor.spawnProcess(driver, sys.executable, argv, env=dict(os.environ), path=REPO_ROOT)
        self.addCleanup(driver.stop)
        try:
            code = await driver.when_ended(DRIVER_TIMEOUT)
        except Exception:
            self.fail(f"the browser scenario took over {DRIVER_TIMEOUT:g} s:\n{driver.describe()}")
        print(f"screenshots: {shots}: {', '.join(sorted(os.listdir(shots)))}", flush=True)
        self.assertEqual(failures, [])
        self.assertEqual(code, 0, driver.describe())
        self.assertEqual(driver.lines[-1], "PASSED", driver.describe())

    async def test_notebook_session(self) -> None:
        """
        Open a notebook, run a cell, interrupt a sleeping cell, restart from
        the Kernel menu (no dialog but the confirmation), see a SIGKILLed
        kernel restarted automatically (with JupyterLab's "appears to have
        died" dialog), keep working across a gateway restart, and shut the
        kernel down.
        """
        await self.start_servers()
        await self.drive("session")
        # The shutdown from the Kernel menu reached the gateway.
        self.assertEqual(await self.gateway.kernel_ids(), [])
        self.assertEqual(self.gateway.kernel_processes(), [])

    async def test_kernel_that_cannot_be_revived(self) -> None:
        """
        A kernel killed past the restart limit is 'dead': JupyterLab shows
        no "will restart automatically" dialog and its connection ends;
        reopening the notebook shows why.
        """
        await self.start_servers(**{"restart-limit": "0"})
        await self.drive("dead")
        [model] = await self.gateway.api.call("GET", "api/kernels")
        self.assertEqual(model["execution_state"], "dead")
        await self.gateway.api.call("DELETE", f"api/kernels/{model['id']}", expect=204)
        self.assertEqual(self.gateway.kernel_processes(), [])

    async def test_large_output_in_clear_text(self) -> None:
        """
        A kernel without CurveZMQ (the gateway checks each message's
        signature, a large one's while relaying it) writes 2 MB in one
        go: JupyterLab shows all of it, then the next output, and goes on.
        """
        await self.start_servers(**{"kernel-encryption": "off"})
        await self.drive("large_output")
        [model] = await self.gateway.api.call("GET", "api/kernels")
        self.assertFalse(model["encrypted"], model)
        await self.gateway.api.call("DELETE", f"api/kernels/{model['id']}", expect=204)
        self.assertEqual(self.gateway.kernel_processes(), [])

    async def _do(self, action: str) -> None:
        """
        What the driver asked for: C{kill <pid>} or C{restart-gateway}.
        """
        name, _, arg = action.partition(" ")
        if name == "kill":
            pid = int(arg)
            kernels = [p for p, _ in self.gateway.kernel_processes()]
            if pid not in kernels:
                raise AssertionError(f"{pid} is not one of the gateway's kernel processes {kernels}")
            os.kill(pid, signal.SIGKILL)
        elif name == "restart-gateway":
            await self._restart_gateway()
        else:
            raise AssertionError(f"unknown action {action!r}")

    async def _restart_gateway(self) -> None:
        """
        Stop the gateway gracefully (its kernels are kept) and start another
        on the same port and data directory; return once it has reattached
        the kernel and the notebook server has reconnected to it.
        """
        old = self.gateway
        kernel_ids = await old.kernel_ids()
        report = await old.stop()
        if not report.graceful:
            raise AssertionError(report.describe())
        self.gateway = await start_gateway(
            self, token=GATEWAY_TOKEN, flags=self.flags, reactor=reactor, port=old.port
        )
        self.gateway.data_dir = self.kernels_dir
        deadline = reactor.seconds() + 45
        while True:
            models = await self.gateway.api.call("GET", "api/kernels")
            ready = [m for m in models if m["state"] == "running" and m["connections"] >= 1]
            if [m["id"] for m in ready] == kernel_ids:
                return
            if reactor.seconds() > deadline:
                raise AssertionError(f"the kernel was not reattached and reconnected: {models}")
            await deferLater(reactor, 0.2, lambda: None)
