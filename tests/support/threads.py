"""
A thread pool for tests that run launchers on the real reactor (the gateway
gives them its own, see L{egateway.services.BlockingPool}).
"""

from __future__ import annotations

from typing import Any

from twisted.python.threadpool import ThreadPool


def started_pool(case: Any) -> ThreadPool:
    """
    A started pool, stopped when C{case} ends.
    """
    pool = ThreadPool(minthreads=0, maxthreads=4, name="egateway-test")
    pool.start()
    case.addCleanup(pool.stop)
    return pool
