"""
One kernel as the gateway holds it: its state, its activity, its launched
process, its ZMQ link, and the clients attached to it.

The L{KernelManager} drives the lifecycle; this class keeps the bookkeeping
and does the message fan-out, which is the hot path: every iopub message is
parsed only as far as its header (and, for C{status}, its content) and then
handed to each attached client as the bytes received.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime, timezone
from typing import Any, Callable, Protocol

from twisted.logger import Logger

from egateway.clusters.interface import IKernelProcess, Phase, PhaseEvent
from egateway.kernels.specs import KernelSpec
from egateway.kernels.state import KernelState, check_transition
from egateway.wire.link import ClientLink, KernelLink
from egateway.wire.protocol import Message, WireError

_log = Logger()

QUEUED_WHILE_RESTARTING = 1000
"""
Client messages held while a kernel restarts, sent once it is back.
"""


def iso(timestamp: float) -> str:
    return (
        datetime.fromtimestamp(timestamp, timezone.utc)
        .isoformat(timespec="microseconds")
        .replace("+00:00", "Z")
    )


class KernelClient(Protocol):
    """
    What a connected client (a WebSocket) offers the kernel.
    """

    def deliver(self, channel: str, message: Message) -> None:
        """
        A message for this client.
        """

    def kernel_gone(self, reason: str) -> None:
        """
        The kernel was shut down; the client should close.
        """


class Attachment:
    """
    One client's attachment to a kernel: its ZMQ sockets and its queue of
    messages held while the kernel restarts.
    """

    def __init__(self, kernel: "Kernel", client: KernelClient) -> None:
        self.kernel = kernel
        self.client = client
        self._link: ClientLink | None = None
        self._held: deque[tuple[str, Message]] = deque(maxlen=QUEUED_WHILE_RESTARTING)
        self.relink(kernel.link if kernel.live else None)

    def relink(self, link: KernelLink | None) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None
        if link is not None:
            self._link = link.client(self.client.deliver)
            held, self._held = self._held, deque(maxlen=QUEUED_WHILE_RESTARTING)
            for channel, message in held:
                self._link.send(channel, message)

    def send(self, channel: str, message: Message) -> None:
        """
        Forward a client's message to the kernel, or hold it while the
        kernel restarts.
        """
        self.kernel.touch()
        if self._link is not None:
            self._link.send(channel, message)
        else:
            self._held.append((channel, message))

    def detach(self) -> None:
        self.relink(None)
        self.kernel.detach(self)


class Kernel:
    """
    @ivar execution_state: the kernel's last reported state (C{starting},
        C{idle}, C{busy}), or the gateway's view (C{restarting}, C{dead}).
    """

    def __init__(
        self,
        kernel_id: str,
        spec: KernelSpec,
        username: str,
        env: dict[str, str],
        clock: Any,
        launcher_name: str,
    ) -> None:
        self.id = kernel_id
        self.spec = spec
        self.username = username
        self.env = env
        self.launcher_name = launcher_name
        self._clock = clock
        self.state = KernelState.LAUNCHING
        self.execution_state = "starting"
        self.started = clock.seconds()
        self.last_activity = self.started
        self.reason = ""
        self.restart_count = 0
        self.phases: list[PhaseEvent] = []
        self.process: IKernelProcess | None = None
        self.link: KernelLink | None = None
        self.live = False
        self.attachments: set[Attachment] = set()
        self.on_iopub_observers: list[Callable[[Message], None]] = []

    # -- bookkeeping ---------------------------------------------------

    def transition(self, new: KernelState, why: str = "") -> None:
        check_transition(self.state, new)
        _log.info(
            "kernel {kernel_id}: {old} -> {new}{why}",
            kernel_id=self.id,
            old=self.state.value,
            new=new.value,
            why=f" ({why})" if why else "",
        )
        self.state = new

    def report(self, phase: Phase, detail: str = "") -> None:
        event = PhaseEvent(phase, self._clock.seconds(), detail)
        self.phases.append(event)
        _log.info(
            "kernel {kernel_id} launch phase: {phase}",
            kernel_id=self.id,
            phase=event.describe(),
        )

    @property
    def last_phase(self) -> PhaseEvent | None:
        return self.phases[-1] if self.phases else None

    def touch(self) -> None:
        self.last_activity = self._clock.seconds()

    @property
    def connections(self) -> int:
        return len(self.attachments)

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
            "started": iso(self.started),
            "state": self.state.value,
            "username": self.username,
            "launcher": self.launcher_name,
            "restarts": self.restart_count,
            "phases": [event.to_dict(iso) for event in self.phases[-20:]],
        }
        if self.process is not None:
            model["placement"] = self.process.placement.to_dict()
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
                state = message.content().get("execution_state")
                if isinstance(state, str):
                    self.execution_state = state
        except WireError:
            pass
        for attachment in list(self.attachments):
            attachment.client.deliver("iopub", message)
        for observer in self.on_iopub_observers:
            observer(message)

    def broadcast_status(self, execution_state: str, reason: str = "") -> None:
        """
        Tell every client of a state the kernel cannot report itself
        (restarting, dead, culled), with the reason.
        """
        self.execution_state = execution_state
        content: dict[str, Any] = {"execution_state": execution_state}
        if reason:
            content["reason"] = reason
        message = Message.build("status", content, session=f"egateway-{self.id}")
        for attachment in list(self.attachments):
            attachment.client.deliver("iopub", message)

    def attach(self, client: KernelClient) -> Attachment:
        attachment = Attachment(self, client)
        self.attachments.add(attachment)
        self.touch()
        return attachment

    def detach(self, attachment: Attachment) -> None:
        self.attachments.discard(attachment)

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
        for attachment in list(self.attachments):
            attachment.relink(None)

    def go_live(self) -> None:
        """
        The kernel answered C{kernel_info} and iopub delivers: connect every
        client's sockets and send what they sent meanwhile.
        """
        self.live = True
        if self.execution_state in ("busy", "starting"):
            # The last status was about our own readiness probe.
            self.execution_state = "idle"
        for attachment in list(self.attachments):
            attachment.relink(self.link)

    def close_clients(self, reason: str) -> None:
        for attachment in list(self.attachments):
            attachment.relink(None)
            attachment.client.kernel_gone(reason)
        self.attachments.clear()
