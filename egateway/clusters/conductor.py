"""
Kernels as Spark drivers in IBM Spectrum Conductor (Enterprise Gateway's
C{ConductorClusterProcessProxy}), through Conductor's REST API
(L{egateway.clusters.conductor_api}).

A launch submits the kernelspec's kernel-side launcher as a cluster-mode
Spark application: the kernelspec argv (C{python launch_ipykernel.py
--kernel-id {kernel_id} ...}) becomes the submission's application resource
(the script) and arguments, named after the kernel id, with the kernel's
environment.  The gateway then asks Conductor for the driver's application
until it reports the host the driver landed on, waits for the connection
info from there, and follows the application's state: a final state
(C{FINISHED}, C{KILLED}, C{RECLAIMED}, C{FAILED}...) is the kernel's end,
and C{KILLED} not asked for by the gateway is an operator's decision.
Stopping a kernel asks its launcher through the comm port first, then
Conductor to kill the driver.

The launch token travels in the submission's environment
(C{EG_LAUNCH_TOKEN}; the launcher removes it from its own): a REST
submission has no other channel to the driver.  The Conductor credential
(C{conductor_credential}, Enterprise Gateway's C{EGO_SERVICE_CREDENTIAL})
comes from the gateway's configuration only: the endpoints it is sent to
come from the configuration or the kernelspec, never from a client.

Untested against a real Conductor (none can run here): the tests run it
against an emulator of the REST calls above.
"""

from __future__ import annotations

import os
import signal as signals
from dataclasses import dataclass
from typing import Any, Mapping

from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from egateway.clusters.conductor_api import Application, ConductorAPI, ConductorError
from egateway.clusters.interface import (
    ENV_NAME as NAME,
    GATEWAY_ID_ENV,
    ILauncher,
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
    reported_id,
    resolve_address,
)
from egateway.wire.channels import ConnectionInfo

_log = Logger()

TOKEN_ENV = "EG_LAUNCH_TOKEN"
PYTHON_RUNNER = "org.apache.spark.deploy.PythonRunner"


@dataclass(frozen=True)
class Endpoints:
    """
    Where a kernel's requests go: applications and kills (C{endpoint}),
    submissions (C{master_rest}).
    """

    endpoint: str
    master_rest: str


@dataclass
class _ConductorLaunch:
    endpoints: Endpoints
    driver_id: str = ""
    application: Application | None = None


class ConductorKernelProcess(RemoteKernelProcess):
    """
    A kernel whose driver C{driver_id} runs in Conductor.
    """

    def __init__(self, *, launcher: "ConductorLauncher", endpoints: Endpoints, driver_id: str,
                 application_id: str, **kw: Any) -> None:
        super().__init__(**kw)
        self._api = launcher.api
        self.endpoints = endpoints
        self.driver_id = driver_id
        self.application_id = application_id
        self._killed = False

    async def _check_alive(self) -> Liveness:
        application = await self._api.application(self.endpoints.endpoint, self.driver_id)
        if application is None:
            return Liveness(False, f"Conductor no longer lists driver {self.driver_id}")
        if application.running:
            return Liveness(True)
        decided = application.state == "KILLED" and not self._killed
        return Liveness(
            False,
            f"Conductor application {application.application_id or self.driver_id} ended: {application.describe()}",
            decision=decided,
        )

    async def _signal_directly(self, signum: int) -> None:
        if signum not in (signals.SIGTERM, signals.SIGKILL):
            raise LaunchError(
                f"cannot deliver signal {signum} to kernel {self.kernel_id}: its comm port did not take it "
                "and Conductor can only kill the driver"
            )
        self._killed = True
        await self._api.kill(self.endpoints.endpoint, self.driver_id)

    async def _release(self) -> None:
        """
        A kernel is released once ended; a driver still listed as running
        (its launcher gone astray) is killed.
        """
        try:
            application = await self._api.application(self.endpoints.endpoint, self.driver_id)
            if application is not None and application.running:
                self._killed = True
                await self._api.kill(self.endpoints.endpoint, self.driver_id)
        except ConductorError as e:
            _log.warn("kernel {kernel_id}: cannot check driver {driver_id} at cleanup: {error}",
                      kernel_id=self.kernel_id, driver_id=self.driver_id, error=str(e))

    def snapshot(self) -> dict:
        return {
            **super().snapshot(),
            "launcher": "conductor",
            "driver_id": self.driver_id,
            "application_id": self.application_id,
            "endpoint": self.endpoints.endpoint,
            "master_rest": self.endpoints.master_rest,
        }


@implementer(ILauncher)
class ConductorLauncher(RemoteLauncher):
    name = "conductor"

    def __init__(self, context: LauncherContext) -> None:
        super().__init__(context)
        self._settings = context.section
        self._poll_interval = float(self._settings.conductor_poll_interval)
        self.api = ConductorAPI(context.reactor, self._settings.conductor_credential)

    def _endpoints(self, config: Mapping[str, Any]) -> Endpoints:
        """
        The kernelspec's endpoints, else the gateway's.

        @raise LaunchError: none configured, or no credential.
        """
        endpoint = str(config.get("conductor_endpoint") or self._settings.conductor_endpoint).strip()
        master_rest = str(config.get("master_rest") or self._settings.conductor_master_rest or endpoint).strip()
        if not endpoint.startswith(("http://", "https://")):
            raise LaunchError(
                "the conductor launcher needs conductor_endpoint (EG_CONDUCTOR_ENDPOINT, or the kernelspec's "
                "conductor_endpoint): Conductor's REST base URL, http:// or https://"
            )
        if not master_rest.startswith(("http://", "https://")):
            raise LaunchError(f"conductor master_rest {master_rest!r} is not an http:// or https:// URL")
        if not self._settings.conductor_credential:
            raise LaunchError(
                "the conductor launcher needs the Conductor service credential: set conductor_credential "
                "(EGO_SERVICE_CREDENTIAL)"
            )
        return Endpoints(endpoint, master_rest)

    def _submission(self, launch: RemoteLaunch) -> dict[str, Any]:
        """
        Spark's REST submission request for the kernel-side launcher.
        """
        request = launch.request
        python = str(request.config.get("python") or "")
        argv = self._launcher_argv(request, launch.listener, python or "python")
        if argv and os.path.basename(argv[0]).startswith("python"):
            # The interpreter runs the application: Spark's, named by spark.pyspark.python.
            python, argv = argv[0], argv[1:]
        if not argv:
            raise LaunchError(f"kernelspec {getattr(request.spec, 'name', '')!r} has an empty argv")
        env = {name: value for name, value in request.env.items() if NAME.match(name) and name != TOKEN_ENV}
        if self._gateway_id:
            env[GATEWAY_ID_ENV] = self._gateway_id
        if not launch.pending.accept_v1:
            env[TOKEN_ENV] = launch.pending.token
        properties = {
            "spark.app.name": request.kernel_id,
            "spark.submit.deployMode": "cluster",
            "spark.master": launch.state.endpoints.master_rest,
            **{str(k): str(v) for k, v in dict(request.config.get("spark_properties") or {}).items()},
        }
        if python:
            properties["spark.pyspark.python"] = python
        return {
            "action": "CreateSubmissionRequest",
            "appResource": argv[0],
            "mainClass": str(request.config.get("main_class") or PYTHON_RUNNER),
            "appArgs": argv[1:],
            "clientSparkVersion": str(request.config.get("spark_version") or ""),
            "environmentVariables": env,
            "sparkProperties": properties,
        }

    # -- the launch's steps (the sequence is RemoteLauncher's) ---------------

    async def _prepare(self, request: LaunchRequest) -> _ConductorLaunch:
        return _ConductorLaunch(self._endpoints(request.config))

    async def _submit(self, launch: RemoteLaunch) -> None:
        state = launch.state
        state.driver_id = await self.api.submit(state.endpoints.master_rest, self._submission(launch))
        launch.request.report(Phase.SUBMITTED, f"Conductor driver {state.driver_id}")

    async def _await_placement(self, launch: RemoteLaunch) -> Placed:
        state = launch.state
        reported = ""
        while True:
            application = await self.api.application(state.endpoints.endpoint, state.driver_id)
            if application is not None:
                state.application = application
                if application.state != reported:
                    # A launch that times out quotes the last one: "... application app-1 WAITING".
                    reported = application.state
                    launch.request.report(
                        Phase.SUBMITTED,
                        f"Conductor driver {state.driver_id}: application {application.application_id} "
                        f"{application.describe()}",
                    )
                if not application.running:
                    raise LaunchError(
                        f"Conductor application {application.application_id or state.driver_id} of driver "
                        f"{state.driver_id} ended before the kernel started: {application.describe()}"
                    )
                if application.host:
                    address = await resolve_address(self._reactor, application.host)
                    detail = f"{application.host} (application {application.application_id}, {application.state})"
                    return Placed(application.host, address, detail)
            await deferLater(self._reactor, self._poll_interval, lambda: None)

    async def _launch_ended(self, launch: RemoteLaunch) -> str | None:
        state = launch.state
        try:
            application = await self.api.application(state.endpoints.endpoint, state.driver_id)
        except ConductorError:
            return None
        if application is None or application.running:
            return None
        return (
            f"Conductor application {application.application_id} of driver {state.driver_id} ended before "
            f"sending connection info: {application.describe()}"
        )

    def _kernel(
        self, launch: RemoteLaunch, placed: Placed, info: ConnectionInfo, payload: Mapping[str, Any]
    ) -> IKernelProcess:
        state = launch.state
        application_id = state.application.application_id if state.application else ""
        # The payload's pid is shown, never signalled: Conductor kills the driver.
        return self._process(
            state.endpoints, state.driver_id, application_id, placed.host, payload.get("pid"),
            self._kernel_arguments(launch, info, payload),
        )

    def _process(
        self, endpoints: Endpoints, driver_id: str, application_id: str, host: str, pid: Any,
        arguments: dict[str, Any],
    ) -> ConductorKernelProcess:
        """
        The kernel of driver C{driver_id}, placed on C{host} (its address is
        the connection info's).
        """
        return ConductorKernelProcess(
            launcher=self,
            endpoints=endpoints,
            driver_id=driver_id,
            application_id=application_id,
            placement=Placement(
                host=host,
                ip=arguments["info"].ip,
                pid=reported_id(pid),
                extra={"driver_id": driver_id, "application_id": application_id},
            ),
            **arguments,
        )

    async def _abandon(self, launch: RemoteLaunch) -> None:
        state = launch.state
        if state.driver_id:
            try:
                await self.api.kill(state.endpoints.endpoint, state.driver_id)
            except ConductorError as e:
                _log.warn("kernel {kernel_id}: cannot kill driver {driver_id} of a failed launch: {error}",
                          kernel_id=launch.request.kernel_id, driver_id=state.driver_id, error=str(e))

    async def _restore(self, kernel_id: str, snapshot: Mapping[str, Any]) -> IKernelProcess:
        arguments = self._restored_arguments(kernel_id, snapshot)
        try:
            endpoints = Endpoints(str(snapshot["endpoint"]), str(snapshot.get("master_rest") or snapshot["endpoint"]))
            driver_id = str(snapshot["driver_id"])
        except KeyError as e:
            raise LaunchError(f"bad conductor snapshot: missing {e}") from None
        application_id = str(snapshot.get("application_id") or "")
        process = self._process(
            endpoints, driver_id, application_id, str(snapshot.get("host") or ""), snapshot.get("pid"), arguments
        )
        liveness = await process.poll()
        if not liveness.alive:
            process.detach()
            raise LaunchError(f"kernel {kernel_id}'s Conductor driver {driver_id} is no longer running")
        return process

    async def stop(self) -> None:
        await self.api.close()


__all__ = ["ConductorKernelProcess", "ConductorLauncher", "Endpoints"]
