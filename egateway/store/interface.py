"""
The kernel session store: what the gateway keeps so that kernels, sessions
and the output a client missed outlive a gateway process.

Two implementations share this contract: L{egateway.store.sqlite.SQLiteStore}
(one gateway, a local file, the zero-configuration default) and
L{egateway.store.redis.RedisStore} (several gateways sharing one Redis).
Records are plain data; the store encrypts the secret parts of a kernel
record (its launcher snapshot and environment) before they leave the
process, so nothing here handles keys.

Every method returns a Deferred and never blocks the reactor.  A backend
that cannot be reached fails the Deferred with L{StoreUnavailable}; callers
decide whether that is fatal for their request (a REST call) or something to
retry (a periodic save).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Collection, Mapping, Sequence

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


class StoreError(Exception):
    """
    Base of the store's errors.
    """


class StoreUnavailable(StoreError):
    """
    The store cannot be reached or refused the operation.  The message says
    which store (path or address, never a password) and why.
    """


class StoreRefused(StoreUnavailable):
    """
    The store answered but will not have this gateway (a wrong password, a
    certificate it refuses, a file that cannot be read): trying again
    cannot help, the configuration must change.
    """


class RecordUnreadable(StoreError):
    """
    A stored record exists but cannot be read: it was encrypted with another
    key, or it is corrupted.  C{load_kernel} fails with this; C{load_kernels}
    logs it and returns the records it could read.
    """

    def __init__(self, kind: str, record_id: str, why: str) -> None:
        super().__init__(f"{kind} {record_id}: stored record cannot be read: {why}")
        self.kind = kind
        self.record_id = record_id
        self.why = why


def _from_mapping(cls: type, data: Mapping[str, Any]) -> Any:
    """
    Build a record dataclass from plain data, ignoring keys a newer gateway
    may have added, so a rolling upgrade does not make old gateways fail.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class KernelRecord:
    """
    What a gateway needs to reattach to a kernel it did not start.

    C{owner}, C{owner_groups}, C{acl} and C{profile} came later; records
    without them load with their defaults (the owner is then the
    C{username}).

    C{snapshot} (the launcher's, from L{IKernelProcess.snapshot}) and C{env}
    hold secrets (the kernel's HMAC key, a comm token, credentials in the
    environment); stores encrypt these two fields at rest and leave the rest
    readable for operators.
    """

    kernel_id: str
    spec_name: str
    username: str
    launcher: str
    snapshot: dict
    env: dict
    state: str
    execution_state: str
    created: float
    updated: float
    restarts: int = 0
    reason: str = ""
    gateway_id: str = ""
    owner: str = ""
    owner_groups: list = field(default_factory=list)
    acl: dict = field(default_factory=dict)
    profile: str = ""

    SECRET_FIELDS = ("snapshot", "env")

    def to_json(self) -> dict[str, Any]:
        """
        The record as JSON-able plain data (a dict, not a string), secrets
        included in clear: the store encrypts them.
        """
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "KernelRecord":
        """
        The inverse of L{to_json}.  Unknown keys are ignored.

        @raise ValueError: a required field is missing or C{data} is not a
            mapping.
        """
        try:
            return _from_mapping(cls, data)
        except TypeError as e:
            raise ValueError(f"not a kernel record: {e}") from None


@dataclass
class SessionRecord:
    """
    A session of C{/api/sessions} (jupyter_server 2's model).
    """

    id: str
    path: str
    name: str
    type: str
    kernel_id: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SessionRecord":
        try:
            return _from_mapping(cls, data)
        except TypeError as e:
            raise ValueError(f"not a session record: {e}") from None


JournalEntry = tuple[int, bytes]

JournalAppend = tuple[str, str, list[JournalEntry]]
"""
The entries of one client session of a kernel: kernel id, session id, entries.
"""


class IKernelStore(Interface):
    """
    Durable kernel and session records, leases that keep gateways sharing a
    store from acting on one kernel twice, and the journal of WebSocket
    frames that lets a client resume.

    Every method returns a Deferred that fails with L{StoreUnavailable} when
    the backend is down (or the store is not started).
    """

    shared: bool = Attribute(
        "True if several gateways can share this store (Redis); False for a "
        "store only one gateway process may open (SQLite)."
    )

    def start() -> "Deferred[None]":
        """
        Open files or connections.  Idempotent.
        """

    def stop() -> "Deferred[None]":
        """
        Close everything L{start} opened.  Idempotent.
        """

    def save_kernel(record: KernelRecord) -> "Deferred[None]":
        """
        Insert or replace the record of C{record.kernel_id}.
        """

    def delete_kernel(kernel_id: str) -> "Deferred[None]":
        """
        Forget a kernel (and its lease).  Deleting an unknown id succeeds.
        """

    def load_kernel(kernel_id: str) -> "Deferred[KernelRecord | None]":
        """
        One kernel's record, or None.  Fails with L{RecordUnreadable} if the
        record cannot be decrypted or parsed.
        """

    def load_kernels(skip: Collection[str] = ()) -> "Deferred[list[KernelRecord]]":
        """
        Every readable kernel record; unreadable ones are logged (naming the
        kernel and why) and left in the store for an operator.

        @param skip: ids of kernels whose records are not wanted: neither
            returned nor decoded (a gateway lists the kernels it holds from
            memory, and asks a shared store only for the others).
        """

    def save_session(record: SessionRecord) -> "Deferred[None]":
        """
        Insert or replace a session.
        """

    def delete_session(session_id: str) -> "Deferred[None]":
        """
        Forget a session.  Deleting an unknown id succeeds.
        """

    def load_sessions() -> "Deferred[list[SessionRecord]]":
        """
        Every readable session record.
        """

    def acquire_lease(kernel_id: str, holder: str, ttl: float) -> "Deferred[bool]":
        """
        Take the lease on a kernel for C{ttl} seconds, or extend it if
        C{holder} already holds it.  Fires False if another holder does.
        """

    def release_lease(kernel_id: str, holder: str) -> "Deferred[None]":
        """
        Give up the lease if C{holder} holds it; otherwise do nothing.
        """

    def lease_holder(kernel_id: str) -> "Deferred[str | None]":
        """
        Who holds the lease now, or None if nobody (or it expired).
        """

    def journal_append(
        kernel_id: str, session_id: str, entries: list[JournalEntry], max_entries: int, holder: str = ""
    ) -> "Deferred[bool]":
        """
        Add numbered frames to the journal of one client session of a kernel
        and keep only the newest C{max_entries}.  Appending a sequence number
        already present does not duplicate it.

        @param holder: if given, append only while no other holder has
            claimed the session (L{claim_session}).
        @return: fires False when refused for that reason, else True.
        """

    def journal_append_many(
        appends: Sequence[JournalAppend], max_entries: int, holder: str = ""
    ) -> "Deferred[list[bool]]":
        """
        L{journal_append} for several sessions (of one or several kernels)
        in one request to the store.

        @param appends: (kernel id, session id, entries) per session, each
            session once.
        @return: fires with one answer per append, in order: False where
            refused because another holder claimed the session, else True.
            Fails as a whole (L{StoreError}) when the store cannot take it.
        """

    def claim_session(kernel_id: str, session_id: str, holder: str) -> "Deferred[str | None]":
        """
        Record C{holder} as the gateway serving a client session of a kernel
        from now on (forgotten with the kernel's journals).

        @return: fires with the previous holder, or None.
        """

    def journal_read(kernel_id: str, session_id: str, after: int) -> "Deferred[list[JournalEntry]]":
        """
        The journalled frames with a sequence number greater than C{after},
        in ascending order.
        """

    def journal_delete(kernel_id: str) -> "Deferred[None]":
        """
        Drop the journals, and the holders, of every session of a kernel.
        """
