"""
The kernel session store: one contract, run against the SQLite store (a file
in a temporary directory) and the Redis store (a real redis-server per
test); then what is particular to each (file permissions and locking;
outages, a frozen server and several gateways sharing one Redis), the
secret box, the RESP parser and the store's settings.
"""

from __future__ import annotations

import os
import signal
import stat
import tempfile
import threading
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from egateway.config import ConfigError
from egateway.store import open_store, parse_store_url
from egateway.store.codec import decode_kernel, encode_kernel
from egateway.store.crypto import SecretBox, SecretBoxError, load_or_create_key_file_blocking
from egateway.store.interface import IKernelStore, KernelRecord, RecordUnreadable, SessionRecord, StoreUnavailable
from egateway.store.redis import RedisStore
from egateway.store.resp import RedisAddress, RedisClient, RedisError, ReplyParser, encode_command
from egateway.store.sqlite import SQLiteStore
from egateway.validation import load_config
from tests.fixtures.redis import RedisServer

KERNEL_KEY = "0b6c1f4e-kernel-hmac-key-d41d8cd98f00"
COMM_TOKEN = "comm-token-9e107d9d372bb6826bd81d3542a419d6"
ENV_SECRET = "env-password-e4d909c290d0fb1ca068ffaddf22cbd0"


def kernel_record(kernel_id: str = "9b1e2f4c-0000-4000-8000-000000000001", **changes: Any) -> KernelRecord:
    values: dict[str, Any] = dict(
        kernel_id=kernel_id,
        spec_name="python3",
        username="alice",
        launcher="ssh",
        snapshot={
            "connection_info": {"ip": "10.0.0.5", "shell_port": 50001, "key": KERNEL_KEY},
            "comm_token": COMM_TOKEN,
            "host": "node1",
            "pid": 4242,
        },
        env={"KERNEL_USERNAME": "alice", "DB_PASSWORD": ENV_SECRET},
        state="running",
        execution_state="idle",
        created=1700000000.25,
        updated=1700000100.5,
        restarts=1,
        reason="",
        gateway_id="gw-a",
    )
    values.update(changes)
    return KernelRecord(**values)


def session_record(session_id: str = "s-1", kernel_id: str = "9b1e2f4c-0000-4000-8000-000000000001") -> SessionRecord:
    return SessionRecord(id=session_id, path="work/a.ipynb", name="a.ipynb", type="notebook", kernel_id=kernel_id)


async def poll(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """
    Call the async C{predicate} until it returns something true, at most
    C{timeout} seconds, without blocking the reactor.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, interval, lambda: None)


class StoreContract:
    """
    What every L{IKernelStore} does.  Subclasses provide the backend.
    """

    timeout = 30
    box = SecretBox.from_key(SecretBox.generate_key())

    async def open(self, box: SecretBox | None = None) -> Any:
        """
        A started store on this test's backend, stopped at cleanup; for a
        single-gateway store the previous one is stopped first.
        """
        raise NotImplementedError

    def raw_contents(self) -> bytes:
        """
        Everything the backend holds at rest, as bytes (files or keys).
        """
        raise NotImplementedError

    async def pass_time(self, seconds: float) -> None:
        raise NotImplementedError

    async def test_provides_interface(self) -> None:
        """
        The store declares the interface the kernel manager programs against.
        """
        store = await self.open()
        self.assertTrue(IKernelStore.providedBy(store))
        self.assertIsInstance(store.shared, bool)

    async def test_kernel_round_trip(self) -> None:
        """
        A saved kernel loads back equal, a second save replaces it, and a
        deleted one is gone (deleting an unknown id is fine).
        """
        store = await self.open()
        first = kernel_record()
        other = kernel_record("9b1e2f4c-0000-4000-8000-000000000002", launcher="local", snapshot={}, env={})
        await store.save_kernel(first)
        await store.save_kernel(other)
        self.assertEqual(await store.load_kernel(first.kernel_id), first)
        self.assertEqual(await store.load_kernels(), [first, other])

        changed = kernel_record(state="restarting", restarts=2, updated=1700000200.0)
        await store.save_kernel(changed)
        self.assertEqual(await store.load_kernel(first.kernel_id), changed)
        self.assertEqual(len(await store.load_kernels()), 2)

        await store.delete_kernel(first.kernel_id)
        await store.delete_kernel("never-saved")
        self.assertIsNone(await store.load_kernel(first.kernel_id))
        self.assertEqual(await store.load_kernels(), [other])

    async def test_load_kernels_skipping(self) -> None:
        """
        Records named in C{skip} are neither returned nor decoded (their
        sealed secrets not opened); the others load as usual.
        """
        import importlib

        store = await self.open()
        first = kernel_record()
        other = kernel_record("9b1e2f4c-0000-4000-8000-000000000002", launcher="local", snapshot={}, env={})
        await store.save_kernel(first)
        await store.save_kernel(other)
        module = importlib.import_module(type(getattr(store, "_store", store)).__module__)  # (or its TimedStore's)
        decoded: list[str] = []
        decode = module.decode_kernel

        def counted(kernel_id: str, raw: Any, box: Any) -> Any:
            decoded.append(kernel_id)
            return decode(kernel_id, raw, box)

        self.patch(module, "decode_kernel", counted)
        self.assertEqual(await store.load_kernels(skip={first.kernel_id}), [other])
        self.assertEqual(decoded, [other.kernel_id])
        self.assertEqual(await store.load_kernels(skip={first.kernel_id, other.kernel_id}), [])
        self.assertEqual(await store.load_kernels(skip=()), [first, other])

    async def test_records_outlive_the_store_object(self) -> None:
        """
        A new store object on the same backend (a restarted gateway) finds
        the kernels and sessions saved before.
        """
        store = await self.open()
        await store.save_kernel(kernel_record())
        await store.save_session(session_record())
        again = await self.open()
        self.assertEqual(await again.load_kernels(), [kernel_record()])
        self.assertEqual(await again.load_sessions(), [session_record()])

    async def test_session_round_trip(self) -> None:
        """
        Sessions save, replace, list and delete.
        """
        store = await self.open()
        await store.save_session(session_record("s-1"))
        await store.save_session(session_record("s-2", kernel_id="k-2"))
        renamed = SessionRecord(id="s-1", path="b.ipynb", name="b.ipynb", type="notebook", kernel_id="k-1")
        await store.save_session(renamed)
        self.assertEqual(await store.load_sessions(), [renamed, session_record("s-2", kernel_id="k-2")])
        await store.delete_session("s-2")
        await store.delete_session("unknown")
        self.assertEqual(await store.load_sessions(), [renamed])

    async def test_secrets_encrypted_at_rest(self) -> None:
        """
        The kernel key, comm token and environment secrets are nowhere in
        the stored bytes, while the fields operators need stay readable.
        """
        store = await self.open()
        await store.save_kernel(kernel_record())
        raw = self.raw_contents()
        for secret in (KERNEL_KEY, COMM_TOKEN, ENV_SECRET):
            self.assertNotIn(secret.encode(), raw)
        for visible in (b"9b1e2f4c-0000-4000-8000-000000000001", b"alice", b"python3", b"gw-a"):
            self.assertIn(visible, raw)

    async def test_wrong_key(self) -> None:
        """
        A record written with another key fails to load with an error naming
        its kernel, and the records readable with this key still load.
        """
        old = await self.open(SecretBox.from_key(SecretBox.generate_key()))
        await old.save_kernel(kernel_record("k-old"))
        new_box = SecretBox.from_key(SecretBox.generate_key())
        new = await self.open(new_box)
        await new.save_kernel(kernel_record("k-new"))
        self.assertEqual([r.kernel_id for r in await new.load_kernels()], ["k-new"])
        with self.assertRaises(RecordUnreadable) as caught:
            await new.load_kernel("k-old")
        self.assertIn("k-old", str(caught.exception))
        self.assertIn("different store key", str(caught.exception))
        self.assertEqual(caught.exception.record_id, "k-old")

    async def test_leases(self) -> None:
        """
        A lease goes to one holder, who can renew it; others are refused
        until the holder releases it, and only the holder can release it.
        """
        store = await self.open()
        kernel = "k-lease"
        self.assertIsNone(await store.lease_holder(kernel))
        self.assertTrue(await store.acquire_lease(kernel, "gw-a", 30))
        self.assertTrue(await store.acquire_lease(kernel, "gw-a", 30))
        self.assertFalse(await store.acquire_lease(kernel, "gw-b", 30))
        self.assertEqual(await store.lease_holder(kernel), "gw-a")
        await store.release_lease(kernel, "gw-b")
        self.assertEqual(await store.lease_holder(kernel), "gw-a")
        await store.release_lease(kernel, "gw-a")
        self.assertIsNone(await store.lease_holder(kernel))
        self.assertTrue(await store.acquire_lease(kernel, "gw-b", 30))
        self.assertEqual(await store.lease_holder(kernel), "gw-b")
        self.assertTrue(await store.acquire_lease("k-other", "gw-a", 30))

    async def test_lease_expires(self) -> None:
        """
        A lease its holder stops renewing (a dead gateway) expires after its
        ttl, and renewing pushes the expiry back.
        """
        store = await self.open()
        self.assertTrue(await store.acquire_lease("k", "gw-a", 1.0))
        await self.pass_time(0.6)
        self.assertTrue(await store.acquire_lease("k", "gw-a", 1.0))
        await self.pass_time(0.6)
        self.assertFalse(await store.acquire_lease("k", "gw-b", 1.0))
        self.assertEqual(await store.lease_holder("k"), "gw-a")
        await self.pass_time(0.6)
        self.assertIsNone(await store.lease_holder("k"))
        self.assertTrue(await store.acquire_lease("k", "gw-b", 5))
        self.assertEqual(await store.lease_holder("k"), "gw-b")

    async def test_journal(self) -> None:
        """
        Frames come back after a sequence number, in order, each once (also
        when appended out of order or twice), binary-safe, per session.
        """
        store = await self.open()
        frames = [(1, b"one"), (2, b"\x00two\r\n"), (3, b"")]
        await store.journal_append("k", "s", frames, 100)
        self.assertEqual(await store.journal_read("k", "s", 0), frames)
        self.assertEqual(await store.journal_read("k", "s", 2), [(3, b"")])
        self.assertEqual(await store.journal_read("k", "s", 3), [])
        await store.journal_append("k", "s", [(5, b"five"), (4, b"four"), (3, b"again")], 100)
        self.assertEqual(
            await store.journal_read("k", "s", 2), [(3, b""), (4, b"four"), (5, b"five")]
        )
        self.assertEqual(await store.journal_read("k", "other-session", 0), [])
        self.assertEqual(await store.journal_read("other-kernel", "s", 0), [])

    async def test_journal_trimmed(self) -> None:
        """
        A journal keeps only the newest max_entries frames.
        """
        store = await self.open()
        await store.journal_append("k", "s", [(n, b"x%d" % n) for n in range(1, 8)], 5)
        self.assertEqual([seq for seq, _ in await store.journal_read("k", "s", 0)], [3, 4, 5, 6, 7])
        await store.journal_append("k", "s", [(8, b"x8"), (9, b"x9")], 5)
        self.assertEqual(await store.journal_read("k", "s", 0), [(n, b"x%d" % n) for n in range(5, 10)])
        self.assertEqual(await store.journal_read("k", "s", 7), [(8, b"x8"), (9, b"x9")])

    async def test_journal_delete(self) -> None:
        """
        Deleting a kernel's journal drops every session of it, and only it.
        """
        store = await self.open()
        await store.journal_append("k1", "s1", [(1, b"a")], 10)
        await store.journal_append("k1", "s2", [(1, b"b")], 10)
        await store.journal_append("k2", "s1", [(1, b"c")], 10)
        await store.journal_delete("k1")
        self.assertEqual(await store.journal_read("k1", "s1", 0), [])
        self.assertEqual(await store.journal_read("k1", "s2", 0), [])
        self.assertEqual(await store.journal_read("k2", "s1", 0), [(1, b"c")])
        await store.journal_delete("never-journalled")

    async def test_session_holder(self) -> None:
        """
        Claiming a session returns its previous holder; from then on only
        the new holder's appends (or unconditional ones) are taken, until
        the kernel's journals are deleted.
        """
        store = await self.open()
        self.assertIsNone(await store.claim_session("k", "s", "gw-a"))
        self.assertTrue(await store.journal_append("k", "s", [(1, b"a")], 10, "gw-a"))
        self.assertEqual(await store.claim_session("k", "s", "gw-b"), "gw-a")
        self.assertFalse(await store.journal_append("k", "s", [(2, b"stale")], 10, "gw-a"))
        self.assertTrue(await store.journal_append("k", "s", [(2, b"b")], 10, "gw-b"))
        self.assertTrue(await store.journal_append("k", "s", [(3, b"c")], 10))
        self.assertEqual(await store.journal_read("k", "s", 0), [(1, b"a"), (2, b"b"), (3, b"c")])
        self.assertIsNone(await store.claim_session("k", "other", "gw-a"))
        await store.journal_delete("k")
        self.assertIsNone(await store.claim_session("k", "s", "gw-a"))

    async def test_journal_append_many(self) -> None:
        """
        One request appends to several sessions of several kernels, each as
        its own append would (trimmed, each number once); a session another
        holder claimed is refused on its own, the rest taken.
        """
        store = await self.open()
        await store.claim_session("k1", "claimed", "gw-b")
        await store.journal_append("k2", "s", [(1, b"old"), (2, b"older")], 3)
        answers = await store.journal_append_many(
            [
                ("k1", "s", [(1, b"a"), (2, b"\x00b\r\n")]),
                ("k1", "claimed", [(1, b"stale")]),
                ("k2", "s", [(2, b"again"), (3, b"c"), (4, b"d")]),
                ("k2", "empty", []),
            ],
            3,
            "gw-a",
        )
        self.assertEqual(answers, [True, False, True, True])
        self.assertEqual(await store.journal_read("k1", "s", 0), [(1, b"a"), (2, b"\x00b\r\n")])
        self.assertEqual(await store.journal_read("k1", "claimed", 0), [])
        self.assertEqual(await store.journal_read("k2", "s", 0), [(2, b"older"), (3, b"c"), (4, b"d")])
        self.assertEqual(await store.journal_append_many([], 3, "gw-a"), [])
        await store.journal_delete("k1")
        self.assertEqual(await store.journal_read("k1", "s", 0), [])
        self.assertEqual(await store.journal_read("k2", "s", 0), [(2, b"older"), (3, b"c"), (4, b"d")])

    async def test_large_journal_read(self) -> None:
        """
        A full journal of thousands of frames reads back whole and in order.
        """
        store = await self.open()
        count = 5000
        entries = [(n, b"line %06d " % n + b"." * 200) for n in range(1, count + 1)]
        for start in range(0, count, 1000):
            await store.journal_append("k", "s", entries[start : start + 1000], count)
        self.assertEqual(await store.journal_read("k", "s", 0), entries)

    async def test_not_started(self) -> None:
        """
        A store that was never started, or was stopped, fails operations
        with StoreUnavailable instead of hanging.
        """
        store = await self.open()
        await store.stop()
        with self.assertRaises(StoreUnavailable):
            await store.save_kernel(kernel_record())
        with self.assertRaises(StoreUnavailable):
            await store.load_kernels()
        with self.assertRaises(StoreUnavailable):
            await store.acquire_lease("k", "gw", 1)
        await store.stop()


class _ClockedReactor:
    """
    The real reactor (threads, I/O) with time taken from a L{Clock}, so the
    in-process leases of the SQLite store can expire without waiting.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def seconds(self) -> float:
        return self._clock.seconds()

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


def store_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "egateway-store-sqlite" in t.name]


class SQLiteStoreTests(StoreContract, TestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        self.path = os.path.join(self.directory, "state", "store.sqlite3")
        self.clock = Clock()
        self.current: SQLiteStore | None = None
        self.addCleanup(lambda: self.assertEqual(store_threads(), []))

    async def open(self, box: SecretBox | None = None) -> SQLiteStore:
        if self.current is not None:
            await self.current.stop()
        store = SQLiteStore(self.path, box or self.box, _ClockedReactor(self.clock))
        self.addCleanup(store.stop)
        await store.start()
        self.current = store
        return store

    def raw_contents(self) -> bytes:
        data = b""
        for name in os.listdir(os.path.dirname(self.path)):
            with open(os.path.join(os.path.dirname(self.path), name), "rb") as f:
                data += f.read()
        return data

    async def pass_time(self, seconds: float) -> None:
        self.clock.advance(seconds)

    async def test_private_files(self) -> None:
        """
        The directory the store creates is 0700 and the database and its WAL
        files 0600, whatever the umask; the database is in WAL mode.
        """
        old = os.umask(0o022)
        try:
            store = await self.open()
            await store.save_kernel(kernel_record())
        finally:
            os.umask(old)
        directory = os.path.dirname(self.path)
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
        names = sorted(os.listdir(directory))
        self.assertIn("store.sqlite3-wal", names)
        for name in names:
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode), 0o600, name)

    async def test_one_gateway_per_file(self) -> None:
        """
        A second gateway process opening the same file is refused with a
        message that says why; once the first stops, it can open it.
        """
        first = await self.open()
        second = SQLiteStore(self.path, self.box, reactor)
        self.addCleanup(second.stop)
        with self.assertRaises(StoreUnavailable) as caught:
            await second.start()
        self.assertIn("in use by another gateway", str(caught.exception))
        self.assertIn(self.path, str(caught.exception))
        await first.stop()
        await second.start()
        await second.save_kernel(kernel_record())

    async def test_start_is_idempotent_and_stop_ends_the_thread(self) -> None:
        """
        Concurrent and repeated starts open the store once; stop ends its
        thread (and the store can start again).
        """
        store = SQLiteStore(self.path, self.box, reactor)
        self.addCleanup(store.stop)
        await gatherResults([store.start(), store.start()])
        await store.start()
        self.assertEqual(len(store_threads()), 1)
        await store.stop()
        self.assertEqual(store_threads(), [])
        await store.start()
        await store.save_kernel(kernel_record())
        await store.stop()

    async def test_unopenable_file(self) -> None:
        """
        A path that cannot be a database fails start with StoreUnavailable
        naming the path.
        """
        os.makedirs(self.path)  # a directory where the file should be
        store = SQLiteStore(self.path, self.box, reactor)
        self.addCleanup(store.stop)
        with self.assertRaises(StoreUnavailable) as caught:
            await store.start()
        self.assertIn(self.path, str(caught.exception))

    async def test_reactor_free_while_writing(self) -> None:
        """
        Writes run off the reactor thread: the store's thread is not the
        reactor's.
        """
        store = await self.open()
        seen = []
        original = store._save_kernel_blocking

        def spy(*args: Any) -> None:
            seen.append(threading.current_thread())
            original(*args)

        store._save_kernel_blocking = spy  # type: ignore[method-assign]
        await store.save_kernel(kernel_record())
        self.assertEqual(len(seen), 1)
        self.assertIsNot(seen[0], threading.main_thread())


class RedisStoreTests(StoreContract, TestCase):
    def setUp(self) -> None:
        self.redis = RedisServer(tempfile.mkdtemp(prefix="egw-", dir="/tmp"))
        self.addCleanup(lambda: self.assertEqual(self.redis.leftovers(), []))
        self.addCleanup(self.redis.down)
        self.redis.up()

    def make(self, box: SecretBox | None = None, **options: Any) -> RedisStore:
        store = RedisStore(self.redis.url, box or self.box, reactor, **options)
        self.addCleanup(store.stop)
        return store

    async def open(self, box: SecretBox | None = None) -> RedisStore:
        store = self.make(box)
        await store.start()
        return store

    async def raw_client(self) -> RedisClient:
        client = RedisClient(reactor, RedisAddress.from_url(self.redis.url))
        self.addCleanup(client.stop)
        await client.start()
        return client

    def raw_contents(self) -> bytes:
        raise NotImplementedError("async for Redis; see test_secrets_encrypted_at_rest")

    async def raw_dump(self) -> bytes:
        client = await self.raw_client()
        data = b""
        for key in await client.execute("KEYS", "*"):
            data += key + b"\n"
            kind = await client.execute("TYPE", key)
            if kind == b"hash":
                data += b"\n".join(await client.execute("HGETALL", key))
            elif kind == b"string":
                data += await client.execute("GET", key)
        return data

    async def test_secrets_encrypted_at_rest(self) -> None:
        """
        The kernel key, comm token and environment secrets are nowhere in
        Redis, while the fields operators need stay readable.
        """
        store = await self.open()
        await store.save_kernel(kernel_record())
        raw = await self.raw_dump()
        self.assertIn(b"egateway:kernels", raw)
        for secret in (KERNEL_KEY, COMM_TOKEN, ENV_SECRET):
            self.assertNotIn(secret.encode(), raw)
        for visible in (b"9b1e2f4c-0000-4000-8000-000000000001", b"alice", b"python3", b"gw-a"):
            self.assertIn(visible, raw)

    async def pass_time(self, seconds: float) -> None:
        await deferLater(reactor, seconds, lambda: None)

    async def test_outage_and_recovery(self) -> None:
        """
        With Redis stopped, operations fail promptly with StoreUnavailable
        naming the server; when it is back the same store works again.
        """
        store = await self.open()
        await store.save_kernel(kernel_record("k-before"))
        await deferToThread(self.redis.stop)
        for operation in (
            lambda: store.save_kernel(kernel_record("k-during")),
            store.load_kernels,
            lambda: store.acquire_lease("k", "gw-a", 10),
            lambda: store.journal_append("k", "s", [(1, b"x")], 10),
            lambda: store.journal_read("k", "s", 0),
        ):
            started = time.monotonic()
            with self.assertRaises(StoreUnavailable) as caught:
                await operation()
            self.assertLess(time.monotonic() - started, 1.0)
            self.assertIn(f"127.0.0.1:{self.redis.port}", str(caught.exception))
        self.assertFalse(store.connected)

        await deferToThread(self.redis.start)

        async def saved() -> bool:
            try:
                await store.save_kernel(kernel_record("k-after"))
            except StoreUnavailable:
                return False
            return True

        await poll(saved, 10, "the store to reconnect to redis")
        # The server has no persistence: only what was written after it came back.
        self.assertEqual([r.kernel_id for r in await store.load_kernels()], ["k-after"])
        self.assertTrue(await store.acquire_lease("k", "gw-a", 10))

    async def test_start_while_down(self) -> None:
        """
        Starting while Redis is down fails clearly but keeps trying: once
        Redis is up the store works without being recreated.
        """
        await deferToThread(self.redis.stop)
        store = self.make()
        with self.assertRaises(StoreUnavailable) as caught:
            await store.start()
        self.assertIn("unreachable", str(caught.exception))
        await deferToThread(self.redis.start)

        async def connected() -> bool:
            return store.connected

        await poll(connected, 10, "the store to connect to redis")
        await store.save_kernel(kernel_record())
        self.assertEqual(await store.load_kernels(), [kernel_record()])

    async def test_frozen_server(self) -> None:
        """
        A Redis that accepts but does not answer (stopped with SIGSTOP) fails
        commands within the command timeout instead of hanging them.
        """
        store = self.make(command_timeout=0.5)
        await store.start()
        pid = self.redis.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with self.assertRaises(StoreUnavailable) as caught:
                await store.load_kernels()
            self.assertLess(time.monotonic() - started, 2.0)
            self.assertIn("no reply within 0.5s", str(caught.exception))
        finally:
            os.kill(pid, signal.SIGCONT)

        async def loaded() -> bool:
            try:
                return await store.load_kernels() == []
            except StoreUnavailable:
                return False

        await poll(loaded, 10, "the store to recover from a frozen redis")

    async def test_gateways_share_records_and_leases(self) -> None:
        """
        Two stores on one Redis (two gateways) saving at the same time see
        each other's records, and of two concurrent lease requests exactly
        one wins.
        """
        a, b = await self.open(), await self.open()
        saves = [a.save_kernel(kernel_record(f"a-{n:02d}", gateway_id="gw-a")) for n in range(40)]
        saves += [b.save_kernel(kernel_record(f"b-{n:02d}", gateway_id="gw-b")) for n in range(40)]
        await gatherResults(saves)
        for store in (a, b):
            records = await store.load_kernels()
            self.assertEqual(len(records), 80)
            self.assertEqual({r.gateway_id for r in records if r.kernel_id.startswith("b-")}, {"gw-b"})
        results = await gatherResults(
            [a.acquire_lease(f"k{n}", "gw-a", 10) for n in range(20)]
            + [b.acquire_lease(f"k{n}", "gw-b", 10) for n in range(20)]
        )
        for n in range(20):
            self.assertNotEqual(results[n], results[20 + n], f"k{n}: both or neither got the lease")
            holder = await b.lease_holder(f"k{n}")
            self.assertEqual(holder, "gw-a" if results[n] else "gw-b")
        await b.journal_append("k0", "s", [(1, b"from b")], 10)
        self.assertEqual(await a.journal_read("k0", "s", 0), [(1, b"from b")])

    async def test_scripts_reloaded_after_restart(self) -> None:
        """
        Lease scripts still run after Redis restarted with an empty script
        cache.
        """
        store = await self.open()
        self.assertTrue(await store.acquire_lease("k", "gw-a", 10))
        client = await self.raw_client()
        await client.execute("SCRIPT", "FLUSH")
        self.assertTrue(await store.acquire_lease("k", "gw-a", 10))
        self.assertFalse(await store.acquire_lease("k", "gw-b", 10))

    async def test_prefix_separates_stores(self) -> None:
        """
        Stores with different prefixes on one Redis do not see each other.
        """
        a = self.make()
        b = RedisStore(self.redis.url, self.box, reactor, prefix="other:")
        self.addCleanup(b.stop)
        await a.start()
        await b.start()
        await a.save_kernel(kernel_record())
        self.assertEqual(await b.load_kernels(), [])

    async def test_password(self) -> None:
        """
        A password in the URL logs in; a wrong one fails with a message that
        says authentication failed and does not show the password.
        """
        client = await self.raw_client()
        await client.execute("CONFIG", "SET", "requirepass", "s3cret-pw")
        url = self.redis.url.replace("redis://", "redis://:s3cret-pw@")
        good = RedisStore(url, self.box, reactor)
        self.addCleanup(good.stop)
        await good.start()
        await good.save_kernel(kernel_record())
        bad = RedisStore(url.replace("s3cret-pw", "wrong-pw"), self.box, reactor)
        self.addCleanup(bad.stop)
        with self.assertRaises(StoreUnavailable) as caught:
            await bad.start()
        self.assertIn("authentication failed", str(caught.exception))
        self.assertNotIn("wrong-pw", str(caught.exception))


class SecretBoxTests(SynchronousTestCase):
    def test_round_trip_and_binding(self) -> None:
        """
        A sealed value opens for its record and is refused for another.
        """
        box = SecretBox.from_key(SecretBox.generate_key())
        token = box.seal("k1", {"key": KERNEL_KEY})
        self.assertNotIn(KERNEL_KEY, token)
        self.assertEqual(box.open("k1", token), {"key": KERNEL_KEY})
        with self.assertRaises(SecretBoxError) as caught:
            box.open("k2", token)
        self.assertIn("belong to record 'k1'", str(caught.exception))

    def test_wrong_key(self) -> None:
        """
        Another key cannot open a value and says so.
        """
        token = SecretBox.from_key(SecretBox.generate_key()).seal("k", 1)
        with self.assertRaises(SecretBoxError) as caught:
            SecretBox.from_key(SecretBox.generate_key()).open("k", token)
        self.assertIn("different store key", str(caught.exception))

    def test_rotation(self) -> None:
        """
        With "new,old" keys, values sealed with the old key open and new ones
        are sealed with the new key.
        """
        old, new = SecretBox.generate_key(), SecretBox.generate_key()
        token = SecretBox.from_key(old).seal("k", "v")
        rotated = SecretBox.from_key(f"{new}, {old}")
        self.assertEqual(rotated.open("k", token), "v")
        self.assertEqual(SecretBox.from_key(new).open("k", rotated.seal("k", "w")), "w")

    def test_malformed_keys(self) -> None:
        """
        Keys that are not Fernet keys are refused with how to make one.
        """
        for key in ("", "short", "x" * 44, ","):
            with self.assertRaises(SecretBoxError) as caught:
                SecretBox.from_key(key)
            self.assertIn("python -m egateway.store.crypto", str(caught.exception))

    def test_key_file_created_private_and_reused(self) -> None:
        """
        A missing key file is created with mode 0600 in a new 0700 directory,
        and the next load reads the same key.
        """
        path = os.path.join(os.path.abspath(self.mktemp()), "keys", "store.key")
        first = load_or_create_key_file_blocking(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)
        self.assertEqual(os.listdir(os.path.dirname(path)), ["store.key"])
        second = load_or_create_key_file_blocking(path)
        self.assertEqual(second.open("k", first.seal("k", "v")), "v")

    def test_key_file_required(self) -> None:
        """
        With create=False (gateways sharing a store) a missing file is an
        error, and a malformed one names the file.
        """
        path = os.path.join(os.path.abspath(self.mktemp()), "store.key")
        with self.assertRaises(SecretBoxError) as caught:
            load_or_create_key_file_blocking(path, create=False)
        self.assertIn("does not exist", str(caught.exception))
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            f.write("not a key\n")
        with self.assertRaises(SecretBoxError) as caught:
            load_or_create_key_file_blocking(path)
        self.assertIn(path, str(caught.exception))


class CodecTests(SynchronousTestCase):
    box = SecretBox.from_key(SecretBox.generate_key())

    def test_unreadable_records(self) -> None:
        """
        Corrupt JSON, a record of a future format and a record stored under
        another id are reported as unreadable, naming the kernel.
        """
        good = encode_kernel(kernel_record("k"), self.box)
        self.assertEqual(decode_kernel("k", good, self.box), kernel_record("k"))
        for raw, why in (
            (b"{not json", "not JSON"),
            (good.replace(b'"format":1', b'"format":99'), "format 99"),
            (good, "names 'k'"),
        ):
            kernel_id = "other" if why.startswith("names") else "k"
            with self.assertRaises(RecordUnreadable) as caught:
                decode_kernel(kernel_id, raw, self.box)
            self.assertIn(why, str(caught.exception))
            self.assertIn(f"kernel {kernel_id}", str(caught.exception))

    def test_unknown_fields_ignored(self) -> None:
        """
        Fields a newer gateway added do not stop an older one from loading.
        """
        data = kernel_record().to_json()
        data["future_field"] = 1
        self.assertEqual(KernelRecord.from_json(data), kernel_record())


class RespTests(SynchronousTestCase):
    def test_parser_byte_by_byte(self) -> None:
        """
        Replies split anywhere, nested arrays, nulls and errors parse the
        same as when they arrive whole.
        """
        stream = (
            b"+OK\r\n:42\r\n$5\r\nhe\r\nl\r\n$-1\r\n*-1\r\n*0\r\n"
            b"*3\r\n$1\r\na\r\n*2\r\n:1\r\n-ERR inner\r\n$0\r\n\r\n-NOSCRIPT No matching script\r\n"
        )
        expected_repr = repr(
            [b"OK", 42, b"he\r\nl", None, None, [], [b"a", [1, RedisError("ERR inner")], b""],
             RedisError("NOSCRIPT No matching script")]
        )
        whole = ReplyParser().feed(stream)
        parser = ReplyParser()
        pieces: list[Any] = []
        for i in range(len(stream)):
            pieces += parser.feed(stream[i : i + 1])
        self.assertEqual(repr(whole), expected_repr)
        self.assertEqual(repr(pieces), expected_repr)
        self.assertEqual(whole[-1].code, "NOSCRIPT")

    def test_garbage(self) -> None:
        """
        A peer that does not speak RESP is detected.
        """
        with self.assertRaises(ValueError):
            ReplyParser().feed(b"HTTP/1.1 400 Bad Request\r\n")

    def test_encode(self) -> None:
        """
        Commands are arrays of binary-safe bulk strings.
        """
        self.assertEqual(
            encode_command(["SET", b"k\r\n", 5]), b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$1\r\n5\r\n"
        )
        # An argument in pieces is one bulk string.
        self.assertEqual(encode_command(["SET", [b"k", b"", b"ey"], 5]), encode_command(["SET", b"key", 5]))

    def test_urls(self) -> None:
        """
        redis:// URLs give host, port, database and credentials; the text
        form never shows the password; malformed ones are refused.
        """
        address = RedisAddress.from_url("redis://user:p%40ss@10.1.2.3:6390/4")
        self.assertEqual(
            (address.host, address.port, address.db, address.username, address.password),
            ("10.1.2.3", 6390, 4, "user", "p@ss"),
        )
        self.assertEqual(str(address), "redis://10.1.2.3:6390/4")
        self.assertNotIn("p@ss", repr(address))
        self.assertEqual(RedisAddress.from_url("redis://h").port, 6379)
        for bad in ("redis://", "redis://h/x", "redis://h:99999", "redis://h?x=1", "http://h"):
            with self.assertRaises(ValueError):
                RedisAddress.from_url(bad)


class OpenStoreTests(SynchronousTestCase):
    box = SecretBox.from_key(SecretBox.generate_key())

    def test_choice_by_scheme(self) -> None:
        """
        redis:// gives the shared Redis store; sqlite:/// and plain paths
        give the SQLite store; other schemes are refused.
        """
        self.assertIsInstance(open_store("redis://127.0.0.1:6390/0", self.box, reactor), RedisStore)
        store = open_store("sqlite:///var/lib/egateway/kernels.sqlite3", self.box, reactor)
        self.assertIsInstance(store, SQLiteStore)
        self.assertEqual(store.path, "/var/lib/egateway/kernels.sqlite3")
        self.assertEqual(parse_store_url("/srv/eg/k.db"), ("sqlite", "/srv/eg/k.db"))
        self.assertTrue(open_store("rel/k.db", self.box, reactor).path.endswith("/rel/k.db"))
        for bad in ("postgres://h/db", "sqlite://host/x", "redis://h:0x/1", ""):
            with self.assertRaises(ValueError):
                parse_store_url(bad)
        self.assertTrue(RedisStore.shared)
        self.assertFalse(SQLiteStore.shared)


class StoreConfigTests(SynchronousTestCase):
    def test_defaults_and_environment(self) -> None:
        """
        Persistence is on by default and keeps kernels on stop; Enterprise
        Gateway's and our environment variables set the store.
        """
        default = load_config({}, {}, {}).store
        self.assertEqual((default.store_url, default.persistence, default.on_stop), ("", True, "keep"))
        config = load_config(
            {},
            {
                "EG_STORE_URL": "redis://127.0.0.1:6390/0",
                "EG_KERNEL_SESSION_PERSISTENCE": "false",
                "EG_ON_STOP": "shutdown",
                "EG_JOURNAL_ENTRIES": "500",
            },
            {},
        ).store
        self.assertEqual(config.store_url, "redis://127.0.0.1:6390/0")
        self.assertFalse(config.persistence)
        self.assertEqual(config.on_stop, "shutdown")
        self.assertEqual(config.journal_entries, 500)

    def test_bad_values(self) -> None:
        """
        An unknown store scheme and an unknown on_stop value stop start-up
        with a message naming the key.
        """
        with self.assertRaises(ConfigError) as caught:
            load_config({}, {"EG_STORE_URL": "mongodb://h/x"}, {})
        self.assertIn("store.store_url", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            load_config({}, {"EG_ON_STOP": "explode"}, {})
        self.assertIn("store.on_stop", str(caught.exception))


class ReconnectTests(SynchronousTestCase):
    """
    The client's connection is kept by a ClientService that backs off
    between failed attempts and starts over after a connection it had.
    """

    def setUp(self) -> None:
        from twisted.application.internet import backoffPolicy
        from twisted.internet.testing import MemoryReactorClock

        self.reactor = MemoryReactorClock()
        self.client = RedisClient(
            self.reactor,
            RedisAddress.from_url("redis://127.0.0.1:6390/0"),
            retry_policy=backoffPolicy(initialDelay=1.0, maxDelay=8.0, factor=2.0, jitter=lambda: 0.0),
        )

    def attempts(self) -> int:
        return len(self.reactor.tcpClients)

    def refuse_latest(self) -> None:
        from twisted.internet.error import ConnectionRefusedError
        from twisted.python.failure import Failure

        factory = self.reactor.tcpClients[-1][2]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))

    def accept_latest(self) -> Any:
        from twisted.internet.testing import StringTransport

        protocol = self.reactor.tcpClients[-1][2].buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertIn(b"PING", transport.value())
        protocol.dataReceived(b"+PONG\r\n")
        return protocol

    def test_reply_read_after_a_stall(self) -> None:
        """
        A reply that arrived while the reactor was stalled for longer than
        the command timeout is read, not taken for a dead server: the
        timeout aborts only if the reply is still missing after the sockets
        were read once more.  One that never comes still aborts.
        """
        self.client.start()
        protocol = self.accept_latest()
        transport = protocol.transport
        answered = self.client.execute("GET", "k")
        self.stall(6.0)
        protocol.dataReceived(b"$1\r\nv\r\n")  # the read that waited
        self.reactor.advance(0)
        self.assertEqual(self.successResultOf(answered), b"v")
        self.assertFalse(transport.disconnecting)
        unanswered = self.client.execute("GET", "k")
        self.stall(6.0)
        self.assertNoResult(unanswered)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(0)
        self.assertTrue(transport.disconnecting)

    def stall(self, seconds: float) -> None:
        """
        What a reactor does after a turn of C{seconds}: it runs the timers
        that became due, and what they schedule waits for the next turn,
        after the sockets were read (L{Clock.advance} would run those too).
        """
        self.reactor.rightNow += seconds
        due = sorted((c for c in self.reactor.calls if c.getTime() <= self.reactor.seconds()), key=lambda c: c.getTime())
        for call in due:
            self.reactor.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)

    def test_backs_off_then_starts_over(self) -> None:
        """
        Refused attempts are made again after 2, 4, 8, then 8 seconds; once
        connected, a lost connection is made again after the first delay.
        """
        starting = self.client.start()
        self.assertEqual(self.attempts(), 1)
        self.refuse_latest()
        self.reactor.advance(0)
        self.assertIn("unreachable", str(self.failureResultOf(starting, StoreUnavailable).value))
        times = []
        while self.reactor.seconds() < 30:
            before = self.attempts()
            self.reactor.advance(1)
            if self.attempts() > before:
                times.append(self.reactor.seconds())
                self.refuse_latest()
        self.assertEqual(times, [2, 6, 14, 22, 30])
        self.flushLoggedErrors()
        self.reactor.advance(8)
        connection = self.accept_latest()
        self.assertTrue(self.client.connected)
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        connection.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(self.client.connected)
        before = self.attempts()
        self.reactor.advance(1.9)
        self.assertEqual(self.attempts(), before)
        self.reactor.advance(0.1)
        self.assertEqual(self.attempts(), before + 1)
        self.client.stop()

    def test_default_policy_grows_to_the_maximum(self) -> None:
        """
        Without a policy of its own, the first reconnection comes within
        about C{min_backoff} and the delays grow to C{max_backoff} (each
        with at most C{min_backoff} of jitter).
        """
        client = RedisClient(self.reactor, RedisAddress.from_url("redis://127.0.0.1:6390/0"), min_backoff=0.1, max_backoff=2.0)
        self.assertTrue(0.1 <= client.retry_policy(1) <= 0.2)
        self.assertTrue(0.4 <= client.retry_policy(3) <= 0.5)
        self.assertTrue(2.0 <= client.retry_policy(30) <= 2.1)
