"""
Bounded reactor turns with the API's connections first (L{egateway.ops.turns}),
on real epoll objects, a real epoll reactor and a real gateway.
"""

from __future__ import annotations

import select
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from egateway.ops import turns
from egateway.ops.turns import MAX_EVENTS, BoundedTurns, TurnPoller
from tests.support.gateway import GatewayTestCase
from tests.support.polling import eventually
from tests.support.wsclient import ChannelsClient


class _Pairs:
    """
    Socket pairs whose first ends are readable (the second sent a byte).
    """

    def __init__(self, test: SynchronousTestCase) -> None:
        self._test = test
        self.pairs: list[tuple[socket.socket, socket.socket]] = []

    def readable(self, count: int) -> list[int]:
        fds = []
        for _ in range(count):
            a, b = socket.socketpair()
            self._test.addCleanup(a.close)
            self._test.addCleanup(b.close)
            b.send(b"x")
            self.pairs.append((a, b))
            fds.append(a.fileno())
        return fds


class TurnPollerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.epoll = select.epoll()
        self.addCleanup(self.epoll.close)
        self.now = 0.0
        # What the reactor holds: the flags each descriptor is registered with.
        self.registered: dict[int, int] = {}
        self.poller = TurnPoller(
            self.epoll, budget=0.003, flags_of=lambda fd: self.registered.get(fd, 0), clock=lambda: self.now
        )
        self.poller.cap = 3
        self.addCleanup(self.poller.control.close)
        self.sockets = _Pairs(self)

    def register(self, fd: int, flags: int) -> None:
        """
        As the reactor does: register with the poller, then record.
        """
        self.poller.register(fd, flags)
        self.registered[fd] = flags

    def modify(self, fd: int, flags: int) -> None:
        self.poller.modify(fd, flags)
        self.registered[fd] = flags

    def unregister(self, fd: int) -> None:
        self.poller.unregister(fd)
        del self.registered[fd]

    def test_bounded_and_fair(self) -> None:
        """
        A poll hands out at most C{cap} descriptors, and ready ones
        left out come in the next polls: ten ready descriptors are all
        served within four polls, none twice before all were served once.
        """
        fds = self.sockets.readable(10)
        for fd in fds:
            self.register(fd, select.EPOLLIN)
        self.poller._learn = lambda cost: None  # type: ignore[method-assign]
        served: list[int] = []
        for _ in range(4):
            events = self.poller.poll(0, 100)
            self.assertLessEqual(len(events), 3)
            served.extend(fd for fd, _ in events)
        self.assertEqual(sorted(served[:10]), sorted(fds))

    def test_cap_learnt_from_turns(self) -> None:
        """
        The cap follows what a descriptor costs: turns of 1 ms per
        descriptor with a 3 ms budget bring it to 3; turns that cost 10 ms
        each bring it to 1, never 0; cheap turns raise it to L{MAX_EVENTS}
        at most.
        """
        fds = self.sockets.readable(80)
        for fd in fds:
            self.register(fd, select.EPOLLIN)
        self.poller.cap = MAX_EVENTS

        def turns(count: int, per_descriptor: float) -> None:
            for _ in range(count):
                handed = len(self.poller.poll(0, 1000))
                self.now += handed * per_descriptor

        turns(30, 0.001)
        self.assertEqual(self.poller.cap, 3)
        turns(30, 0.010)
        self.assertEqual(self.poller.cap, 1)
        turns(60, 0.00001)
        self.assertEqual(self.poller.cap, MAX_EVENTS)

    def test_idle_polls_teach_nothing(self) -> None:
        """
        Time spent between polls that handed out nothing (the reactor
        waited, ran timers) is not counted as what a descriptor costs.
        """
        before = self.poller.cap
        self.poller.poll(0, 10)
        self.now += 5.0
        self.poller.poll(0, 10)
        self.assertEqual((self.poller.cap, self.poller.cost), (before, 0.0))

    def test_reactor_limit_kept(self) -> None:
        """
        The reactor's own C{maxevents} still bounds a poll when smaller.
        """
        for fd in self.sockets.readable(5):
            self.register(fd, select.EPOLLIN)
        self.assertEqual(len(self.poller.poll(0, 2)), 2)

    def test_preferred_first(self) -> None:
        """
        A preferred descriptor is served in a turn of its own, ahead of data
        descriptors that were ready before it; while it stays ready, the
        next turn serves it with data descriptors (never two turns of the
        control plane alone).
        """
        data = self.sockets.readable(10)
        for fd in data:
            self.register(fd, select.EPOLLIN)
        self.poller._learn = lambda cost: None  # type: ignore[method-assign]
        [api] = self.sockets.readable(1)
        self.register(api, select.EPOLLIN)
        self.poller.prefer(api)
        self.assertEqual(self.poller.poll(0, 100), [(api, select.EPOLLIN)])
        events = self.poller.poll(0, 100)
        self.assertEqual(events[0], (api, select.EPOLLIN))
        self.assertEqual(len([fd for fd, _ in events if fd in data]), 3)
        self.assertNotIn(self.poller.control.fileno(), [fd for fd, _ in events])
        self.assertEqual(self.poller.poll(0, 100), [(api, select.EPOLLIN)])

    def test_preferred_wakes_a_waiting_poll(self) -> None:
        """
        A poll waiting for anything returns when only a preferred
        descriptor becomes ready, with that descriptor (not the control
        epoll's own).
        """
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        self.register(a.fileno(), select.EPOLLIN)
        self.poller.prefer(a.fileno())
        self.assertEqual(self.poller.poll(0, 10), [])
        b.send(b"x")
        self.assertEqual(self.poller.poll(5, 10), [(a.fileno(), select.EPOLLIN)])

    def test_preferred_before_registered(self) -> None:
        """
        A descriptor preferred before the reactor registers it goes to the
        control epoll when it does; C{modify} and C{unregister} follow it.
        """
        [fd] = self.sockets.readable(1)
        self.poller.prefer(fd)
        self.register(fd, select.EPOLLIN)
        self.assertEqual(self.poller.control.poll(0), [(fd, select.EPOLLIN)])
        # The reactor's epoll holds only the control epoll, ready because fd is.
        self.assertEqual(self.epoll.poll(0), [(self.poller.control.fileno(), select.EPOLLIN)])
        self.modify(fd, select.EPOLLIN | select.EPOLLOUT)
        self.assertEqual(self.poller.control.poll(0), [(fd, select.EPOLLIN | select.EPOLLOUT)])
        self.unregister(fd)
        self.assertEqual(self.poller.control.poll(0), [])

    def test_release(self) -> None:
        """
        A released descriptor is a data descriptor again, with the flags
        the reactor last gave it.
        """
        [fd] = self.sockets.readable(1)
        self.register(fd, select.EPOLLIN)
        self.poller.prefer(fd)
        self.modify(fd, select.EPOLLIN | select.EPOLLOUT)
        self.poller.release(fd)
        self.assertEqual(self.poller.control.poll(0), [])
        self.assertEqual(self.epoll.poll(0), [(fd, select.EPOLLIN | select.EPOLLOUT)])

    def test_release_of_a_closed_descriptor(self) -> None:
        """
        Releasing the descriptor of a connection that was closed (after
        the reactor unregistered it) forgets it: its number, given to a new
        socket, is a data descriptor.
        """
        a, b = socket.socketpair()
        self.addCleanup(b.close)
        fd = a.fileno()
        self.register(fd, select.EPOLLIN)
        self.poller.prefer(fd)
        self.unregister(fd)
        a.close()
        self.poller.release(fd)
        self.assertEqual(self.poller._preferred, set())

    def test_uninstall(self) -> None:
        """
        Uninstalling moves preferred descriptors back to the reactor's
        epoll, takes the control epoll out of it, and returns it.
        """
        [fd] = self.sockets.readable(1)
        self.register(fd, select.EPOLLIN)
        self.poller.prefer(fd)
        control_fd = self.poller.control.fileno()
        self.assertIs(self.poller.uninstall(), self.epoll)
        self.assertEqual(self.epoll.poll(0), [(fd, select.EPOLLIN)])
        self.assertNotIn(control_fd, [fd for fd, _ in self.epoll.poll(0)])
        self.assertTrue(self.poller.control.closed)


class BoundedTurnsServiceTests(SynchronousTestCase):
    def test_installs_and_restores(self) -> None:
        """
        On an epoll reactor the service stands its poller in for the
        reactor's epoll object while it runs, keeping what was registered
        before, and puts the original back when it stops.
        """
        own = EPollReactor()
        self.addCleanup(own._poller.close)
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        original = own._poller
        service = BoundedTurns(own, 0.004)
        service.startService()
        self.assertIsInstance(own._poller, TurnPoller)
        self.assertEqual(own._poller.budget, 0.004)
        self.assertIs(turns._installed, own._poller)
        # The reactor's waker was registered before: its flags are known.
        waker = own.waker.fileno()
        self.assertEqual(own._poller._flags_of(waker), select.EPOLLIN)
        service.stopService()
        self.assertIs(own._poller, original)
        self.assertIsNone(turns._installed)

    def test_other_reactors_untouched(self) -> None:
        """
        A reactor without an epoll object of its own keeps its turns.
        """
        clock = Clock()
        service = BoundedTurns(clock, 0.004)
        service.startService()
        self.assertIsNone(service.poller)
        self.assertFalse(hasattr(clock, "_poller"))
        service.stopService()

    def test_reactor_turns_bounded(self) -> None:
        """
        Through a real epoll reactor's C{doIteration}: with twelve readers
        ready and a cap of four, one turn reads four, and three turns
        read all twelve.
        """
        own = EPollReactor()
        self.addCleanup(own._poller.close)
        service = BoundedTurns(own, 0.004)
        service.startService()
        self.addCleanup(service.stopService)
        service.poller.cap = 4
        service.poller._learn = lambda cost: None
        read: list[int] = []

        class Reader:
            def __init__(self, sock: socket.socket) -> None:
                self.sock = sock

            def fileno(self) -> int:
                return self.sock.fileno()

            def doRead(self) -> None:
                self.sock.recv(1)
                read.append(self.fileno())

            def logPrefix(self) -> str:
                return "reader"

        readers = []
        for fd in _Pairs(self).readable(12):
            reader = Reader(socket.socket(fileno=socket.dup(fd)))
            self.addCleanup(reader.sock.close)
            own.addReader(reader)
            readers.append(reader)
        self.addCleanup(lambda: [own.removeReader(r) for r in readers])
        own.doIteration(0)
        self.assertEqual(len(read), 4)
        own.doIteration(0)
        own.doIteration(0)
        self.assertEqual(sorted(read), sorted(r.fileno() for r in readers))


class GatewayConnectionsTests(GatewayTestCase):
    """
    A running gateway (in trial's epoll reactor) prefers its HTTP
    connections and serves a channels WebSocket as kernel traffic.
    """

    def _server_side(self, protocol_name: str) -> list[int]:
        return [
            fd for fd, selectable in reactor._selectables.items()
            if type(getattr(selectable, "protocol", None)).__name__ == protocol_name
        ]

    async def test_http_preferred_websocket_not(self) -> None:
        """
        The gateway's HTTP connection is preferred while it is one, and
        forgotten when it closes; a channels WebSocket is not preferred.
        """
        poller = reactor._poller
        self.assertIsInstance(poller, TurnPoller)
        self.assertEqual(poller.budget, 0.005)
        listener = self.gateway.service.getServiceNamed("http")
        port = (await listener._waitingForPort).getHost().port
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        before = set(self._server_side("_Channel"))
        idle = await endpoint.connect(Factory.forProtocol(Protocol))
        [http] = await eventually(
            lambda: [fd for fd in self._server_side("_Channel") if fd not in before],
            "the server side of the connection",
        )
        self.assertIn(http, poller._preferred)
        idle.transport.loseConnection()
        await eventually(lambda: http not in poller._preferred, "the closed connection forgotten")

        model = await self.gateway.start_kernel()
        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        self.addCleanup(client.close)
        await client.execute("1+1")
        [websocket] = self._server_side("ChannelsProtocol")
        self.assertNotIn(websocket, poller._preferred)
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
