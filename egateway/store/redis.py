"""
The shared store: several gateways keep their kernels in one Redis, so any
of them can serve any kernel, and leases keep them from culling, restarting
or shutting one down twice.

Keys (C{prefix} defaults to C{egateway:})::

    {prefix}kernels                      hash  kernel id -> record (JSON; secrets sealed)
    {prefix}sessions                     hash  session id -> record (JSON)
    {prefix}lease:{kernel_id}            string, the holder, with a TTL (PX)
    {prefix}journal:{kernel_id}:{session_id}
                                         sorted set, score = sequence number,
                                         member = 8-byte big-endian sequence + frame
    {prefix}journals:{kernel_id}         set of the session ids that have a journal
    {prefix}holders:{kernel_id}          hash  session id -> the gateway serving it now

Redis Cluster is not supported (the scripts touch keys of several slots).
The store talks to Redis through L{egateway.store.resp.RedisClient}, which
fails commands at once while Redis is unreachable and reconnects by itself.
"""

from __future__ import annotations

from typing import Any, Collection, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

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
from egateway.store.resp import RedisAddress, RedisClient

# Take the lease if free, or extend it if the caller holds it.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: per session its journal, its kernel's index of journals and its
# kernel's holders.  ARGV: the entries to keep, the holder, then per session
# its id, its number of entries and the entries (number, member).  Returns
# per session 1 if another holder has claimed it (nothing written), else 0.
# A sequence number already journalled is not added again, so a retried
# append does not duplicate frames.
_APPEND = """
local keep = tonumber(ARGV[1])
local holder = ARGV[2]
local answers = {}
local a = 3
for k = 1, #KEYS, 3 do
  local journal, session, count = KEYS[k], ARGV[a], tonumber(ARGV[a + 1])
  local first, last = a + 2, a + 1 + 2 * count
  a = last + 1
  local current = false
  if holder ~= '' then current = redis.call('HGET', KEYS[k + 2], session) end
  if current and current ~= holder then
    answers[#answers + 1] = 1
  elseif keep <= 0 then
    redis.call('DEL', journal)
    answers[#answers + 1] = 0
  else
    for i = first, last, 2 do
      if redis.call('ZCOUNT', journal, ARGV[i], ARGV[i]) == 0 then
        redis.call('ZADD', journal, ARGV[i], ARGV[i + 1])
      end
    end
    redis.call('ZREMRANGEBYRANK', journal, 0, -keep - 1)
    redis.call('SADD', KEYS[k + 1], session)
    answers[#answers + 1] = 0
  end
end
return answers
"""

# KEYS: index, holders.  ARGV: the journal key prefix of the kernel.
_DELETE_JOURNALS = """
for _, session in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  redis.call('DEL', ARGV[1] .. session)
end
redis.call('DEL', KEYS[1], KEYS[2])
return 0
"""

# KEYS: holders.  ARGV: session id, holder.  Returns the previous holder.
_CLAIM = """
local previous = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return previous
"""


@implementer(IKernelStore)
class RedisStore:
    """
    L{IKernelStore} in Redis, shared by the gateways that use the same URL
    and prefix.  Every gateway must have the same store key.

    @param url: C{redis://[[user]:password@]host[:port][/db]}.
    @param reactor: provides C{IReactorTime} and C{IReactorTCP}.
    @param client_options: passed to L{RedisClient} (timeouts, back-off).
    """

    shared = True
    _log = Logger()

    def __init__(
        self, url: str, secret_box: SecretBox, reactor: Any, prefix: str = "egateway:", **client_options: Any
    ) -> None:
        self.address = RedisAddress.from_url(url)
        self.prefix = prefix
        self._box = secret_box
        self._client = RedisClient(reactor, self.address, **client_options)
        self._started = False
        self._kernels = prefix + "kernels"
        self._sessions = prefix + "sessions"

    def __repr__(self) -> str:
        return f"<RedisStore {self.address} prefix={self.prefix!r}>"

    @property
    def connected(self) -> bool:
        return self._client.connected

    def start(self) -> Deferred[None]:
        """
        Connect.  Fails with L{StoreUnavailable} if Redis cannot be reached
        now; the store keeps reconnecting in the background all the same,
        and its operations work as soon as Redis answers.
        """
        if not self._started:
            self._started = True
            self._log.info("kernel store: {address} (prefix {prefix})", address=str(self.address), prefix=self.prefix)
        return self._client.start()

    def stop(self) -> Deferred[None]:
        self._started = False
        return self._client.stop()

    # -- kernels and sessions ---------------------------------------------

    def save_kernel(self, record: KernelRecord) -> Deferred[None]:
        data = encode_kernel(record, self._box)
        return self._client.execute("HSET", self._kernels, record.kernel_id, data).addCallback(_none)

    def delete_kernel(self, kernel_id: str) -> Deferred[None]:
        return self._client.pipeline(
            [["HDEL", self._kernels, kernel_id], ["DEL", self._lease(kernel_id)]]
        ).addCallback(self._all_ok, "HDEL")

    def load_kernel(self, kernel_id: str) -> Deferred[KernelRecord | None]:
        def decode(raw: bytes | None) -> KernelRecord | None:
            return None if raw is None else decode_kernel(kernel_id, raw, self._box)

        return self._client.execute("HGET", self._kernels, kernel_id).addCallback(decode)

    def load_kernels(self, skip: Collection[str] = ()) -> Deferred[list[KernelRecord]]:
        if not skip:
            return self._client.execute("HGETALL", self._kernels).addCallback(
                lambda flat: self._decode_kernels(_pairs(flat))
            )
        return Deferred.fromCoroutine(self._load_kernels_except(skip))

    async def _load_kernels_except(self, skip: Collection[str]) -> list[KernelRecord]:
        """
        The ids first, then only the records not skipped: listing a gateway
        that holds 1,000 of the store's kernels neither transfers nor
        decrypts their records.
        """
        wanted = [
            kernel_id
            for kernel_id in (raw.decode("utf-8", "replace") for raw in await self._client.execute("HKEYS", self._kernels))
            if kernel_id not in skip
        ]
        if not wanted:
            return []
        values = await self._client.execute("HMGET", self._kernels, *wanted)
        # A record deleted between the two reads is None: gone, not listed.
        return self._decode_kernels([(k, raw) for k, raw in zip(wanted, values) if raw is not None])

    def _decode_kernels(self, pairs: list[tuple[str, bytes]]) -> list[KernelRecord]:
        records = []
        for kernel_id, raw in pairs:
            try:
                records.append(decode_kernel(kernel_id, raw, self._box))
            except RecordUnreadable as e:
                self._log.error("{address}: {error}", address=str(self.address), error=str(e))
        return sorted(records, key=lambda r: r.kernel_id)

    def save_session(self, record: SessionRecord) -> Deferred[None]:
        return self._client.execute("HSET", self._sessions, record.id, encode_session(record)).addCallback(_none)

    def delete_session(self, session_id: str) -> Deferred[None]:
        return self._client.execute("HDEL", self._sessions, session_id).addCallback(_none)

    def load_sessions(self) -> Deferred[list[SessionRecord]]:
        def decode(flat: list[bytes]) -> list[SessionRecord]:
            records = []
            for session_id, raw in _pairs(flat):
                try:
                    records.append(decode_session(session_id, raw))
                except RecordUnreadable as e:
                    self._log.error("{address}: {error}", address=str(self.address), error=str(e))
            return sorted(records, key=lambda r: r.id)

        return self._client.execute("HGETALL", self._sessions).addCallback(decode)

    # -- leases -----------------------------------------------------------

    def _lease(self, kernel_id: str) -> str:
        return f"{self.prefix}lease:{kernel_id}"

    def acquire_lease(self, kernel_id: str, holder: str, ttl: float) -> Deferred[bool]:
        milliseconds = max(1, int(ttl * 1000))
        return self._client.eval_script(_ACQUIRE, [self._lease(kernel_id)], [holder, milliseconds]).addCallback(
            lambda taken: taken == 1
        )

    def release_lease(self, kernel_id: str, holder: str) -> Deferred[None]:
        return self._client.eval_script(_RELEASE, [self._lease(kernel_id)], [holder]).addCallback(_none)

    def lease_holder(self, kernel_id: str) -> Deferred[str | None]:
        return self._client.execute("GET", self._lease(kernel_id)).addCallback(
            lambda holder: None if holder is None else holder.decode("utf-8")
        )

    # -- journal ----------------------------------------------------------

    def _journal(self, kernel_id: str, session_id: str) -> str:
        return f"{self.prefix}journal:{kernel_id}:{session_id}"

    def _holders(self, kernel_id: str) -> str:
        return f"{self.prefix}holders:{kernel_id}"

    def journal_append(
        self, kernel_id: str, session_id: str, entries: list[JournalEntry], max_entries: int, holder: str = ""
    ) -> Deferred[bool]:
        if not entries and max_entries > 0 and not holder:
            return succeed(True)
        appending = self.journal_append_many([(kernel_id, session_id, entries)], max_entries, holder)
        return appending.addCallback(lambda answers: answers[0])

    def journal_append_many(
        self, appends: Sequence[JournalAppend], max_entries: int, holder: str = ""
    ) -> Deferred[list[bool]]:
        if not appends:
            return succeed([])
        keys: list[Any] = []
        args: list[Any] = [int(max_entries), holder]
        for kernel_id, session_id, entries in appends:
            keys += [self._journal(kernel_id, session_id), f"{self.prefix}journals:{kernel_id}", self._holders(kernel_id)]
            args += [session_id, len(entries)]
            for seq, data in entries:
                seq = int(seq)
                args.append(seq)
                # The member is the number, then the entry: sent in two
                # pieces, so a large entry is not copied to prefix it.
                args.append([seq.to_bytes(8, "big", signed=True), bytes(data)])
        return self._client.eval_script(_APPEND, keys, args).addCallback(
            lambda refused: [answer != 1 for answer in refused]
        )

    def claim_session(self, kernel_id: str, session_id: str, holder: str) -> Deferred[str | None]:
        return self._client.eval_script(_CLAIM, [self._holders(kernel_id)], [session_id, holder]).addCallback(
            lambda previous: previous.decode("utf-8") if isinstance(previous, bytes) else None
        )

    def journal_read(self, kernel_id: str, session_id: str, after: int) -> Deferred[list[JournalEntry]]:
        def decode(members: list[bytes]) -> list[JournalEntry]:
            return [(int.from_bytes(m[:8], "big", signed=True), m[8:]) for m in members]

        return self._client.execute(
            "ZRANGEBYSCORE", self._journal(kernel_id, session_id), f"({int(after)}", "+inf"
        ).addCallback(decode)

    def journal_delete(self, kernel_id: str) -> Deferred[None]:
        return self._client.eval_script(
            _DELETE_JOURNALS,
            [f"{self.prefix}journals:{kernel_id}", self._holders(kernel_id)],
            [f"{self.prefix}journal:{kernel_id}:"],
        ).addCallback(_none)

    def _all_ok(self, replies: list[Any], name: str) -> None:
        for reply in replies:
            self._client.check(reply, (name,))


def _none(_: Any) -> None:
    return None


def _pairs(flat: list[bytes]) -> list[tuple[str, bytes]]:
    return [(flat[i].decode("utf-8", "replace"), flat[i + 1]) for i in range(0, len(flat), 2)]
