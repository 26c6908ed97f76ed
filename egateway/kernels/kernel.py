"""
One kernel as the gateway holds it: its state, its activity, its launched
process, its ZMQ link, and its client sessions (see
L{egateway.kernels.journal}).

The L{KernelManager} drives the lifecycle; this class keeps the bookkeeping
and does the message fan-out, which is the hot path: every iopub message is
parsed only as far as its header (and, for C{status}, its content) and then
handed to each attached client as the bytes received.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any, Callable

from twisted.logger import Logger

from egateway.clusters.interface import IKernelProcess, Phase, PhaseEvent
from egateway.kernels.acl import Acl
from egateway.kernels.failover import IopubRing, gateway_session
from egateway.kernels.specs import KernelSpec
from egateway.kernels.state import KernelState, check_transition
from egateway.kernels.journal import JournalLimits, KernelClient, KernelSession
from egateway.wire.link import KernelLink
from egateway.wire.protocol import Message, WireError

_log = Logger()


class SessionTaken(Exception):
    """
    A client named a session that belongs to another user.
    """


def iso(timestamp: float) -> str:
    return (
        datetime.fromtimestamp(timestamp, timezone.utc)
        .isoformat(timespec="microseconds")
        .replace("+00:00", "Z")
    )


class Kernel:
    """
    @ivar execution_state: the kernel's last reported state (C{starting},
        C{idle}, C{busy}), or the gateway's view (C{restarting}, C{dead}).
        Statuses about control requests do not count (a kernel answers
        control beside a running cell), nor a request of the gateway's
        own keeping it busy; the readiness probe sets what it found.
    @ivar owner: the user it was launched for; with C{acl}, who may see it
        (see L{egateway.kernels.policy}).
    @ivar owner_groups: the owner's groups at launch (for group quotas).
    @ivar profile: the name of the profile it was launched with, or C{None}.
    @ivar launcher_config: the launcher config every (re)launch uses: the
        kernelspec's, with the profile's merged over it.
    @ivar pooled: see L{__init__}; C{pool} names its warm pool.
    """

    def __init__(
        self,
        kernel_id: str,
        spec: KernelSpec,
        username: str,
        env: dict[str, str],
        clock: Any,
        launcher_name: str,
        journal: JournalLimits | None = None,
    ) -> None:
        self.id = kernel_id
        self.spec = spec
        self.username = username
        self.owner = username
        self.owner_groups: frozenset[str] = frozenset()
        self.acl = Acl()
        self.profile: str | None = None
        self.launcher_config: Any = spec.launcher_config
        self.env = env
        self.pooled = False
        """
        Started ahead in a warm pool and bound to nobody yet: owned by no
        user, hidden from the API (see L{egateway.kernels.pools}).
        """
        self.pool: str | None = None
        """
        The pool it was started in, if any (kept once bound).
        """
        self.launcher_name = launcher_name
        self._clock = clock
        self.state = KernelState.LAUNCHING
        self.execution_state = "starting"
        self.started = clock.seconds()
        self.last_activity = self.started
        self.reason = ""
        self.launch_failure = ""
        """
        Why its launch failed, in one word (C{timeout}, C{exited}, ...).
        """
        self.restart_count = 0
        self.phases: list[PhaseEvent] = []
        self._phases_formatted: tuple[Any, list[dict[str, str]]] = (None, [])
        self._started_formatted: tuple[float, str] | None = None
        self.process: IKernelProcess | None = None
        self.link: KernelLink | None = None
        self.live = False
        self.sessions: dict[str, KernelSession] = {}
        self.journal_sink: Callable[..., None] | None = None
        """
        Receives every journaled message too (a store shared by gateways).
        """
        self.iopub_ring: IopubRing | None = None
        """
        With a shared store, the kernel's last iopub messages, so this
        gateway can take over a session another served (see
        L{egateway.kernels.failover}).
        """
        self.journal_limits = journal or JournalLimits()
        self.on_iopub_observers: list[Callable[[Message], None]] = []
        self.on_change: Callable[[Kernel], None] | None = None
        """
        Called after each state transition, launch phase and client
        connection or disconnection (the admin dashboard's live updates).
        """

    # -- bookkeeping ---------------------------------------------------

    def transition(self, new: KernelState, why: str = "") -> None:
        check_transition(self.state, new)
        _log.info(
            "kernel {kernel_id}: {old} -> {new}{why}",
            kernel_id=self.id,
            old=self.state.value,
            new=new.value,
            why=f" ({why})" if why else "",
            user=self.username,
            launcher=self.launcher_name,
        )
        self.state = new
        self._changed()

    def report(self, phase: Phase, detail: str = "") -> None:
        event = PhaseEvent(phase, self._clock.seconds(), detail)
        self.phases.append(event)
        _log.info(
            "kernel {kernel_id} launch phase: {phase}",
            kernel_id=self.id,
            phase=event.describe(),
        )
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change(self)
            except Exception:
                _log.failure("kernel {kernel_id}: change observer failed", kernel_id=self.id)

    def _phases_model(self) -> list[dict[str, str]]:
        """
        The last 20 launch phases as the model shows them, formatted once:
        they never change, and formatting their times was most of the cost
        of listing a thousand kernels.
        """
        phases = self.phases
        key = (len(phases), phases[-1] if phases else None)
        if self._phases_formatted[0] != key:
            self._phases_formatted = (key, [event.to_dict(iso) for event in phases[-20:]])
        return list(self._phases_formatted[1])

    def _started_iso(self) -> str:
        """
        C{iso(self.started)}, formatted again only when C{started} changes
        (a restored kernel takes its record's).
        """
        cached = self._started_formatted
        if cached is None or cached[0] != self.started:
            cached = self._started_formatted = (self.started, iso(self.started))
        return cached[1]

    @property
    def last_phase(self) -> PhaseEvent | None:
        return self.phases[-1] if self.phases else None

    def touch(self) -> None:
        self.last_activity = self._clock.seconds()

    @property
    def connections(self) -> int:
        return sum(1 for session in self.sessions.values() if session.client is not None)

    def model(self) -> dict[str, Any]:
        """
        The REST model: Jupyter's fields first, then egateway's own.
        """
        model: dict[str, Any] = {
            "id": self.id,
            "name": self.spec.name,
            "last_activity": iso(self.last_activity),
            "execution_state": self.execution_state,
            "connections": self.connections,
            "started": self._started_iso(),
            "state": self.state.value,
            "username": self.username,
            "owner": self.owner,
            "acl": self.acl.to_json(),
            "profile": self.profile,
            "launcher": self.launcher_name,
            "restarts": self.restart_count,
            "phases": self._phases_model(),
        }
        if self.pool is not None:
            model["pool"] = self.pool
            model["pooled"] = self.pooled
        if self.process is not None:
            model["placement"] = self.process.placement.to_dict()
            info = self.process.connection_info
            model["encrypted"] = info.encrypted
            if not info.encrypted:
                model["encryption_reason"] = info.cleartext_reason
        if self.reason:
            model["reason"] = self.reason
        return model

    # -- messages ------------------------------------------------------

    def on_iopub(self, message: Message) -> None:
        """
        Track activity from, and fan out, one iopub message.
        """
        self.last_activity = self._clock.seconds()
        try:
            if message.msg_type == "iopub_welcome":
                # ipykernel 7's answer to the gateway's own subscription; no
                # client subscribed, so none should see it.
                return
            if message.msg_type == "status":
                link = self.link
                if link is None or not link.about_control(message):
                    self._track_state(message, link)
                elif link.about_private(message):
                    # The readiness probe's, which may be answered beside
                    # a running cell: for the probe's eyes only.
                    for observer in self.on_iopub_observers:
                        observer(message)
                    return
        except WireError:
            pass
        if self.iopub_ring is not None:
            self.iopub_ring.append(message)
        for session in list(self.sessions.values()):
            session.deliver("iopub", message)
        for observer in self.on_iopub_observers:
            observer(message)

    def on_iopub_ahead(self, message: Message) -> None:
        """
        A large iopub message whose signature is being checked: its
        connected clients may receive all of it but the end meanwhile
        (L{KernelLink.verifies_signatures}).  Nothing else of the kernel
        looks at it before L{on_iopub}.
        """
        for session in list(self.sessions.values()):
            session.deliver_ahead("iopub", message)

    def on_iopub_checked(self, message: Message) -> None:
        """
        The check of a message given to L{on_iopub_ahead} is over (and the
        message went through L{on_iopub} if it passed): a client still
        holding part of it, undelivered, loses it.
        """
        for session in list(self.sessions.values()):
            session.withdraw(message)

    def _track_state(self, message: Message, link: KernelLink | None) -> None:
        """
        Take the kernel's C{execution_state} from a status (not about a
        control request).  A request of the gateway's own keeping the
        kernel busy is no one's business: a readiness probe a cell held up
        is answered right after the cell's idle, which would flicker to
        busy.  Its idle, in the kernel's order, is true; when it ends a
        busy the probe assumed (shell answered after the grace: no cell ran
        after all), the clients told busy are told idle, since Jupyter
        clients ignore the statuses about a C{kernel_info_request}.

        @raise WireError: a malformed content or parent header.
        """
        state = message.content().get("execution_state")
        if not isinstance(state, str):
            return
        own = link is not None and "busy" in (state, self.execution_state) and link.asked_by_gateway(message)
        if own and state == "busy":
            return
        if own and state == "idle":
            self.broadcast_status("idle")
            return
        self.execution_state = state

    def broadcast_status(self, execution_state: str, reason: str = "") -> None:
        """
        Tell every client of a state the kernel cannot report itself
        (restarting, dead, culled), with the reason.
        """
        self.execution_state = execution_state
        message = self.status_message(reason)
        for session in list(self.sessions.values()):
            session.deliver("iopub", message)

    def status_message(self, reason: str = "") -> Message:
        """
        An iopub C{status} with the current C{execution_state}, from the
        gateway (no parent, so Jupyter clients always track it).
        """
        content: dict[str, Any] = {"execution_state": self.execution_state}
        if reason:
            content["reason"] = reason
        return Message.build("status", content, session=gateway_session(self.id))

    def adopt_session(self, session_id: str, entries: list[Any], known: int, user: str = "") -> KernelSession:
        """
        A session first served by another gateway, with what it journaled,
        for C{user}, who reconnects to it.
        """
        session = KernelSession(session_id, self, self.journal_limits, resumable=True, user=user)
        session.preload(entries, known)
        self.sessions[session_id] = session
        session.relink(self.link if self.live else None, claim=True)
        return session

    def check_session_user(self, session_id: str, user: str) -> None:
        """
        Sessions belong to the user who opened them: another user (even one
        the kernel is shared with, or an admin) may neither take one over
        nor read its journal.

        @raise SessionTaken: C{session_id} is another user's session.
        """
        session = self.sessions.get(session_id) if session_id else None
        if session is not None and session.user != user:
            raise SessionTaken(
                f"session {session_id[:64]} belongs to another user; connect with a session_id of your own"
            )

    def attach(
        self,
        client: KernelClient,
        session_id: str | None = None,
        resume_after: int | None = None,
        user: str = "",
    ) -> KernelSession:
        """
        Connect C{client} to its session (resuming it if it exists), or to
        a new anonymous one.

        @param user: who connects (empty: a caller naming no user); a new
            session belongs to them.
        @raise SessionTaken: C{session_id} is another user's session.
        """
        self.check_session_user(session_id or "", user)
        session = self.sessions.get(session_id) if session_id else None
        resumed = session is not None
        if session is None:
            session = KernelSession(
                session_id or f"anonymous-{uuid.uuid4().hex}",
                self,
                self.journal_limits,
                resumable=bool(session_id),
                user=user,
            )
            self.sessions[session.id] = session
            session.relink(self.link if self.live else None)
        replayed = session.connect(client, resume_after)
        if resumed and self.live:
            # A reconnecting Jupyter client shows "Unknown" until it hears a
            # status it tracks (not one answering its kernel_info_request):
            # tell it the state now, after what it missed.  Unnumbered: it
            # is not part of the session's journal.  While the kernel
            # (re)starts, the status that ends the restart does this.
            client.deliver("iopub", self.status_message(), 0)
        if replayed:
            _log.info(
                "kernel {kernel_id} session {session}: replayed {count} messages",
                kernel_id=self.id,
                session=session.id,
                count=replayed,
            )
        self.touch()
        self._changed()
        return session

    def detach(self, session: KernelSession, client: KernelClient) -> None:
        """
        C{client} left C{session}: park a resumable session, drop others.
        """
        session.disconnect(client, self._clock.seconds())
        if not session.resumable and session.client is None:
            self._drop(session)
        self._changed()

    def drop_session(self, session: KernelSession, client: KernelClient) -> None:
        """
        C{client} lost its right to C{session}: close the session, journal
        and all, unless another client has taken it over meanwhile.
        """
        if session.client is client or session.client is None:
            session.client = None
            self._drop(session)

    def hand_over(self, session: KernelSession) -> None:
        """
        Another gateway serves C{session} now: close it here, and its client
        if one is still connected (told it was replaced).
        """
        client = session.client
        self._drop(session)
        if client is not None:
            client.replaced()

    def _drop(self, session: KernelSession) -> None:
        session.close()
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]

    def expire_sessions(self, retention: float, keep: int = 16) -> None:
        """
        Close sessions parked longer than C{retention} seconds, and the
        oldest parked ones beyond C{keep}.
        """
        now = self._clock.seconds()
        parked = sorted(
            (s for s in self.sessions.values() if s.client is None and s.parked_at is not None),
            key=lambda s: s.parked_at,
        )
        for index, session in enumerate(parked):
            if now - session.parked_at >= retention or index < len(parked) - keep:
                self._drop(session)

    def set_link(self, link: KernelLink | None) -> None:
        """
        Replace the ZMQ link (a new launch, or none).  Clients' messages are
        held until L{go_live}: until the kernel has proved its iopub
        subscription live, output they cause could be lost.
        """
        if self.link is not None and self.link is not link:
            self.link.close()
        self.link = link
        self.live = False
        for session in list(self.sessions.values()):
            session.relink(None)

    def go_live(self) -> None:
        """
        The kernel answered C{kernel_info} and iopub delivers: connect every
        client's sockets and send what they sent meanwhile.  Its
        C{execution_state} is what the readiness probe found (see
        L{egateway.kernels.launching.Launching.connect}).
        """
        self.live = True
        for session in list(self.sessions.values()):
            session.relink(self.link)

    def close_clients(self, reason: str) -> None:
        for session in list(self.sessions.values()):
            client = session.client
            session.close()
            if client is not None:
                client.kernel_gone(reason)
        self.sessions.clear()
