"""
Launching a kernel's process and probing it until it is ready.

Separate from the manager because it is the one part that talks to
launchers and to the kernel's channels while a kernel starts: the launch
with its retries, the readiness probe (C{kernel_info_request} until iopub
has caught up), the encryption check, and the errors that name the phase a
launch stopped in.  It does not register kernels, admit them or decide
on restarts: a new, restarted or restored kernel all go through the same
L{Launching.launch} or L{Launching.connect}, and only a ready process is
handed to the restart policy to watch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from egateway.clusters.interface import ExitStatus, IKernelProcess, LaunchRequest, Phase
from egateway.config import KernelsConfig
from egateway.errors import BadRequest, GatewayError
from egateway.kernels.kernel import Kernel
from egateway.observe import first
from egateway.wire import descriptors
from egateway.wire.channels import ConnectionInfo
from egateway.wire.link import KernelLink
from egateway.wire.protocol import Message

if TYPE_CHECKING:
    from egateway.kernels.interfaces import IKernelTable

_log = Logger()

READY_PROBE_INTERVAL = 1.0
"""
Seconds before the first unanswered C{kernel_info_request} is followed by
another while a kernel starts; each later one waits twice as long as the
one before, up to L{READY_PROBE_MAX}.
"""

READY_PROBE_MAX = 8.0
"""
The longest wait between two readiness probes of one kernel.
"""

SHELL_GRACE = 0.25
"""
Seconds a kernel that answered the readiness probe on control is given to
answer it on shell too, before it is taken for busy with a cell: an idle
kernel answers both within milliseconds, and a client told C{busy} by
mistake would show it until the kernel's next status it tracks.
"""

RETRYABLE_ATTEMPTS = 3

TIMEOUTS = (TimeoutError, defer.TimeoutError)
"""
C{Deferred.addTimeout} raises Twisted's own C{TimeoutError}, not the builtin.
"""


class LaunchFailed(GatewayError):
    status = 500
    failure = "launcher"
    """
    The cause a launch failure is counted under (the metrics' C{reason}).
    """


class LaunchTimedOut(LaunchFailed):
    status = 504
    failure = "timeout"


class KernelExitedEarly(LaunchFailed):
    failure = "exited"


class OutOfDescriptors(LaunchFailed):
    """
    The gateway has too few file descriptors left to link to another
    kernel (see L{egateway.wire.descriptors}).
    """

    status = 503
    failure = "descriptors"


def launch_timeout(env: Mapping[str, str], settings: KernelsConfig) -> float:
    """
    The launch timeout for a kernel with environment C{env}: its
    C{KERNEL_LAUNCH_TIMEOUT} (a client's, as Enterprise Gateway honours
    it) cut to C{max_launch_timeout}, else C{launch_timeout}.

    @raise BadRequest: C{KERNEL_LAUNCH_TIMEOUT} is not a positive number.
    """
    text = env.get("KERNEL_LAUNCH_TIMEOUT")
    if text is None or text == "":
        return settings.launch_timeout
    try:
        asked = float(text)
    except ValueError:
        asked = float("nan")
    if not asked > 0 or asked == float("inf"):
        raise BadRequest(f"KERNEL_LAUNCH_TIMEOUT must be a positive number of seconds, not {text[:40]!r}")
    return min(asked, settings.max_launch_timeout)


def last_phase(kernel: Kernel) -> str:
    """
    The last launch phase C{kernel} reached, for an error message.
    """
    last = kernel.last_phase
    return last.describe() if last else "none"


def timeout_message(kernel: Kernel, timeout: float) -> str:
    """
    Why a launch timed out, named by what it was waiting for.
    """
    last = kernel.last_phase
    waiting_for = {
        Phase.QUEUED: "the launcher to start the kernel",
        Phase.SUBMITTED: "the kernel to be placed",
        Phase.PLACED: "connection info",
        Phase.CONNECTION_INFO: "the kernel to answer kernel_info",
        Phase.CONNECTED: "the kernel to answer kernel_info",
    }.get(last.phase if last else Phase.QUEUED, "the kernel")
    return f"timed out after {timeout:g} s waiting for {waiting_for}; last phase: {last_phase(kernel)}"


class Launching:
    """
    Starts kernels' processes and links to them.
    """

    def __init__(self, *, manager: IKernelTable, clock: IReactorTime) -> None:
        """
        @param manager: whose settings, launchers and channel factory apply
            (read at each launch: they may be replaced), and whose restart
            policy watches each process that became ready.
        """
        self._manager = manager
        self._clock = clock

    async def launch(self, kernel: Kernel) -> None:
        """
        Launch (or relaunch) C{kernel}'s process and wait until it is ready.
        On any failure everything started is removed before raising.

        @raise LaunchTimedOut: not ready within the launch timeout.
        @raise KernelExitedEarly: the kernel exited before it was ready
            (after the retries a retryable exit allows).
        @raise OutOfDescriptors: the gateway could not link to another
            kernel; nothing was started.
        @raise LaunchFailed: the launcher refused or failed.
        """
        problem = descriptors.shortage()
        if problem is not None:
            raise OutOfDescriptors(problem)
        launcher = self._manager.launchers.get(kernel.launcher_name)
        timeout = launch_timeout(kernel.env, self._manager.settings)
        for attempt in range(1, RETRYABLE_ATTEMPTS + 1):
            deadline = self._clock.seconds() + timeout
            request = LaunchRequest(
                kernel_id=kernel.id,
                spec=kernel.spec,
                env=kernel.env,
                config=kernel.launcher_config,
                username=kernel.username,
                report=kernel.report,
                timeout=timeout,
            )
            launching = launcher.launch(request)
            launching.addTimeout(timeout, self._clock)
            try:
                process: IKernelProcess = await launching
            except TIMEOUTS:
                raise LaunchTimedOut(timeout_message(kernel, timeout)) from None
            except GatewayError as e:
                raise LaunchFailed(f"{e}; last phase: {last_phase(kernel)}", status=e.status) from None
            try:
                status = await self.connect(kernel, process, deadline, timeout)
            except BaseException:
                await self.discard(kernel, process)
                raise
            if status is None:
                process.ready()
                kernel.report(Phase.READY)
                kernel.go_live()
                self._manager.restarts.watch(kernel, process)
                return
            await self.discard(kernel, process)
            if status.retryable and attempt < RETRYABLE_ATTEMPTS:
                _log.warn(
                    "kernel {kernel_id}: {status}; launching again",
                    kernel_id=kernel.id,
                    status=status.describe(),
                )
                continue
            raise KernelExitedEarly(
                f"the kernel {status.describe()} before answering kernel_info; last phase: {last_phase(kernel)}"
            )

    async def connect(
        self,
        kernel: Kernel,
        process: IKernelProcess,
        deadline: float,
        timeout: float | None = None,
        may_be_busy: bool = False,
    ) -> ExitStatus | None:
        """
        Link to the kernel and wait for it to be ready; its
        C{execution_state} is then what the probe found (C{idle}, or
        C{busy} when only control answered).

        @param may_be_busy: the kernel ran before this gateway linked to it
            (restored, or attached on demand) and may be in the middle of a
            cell: probe on control too (see L{_wait_ready}).
        @return: C{None} when ready, or how the kernel ended if it exited
            first.
        @raise LaunchTimedOut: at the deadline.
        @raise LaunchFailed: 403, its channels are not encrypted and
            C{kernel_encryption} is required.
        """
        self._check_encryption(kernel, process.connection_info)
        kernel.process = process
        link = KernelLink(
            process.connection_info,
            self._manager.channels,
            self._clock,
            kernel.on_iopub,
            kernel.id,
            on_iopub_ahead=kernel.on_iopub_ahead,
            on_iopub_checked=kernel.on_iopub_checked,
        )
        kernel.set_link(link)
        kernel.report(Phase.CONNECTED, process.connection_info.ip)
        ready = Deferred.fromCoroutine(self._wait_ready(kernel, link, deadline, may_be_busy))
        exited = process.when_exited()
        try:
            index, result = await first([ready, exited])
        except TIMEOUTS:
            raise LaunchTimedOut(timeout_message(kernel, timeout or self._manager.settings.launch_timeout)) from None
        if index == 0:
            # Ready: the probes' sockets are idle from now on.  A shell
            # probe a running cell holds up is answered after it, to no
            # one; its iopub statuses still come, after the cell's idle.
            link.release("shell")
            link.release("control")
            return None
        return result

    def _check_encryption(self, kernel: Kernel, info: ConnectionInfo) -> None:
        """
        A kernel reached over TCP without CurveZMQ: refused when
        C{kernel_encryption} is required (before any socket is opened, with
        the reason its launcher gave), otherwise a warning, since anyone on
        its network can read its traffic.

        @raise LaunchFailed: 403, encryption is required.
        """
        if info.encrypted or info.transport != "tcp":
            return
        reason = info.cleartext_reason
        if self._manager.settings.kernel_encryption == "required":
            raise LaunchFailed(
                f"kernel_encryption is required, but kernel {kernel.id}'s channels are not encrypted: {reason}",
                status=403,
            )
        _log.warn(
            "kernel {kernel_id}: channels not encrypted (messages signed only, readable on its network): "
            "{reason}",
            kernel_id=kernel.id,
            reason=reason,
        )

    async def _wait_ready(self, kernel: Kernel, link: KernelLink, deadline: float, may_be_busy: bool) -> None:
        """
        Send C{kernel_info_request} until a reply arrives and iopub has
        delivered the status the kernel published for one of them, so no
        output from the kernel can be lost to a subscription that is not
        live yet, and what it published before (its own C{starting}) has
        been relayed: the C{idle} that ends a restart must come after it
        (JupyterLab shows the last status it tracks).  Any iopub message
        would not do: ipykernel 7 welcomes a subscriber on iopub at once,
        and the reply, on shell, can overtake what iopub still carries.

        A probe left unanswered is not given up: it stays pending until
        the deadline, and a reply to any probe counts.  The next probe
        goes out after L{READY_PROBE_INTERVAL}, then twice as long each
        time up to L{READY_PROBE_MAX}.  A kernel that answers slowly (a
        gateway restoring 1,000 kernels at once, a loaded host) is thus
        ready at its first reply; when each probe was dropped after one
        second, a kernel answering in more than a second never matched a
        reply and was sent a probe a second until the deadline, which
        loaded it (and the gateway) further: 4,900 probes for 1,000
        restored kernels (bench/scale.py).

        C{may_be_busy}: a kernel that ran before this gateway linked to it
        may be running a cell, and answers shell only after it (minutes
        for a training cell, or never within the deadline: it was then
        declared dead).  Each probe then goes on control too, privately (see
        L{KernelLink.about_control}): ipykernel 6 and newer answer control
        from a thread of their own during a cell, with a reply signed with
        the kernel's key and statuses on iopub, which prove the kernel and
        its iopub as a shell reply does.  An idle kernel answers shell a
        moment later: so a kernel that answered control only is ready after
        L{SHELL_GRACE} more without a shell reply, and C{busy} (unless its
        iopub has shown a shell probe's C{idle} meanwhile); the cell's own
        C{idle}, then the shell probe's, follow.
        Kernels that handle control on their one thread (IRkernel, which
        also ignores C{kernel_info_request} there) answer shell first
        whenever they answer at all, as before.  The heartbeat would not
        do: it echoes anything, signs nothing, so it cannot tell the kernel
        from another process given its port since.
        """
        answered: set[str] = set()
        replied: set[str] = set()
        on_shell: set[str] = set()  # the replies that came on shell
        shell_free = False  # iopub said a shell probe's idle: no cell runs
        news = False  # a reply came since the last look
        failed: BaseException | None = None
        wake: Deferred[None] | None = None
        probes: list[Deferred[Message]] = []

        def rouse() -> None:
            if wake is not None and not wake.called:
                wake.callback(None)

        def observe(message: Message) -> None:
            nonlocal shell_free
            if message.msg_type == "status":
                parent = message.parent_header()
                answered.add(str(parent.get("msg_id")))
                if (
                    parent.get("session") == link.session
                    and message.content().get("execution_state") == "idle"
                    and not link.about_control(message)
                ):
                    shell_free = True
                rouse()

        def on_reply(reply: Message, channel: str) -> None:
            nonlocal news
            msg_id = str(reply.parent_header().get("msg_id"))
            replied.add(msg_id)
            if channel == "shell":
                on_shell.add(msg_id)
            news = True
            rouse()

        def on_error(failure: Any) -> None:
            nonlocal failed
            if not failure.check(*TIMEOUTS, defer.CancelledError):
                failed = failed or failure.value  # the link closed under it
                rouse()

        channels = ("shell", "control") if may_be_busy else ("shell",)
        kernel.on_iopub_observers.append(observe)
        interval = READY_PROBE_INTERVAL
        next_probe = self._clock.seconds()
        proven_at: float | None = None  # when control alone proved it
        try:
            while not on_shell & answered:
                if failed is not None:
                    raise failed
                now = self._clock.seconds()
                if replied & answered:
                    if proven_at is None:
                        proven_at = now
                    if shell_free or now >= min(proven_at + SHELL_GRACE, deadline):
                        break
                elif now >= deadline:
                    raise TimeoutError()
                if news and proven_at is None:
                    # Answered, but iopub has not delivered its status yet
                    # (the subscription may not be live): look again in a
                    # moment, and ask again then.
                    news = False
                    await deferLater(self._clock, min(0.05, deadline - now))
                    next_probe = self._clock.seconds()
                    continue
                if now >= next_probe and proven_at is None:
                    for channel in channels:
                        probe = link.request(
                            channel, "kernel_info_request", {}, deadline - now, private=channel == "control"
                        )
                        probes.append(probe)
                        probe.addCallback(on_reply, channel)
                        probe.addErrback(on_error)
                    next_probe = now + interval
                    interval = min(interval * 2, READY_PROBE_MAX)
                    continue
                until = next_probe if proven_at is None else proven_at + SHELL_GRACE
                wake = Deferred()
                timer = self._clock.callLater(max(0.0, min(until, deadline) - now), rouse)
                try:
                    await wake
                finally:
                    wake = None
                    if timer.active():
                        timer.cancel()
        finally:
            kernel.on_iopub_observers.remove(observe)
            for probe in probes:
                if not probe.called:
                    probe.cancel()
        busy = not (on_shell & answered or shell_free)
        kernel.execution_state = "busy" if busy else "idle"
        if busy:
            _log.info(
                "kernel {kernel_id}: answered on control while busy on shell (a cell runs); ready",
                kernel_id=kernel.id,
            )

    async def discard(self, kernel: Kernel, process: IKernelProcess) -> None:
        """
        Remove a launched process that will not be used: unlink it,
        terminate it and clean up after it, logging (not raising) what
        fails.
        """
        if kernel.link is not None:
            kernel.set_link(None)
        try:
            await process.terminate(self._manager.settings.terminate_wait)
        except Exception:
            _log.failure("kernel {kernel_id}: terminating failed", kernel_id=kernel.id)
        try:
            await process.cleanup()
        except Exception:
            _log.failure("kernel {kernel_id}: cleanup failed", kernel_id=kernel.id)
