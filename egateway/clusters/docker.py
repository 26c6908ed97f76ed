"""
Kernels as Docker containers, one per kernel, through the Docker Engine
API on its UNIX socket (L{egateway.clusters.docker_api}; nothing blocks
the reactor).

A launch (the sequence is L{RemoteLauncher}'s):
  1. decides the container (L{egateway.clusters.docker_plan}: image,
     network, CPUs, memory, mounts and user from the kernelspec and
     profile, client values only inside their allow-lists) and checks that
     the engine has the image and the network, so a missing image fails at
     once, naming it (images are never pulled: the operator provides them);
  2. creates the container, labelled with the kernel id, the gateway id,
     the user and the kernelspec, named C{docker_name_prefix} + kernel id,
     its environment carrying Enterprise Gateway's container contract
     (C{KERNEL_ID}, C{RESPONSE_ADDRESS}, C{PUBLIC_KEY}, C{PORT_RANGE},
     C{KERNEL_LANGUAGE}, ... and the launch token), and starts it; the
     image's entry point (C{launchers/bootstrap/bootstrap-kernel.sh})
     starts the kernel-side launcher, which reports the connection info;
  3. connects to the container's address on its network.
A container that exits before the kernel reports fails the launch with its
exit code and its last log lines; a failed or cancelled launch removes it.

The kernel's death comes from the engine's event stream, one for all
kernels (L{egateway.clusters.docker_events}), not from polling.  A
container killed or removed outside the gateway ends its kernel with its
exit code as a decision (not restarted); one that exits by itself or is
killed by the OOM killer is a crash.  Interrupts go through the kernel's
comm port, else the engine's kill with SIGINT (the entry point forwards it
to the kernel's process group).  Shutdown stops the container (SIGTERM,
then SIGKILL after the grace period) and removes it.

Restore reattaches to the container by id after checking its kernel
label; the inventory lists containers labelled with this gateway's id, and
the reconciler can remove them (they cannot be adopted: their connection
info lives only in the store).
"""

from __future__ import annotations

import signal as signals
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from egateway.clusters.docker_api import DockerAPIError, DockerEngine, label_filter, socket_path
from egateway.clusters.docker_events import KERNEL_LABEL, EngineEvents
from egateway.clusters.docker_plan import (
    GATEWAY_LABEL,
    SPEC_LABEL,
    ContainerPlan,
    container_body,
    container_env,
    container_plan,
    kernel_labels,
)
from egateway.clusters.interface import (
    ExitStatus,
    Found,
    ILauncher,
    ILauncherInventory,
    IKernelProcess,
    LaunchError,
    LaunchRequest,
    LauncherContext,
    Liveness,
    Phase,
    Placement,
)
from egateway.clusters.remote import (
    Placed,
    RemoteKernelProcess,
    RemoteLaunch,
    RemoteLauncher,
    as_int,
)
from egateway.names import KERNEL_ID_PATTERN
from egateway.observe import OneShotObserver
from egateway.wire.channels import ConnectionInfo

_log = Logger()

LOG_LINES = 10
"""
How many of a failed container's last log lines an error quotes.
"""

STOP_SLACK = 30.0
"""
Seconds a stop may take beyond its grace period before the gateway gives
up waiting for the engine.
"""


def engine_for(context: LauncherContext) -> tuple[DockerEngine, EngineEvents]:
    """
    The engine client and its event stream, shared by the docker and
    docker-swarm launchers of one gateway.

    @raise LaunchError: C{docker_host} is not a UNIX socket address.
    """
    shared = context.services.get("docker")
    if shared is None:
        try:
            path = socket_path(context.section.docker_host)
        except ValueError as e:
            raise LaunchError(f"docker_host (EG_DOCKER_HOST): {e}") from None
        engine = DockerEngine(context.reactor, path)
        shared = (engine, EngineEvents(context.reactor, engine))
        context.services["docker"] = shared
    return shared


class ContainerWatch:
    """
    What the event stream told about one container: how it ended and
    whether the gateway asked for it.
    """

    def __init__(self, container_id: str, name: str) -> None:
        self.container_id = container_id
        self.name = name
        self.oom = False
        self.outside_kill: int | None = None
        self.gateway_stopping = False
        self.status: ExitStatus | None = None
        self._ended: OneShotObserver[ExitStatus] = OneShotObserver()
        self.unwatch: Any = lambda: None

    def on_event(self, action: str, attributes: dict) -> None:
        if action == "oom":
            self.oom = True
        elif action == "kill":
            signum = as_int(attributes.get("signal"))
            if signum in (signals.SIGTERM, signals.SIGKILL) and not self.gateway_stopping:
                self.outside_kill = signum
        elif action == "die":
            self.end(as_int(attributes.get("exitCode")))
        elif action == "destroy" and self.status is None:
            self._fire(ExitStatus(reason=f"container {self.name} was removed outside the gateway", decision=True))

    def end(self, code: int) -> None:
        if self.status is not None:
            return
        how = f"container {self.name} exited with code {code}"
        if self.oom:
            how += " (killed by the OOM killer: raise its memory limit)"
        elif self.outside_kill is not None:
            how = (
                f"container {self.name} was stopped outside the gateway (signal {self.outside_kill}) "
                f"and exited with code {code}"
            )
        self._fire(ExitStatus(code=code, reason=how, decision=self.outside_kill is not None and not self.oom))

    def _fire(self, status: ExitStatus) -> None:
        self.status = status
        self._ended.fire(status)

    def when_ended(self) -> Deferred[ExitStatus]:
        return self._ended.when_fired()


class DockerKernelProcess(RemoteKernelProcess):
    """
    A kernel running in container C{watch.container_id}.
    """

    def __init__(self, *, launcher: "DockerLauncher", watch: ContainerWatch, **kw: Any) -> None:
        super().__init__(**kw)
        self._launcher = launcher
        self.watch = watch
        watch.when_ended().addCallback(self._ended)

    @property
    def container_id(self) -> str:
        return self.watch.container_id

    async def _check_alive(self) -> Liveness:
        if self.watch.status is not None:
            return Liveness(False, self.watch.status.describe(), decision=self.watch.status.decision)
        if self._launcher.events.connected:
            # The stream would have said.
            return Liveness(True)
        return await self._launcher.container_liveness(self.watch)

    async def _signal_directly(self, signum: int) -> None:
        if signum in (signals.SIGTERM, signals.SIGKILL):
            self.watch.gateway_stopping = True
        await self._launcher.kill(self.container_id, signum)

    async def _terminate(self, grace: float) -> ExitStatus:
        if self._exit is None:
            self.watch.gateway_stopping = True
            await self._launcher.stop_container(self.watch, grace)
        return self._exit or self.watch.status or ExitStatus(reason="could not be confirmed stopped")

    async def _release(self) -> None:
        self.watch.gateway_stopping = True
        self.watch.unwatch()
        await self._launcher.remove_quietly(self.container_id)

    def snapshot(self) -> dict:
        return {
            **super().snapshot(),
            "launcher": self._launcher.name,
            "container_id": self.container_id,
            "container_name": self.watch.name,
        }


@dataclass
class _ContainerLaunch:
    """
    What a container launch's steps keep.
    """

    plan: ContainerPlan
    name: str
    watch: ContainerWatch | None = None
    creating: Deferred[Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    async def created_id(self, key: str) -> str | None:
        """
        The id of what the launch made (a container's C{Id}, a service's
        C{ID}), waiting for a creation still under way; C{None} when nothing
        was made.  Stops following the container's events: the launch is
        being abandoned.
        """
        made: str | None = None
        if self.creating is not None:
            try:
                made = str((await self.creating)[key])
            except Exception:
                # The creation failed or was cancelled with the launch:
                # nothing to remove.
                made = None
        if self.watch is not None:
            self.watch.gateway_stopping = True
            self.watch.unwatch()
        return made


@implementer(ILauncher, ILauncherInventory)
class DockerLauncher(RemoteLauncher):
    """
    Starts kernels as Docker containers; see the module docstring.
    """

    name = "docker"

    def __init__(self, context: LauncherContext) -> None:
        super().__init__(context)
        self._settings = context.section
        self.engine, self.events = engine_for(context)

    @property
    def _poll_interval(self) -> float:  # type: ignore[override]
        return self._settings.docker_poll_interval

    def object_name(self, kernel_id: str) -> str:
        return f"{self._settings.docker_name_prefix}{kernel_id}"

    # -- engine operations shared with the kernels ----------------------

    async def kill(self, container_id: str, signum: int) -> None:
        """
        @raise LaunchError: the engine refused (not for a container gone).
        """
        if not container_id:
            raise LaunchError("the kernel's container is not known yet")
        try:
            await self.engine.call(
                "POST", f"/containers/{quote(container_id)}/kill", query={"signal": int(signum)}, what="kill"
            )
        except DockerAPIError as e:
            if e.not_found or e.status == 409:  # gone, or not running
                return
            raise LaunchError(f"cannot signal container {container_id[:12]}: {e}") from None

    async def stop_container(self, watch: ContainerWatch, grace: float) -> None:
        """
        Stop the container (the engine sends SIGTERM, then SIGKILL after
        C{grace} seconds) and wait for its death to arrive.
        """
        try:
            await self.engine.call(
                "POST",
                f"/containers/{quote(watch.container_id)}/stop",
                query={"t": max(0, int(grace))},
                timeout=grace + STOP_SLACK,
                what="stop",
            )
        except DockerAPIError as e:
            if not e.not_found and e.status != 304:
                _log.warn("container {name}: stop failed: {error}", name=watch.name, error=str(e))
        if watch.status is None:
            liveness = await self.container_liveness(watch)
            if not liveness.alive and watch.status is None:
                watch._fire(ExitStatus(reason=liveness.reason))

    async def inspect(self, container_id: str) -> dict[str, Any] | None:
        """
        The container's inspection, or C{None} when the engine has none.
        """
        try:
            return await self.engine.call("GET", f"/containers/{quote(container_id)}/json", what="inspect")
        except DockerAPIError as e:
            if e.not_found:
                return None
            raise

    async def container_liveness(self, watch: ContainerWatch) -> Liveness:
        """
        Ask the engine (when the event stream is down).
        """
        found = await self.inspect(watch.container_id)
        if found is None:
            return Liveness(False, f"container {watch.name} no longer exists", decision=not watch.gateway_stopping)
        state = found.get("State") or {}
        if state.get("Running"):
            return Liveness(True)
        watch.end(as_int(state.get("ExitCode")))
        assert watch.status is not None
        return Liveness(False, watch.status.describe(), decision=watch.status.decision)

    async def remove_quietly(self, container_id: str) -> None:
        try:
            await self.engine.call(
                "DELETE", f"/containers/{quote(container_id)}", query={"force": 1, "v": 1}, what="remove"
            )
        except DockerAPIError as e:
            if not e.not_found:
                _log.warn(
                    "cannot remove container {container}: {error}; remove it by hand (docker rm -f {container})",
                    container=container_id[:12],
                    error=str(e),
                )

    async def failure_story(self, container_id: str, name: str, code: int | None) -> str:
        """
        C{"container x exited with code 3; its last log lines: ..."}.
        """
        if code is None:
            found = await self.inspect(container_id)
            code = as_int(((found or {}).get("State") or {}).get("ExitCode")) if found else None
        tail = await self.engine.logs(container_id, LOG_LINES)
        how = f"container {name} exited with code {code}" if code is not None else f"container {name} is gone"
        return how + (f"; its last log lines: {' | '.join(tail.splitlines()[-LOG_LINES:])}" if tail else "")

    # -- the launch's steps ----------------------------------------------

    async def _launch(self, request: LaunchRequest) -> IKernelProcess:
        try:
            return await super()._launch(request)
        except DockerAPIError as e:
            # A step's query the engine did not answer (it went away mid-launch).
            raise LaunchError(f"the Docker engine at {self.engine.path} failed during the launch: {e}") from None

    async def _prepare(self, request: LaunchRequest) -> _ContainerLaunch:
        if not KERNEL_ID_PATTERN.match(request.kernel_id):
            raise LaunchError(f"kernel id {request.kernel_id[:80]!r} cannot name a container", status=400)
        plan = container_plan(request.env, request.config, self._settings)
        await self._check_engine_has(plan)
        return _ContainerLaunch(plan, self.object_name(request.kernel_id))

    async def _check_engine_has(self, plan: ContainerPlan) -> None:
        """
        @raise LaunchError: the image or the network is missing (named), or
            the engine cannot be reached.
        """
        for kind, path in (("image", f"/images/{quote(plan.image, safe='/:@')}/json"),
                           ("network", f"/networks/{quote(plan.network)}")):
            try:
                await self.engine.call("GET", path, what=kind)
            except DockerAPIError as e:
                name = plan.image if kind == "image" else plan.network
                if e.not_found:
                    hint = (
                        "load or build it on the engine (kernel images are never pulled)"
                        if kind == "image"
                        else "create it, or name another in the kernelspec's network (or docker_network)"
                    )
                    raise LaunchError(
                        f"{kind} {name!r} is not on the Docker engine at {self.engine.path}: {hint}",
                        status=400 if (kind == "image" and "KERNEL_IMAGE" in plan.from_client) else 500,
                    ) from None
                raise LaunchError(f"cannot check {kind} {name!r}: {e}") from None

    def _contract(self, launch: RemoteLaunch) -> dict[str, str]:
        """
        Enterprise Gateway's container environment contract.
        """
        request = launch.request
        return {
            "KERNEL_ID": request.kernel_id,
            "KERNEL_LANGUAGE": str(request.env.get("KERNEL_LANGUAGE") or getattr(request.spec, "language", "")
                                   or "python").lower(),
            "KERNEL_USERNAME": request.username,
            "RESPONSE_ADDRESS": launch.listener.response_address,
            "PUBLIC_KEY": launch.listener.public_key,
            "PORT_RANGE": str(request.config.get("port_range") or self._kernels.port_range),
            "KERNEL_SPARK_CONTEXT_INIT_MODE": str(request.env.get("KERNEL_SPARK_CONTEXT_INIT_MODE") or "none"),
            "EG_LAUNCH_TOKEN": launch.pending.token,
            "EG_DOCKER_NETWORK": launch.state.plan.network,
        }

    def _labels(self, request: LaunchRequest) -> dict[str, str]:
        return kernel_labels(request.kernel_id, self._gateway_id, request.username, getattr(request.spec, "name", ""))

    async def _submit(self, launch: RemoteLaunch) -> None:
        request, state = launch.request, launch.state
        plan: ContainerPlan = state.plan
        body = container_body(plan, state.name, container_env(request.env, self._contract(launch)),
                              self._labels(request))
        await self.events.started()
        state.creating = Deferred.fromCoroutine(
            self.engine.call("POST", "/containers/create", query={"name": state.name}, body=body, what="create")
        )
        try:
            created = await state.creating
        except DockerAPIError as e:
            raise LaunchError(f"the Docker engine refused kernel container {state.name}: {e.message}") from None
        watch = ContainerWatch(str(created["Id"]), state.name)
        watch.unwatch = self.events.watch(watch.container_id, watch.on_event)
        state.watch = watch
        try:
            await self.engine.call("POST", f"/containers/{watch.container_id}/start", what="start")
        except DockerAPIError as e:
            raise LaunchError(f"kernel container {state.name} did not start: {e.message}") from None
        _log.info(
            "kernel {kernel_id}: started container {name} ({container}; {plan})",
            kernel_id=request.kernel_id,
            name=state.name,
            container=watch.container_id[:12],
            plan=plan.describe(),
        )
        request.report(Phase.SUBMITTED, f"container {state.name} ({watch.container_id[:12]}, {plan.image})")

    async def _await_placement(self, launch: RemoteLaunch) -> Placed:
        state = launch.state
        watch: ContainerWatch = state.watch
        found = await self.inspect(watch.container_id)
        running = ((found or {}).get("State") or {}).get("Running")
        if not running:
            raise LaunchError(await self._ended_story(watch) + " before the kernel sent its connection info")
        networks = ((found or {}).get("NetworkSettings") or {}).get("Networks") or {}
        address = str((networks.get(state.plan.network) or {}).get("IPAddress") or "")
        if not address:
            raise LaunchError(
                f"container {state.name} has no address on network {state.plan.network!r} "
                "(the gateway connects to kernels at their container's address)"
            )
        state.extra["pid"] = as_int(((found or {}).get("State") or {}).get("Pid"))
        return Placed(state.name, address, f"container {state.name} at {address} on {state.plan.network}")

    async def _ended_story(self, watch: ContainerWatch) -> str:
        code = watch.status.code if watch.status is not None else None
        return await self.failure_story(watch.container_id, watch.name, code)

    async def _launch_ended(self, launch: RemoteLaunch) -> str | None:
        watch: ContainerWatch = launch.state.watch
        if watch.status is None and not self.events.connected:
            await self.container_liveness(watch)
        if watch.status is None:
            return None
        return await self._ended_story(watch) + " before the kernel sent its connection info"

    def _kernel(
        self, launch: RemoteLaunch, placed: Placed, info: ConnectionInfo, payload: Mapping[str, Any]
    ) -> IKernelProcess:
        state = launch.state
        return DockerKernelProcess(
            launcher=self,
            watch=state.watch,
            placement=Placement(
                host=placed.host,
                ip=placed.address,
                # The container's init on this host (the launcher's own
                # pid is in the container's pid namespace).
                pid=state.extra.get("pid", 0),
                extra={"container_id": state.watch.container_id, "image": state.plan.image},
            ),
            **self._kernel_arguments(launch, info, payload),
        )

    async def _abandon(self, launch: RemoteLaunch) -> None:
        state = launch.state
        container_id = state.watch.container_id if state.watch is not None else None
        created = await state.created_id("Id")
        container_id = container_id or created
        if container_id is not None:
            _log.info(
                "kernel {kernel_id}: removing container {name} of a failed launch",
                kernel_id=launch.request.kernel_id,
                name=state.name,
            )
            await self.remove_quietly(container_id)

    # -- restoring ----------------------------------------------------------

    async def _restore(self, kernel_id: str, snapshot: Mapping[str, Any]) -> IKernelProcess:
        arguments = self._restored_arguments(kernel_id, snapshot)
        [container_id] = self._snapshot_fields(snapshot, "container_id")
        name = str(snapshot.get("container_name") or self.object_name(kernel_id))
        try:
            await self.events.started()
            found = await self.inspect(container_id)
        except DockerAPIError as e:
            raise LaunchError(f"kernel {kernel_id}: cannot ask the Docker engine about {name}: {e}") from None
        if found is None:
            raise LaunchError(f"kernel {kernel_id} is no longer running: container {name} no longer exists")
        labels = (found.get("Config") or {}).get("Labels") or {}
        if labels.get(KERNEL_LABEL) != kernel_id:
            raise LaunchError(f"container {container_id[:12]} is not the container of kernel {kernel_id}")
        state = found.get("State") or {}
        if not state.get("Running"):
            raise LaunchError(
                f"kernel {kernel_id} is no longer running: container {name} exited with code "
                f"{as_int(state.get('ExitCode'))}"
            )
        watch = ContainerWatch(container_id, name)
        watch.unwatch = self.events.watch(container_id, watch.on_event)
        return DockerKernelProcess(
            launcher=self,
            watch=watch,
            placement=Placement(
                host=str(snapshot.get("host") or name),
                ip=arguments["info"].ip,
                pid=as_int(state.get("Pid")),
                extra={"container_id": container_id, "image": str((found.get("Config") or {}).get("Image", ""))},
            ),
            **arguments,
        )

    # -- inventory -----------------------------------------------------------

    async def _find(self, gateway_id: str, hints: Sequence[Mapping[str, Any]]) -> list[Found]:
        """
        @raise LaunchError: the engine cannot be asked.
        """
        try:
            listed = await self.engine.call(
                "GET",
                "/containers/json",
                query={"all": 1, "filters": label_filter({GATEWAY_LABEL: gateway_id, KERNEL_LABEL: ""})},
                what="list containers",
            )
        except DockerAPIError as e:
            raise LaunchError(f"cannot list kernel containers: {e}") from None
        found = []
        for item in listed or []:
            labels = item.get("Labels") or {}
            if labels.get(GATEWAY_LABEL) != gateway_id or "com.docker.swarm.service.id" in labels:
                continue
            container_id = str(item.get("Id"))
            name = str((item.get("Names") or [container_id[:12]])[0]).lstrip("/")
            found.append(
                self._found(
                    str(labels.get(KERNEL_LABEL)),
                    f"container {name} ({item.get('State')}, {item.get('Image')})",
                    lambda container_id=container_id: self._reap(container_id),
                    spec_name=str(labels.get(SPEC_LABEL) or ""),
                )
            )
        return found

    async def _reap(self, container_id: str) -> None:
        try:
            await self.engine.call(
                "DELETE", f"/containers/{quote(container_id)}", query={"force": 1, "v": 1}, what="remove"
            )
        except DockerAPIError as e:
            if not e.not_found:
                raise LaunchError(f"cannot remove container {container_id[:12]}: {e}") from None

    def stop(self) -> Deferred[None]:
        """
        Close the event stream and the engine's connections (the gateway
        is stopping; kernels kept for a later gateway run on).
        """
        self.events.stop()
        return Deferred.fromCoroutine(self.engine.close())


__all__ = ["ContainerWatch", "DockerKernelProcess", "DockerLauncher", "engine_for"]
