"""
Profiles: named, admin-defined bundles of configuration bound to a kernel
for a given user (Enterprise Gateway never had them; its kernelspecs and
client C{KERNEL_*} variables were the only knobs, and any client could set
any of them).

A profile says which kernelspecs it applies to, who may use it and whose
default it is, the environment it forces and the defaults it gives, the
resources and launcher parameters it asks for (merged into the launch
request's launcher config), its own limits, and which client C{KERNEL_*}
overrides it accepts, each with a rule (any value, a numeric or size range,
an allow-list).  With a profile in force every other client C{KERNEL_*}
name is refused, so a client cannot choose an image, a volume or a
namespace the profile does not offer.

This module turns the C{[profiles.<name>]} tables of the configuration
(L{egateway.config.ProfileConfig}) into checked L{Profile}s; choosing one
for a launch is L{egateway.kernels.policy}'s job.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from egateway.config import ConfigError
from egateway.errors import BadRequest
from egateway.kernels.env import NAME

EXEMPT_KEYS = frozenset({"KERNEL_USERNAME", "KERNEL_ID", "KERNEL_PROFILE"})
"""
Client C{KERNEL_*} names a profile never refuses: who, which id, which
profile (each checked elsewhere).
"""

GATEWAY_ENV = frozenset({"KERNEL_ID", "KERNEL_USERNAME", "KERNEL_GATEWAY", "KERNEL_PROFILE"})
"""
Names the gateway itself sets in every kernel's environment; a profile may
not set them.
"""

AUTHORIZATION_KEYS = frozenset(
    {"authorized_users", "unauthorized_users", "authorized_groups", "unauthorized_groups"}
)

_LAUNCHER_KEYS = (
    # (profile key, launcher config key)
    ("cpus", "cpus"),
    ("memory", "memory"),
    ("gpus", "gpus"),
    ("remote_hosts", "remote_hosts"),
    ("partition", "partition"),
    ("account", "account"),
    ("qos", "qos"),
    ("time_limit", "time_limit"),
    ("queue", "queue"),
    ("namespace", "namespace"),
    ("image", "image_name"),
)

_PRINCIPAL = re.compile(r"^[^\s/\\:\x00-\x1f\x7f]{1,255}$")
_CLUSTER_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_TIME_LIMIT = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$")
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/:@]{0,254}$")
_HOST = re.compile(r"^[A-Za-z0-9_.\-:\[\]]{1,255}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP])(i?)(B?)\s*$", re.IGNORECASE)
_UNITS = {"K": 1, "M": 2, "G": 3, "T": 4, "P": 5}


class ProfileError(ValueError):
    """
    A profile in the configuration is malformed; the message names the
    profile, the key and what is allowed.
    """


class ProfileRefusal(BadRequest):
    """
    A start request breaks its profile's policy (400); the message names the
    key and the rule.
    """


def parse_size(text: str) -> int:
    """
    Bytes in a size such as C{4G}, C{512Mi} or C{1.5TB} (units are powers of
    1024).  A bare number is refused: launchers disagree on its unit.

    @raise ValueError: not a size.
    """
    match = _SIZE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{str(text)[:40]!r} is not a size with a unit, such as 512M or 4G")
    return int(float(match.group(1)) * 1024 ** _UNITS[match.group(2).upper()])


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class OverrideRule:
    """
    What a client may send for one C{KERNEL_*} name.

    @ivar sizes: the bounds (and so values) are sizes (C{16G}), not numbers.
    """

    key: str
    minimum: float | None = None
    maximum: float | None = None
    minimum_text: str = ""
    maximum_text: str = ""
    sizes: bool = False
    integer: bool = False
    values: tuple[str, ...] | None = None

    RULE_KEYS = ("min", "max", "integer", "values")

    @classmethod
    def parse(cls, key: str, table: Any) -> "OverrideRule":
        """
        @raise ValueError: the rule is malformed (the message names the
            rule key).
        """
        if not isinstance(table, Mapping):
            raise ValueError(
                f"{key}: a rule is a table of {', '.join(cls.RULE_KEYS)} ({{}} for any value)"
            )
        unknown = sorted(k for k in table if k not in cls.RULE_KEYS)
        if unknown:
            raise ValueError(f"{key}: unknown rule key {', '.join(unknown)}; known: {', '.join(cls.RULE_KEYS)}")
        values = table.get("values")
        if values is not None:
            if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
                raise ValueError(f"{key}: values must be a non-empty list of strings")
            values = tuple(values)
        integer = table.get("integer", False)
        if not isinstance(integer, bool):
            raise ValueError(f"{key}: integer must be true or false")
        bounds = {name: table[name] for name in ("min", "max") if name in table}
        sizes = any(isinstance(v, str) for v in bounds.values())
        parsed: dict[str, float] = {}
        for name, bound in bounds.items():
            if sizes:
                if not isinstance(bound, str):
                    raise ValueError(f"{key}: min and max must both be sizes (\"4G\") or both numbers")
                try:
                    parsed[name] = parse_size(bound)
                except ValueError as e:
                    raise ValueError(f"{key}.{name}: {e}") from None
            elif not _number(bound):
                raise ValueError(f"{key}.{name}: must be a number or a size such as \"16G\"")
            else:
                parsed[name] = float(bound)
        if sizes and integer:
            raise ValueError(f"{key}: integer applies to numbers, not sizes")
        if "min" in parsed and "max" in parsed and parsed["min"] > parsed["max"]:
            raise ValueError(f"{key}: min is above max")
        return cls(
            key=key,
            minimum=parsed.get("min"),
            maximum=parsed.get("max"),
            minimum_text=str(bounds.get("min", "")),
            maximum_text=str(bounds.get("max", "")),
            sizes=sizes,
            integer=integer,
            values=values,
        )

    def refusal(self, value: str) -> str | None:
        """
        Why C{value} breaks this rule (naming the rule), or C{None}.
        """
        if self.values is not None and value not in self.values:
            return f"it must be one of {', '.join(self.values)} (rule: values)"
        if self.minimum is None and self.maximum is None and not self.integer:
            return None
        if self.sizes:
            try:
                amount = float(parse_size(value))
            except ValueError:
                return "it must be a size with a unit, such as 512M or 4G"
        else:
            try:
                amount = float(value.strip())
            except ValueError:
                return "it must be a number"
            if not math.isfinite(amount):
                return "it must be a number"
            if self.integer and amount != int(amount):
                return "it must be a whole number (rule: integer = true)"
        if self.minimum is not None and amount < self.minimum:
            return f"it must be at least {self.minimum_text} (rule: min = {self.minimum_text})"
        if self.maximum is not None and amount > self.maximum:
            return f"it must be at most {self.maximum_text} (rule: max = {self.maximum_text})"
        return None

    def describe(self) -> dict[str, Any]:
        """
        The rule as C{GET /api/profiles} shows it.
        """
        shown: dict[str, Any] = {}
        if self.minimum is not None:
            shown["min"] = self.minimum_text if self.sizes else _plain(self.minimum)
        if self.maximum is not None:
            shown["max"] = self.maximum_text if self.sizes else _plain(self.maximum)
        if self.integer:
            shown["integer"] = True
        if self.values is not None:
            shown["values"] = list(self.values)
        return shown


def _plain(number: float) -> float | int:
    return int(number) if number == int(number) else number


@dataclass(frozen=True)
class Profile:
    """
    One checked profile.

    @ivar launcher_config: merged over the kernelspec's launcher config for
        every launch with this profile.
    @ivar env: forced on the kernel; C{default_env}: defaults a client may
        replace (where C{overrides} allow).
    """

    name: str
    description: str = ""
    kernelspecs: tuple[str, ...] = ()
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    default_for_users: frozenset[str] = frozenset()
    default_for_groups: frozenset[str] = frozenset()
    env: Mapping[str, str] = field(default_factory=dict)
    default_env: Mapping[str, str] = field(default_factory=dict)
    launcher_config: Mapping[str, Any] = field(default_factory=dict)
    allowed_images: tuple[str, ...] = ()
    overrides: Mapping[str, OverrideRule] = field(default_factory=dict)
    max_kernels: int = 0
    max_kernels_per_user: int = 0

    @classmethod
    def from_config(cls, name: str, cfg: Any) -> "Profile":
        """
        @param cfg: an L{egateway.config.ProfileConfig}.
        @raise ProfileError: naming C{profiles.<name>.<key>} and the problem.
        """

        def fail(key: str, message: str) -> ProfileError:
            return ProfileError(f"profiles.{name}.{key}: {message}")

        for key in ("users", "groups", "default_for_users", "default_for_groups"):
            for principal in getattr(cfg, key):
                if not _PRINCIPAL.match(principal):
                    raise fail(key, f"{principal[:64]!r} is not a user or group name")
        for key in ("kernelspecs",):
            for spec in cfg.kernelspecs:
                if not spec or spec != spec.strip():
                    raise fail(key, f"{spec!r} is not a kernelspec name")
        for key in ("env", "default_env"):
            for variable, value in getattr(cfg, key).items():
                if not NAME.match(variable):
                    raise fail(key, f"{variable[:64]!r} is not an environment variable name")
                if variable in GATEWAY_ENV:
                    raise fail(key, f"{variable} is set by the gateway")
                if not isinstance(value, str):
                    raise fail(key, f"{variable}: the value must be a string")
                if set(value) & {"\0", "\n", "\r"}:
                    raise fail(key, f"{variable}: the value may not hold NUL or line breaks")
        both = sorted(set(cfg.env) & set(cfg.default_env))
        if both:
            raise fail("default_env", f"{', '.join(both)} also in env (forced); name each in one of them")
        if cfg.memory:
            try:
                parse_size(cfg.memory)
            except ValueError as e:
                raise fail("memory", str(e)) from None
        for key in ("partition", "account", "qos", "queue"):
            value = getattr(cfg, key)
            if value and not _CLUSTER_NAME.match(value):
                raise fail(key, f"{value[:64]!r} may hold only letters, digits, _ . - (at most 64)")
        if cfg.time_limit and not _TIME_LIMIT.match(cfg.time_limit):
            raise fail("time_limit", f"{cfg.time_limit[:40]!r} is not a time such as 8:00:00 or 1-00:00:00")
        if cfg.namespace and not _NAMESPACE.match(cfg.namespace):
            raise fail("namespace", f"{cfg.namespace[:64]!r} is not a Kubernetes namespace name")
        for host in cfg.remote_hosts:
            if not _HOST.match(host):
                raise fail("remote_hosts", f"{host[:64]!r} is not a host name or address")
        for image in [*cfg.allowed_images, *([cfg.image] if cfg.image else [])]:
            if not _IMAGE.match(image):
                raise fail("image" if image == cfg.image else "allowed_images", f"{image[:64]!r} is not an image name")
        if cfg.image and cfg.allowed_images and cfg.image not in cfg.allowed_images:
            raise fail("image", f"{cfg.image!r} is not one of allowed_images")
        launcher_config = dict(cfg.launcher_config)
        for key in launcher_config:
            if key in AUTHORIZATION_KEYS:
                raise fail("launcher_config", f"{key} belongs to the kernelspec or the gateway, not a profile")
        for own_key, config_key in _LAUNCHER_KEYS:
            value = getattr(cfg, own_key)
            if not value:
                continue
            if config_key in launcher_config:
                raise fail("launcher_config", f"{config_key} is set by the profile's {own_key}; set it once")
            launcher_config[config_key] = list(value) if isinstance(value, list) else value
        overrides: dict[str, OverrideRule] = {}
        for key, table in cfg.overrides.items():
            if not NAME.match(key) or not key.startswith("KERNEL_"):
                raise fail("overrides", f"{key[:64]!r}: only KERNEL_* names are governed by a profile")
            if key in GATEWAY_ENV:
                raise fail("overrides", f"{key} is set by the gateway")
            if key in cfg.env:
                raise fail("overrides", f"{key} is forced by env; it cannot also be overridden")
            try:
                overrides[key] = OverrideRule.parse(key, table)
            except ValueError as e:
                raise fail("overrides", str(e)) from None
        return cls(
            name=name,
            description=cfg.description,
            kernelspecs=tuple(cfg.kernelspecs),
            users=frozenset(cfg.users),
            groups=frozenset(cfg.groups),
            default_for_users=frozenset(cfg.default_for_users),
            default_for_groups=frozenset(cfg.default_for_groups),
            env=dict(cfg.env),
            default_env=dict(cfg.default_env),
            launcher_config=launcher_config,
            allowed_images=tuple(cfg.allowed_images),
            overrides=overrides,
            max_kernels=cfg.max_kernels,
            max_kernels_per_user=cfg.max_kernels_per_user,
        )

    # -- who and what -------------------------------------------------------

    def applies_to(self, spec_name: str) -> bool:
        return not self.kernelspecs or spec_name in self.kernelspecs

    def usable_by(self, user: str, groups: frozenset[str], admin: bool = False) -> bool:
        """
        Admins may use every profile; a profile naming no users and no
        groups is everyone's.
        """
        if admin or (not self.users and not self.groups):
            return True
        return user in self.users or bool(groups & self.groups)

    def default_rank(self, user: str, groups: frozenset[str]) -> int:
        """
        2 if it is C{user}'s own default, 1 if one of their groups', else 0.
        """
        if user in self.default_for_users:
            return 2
        if groups & self.default_for_groups:
            return 1
        return 0

    # -- the client's environment --------------------------------------------

    def check_client_env(self, client_env: Mapping[str, str]) -> None:
        """
        Refuse a client environment that breaks this profile's policy.

        @raise ProfileRefusal: naming the key and the rule (never echoing
            the refused value).
        """
        for key in sorted(client_env):
            value = client_env[key]
            if key in self.env:
                raise ProfileRefusal(
                    f"{key} is fixed by profile {self.name!r} (its env) and may not be set by the client"
                )
            if not key.startswith("KERNEL_") or key in EXEMPT_KEYS:
                continue
            rule = self.overrides.get(key)
            if key == "KERNEL_IMAGE" and self.allowed_images:
                if value not in self.allowed_images:
                    raise ProfileRefusal(
                        f"KERNEL_IMAGE is refused by profile {self.name!r}: it must be one of "
                        f"{', '.join(self.allowed_images)} (rule: allowed_images)"
                    )
                if rule is None:
                    continue
            if rule is None:
                allowed = sorted(self.overrides) + (["KERNEL_IMAGE"] if self.allowed_images else [])
                raise ProfileRefusal(
                    f"{key} may not be set with profile {self.name!r}: it is not in the profile's overrides "
                    f"(allowed: {', '.join(sorted(set(allowed))) or 'none'})"
                )
            why = rule.refusal(value)
            if why is not None:
                raise ProfileRefusal(f"{key} is refused by profile {self.name!r}: {why}")

    def launcher_config_for(self, client_env: Mapping[str, str]) -> dict[str, Any]:
        """
        The launcher config this profile adds for one launch: its own, and
        the client's allowed image choice.
        """
        config = dict(self.launcher_config)
        image = client_env.get("KERNEL_IMAGE")
        if image and image in self.allowed_images:
            config["image_name"] = image
        return config

    # -- what users see --------------------------------------------------------

    def describe(self, default: bool = False) -> dict[str, Any]:
        """
        The profile as C{GET /api/profiles} shows it: never its forced
        environment's values (they may hold credentials).
        """
        overrides = {key: rule.describe() for key, rule in sorted(self.overrides.items())}
        if self.allowed_images:
            overrides.setdefault("KERNEL_IMAGE", {})
            overrides["KERNEL_IMAGE"] = {**overrides["KERNEL_IMAGE"], "values": list(self.allowed_images)}
        resources = {
            key: self.launcher_config[key]
            for key in ("cpus", "memory", "gpus", "partition", "account", "qos", "time_limit", "queue",
                        "namespace", "image_name", "remote_hosts")
            if key in self.launcher_config
        }
        return {
            "name": self.name,
            "description": self.description,
            "kernelspecs": list(self.kernelspecs),
            "default": default,
            "overrides": overrides,
            "fixed": sorted(self.env),
            "defaults": dict(sorted(self.default_env.items())),
            "resources": resources,
            "limits": {
                "max_kernels": self.max_kernels,
                "max_kernels_per_user": self.max_kernels_per_user,
            },
        }


def load_profiles(configs: Mapping[str, Any]) -> dict[str, Profile]:
    """
    Every configured profile, checked, in the order of the config file
    (which breaks ties between default profiles).

    @raise ProfileError: the first malformed one.
    """
    return {name: Profile.from_config(name, cfg) for name, cfg in configs.items()}


def check_config(configs: Mapping[str, Any]) -> None:
    """
    The C{[profiles.<name>]} tables, checked at start-up (the gateway's
    assembly runs this) rather than at the first launch.

    @raise ConfigError: the first malformed profile; the message names it
        and its key.
    """
    try:
        load_profiles(configs)
    except ProfileError as e:
        raise ConfigError(str(e)) from None
