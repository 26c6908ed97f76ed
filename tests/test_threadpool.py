"""
Blocking work runs in the gateway's one thread pool, a service of its tree,
never in the reactor's pool.
"""

from __future__ import annotations

import ast
import os
import threading

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

import egateway
from egateway.services import BlockingPool

BANNED = {"deferToThread", "getThreadPool", "callInThread"}
"""
Calls that use the reactor's pool (C{callInThread} is the reactor's; a
pool of our own is used through C{deferToThreadPool}).
"""


def banned_calls(source: str) -> list[tuple[int, str]]:
    """
    The line and name of every call to one of L{BANNED} in C{source}.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name in BANNED:
            found.append((node.lineno, name))
    return found


class SourceTests(SynchronousTestCase):
    def test_finder(self) -> None:
        """
        The finder sees both spellings of what is banned, and not what is
        allowed.
        """
        source = (
            "deferToThread(f)\n"
            "threads.deferToThread(f)\n"
            "reactor.getThreadPool()\n"
            "deferToThreadPool(reactor, pool, f)\n"
        )
        self.assertEqual(banned_calls(source), [(1, "deferToThread"), (2, "deferToThread"), (3, "getThreadPool")])

    def test_no_module_uses_the_reactors_pool(self) -> None:
        """
        No module of egateway calls C{deferToThread}, C{getThreadPool} or
        C{callInThread}: blocking work goes to the pool the service tree
        owns, started and stopped with the gateway.
        """
        root = os.path.dirname(egateway.__file__)
        offenders = []
        for directory, _, files in os.walk(root):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    with open(path, encoding="utf-8") as f:
                        for line, call in banned_calls(f.read()):
                            offenders.append(f"{os.path.relpath(path, root)}:{line}: {call}")
        self.assertEqual(offenders, [])


class PoolTests(TestCase):
    async def test_named_threads_that_end_with_the_service(self) -> None:
        """
        Work runs on threads named after the gateway's pool; once the
        service stops, its threads are gone.
        """
        service = BlockingPool(reactor, size=2)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        name = await service.run(lambda: threading.current_thread().name)
        self.assertTrue(name.startswith("PoolThread-egateway-blocking-"), name)
        service.stopService()
        self.assertFalse(any(t.name.startswith("PoolThread-egateway-blocking-") for t in threading.enumerate()))
