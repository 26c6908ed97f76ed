"""
Kernels as Docker Swarm services: one service per kernel, one replica,
no restart policy of Swarm's own (the gateway decides restarts), through
the same Engine API client as L{egateway.clusters.docker} (the engine must
be a swarm manager).

The service carries the container launcher's labels (on the service and on
its container), image, environment contract, mounts, user and resource
limits (L{egateway.clusters.docker_plan}), plus the kernelspec's or
profile's placement C{constraints} (C{node.labels.gpu==yes}).  Where the
task runs comes from the tasks API: its state, its node (the node's
hostname and address from the nodes API) and its container.  The kernel
is reached at its address on the kernelspec's network when the task has
one there (an attachable overlay the gateway is on), else at its node's
address (the C{host} network).

A task pending for a reason that waiting cannot fix (Swarm's C{no suitable
node}: no node meets the constraints or has the resources) fails the
launch at once with Swarm's words; other pending reasons are reported as
C{submitted} phases until the launch's timeout.  A task that fails or is
rejected fails the launch with Swarm's error and, when its container is on
this engine, its exit code and last log lines.  Every failure, cancellation
and shutdown removes the service.  While the kernel runs, its task state
is read from the tasks API (its container's death on this engine arrives
sooner, through the event stream).
"""

from __future__ import annotations

import signal as signals
from typing import Any, Mapping, Sequence
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from egateway.clusters.docker import ContainerWatch, DockerKernelProcess, DockerLauncher, _ContainerLaunch
from egateway.clusters.docker_api import DockerAPIError, label_filter
from egateway.clusters.docker_events import KERNEL_LABEL
from egateway.clusters.docker_plan import GATEWAY_LABEL, SPEC_LABEL, ContainerPlan, container_env, service_body
from egateway.clusters.interface import (
    ExitStatus,
    Found,
    ILauncher,
    ILauncherInventory,
    IKernelProcess,
    LaunchError,
    Liveness,
    Phase,
    Placement,
)
from egateway.clusters.remote import Placed, RemoteLaunch, as_int
from egateway.wire.channels import ConnectionInfo

_log = Logger()

ENDED = frozenset({"complete", "failed", "shutdown", "rejected", "orphaned", "remove"})
NEVER_STARTS = ("no suitable node",)


def never_starts(reason: str) -> bool:
    return any(words in reason for words in NEVER_STARTS)


class SwarmKernelProcess(DockerKernelProcess):
    """
    A kernel running as the one task of Swarm service C{service_id}.
    """

    def __init__(self, *, service_id: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.service_id = service_id

    async def _check_alive(self) -> Liveness:
        if self.watch.status is not None:
            return Liveness(False, self.watch.status.describe(), decision=self.watch.status.decision)
        launcher: SwarmLauncher = self._launcher  # type: ignore[assignment]
        return await launcher.service_liveness(self.service_id, self.watch)

    async def _signal_directly(self, signum: int) -> None:
        launcher: SwarmLauncher = self._launcher  # type: ignore[assignment]
        if signum in (signals.SIGTERM, signals.SIGKILL):
            self.watch.gateway_stopping = True
            await launcher.remove_service(self.service_id)
            return
        await launcher.kill(self.container_id, signum)

    async def _terminate(self, grace: float) -> ExitStatus:
        launcher: SwarmLauncher = self._launcher  # type: ignore[assignment]
        if self._exit is None:
            self.watch.gateway_stopping = True
            await launcher.remove_service(self.service_id)
            await launcher.wait_gone(self.service_id, self.watch, grace)
            if self._exit is None:
                self._ended(self.watch.status or ExitStatus(reason=f"Swarm service {self.watch.name} removed"))
        return self._exit or ExitStatus(reason="could not be confirmed stopped")

    async def _release(self) -> None:
        self.watch.gateway_stopping = True
        self.watch.unwatch()
        launcher: SwarmLauncher = self._launcher  # type: ignore[assignment]
        await launcher.remove_service(self.service_id)

    def snapshot(self) -> dict:
        return {**super().snapshot(), "service_id": self.service_id}


@implementer(ILauncher, ILauncherInventory)
class SwarmLauncher(DockerLauncher):
    """
    Starts kernels as one-replica Swarm services; see the module docstring.
    """

    name = "docker-swarm"

    # -- Swarm queries -------------------------------------------------------

    async def tasks(self, service_id: str) -> list[dict[str, Any]]:
        """
        The service's tasks, newest first.
        """
        found = await self.engine.call(
            "GET", "/tasks", query={"filters": {"service": [service_id]}}, what="tasks"
        )
        return sorted(found or [], key=lambda t: str(t.get("CreatedAt") or ""), reverse=True)

    async def remove_service(self, service_id: str) -> None:
        try:
            await self.engine.call("DELETE", f"/services/{quote(service_id)}", what="remove service")
        except DockerAPIError as e:
            if not e.not_found:
                _log.warn(
                    "cannot remove Swarm service {service}: {error}; remove it by hand (docker service rm "
                    "{service})",
                    service=service_id,
                    error=str(e),
                )

    async def service_liveness(self, service_id: str, watch: ContainerWatch) -> Liveness:
        try:
            tasks = await self.tasks(service_id)
        except DockerAPIError as e:
            if e.not_found:
                return Liveness(False, f"Swarm service {watch.name} was removed outside the gateway", decision=True)
            raise
        if not tasks:
            return Liveness(False, f"Swarm service {watch.name} has no task", decision=not watch.gateway_stopping)
        status = tasks[0].get("Status") or {}
        state = str(status.get("State") or "")
        if state not in ENDED:
            return Liveness(True)
        code = as_int((status.get("ContainerStatus") or {}).get("ExitCode"))
        why = f"Swarm task of service {watch.name} is {state}" + (f" ({status['Err']})" if status.get("Err") else "")
        return Liveness(False, f"{why}, exit code {code}", decision=False)

    async def wait_gone(self, service_id: str, watch: ContainerWatch, grace: float) -> None:
        """
        Wait (bounded) until the removed service's container is gone.
        """
        deadline = self._reactor.seconds() + grace + 15
        while watch.status is None and self._reactor.seconds() < deadline:
            if watch.container_id:
                found = await self.inspect(watch.container_id)
                if found is None or not (found.get("State") or {}).get("Running"):
                    return
            await deferLater(self._reactor, self._settings.docker_poll_interval, lambda: None)

    async def node(self, node_id: str) -> tuple[str, str]:
        """
        A node's hostname and address.
        """
        found = await self.engine.call("GET", f"/nodes/{quote(node_id)}", what="node")
        return (str(((found or {}).get("Description") or {}).get("Hostname") or node_id),
                str(((found or {}).get("Status") or {}).get("Addr") or ""))

    # -- the launch's steps ----------------------------------------------------

    async def _check_engine_has(self, plan: ContainerPlan) -> None:
        # Images live on the nodes, not necessarily on this manager: a
        # missing one fails the task, with Swarm's reason.
        try:
            await self.engine.call("GET", f"/networks/{quote(plan.network)}", what="network")
        except DockerAPIError as e:
            if e.not_found:
                raise LaunchError(
                    f"network {plan.network!r} is not on the Docker engine at {self.engine.path}: create it, or "
                    "name another in the kernelspec's network (or docker_network)"
                ) from None
            raise LaunchError(f"cannot check network {plan.network!r}: {e}") from None

    async def _submit(self, launch: RemoteLaunch) -> None:
        request, state = launch.request, launch.state
        plan: ContainerPlan = state.plan
        body = service_body(plan, state.name, container_env(request.env, self._contract(launch)),
                            self._labels(request), self._kernels.terminate_wait)
        await self.events.started()
        state.creating = Deferred.fromCoroutine(
            self.engine.call("POST", "/services/create", body=body, what="create service")
        )
        try:
            created = await state.creating
        except DockerAPIError as e:
            raise LaunchError(f"the Swarm refused kernel service {state.name}: {e.message}") from None
        state.extra["service_id"] = str(created["ID"])
        state.watch = ContainerWatch("", state.name)
        _log.info(
            "kernel {kernel_id}: created Swarm service {name} ({service}; {plan})",
            kernel_id=request.kernel_id,
            name=state.name,
            service=state.extra["service_id"][:12],
            plan=plan.describe(),
        )
        request.report(Phase.SUBMITTED, f"Swarm service {state.name} ({state.extra['service_id'][:12]})")

    async def _await_placement(self, launch: RemoteLaunch) -> Placed:
        request, state = launch.request, launch.state
        service_id = state.extra["service_id"]
        reported = ""
        while True:
            tasks = await self.tasks(service_id)
            task = tasks[0] if tasks else {}
            status = task.get("Status") or {}
            current = str(status.get("State") or "new")
            reason = str(status.get("Err") or status.get("Message") or current)
            container_id = str((status.get("ContainerStatus") or {}).get("ContainerID") or "")
            if container_id and not state.watch.container_id:
                state.watch.container_id = container_id
                state.watch.unwatch = self.events.watch(container_id, state.watch.on_event)
            if current == "running":
                return await self._placed(task, state)
            if current in ENDED:
                raise LaunchError(await self._task_story(state, status) + " before the kernel sent its "
                                  "connection info")
            if reason != reported:
                reported = reason
                request.report(Phase.SUBMITTED, f"Swarm service {state.name} {current}: {reason}")
                if never_starts(reason):
                    raise LaunchError(
                        f"Swarm service {state.name} ({state.plan.describe()}"
                        + (f", constraints {', '.join(state.plan.constraints)}" if state.plan.constraints else "")
                        + f") can never start: its task is {current}: {reason}; the service was removed",
                        status=400 if state.plan.from_client else 500,
                    )
            await deferLater(self._reactor, self._settings.docker_poll_interval, lambda: None)

    async def _placed(self, task: Mapping[str, Any], state: _ContainerLaunch) -> Placed:
        hostname, node_address = await self.node(str(task.get("NodeID") or ""))
        address = node_address
        for attachment in task.get("NetworksAttachments") or []:
            network = (attachment.get("Network") or {}).get("Spec", {}).get("Name")
            addresses = attachment.get("Addresses") or []
            if network == state.plan.network and addresses:
                address = str(addresses[0]).split("/")[0]
        if not address:
            raise LaunchError(f"cannot find the address of Swarm node {hostname}")
        state.extra["pid"] = as_int(((task.get("Status") or {}).get("ContainerStatus") or {}).get("PID"))
        state.extra["node"] = hostname
        return Placed(hostname, address, f"Swarm node {hostname} ({address}), service {state.name}")

    async def _task_story(self, state: _ContainerLaunch, status: Mapping[str, Any]) -> str:
        story = f"the task of Swarm service {state.name} is {status.get('State')}"
        if status.get("Err"):
            story += f": {status['Err']}"
        if state.watch is not None and state.watch.container_id:
            tail = await self.engine.logs(state.watch.container_id)
            code = as_int((status.get("ContainerStatus") or {}).get("ExitCode"))
            story += f" (exit code {code})" + (f"; its last log lines: {' | '.join(tail.splitlines())}" if tail else "")
        return story

    async def _launch_ended(self, launch: RemoteLaunch) -> str | None:
        state = launch.state
        if state.watch.status is not None:
            return await self._ended_story(state.watch) + " before the kernel sent its connection info"
        tasks = await self.tasks(state.extra["service_id"])
        status = (tasks[0] if tasks else {}).get("Status") or {}
        if str(status.get("State") or "") in ENDED:
            return await self._task_story(state, status) + " before the kernel sent its connection info"
        return None

    def _kernel(
        self, launch: RemoteLaunch, placed: Placed, info: ConnectionInfo, payload: Mapping[str, Any]
    ) -> IKernelProcess:
        state = launch.state
        return SwarmKernelProcess(
            launcher=self,
            watch=state.watch,
            service_id=state.extra["service_id"],
            placement=Placement(
                host=placed.host,
                ip=placed.address,
                pid=state.extra.get("pid", 0),
                extra={"service_id": state.extra["service_id"], "container_id": state.watch.container_id,
                       "image": state.plan.image},
            ),
            **self._kernel_arguments(launch, info, payload),
        )

    async def _abandon(self, launch: RemoteLaunch) -> None:
        state = launch.state
        created = await state.created_id("ID")
        service_id = state.extra.get("service_id") or created
        if service_id is not None:
            _log.info(
                "kernel {kernel_id}: removing Swarm service {name} of a failed launch",
                kernel_id=launch.request.kernel_id,
                name=state.name,
            )
            await self.remove_service(service_id)

    # -- restoring and inventory ---------------------------------------------

    async def _restore(self, kernel_id: str, snapshot: Mapping[str, Any]) -> IKernelProcess:
        arguments = self._restored_arguments(kernel_id, snapshot)
        [service_id] = self._snapshot_fields(snapshot, "service_id")
        name = str(snapshot.get("container_name") or self.object_name(kernel_id))
        try:
            await self.events.started()
            service = await self.engine.call("GET", f"/services/{quote(service_id)}", what="service")
        except DockerAPIError as e:
            if e.not_found:
                raise LaunchError(f"kernel {kernel_id} is no longer running: Swarm service {name} no longer exists")
            raise LaunchError(f"kernel {kernel_id}: cannot ask the Swarm about {name}: {e}") from None
        if ((service.get("Spec") or {}).get("Labels") or {}).get(KERNEL_LABEL) != kernel_id:
            raise LaunchError(f"Swarm service {service_id} is not the service of kernel {kernel_id}")
        watch = ContainerWatch(str(snapshot.get("container_id") or ""), name)
        liveness = await self.service_liveness(service_id, watch)
        if not liveness.alive:
            raise LaunchError(f"kernel {kernel_id} is no longer running: {liveness.reason}")
        if watch.container_id:
            watch.unwatch = self.events.watch(watch.container_id, watch.on_event)
        return SwarmKernelProcess(
            launcher=self,
            watch=watch,
            service_id=service_id,
            placement=Placement(
                host=str(snapshot.get("host") or ""),
                ip=arguments["info"].ip,
                pid=as_int(snapshot.get("pid")),
                extra={"service_id": service_id, "container_id": watch.container_id},
            ),
            **arguments,
        )

    async def _find(self, gateway_id: str, hints: Sequence[Mapping[str, Any]]) -> list[Found]:
        try:
            listed = await self.engine.call(
                "GET", "/services", query={"filters": label_filter({GATEWAY_LABEL: gateway_id})}, what="services"
            )
        except DockerAPIError as e:
            raise LaunchError(f"cannot list kernel services: {e}") from None
        found = []
        for service in listed or []:
            labels = (service.get("Spec") or {}).get("Labels") or {}
            if labels.get(GATEWAY_LABEL) != gateway_id or KERNEL_LABEL not in labels:
                continue
            service_id = str(service.get("ID"))
            found.append(
                self._found(
                    str(labels[KERNEL_LABEL]),
                    f"Swarm service {(service.get('Spec') or {}).get('Name')} ({service_id[:12]})",
                    lambda service_id=service_id: self.remove_service(service_id),
                    spec_name=str(labels.get(SPEC_LABEL) or ""),
                )
            )
        return found


__all__ = ["SwarmKernelProcess", "SwarmLauncher", "never_starts"]
