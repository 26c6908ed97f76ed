"""
File I/O kept off the reactor thread: the local kernel's output follower
reads only what was appended to a file it keeps open; SSH keys and
known_hosts go through the thread pool; the kernelspec-resource route
resolves, checks and reads its file in a thread.
"""

from __future__ import annotations

import builtins
import os
import threading
from typing import Any

from twisted.conch.ssh import keys
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from egateway.clusters import local
from egateway.clusters.sshclient import HostKeyRejected, SSHError, SSHPool, SSHSettings
from tests.test_impersonation import LocalImpersonationTestCase


class _Runner:
    """
    A thread-pool stand-in: records each blocking call and runs it when the
    test says, marking the calls as off the reactor.
    """

    def __init__(self) -> None:
        self.queued: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []
        self.ran: list[str] = []
        self.inside = False

    def __call__(self, f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queued.append((f, args, d))
        return d

    def run_all(self) -> None:
        while self.queued:
            f, args, d = self.queued.pop(0)
            self.ran.append(f.__name__)
            self.inside = True
            try:
                result = f(*args)
            finally:
                self.inside = False
            d.callback(result)


class KernelOutputTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        with open(self.path, "wb"):
            pass
        self.clock = Clock()
        self.opened: list[str] = []
        self.reads: list[int] = []
        real_open, real_os_open, real_pread = builtins.open, os.open, os.pread

        def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
            if file == self.path:
                self.opened.append("open")
            return real_open(file, *args, **kwargs)

        def counting_os_open(path: Any, *args: Any, **kwargs: Any) -> Any:
            if path == self.path:
                self.opened.append("os.open")
            return real_os_open(path, *args, **kwargs)

        def counting_pread(fd: int, n: int, offset: int) -> bytes:
            self.reads.append(n)
            return real_pread(fd, n, offset)

        self.patch(builtins, "open", counting_open)
        self.patch(os, "open", counting_os_open)
        self.patch(os, "pread", counting_pread)

    def append(self, data: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(data)
        self.opened.clear()

    def test_file_kept_open_and_only_appended_bytes_read(self) -> None:
        """
        The follower opens the output file once, reads nothing while the
        kernel is quiet, and then reads exactly what was appended.
        """
        log = local.KernelLog("k", self.path, self.clock)
        self.addCleanup(log.stop)
        self.append(b"first line\n")
        self.clock.advance(1)
        self.assertEqual(list(log.tail), ["first line"])
        for _ in range(5):
            self.clock.advance(1)
        self.append(b"second")
        self.clock.advance(1)
        self.append(b" half\n")
        self.clock.advance(1)
        self.assertEqual(list(log.tail), ["first line", "second half"])
        self.assertEqual(self.opened, [])
        self.assertEqual(self.reads, [len(b"first line\n"), len(b"second"), len(b" half\n")])

    def test_last_words_after_a_flood(self) -> None:
        """
        A kernel that wrote far more than one read takes still has its last
        line in the explanation of its exit.
        """
        log = local.KernelLog("k", self.path, self.clock)
        self.append(b"x" * 100 + b"\n" * 5 + (b"noise\n" * 40000) + b"ModuleNotFoundError: ipykernel\n")
        status = local.explained(local.ExitStatus(code=1), log)
        self.assertIn("ModuleNotFoundError: ipykernel", status.reason)
        self.assertTrue(all(n <= local.TAIL_BYTES for n in self.reads))


class SSHFilesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.runner = _Runner()
        self.known_hosts = self.mktemp()

    def pool(self, checking: str, reactor: Any = None) -> SSHPool:
        return SSHPool(
            reactor or MemoryReactorClock(),
            SSHSettings(user="u", key_files=(self.mktemp(),), known_hosts=self.known_hosts, host_key_checking=checking),
            run_blocking=self.runner,
        )

    def test_keys_and_known_hosts_read_in_the_thread_pool(self) -> None:
        """
        The private keys and the known_hosts entries are read by the thread
        pool, not on the reactor.
        """
        pool = self.pool("strict")
        loading = Deferred.fromCoroutine(pool.private_keys())
        entries = Deferred.fromCoroutine(pool.known_host_entries())
        self.assertNoResult(loading)
        self.assertNoResult(entries)
        self.runner.run_all()
        self.assertEqual(self.successResultOf(loading), [])
        self.assertEqual(self.successResultOf(entries), [])
        self.assertEqual(self.runner.ran, ["load_keys", "_known_host_entries_blocking"])

    def test_learned_host_key_written_in_the_thread_pool(self) -> None:
        """
        Under accept-new an unknown host's key is accepted at once and
        written to known_hosts by the thread pool; a different key for that
        host is then refused.
        """
        from cryptography.hazmat.primitives.asymmetric import ed25519

        def blob() -> bytes:
            return keys.Key(ed25519.Ed25519PrivateKey.generate()).public().blob()

        pool = self.pool("accept-new")
        first = blob()
        pool.check_host_key("10.0.0.5", first, [])
        self.assertFalse(os.path.exists(self.known_hosts))
        self.runner.run_all()
        self.assertEqual(self.runner.ran, ["_add_known_host_blocking"])
        entries = Deferred.fromCoroutine(pool.known_host_entries())
        self.runner.run_all()
        known = self.successResultOf(entries)
        pool.check_host_key("10.0.0.5", first, known)
        self.assertRaises(HostKeyRejected, pool.check_host_key, "10.0.0.5", blob(), known)

    def test_cancellation_is_not_an_ssh_error(self) -> None:
        """
        Cancelling a connection attempt fails it with CancelledError, not
        with an SSHError that callers would count against the host.
        """
        reactor = MemoryReactorClock()
        pool = self.pool("off", reactor)
        connecting = Deferred.fromCoroutine(pool._connect("127.0.0.1", "u"))
        self.runner.run_all()
        factory = reactor.tcpClients[0][2]
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 22))
        protocol.makeConnection(StringTransport())
        connecting.cancel()
        failure = self.failureResultOf(connecting)
        self.assertFalse(failure.check(SSHError))
        self.assertTrue(failure.check(CancelledError))

    def test_closed_pool_opens_nothing(self) -> None:
        """
        A connection whose TCP connect completes after the pool was closed
        is dropped at once (close() could not see it), and a closed pool
        opens no new connection.
        """
        reactor = MemoryReactorClock()
        pool = self.pool("off", reactor)
        connecting = pool.connection("127.0.0.1")
        self.runner.run_all()
        pool.close()
        factory = reactor.tcpClients[0][2]
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 22))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertIn("stopping", str(self.failureResultOf(connecting, SSHError).value))
        self.assertTrue(transport.disconnecting)
        self.assertIn("stopping", str(self.failureResultOf(pool.connection("127.0.0.1"), SSHError).value))
        self.assertEqual(len(reactor.tcpClients), 1)


class KernelspecResourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        from twisted.python.threadpool import ThreadPool
        from treq.testing import StubTreq

        from egateway.api import routes
        from egateway.config import build_config
        from egateway.kernels.specs import KernelSpec
        from egateway.tap import build_api
        from tests.support.fakes import make_manager

        self.resource_dir = self.mktemp()
        os.makedirs(self.resource_dir)
        with open(os.path.join(self.resource_dir, "logo-64x64.png"), "wb") as f:
            f.write(b"\x89PNG fake")
        spec = KernelSpec.from_json(
            "fake",
            self.resource_dir,
            {
                "argv": ["fake-kernel", "{connection_file}"],
                "display_name": "Fake",
                "language": "python",
                "metadata": {"egateway": {"launcher": "fake"}},
            },
        )
        self.clock = Clock()
        manager, _, _ = make_manager(self.clock, spec)
        config = build_config({}, {}, {"allowed-hosts": "gw.example"})
        _, front = build_api(config, manager, self.clock, ThreadPool())
        self.stub = StubTreq(front)
        self.runner = _Runner()
        self.patch(routes, "deferToThreadPool", lambda reactor, pool, f, *args: self.runner(f, *args))
        self.on_reactor: list[str] = []
        real_realpath, real_isfile = os.path.realpath, os.path.isfile

        def watched(name: str, real: Any) -> Any:
            def call(path: Any, *args: Any, **kwargs: Any) -> Any:
                if not self.runner.inside and os.path.basename(self.resource_dir) in str(path):
                    self.on_reactor.append(name)
                return real(path, *args, **kwargs)

            return call

        self.patch(os.path, "realpath", watched("realpath", real_realpath))
        self.patch(os.path, "isfile", watched("isfile", real_isfile))

    def get(self, path: str) -> tuple[int, bytes]:
        d = self.stub.get(f"http://gw.example{path}")
        self.runner.run_all()
        self.stub.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(response.content())
        return response.code, body

    def test_resolved_checked_and_read_in_a_thread(self) -> None:
        """
        Serving a kernelspec's file resolves its path, checks it and reads
        it in the thread pool; a path leaving the resource directory is a
        404 decided there too.
        """
        code, body = self.get("/kernelspecs/fake/logo-64x64.png")
        self.assertEqual((code, body), (200, b"\x89PNG fake"))
        code, _ = self.get("/kernelspecs/fake/..%2F..%2Fetc%2Fpasswd")
        self.assertEqual(code, 404)
        self.assertEqual(self.on_reactor, [])
        self.assertEqual(self.runner.ran, ["_read_resource_blocking"] * 2)


class ImpersonatedFilesTests(LocalImpersonationTestCase):
    async def test_user_files_made_in_the_thread_pool(self) -> None:
        """
        A kernel started as another user has its files created (and given
        to that user) by the thread pool, not on the reactor thread.
        """
        calls: list[bool] = []
        real = local.open_private_blocking

        def watched(*args: Any) -> int:
            calls.append(threading.current_thread() is threading.main_thread())
            return real(*args)

        self.patch(local, "open_private_blocking", watched)
        model = await self.start("nobody")
        self.assertEqual(calls, [False, False])
        process = self.process_of(model["id"])
        self.assertEqual(os.stat(process.connection_file).st_uid, 65534)
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
