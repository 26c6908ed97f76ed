"""
Operations that several callers wait on without owning them.

A launch, restart or shutdown belongs to the kernel manager.  A request that
asks for one gets an observer Deferred: if the client goes away, Klein
cancels that observer and only that observer; the operation goes on.  A
second request for an operation in progress observes the same one.
"""

from __future__ import annotations

from typing import Any, Coroutine, Generic, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

T = TypeVar("T")

_PENDING = object()


class Operation(Generic[T]):
    """
    A running coroutine whose outcome any number of observers can await.

    @ivar name: what the operation does, for logs (C{"restart"}).
    """

    def __init__(self, name: str, coroutine: Coroutine[Any, Any, T]) -> None:
        self.name = name
        self._result: Any = _PENDING
        self._observers: list[Deferred[T]] = []
        self.running: Deferred[T] = Deferred.fromCoroutine(coroutine)
        self.running.addBoth(self._done)

    @property
    def done(self) -> bool:
        return self._result is not _PENDING

    def _done(self, result: Any) -> None:
        self._result = result
        observers, self._observers = self._observers, []
        for observer in observers:
            if isinstance(result, Failure):
                observer.errback(result)
            else:
                observer.callback(result)
        if isinstance(result, Failure):
            # Observers saw it; the operation itself must not log it again.
            return None

    def observe(self) -> Deferred[T]:
        """
        A new Deferred for the outcome.  Cancelling it detaches this observer
        only.
        """
        if self._result is not _PENDING:
            if isinstance(self._result, Failure):
                return fail(self._result)
            return succeed(self._result)
        observer: Deferred[T] = Deferred(lambda d: self._forget(d))
        self._observers.append(observer)
        return observer

    def _forget(self, observer: Deferred[T]) -> None:
        try:
            self._observers.remove(observer)
        except ValueError:
            pass

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
