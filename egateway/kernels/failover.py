"""
Failover without loss: a client whose gateway dies reconnects to another
gateway sharing the store, with its C{session_id} and C{resume_after}, and
gets every iopub message exactly once, in order, and the replies to its
requests.

Four pieces, and why each:

  1. B{Write-ahead journal.}  A resumable session's messages reach its
     client only once the shared store holds them (L{JournalSink} in
     L{egateway.kernels.sharing}: one append per session in flight, what
     arrives meanwhile goes in the next one, so a busy session pays one
     store round trip per batch, not per message).  The numbers a client
     has seen (C{egateway_seq}) are therefore always in the store, and any
     gateway can read what follows them: the client's C{resume_after} means
     the same thing to every gateway, with no new protocol.  Batching
     behind the client's back (as before: a flush every 0.1 s) lost the
     last batch with the gateway, so a client could name numbers no
     surviving gateway knew.  The cost is one store round trip of latency
     per batch.  If the store refuses or cannot be reached, the message
     goes to the client anyway (with a warning): a store outage costs
     failover, not output.  What the old gateway received in its last
     instant and had not yet sent to the store is lost with it, unless
     another gateway received it too: iopub (below), not replies.

  2. B{Per-kernel iopub ring on every attached gateway.}  What the dying
     gateway had not yet written is not lost if another gateway saw it:
     every gateway attached to a kernel keeps the last messages of its
     iopub (L{IopubRing}, bounded like a session journal), in the kernel's
     own order, which PUB/SUB gives every subscriber alike.  Taking a
     session over, the new gateway finds the newest of the kernel iopub
     messages the journal holds that its ring holds too, by C{msg_id}
     (kernels make them unique; positions would differ between gateways
     that attached at different times; and the journal's very last one
     may be a status the ring never took, see L{IopubRing.after}), and
     continues with what its ring holds after it: the messages the old
     gateway received but never wrote, and those the kernel sent while no
     gateway held the session, each once.

  3. B{Per-session socket identity.}  A session's shell, control and stdin
     DEALER sockets take an identity derived from the kernel and session
     ids (L{session_identity}), so the gateway that takes a session over
     takes its identity too, and the kernel's ROUTER sockets route the
     replies (and C{input_request}s) to requests the old gateway sent to
     the new one: ipykernel sets C{ROUTER_HANDOVER}, so the new connection
     wins even while the kernel still believes the old one is alive (a
     crashed host).  A reply the kernel sends after the old gateway died
     and before the new one connected is dropped by ZeroMQ (a ROUTER drops
     what it cannot route): nothing can keep it.  A kernel without
     C{ROUTER_HANDOVER} gets the new connection once the old one is closed
     (at once when the old gateway's process died).

  4. B{Claims.}  Every WebSocket connection to a named session claims it in
     the store for its gateway (C{claim_session}), and a gateway's appends
     to a session's journal are refused once another has claimed it: the
     old gateway, if it still runs, then closes its copy (and its client, if
     one is still connected there, is told it was replaced), so the journal
     has one writer and the new gateway reads everything the old one wrote
     before the claim.  A session is thus also handed over exactly once
     when its client moves between two live gateways, which a load balancer
     without sticky sessions does on every reconnect.  Until the old
     gateway's next append tells it, its copy could still take the
     identity back; so a parked named session opens no sockets when the
     kernel is relinked (a restart) and opens them when its client returns.

When is the new gateway attached?  Attachment stays on demand (a REST or
WebSocket access, or the store's kernels at start-up): attaching every
gateway to every kernel as soon as any gateway serves it would multiply
every kernel's iopub traffic by the number of gateways, for the benefit of
failovers only.  A deployment that wants loss-free failover for a kernel
touches it through the other gateways once (any C{GET} of the kernel, from
a client or a proxy).
A gateway that attaches only when the client comes back cannot know what
the kernel published between the old gateway's last write and its own
attachment: if the kernel was busy at that last write, the client is told
that output may have been lost (an iopub C{status} with a C{reason} and a
C{stream} on stderr), as for a journal overrun; if it was idle, nothing is
said (a kernel rarely publishes while idle).  Such a gateway is ready (and
takes the session's identity) once the kernel has answered its
C{kernel_info_request}: on control, which ipykernel 6 and newer answer during
a cell, so the running cell's C{execute_reply} reaches the new gateway (see
L{egateway.kernels.launching.Launching.connect}); a kernel that answers only
on shell (IRkernel) does so after the cell, and that cell's
C{execute_reply} is lost.
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import Protocol, Sequence

from egateway.kernels.held import HeldMessages
from egateway.wire.protocol import Message, WireError

CURSOR_WINDOW = 256
"""
Journal entries read before the client's position to find the last kernel
iopub message (almost every entry is one).
"""


def session_identity(kernel_id: str, session_id: str) -> bytes:
    """
    The ZMQ routing identity of a named session's sockets: the same on every
    gateway, so the kernel's replies follow the session.  Hashed, so that
    any session id makes a valid identity (ZeroMQ reserves a leading zero
    byte) of a fixed size.
    """
    digest = hashlib.sha256(f"egateway-session\0{kernel_id}\0{session_id}".encode("utf-8"))
    return digest.hexdigest()[:32].encode("ascii")


def shared_session_key(session_id: str, user: str) -> str:
    """
    The name a session goes by in the shared store (its journal, its
    holder) and in its routing identity: the session id together with the
    user who opened it.  Sessions belong to their user on every gateway:
    another user presenting the same C{session_id} to any gateway (it is in
    every iopub parent header) finds neither the owner's journal nor the
    owner's socket identity, so he can read no reply or prompt of the
    owner's.  A caller naming no user keeps the bare id (as before).
    """
    if not user:
        return session_id
    digest = hashlib.sha256(f"egateway-user-session\0{user}\0{session_id}".encode("utf-8"))
    return "u-" + digest.hexdigest()[:40]


def gateway_session(kernel_id: str) -> str:
    """
    The header C{session} of messages a gateway builds itself (statuses
    and notices), which are not the kernel's iopub.
    """
    return f"egateway-{kernel_id}"


def is_kernel_iopub(kernel_id: str, channel: str, message: Message) -> bool:
    """
    Whether a journaled message is one the kernel published on iopub (so
    every attached gateway received it too), not a reply or a gateway's own.
    """
    if channel != "iopub":
        return False
    try:
        return message.header.get("session") != gateway_session(kernel_id)
    except WireError:
        return False


HOLDING_COST = 384
"""
What holding one message takes beyond the bytes of its parts: a C{bytes}
object per part, the tuples of the entry and of the parts, its id and
size.  A kernel's C{status} (354 bytes of parts) took 739 bytes in an
iopub ring (C{tracemalloc}); counting the parts alone would let the bounds
hold twice the memory they name for such small messages.
"""


def message_size(message: Message) -> int:
    """
    The bytes a journaled message holds: its parts and buffers, and
    L{HOLDING_COST}.
    """
    parts = message.parts
    size = HOLDING_COST + len(parts[0]) + len(parts[1]) + len(parts[2]) + len(parts[3])
    for buffer in message.buffers:
        size += len(buffer)
    return size


class Bounds(Protocol):
    """
    The bounds a ring keeps to: a session journal's
    (L{egateway.kernels.journal.JournalLimits}), read on every append so a
    change applies at once.
    """

    entries: int
    size: int
    held: HeldMessages


class IopubRing:
    """
    The last iopub messages of one kernel as this gateway received them,
    bounded by a session journal's limits, and with every journal and ring
    by their total (L{HeldMessages}).
    """

    def __init__(self, limits: Bounds) -> None:
        self._limits = limits
        # (msg_id, parts, buffers, size): plain values the garbage collector
        # stops tracking, not the Message (see KernelSession.journal).
        self._messages: deque[tuple[str, tuple[bytes, ...], tuple[bytes, ...], int]] = deque()
        self._bytes = 0
        limits.held.add(self)

    def __len__(self) -> int:
        return len(self._messages)

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def append(self, message: Message) -> None:
        size = message_size(message)
        messages = self._messages
        messages.append((message.msg_id, message.parts, message.buffers, size))
        self._bytes += size
        limits = self._limits
        trimmed = 0
        while len(messages) > limits.entries or (self._bytes - trimmed > limits.size and len(messages) > 1):
            trimmed += messages.popleft()[3]
        self._bytes -= trimmed
        limits.held.grew(size - trimmed)

    def shed_to(self, most: int) -> int:
        """
        Drop the oldest messages down to C{most} bytes, keeping the newest
        (L{egateway.kernels.held.IHolder}).
        """
        messages, dropped = self._messages, 0
        while self._bytes > most and len(messages) > 1:
            self._bytes -= messages.popleft()[3]
            dropped += 1
        return dropped

    def after(self, journaled: Sequence[str]) -> tuple[list[Message], bool]:
        """
        What this ring received after the newest it holds of the
        C{journaled} messages (the ids of the kernel iopub messages a
        session's journal holds), and whether it holds one.  When it holds
        none (they came before this ring began, or never reached it), every
        message held.

        Not only the journal's last one: it may be a message this ring
        never took, such as a status about this gateway's own readiness
        probe (private to the probe here, a plain status to the gateway
        that journaled it), and taking "not found" then for "the ring
        began after the journal" would replay everything the client
        already had.
        """
        held = list(self._messages)
        ids = set(journaled)
        start, found = 0, False
        for index in range(len(held) - 1, -1, -1):
            if held[index][0] in ids:
                start, found = index + 1, True
                break
        return [Message(parts, buffers) for _, parts, buffers, _ in held[start:]], found
