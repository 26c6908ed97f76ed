"""
Outcomes that several callers wait on without owning them.

L{OneShotObserver} is the one "one result, many waiters" helper (a kernel's
exit, a kernelspec scan, a store or SSH connection attempt): each waiter is
its own Deferred, and cancelling one detaches only that one.

A launch, restart or shutdown belongs to the kernel manager, as an
L{Operation}.  A request that asks for one gets an observer Deferred: if the
client goes away, Klein cancels that observer and only that observer; the
operation goes on.  A second request for an operation in progress observes
the same one.
"""

from __future__ import annotations

from typing import Any, Coroutine, Generic, TypeVar

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

T = TypeVar("T")

_PENDING = object()

_log = Logger()


class OneShotObserver(Generic[T]):
    """
    One result, any number of waiters: each L{when_fired} is a new Deferred
    that fires with the result (or fails with the failure) once L{fire} is
    called, at once if it already was.  Cancelling a waiter detaches that
    waiter only: whoever produces the result is not disturbed.

    This is the one place the "list of waiter Deferreds" pattern lives; an
    outcome that repeats (a scan per ttl, a connection per attempt) uses a
    fresh observer per round.
    """

    def __init__(self) -> None:
        self._result: Any = _PENDING
        self._waiters: list[Deferred[T]] = []

    @property
    def fired(self) -> bool:
        return self._result is not _PENDING

    @property
    def waiting(self) -> int:
        """
        How many waiters have not had the result yet.
        """
        return len(self._waiters)

    def when_fired(self) -> Deferred[T]:
        """
        A new Deferred for the result.
        """
        if self._result is not _PENDING:
            if isinstance(self._result, Failure):
                return fail(self._result)
            return succeed(self._result)
        waiter: Deferred[T] = Deferred(self._forget)
        self._waiters.append(waiter)
        return waiter

    def fire(self, result: T | Failure | BaseException) -> None:
        """
        Give every waiter, present and future, C{result} (a value, a
        L{Failure} or an exception).

        @raise AlreadyFired: it was fired already.
        """
        if self._result is not _PENDING:
            raise AlreadyFired()
        if isinstance(result, BaseException):
            result = Failure(result)
        self._result = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def fire_if_not_fired(self, result: T | Failure | BaseException) -> None:
        if self._result is _PENDING:
            self.fire(result)

    def _forget(self, waiter: Deferred[T]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)


class AlreadyFired(Exception):
    """
    L{OneShotObserver.fire} was called twice.
    """


class Operation(Generic[T]):
    """
    A running coroutine whose outcome any number of observers can await.

    A failure with nobody observing it (an automatic restart) is logged:
    otherwise it would vanish.

    @ivar name: what the operation does, for logs (C{"restart"}).
    """

    def __init__(
        self, name: str, coroutine: Coroutine[Any, Any, T], subject: str = "", observed: bool = True
    ) -> None:
        """
        @param subject: what the operation acts on, for its log line
            (a kernel id).
        @param observed: whether its creator observes it (then a failure
            before the creator could observe it is the creator's to report).
        """
        self.name = name
        self.subject = subject
        self._outcome: OneShotObserver[T] = OneShotObserver()
        self._ended: OneShotObserver[None] = OneShotObserver()
        self._creator_observes = observed
        self._starting = True
        self.running: Deferred[T] = Deferred.fromCoroutine(coroutine)
        self.running.addBoth(self._done)
        self._starting = False

    @property
    def done(self) -> bool:
        return self._outcome.fired

    def _done(self, result: Any) -> None:
        unobserved = self._outcome.waiting == 0 and not (self._starting and self._creator_observes)
        self._outcome.fire(result)
        self._ended.fire(None)
        if isinstance(result, Failure) and unobserved and not result.check(CancelledError):
            # Whoever cancelled it knows; anything else would vanish.
            _log.failure(
                "{operation} of {subject} failed and nobody was waiting for it",
                result,
                operation=self.name,
                subject=self.subject or "-",
            )
        # Observers (or the line above) saw a failure: not "unhandled".
        return None

    def observe(self) -> Deferred[T]:
        """
        A new Deferred for the outcome.  Cancelling it detaches this observer
        only.
        """
        return self._outcome.when_fired()

    def finished(self) -> Deferred[None]:
        """
        Fires with C{None} when the operation has ended, however it ended
        (its observers deal with its outcome).  For running after it;
        cancelling this waiter detaches it only.
        """
        return self._ended.when_fired()

    def cancel(self) -> None:
        """
        Cancel the operation itself (not just an observer).
        """
        self.running.cancel()


def detached(deferred: Deferred[T]) -> Deferred[T]:
    """
    A Deferred that fires as C{deferred} does, leaving C{deferred}'s result
    in place; cancelling it (a timeout, a race lost) leaves C{deferred}
    alone.  For waiting on something that must run to its end whoever
    stops waiting (an sbatch submission must still tell us its job id).
    """
    mirror: Deferred[T] = Deferred()

    def relay(result: Any) -> Any:
        if not mirror.called:
            if isinstance(result, Failure):
                mirror.errback(result)
            else:
                mirror.callback(result)
        return result

    deferred.addBoth(relay)
    return mirror


def first(deferreds: list[Deferred[Any]]) -> Deferred[tuple[int, Any]]:
    """
    Fire with C{(index, result)} of the first Deferred to fire, or fail with
    the first failure; cancel the others.  (Unlike C{defer.race}, a failure
    counts as firing first.)
    """
    outcome: Deferred[tuple[int, Any]] = Deferred(lambda _: [d.cancel() for d in deferreds])
    settled = False

    def settle(result: Any, index: int) -> None:
        nonlocal settled
        if settled:
            return None
        settled = True
        for other in deferreds:
            if other is not deferreds[index]:
                other.cancel()
        if isinstance(result, Failure):
            outcome.errback(result)
        else:
            outcome.callback((index, result))
        return None

    for index, d in enumerate(deferreds):
        d.addBoth(settle, index)
    return outcome
