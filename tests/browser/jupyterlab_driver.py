"""
Drive JupyterLab 4 in headless Chromium through what a notebook user does,
checking each step on the page as a person sees it (the status bar's kernel
status, dialogs, cell outputs) and saving a screenshot of each.

Two scenarios (C{--scenario}): C{session}, a user's session from opening
the notebook to shutting its kernel down; C{dead}, a kernel that dies past
the restart limit.

Run by L{tests.test_browser} as a child process (Playwright's sync API owns
its thread and event loop, which does not mix with trial's reactor).  It
talks to the test over stdin/stdout, one line each:

  - it prints C{STEP <name>} as each step starts, C{SHOT <path>} for each
    screenshot, C{PID <pid>} for each kernel process id read from a cell;
  - for what only the test can do, it prints C{ASK <action> [<arg>]}
    (C{kill <pid>}: SIGKILL that kernel process; C{restart-gateway}) and
    waits for the test's C{OK} or C{FAIL <why>} line;
  - it ends with C{PASSED}, or a traceback and exit status 1 (after a
    C{failure} screenshot).

Every wait is bounded by C{--step-timeout}.  Playwright drives the Chromium
given by C{--chromium} (Debian's package); it never downloads a browser.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
import traceback
from typing import Any

from playwright.sync_api import Locator, Page, expect, sync_playwright

from offline_chromium import OFFLINE_CHROMIUM

KERNEL_STATUS = 'span.jp-StatusBar-TextItem[title^="Change kernel"]'
DIALOG = ".jp-Dialog"
PROMPT_DONE = re.compile(r"^\[\d+\]:$")


class Scenario:
    """
    One notebook in one page; C{ms} is the bound on each wait.
    """

    def __init__(self, page: Page, shots: str, step_timeout: float) -> None:
        self.page = page
        self.shots = shots
        self.ms = step_timeout * 1000
        self.count = 0

    # -- reporting ---------------------------------------------------------

    def say(self, line: str) -> None:
        print(line, flush=True)

    def shot(self, name: str) -> str:
        self.count += 1
        path = os.path.join(self.shots, f"{self.count:02d}-{name}.png")
        self.page.screenshot(path=path)
        self.say(f"SHOT {path}")
        return path

    def ask(self, action: str) -> None:
        self.say(f"ASK {action}")
        answer = sys.stdin.readline().strip()
        if answer != "OK":
            raise AssertionError(f"the test could not {action}: {answer or 'no answer'}")

    # -- what a person sees ------------------------------------------------

    def status(self) -> Locator:
        return self.page.locator(KERNEL_STATUS)

    def expect_status(self, state: str) -> None:
        expect(self.status()).to_have_text(re.compile(rf"\| {state}$"), timeout=self.ms)

    def no_dialog(self, step: str) -> None:
        dialogs = self.page.locator(DIALOG)
        if dialogs.count():
            self.shot(f"{step}-unexpected-dialog")
            raise AssertionError(f"{step}: a dialog is showing: {dialogs.first.inner_text()!r}")

    def menu(self, command: str) -> None:
        """
        Open the Kernel menu and choose the item running C{command}.
        """
        self.page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Kernel$")).click(timeout=self.ms)
        self.page.locator(f'.lm-Menu-item[data-command="{command}"]').click(timeout=self.ms)

    def run_cell(self, code: str) -> Locator:
        """
        Type C{code} into the last cell and run it (Shift+Enter); returns
        that cell, whose prompt shows C{[*]} until it ends.
        """
        cells = self.page.locator(".jp-Notebook .jp-CodeCell")
        index = cells.count() - 1
        cell = cells.nth(index)
        cell.locator(".cm-content").click(timeout=self.ms)
        # Inserted, not typed, so the editor adds no closing brackets.
        self.page.keyboard.insert_text(code)
        self.page.keyboard.press("Shift+Enter")
        expect(cells).to_have_count(index + 2, timeout=self.ms)
        return cell

    def output_of(self, cell: Locator) -> str:
        expect(cell.locator(".jp-InputPrompt")).to_have_text(PROMPT_DONE, timeout=self.ms)
        return cell.locator(".jp-OutputArea").inner_text(timeout=self.ms)

    def shows(self, code: str, expected: str, step: str) -> None:
        """
        Run C{code} in a new cell; its output must contain C{expected}.
        """
        out = self.output_of(self.run_cell(code))
        if expected not in out:
            self.shot(f"{step}-wrong-output")
            raise AssertionError(f"{step}: {code!r} shows {out!r}, not {expected!r}")

    def pid(self, step: str) -> int:
        """
        The kernel's process id, printed by a cell.
        """
        out = self.output_of(self.run_cell("import os; print('pid', os.getpid())"))
        found = re.search(r"pid (\d+)", out)
        if not found:
            self.shot(f"{step}-no-pid")
            raise AssertionError(f"{step}: no pid in the cell's output {out!r}")
        pid = int(found.group(1))
        self.say(f"PID {pid}")
        return pid

    # -- the scenarios -----------------------------------------------------

    def open(self, url: str) -> None:
        self.say("STEP open")
        self.page.goto(url, timeout=self.ms)
        expect(self.page.locator(".jp-Notebook")).to_be_visible(timeout=self.ms)
        self.expect_status("Idle")
        self.shot("opened")

    def session(self, url: str) -> None:
        """
        Run, interrupt, restart, auto-restart, gateway restart, shutdown.
        """
        page = self.page
        self.open(url)

        self.say("STEP run")
        first = self.pid("run")
        self.shows("x = 42; x + 1", "43", "run")
        self.shot("ran")

        self.say("STEP interrupt")
        cell = self.run_cell("import time; time.sleep(60)")
        self.expect_status("Busy")
        asked = time.monotonic()
        self.menu("kernelmenu:interrupt")
        out = self.output_of(cell)
        if "KeyboardInterrupt" not in out:
            raise AssertionError(f"the interrupted cell shows {out!r}")
        if time.monotonic() - asked > 15:
            raise AssertionError(f"the interrupt took {time.monotonic() - asked:.1f} s")
        self.expect_status("Idle")
        self.no_dialog("interrupt")
        self.shot("interrupted")

        self.say("STEP restart")
        self.menu("kernelmenu:restart")
        confirm = page.locator(DIALOG)
        expect(confirm).to_contain_text("Restart Kernel?", timeout=self.ms)
        self.shot("restart-confirmation")
        confirm.locator("button.jp-mod-accept").click(timeout=self.ms)
        expect(page.locator(DIALOG, has_text="Restart Kernel?")).to_have_count(0, timeout=self.ms)
        expect(self.status()).not_to_have_text(re.compile(r"\| Idle$"), timeout=self.ms)
        self.expect_status("Idle")
        self.no_dialog("restart")
        second = self.pid("restart")
        if second == first:
            raise AssertionError(f"the restarted kernel has the old pid {first}")
        self.no_dialog("restart")
        self.shot("restarted")

        self.say("STEP kill")
        self.ask(f"kill {second}")
        died = page.locator(DIALOG)
        expect(died).to_contain_text("Kernel Restarting", timeout=self.ms)
        expect(died).to_contain_text("appears to have died", timeout=self.ms)
        self.shot("auto-restart-dialog")
        died.locator("button.jp-mod-accept").click(timeout=self.ms)
        expect(died).to_have_count(0, timeout=self.ms)
        self.expect_status("Idle")
        third = self.pid("kill")
        if third in (first, second):
            raise AssertionError(f"the kernel after the kill has an old pid {third}")
        self.shows("y = 7; y * 6", "42", "kill")
        self.no_dialog("kill")
        self.shot("auto-restarted")

        self.say("STEP gateway-restart")
        self.ask("restart-gateway")
        self.expect_status("Idle")
        self.no_dialog("gateway-restart")
        if self.pid("gateway-restart") != third:
            raise AssertionError("the kernel process changed across the gateway restart")
        self.shows("y", "7", "gateway-restart")
        self.no_dialog("gateway-restart")
        self.shot("gateway-restarted")

        self.say("STEP shutdown")
        # JupyterLab shuts down without asking.
        self.menu("kernelmenu:shutdown")
        expect(self.status()).to_have_text(re.compile(r"^No Kernel"), timeout=self.ms)
        self.no_dialog("shutdown")
        self.shot("shut-down")

    def large_output(self, url: str) -> None:
        """
        A 2 MB output of a kernel in clear text, whose signature the
        gateway checks while it relays it: whole in the notebook, in order
        with the output after it, the kernel idle, no dialog.
        """
        self.open(url)
        self.say("STEP large-output")
        code = (
            "import sys; sys.stdout.write('<start>' + 'x' * 2_000_000 + '<end>'); "
            "sys.stdout.flush(); print(' after')"
        )
        out = self.output_of(self.run_cell(code))
        if "<start>" not in out or "<end> after" not in out or out.count("x") != 2_000_000:
            self.shot("large-output-wrong")
            raise AssertionError(f"the 2 MB output shows {len(out)} characters: {out[:60]!r}...{out[-60:]!r}")
        self.expect_status("Idle")
        self.shows("x = 6; x * 7", "42", "large-output")
        self.no_dialog("large-output")
        self.shot("large-output")

    def dead(self, url: str) -> None:
        """
        A kernel that dies past the restart limit: no "will restart
        automatically" dialog (it will not), JupyterLab's connection ends;
        reopened, the notebook says why.
        """
        self.open(url)
        self.say("STEP kill")
        self.ask(f"kill {self.pid('kill')}")
        expect(self.status()).to_have_text(re.compile(r"\| Disconnected$"), timeout=self.ms)
        self.no_dialog("kill")
        self.shot("dead")

        self.say("STEP reopen")
        self.page.reload(timeout=self.ms)
        error = self.page.locator(DIALOG)
        expect(error).to_contain_text("Error Starting Kernel", timeout=self.ms)
        expect(error).to_contain_text("restart limit (0) reached", timeout=self.ms)
        self.shot("reopened-dead")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True, help="the notebook's JupyterLab URL, token included")
    parser.add_argument("--shots", required=True, help="directory for the screenshots")
    parser.add_argument("--chromium", required=True, help="Chromium executable")
    parser.add_argument("--step-timeout", type=float, default=30.0)
    parser.add_argument("--marker", default="", help="put on Chromium's command line, to find leftovers")
    parser.add_argument("--scenario", choices=("session", "dead", "large_output"), default="session")
    options = parser.parse_args(argv)

    def terminated(signum: int, frame: Any) -> None:
        # Leave through the with block, which closes Chromium.
        raise SystemExit(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, terminated)
    os.makedirs(options.shots, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=options.chromium,
            headless=True,
            args=["--disable-gpu", "--disable-dev-shm-usage", *OFFLINE_CHROMIUM, f"--egateway-test={options.marker}"],
            timeout=options.step_timeout * 1000,
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            scenario = Scenario(page, options.shots, options.step_timeout)
            try:
                getattr(scenario, options.scenario)(options.url)
            except BaseException:
                traceback.print_exc(file=sys.stdout)
                try:
                    scenario.shot("failure")
                except Exception:
                    traceback.print_exc(file=sys.stdout)
                return 1
        finally:
            browser.close()
    print("PASSED", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
