"""
The gateway's service tree: which parts are services, in which order they
start and stop, and that each stop waits for the one before it.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from egateway.clusters.interface import LauncherContext
from egateway.clusters.registry import LauncherRegistry
from egateway.config import build_config
from egateway.services import OrderedMultiService
from egateway.store.interface import StoreUnavailable
from egateway.tap import build_service
from tests.support.gateway import InProcessGateway

# The parts whose order matters, in start order (other services sit between).
START_ORDER = ["threads", "data-dir", "launchers", "persistence", "sharing", "kernels", "reconciler", "culler", "http"]


FERNET_KEY = base64.urlsafe_b64encode(bytes(32)).decode()


def names(parent: Any) -> list[str]:
    return [child.name for child in parent]


class TreeShapeTests(SynchronousTestCase):
    def build(self, **flags: str) -> Any:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("EG_", "KG_"))}
        config = build_config({}, environ, {"listen": "tcp:0:interface=127.0.0.1", **flags})
        return build_service(config, MemoryReactorClock())

    def test_parts_in_order(self) -> None:
        """
        With a shared store, the launchers, persistence, sharing, the kernel
        manager, the reconciler and the HTTP listener are children of the
        gateway service in that order (so they stop in the reverse), with
        the thread pool first.
        """
        top = self.build(
            persistence="true",
            **{"data-dir": self.mktemp(), "store-url": "redis://127.0.0.1:1/0", "store-key": FERNET_KEY},
        )
        order = names(top)
        self.assertEqual(order[0], "threads")
        self.assertEqual([name for name in order if name in START_ORDER], START_ORDER)

    def test_no_store_parts_without_persistence(self) -> None:
        """
        Without persistence there is no persistence, sharing or reconciler
        service; the launchers still stop after the kernel manager.
        """
        order = names(self.build(persistence="false"))
        self.assertNotIn("persistence", order)
        self.assertNotIn("sharing", order)
        self.assertLess(order.index("launchers"), order.index("kernels"))

    def test_one_thread_pool(self) -> None:
        """
        The launchers get the tree's thread pool, not the reactor's.
        """
        top = self.build(persistence="false")
        pool = top.getServiceNamed("threads").pool
        self.assertIs(top.manager.launchers._context.threadpool, pool)


class Recorder(Service):
    """
    A service whose stop finishes when the test says so.
    """

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log
        self.stopping: Deferred[None] = Deferred()

    def startService(self) -> None:
        super().startService()
        self.log.append(f"start {self.name}")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.log.append(f"stop {self.name}")
        return self.stopping


class OrderedStopTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.log: list[str] = []
        self.parent = OrderedMultiService()
        self.children = [Recorder(name, self.log) for name in ("a", "b", "c")]
        for child in self.children:
            child.setServiceParent(self.parent)

    def test_each_stop_waits_for_the_next(self) -> None:
        """
        Children start in order and stop in the reverse order, each once the
        one after it has finished stopping.
        """
        self.parent.startService()
        stopping = self.parent.stopService()
        self.assertEqual(self.log, ["start a", "start b", "start c", "stop c"])
        self.children[2].stopping.callback(None)
        self.assertEqual(self.log[-1], "stop b")
        self.children[1].stopping.callback(None)
        self.assertEqual(self.log[-1], "stop a")
        self.assertNoResult(stopping)
        self.children[0].stopping.callback(None)
        self.successResultOf(stopping)

    def test_failed_stop_does_not_stop_the_rest(self) -> None:
        """
        A child whose stop fails is logged and the next one stops anyway.
        """
        self.parent.startService()
        self.children[2].stopping = fail(RuntimeError("broken"))
        self.children[1].stopping = succeed(None)
        self.children[0].stopping = succeed(None)
        self.successResultOf(self.parent.stopService())
        self.assertEqual(self.log[3:], ["stop c", "stop b", "stop a"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_out_of_time_stops_the_rest_at_once(self) -> None:
        """
        A stop cancelled (the gateway's stop timeout) stops every remaining
        child without waiting.
        """
        self.parent.startService()
        stopping = self.parent.stopService()
        stopping.cancel()
        self.failureResultOf(stopping)
        self.assertEqual(self.log[3:], ["stop c", "stop b", "stop a"])


class _Launcher:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log
        self.stopped: Deferred[None] = Deferred()

    def stop(self) -> Deferred[None]:
        self.log.append(f"stop {self.name}")
        return self.stopped


class _Listener:
    running = True

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def stopService(self) -> Deferred[None]:
        self.log.append("stop response")
        self.running = False
        return succeed(None)


class RegistryTests(SynchronousTestCase):
    def test_launchers_then_response_listener(self) -> None:
        """
        Stopping the registry stops each launcher built, newest first, each
        once the one before has released what it holds, and the response
        listener last.
        """
        from zope.interface import directlyProvides

        from egateway.clusters.interface import ILauncher

        log: list[str] = []
        context = LauncherContext(reactor=Clock(), runtime_dir="", ports=None)
        context.services["response"] = _Listener(log)
        built = {name: _Launcher(name, log) for name in ("one", "two")}
        for launcher in built.values():
            directlyProvides(launcher, ILauncher)
            for method in ("launch", "restore"):
                setattr(launcher, method, lambda *args: None)
        registry = LauncherRegistry(context, extra={name: (lambda c, n=name: built[n]) for name in built})
        registry.startService()
        registry.get("one")
        registry.get("two")
        self.assertEqual(names(registry), ["response", "one", "two"])
        stopping = registry.stopService()
        self.assertEqual(log, ["stop two"])
        built["two"].stopped.callback(None)
        self.assertEqual(log, ["stop two", "stop one"])
        built["one"].stopped.callback(None)
        self.assertEqual(log, ["stop two", "stop one", "stop response"])
        self.successResultOf(stopping)


class _DownStore:
    """
    A shared store that cannot be reached until told otherwise.
    """

    shared = True

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.attempts: list[float] = []
        self.up = False

    def start(self) -> Deferred[None]:
        self.attempts.append(self.clock.seconds())
        if self.up:
            return succeed(None)
        return fail(StoreUnavailable("redis://10.0.0.1:6379 is unreachable"))

    def load_kernels(self) -> Deferred[list[Any]]:
        return succeed([])

    def stop(self) -> Deferred[None]:
        return succeed(None)


class PersistenceStartTests(SynchronousTestCase):
    def setUp(self) -> None:
        from egateway.kernels.persistence import KernelPersistence
        from tests.support.fakes import make_manager

        self.clock = Clock()
        self.manager, _, _ = make_manager(self.clock)
        self.store = _DownStore(self.clock)
        self.persistence = KernelPersistence(
            lambda: succeed(self.store), True, self.manager, self.clock, "gw", "keep",
            retry_policy=backoffPolicy(initialDelay=1.0, maxDelay=8.0, factor=2.0, jitter=lambda: 0.0),
        )

    def test_backs_off_while_the_shared_store_is_down(self) -> None:
        """
        The persistence service opens an unavailable shared store again
        after 2, 4, 8, 8 ... seconds, and restores once it answers.
        """
        self.persistence.startService()
        for _ in range(40):
            self.clock.advance(1)
        self.assertEqual(self.store.attempts, [0, 2, 6, 14, 22, 30, 38])
        self.assertFalse(self.persistence.restoring.done)
        self.flushLoggedErrors()
        self.store.up = True
        self.clock.advance(8)
        self.assertTrue(self.persistence.restoring.done)
        self.assertTrue(self.persistence.opened)
        self.successResultOf(self.persistence.stopService())

    def test_stop_ends_the_retries(self) -> None:
        """
        Stopping the service while it waits to try again ends the waiting:
        no attempt is made after the stop.
        """
        self.persistence.startService()
        self.clock.advance(3)
        self.successResultOf(self.persistence.stopService())
        attempts = list(self.store.attempts)
        self.clock.advance(60)
        self.assertEqual(self.store.attempts, attempts)
        self.assertTrue(self.persistence.restoring.done)


class PersistenceStopWhileOpeningTests(SynchronousTestCase):
    def test_what_opens_after_the_stop_is_closed(self) -> None:
        """
        A gateway stopped while its store is still opening waits for the
        opening and then closes the store, rather than leave it open (with
        its retry loop running) behind the stopped gateway.
        """
        from egateway.kernels.persistence import KernelPersistence
        from tests.support.fakes import make_manager

        clock = Clock()
        manager, _, _ = make_manager(clock)
        store = _DownStore(clock)
        store.up = True
        stopped: list[bool] = []
        store.stop = lambda: stopped.append(True) or succeed(None)  # type: ignore[method-assign]
        opening: Deferred[Any] = Deferred()
        persistence = KernelPersistence(lambda: opening, False, manager, clock, "gw", "shutdown")
        persistence.startService()
        stopping = persistence.stopService()
        self.assertNoResult(stopping)
        opening.callback(store)
        self.successResultOf(stopping)
        self.assertEqual(stopped, [True])
        self.assertEqual([call for call in clock.getDelayedCalls() if "KernelPersistence" in repr(call)], [])


class GatewayOrderTests(TestCase):
    async def test_start_and_stop_order(self) -> None:
        """
        A real gateway with persistence starts its parts in order and stops
        them in the reverse order, each stop ending before the next begins.
        """
        gateway = InProcessGateway(persistence="true", data_dir=os.path.abspath(self.mktemp()))
        log: list[str] = []
        for child in gateway.service:
            record(child, log)
        await gateway.start()
        started = [entry.split(" ", 1)[1] for entry in log]
        self.assertEqual(started, names(gateway.service))
        log.clear()
        await gateway.stop()
        expected = []
        for name in reversed(names(gateway.service)):
            expected += [f"stop {name}", f"stopped {name}"]
        self.assertEqual(log, expected)


def record(child: Any, log: list[str]) -> None:
    start, stop = child.startService, child.stopService

    def recording_start() -> None:
        log.append(f"start {child.name}")
        start()

    def recording_stop() -> Any:
        from twisted.internet.defer import maybeDeferred

        log.append(f"stop {child.name}")
        return maybeDeferred(stop).addBoth(lambda result: log.append(f"stopped {child.name}") or result)

    child.startService = recording_start
    child.stopService = recording_stop


class StoreDownAtStartTests(TestCase):
    timeout = 90

    async def test_gateway_waits_for_its_redis(self) -> None:
        """
        A gateway started while its Redis is down keeps running, trying
        again with back-off, and opens the store once Redis is up.
        """
        import tempfile

        from twisted.internet import reactor
        from twisted.internet.threads import deferToThread

        from egateway.store.crypto import SecretBox
        from tests.fixtures.redis import RedisServer
        from tests.support.polling import eventually

        redis = RedisServer(tempfile.mkdtemp(prefix="egw-", dir="/tmp"))
        redis.up()
        self.addCleanup(redis.down)
        await deferToThread(redis.stop)
        gateway = InProcessGateway(
            persistence="true",
            data_dir=os.path.abspath(self.mktemp()),
            store_url=redis.url,
            store_key=SecretBox.generate_key(),
        )
        await gateway.start()
        self.addCleanup(gateway.stop)
        persistence = gateway.manager.persistence
        await eventually(lambda: persistence._backoff is not None, "a failed attempt to open the store")
        self.assertTrue(reactor.running)
        self.assertFalse(persistence.opened)
        await deferToThread(redis.start)
        await eventually(lambda: persistence.opened and persistence.restoring.done, "the store to open", timeout=40)
        self.assertEqual(self.flushLoggedErrors(), [])
