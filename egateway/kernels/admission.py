"""
Admission: whether a kernel may start, and everything it starts with.

Separate from the manager so that the whole decision (the admission checks
a draining gateway adds, the client's inputs, C{max_kernels}, the tenancy
policy's authorization, profile and quotas, the kernel's environment and
launch timeout, the launcher) is made in one place and handed over as one
typed value, L{Admission}, instead of a dict passed between functions.

Admission is synchronous after the kernelspec is found: the manager
registers the kernel with no wait after L{AdmissionControl.decide}, so
concurrent requests cannot overshoot a limit.
"""

from __future__ import annotations

import getpass
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from twisted.internet.interfaces import IReactorTime

from egateway.clusters.interface import LaunchError
from egateway.errors import BadRequest, Conflict, LimitReached, NotFound
from egateway.kernels.env import BadEnvironment, accepted_client_names, build_kernel_env, validate_client_env
from egateway.kernels.kernel import Kernel
from egateway.kernels.launching import LaunchFailed, launch_timeout
from egateway.kernels.policy import ENDED, Caller, LaunchPlan
from egateway.kernels.specs import KernelSpec, NoSuchKernelSpec

if TYPE_CHECKING:
    from egateway.kernels.interfaces import IKernelTable


@dataclass(frozen=True)
class StartRequest:
    """
    A start request's inputs, checked before anything is awaited.
    """

    kernel_id: str
    spec_name: str
    username: str
    client_env: Mapping[str, str]


@dataclass(frozen=True)
class Admission:
    """
    The decision to start a kernel: what it runs, for whom, where and with
    what; the manager builds the kernel from it and nothing else.
    """

    kernel_id: str
    spec: KernelSpec
    username: str
    env: Mapping[str, str]
    launcher_name: str
    owner: str
    owner_groups: frozenset[str]
    profile: str | None
    launcher_config: Mapping[str, Any]
    timeout: float


def canonical_uuid(text: str) -> bool:
    """
    Whether C{text} is a UUID written the one way C{str(uuid.UUID(...))} does.
    """
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


class AdmissionControl:
    """
    Decides which kernels start.

    @ivar checks: called before each new kernel is admitted; one raising a
        L{GatewayError} refuses it (a draining gateway does).
    """

    def __init__(
        self,
        *,
        manager: IKernelTable,
        clock: IReactorTime,
        gateway_env: Mapping[str, str],
        default_username: str | None = None,
    ) -> None:
        """
        @param manager: whose kernels (launching ones included) the limits
            and quotas count, and whose settings, kernelspecs, launchers
            and tenancy policy apply (read at each decision: they may be
            replaced).
        @param gateway_env: the gateway's environment, which kernels inherit
            from per C{inherited_envs}.
        @param default_username: whom a kernel runs for when the request
            names nobody (default: the gateway's user).
        """
        self._manager = manager
        self._clock = clock
        self._gateway_env = dict(gateway_env)
        self._default_username = default_username or getpass.getuser()
        self.checks: list[Callable[[], None]] = []

    def check_request(
        self,
        spec_name: str | None,
        env: Any,
        username: str | None = None,
        caller: Caller | None = None,
    ) -> StartRequest:
        """
        Validate a start request's inputs.

        @raise BadRequest: malformed inputs.
        @raise Forbidden: C{caller} may not choose C{KERNEL_ID} (see
            L{TenancyPolicy.check_kernel_id}).
        @raise Conflict: a kernel with the chosen C{KERNEL_ID} exists.
        """
        for check in self.checks:
            check()
        try:
            client_env = validate_client_env(env)
        except BadEnvironment as e:
            raise BadRequest(str(e)) from None
        if spec_name is not None and not isinstance(spec_name, str):
            raise BadRequest("'name' must be a string")
        kernel_id = client_env.get("KERNEL_ID")
        if kernel_id is not None:
            if not canonical_uuid(kernel_id):
                raise BadRequest("KERNEL_ID must be a lower-case UUID like 8a3f...-...")
            self._manager.policy.check_kernel_id(caller)
            if kernel_id in self._manager.kernels:
                raise Conflict(f"a kernel with id {kernel_id} already exists")
        return StartRequest(
            kernel_id=kernel_id or str(uuid.uuid4()),
            spec_name=spec_name or self._manager.specs.default_name,
            username=username or client_env.get("KERNEL_USERNAME") or self._default_username,
            client_env=client_env,
        )

    async def kernelspec(self, request: StartRequest) -> KernelSpec:
        """
        The kernelspec C{request} names.

        @raise NotFound: there is none by that name.
        """
        try:
            return await self._manager.specs.get(request.spec_name)
        except NoSuchKernelSpec:
            raise NotFound(f"No such kernel spec: {request.spec_name}") from None

    def decide(
        self, request: StartRequest, spec: KernelSpec, caller: Caller | None, profile: Any = None
    ) -> Admission:
        """
        Admit C{request} to start C{spec}, or refuse it.  The caller
        registers the kernel with no wait after this, so the decision holds.

        @param profile: the profile the request names.
        @raise Conflict: a kernel with its id exists.
        @raise LimitReached: C{max_kernels} or a quota reached.
        @raise TooManyRequests: too many launches in progress for the user.
        @raise BadRequest: a profile's policy refuses the environment, or a
            bad C{KERNEL_LAUNCH_TIMEOUT}.
        @raise Forbidden: not authorized for the kernelspec or the profile.
        @raise LaunchFailed: the kernelspec's launcher is unknown.
        """
        kernel_id = request.kernel_id
        if kernel_id in self._manager.kernels:
            raise Conflict(f"a kernel with id {kernel_id} already exists")
        self.check_max_kernels()
        plan, accepted = self.plan(request, spec, caller, profile)
        self._manager.policy.check_quotas(
            self._manager.kernels.values(), plan, self._clock.seconds(), self._manager.settings.launch_timeout
        )
        kernel_env = self.environment(request, spec, plan, accepted, kernel_id)
        timeout = launch_timeout(kernel_env, self._manager.settings)
        try:
            self._manager.launchers.get(spec.launcher_name)
        except LaunchError as e:
            origin = f" (its {spec.launcher_origin})" if spec.launcher_origin else ""
            raise LaunchFailed(f"kernelspec {spec.name}{origin}: {e}", status=e.status) from None
        return Admission(
            kernel_id=kernel_id,
            spec=spec,
            username=request.username,
            env=kernel_env,
            launcher_name=spec.launcher_name,
            owner=plan.owner,
            owner_groups=plan.groups,
            profile=plan.profile.name if plan.profile is not None else None,
            launcher_config=plan.launcher_config,
            timeout=timeout,
        )

    @property
    def default_username(self) -> str:
        """
        Whom a kernel runs for when the request names nobody.
        """
        return self._default_username

    def plan(
        self, request: StartRequest, spec: KernelSpec, caller: Caller | None, profile: Any = None
    ) -> tuple[LaunchPlan, dict[str, str]]:
        """
        The tenancy policy's plan for C{request} (authorization and
        profile, no quota), and the client values the kernel would receive.

        @raise BadRequest: a profile's policy refuses the environment.
        @raise Forbidden: not authorized for the kernelspec or the profile.
        """
        accepted = accepted_client_names(request.client_env, self._manager.settings.client_envs)
        plan = self._manager.policy.plan(caller, request.username, spec, request.client_env, accepted, profile)
        return plan, accepted

    def environment(
        self,
        request: StartRequest,
        spec: KernelSpec,
        plan: LaunchPlan,
        accepted: Mapping[str, str],
        kernel_id: str,
    ) -> dict[str, str]:
        """
        The environment a kernel C{kernel_id} started for C{request} under
        C{plan} gets.
        """
        kernel_env = build_kernel_env(
            gateway_env=self._gateway_env,
            inherited_envs=self._manager.settings.inherited_envs,
            spec_env=spec.env,
            client_env=request.client_env,
            client_envs=self._manager.settings.client_envs,
            kernel_id=kernel_id,
            username=request.username,
            language=spec.language,
        )
        plan.apply_env(kernel_env, accepted)
        return kernel_env

    def check_max_kernels(self) -> None:
        """
        @raise LimitReached: C{max_kernels} kernels are running or starting
            (dead ones hold nothing and do not count, so nobody can fill the
            gateway with them).
        """
        limit = self._manager.settings.max_kernels
        if not limit:
            return
        live = sum(1 for kernel in self._manager.kernels.values() if kernel.state not in ENDED)
        if live >= limit:
            raise LimitReached(
                f"A max kernels limit of {limit} is set and there are {live} running or starting kernels"
            )

    def admit_revival(self, kernel: Kernel) -> None:
        """
        Reviving a dead kernel starts a new process: it passes the admission
        a start does (C{max_kernels}, the owner's authorization for the
        kernelspec, the quotas), since a dead kernel counts against none of
        them.  The caller changes the kernel's state with no wait after
        this, so the decision holds.

        @raise LimitReached: a limit is reached.
        @raise Forbidden: the owner may no longer launch the kernelspec.
        """
        self.check_max_kernels()
        plan = self._manager.policy.revival_plan(kernel)
        others = [k for k in self._manager.kernels.values() if k is not kernel]
        self._manager.policy.check_quotas(others, plan, self._clock.seconds(), self._manager.settings.launch_timeout)
