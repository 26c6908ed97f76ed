"""
Prometheus metrics: C{GET /metrics} in the text exposition format.

Each gateway has its own L{CollectorRegistry} (tests run several gateways
in one process, and nothing of one may show in another's scrape).  Two
kinds of figures feed it:

  - events that happen a few times per kernel (a launch ends, a restart, a
    store operation) update C{prometheus_client} counters and histograms
    where they happen, through the kernel manager's listeners and a wrapper
    around the store;
  - figures of the hot path (messages and bytes relayed, journal drops) and
    of the current state (kernels by state, WebSocket connections) are plain
    Python integers kept where they change, or read off the kernel manager,
    and turned into samples only when a scraper asks (L{_ScrapeCollector}):
    relaying a message costs an integer add, not a call into the library.

Who may read C{/metrics} is decided in L{egateway.api.metrics}.
"""

from __future__ import annotations

import math
from collections import Counter as Tally
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.process_collector import ProcessCollector
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from egateway import __version__
from egateway.config import MetricsConfig
from egateway.store.interface import IKernelStore
from egateway.wire.ws_formats import CHANNELS


LAG_INTERVAL = 1.0
"""
Seconds between two firings of the reactor-lag probe.
"""

OTHER_USERS = "(other)"

LAUNCH_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

STORE_OPERATIONS = tuple(sorted(name for name in IKernelStore.names() if name != "shared"))
"""
The store's operations, each timed under its own C{operation} label.
"""


class RelayCounts:
    """
    Messages and bytes relayed between WebSocket clients and kernels, kept
    by the channels endpoint as plain integers: C{to_client[channel]} and
    C{from_client[channel]} are C{[messages, bytes]}.

    @ivar opened: WebSocket connections opened, by protocol.
    """

    def __init__(self) -> None:
        self.to_client: dict[str, list[int]] = {channel: [0, 0] for channel in sorted(CHANNELS)}
        self.from_client: dict[str, list[int]] = {
            channel: [0, 0] for channel in sorted(CHANNELS) if channel != "iopub"
        }
        self.opened: dict[str, int] = {"legacy": 0, "v1": 0}


class ReactorLagProbe:
    """
    How late the reactor runs a timed call: a L{LoopingCall} on the injected
    clock, each firing measured against the moment it was due.  A reactor
    blocked by a slow callback fires late by about as long as it was
    blocked.
    """

    def __init__(self, clock: Any, observe: Callable[[float], None], interval: float = LAG_INTERVAL) -> None:
        """
        @param observe: called with each firing's lateness in seconds.
        """
        self._clock = clock
        self._observe = observe
        self._interval = interval
        self._loop: LoopingCall | None = None
        self._start = 0.0
        self._due = 0.0

    def start(self) -> None:
        self._loop = LoopingCall(self._fired)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False)
        self._start = self._loop.starttime
        self._due = self._start + self._interval

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _fired(self) -> None:
        now = self._clock.seconds()
        self._observe(max(0.0, now - self._due))
        # Where LoopingCall schedules the next firing: the next multiple of
        # the interval after now (missed ones are skipped, not queued).
        intervals = math.floor((now - self._start) / self._interval) + 1
        self._due = self._start + intervals * self._interval


class TimedStore:
    """
    A kernel store whose every operation is timed, and counted when it
    fails; everything else passes through to the store.
    """

    def __init__(self, store: Any, clock: Any, seconds: Histogram, errors: Counter) -> None:
        self._store = store
        self._clock = clock
        self._seconds = seconds
        self._errors = errors

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._store, name)
        if name not in STORE_OPERATIONS or not callable(value):
            return value

        def timed(*args: Any, **kwargs: Any) -> Deferred[Any]:
            began = self._clock.seconds()

            def record(result: Any) -> Any:
                self._seconds.labels(name).observe(max(0.0, self._clock.seconds() - began))
                if isinstance(result, Failure) and not result.check(CancelledError):
                    self._errors.labels(name).inc()
                return result

            return value(*args, **kwargs).addBoth(record)

        return timed


class GatewayMetrics(Service):
    """
    The metrics of one gateway: its registry, what feeds it, and the
    reactor-lag probe (running while the service runs).

    Tell it what to read with the C{watch_*} methods before a scrape.
    """

    name = "metrics"

    def __init__(self, settings: MetricsConfig, clock: Any, lag_interval: float = LAG_INTERVAL) -> None:
        self.settings = settings
        self._clock = clock
        registry = self.registry = CollectorRegistry()
        self.launches_succeeded = Counter(
            "egateway_launches_succeeded", "Kernel launches that ended with a ready kernel.", ["launcher"],
            registry=registry,
        )
        self.launches_failed = Counter(
            "egateway_launches_failed",
            "Kernel launches that failed, by cause: timeout, exited (the kernel ended before answering), "
            "launcher (the launcher refused or failed), cancelled (shut down while launching), error.",
            ["launcher", "reason"],
            registry=registry,
        )
        self.launch_duration = Histogram(
            "egateway_launch_duration_seconds", "Time from a launch request to a ready kernel.", ["launcher"],
            buckets=LAUNCH_BUCKETS, registry=registry,
        )
        self.launch_phase = Histogram(
            "egateway_launch_phase_seconds",
            "Time each launch phase took to be reached from the one before (successful launches).",
            ["launcher", "phase"],
            buckets=PHASE_BUCKETS, registry=registry,
        )
        self.restarts = Counter(
            "egateway_restarts", "Kernel restarts asked for by clients, completed.", ["launcher"], registry=registry
        )
        self.auto_restarts = Counter(
            "egateway_auto_restarts", "Automatic restarts of kernels that died, completed.", ["launcher"],
            registry=registry,
        )
        self.deaths = Counter(
            "egateway_kernel_deaths",
            "Kernels declared dead (restart limit reached, restart failed, ended outside the gateway).",
            ["launcher"],
            registry=registry,
        )
        self.store_seconds = Histogram(
            "egateway_store_operation_seconds", "Time each kernel store operation took.", ["operation"],
            buckets=STORE_BUCKETS, registry=registry,
        )
        self.store_errors = Counter(
            "egateway_store_errors", "Kernel store operations that failed.", ["operation"], registry=registry
        )
        self.reactor_lag = Histogram(
            "egateway_reactor_lag_seconds",
            f"How late a call timed every {lag_interval:g} s runs: time the reactor spent blocked.",
            buckets=LAG_BUCKETS, registry=registry,
        )
        self.reactor_lag_last = Gauge(
            "egateway_reactor_lag_last_seconds", "The reactor lag measured last.", registry=registry
        )
        Gauge("egateway_build_info", "The gateway's version.", ["version"], registry=registry).labels(
            __version__
        ).set(1)
        ProcessCollector(registry=registry)
        self._scrape = _ScrapeCollector(settings.metrics_users)
        registry.register(self._scrape)
        self._probe = ReactorLagProbe(clock, self._lag, lag_interval)

    # -- sources -------------------------------------------------------

    def watch_manager(self, manager: Any) -> None:
        """
        Count launches, restarts and deaths from C{manager}'s events, and
        read its kernels and journal counts at each scrape.
        """
        if self.kernel_event not in manager.listeners:
            manager.listeners.append(self.kernel_event)
        self._scrape.manager = manager

    def watch(self, **sources: Any) -> None:
        """
        Read these at each scrape: C{relay} (L{RelayCounts}), C{culler}
        (its C{culls}), C{front} (the front resource's C{refused}).
        """
        for name, source in sources.items():
            setattr(self._scrape, name, source)

    def timed_store(self, store: Any) -> TimedStore:
        """
        C{store}, with its operations timed.
        """
        for operation in STORE_OPERATIONS:
            # Every operation shows, at zero until it happens.
            self.store_seconds.labels(operation)
            self.store_errors.labels(operation)
        return TimedStore(store, self._clock, self.store_seconds, self.store_errors)

    # -- events --------------------------------------------------------

    def kernel_event(self, event: str, kernel: Any) -> None:
        launcher = kernel.launcher_name
        if event == "started":
            self.launches_succeeded.labels(launcher).inc()
            phases = kernel.phases
            if phases:
                self.launch_duration.labels(launcher).observe(max(0.0, phases[-1].at - phases[0].at))
            for previous, current in zip(phases, phases[1:]):
                self.launch_phase.labels(launcher, current.phase.name.lower()).observe(
                    max(0.0, current.at - previous.at)
                )
        elif event == "failed":
            self.launches_failed.labels(launcher, getattr(kernel, "launch_failure", "error")).inc()
        elif event == "restarted":
            self.restarts.labels(launcher).inc()
        elif event == "auto-restarted":
            self.auto_restarts.labels(launcher).inc()
        elif event == "dead":
            self.deaths.labels(launcher).inc()

    def _lag(self, seconds: float) -> None:
        self.reactor_lag.observe(seconds)
        self.reactor_lag_last.set(seconds)

    # -- service and exposition ----------------------------------------

    def startService(self) -> None:
        super().startService()
        self._probe.start()

    def stopService(self) -> None:
        super().stopService()
        self._probe.stop()

    def exposition(self) -> bytes:
        """
        Every metric, in the Prometheus text format.
        """
        return generate_latest(self.registry)


class _ScrapeCollector:
    """
    The figures read at scrape time: kernels by state, WebSocket
    connections, relayed messages and bytes, journal drops, culls and
    refused requests.
    """

    def __init__(self, users: int) -> None:
        self._users = users
        self.manager: Any = None
        self.relay: RelayCounts | None = None
        self.culler: Any = None
        self.front: Any = None
        self.pools: Any = None
        self._seen: set[tuple[str, ...]] = set()

    def collect(self) -> Iterator[Any]:
        yield from self._kernels()
        yield from self._pools()
        yield from self._relay()
        manager = self.manager
        journal = manager.journal_limits if manager is not None else None
        started = getattr(manager, "launches_started", None) or {}
        yield _counter(
            "egateway_launches_started",
            "Kernel launches started (admitted and handed to a launcher).",
            ["launcher"],
            {(name,): count for name, count in started.items()},
        )
        yield _counter(
            "egateway_journal_dropped_messages",
            "Messages trimmed off parked session journals by journal_entries, journal_bytes or journal_total_bytes.",
            [],
            {(): getattr(journal, "dropped", 0)},
        )
        held = getattr(journal, "held", None)
        yield _counter(
            "egateway_journal_shed_messages",
            "Messages dropped off journals and iopub rings to keep their total within journal_total_bytes.",
            [],
            {(): getattr(held, "shed", 0)},
        )
        yield GaugeMetricFamily(
            "egateway_journal_held_bytes",
            "Bytes of messages held by all journals and iopub rings (each holder counts what it holds).",
            value=getattr(held, "total", 0),
        )
        yield _counter(
            "egateway_journal_lost_messages",
            "Messages a reconnecting client missed because they had left the journal.",
            [],
            {(): getattr(journal, "lost", 0)},
        )
        culls = getattr(self.culler, "culls", None) or {"idle": 0, "dead": 0}
        yield _counter(
            "egateway_culls", "Kernels culled, by why: idle, or dead.", ["reason"],
            {(reason,): count for reason, count in culls.items()},
        )
        refused = getattr(self.front, "refused", None) or {}
        yield _counter(
            "egateway_auth_failures",
            "Requests refused before reaching a route, by status: 401 (no or wrong credentials), 403 (Host, "
            "Origin, or a network not allowed /metrics), 429 (too many failures), 503 (identity provider down).",
            ["status"],
            {(str(status),): count for status, count in sorted(refused.items())},
        )

    def _kernels(self) -> Iterator[Any]:
        labels = ["state", "launcher", "kernelspec"]
        held = self.manager.kernels.values() if self.manager is not None else ()
        # Warm pools' kernels are counted apart (egateway_pool_kernels).
        kernels = [k for k in held if not getattr(k, "pooled", False)]
        users: dict[str, str] = {}
        if self._users:
            labels.append("user")
            per_user = Tally(kernel.owner for kernel in kernels)
            ranked = sorted(per_user, key=lambda user: (-per_user[user], user))
            users = {user: user if rank < self._users else OTHER_USERS for rank, user in enumerate(ranked)}
        counts: Tally[tuple[str, ...]] = Tally()
        for kernel in kernels:
            key = (kernel.state.value, kernel.launcher_name, kernel.spec.name)
            if self._users:
                key += (users[kernel.owner],)
            else:
                # A series that was there drops to 0 rather than vanishing.
                self._seen.add(key)
            counts[key] += 1
        family = GaugeMetricFamily(
            "egateway_kernels", "Kernels this gateway holds, by state, launcher and kernelspec.", labels=labels
        )
        for key in sorted(set(counts) | (set() if self._users else self._seen)):
            family.add_metric(list(key), counts.get(key, 0))
        yield family
        connections = GaugeMetricFamily("egateway_websocket_connections", "WebSocket clients connected now.")
        connections.add_metric([], sum(kernel.connections for kernel in kernels))
        yield connections

    def _pools(self) -> Iterator[Any]:
        """
        Warm pools, apart from C{egateway_kernels} (which counts only
        kernels handed to users).
        """
        pools = self.pools
        if pools is None:
            return
        family = GaugeMetricFamily(
            "egateway_pool_kernels", "Kernels waiting in warm pools, by pool and state (ready, launching).",
            labels=["pool", "state"],
        )
        for key, count in sorted(pools.counts().items()):
            family.add_metric(list(key), count)
        yield family
        yield _counter(
            "egateway_pool_takes", "Start requests served from a warm pool.", ["pool"],
            {(name,): pools.takes.get(name, 0) for name in pools.pools},
        )
        yield _counter(
            "egateway_pool_misses",
            "Start requests a warm pool matched but did not serve (none ready, or binding failed).", ["pool"],
            {(name,): pools.misses.get(name, 0) for name in pools.pools},
        )

    def _relay(self) -> Iterator[Any]:
        relay = self.relay or RelayCounts()
        messages: dict[tuple[str, ...], int] = {}
        size: dict[tuple[str, ...], int] = {}
        for direction, table in (("to_client", relay.to_client), ("from_client", relay.from_client)):
            for channel, (count, length) in table.items():
                messages[(channel, direction)] = count
                size[(channel, direction)] = length
        yield _counter(
            "egateway_websocket_connections_opened", "WebSocket connections opened, by protocol.", ["protocol"],
            {(protocol,): count for protocol, count in relay.opened.items()},
        )
        yield _counter(
            "egateway_relayed_messages", "Messages relayed over WebSockets, by channel and direction.",
            ["channel", "direction"], messages,
        )
        yield _counter(
            "egateway_relayed_bytes", "Bytes of the messages relayed over WebSockets, by channel and direction.",
            ["channel", "direction"], size,
        )


def _counter(name: str, documentation: str, labels: list[str], values: dict[tuple[str, ...], int]) -> Any:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, value in values.items():
        family.add_metric(list(key), value)
    return family
