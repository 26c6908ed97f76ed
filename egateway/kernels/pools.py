"""
Warm pools: kernels started ahead, handed to start requests with late
binding (L{egateway.kernels.binding}).

Each C{[pools.<name>]} table keeps C{size} kernels of one kernelspec (and
profile) started by its launcher, whichever it is.  A pooled kernel is a
kernel of the manager like any other: it counts against C{max_kernels} and
its profile's C{max_kernels}, but it is owned by no user until bound, so it
counts against no user's or group's quota, and the API does not show it.

A start request is served from a pool only when binding gives the kernel
the state a fresh start would have: same kernelspec and profile, the same
launcher config (no client value the launcher consumes at launch: image,
namespace, cpus...), no client-chosen C{KERNEL_ID}, a kernelspec whose
language can be bound, and no impersonation (a pooled kernel runs as the
gateway's user).  Anything else is started fresh, as without pools.

Pools are refilled in the background after each take, death and failed
launch (failures back off).  They drain when the gateway stops: pooled
kernels are shut down, never kept for the next gateway; that one fills its
own pools.  Pooled kernels are not recorded in the store until bound, so
with a store shared by gateways each gateway's pooled kernels are its own.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from egateway.clusters.interface import ExitStatus
from egateway.config import ConfigError
from egateway.errors import GatewayError, LimitReached
from egateway.kernels.admission import Admission, StartRequest
from egateway.kernels.binding import WORKING_DIR, BindFailed, bind, supports_binding
from egateway.kernels.kernel import Kernel
from egateway.kernels.launching import launch_timeout
from egateway.kernels.policy import ENDED, Caller, LaunchPlan
from egateway.kernels.specs import KernelSpec, NoSuchKernelSpec
from egateway.kernels.state import KernelState

_log = Logger()

ALWAYS_BINDABLE = frozenset({"KERNEL_USERNAME", WORKING_DIR, "KERNEL_PROFILE", "KERNEL_LAUNCH_TIMEOUT"})
"""
Client C{KERNEL_*} names binding can always apply: who, where, which
profile (matched), and a launch timeout a ready kernel does not need.
"""

BIND_TIMEOUT = 10.0
"""
Most seconds a binding may take (one trivial execute): a pooled kernel that
does not answer sooner is discarded and the request started afresh, within
its launch timeout still.
"""

RETRY_FIRST = 2.0
RETRY_MOST = 60.0
"""
Seconds before a pool whose launch failed (or found no room) tries again:
doubling from the first to the most.
"""


@dataclass
class Pool:
    """
    One warm pool and the kernels it holds (launching and ready).
    """

    name: str
    kernelspec: str
    profile: str | None
    size: int
    bindable: frozenset[str]
    kernels: list[Kernel] = field(default_factory=list)
    failures: int = 0
    retry: IDelayedCall | None = None
    refilling: bool = False

    def ready(self) -> list[Kernel]:
        return [k for k in self.kernels if k.pooled and k.state == KernelState.RUNNING and k.live]

    def may_bind(self, accepted: Iterable[str]) -> bool:
        """
        Whether binding can apply every client value in C{accepted}.
        """
        return all(not name.startswith("KERNEL_") or name in self.bindable for name in accepted)


def pools_from_config(tables: Mapping[str, Any], profiles: Mapping[str, Any]) -> list[Pool]:
    """
    The pools the C{[pools.<name>]} tables describe.

    @raise ConfigError: a pool names an unknown profile.
    """
    pools = []
    for name, table in tables.items():
        profile = table.profile or None
        if profile is not None and profile not in profiles:
            raise ConfigError(f"pools.{name}.profile: no profile named {profile!r} ([profiles.{profile}])")
        if table.size <= 0:
            continue
        pools.append(
            Pool(
                name=name,
                kernelspec=table.kernelspec or name,
                profile=profile,
                size=table.size,
                bindable=ALWAYS_BINDABLE | frozenset(table.bindable_envs),
            )
        )
    return pools


def check_config(tables: Mapping[str, Any], profiles: Mapping[str, Any]) -> None:
    """
    @raise ConfigError: a C{[pools.<name>]} table names an unknown profile.
    """
    pools_from_config(tables, profiles)


class KernelPools(Service):
    """
    The gateway's warm pools.

    @ivar takes: start requests served from each pool.
    @ivar misses: start requests a pool matched but could not serve (none
        ready, or binding failed), by pool.
    """

    name = "pools"

    def __init__(self, *, manager: Any, clock: IReactorTime, pools: Iterable[Pool]) -> None:
        """
        @param manager: the L{egateway.kernels.manager.KernelManager} whose
            kernels the pooled ones are; it is told to ask these pools.
        """
        self._manager = manager
        self._clock = clock
        self.pools = {pool.name: pool for pool in pools}
        self.takes: Counter[str] = Counter()
        self.misses: Counter[str] = Counter()
        self._draining = False
        self._waiting: list[tuple[str, int, Deferred[None]]] = []
        manager.pools = self
        manager.listeners.append(self._kernel_event)

    # -- service -------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._draining = False
        for pool in self.pools.values():
            self._clock.callLater(0, self.refill, pool)

    def stopService(self) -> None:
        super().stopService()
        self._stop_retries()

    def _stop_retries(self) -> None:
        for pool in self.pools.values():
            if pool.retry is not None and pool.retry.active():
                pool.retry.cancel()
            pool.retry = None

    async def drain(self) -> None:
        """
        Stop refilling and shut every pooled kernel down, in parallel (the
        manager calls this first when it stops: pooled kernels are never
        kept for a next gateway).
        """
        self._draining = True
        self._stop_retries()
        kernels = [k for pool in self.pools.values() for k in pool.kernels]
        for pool in self.pools.values():
            pool.kernels.clear()
        if kernels:
            _log.info("draining warm pools: shutting down {count} pooled kernels", count=len(kernels))
        await DeferredList(
            [
                self._manager.shutdown(kernel.id, reason="the gateway is stopping; warm pools drain").addErrback(
                    lambda f, kid=kernel.id: _log.failure("draining pooled kernel {kid}", f, kid=kid)
                )
                for kernel in kernels
                if kernel.id in self._manager.kernels
            ]
        )

    @property
    def refilling(self) -> bool:
        return self.running and not self._draining

    # -- refill --------------------------------------------------------

    def refill(self, pool: Pool) -> None:
        """
        Start kernels until C{pool} holds its size (launching ones count).
        """
        if not self.refilling or pool.refilling or len(pool.kernels) >= pool.size:
            return
        pool.refilling = True
        Deferred.fromCoroutine(self._refill(pool)).addErrback(
            lambda f: _log.failure("refilling warm pool {pool}", f, pool=pool.name)
        )

    async def _refill(self, pool: Pool) -> None:
        try:
            try:
                spec = await self._manager.specs.get(pool.kernelspec)
            except CancelledError:
                raise
            except Exception as e:
                pool.failures += 1
                why = "it does not exist" if isinstance(e, NoSuchKernelSpec) else str(e)
                _log.error(
                    "warm pool {pool}: cannot read kernelspec {spec} ({why}); install it or fix [pools.{pool}]",
                    pool=pool.name,
                    spec=pool.kernelspec,
                    why=why,
                )
                self._retry_later(pool)
                return
            for _ in range(pool.size - len(pool.kernels)):
                if not self.refilling or (pool.retry is not None and pool.retry.active()):
                    # A launch failed (at once): wait for the retry.
                    return
                try:
                    kernel = self._admit(pool, spec)
                except GatewayError as e:
                    _log.warn(
                        "warm pool {pool}: cannot start a kernel now ({error}); trying again later",
                        pool=pool.name,
                        error=str(e),
                    )
                    self._retry_later(pool)
                    return
                pool.kernels.append(kernel)
                self._manager.start_operation(kernel, "launch", self._launch, pool, observed=False)
        finally:
            pool.refilling = False

    def _admit(self, pool: Pool, spec: KernelSpec) -> Kernel:
        """
        Register a kernel for C{pool}: counted against C{max_kernels} and
        its profile's C{max_kernels}, owned by nobody.

        @raise LimitReached: no room.
        """
        manager = self._manager
        manager.admission.check_max_kernels()
        policy = manager.policy
        profile = policy.profiles.get(pool.profile) if pool.profile else None
        if profile is not None and profile.max_kernels:
            used = sum(1 for k in manager.kernels.values() if k.state not in ENDED and k.profile == profile.name)
            if used >= profile.max_kernels:
                raise LimitReached(f"profile {profile.name!r}'s max_kernels limit of {profile.max_kernels} is reached")
        kernel_id = str(uuid.uuid4())
        username = manager.admission.default_username
        plan = LaunchPlan("", frozenset(), profile, policy.launcher_config(spec, pool.profile, {}))
        request = StartRequest(kernel_id=kernel_id, spec_name=spec.name, username=username, client_env={})
        env = manager.admission.environment(request, spec, plan, {}, kernel_id)
        kernel = manager.register(
            Admission(
                kernel_id=kernel_id,
                spec=spec,
                username=username,
                env=env,
                launcher_name=spec.launcher_name,
                owner="",
                owner_groups=frozenset(),
                profile=pool.profile,
                launcher_config=plan.launcher_config,
                timeout=launch_timeout(env, manager.settings),
            )
        )
        kernel.pooled = True
        kernel.pool = pool.name
        return kernel

    async def _launch(self, kernel: Kernel, pool: Pool) -> None:
        manager = self._manager
        try:
            await manager.launching.launch(kernel)
        except BaseException as e:
            if kernel.state == KernelState.LAUNCHING:
                kernel.transition(KernelState.FAILED, str(e))
                kernel.transition(KernelState.GONE)
                manager.kernels.pop(kernel.id, None)
            self._leave(pool, kernel)
            if isinstance(e, CancelledError):
                return
            pool.failures += 1
            _log.error(
                "warm pool {pool}: kernel {kernel_id} failed to start: {error}",
                pool=pool.name,
                kernel_id=kernel.id,
                error=str(e),
            )
            self._retry_later(pool)
            return
        pool.failures = 0
        kernel.transition(KernelState.RUNNING, f"ready in warm pool {pool.name}")
        self._tell_waiting()
        process = kernel.process
        if process is not None:
            process.when_exited().addCallback(lambda status: self._died(pool, kernel, status))

    def _died(self, pool: Pool, kernel: Kernel, status: ExitStatus) -> None:
        """
        A pooled kernel's process ended: remove the kernel, start another.
        """
        if not kernel.pooled or kernel not in pool.kernels or self._manager.kernels.get(kernel.id) is not kernel:
            return
        _log.warn(
            "warm pool {pool}: pooled kernel {kernel_id} {status}; replacing it",
            pool=pool.name,
            kernel_id=kernel.id,
            status=status.describe(),
        )
        self._leave(pool, kernel)
        self._manager.shutdown(kernel.id, reason=f"pooled kernel {status.describe()}").addErrback(
            lambda f: _log.failure("removing dead pooled kernel {kernel_id}", f, kernel_id=kernel.id)
        )
        self.refill(pool)

    def _leave(self, pool: Pool, kernel: Kernel) -> None:
        if kernel in pool.kernels:
            pool.kernels.remove(kernel)

    def _retry_later(self, pool: Pool) -> None:
        if not self.refilling or (pool.retry is not None and pool.retry.active()):
            return
        delay = min(RETRY_MOST, RETRY_FIRST * 2 ** max(0, pool.failures - 1))
        pool.retry = self._clock.callLater(delay, self.refill, pool)

    def _kernel_event(self, event: str, kernel: Kernel) -> None:
        """
        A pooled kernel removed by anyone (an admin, a shutdown) leaves its
        pool, which refills.
        """
        if event != "removed" or kernel.pool is None:
            return
        pool = self.pools.get(kernel.pool)
        if pool is not None and kernel in pool.kernels:
            self._leave(pool, kernel)
            self.refill(pool)

    # -- serving -------------------------------------------------------

    async def serve(
        self, request: StartRequest, spec: KernelSpec, caller: Caller | None, profile: Any
    ) -> Kernel | None:
        """
        A pooled kernel bound to the caller, or C{None} when no pool can
        serve C{request} (it is then started fresh).

        @raise LimitReached: a quota of the caller's is reached (as a fresh
            start would be refused).
        @raise BadRequest: refused by the profile's policy.
        @raise Forbidden: not authorized.
        """
        taken = self.take(request, spec, caller, profile)
        if taken is None:
            return None
        pool, kernel, env = taken
        manager = self._manager
        binding = manager.start_operation(kernel, "bind", self._bind, env, request.username)
        # Refilled once bound, so the new kernel's start (a process, its
        # imports) does not compete with the binding for the CPU.
        binding.finished().addCallback(lambda _: self.refill(pool))
        try:
            await binding.observe()
        except BindFailed as e:
            self.misses[pool.name] += 1
            _log.error("warm pool {pool}: {error}; starting a kernel afresh", pool=pool.name, error=str(e))
            if kernel.id in manager.kernels:
                manager.shutdown(kernel.id, reason=f"binding failed: {e}").addErrback(
                    lambda f: _log.failure("removing unbound kernel {kernel_id}", f, kernel_id=kernel.id)
                )
            return None
        self.takes[pool.name] += 1
        return kernel

    def take(
        self, request: StartRequest, spec: KernelSpec, caller: Caller | None, profile: Any
    ) -> tuple[Pool, Kernel, dict[str, str]] | None:
        """
        Claim a ready pooled kernel for C{request}, synchronously (so the
        quota decision holds): it is then owned by the caller and out of its
        pool.  C{None} when none can serve it.
        """
        if not self.refilling or not any(p.kernelspec == spec.name for p in self.pools.values()):
            return None
        if "KERNEL_ID" in request.client_env or not supports_binding(spec):
            return None
        manager = self._manager
        plan, accepted = manager.admission.plan(request, spec, caller, profile)
        chosen = plan.profile.name if plan.profile is not None else None
        pool = next(
            (p for p in self.pools.values() if p.kernelspec == spec.name and p.profile == chosen), None
        )
        if pool is None or not pool.may_bind(accepted):
            return None
        ready = [
            k
            for k in pool.ready()
            if dict(k.launcher_config) == dict(plan.launcher_config) and manager.current_operation(k.id) is None
        ]
        if not ready:
            self.misses[pool.name] += 1
            return None
        kernel = ready[0]
        unbound = [k for k in manager.kernels.values() if not k.pooled]
        manager.policy.check_quotas(unbound, plan, self._clock.seconds(), manager.settings.launch_timeout)
        env = manager.admission.environment(request, spec, plan, accepted, kernel.id)
        launch_timeout(env, manager.settings)
        self._leave(pool, kernel)
        kernel.pooled = False
        kernel.owner = plan.owner
        kernel.owner_groups = plan.groups
        kernel.profile = chosen
        kernel.username = request.username
        _log.info(
            "kernel {kernel_id}: taken from warm pool {pool} for {user}",
            kernel_id=kernel.id,
            pool=pool.name,
            user=request.username,
        )
        return pool, kernel, env

    async def _bind(self, kernel: Kernel, env: dict[str, str], username: str) -> None:
        await bind(kernel, env, self._clock, min(BIND_TIMEOUT, self._manager.settings.launch_timeout))
        kernel.env = env
        kernel.username = username
        kernel.touch()
        self._manager.emit("bound", kernel)

    def when_ready(self, name: str, count: int | None = None) -> Deferred[None]:
        """
        Fires once pool C{name} has C{count} ready kernels (default: its
        size); for tests and benchmarks, which have no other event to wait on.
        """
        waiting: Deferred[None] = Deferred()
        self._waiting.append((name, self.pools[name].size if count is None else count, waiting))
        self._tell_waiting()
        return waiting

    def _tell_waiting(self) -> None:
        for entry in list(self._waiting):
            name, count, waiting = entry
            if len(self.pools[name].ready()) >= count:
                self._waiting.remove(entry)
                waiting.callback(None)

    # -- metrics -------------------------------------------------------

    def counts(self) -> dict[tuple[str, str], int]:
        """
        Pooled kernels by pool and state (C{ready}, C{launching}).
        """
        counts: dict[tuple[str, str], int] = {}
        for pool in self.pools.values():
            ready = len(pool.ready())
            counts[(pool.name, "ready")] = ready
            counts[(pool.name, "launching")] = len(pool.kernels) - ready
        return counts
