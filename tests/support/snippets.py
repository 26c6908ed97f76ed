"""
Running a piece of Python in a fresh interpreter, for what must not happen
in the test runner's own process: a heap whose layout earlier tests decide,
modules other tests imported, a process flag that cannot be undone.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support.daemon import REPO_ROOT


def run_snippet(script: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    """
    Run C{script} with this interpreter and the repository on its path.

    @return: the finished process, its output as text.
    @raise subprocess.CalledProcessError: C{check} and it failed.
    """
    return subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": REPO_ROOT},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )
