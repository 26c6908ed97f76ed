"""
Building blocks of the gateway's service tree.

L{OrderedMultiService}: a parent whose children stop one after the other, in
the reverse of the order they started, each once the one after it has
finished stopping (Twisted's L{MultiService} calls every child's
C{stopService} at once, so a kernel manager shutting kernels down over SSH
would race the SSH pool closing).

L{BlockingPool}: the gateway's one thread pool for blocking work.  Reading kernelspecs, keys, certificates, C{known_hosts}, a kernel's output
file or an account's passwd entry blocks; that work runs here, never on the
reactor thread.  The pool is a service of the gateway's tree (the first one:
started before anything can submit work, stopped after everything else), so
its threads exist only while the gateway runs and carry the gateway's name
in a thread dump.  Work submitted before the start waits for it.

The reactor's own pool stays for what Twisted puts there (name resolution);
the SQLite store keeps its single thread of its own (its connection may only
be used from the thread that opened it).
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

_log = Logger()

T = TypeVar("T")

DEFAULT_SIZE = 10
"""
Threads at most: blocking work is short file and account reads, and ten
keep a burst of launches from queueing behind one slow home directory.
"""


class OrderedMultiService(MultiService):
    """
    A L{MultiService} whose children stop in sequence, last added first.

    A child whose stop fails is logged and the next one stops all the same.
    Cancelling the stop (the gateway's C{stop_timeout}) cancels the child
    stopping then and stops every remaining child at once, without waiting.
    """

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order(list(reversed(list(self)))))

    async def _stop_in_order(self, children: list[Any]) -> None:
        for index, child in enumerate(children):
            try:
                await maybeDeferred(child.stopService)
            except CancelledError:
                for rest in children[index + 1 :]:
                    maybeDeferred(rest.stopService).addErrback(
                        lambda f, name=rest.name: _log.failure("stopping {service}", f, service=name)
                    )
                raise
            except Exception:
                _log.failure("stopping {service}", service=child.name)


class BlockingPool(Service):
    """
    Owns the pool: starts its threads with the gateway and joins them when
    the gateway stops.

    @ivar pool: the L{ThreadPool} to give everything that blocks.
    """

    name = "threads"

    def __init__(self, reactor: Any, size: int = DEFAULT_SIZE, name: str = "egateway-blocking") -> None:
        """
        @param reactor: provides C{IReactorFromThreads} (results come back
            through it).
        @param name: in each thread's name (C{PoolThread-<name>-<n>}).
        """
        self._reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=size, name=name)

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        """
        Join the threads.  Last in the stop order, so nothing submits work
        any more; work still running (a read) is short and is waited for.
        """
        if not self.running:
            # Stopped already (a test stopping a gateway twice): a thread
            # pool cannot be stopped again.
            return
        super().stopService()
        self.pool.stop()

    def run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        C{f(*args)} in the pool; fires with its result in the reactor thread.
        """
        return deferToThreadPool(self._reactor, self.pool, f, *args)
