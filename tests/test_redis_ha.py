"""
A store that is itself highly available: Redis over TLS with client
certificates, an ACL user with a password, and Redis Sentinel, with a real
primary, replica and three sentinels on loopback whose primary is killed
while a client streams output through the gateway.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from egateway.store import StoreUnavailable, parse_store_url
from egateway.store.crypto import SecretBox
from egateway.store.redis import RedisStore
from egateway.store.resp import RedisAddress, ReplyParser, encode_command
from tests.fixtures import RedisSentinelGroup, RedisServer, RedisTLS
from tests.fixtures.system import REDIS_PACKAGES, require_packages
from tests.support.daemon import ChildProcess, free_port
from tests.support.gateway import InProcessGateway, pid_alive
from tests.support.wsclient import ChannelsClient
from tests.test_store import kernel_record
from tests.test_tls import REPO_ROOT, issue

BOX = SecretBox.from_key(SecretBox.generate_key())


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


def capture_log(case: TestCase) -> list[str]:
    """
    Every log line (formatted, with its fields) emitted until the test ends.
    """
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(f"{formatEvent(event)} {event!r}")

    globalLogPublisher.addObserver(observe)
    case.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


async def start_store(case: TestCase, url: str) -> RedisStore:
    store = RedisStore(url, BOX, reactor, connect_timeout=2.0, command_timeout=3.0)
    case.addCleanup(store.stop)
    await store.start()
    return store


async def remove_all(case: TestCase, gateway: InProcessGateway) -> None:
    """
    With a shared store kernels outlive a gateway's stop: delete them, stop
    the gateway, then check no kernel process is left.
    """
    for kernel_id in list(gateway.manager.kernels):
        await gateway.request("DELETE", f"api/kernels/{kernel_id}")
    await gateway.stop()
    case.assertEqual([pid for pid in gateway.pids if pid_alive(pid)], [])


class AddressTests(SynchronousTestCase):
    def test_tls_and_sentinel_urls(self) -> None:
        """
        rediss:// takes the CA and client certificate as query parameters;
        redis+sentinel:// takes several sentinels, the master name and a
        database; both are accepted as store locations.
        """
        tls = RedisAddress.from_url("rediss://app:pw@db.example:6380/3?ca=/etc/ca.pem&cert=/etc/c.pem&key=/etc/c.key")
        self.assertEqual(
            (tls.tls, tls.host, tls.port, tls.db, tls.tls_ca, tls.tls_cert, tls.tls_key),
            (True, "db.example", 6380, 3, "/etc/ca.pem", "/etc/c.pem", "/etc/c.key"),
        )
        sentinel = RedisAddress.from_url("redis+sentinel://app:p%40ss@10.0.0.1,10.0.0.2:26380,[::1]/main/2")
        self.assertEqual(sentinel.sentinels, (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("::1", 26379)))
        self.assertEqual((sentinel.master_name, sentinel.db, sentinel.username, sentinel.password), ("main", 2, "app", "p@ss"))
        self.assertEqual(sentinel.replicas, 1)
        self.assertEqual(str(sentinel), "redis+sentinel://10.0.0.1:26379,10.0.0.2:26380,[::1]:26379/main/2")
        self.assertEqual(RedisAddress.from_url("rediss+sentinel://h/m?replicas=0").replicas, 0)
        for url in ("rediss://h", "redis+sentinel://h/m", "rediss+sentinel://h/m"):
            self.assertEqual(parse_store_url(url), ("redis", url))

    def test_bad_urls_never_show_the_password(self) -> None:
        """
        Malformed TLS and sentinel URLs are refused with a message that says
        what is wrong and does not contain the password.
        """
        for bad in (
            "redis://:hunter22@h?ca=/x",  # ca is for rediss
            "rediss://:hunter22@h?cert=/c",  # cert without key
            "redis+sentinel://:hunter22@h1,h2",  # no master name
            "redis+sentinel://:hunter22@h1,,h2/m",
            "redis+sentinel://:hunter22@h1/m/x",
            "rediss://:hunter22@h?replicas=many",
        ):
            with self.assertRaises(ValueError) as caught:
                RedisAddress.from_url(bad)
            self.assertNotIn("hunter22", str(caught.exception), bad)
        self.assertNotIn("hunter22", repr(RedisAddress.from_url("redis+sentinel://:hunter22@h/m")))


class TLSTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        require_packages(*REDIS_PACKAGES)
        self.certs = tempfile.mkdtemp(prefix="egw-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.certs)
        self.ca = issue(self.certs, "ca", is_ca=True)
        server = issue(self.certs, "server", ca=self.ca)
        self.client = issue(self.certs, "client", ca=self.ca, client=True)
        tls = RedisTLS(self.ca.cert_path, server.cert_path, server.key_path, self.client.cert_path, self.client.key_path)
        self.files = f"ca={self.ca.cert_path}&cert={self.client.cert_path}&key={self.client.key_path}"
        self.redis = RedisServer(tempfile.mkdtemp(prefix="egw-", dir="/tmp"), tls=tls)
        self.redis.up()
        self.addCleanup(self.redis.down)

    async def test_store_over_tls_with_a_client_certificate(self) -> None:
        """
        A rediss:// store given the CA and a client certificate saves and
        reads kernel records on a server that requires client certificates.
        """
        store = await start_store(self, f"{self.redis.url}?{self.files}")
        await store.save_kernel(kernel_record("k-tls"))
        self.assertEqual([r.kernel_id for r in await store.load_kernels()], ["k-tls"])

    async def test_refused_without_a_client_certificate_or_with_another_ca(self) -> None:
        """
        Without a client certificate, or trusting another CA than the
        server's, the store does not start and says TLS failed.
        """
        other = issue(self.certs, "other-ca", is_ca=True)
        for url in (
            f"{self.redis.url}?ca={self.ca.cert_path}",
            f"{self.redis.url}?ca={other.cert_path}&cert={self.client.cert_path}&key={self.client.key_path}",
        ):
            store = RedisStore(url, BOX, reactor, connect_timeout=2.0, command_timeout=3.0)
            error = await self.assertFailure(store.start(), StoreUnavailable)
            await store.stop()
            self.assertIn("TLS", str(error), url)

    async def test_sentinels_and_primary_over_tls(self) -> None:
        """
        rediss+sentinel:// asks sentinels that speak only TLS and writes to
        the primary they name over TLS, with the client certificate.
        """
        group = RedisSentinelGroup(tempfile.mkdtemp(prefix="egw-", dir="/tmp"), tls=self.redis.tls)
        group.up()
        self.addCleanup(group.down)
        store = await start_store(self, f"{group.url}?{self.files}")
        await store.save_kernel(kernel_record("k-tls-ha"))
        self.assertEqual(group.primary().command("HKEYS", "egateway:kernels"), [b"k-tls-ha"])

    async def test_missing_ca_file(self) -> None:
        """
        A CA file that cannot be read is named in the error.
        """
        store = RedisStore(f"{self.redis.url}?ca={self.certs}/nope.pem", BOX, reactor)
        error = await self.assertFailure(store.start(), StoreUnavailable)
        await store.stop()
        self.assertIn("ca=", str(error))
        self.assertIn("nope.pem", str(error))


class ACLTests(TestCase):
    timeout = 90
    password = "s3cret-Hunter-22"

    def setUp(self) -> None:
        require_packages(*REDIS_PACKAGES)
        self.redis = RedisServer(
            tempfile.mkdtemp(prefix="egw-", dir="/tmp"),
            config=[f"user alice on >{self.password} ~* &* +@all"],
        )
        self.redis.up()
        self.addCleanup(self.redis.down)

    def url(self, password: str) -> str:
        return f"redis://alice:{password}@{self.redis.host}:{self.redis.port}/0"

    async def test_acl_user_and_password(self) -> None:
        """
        An ACL user with its password (AUTH user password) reads and writes.
        """
        store = await start_store(self, self.url(self.password))
        await store.save_kernel(kernel_record("k-acl"))
        self.assertEqual([r.kernel_id for r in await store.load_kernels()], ["k-acl"])

    async def test_wrong_password_stops_start_up_clearly_and_is_never_logged(self) -> None:
        """
        A gateway daemon given a wrong password (in EG_STORE_URL) exits at
        start-up saying authentication to the store failed; its log never
        contains the password.
        """
        wrong = "Wrong-Pass-Word-9"
        workdir = os.path.abspath(self.mktemp())
        data_dir = os.path.join(workdir, "runtime")
        os.makedirs(data_dir, mode=0o700)
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("EG_", "KG_"))}
        environ.update(PYTHONPATH=REPO_ROOT, EG_STORE_URL=self.url(wrong), EG_STORE_KEY=SecretBox.generate_key())
        argv = [
            sys.executable,
            os.path.join(os.path.dirname(sys.executable), "twistd"),
            "--nodaemon",
            "--pidfile=",
            "egateway",
            f"--listen=tcp:{free_port()}:interface=127.0.0.1",
            f"--data-dir={data_dir}",
            "--response-port=0",
            "--persistence=true",
        ]
        daemon = ChildProcess("egateway", os.path.join(workdir, "egateway.log"), reactor)
        daemon.start(argv, environ, workdir)
        self.addCleanup(daemon.stop, 10, workdir)
        await daemon.when_ended().addTimeout(60, reactor)
        with open(daemon.log_path) as f:
            log = f.read()
        self.assertIn("authentication failed", log)
        self.assertIn("cannot open the kernel store", log)
        self.assertNotIn(wrong, log)


class SentinelFailoverTests(TestCase):
    timeout = 240

    def setUp(self) -> None:
        require_packages(*REDIS_PACKAGES)
        self.group = RedisSentinelGroup(tempfile.mkdtemp(prefix="egw-", dir="/tmp"))
        self.group.up()
        self.addCleanup(self.group.down)

    async def test_primary_killed_while_streaming(self) -> None:
        """
        The primary is killed (SIGKILL) while a client streams 6,000 lines
        through the gateway, and the client drops: the gateway follows the
        sentinels to the new primary and starts kernels again, the kernels'
        records are on the new primary, and the client resuming its session
        after the failover gets every line exactly once, in order.
        """
        gateway = InProcessGateway(
            persistence="true",
            on_stop="shutdown",
            data_dir=os.path.abspath(self.mktemp()),
            store_url=self.group.url,
            store_key=SecretBox.generate_key(),
            list_kernels="true",
        )
        await gateway.start()
        self.addCleanup(remove_all, self, gateway)
        model = await gateway.start_kernel()
        warm = await ChannelsClient.connect(gateway.url, model["id"])
        await warm.execute("import time")
        await warm.close()
        client = await ChannelsClient.connect(gateway.url, model["id"], session_id="ha-session")
        code = "for i in range(6000):\n    print(f'line {i:05d}', flush=(i % 50 == 0))\n    if i % 100 == 0: time.sleep(0.1)\n"
        msg_id = client.request_execute(code)
        mine = lambda m: m.get("parent_header", {}).get("msg_id") == msg_id  # noqa: E731
        await client.wait_for(lambda m: mine(m) and m.get("msg_type") == "stream", timeout=30)
        old = self.group.primary()
        old.stop(kill=True)
        # The client goes away as the primary dies and comes back after the failover: what the kernel printed
        # meanwhile is replayed from the gateway's journal.
        client.drop()
        await client.closed
        for _ in range(200):
            status, body = await gateway.request("POST", "api/kernels", {})
            if status == 201:
                gateway.pids.add(body["placement"]["pid"])
                break
            self.assertEqual(status, 503, body)
            await sleep(0.1)
        self.assertEqual(status, 201, body)
        new = self.group.primary()
        self.assertNotEqual(new.port, old.port)
        resumed = await ChannelsClient.connect(
            gateway.url, model["id"], session_id="ha-session", resume_after=client.last_seq
        )
        await resumed.wait_for(
            lambda m: mine(m) and m.get("msg_type") == "status" and m["content"]["execution_state"] == "idle",
            timeout=60,
        )
        await resumed.close()
        text = "".join(
            m["content"]["text"] for m in client.messages + resumed.messages if mine(m) and m.get("msg_type") == "stream"
        )
        self.assertEqual(text.splitlines(), [f"line {i:05d}" for i in range(6000)])
        self.assertTrue([m for m in resumed.messages if mine(m) and m.get("msg_type") == "stream"], "nothing replayed")
        stored = sorted(k.decode() for k in new.command("HKEYS", "egateway:kernels"))
        self.assertEqual(stored, sorted([model["id"], body["id"]]))
        listed = sorted(k["id"] for k in (await gateway.request("GET", "api/kernels"))[1])
        self.assertEqual(listed, stored)


class _ScriptedSentinel(Protocol):
    """
    Answers every question for the primary with the next address of a
    script (the last one again once the script is used up), and takes
    subscriptions, as a sentinel would.
    """

    def __init__(self, sentinel: "ScriptedSentinel") -> None:
        self._parser = ReplyParser()
        self._sentinel = sentinel

    def dataReceived(self, data: bytes) -> None:
        for request in self._parser.feed(data):
            if request[0].upper() == b"SUBSCRIBE":
                self.transport.write(encode_command(["subscribe", request[1], 1]))
                self._sentinel.subscribed(self)
                continue
            answers = self._sentinel.answers
            host, port = answers.pop(0) if len(answers) > 1 else answers[0]
            self.transport.write(encode_command([host, str(port)]))


class ScriptedSentinel:
    """
    A stand-in sentinel on loopback: C{answers} is the script, L{announce}
    publishes a C{+switch-master} to the subscribers.
    """

    def __init__(self, case: TestCase, answers: list[tuple[str, int]]) -> None:
        self.answers = answers
        self.subscribers: list[_ScriptedSentinel] = []
        self.first_subscriber: Deferred[None] = Deferred()
        self.listening = reactor.listenTCP(0, Factory.forProtocol(lambda: _ScriptedSentinel(self)), interface="127.0.0.1")
        case.addCleanup(self.listening.stopListening)
        self.port = self.listening.getHost().port

    def subscribed(self, protocol: _ScriptedSentinel) -> None:
        self.subscribers.append(protocol)
        if not self.first_subscriber.called:
            self.first_subscriber.callback(None)

    def announce(self, name: str, old: tuple[str, int], new: tuple[str, int]) -> None:
        text = f"{name} {old[0]} {old[1]} {new[0]} {new[1]}"
        for protocol in self.subscribers:
            protocol.transport.write(encode_command(["message", "+switch-master", text]))


class PrimaryAndReplicaTests(TestCase):
    """
    The client's own checks, with a real primary and replica: the server a
    sentinel names must be a primary, a demoted server's READONLY drops the
    connection, and writes no replica confirmed are logged.
    """

    timeout = 60

    def setUp(self) -> None:
        require_packages(*REDIS_PACKAGES)
        self.primary = RedisServer(tempfile.mkdtemp(prefix="egw-", dir="/tmp"))
        self.primary.up()
        self.addCleanup(self.primary.down)
        self.replica = RedisServer(
            tempfile.mkdtemp(prefix="egw-", dir="/tmp"), config=[f"replicaof {self.primary.host} {self.primary.port}"]
        )
        self.replica.up()
        self.addCleanup(self.replica.down)
        self.replica.wait_in_sync()

    async def test_a_replica_named_as_primary_is_refused(self) -> None:
        """
        A sentinel that names a replica (as during a failover) is not
        believed: the store refuses to start on it, saying why, and connects
        to the primary once a sentinel names it; a sentinel that cannot be
        reached is skipped.
        """
        host = self.primary.host
        scripted = ScriptedSentinel(self, [(host, self.replica.port), (host, self.primary.port)])
        url = f"redis+sentinel://{host}:{free_port()},{host}:{scripted.port}/egwmaster/0"
        store = RedisStore(url, BOX, reactor, connect_timeout=2.0, command_timeout=3.0, min_backoff=0.05)
        self.addCleanup(store.stop)
        error = await self.assertFailure(store.start(), StoreUnavailable)
        self.assertIn(f"{host}:{self.replica.port} is a slave, not the primary yet", str(error))
        await store.start()
        await store.save_kernel(kernel_record("k-primary"))
        self.assertEqual(self.primary.command("HKEYS", "egateway:kernels"), [b"k-primary"])

    async def test_switch_master_announcement_is_followed_at_once(self) -> None:
        """
        When the sentinels announce +switch-master, the store leaves the old
        primary at once, though it still answers, and writes to the new one.
        """
        self.replica.command("REPLICAOF", "NO", "ONE")
        host = self.primary.host
        scripted = ScriptedSentinel(self, [(host, self.primary.port)])
        url = f"redis+sentinel://{host}:{scripted.port}/egwmaster/0?replicas=0"
        store = await start_store(self, url)
        await scripted.first_subscriber
        await store.save_kernel(kernel_record("k-before"))
        left: Deferred[None] = Deferred()
        store._client._protocol.lost.addCallback(lambda result: left.callback(result))
        scripted.answers[:] = [(host, self.replica.port)]
        scripted.announce("another-master", (host, self.primary.port), (host, 1))
        scripted.announce("egwmaster", (host, self.primary.port), (host, self.replica.port))
        await left.addTimeout(10, reactor)
        await store.start()
        await store.save_kernel(kernel_record("k-after"))
        self.assertEqual(self.primary.command("HKEYS", "egateway:kernels"), [b"k-before"])
        self.assertEqual(self.replica.command("HKEYS", "egateway:kernels"), [b"k-after"])

    async def test_readonly_drops_the_connection(self) -> None:
        """
        A write refused with READONLY (the server was demoted under us)
        fails as unavailable and drops the connection, so the next one asks
        the sentinels again.
        """
        store = await start_store(self, self.replica.url)
        error = await self.assertFailure(store.save_kernel(kernel_record("k-ro")), StoreUnavailable)
        self.assertIn("READONLY", str(error))
        self.assertFalse(store.connected)

    async def test_writes_no_replica_confirmed_are_logged(self) -> None:
        """
        With replicas=1 writes wait for the replica; once it is gone they
        still succeed, and the log says they are at risk.
        """
        lines = capture_log(self)
        store = await start_store(self, self.primary.url + "?replicas=1")
        await store.save_kernel(kernel_record("k-1"))
        self.assertEqual([line for line in lines if "not confirmed" in line], [])
        self.replica.stop()
        await store.save_kernel(kernel_record("k-2"))
        self.assertEqual(len([line for line in lines if "not confirmed by 1 replica" in line]), 1)
        self.assertEqual(sorted(self.primary.command("HKEYS", "egateway:kernels")), [b"k-1", b"k-2"])
