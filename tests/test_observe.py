"""
The one "one result, many waiters" helper, and the operations built on it.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from egateway.observe import AlreadyFired, OneShotObserver, Operation


class OneShotObserverTests(SynchronousTestCase):
    def test_every_waiter_gets_the_result(self) -> None:
        """
        Waiters before and after the result all get it.
        """
        observer: OneShotObserver[int] = OneShotObserver()
        early = observer.when_fired()
        self.assertNoResult(early)
        observer.fire(7)
        self.assertEqual(self.successResultOf(early), 7)
        self.assertEqual(self.successResultOf(observer.when_fired()), 7)
        self.assertRaises(AlreadyFired, observer.fire, 8)

    def test_failure_reaches_every_waiter(self) -> None:
        """
        An exception (or a Failure) fails every waiter, present and future.
        """
        observer: OneShotObserver[int] = OneShotObserver()
        early = observer.when_fired()
        observer.fire(ValueError("no"))
        self.failureResultOf(early, ValueError)
        self.failureResultOf(observer.when_fired(), ValueError)
        other: OneShotObserver[int] = OneShotObserver()
        other.fire(Failure(KeyError("k")))
        self.failureResultOf(other.when_fired(), KeyError)

    def test_cancelled_waiter_detaches_only_itself(self) -> None:
        """
        Cancelling one waiter fails that one with CancelledError; the others
        still get the result.
        """
        observer: OneShotObserver[str] = OneShotObserver()
        gone, staying = observer.when_fired(), observer.when_fired()
        gone.cancel()
        self.failureResultOf(gone, CancelledError)
        self.assertEqual(observer.waiting, 1)
        observer.fire("done")
        self.assertEqual(self.successResultOf(staying), "done")


class OperationTests(SynchronousTestCase):
    def test_finished_whatever_the_outcome(self) -> None:
        """
        finished() fires with None after a failure (it is the observers'),
        while a cancelled finished() waiter fails with CancelledError.
        """
        gate: Deferred[None] = Deferred()

        async def body() -> None:
            await gate
            raise ValueError("broken")

        operation: Operation[None] = Operation("test", body())
        observed = operation.observe()
        waiting, leaving = operation.finished(), operation.finished()
        leaving.cancel()
        self.failureResultOf(leaving, CancelledError)
        gate.callback(None)
        self.assertIsNone(self.successResultOf(waiting))
        self.failureResultOf(observed, ValueError)
        self.assertEqual(self.flushLoggedErrors(ValueError), [])

    def test_failure_nobody_observes_is_logged(self) -> None:
        """
        A failure that every observer walked away from is logged once.
        """
        gate: Deferred[None] = Deferred()

        async def body() -> None:
            await gate
            raise ValueError("broken")

        operation: Operation[None] = Operation("test", body(), subject="kernel k")
        observer = operation.observe()
        observer.cancel()
        self.failureResultOf(observer, CancelledError)
        gate.callback(None)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_unobserved_from_the_start(self) -> None:
        """
        An operation its creator does not observe has a failure logged even
        when it fails at once.
        """

        async def body() -> None:
            raise ValueError("at once")

        Operation("test", body(), observed=False)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class _UnansweredHost:
    """
    A remote kernel whose host never answers liveness checks or signals.
    """

    @staticmethod
    def make(clock):
        from egateway.clusters.interface import Placement
        from egateway.clusters.remote import RemoteKernelProcess
        from egateway.wire.channels import ConnectionInfo

        class Process(RemoteKernelProcess):
            async def _check_alive(self):
                return await Deferred()

            async def _signal_directly(self, signum):
                await Deferred()

        info = ConnectionInfo(
            ip="10.0.0.1", shell_port=1, iopub_port=2, stdin_port=3, control_port=4, hb_port=5, key=b"k"
        )
        return Process(
            kernel_id="k", info=info, placement=Placement(host="h", ip="10.0.0.1", pid=7), reactor=clock,
            poll_interval=1000.0,
        )


class RemoteCancellationTests(SynchronousTestCase):
    def test_cancelled_poll_is_not_alive_unknown(self) -> None:
        """
        Cancelling a liveness poll cancels it; it is not reported as an
        unreachable host whose kernel is presumed alive.
        """
        from twisted.internet.task import Clock

        clock = Clock()
        process = _UnansweredHost.make(clock)
        polling = process.poll()
        polling.cancel()
        self.failureResultOf(polling, CancelledError)
        process._watch.stop()


class SpecScanTests(SynchronousTestCase):
    def test_concurrent_callers_share_one_scan(self) -> None:
        """
        Callers asking while a scan runs share it; one that gives up (a
        client gone) does not disturb the others.
        """
        from twisted.internet.task import Clock

        from egateway.kernels import specs

        scans: list[Deferred] = []
        self.patch(specs, "deferToThreadPool", lambda reactor, pool, f, *args: scans.append(Deferred()) or scans[-1])
        catalog = specs.KernelSpecCatalog(Clock(), None)
        first, gone, second = catalog.all(), catalog.all(), catalog.all()
        gone.cancel()
        self.failureResultOf(gone, CancelledError)
        self.assertEqual(len(scans), 1)
        scans[0].callback({"python3": "spec"})
        self.assertEqual(self.successResultOf(first), {"python3": "spec"})
        self.assertEqual(self.successResultOf(second), {"python3": "spec"})
