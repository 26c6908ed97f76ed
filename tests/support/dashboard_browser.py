"""
Headless Chromium for the admin dashboard's browser test, driven by
Playwright's synchronous API in one dedicated thread (Playwright objects
belong to the thread that made them, and its calls block, so they must not
run in the reactor's thread).

The browser is Debian's C{chromium} (C{.ci/install-system-packages});
Playwright never downloads one here.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SkipTest

from tests.browser.offline_chromium import OFFLINE_CHROMIUM

T = TypeVar("T")

CANDIDATES = ("chromium", "chromium-browser")


def chromium_executable() -> str:
    """
    The Chromium to drive.

    @raise SkipTest: none is installed, or Playwright is not.
    """
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        raise SkipTest("playwright is not installed (pip install '.[test]')") from None
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    if os.path.exists("/usr/lib/chromium/chromium"):
        return "/usr/lib/chromium/chromium"
    raise SkipTest("Chromium is not installed (.ci/install-system-packages installs Debian's chromium)")


class HeadlessBrowser:
    """
    One headless Chromium and one page, each call run in the browser's own
    thread; L{run} returns a Deferred of the call's result.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="chromium")
        self._playwright: Any = None
        self.browser: Any = None
        self.page: Any = None

    def run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def start(self) -> Deferred[None]:
        executable = chromium_executable()
        self._pool.start()

        def start_blocking() -> None:
            from playwright.sync_api import sync_playwright

            self._playwright = sync_playwright().start()
            self.browser = self._playwright.chromium.launch(
                executable_path=executable, headless=True, args=["--no-sandbox", "--disable-gpu", *OFFLINE_CHROMIUM]
            )
            self.page = self.browser.new_page(viewport={"width": 1400, "height": 820})

        return self.run(start_blocking)

    async def stop(self) -> None:
        def stop_blocking() -> None:
            try:
                if self.browser is not None:
                    self.browser.close()
            finally:
                if self._playwright is not None:
                    self._playwright.stop()

        try:
            if self._pool.started:
                await self.run(stop_blocking)
        finally:
            self._pool.stop()
