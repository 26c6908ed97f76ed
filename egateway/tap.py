"""
Building the gateway service for C{twistd egateway} / C{twist egateway}.

C{makeService} is synchronous and does no I/O: it parses and validates the
configuration and constructs the services.  Each service does its own I/O
when started.  Children start in the order they are added and stop in the
reverse order, each once the one after it has stopped
(L{egateway.services.OrderedMultiService}):

  - C{threads} (the pool for blocking work), C{data-dir}, C{posture},
    C{audit-log}, C{metrics}: first up, last down;
  - C{launchers}: the launcher registry, whose children are C{response}
    (the response listener, bound on first use) and each launcher built
    (an SSH launcher's connection pool);
  - C{persistence} (opens the store, restores its kernels, retries a shared
    store with back-off) and C{sharing} (the journal written ahead to a
    shared store), when kernels persist;
  - C{kernels}: the kernel manager, which on stop shuts kernels down or
    leaves them running with their records saved;
  - C{reconciler} and C{culler}, which start actions on kernels;
  - the API: authentication, TLS, the HTTP listener, the systemd
    notification, the dashboard, signals and the manhole.

So on stop the API stops taking requests first; then no new reconcile or
cull begins; then kernels are shut down (or kept); then the journal and
the store are written and closed; then launchers release their connections
and the response listener closes; the thread pool goes last.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from egateway import __version__
from egateway.config import ConfigError, Config, describe, flag_table, help_text, load_toml
from egateway.ops.audit import AuditFileError
from egateway.ops.logs import LogSetupError
from egateway.ops.logs import install as install_log
from egateway.ops.tls import TLSSetupError
from egateway.services import BlockingPool, OrderedMultiService
from egateway.validation import load_config

_log = Logger()


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run egateway, the Jupyter kernel gateway. Settings come from defaults, "
        "then --config (TOML), then EG_* environment variables, then these flags."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file."],
        *flag_table(),
    ]

    def postOptions(self) -> None:
        try:
            file_values = load_toml(self["config"]) if self["config"] else {}
            flags = {key: value for key, value in self.items() if key != "config"}
            self.gateway_config = load_config(file_values, os.environ, flags)
        except ConfigError as e:
            # The message names the key; twistd's full usage text would bury it.
            sys.stderr.write(f"egateway: configuration error: {e}\n")
            raise SystemExit(2) from None

    def opt_version(self) -> None:
        print(f"egateway {__version__}")
        raise SystemExit(0)

    command = ""
    """
    Set by the C{egateway} console script, whose usage line differs.
    """

    def getSynopsis(self) -> str:
        if self.command:
            return f"Usage: {self.command} [options]"
        return super().getSynopsis()

    def getUsage(self, width: int | None = None) -> str:
        # Twisted's flat list of 150 flags hides which belong together and
        # what they default to.
        return (
            f"{self.longdesc}\n\n"
            "  -c, --config=FILE   TOML configuration file (its [section] tables are the groups below).\n"
            "      --version       Print the version and exit.\n"
            "      --help          This text.\n\n"
            f"{help_text()}"
        )


def default_data_dir() -> str:
    """
    Where a gateway that persists kernels keeps its files when no data_dir
    is configured: C{$XDG_DATA_HOME/egateway} (C{~/.local/share/egateway}).
    """
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "egateway")


def default_gateway_id(data_path: str, hostname: str | None = None) -> str:
    """
    The gateway id when none is configured: the host name and a digest of
    the data directory, so the same installation keeps it across restarts
    and two installations on one host (two data directories) differ.
    """
    import hashlib
    import re

    host = re.sub(r"[^A-Za-z0-9.-]", "-", hostname if hostname is not None else socket.gethostname())
    host = host.strip(".-")[:40] or "gateway"
    digest = hashlib.sha256(os.path.abspath(data_path).encode() if data_path else b"").hexdigest()[:12]
    return f"{host}-{digest}"


class DataDirectory(Service):
    """
    The gateway's files: C{runtime/} (connection files, kernel output) and,
    with persistence, the kernel store and its key.  Mode 0700.

    Without a configured directory and without persistence, a temporary
    directory is made at start and removed at stop.
    """

    name = "data-dir"

    def __init__(self, path: str, on_ready: Any) -> None:
        """
        @param path: the directory; empty for a temporary one.
        @param on_ready: called with the runtime directory once it exists.
        """
        self.path = path
        self._on_ready = on_ready
        self._temporary = not path

    def startService(self) -> None:
        super().startService()
        try:
            if self._temporary:
                base = os.environ.get("XDG_RUNTIME_DIR") or None
                self.path = tempfile.mkdtemp(prefix="egateway-", dir=base)
            runtime = os.path.join(self.path, "runtime")
            os.makedirs(runtime, mode=0o700, exist_ok=True)
            os.chmod(self.path, 0o700)
        except OSError as e:
            # A service account without a home, typically: one line, no
            # traceback.
            where = e.filename or self.path or "a temporary directory"
            sys.stderr.write(
                f"egateway: cannot create the data directory {where}: {e.strerror or e}; "
                "set data_dir (--data-dir, EG_DATA_DIR) to a directory this user may write\n"
            )
            raise SystemExit(1) from None
        self._on_ready(runtime)

    def stopService(self) -> None:
        super().stopService()
        if self._temporary:
            shutil.rmtree(self.path, ignore_errors=True)


class GatewayService(OrderedMultiService):
    """
    The whole gateway.  A graceful stop is bounded by C{stop_timeout}.
    """

    def __init__(self, config: Config, clock: Any) -> None:
        super().__init__()
        self.config = config
        self._clock = clock
        self.main_log: Any = None
        """
        The L{egateway.ops.logs.MainLog} when egateway writes the log.
        """
        self.log_observer: Any = None
        """
        Given to twistd as the application's log observer.
        """

    def setServiceParent(self, parent: Any) -> Any:
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            from twisted.logger import ILogObserver

            parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)

    def reopen_logs(self) -> None:
        """
        Reopen the main and audit log files, for logrotate (on SIGHUP).
        """
        if self.main_log is not None:
            self.main_log.reopen()
        if "audit-log" in self.namedServices:
            self.getServiceNamed("audit-log").reopen()
        _log.info("log files reopened")

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            # Say which address and why, instead of a traceback.
            sys.stderr.write(
                f"egateway: cannot listen on {self.config.listen_endpoint}: {e.socketError}\n"
            )
            raise SystemExit(1) from None
        except TLSSetupError as e:
            sys.stderr.write(f"egateway: TLS: {e}\n")
            raise SystemExit(1) from None
        except AuditFileError as e:
            sys.stderr.write(f"egateway: {e}\n")
            raise SystemExit(1) from None

    def startService(self) -> None:
        _log.info(
            "egateway {version} starting; listening on {listen}; config {config}",
            version=__version__,
            listen=self.config.listen_endpoint,
            config=describe(self.config),
        )
        warn_untaken_environment(os.environ, self.config)
        super().startService()

    def stopService(self) -> Any:
        _log.info("egateway stopping")
        stopping = super().stopService()
        if self.config.server.stop_timeout > 0:
            stopping.addTimeout(self.config.server.stop_timeout, self._clock)
            stopping.addErrback(
                lambda f: _log.failure("graceful stop did not finish in time", f)
            )
        return stopping


def warn_untaken_environment(environ: Any, config: Config) -> None:
    """
    One warning naming every C{EG_*}/C{KG_*} variable that does nothing
    here (an Enterprise Gateway setting egateway lacks, a typo).
    """
    from egateway.legacy_env import untaken_environment

    untaken = untaken_environment(environ, config.kernels.inherited_envs)
    if untaken:
        _log.warn(
            "egateway does not take these environment variables, which have no effect: {variables}",
            variables="; ".join(untaken),
        )


def build_service(config: Config, reactor: Any, config_file: str = "") -> GatewayService:
    """
    Construct every part of the gateway for C{config}.

    @param config_file: the file C{config} was read from, if any (its mode
        is checked at start-up).
    """
    from egateway.api.http import GatewaySite
    from egateway.clusters.interface import LauncherContext, LaunchSettings
    from egateway.clusters.ports import PortAllocator, PortRange
    from egateway.clusters.registry import LauncherRegistry
    from egateway.kernels.culling import Culler
    from egateway.kernels.manager import KernelManager
    from egateway.kernels.policy import TenancyPolicy
    from egateway.kernels.specs import KernelSpecCatalog

    top = GatewayService(config, reactor)
    # First: started before anything submits work, stopped after all.
    blocking = BlockingPool(reactor)
    blocking.setServiceParent(top)
    threadpool = blocking.pool
    persistent = config.store.persistence
    data_path = config.server.data_dir or (default_data_dir() if persistent else "")
    gateway_id = config.store.gateway_id or default_gateway_id(data_path)
    context = LauncherContext(
        reactor=reactor,
        runtime_dir="",
        ports=PortAllocator(PortRange.parse(config.kernels.port_range)),
        shared=LaunchSettings.from_config(config, gateway_id),
        threadpool=threadpool,
    )
    DataDirectory(data_path, lambda path: setattr(context, "runtime_dir", path)).setServiceParent(top)
    from egateway.ops.heap import HeapFreeze

    HeapFreeze(reactor).setServiceParent(top)
    if config.ops.turn_budget > 0:
        from egateway.ops.turns import BoundedTurns

        BoundedTurns(reactor, config.ops.turn_budget).setServiceParent(top)
    if config.ops.stall_warning > 0:
        from egateway.ops.stalls import StallWatch

        StallWatch(reactor, config.ops.stall_warning).setServiceParent(top)
    from egateway.api.authenticators import enabled_authenticators
    from egateway.ops.posture import PostureWarnings

    PostureWarnings(
        config, config_file, data_path, authenticators=enabled_authenticators(config.auth)
    ).setServiceParent(top)
    if config.auth.audit_log:
        from egateway.ops.audit import AuditFile

        # Early, so it records everything until the end of the stop.
        AuditFile(config.auth.audit_log, reactor).setServiceParent(top)
    specs = KernelSpecCatalog(
        reactor,
        threadpool,
        extra_dirs=config.kernels.kernelspec_path,
        allowed=config.kernels.allowed_kernelspecs,
        default_name=config.kernels.default_kernel_name,
        reactor=reactor,
    )

    metrics = build_metrics(config, reactor, top)

    def channels() -> Any:
        from egateway.wire.zmq import ZmqChannelFactory

        return ZmqChannelFactory(reactor, require_encryption=config.kernels.kernel_encryption == "required")

    def fatal(message: str) -> None:
        _log.critical("egateway cannot run: {message}", message=message)
        if reactor.running:
            reactor.stop()

    def persistence(manager: Any) -> Any:
        built = build_persistence(
            config, data_path, manager, reactor, gateway_id, blocking, metrics.timed_store if metrics else None
        )
        built.on_fatal = fatal
        # Before the manager: open (and restored from) before it takes
        # requests, closed after its kernels' last records are written.
        built.setServiceParent(top)
        return built

    def sharing(manager: Any, persistence: Any) -> Any:
        from egateway.kernels.sharing import SharedKernels

        if not persistence.shared:
            return None
        shared = SharedKernels(manager, persistence, reactor, config.store.lease_ttl, config.store.journal_entries)
        shared.setServiceParent(top)
        return shared

    launchers = LauncherRegistry(
        context,
        sections={
            "ssh": config.ssh,
            "slurm": config.slurm,
            "docker": config.docker,
            "docker-swarm": config.docker,
            "kubernetes": config.kubernetes,
            "conductor": config.conductor,
            "yarn": config.yarn,
        },
    )
    # Before the store and the manager: stopped once kernels are down.
    launchers.setServiceParent(top)
    manager = KernelManager(
        clock=reactor,
        specs=specs,
        launchers=launchers,
        channels=channels,
        settings=config.kernels,
        gateway_env=os.environ,
        journal_entries=config.store.journal_entries,
        journal_bytes=config.store.journal_bytes,
        journal_total_bytes=config.store.journal_total_bytes,
        policy=TenancyPolicy.from_config(config),
        persistence=persistence if persistent else None,
        sharing=sharing,
    )

    manager.setServiceParent(top)
    pools = build_pools(config, manager, reactor, top)
    if persistent:
        from egateway.kernels.reconcile import Reconciler

        # Stopping, it starts no new action, so none begins while the
        # manager hands its kernels over to the next gateway.
        Reconciler(
            manager=manager,
            persistence=manager.persistence,
            gateway_id=gateway_id,
            mode=config.store.reconcile,
            interval=config.store.reconcile_interval,
            clock=reactor,
        ).setServiceParent(top)
    culler = Culler(manager, config.culling, reactor)
    culler.setServiceParent(top)
    api, front = build_api(config, manager, reactor, threadpool, metrics)
    if metrics is not None:
        metrics.watch_manager(manager)
        metrics.watch(relay=api.channels.relay, culler=culler, front=front, pools=pools)
        serve_metrics_apart(config, metrics, reactor, top)
    # Before the listener: token files and keys load as it starts.
    front.authentication.setServiceParent(top)
    from egateway.ops.dashboard import AdminCookie

    site = GatewaySite(AdminCookie(front, config.server.base_url), max_body=config.server.max_request_body)
    listen, served = build_tls(config, context, reactor, threadpool, top, site)
    listener = strports.service(listen, served, reactor=reactor)
    listener.setName("http")
    listener.setServiceParent(top)
    # After the listener: it starts once the port is bound, and stops first.
    systemd_notifier(manager, reactor).setServiceParent(top)
    # After the listener, so it stops first and ends the open event streams.
    api.dashboard.setServiceParent(top)
    top.api = api  # type: ignore[attr-defined]
    top.manager = manager  # type: ignore[attr-defined]
    top.site = site  # type: ignore[attr-defined]
    expose_probes(front, api.ops, config.server.base_url)
    build_operations(config, reactor, top, api.ops, listener)
    return top


def build_pools(config: Config, manager: Any, reactor: Any, top: MultiService) -> Any:
    """
    The warm pools of the C{[pools.*]} tables (none with impersonation: a
    pooled kernel cannot become another OS user), after the manager so
    they stop first.
    """
    from egateway.kernels.pools import KernelPools, pools_from_config

    pools = pools_from_config(config.pools, config.profiles)
    if not pools:
        return None
    if config.impersonation.impersonation_enabled:
        _log.warn("warm pools are not used with impersonation_enabled: kernels must start as their user")
        return None
    service = KernelPools(manager=manager, clock=reactor, pools=pools)
    service.setServiceParent(top)
    return service


def systemd_notifier(manager: Any, reactor: Any) -> Service:
    """
    The service telling systemd (C{Type=notify}) the gateway is ready once
    the kernels of its store are restored.
    """
    from twisted.internet.defer import Deferred

    from egateway.ops.systemd import SystemdNotifier

    restored: Deferred[None] = Deferred()
    if manager.persistence is None:
        restored.callback(None)
    else:

        async def after_restore() -> None:
            if not restored.called:
                restored.callback(None)

        manager.persistence.restored.append(after_restore)
    return SystemdNotifier(reactor, restored)


def build_tls(
    config: Config, context: Any, reactor: Any, threadpool: Any, top: MultiService, site: Any
) -> tuple[str, Any]:
    """
    TLS for the HTTP listener (an C{ssl:} description or C{certfile}) and,
    with C{response_tls}, for the response listener, under one service that
    loads the certificates before the listeners start and reloads them on
    SIGHUP.

    @return: the plain endpoint description to listen on and the factory
        to serve there (the site, or the site behind TLS).
    """
    from egateway.ops.tls import TLSService, listener_files

    plan = listener_files(config.listen_endpoint, config.server)
    if plan.files is None:
        return plan.description, site
    tls = TLSService(reactor, threadpool)
    tls.setServiceParent(top)
    top.tls = tls  # type: ignore[attr-defined]
    if config.response.response_tls:
        from egateway.clusters.response import ResponseListener

        # Created here so it gets the certificate; remote launchers find it
        # in the context and start it on first use.
        context.services["response"] = ResponseListener.from_config(
            reactor,
            config.response,
            tls=tls.add(plan.files.without_client_certificates(), "response"),
        )
    return plan.description, tls.add(plan.files, "HTTP").wrap(site)


def build_metrics(config: Config, reactor: Any, top: MultiService) -> Any:
    """
    The gateway's metrics, when C{/metrics} is served anywhere; else
    C{None}.
    """
    if not config.metrics.enabled:
        return None
    from egateway.ops.metrics import GatewayMetrics

    metrics = GatewayMetrics(config.metrics, reactor)
    metrics.setServiceParent(top)
    return metrics


def serve_metrics_apart(config: Config, metrics: Any, reactor: Any, top: MultiService) -> None:
    """
    The listener of its own for C{/metrics} (C{metrics_listen}), if any.
    """
    if not config.metrics.metrics_listen:
        return
    from egateway.api.http import GatewaySite
    from egateway.api.metrics import MetricsAccess, MetricsResource

    from egateway.api.authenticators.limiter import FailureLimiter

    limiter = FailureLimiter(reactor, config.auth.auth_failure_limit, config.auth.auth_failure_window)
    access = MetricsAccess(config.metrics.metrics_token, config.metrics.metrics_networks, limiter=limiter)
    site = GatewaySite(MetricsResource(metrics, access), max_body=1024)
    listener = strports.service(config.metrics.metrics_listen, site, reactor=reactor)
    listener.setName("metrics-http")
    listener.setServiceParent(top)


def build_persistence(
    config: Config, data_path: str, manager: Any, reactor: Any, gateway_id: str, blocking: Any, wrap: Any = None
) -> Any:
    """
    Kernel persistence on the configured store: Redis when C{store_url}
    says so (its key must be given: every gateway sharing it needs the same
    one), otherwise SQLite in the data directory with a key file created
    there on first use.

    @param gateway_id: the installation's id, written in its records.
    @param blocking: the L{BlockingPool} that reads the key file.
    @param wrap: applied to the store once opened (the metrics time it).
    """
    import uuid

    from egateway.kernels.persistence import KernelPersistence
    from egateway.ops.memory import release_freed_memory
    from egateway.store import SecretBox, load_or_create_key_file_blocking, open_store, parse_store_url

    settings = config.store
    location = settings.store_url or os.path.join(data_path, "kernels.sqlite3")
    kind, _ = parse_store_url(location)
    shared = kind == "redis"

    async def open_configured() -> Any:
        if settings.store_key:
            box = SecretBox.from_key(settings.store_key)
        else:
            key_file = settings.store_key_file or os.path.join(data_path, "store.key")
            box = await blocking.run(load_or_create_key_file_blocking, key_file, not shared)
        store = open_store(location, box, reactor)
        return wrap(store) if wrap is not None else store

    persistence = KernelPersistence(
        open_configured,
        shared,
        manager,
        reactor,
        gateway_id=gateway_id,
        instance_id=f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
        on_stop=settings.on_stop,
    )
    persistence.restored.append(lambda: release_freed_memory(blocking.run, "store restored"))
    return persistence


def build_api(config: Config, manager: Any, reactor: Any, threadpool: Any, metrics: Any = None) -> tuple[Any, Any]:
    """
    The REST and WebSocket routes over C{manager}, behind the front resource
    that applies authentication and CORS.

    @return: the L{GatewayAPI} and the resource to serve.
    """
    from egateway.api.cors import CorsPolicy
    from egateway.api.authenticators import build_authentication
    from egateway.api.hosts import HostPolicy
    from egateway.api.http import FrontResource
    from egateway.api.routes import GatewayAPI
    from egateway.api.websocket import ChannelsEndpoint
    from egateway.kernels.sessions import SessionManager

    cors = CorsPolicy(config.auth)
    api = GatewayAPI(
        kernels=manager,
        sessions=SessionManager(manager),
        channels=ChannelsEndpoint(
            manager,
            cors,
            config.server.max_ws_message,
            config.server.ws_ping_interval,
            config.kernels.kernel_info_timeout,
            reactor,
            client_message_limit=config.server.client_message_limit,
            ack_delay=config.server.ws_ack_delay,
        ),
        base_url=config.server.base_url,
        list_kernels=config.auth.list_kernels,
        reactor=reactor,
        threadpool=threadpool,
        metrics=metrics if config.metrics.on_main_listener else None,
    )
    # Health, readiness and drain; the front serves the probes unauthenticated.
    api.ops = build_ops_routes(config, manager, reactor, api.app)  # type: ignore[attr-defined]
    from egateway.ops.audit import watch_kernels

    watch_kernels(manager)
    api.dashboard = build_dashboard(config, manager, reactor, threadpool)
    api.dashboard.register(api.app)
    authentication = build_authentication(config.auth, reactor, threadpool)
    api.channels.watch_credentials(authentication)
    front = FrontResource(
        api.resource(),
        authentication,
        cors,
        HostPolicy(config.listen_endpoint, config.auth.allowed_hosts),
        metrics=main_listener_metrics(config, authentication.limiter),
    )
    return api, front


def build_dashboard(config: Config, manager: Any, reactor: Any, threadpool: Any) -> Any:
    """
    The admin dashboard over C{manager}; its "cull now" runs one pass of
    the configured culling (with culling off, it culls dead kernels only).
    """
    from egateway.kernels.culling import Culler
    from egateway.ops.dashboard import AdminDashboard

    culler = Culler(manager, config.culling, reactor)

    def cull_now() -> int:
        culled = 0
        for kernel in list(manager.kernels.values()):
            reason = culler.reason_to_cull(kernel)
            if reason and (config.culling.cull_idle_timeout > 0 or kernel.state.value == "dead"):
                culler.cull_one(kernel, reason)
                culled += 1
        return culled

    return AdminDashboard(
        manager=manager,
        cull=cull_now,
        base_url=config.server.base_url,
        reactor=reactor,
        threadpool=threadpool,
        remote_hosts=config.ssh.remote_hosts,
    )


def build_ops_routes(config: Config, manager: Any, reactor: Any, app: Any) -> Any:
    """
    Health, readiness and drain (L{egateway.ops.health}), registered on the
    API's Klein C{app}; the drain is one of C{manager}'s admission checks.
    """
    from egateway.ops.health import Drain, OpsRoutes, Readiness

    drain = Drain(config.ops.drain_retry_after)
    manager.admission_checks.append(drain.check)
    readiness = Readiness(reactor, drain, lambda: manager.persistence, config.ops.readiness_timeout)
    ops = OpsRoutes(drain, readiness)
    ops.register(app, config.server.base_url)
    return ops


def expose_probes(front: Any, ops: Any, base_url: str) -> None:
    """
    Let C{front} serve the health probes without authentication.
    """
    front.public_paths = ops.public_paths(base_url)


def build_operations(config: Config, reactor: Any, top: MultiService, ops: Any, listener: Any) -> None:
    """
    The operator's controls: SIGUSR1 drains, SIGHUP reopens the log files
    (and, in L{build_tls}, reloads certificates), /readyz watches the HTTP
    listener, and the SSH manhole when configured.
    """
    import signal

    from egateway.ops.signals import SignalAction

    ops.readiness.listeners.append(listener)
    SignalAction(reactor, signal.SIGUSR1, ops.drain_on_signal).setServiceParent(top)
    SignalAction(reactor, signal.SIGHUP, top.reopen_logs).setServiceParent(top)
    top.ops = ops  # type: ignore[attr-defined]
    settings = config.ops
    if settings.manhole_listen:
        from egateway.ops.manhole import ManholeService, namespace

        data_dir = top.getServiceNamed("data-dir")
        ManholeService(
            settings.manhole_listen,
            settings.manhole_authorized_keys,
            lambda: settings.manhole_host_key or os.path.join(data_dir.path, "manhole_host_key"),
            lambda: namespace(top, top.manager),  # type: ignore[attr-defined]
            reactor,
        ).setServiceParent(top)


def main_listener_metrics(config: Config, limiter: Any) -> Any:
    """
    Who may read C{/metrics} on the main listener (wrong tokens counted by
    C{limiter}, the API's), or C{None} when it is not served there.
    """
    if not config.metrics.on_main_listener:
        return None
    from egateway.api.metrics import MetricsAccess

    return MetricsAccess.from_config(config.metrics, config.server.base_url, limiter)


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    The gateway for twistd or twist, whose options are C{options.parent}:
    egateway's main log replaces the runner's, and C{twistd -n} writes no
    C{twistd.pid} unless told to.
    """
    top = _gateway_service(options, reactor)
    runner = getattr(options, "parent", None)
    try:
        top.main_log = install_log(options.gateway_config.ops, runner, top)  # type: ignore[attr-defined]
    except LogSetupError as e:
        sys.stderr.write(f"egateway: {e}\n")
        raise SystemExit(1) from None
    if runner is not None and "pidfile" in runner and runner.get("nodaemon"):
        # twistd -n would leave twistd.pid wherever it was started; a
        # foreground daemon's supervisor knows its pid.  An explicit
        # --pidfile (another name) is kept.
        if runner["pidfile"] == os.path.abspath("twistd.pid"):
            runner["pidfile"] = ""
    return top


def _gateway_service(options: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    from egateway.ops.posture import protect_process

    # The daemon only (tests build services in their own processes).
    protect_process()
    return build_service(options.gateway_config, reactor, config_file=options["config"] or "")
