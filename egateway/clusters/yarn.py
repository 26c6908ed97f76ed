"""
Kernels as Spark applications on Hadoop YARN, in cluster mode: the
kernel runs as the driver inside the ApplicationMaster's container.

A launch (the sequence is L{RemoteLauncher}'s):
  1. builds the kernel's C{spark-submit --master yarn --deploy-mode
     cluster} (L{egateway.clusters.yarn_submit}): the kernel id as the
     application's name and as a tag beside C{egateway-gateway:<id>}, the
     kernelspec's Python launcher as the driver script, the ApplicationMaster
     told to wait for a Spark context as long as C{yarn_am_wait_time} (a
     kernel without one never creates it) and never to run a second
     attempt; the launch token and the kernel's C{KERNEL_*} variables go
     in a private properties file, never on a command line.  A kernelspec
     whose argv is its own script (Enterprise Gateway's C{run.sh}) runs as
     it is and submits by itself;
  2. runs it as a child process (L{egateway.clusters.commands.run_command},
     never a shell); a failed submit quotes spark-submit's error (a driver
     memory above the cluster's maximum allocation fails here, in the RM's
     words, within seconds);
  3. follows the application through the ResourceManager's REST API
     (L{egateway.clusters.yarn_api}; one poll for every application,
     L{egateway.clusters.yarn_apps}), reporting C{submitted} phases as it
     goes (its id, then ACCEPTED with the RM's diagnostics and the queue's
     capacity, RUNNING) until the ApplicationMaster has a host; a launch
     timing out in ACCEPTED therefore says why, and the application is
     killed;
  4. connects to the kernel at the ApplicationMaster's host.
An application that ends (KILLED or FAILED outside the gateway) ends its
kernel with YARN's diagnostics as a decision: the kernel is dead, not
restarted.  Interrupts go through the kernel's comm port; stopping a
kernel asks it to exit, then kills its application through the REST API.
Restore reattaches by application id; the inventory lists live
applications tagged with this gateway's id, and the reconciler can kill
them.
"""

from __future__ import annotations

import os
import shutil
import signal as signals
import tempfile
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Sequence, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from egateway.clusters.commands import CommandResult, run_command
from egateway.clusters.interface import (
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
    reported_id,
    resolve_address,
    wait_until,
)
from egateway.clusters.yarn_api import FINAL_STATES, LIVE_STATES, ResourceManagers, YarnAPIError, endpoints_from_site
from egateway.clusters.yarn_apps import ApplicationPoller, ApplicationWatch, describe_end, gateway_tag
from egateway.clusters.yarn_submit import properties_text, submission, submit_error, submitted_app_id
from egateway.names import KERNEL_ID_PATTERN
from egateway.observe import detached
from egateway.wire.channels import ConnectionInfo

_log = Logger()

T = TypeVar("T")

SUBMIT_TIMEOUT = 120.0
"""
Seconds spark-submit may take (it returns once the application is accepted).
"""

KILL_WAIT = 15.0
"""
Seconds to wait for a killed application to reach a final state.
"""

FAILOVER_WAIT = 30.0
"""
Seconds more a kill or a restore waits for a ResourceManager to answer as
active: an HA failover takes the ZooKeeper session timeout (10 s by
default) and the standby's recovery.
"""

FAILOVER_RETRY = 0.5
"""
Seconds between tries while no ResourceManager answers as active.
"""


class YarnKernelProcess(RemoteKernelProcess):
    """
    A kernel running as YARN application C{watch.app_id}.
    """

    def __init__(self, *, launcher: "YarnLauncher", cluster: "_Cluster", watch: ApplicationWatch, **kw: Any) -> None:
        super().__init__(**kw)
        self._launcher = launcher
        self._cluster = cluster
        self.watch = watch
        self._unwatch = cluster.poller.watch(watch)
        watch.when_ended().addCallback(self._ended)

    @property
    def app_id(self) -> str:
        return self.watch.app_id

    async def _check_alive(self) -> Liveness:
        if self.watch.status is not None:
            return Liveness(False, self.watch.status.describe(), decision=self.watch.status.decision)
        if self._cluster.poller.watching(self.watch):
            return Liveness(True)  # the poll loop would have said
        app = await self._cluster.rms.application(self.app_id)
        if app is None or app.get("state") in FINAL_STATES:
            self.watch.end(app or {"id": self.app_id, "state": "KILLED",
                                   "diagnostics": "the ResourceManager no longer knows the application"})
            assert self.watch.status is not None
            return Liveness(False, self.watch.status.describe(), decision=self.watch.status.decision)
        return Liveness(True)

    async def _signal_directly(self, signum: int) -> None:
        if signum not in (signals.SIGTERM, signals.SIGKILL):
            raise LaunchError(
                f"kernel {self.kernel_id} has no comm port, and YARN cannot deliver signal {signum} to it"
            )
        self.watch.stopping = True
        await self._launcher.kill(self._cluster, self.app_id)

    async def _terminate(self, grace: float):  # type: ignore[no-untyped-def]
        # However the application ends now (FAILED when the kernel exits on
        # SIGTERM), the gateway ended it.
        self.watch.stopping = True
        return await super()._terminate(grace)

    async def _release(self) -> None:
        self.watch.stopping = True
        self._unwatch()
        if self.watch.status is None:
            await self._launcher.kill_quietly(self._cluster, self.app_id, self.kernel_id)

    def detach(self) -> None:
        super().detach()
        self._unwatch()

    def snapshot(self) -> dict:
        return {
            **super().snapshot(),
            "launcher": "yarn",
            "app_id": self.app_id,
            "endpoints": self._cluster.rms.endpoints,
        }


@dataclass
class _Cluster:
    """
    One YARN cluster's REST client and poll loop.
    """

    rms: ResourceManagers
    poller: ApplicationPoller


@dataclass
class _AppLaunch:
    """
    What a YARN launch's steps keep.
    """

    cluster: _Cluster
    watch: ApplicationWatch
    properties_file: str = ""
    submitting: Deferred[CommandResult] | None = None
    from_client: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


@implementer(ILauncher, ILauncherInventory)
class YarnLauncher(RemoteLauncher):
    """
    Starts kernels as YARN applications through spark-submit; see the
    module docstring.
    """

    name = "yarn"

    def __init__(self, context: LauncherContext) -> None:
        super().__init__(context)
        self._settings = context.section
        self._clusters: dict[tuple[str, ...], _Cluster] = {}
        self._runtime_dir = context.runtime_dir

    @property
    def _poll_interval(self) -> float:  # type: ignore[override]
        return self._settings.yarn_poll_interval

    def cluster(self, config: Mapping[str, Any], env: Mapping[str, str] | None = None) -> _Cluster:
        """
        The cluster a kernelspec names (its C{yarn_endpoint} and
        C{alt_yarn_endpoint}, else the gateway's, else yarn-site.xml's).

        @raise LaunchError: no endpoint is known, or one is malformed.
        """
        primary = str(config.get("yarn_endpoint") or self._settings.yarn_endpoint or "")
        alternate = str(config.get("alt_yarn_endpoint") or self._settings.alt_yarn_endpoint or "")
        endpoints = [e for e in (primary, alternate) if e]
        if not endpoints:
            conf_dir = (env or {}).get("HADOOP_CONF_DIR") or os.environ.get("HADOOP_CONF_DIR", "")
            endpoints = endpoints_from_site(conf_dir) if conf_dir else []
        key = tuple(endpoints)
        found = self._clusters.get(key)
        if found is None:
            try:
                rms = ResourceManagers(self._reactor, endpoints)
            except ValueError as e:
                raise LaunchError(
                    f"YARN ResourceManager: {e}; set yarn_endpoint (EG_YARN_ENDPOINT) or the kernelspec's "
                    "yarn_endpoint, or HADOOP_CONF_DIR"
                ) from None
            found = _Cluster(rms, ApplicationPoller(self._reactor, rms, self._gateway_id,
                                                    self._settings.yarn_poll_interval))
            self._clusters[key] = found
        return found

    # -- REST operations shared with the kernels ----------------------------

    async def kill(self, cluster: _Cluster, app_id: str) -> None:
        """
        @raise LaunchError: the RM refused or cannot be reached.
        """
        if not app_id:
            raise LaunchError("the kernel's YARN application is not known yet")
        try:
            await cluster.rms.kill(app_id)
        except YarnAPIError as e:
            raise LaunchError(f"cannot kill YARN application {app_id}: {e}") from None

    async def kill_quietly(self, cluster: _Cluster, app_id: str, kernel_id: str) -> None:
        """
        Kill the application and wait (bounded) until YARN says it ended.
        While no ResourceManager answers as the active one (an HA failover
        under way) each request is tried again (L{_through_failover}),
        rather than the application left running and the kernel with it.
        """
        if not app_id:
            return

        async def ended() -> bool:
            app = await self._through_failover(lambda: cluster.rms.application(app_id))
            return app is None or app.get("state") in FINAL_STATES

        try:
            if await ended():
                return
            await self._through_failover(lambda: cluster.rms.kill(app_id))
            if not await wait_until(self._reactor, ended, KILL_WAIT, 0.25):
                _log.warn("kernel {kernel_id}: YARN application {app_id} did not end within {wait} s of its kill",
                          kernel_id=kernel_id, app_id=app_id, wait=KILL_WAIT)
        except YarnAPIError as e:
            _log.warn(
                "kernel {kernel_id}: cannot kill YARN application {app_id}: {error}; kill it by hand "
                "(yarn application -kill {app_id})",
                kernel_id=kernel_id, app_id=app_id, error=str(e),
            )

    async def _through_failover(self, ask: Callable[[], Awaitable[T]]) -> T:
        """
        C{ask()}, asked again every C{FAILOVER_RETRY} seconds for up to
        C{FAILOVER_WAIT} while no ResourceManager answers as the active one.

        @raise YarnAPIError: an RM refused, or none became active in time.
        """
        deadline = self._reactor.seconds() + FAILOVER_WAIT
        while True:
            try:
                return await ask()
            except YarnAPIError as e:
                if e.status != 0 or self._reactor.seconds() >= deadline:
                    raise
            await deferLater(self._reactor, FAILOVER_RETRY, lambda: None)

    # -- the launch's steps ----------------------------------------------------

    def _spark_submit(self, env: Mapping[str, str]) -> str:
        home = self._settings.yarn_spark_home or env.get("SPARK_HOME") or ""
        if home:
            candidate = os.path.join(home, "bin", "spark-submit")
            if os.access(candidate, os.X_OK):
                return candidate
        found = shutil.which("spark-submit", path=env.get("PATH") or os.environ.get("PATH", os.defpath))
        if found is None:
            raise LaunchError(
                "spark-submit was not found (in yarn_spark_home, the kernel's SPARK_HOME or the gateway's PATH); "
                "install Spark (pip install pyspark) and set yarn_spark_home (EG_YARN_SPARK_HOME)"
            )
        return found

    async def _prepare(self, request: LaunchRequest) -> _AppLaunch:
        if not KERNEL_ID_PATTERN.match(request.kernel_id):
            raise LaunchError(f"kernel id {request.kernel_id[:80]!r} cannot name a YARN application", status=400)
        if self.impersonation.enabled:
            # YARN runs the application as this user (spark-submit
            # --proxy-user): the name must be one that may be impersonated.
            self.impersonation.check_name(request.username)
        cluster = self.cluster(request.config, request.env)
        started = int(self._reactor.seconds() * 1000) - 2000
        return _AppLaunch(cluster, ApplicationWatch(request.kernel_id, started=started))

    def _environment(self, request: LaunchRequest, spark_submit: str) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", os.defpath), **request.env}
        env.setdefault("SPARK_HOME", os.path.dirname(os.path.dirname(os.path.realpath(spark_submit))))
        for name in ("JAVA_HOME", "HADOOP_CONF_DIR", "YARN_CONF_DIR"):
            if name not in env and name in os.environ:
                env[name] = os.environ[name]
        env["KERNEL_ID"] = request.kernel_id
        env["KERNEL_USERNAME"] = env.get("KERNEL_USERNAME") or request.username
        return env

    async def _submit(self, launch: RemoteLaunch) -> None:
        request, state = launch.request, launch.state
        argv = self._launcher_argv(request, launch.listener, "")
        spark_submit = self._spark_submit(request.env)
        env = self._environment(request, spark_submit)
        proxy_user = request.username if self.impersonation.enabled else ""
        os.makedirs(self._runtime_dir, mode=0o700, exist_ok=True)
        fd, state.properties_file = tempfile.mkstemp(prefix=f"yarn-{request.kernel_id}-", suffix=".conf",
                                                     dir=self._runtime_dir)
        plan = submission(
            argv,
            spark_submit=spark_submit,
            kernel_id=request.kernel_id,
            gateway_id=self._gateway_id,
            env=env,
            config=request.config,
            am_wait_time=self._settings.yarn_am_wait_time,
            token=launch.pending.token,
            proxy_user=proxy_user,
            properties_file=state.properties_file,
        )
        state.from_client = plan.from_client
        state.watch.tagged = plan.properties is not None
        with os.fdopen(fd, "w") as f:
            f.write(properties_text(plan.properties or {}))
        if plan.properties is None:
            env["EG_LAUNCH_TOKEN"] = launch.pending.token
        state.submitting = run_command(self._reactor, plan.argv, env=env, timeout=min(SUBMIT_TIMEOUT, request.timeout))
        try:
            result = await detached(state.submitting)
        finally:
            self._remove_properties(state)
        output = (result.stdout + b"\n" + result.stderr).decode("utf-8", "replace")
        if not result.ok:
            why = "did not finish within {:g} s".format(result.timeout) if result.timed_out else (
                f"exited with code {result.code}" if result.code is not None else f"was killed by signal {result.signal}"
            )
            raise LaunchError(
                f"spark-submit {why}: {submit_error(output) or 'no output'}",
                status=400 if state.from_client and "max threshold" in output else 500,
            )
        state.watch.app_id = submitted_app_id(output)
        _log.info("kernel {kernel_id}: submitted as YARN application {app_id}", kernel_id=request.kernel_id,
                  app_id=state.watch.app_id or "(id not printed)")
        request.report(Phase.SUBMITTED, f"YARN application {state.watch.app_id or request.kernel_id}")

    def _remove_properties(self, state: _AppLaunch) -> None:
        if state.properties_file:
            try:
                os.unlink(state.properties_file)
            except FileNotFoundError:
                pass
            state.properties_file = ""

    async def _await_placement(self, launch: RemoteLaunch) -> Placed:
        request, state = launch.request, launch.state
        watch: ApplicationWatch = state.watch
        cluster: _Cluster = state.cluster
        said = ""

        def on_report(app: dict[str, Any]) -> None:
            state.extra["last"] = app

        watch.on_report = on_report
        state.extra["unwatch"] = cluster.poller.watch(watch)
        while True:
            app = state.extra.get("last")
            if watch.status is not None:
                raise LaunchError(f"{watch.status.describe()} before the kernel sent its connection info")
            if app is not None:
                host = str(app.get("amHostHttpAddress") or "").rpartition(":")[0]
                news = f"{app.get('state')}|{app.get('diagnostics')}"
                if news != said:
                    said = news
                    request.report(Phase.SUBMITTED, await self._progress(cluster, app))
                if host and app.get("state") in ("ACCEPTED", "RUNNING"):
                    address = await resolve_address(self._reactor, host)
                    return Placed(host, address, f"YARN application {app.get('id')} on {host} ({address})")
            await deferLater(self._reactor, self._poll_interval / 2, lambda: None)

    async def _progress(self, cluster: _Cluster, app: dict[str, Any]) -> str:
        """
        The phase detail of an application's report: its state, the RM's
        diagnostics and, while it waits for its ApplicationMaster, its
        queue's capacity.
        """
        detail = f"YARN application {app.get('id')} {app.get('state')}"
        if app.get("state") != "RUNNING" and not app.get("amHostHttpAddress"):
            queue = await cluster.rms.queue(str(app.get("queue") or "default"))
            diagnostics = " ".join(str(app.get("diagnostics") or "").split())
            detail += "".join(f"; {part}" for part in (diagnostics, queue) if part)
        return detail

    async def _launch_ended(self, launch: RemoteLaunch) -> str | None:
        watch: ApplicationWatch = launch.state.watch
        if watch.status is None:
            return None
        return f"{watch.status.describe()} before the kernel sent its connection info"

    def _kernel(
        self, launch: RemoteLaunch, placed: Placed, info: ConnectionInfo, payload: Mapping[str, Any]
    ) -> IKernelProcess:
        state = launch.state
        state.extra.pop("unwatch")()
        state.watch.on_report = lambda app: None
        return YarnKernelProcess(
            launcher=self,
            cluster=state.cluster,
            watch=state.watch,
            placement=Placement(
                host=placed.host,
                ip=placed.address,
                pid=reported_id(payload.get("pid")),
                pgid=reported_id(payload.get("pgid")),
                extra={"app_id": state.watch.app_id},
            ),
            **self._kernel_arguments(launch, info, payload),
        )

    async def _abandon(self, launch: RemoteLaunch) -> None:
        state: _AppLaunch = launch.state
        unwatch = state.extra.pop("unwatch", None)
        if unwatch is not None:
            unwatch()
        if not state.watch.app_id and state.submitting is not None:
            try:
                result = await state.submitting
                state.watch.app_id = submitted_app_id((result.stdout + result.stderr).decode("utf-8", "replace"))
            except Exception:
                pass
        self._remove_properties(state)
        if not state.watch.app_id:
            # Submitted under another id we never learnt: find it by name.
            try:
                apps = await state.cluster.rms.applications(startedTimeBegin=state.watch.started)
            except YarnAPIError:
                apps = []
            live = [a for a in apps if launch.request.kernel_id in str(a.get("name")) and a.get("state") in LIVE_STATES]
            state.watch.app_id = str(live[-1]["id"]) if live else ""
        if state.watch.app_id:
            _log.info("kernel {kernel_id}: killing YARN application {app_id} of a failed launch",
                      kernel_id=launch.request.kernel_id, app_id=state.watch.app_id)
            state.watch.stopping = True
            await self.kill_quietly(state.cluster, state.watch.app_id, launch.request.kernel_id)

    # -- restoring and the inventory --------------------------------------------

    async def _restore(self, kernel_id: str, snapshot: Mapping[str, Any]) -> IKernelProcess:
        arguments = self._restored_arguments(kernel_id, snapshot)
        app_id = str(snapshot.get("app_id") or "")
        if not app_id.startswith("application_"):
            raise LaunchError(f"bad yarn snapshot: application id {app_id!r}")
        endpoints = snapshot.get("endpoints") or []
        config = {"yarn_endpoint": endpoints[0], "alt_yarn_endpoint": endpoints[1] if len(endpoints) > 1 else ""} \
            if endpoints else {}
        cluster = self.cluster(config)
        try:
            # A gateway restarting during a failover must not take its
            # kernels for dead.
            app = await self._through_failover(lambda: cluster.rms.application(app_id))
        except YarnAPIError as e:
            raise LaunchError(f"kernel {kernel_id}: cannot ask YARN about {app_id}: {e}") from None
        if app is None or app.get("state") not in LIVE_STATES:
            raise LaunchError(f"kernel {kernel_id} is no longer running: "
                              + (describe_end(app) if app else f"YARN does not know {app_id}"))
        if kernel_id not in str(app.get("name", "")):
            raise LaunchError(f"YARN application {app_id} is {app.get('name')!r}, not kernel {kernel_id}'s")
        watch = ApplicationWatch(kernel_id, app_id, started=int(app.get("startedTime") or 0))
        watch.report(app)
        return YarnKernelProcess(
            launcher=self,
            cluster=cluster,
            watch=watch,
            placement=Placement(
                host=str(snapshot.get("host") or ""),
                ip=arguments["info"].ip,
                pid=reported_id(snapshot.get("pid")),
                pgid=reported_id(snapshot.get("pgid")),
                extra={"app_id": app_id},
            ),
            **arguments,
        )

    async def _find(self, gateway_id: str, hints: Sequence[Mapping[str, Any]]) -> list[Found]:
        """
        @raise LaunchError: no ResourceManager can be asked.
        """
        found: list[Found] = []
        seen: set[str] = set()
        configs = list(hints) or [{}]
        for config in configs:
            try:
                cluster = self.cluster(config)
                apps = await cluster.rms.applications(applicationTags=gateway_tag(gateway_id),
                                                      states="NEW,NEW_SAVING,SUBMITTED,ACCEPTED,RUNNING")
            except YarnAPIError as e:
                raise LaunchError(f"cannot list kernel applications on YARN: {e}") from None
            for app in apps:
                app_id = str(app.get("id"))
                kernel_id = str(app.get("name") or "")
                if app_id in seen or gateway_tag(gateway_id) not in (app.get("applicationTags") or "").split(","):
                    continue
                seen.add(app_id)
                found.append(self._found(
                    kernel_id,
                    f"YARN application {app_id} ({app.get('state')}, queue {app.get('queue')})",
                    lambda cluster=cluster, app_id=app_id, kernel_id=kernel_id: self.kill_quietly(
                        cluster, app_id, kernel_id),
                ))
        return found

    def stop(self) -> Deferred[None]:
        """
        Stop polling and close the RM connections (kernels kept for a
        later gateway run on).
        """

        async def close() -> None:
            for cluster in self._clusters.values():
                await cluster.poller.stop()
                await cluster.rms.close()

        return Deferred.fromCoroutine(close())


__all__ = ["YarnKernelProcess", "YarnLauncher"]
