"""
Who may see and act on which kernel, who may launch what, with which
profile, and how many: ownership, authorization, profiles and quotas.

The kernel layer knows nothing of HTTP or authenticators.  A request's
identity reaches it as a L{Caller} (built by L{caller_of} from any object
with C{username}, C{groups}, C{admin} and C{authenticated}); no caller at
all (an anonymous request, or a credential that names no user such as the
shared token) means what the gateway always did: every kernel is visible,
and the user a kernel runs for is the one the client names.

  - B{Ownership}: every kernel has an owner (the user it was launched
    for) and an L{Acl} of users and groups the owner shared it with.  A
    caller sees and acts on a kernel only as its owner, an admin, or a
    user or group member the ACL names; anyone else is told it does not
    exist (404; 403 with C{hide_kernels} off).
  - B{Authorization}: C{unauthorized_users}/C{unauthorized_groups} (the
    gateway's and the kernelspec's together) refuse; C{authorized_users}/
    C{authorized_groups} (the kernelspec's if it sets either, else the
    gateway's), when set, admit only those named.  Kernelspec lists use
    Enterprise Gateway's form: comma-separated strings in
    C{metadata.process_proxy.config} (or egateway's C{metadata.egateway.config}),
    split exactly, matched exactly.
  - B{Profiles}: see L{egateway.kernels.profiles}; L{TenancyPolicy.plan}
    picks the one in force for a launch.
  - B{Quotas}: decided synchronously with the kernel's registration by the
    kernel manager, counting launches in progress, so concurrent requests
    cannot overshoot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from twisted.logger import Logger

from egateway.errors import BadRequest, Forbidden, LimitReached, NotFound, TooManyRequests
from egateway.kernels.acl import Acl
from egateway.kernels.profiles import Profile, load_profiles
from egateway.kernels.state import KernelState

if TYPE_CHECKING:
    from egateway.kernels.kernel import Kernel
    from egateway.kernels.specs import KernelSpec

_log = Logger()

ENDED = frozenset({KernelState.DEAD, KernelState.FAILED, KernelState.GONE})
"""
Kernels in these states hold nothing and count against no quota.
"""


@dataclass(frozen=True)
class Caller:
    """
    A verified user making a request.
    """

    username: str
    groups: frozenset[str] = frozenset()
    admin: bool = False


def caller_of(identity: Any) -> Caller | None:
    """
    The L{Caller} of a request's identity, or C{None} when it names no
    verified user (then the gateway is as open as it always was).
    """
    if identity is None:
        return None
    username = getattr(identity, "username", "") or ""
    if not isinstance(username, str) or not username or not getattr(identity, "authenticated", False):
        return None
    groups = getattr(identity, "groups", ()) or ()
    return Caller(
        username,
        frozenset(str(g) for g in groups),
        bool(getattr(identity, "admin", False)),
    )


def split_names(value: Any) -> tuple[str, ...]:
    """
    A user or group list from a kernelspec: Enterprise Gateway's comma
    string (C{"bob,alice"}) or a JSON list, split exactly and stripped.
    """
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = [str(item) for item in value]
    else:
        _log.warn("ignoring a user list that is neither a string nor a list: {value!r}", value=value)
        return ()
    return tuple(item.strip() for item in items if item.strip())


def may_access(caller: Caller | None, owner: str, acl: Acl) -> bool:
    """
    Whether C{caller} may see and act on a kernel of C{owner} shared per
    C{acl}.
    """
    if caller is None or caller.admin or caller.username == owner:
        return True
    return caller.username in acl.users or bool(caller.groups & set(acl.groups))


@dataclass(frozen=True)
class LaunchPlan:
    """
    What the policy decided for one launch, before any quota is charged.

    @ivar launcher_config: the kernelspec's launcher config with the
        profile's merged over it.
    """

    owner: str
    groups: frozenset[str]
    profile: Profile | None
    launcher_config: Mapping[str, Any] = field(default_factory=dict)

    def apply_env(self, env: dict[str, str], client_names: Iterable[str]) -> None:
        """
        Add the profile's environment to a kernel environment built by
        L{egateway.kernels.env.build_kernel_env}: its defaults where the
        client set nothing, then what it forces.
        """
        profile = self.profile
        if profile is None:
            env.pop("KERNEL_PROFILE", None)
            return
        given = set(client_names)
        for name, value in profile.default_env.items():
            if name not in given:
                env[name] = value
        env.update(profile.env)
        env["KERNEL_PROFILE"] = profile.name


class TenancyPolicy:
    """
    The rules, from the C{[tenancy]} settings and the C{[profiles.*]}
    tables.
    """

    def __init__(self, settings: Any = None, profiles: Mapping[str, Profile] | None = None) -> None:
        """
        @param settings: an L{egateway.config.TenancyConfig} (default: its
            defaults).
        """
        if settings is None:
            from egateway.config import TenancyConfig

            settings = TenancyConfig()
        self.settings = settings
        self.profiles: dict[str, Profile] = dict(profiles or {})

    @classmethod
    def from_config(cls, config: Any) -> "TenancyPolicy":
        """
        @param config: the whole L{egateway.config.Config}.
        """
        return cls(config.tenancy, load_profiles(config.profiles))

    # -- ownership -------------------------------------------------------------

    def check_access(self, caller: Caller | None, kernel: "Kernel") -> None:
        """
        @raise NotFound: (or L{Forbidden} without C{hide_kernels}) if
            C{caller} may not see C{kernel}; the 404 is the one an unknown
            id gets.
        """
        if may_access(caller, kernel.owner, kernel.acl):
            return
        if self.settings.hide_kernels:
            raise NotFound(f"Kernel does not exist: {kernel.id}")
        raise Forbidden(
            f"kernel {kernel.id} belongs to another user; its owner can share it (PUT /api/kernels/{kernel.id}/acl)"
        )

    def check_kernel_id(self, caller: Caller | None) -> None:
        """
        Whether C{caller} may choose a new kernel's id (C{KERNEL_ID}).  With
        C{hide_kernels}, a verified user who is not an admin may not:
        whether an id is taken (409) would tell them that another user's
        kernel exists where C{GET} answers 404.  Callers who see every
        kernel anyway (admins, callers naming no user) may.

        @raise Forbidden: saying to omit it.
        """
        if caller is None or caller.admin or not self.settings.hide_kernels:
            return
        raise Forbidden(
            "KERNEL_ID may be chosen only by admins while hide_kernels is on (whether an id is taken would "
            "reveal other users' kernels); omit it and use the id in the answer"
        )

    def check_owner(self, caller: Caller | None, kernel: "Kernel") -> None:
        """
        Only the owner (or an admin) changes whom a kernel is shared with.

        @raise Forbidden: for a user it was shared with.
        """
        if caller is None or caller.admin or caller.username == kernel.owner:
            return
        raise Forbidden(f"only the owner of kernel {kernel.id} ({kernel.owner}) or an admin may change its ACL")

    # -- authorization -----------------------------------------------------------

    def _spec_lists(self, spec: "KernelSpec") -> dict[str, tuple[str, ...]]:
        """
        The kernelspec's authorization lists, from every dialect's config
        (Enterprise Gateway's C{process_proxy}, egateway's own, the
        provisioners').
        """
        lists: dict[str, list[str]] = {key: [] for key in ("authorized_users", "unauthorized_users",
                                                            "authorized_groups", "unauthorized_groups")}
        for dialect in ("egateway", "process_proxy", "kernel_provisioner"):
            section = spec.metadata.get(dialect) if isinstance(spec.metadata, Mapping) else None
            config = section.get("config") if isinstance(section, Mapping) else None
            if not isinstance(config, Mapping):
                continue
            for key in lists:
                lists[key].extend(split_names(config.get(key)))
        return {key: tuple(dict.fromkeys(values)) for key, values in lists.items()}

    def authorization_refusal(self, user: str, groups: frozenset[str], spec: "KernelSpec") -> str | None:
        """
        Why C{user} may not launch C{spec} (naming the rule), or C{None}.
        """
        settings = self.settings
        own = self._spec_lists(spec)
        if user in settings.unauthorized_users:
            return f"user {user!r} is in unauthorized_users"
        if user in own["unauthorized_users"]:
            return f"user {user!r} is in kernelspec {spec.name!r}'s unauthorized_users"
        for group in sorted(groups):
            if group in settings.unauthorized_groups:
                return f"group {group!r} of user {user!r} is in unauthorized_groups"
            if group in own["unauthorized_groups"]:
                return f"group {group!r} of user {user!r} is in kernelspec {spec.name!r}'s unauthorized_groups"
        if own["authorized_users"] or own["authorized_groups"]:
            users, allowed_groups, whose = own["authorized_users"], own["authorized_groups"], f"kernelspec {spec.name!r}'s "
        else:
            users, allowed_groups, whose = tuple(settings.authorized_users), tuple(settings.authorized_groups), ""
        if not users and not allowed_groups:
            return None
        if user in users or groups & set(allowed_groups):
            return None
        lists = " or ".join(
            name for name, values in (("authorized_users", users), ("authorized_groups", allowed_groups)) if values
        )
        return f"user {user!r} is not in {whose}{lists}"

    def check_authorized(self, user: str, groups: frozenset[str], spec: "KernelSpec") -> None:
        """
        @raise Forbidden: naming the rule that refuses C{user}.
        """
        why = self.authorization_refusal(user, groups, spec)
        if why is not None:
            raise Forbidden(f"kernelspec {spec.name!r} may not be launched: {why}")

    def may_launch(self, user: str, groups: frozenset[str], admin: bool, spec: "KernelSpec") -> bool:
        """
        Whether C{/api/kernelspecs} shows C{spec} to this user: authorized,
        and, when a profile is required, some profile they may use applies
        to it.
        """
        if self.authorization_refusal(user, groups, spec) is not None:
            return False
        if self.settings.require_profile:
            return bool(self.usable_profiles(user, groups, admin, spec.name))
        return True

    # -- profiles ----------------------------------------------------------------

    def usable_profiles(
        self, user: str, groups: frozenset[str], admin: bool, spec_name: str | None = None
    ) -> list[Profile]:
        return [
            profile
            for profile in self.profiles.values()
            if profile.usable_by(user, groups, admin) and (spec_name is None or profile.applies_to(spec_name))
        ]

    def default_profile(self, user: str, groups: frozenset[str], admin: bool, spec_name: str) -> Profile | None:
        """
        The user's own default for C{spec_name}, else their groups' (the
        first in the config file wins a tie).
        """
        best: Profile | None = None
        best_rank = 0
        for profile in self.usable_profiles(user, groups, admin, spec_name):
            rank = profile.default_rank(user, groups)
            if rank > best_rank:
                best, best_rank = profile, rank
        return best

    def resolve_profile(
        self, user: str, groups: frozenset[str], admin: bool, spec: "KernelSpec", requested: str | None
    ) -> Profile | None:
        """
        The profile in force for a launch: the one requested, else the
        user's default, else none (refused with C{require_profile}).

        @raise BadRequest: an unknown profile, or one not for this
            kernelspec.
        @raise Forbidden: a profile this user may not use, or none when one
            is required.
        """
        if requested:
            profile = self.profiles.get(requested)
            if profile is None:
                raise BadRequest(
                    f"no profile named {requested[:64]!r}; GET /api/profiles lists the ones you may use"
                )
            if not profile.usable_by(user, groups, admin):
                raise Forbidden(f"user {user!r} may not use profile {profile.name!r} (its users and groups)")
            if not profile.applies_to(spec.name):
                raise BadRequest(
                    f"profile {profile.name!r} does not apply to kernelspec {spec.name!r} "
                    f"(it applies to: {', '.join(profile.kernelspecs)})"
                )
            return profile
        profile = self.default_profile(user, groups, admin, spec.name)
        if profile is None and self.settings.require_profile:
            usable = [p.name for p in self.usable_profiles(user, groups, admin, spec.name)]
            raise Forbidden(
                f"a profile is required (require_profile) and user {user!r} has no default one for kernelspec "
                f"{spec.name!r}; choose one with KERNEL_PROFILE or 'profile' "
                f"({', '.join(usable) if usable else 'none is available to you'})"
            )
        return profile

    def plan(
        self,
        caller: Caller | None,
        username: str,
        spec: "KernelSpec",
        client_env: Mapping[str, str],
        accepted_env: Mapping[str, str],
        requested: Any = None,
    ) -> LaunchPlan:
        """
        Authorize a launch for C{username} and choose its profile.

        @param caller: who asks (C{None}: no verified user; the owner is
            then C{username}, with no groups).
        @param client_env: the request's validated C{env}.
        @param accepted_env: the part of it the kernel would receive.
        @param requested: the body's C{profile} field.
        @raise BadRequest: malformed or refused by the profile's policy.
        @raise Forbidden: not authorized, or not allowed that profile.
        """
        if requested is not None and not isinstance(requested, str):
            raise BadRequest("'profile' must be a string")
        from_env = client_env.get("KERNEL_PROFILE") or None
        if requested and from_env and requested != from_env:
            raise BadRequest("the body's 'profile' and KERNEL_PROFILE name different profiles")
        groups = caller.groups if caller is not None and caller.username == username else frozenset()
        admin = caller is not None and caller.admin
        self.check_authorized(username, groups, spec)
        profile = self.resolve_profile(username, groups, admin, spec, requested or from_env)
        launcher_config: dict[str, Any] = dict(spec.launcher_config)
        if profile is not None:
            profile.check_client_env(accepted_env)
            launcher_config.update(profile.launcher_config_for(accepted_env))
        return LaunchPlan(username, groups, profile, launcher_config)

    def revival_plan(self, kernel: "Kernel") -> LaunchPlan:
        """
        The plan of a dead kernel brought back by a restart: its owner must
        still be authorized for its kernelspec, and it is charged to its
        owner, groups and profile as a new launch would be.

        @raise Forbidden: the owner may no longer launch the kernelspec.
        """
        self.check_authorized(kernel.owner, kernel.owner_groups, kernel.spec)
        profile = self.profiles.get(kernel.profile) if kernel.profile else None
        return LaunchPlan(kernel.owner, kernel.owner_groups, profile, kernel.launcher_config)

    def launcher_config(self, spec: "KernelSpec", profile_name: str | None, env: Mapping[str, str]) -> Mapping[str, Any]:
        """
        The launcher config of a restored kernel: its kernelspec's with its
        profile's (as configured now) merged over it.
        """
        config: dict[str, Any] = dict(spec.launcher_config)
        if profile_name:
            profile = self.profiles.get(profile_name)
            if profile is None:
                _log.warn(
                    "profile {profile} of a restored kernel is no longer configured; its restarts use the "
                    "kernelspec's launcher config alone",
                    profile=profile_name,
                )
            else:
                config.update(profile.launcher_config_for(env))
        return config

    # -- quotas ------------------------------------------------------------------

    def check_quotas(self, kernels: Iterable["Kernel"], plan: LaunchPlan, now: float, launch_timeout: float) -> None:
        """
        Refuse a launch that would exceed a quota.  Call it and register the
        kernel with no wait in between: the count includes launches in
        progress, so the decision holds.

        @raise LimitReached: (403) a kernel count limit, naming it and its
            value.
        @raise TooManyRequests: (429) too many launches in progress, with
            the seconds after which one will have ended.
        """
        settings = self.settings
        live = [k for k in kernels if k.state not in ENDED]
        owner = plan.owner
        mine = [k for k in live if k.owner == owner]
        limit = settings.max_kernels_per_user
        if limit > 0 and len(mine) >= limit:
            raise LimitReached(
                f"the max_kernels_per_user limit of {limit} is reached: user {owner!r} has {len(mine)} "
                "kernels running or starting"
            )
        limit = settings.max_kernels_per_group
        if limit > 0:
            for group in sorted(plan.groups):
                count = sum(1 for k in live if group in k.owner_groups)
                if count >= limit:
                    raise LimitReached(
                        f"the max_kernels_per_group limit of {limit} is reached: group {group!r} has {count} "
                        "kernels running or starting"
                    )
        profile = plan.profile
        if profile is not None:
            with_profile = [k for k in live if k.profile == profile.name]
            if profile.max_kernels and len(with_profile) >= profile.max_kernels:
                raise LimitReached(
                    f"profile {profile.name!r}'s max_kernels limit of {profile.max_kernels} is reached: "
                    f"{len(with_profile)} kernels use it"
                )
            own = [k for k in with_profile if k.owner == owner]
            if profile.max_kernels_per_user and len(own) >= profile.max_kernels_per_user:
                raise LimitReached(
                    f"profile {profile.name!r}'s max_kernels_per_user limit of {profile.max_kernels_per_user} "
                    f"is reached: user {owner!r} has {len(own)} kernels with it"
                )
        limit = settings.max_concurrent_launches_per_user
        if limit > 0:
            launching = [k for k in mine if k.state == KernelState.LAUNCHING]
            if len(launching) >= limit:
                # By then the oldest launch has succeeded or timed out.
                oldest = min(k.started for k in launching)
                retry_after = max(1, math.ceil(oldest + launch_timeout - now))
                raise TooManyRequests(
                    f"the max_concurrent_launches_per_user limit of {limit} is reached: user {owner!r} has "
                    f"{len(launching)} launches in progress; retry after {retry_after} s",
                    retry_after=retry_after,
                )
