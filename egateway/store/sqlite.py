"""
The default store: one SQLite file, for a gateway that runs alone.

Every sqlite3 call runs on a pool of exactly one thread of its own, so calls
are serialised without locks and the reactor never waits on the disk.  The
database is in WAL mode with C{synchronous=NORMAL}: a committed write
survives the gateway being killed (C{kill -9}); only a power failure may
lose the last transactions.

One gateway process may have the file open at a time (an exclusive C{flock}
on C{<path>.lock}), which is what makes the in-process leases correct.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import stat
from typing import Any, Callable, Collection, Sequence, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from egateway.observe import OneShotObserver
from egateway.store.codec import decode_kernel, decode_session, encode_kernel, encode_session
from egateway.store.crypto import SecretBox
from egateway.store.interface import (
    IKernelStore,
    JournalAppend,
    JournalEntry,
    KernelRecord,
    RecordUnreadable,
    SessionRecord,
    StoreUnavailable,
)

T = TypeVar("T")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kernels (
    kernel_id TEXT PRIMARY KEY,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    kernel_id TEXT NOT NULL,
    data TEXT NOT NULL
);
-- A rowid table: frames are large rows, and the trim scans only the index.
CREATE TABLE IF NOT EXISTS journal (
    kernel_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    UNIQUE (kernel_id, session_id, seq)
);
"""


@implementer(IKernelStore)
class SQLiteStore:
    """
    L{IKernelStore} in a local SQLite file.

    @param path: the database file; its directory is created (0700) if
        missing, the file itself with mode 0600.
    @param secret_box: encrypts the secret fields of kernel records.
    @param reactor: provides C{IReactorTime}, C{IReactorThreads} (for
        L{deferToThreadPool}) and C{IReactorCore} (shutdown trigger).
    """

    shared = False
    _log = Logger()

    def __init__(self, path: str, secret_box: SecretBox, reactor: Any) -> None:
        self.path = os.path.abspath(os.path.expanduser(path))
        self._box = secret_box
        self._reactor = reactor
        self._pool: ThreadPool | None = None
        self._shutdown_trigger: Any = None
        self._starting: OneShotObserver[None] | None = None
        self._generation = 0
        self._started = False
        # Touched only on the pool's thread.
        self._connection: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        # kernel_id -> (holder, expires at, in reactor seconds)
        self._leases: dict[str, tuple[str, float]] = {}
        self._holders: dict[tuple[str, str], str] = {}

    def __repr__(self) -> str:
        return f"<SQLiteStore {self.path}>"

    # -- life cycle -------------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        Open (creating if needed) the database.  Fails with
        L{StoreUnavailable} if the file cannot be opened or another gateway
        process has it open.
        """
        if self._started:
            return succeed(None)
        if self._starting is not None:
            return self._starting.when_fired()
        starting = self._starting = OneShotObserver()
        pool = ThreadPool(minthreads=1, maxthreads=1, name=f"egateway-store-sqlite:{self.path}")
        pool.start()
        self._pool = pool
        # Should the reactor stop without stop() being called, the thread
        # must not keep the process alive.
        self._shutdown_trigger = self._reactor.addSystemEventTrigger("during", "shutdown", pool.stop)

        generation = self._generation

        def done(result: Any) -> None:
            if self._starting is starting:
                self._starting = None
            if generation != self._generation:
                # stop() came first; it closes what was opened and stops the pool.
                starting.fire(StoreUnavailable(f"SQLite store {self.path} was stopped while starting"))
                return
            if isinstance(result, Failure):
                self._stop_pool()
                starting.fire(result)
                return
            self._started = True
            self._log.info("kernel store: SQLite {path}", path=self.path)
            starting.fire(None)

        self._call(self._open_blocking).addBoth(done)
        return starting.when_fired()

    def stop(self) -> Deferred[None]:
        """
        Finish queued work, close the database and stop the thread.
        """
        if self._pool is None:
            return succeed(None)
        self._started = False
        self._generation += 1

        def closed(result: Any) -> Any:
            # The queue is empty now, so joining the thread does not wait.
            self._started = False
            self._stop_pool()
            return None

        return self._call(self._close_blocking).addBoth(closed)

    def _stop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        if pool is not None:
            pool.stop()

    def _open_blocking(self) -> None:
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
        lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise StoreUnavailable(
                f"SQLite store {self.path} is in use by another gateway process; an SQLite store serves one "
                "gateway: give each its own store_url, or share a redis:// store"
            ) from None
        self._lock_fd = lock_fd
        try:
            # Create the file ourselves so its mode is 0600 whatever the umask;
            # SQLite gives the -wal and -shm files the database file's mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            mode = stat.S_IMODE(os.stat(self.path).st_mode)
            if mode & 0o077:
                os.chmod(self.path, mode & 0o700)
            connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
            try:
                mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode != "wal":
                    self._log.warn("SQLite store {path}: journal mode is {mode}, not WAL", path=self.path, mode=mode)
                connection.execute("PRAGMA synchronous=NORMAL")
                version = connection.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreUnavailable(
                        f"SQLite store {self.path} has schema version {version}; this gateway knows "
                        f"{SCHEMA_VERSION} (a newer gateway wrote it)"
                    )
                connection.executescript(_SCHEMA)
                connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            except BaseException:
                connection.close()
                raise
            self._connection = connection
        except BaseException:
            self._lock_fd = None
            os.close(lock_fd)
            raise

    def _close_blocking(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- running blocking calls -------------------------------------------

    def _call(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Run C{function} on the store's thread; sqlite3 and OS errors become
        L{StoreUnavailable} naming the file.
        """
        if self._pool is None:
            return fail(StoreUnavailable(f"SQLite store {self.path} is not started"))

        def guarded() -> T:
            try:
                return function(*args)
            except sqlite3.Error as e:
                raise StoreUnavailable(f"SQLite store {self.path}: {e}") from None
            except OSError as e:
                raise StoreUnavailable(f"SQLite store {self.path}: {e.strerror or e}") from None

        return deferToThreadPool(self._reactor, self._pool, guarded)

    def _run(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        if not self._started:
            return fail(StoreUnavailable(f"SQLite store {self.path} is not started"))
        return self._call(function, *args)

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            raise StoreUnavailable(f"SQLite store {self.path} is closed")
        return self._connection

    # -- kernels and sessions ---------------------------------------------

    def save_kernel(self, record: KernelRecord) -> Deferred[None]:
        # Encoded now, so the record saved is the one at the time of the call.
        data = encode_kernel(record, self._box).decode("utf-8")
        return self._run(self._save_kernel_blocking, record.kernel_id, data)

    def _save_kernel_blocking(self, kernel_id: str, data: str) -> None:
        self._db().execute("INSERT OR REPLACE INTO kernels (kernel_id, data) VALUES (?, ?)", (kernel_id, data))

    def delete_kernel(self, kernel_id: str) -> Deferred[None]:
        self._leases.pop(kernel_id, None)
        return self._run(self._delete_kernel_blocking, kernel_id)

    def _delete_kernel_blocking(self, kernel_id: str) -> None:
        self._db().execute("DELETE FROM kernels WHERE kernel_id = ?", (kernel_id,))

    def load_kernel(self, kernel_id: str) -> Deferred[KernelRecord | None]:
        return self._run(self._load_kernel_blocking, kernel_id)

    def _load_kernel_blocking(self, kernel_id: str) -> KernelRecord | None:
        row = self._db().execute("SELECT data FROM kernels WHERE kernel_id = ?", (kernel_id,)).fetchone()
        return None if row is None else decode_kernel(kernel_id, row[0], self._box)

    def load_kernels(self, skip: Collection[str] = ()) -> Deferred[list[KernelRecord]]:
        return self._run(self._load_kernels_blocking, frozenset(skip)).addCallback(self._report_unreadable)

    def _load_kernels_blocking(self, skip: frozenset[str]) -> tuple[list[KernelRecord], list[RecordUnreadable]]:
        records, unreadable = [], []
        for kernel_id, data in self._db().execute("SELECT kernel_id, data FROM kernels ORDER BY kernel_id"):
            if kernel_id in skip:
                continue
            try:
                records.append(decode_kernel(kernel_id, data, self._box))
            except RecordUnreadable as e:
                unreadable.append(e)
        return records, unreadable

    def _report_unreadable(self, result: tuple[list[T], list[RecordUnreadable]]) -> list[T]:
        records, unreadable = result
        for error in unreadable:
            self._log.error("SQLite store {path}: {error}", path=self.path, error=str(error))
        return records

    def save_session(self, record: SessionRecord) -> Deferred[None]:
        data = encode_session(record).decode("utf-8")
        return self._run(self._save_session_blocking, record.id, record.kernel_id, data)

    def _save_session_blocking(self, session_id: str, kernel_id: str, data: str) -> None:
        self._db().execute(
            "INSERT OR REPLACE INTO sessions (id, kernel_id, data) VALUES (?, ?, ?)", (session_id, kernel_id, data)
        )

    def delete_session(self, session_id: str) -> Deferred[None]:
        return self._run(self._delete_session_blocking, session_id)

    def _delete_session_blocking(self, session_id: str) -> None:
        self._db().execute("DELETE FROM sessions WHERE id = ?", (session_id,))

    def load_sessions(self) -> Deferred[list[SessionRecord]]:
        return self._run(self._load_sessions_blocking).addCallback(self._report_unreadable)

    def _load_sessions_blocking(self) -> tuple[list[SessionRecord], list[RecordUnreadable]]:
        records, unreadable = [], []
        for session_id, data in self._db().execute("SELECT id, data FROM sessions ORDER BY id"):
            try:
                records.append(decode_session(session_id, data))
            except RecordUnreadable as e:
                unreadable.append(e)
        return records, unreadable

    # -- leases: one gateway per file, so they live in this process -------

    def acquire_lease(self, kernel_id: str, holder: str, ttl: float) -> Deferred[bool]:
        if not self._started:
            return fail(StoreUnavailable(f"SQLite store {self.path} is not started"))
        now = self._reactor.seconds()
        current = self._leases.get(kernel_id)
        if current is not None and current[0] != holder and current[1] > now:
            return succeed(False)
        self._leases[kernel_id] = (holder, now + ttl)
        return succeed(True)

    def release_lease(self, kernel_id: str, holder: str) -> Deferred[None]:
        if not self._started:
            return fail(StoreUnavailable(f"SQLite store {self.path} is not started"))
        current = self._leases.get(kernel_id)
        if current is not None and current[0] == holder:
            del self._leases[kernel_id]
        return succeed(None)

    def lease_holder(self, kernel_id: str) -> Deferred[str | None]:
        if not self._started:
            return fail(StoreUnavailable(f"SQLite store {self.path} is not started"))
        current = self._leases.get(kernel_id)
        if current is None or current[1] <= self._reactor.seconds():
            self._leases.pop(kernel_id, None)
            return succeed(None)
        return succeed(current[0])

    # -- journal ----------------------------------------------------------

    def journal_append(
        self, kernel_id: str, session_id: str, entries: list[JournalEntry], max_entries: int, holder: str = ""
    ) -> Deferred[bool]:
        appending = self.journal_append_many([(kernel_id, session_id, entries)], max_entries, holder)
        return appending.addCallback(lambda answers: answers[0])

    def journal_append_many(
        self, appends: Sequence[JournalAppend], max_entries: int, holder: str = ""
    ) -> Deferred[list[bool]]:
        answers = [
            not holder or self._holders.get((kernel_id, session_id), holder) == holder
            for kernel_id, session_id, _ in appends
        ]
        taken = [
            (kernel_id, session_id, [(kernel_id, session_id, int(seq), bytes(data)) for seq, data in entries])
            for (kernel_id, session_id, entries), answer in zip(appends, answers)
            if answer
        ]
        if not taken:
            return succeed(answers)
        return self._run(self._journal_append_blocking, taken, max_entries).addCallback(lambda _: answers)

    def claim_session(self, kernel_id: str, session_id: str, holder: str) -> Deferred[str | None]:
        # Like leases, in memory: one gateway process opens an SQLite store.
        previous = self._holders.get((kernel_id, session_id))
        self._holders[(kernel_id, session_id)] = holder
        return succeed(previous)

    def _journal_append_blocking(
        self, appends: list[tuple[str, str, list[tuple[str, str, int, bytes]]]], max_entries: int
    ) -> None:
        db = self._db()
        with _transaction(db):
            for kernel_id, session_id, rows in appends:
                if max_entries <= 0:
                    db.execute("DELETE FROM journal WHERE kernel_id = ? AND session_id = ?", (kernel_id, session_id))
                    continue
                db.executemany(
                    "INSERT OR IGNORE INTO journal (kernel_id, session_id, seq, data) VALUES (?, ?, ?, ?)", rows
                )
                db.execute(
                    "DELETE FROM journal WHERE kernel_id = ? AND session_id = ? AND seq <= ("
                    " SELECT seq FROM journal WHERE kernel_id = ? AND session_id = ?"
                    " ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                    (kernel_id, session_id, kernel_id, session_id, max_entries),
                )

    def journal_read(self, kernel_id: str, session_id: str, after: int) -> Deferred[list[JournalEntry]]:
        return self._run(self._journal_read_blocking, kernel_id, session_id, int(after))

    def _journal_read_blocking(self, kernel_id: str, session_id: str, after: int) -> list[JournalEntry]:
        cursor = self._db().execute(
            "SELECT seq, data FROM journal WHERE kernel_id = ? AND session_id = ? AND seq > ? ORDER BY seq",
            (kernel_id, session_id, after),
        )
        return [(seq, bytes(data)) for seq, data in cursor]

    def journal_delete(self, kernel_id: str) -> Deferred[None]:
        for key in [key for key in self._holders if key[0] == kernel_id]:
            del self._holders[key]
        return self._run(self._journal_delete_blocking, kernel_id)

    def _journal_delete_blocking(self, kernel_id: str) -> None:
        self._db().execute("DELETE FROM journal WHERE kernel_id = ?", (kernel_id,))


class _transaction:
    """
    BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) on an autocommit
    connection.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")
