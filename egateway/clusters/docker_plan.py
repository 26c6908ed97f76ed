"""
What a kernel container (or Swarm service) is made of, decided before
anything reaches the engine: the image, network, CPUs, memory, mounts,
user and placement constraints, each from the kernelspec's launcher
config (with the profile's merged over it) and the gateway's settings.

A client chooses nothing alone.  Its C{KERNEL_*} values are honoured only
inside what the kernelspec or profile allows:
  - C{KERNEL_IMAGE}: one of the config's C{allowed_images} (none when it
    lists none; Enterprise Gateway lets any client pick any image);
  - C{KERNEL_CPUS}: more than 0, at most C{max_cpus} (config, else the
    setting C{docker_max_cpus}); C{KERNEL_MEMORY}: at most C{max_memory}
    (config, else C{docker_max_memory});
  - C{KERNEL_GPUS}: at most C{max_gpus} (config, else C{docker_max_gpus},
    default 0);
  - C{KERNEL_UID}: one of the config's C{allowed_uids}.
Mounts, network and constraints come from the config only.  A bad client
value fails the launch with 400 before anything is created; a bad config
or setting with 500.

The container's environment is the kernel's (already filtered by the
manager), less the gateway host's own account and path variables, plus
Enterprise Gateway's container contract (C{KERNEL_ID},
C{KERNEL_LANGUAGE}, C{RESPONSE_ADDRESS}, C{PUBLIC_KEY}, C{PORT_RANGE},
C{KERNEL_SPARK_CONTEXT_INIT_MODE}, C{EG_LAUNCH_TOKEN}), which the image's
entry point (C{launchers/bootstrap/bootstrap-kernel.sh} or Enterprise
Gateway's) reads.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from egateway.clusters.docker_events import KERNEL_LABEL
from egateway.clusters.interface import ENV_NAME, LaunchError
from egateway.clusters.slurm_jobs import parse_memory

GATEWAY_LABEL = "org.egateway.gateway_id"
USER_LABEL = "org.egateway.user"
SPEC_LABEL = "org.egateway.kernelspec"

IMAGE_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._\-/]*(:[a-zA-Z0-9._\-]+)?(@sha256:[a-f0-9]{64})?\Z")
"""
Enterprise Gateway's rule for image names, kept: it also keeps a name from
reaching the engine's query strings as anything but a name.
"""

NETWORK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
USER = re.compile(r"^[0-9]{1,10}(:[0-9]{1,10})?\Z")
CONSTRAINT = re.compile(r"^[A-Za-z0-9_.\-]+ *(==|!=) *[A-Za-z0-9_.\-:/]+\Z")

NOT_PASSED = frozenset({"PATH", "HOME", "USER", "LOGNAME", "SHELL", "PWD", "OLDPWD", "TMPDIR"})
"""
The gateway host's account and path variables: the image has its own.
"""


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = True

    def bind(self) -> str:
        return f"{self.source}:{self.target}:{'ro' if self.read_only else 'rw'}"


@dataclass(frozen=True)
class ContainerPlan:
    """
    One kernel container, decided.  C{memory} is in bytes (0: the engine's
    default, no limit), C{cpus} in CPUs (0: no limit).
    """

    image: str
    network: str
    cpus: float = 0.0
    memory: int = 0
    mounts: tuple[Mount, ...] = ()
    user: str = ""
    constraints: tuple[str, ...] = ()
    gpus: int = 0
    from_client: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        parts = [f"image {self.image}", f"network {self.network}"]
        if self.cpus:
            parts.append(f"{self.cpus:g} CPUs")
        if self.memory:
            parts.append(f"{self.memory // (1024 * 1024)} MB")
        if self.gpus:
            parts.append(f"{self.gpus} GPUs")
        if self.user:
            parts.append(f"user {self.user}")
        return ", ".join(parts)


def _list(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _mount(item: Any) -> Mount:
    """
    A mount from the config: C{"/src:/dst[:ro|rw]"} or C{{"source", "target",
    "read_only"}}; read-only unless it says C{rw}.
    """
    if isinstance(item, dict):
        source, target = str(item.get("source", "")), str(item.get("target", ""))
        read_only = bool(item.get("read_only", True))
    else:
        parts = str(item).split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise ValueError(f"mount {item!r} is not /source:/target[:ro|rw]")
        source, target = parts[0], parts[1]
        read_only = len(parts) == 2 or parts[2] == "ro"
    for path in (source, target):
        if not path.startswith("/") or ".." in path.split("/") or ":" in path or "," in path:
            raise ValueError(f"mount {item!r}: {path!r} is not an absolute path")
    return Mount(source, target, read_only)


def container_plan(env: Mapping[str, str], config: Mapping[str, Any], settings: Any) -> ContainerPlan:
    """
    The checked container of one launch; see the module docstring.

    @raise LaunchError: 400 for a client's value, 500 for the config's or
        the settings'.
    """
    used: list[str] = []

    def client(name: str) -> str:
        value = str(env.get(name, "")).strip()
        if value:
            used.append(name)
        return value

    def refuse(name: str, message: str) -> LaunchError:
        return LaunchError(f"{name}: {message}", status=400)

    def broken(key: str, message: str) -> LaunchError:
        return LaunchError(f"kernelspec config {key!r}: {message}", status=500)

    image = str(config.get("image_name") or config.get("image") or "")
    asked = client("KERNEL_IMAGE")
    if asked and asked != image:
        allowed = [str(v) for v in _list(config.get("allowed_images"))]
        if asked not in allowed:
            raise refuse(
                "KERNEL_IMAGE",
                f"image {asked!r} is not allowed for this kernelspec"
                + (f" (allowed: {', '.join(allowed)})" if allowed else " (it allows no other image)"),
            )
        image = asked
    if not image:
        raise broken("image_name", "the kernelspec names no image")
    if not IMAGE_NAME.match(image):
        raise (refuse("KERNEL_IMAGE", f"{image!r} is not an image name") if asked else
               broken("image_name", f"{image!r} is not an image name"))

    network = str(config.get("network") or settings.docker_network or "")
    if not network:
        raise broken("network", "no network named (set the kernelspec's network or docker_network)")
    if not NETWORK_NAME.match(network):
        raise broken("network", f"{network!r} is not a network name")

    def bound(key: str, parse: Any) -> Any:
        value = config.get(key)
        source = key
        if value is None or value == "":
            value, source = getattr(settings, f"docker_{key}"), f"docker_{key}"
        try:
            return parse(str(value))
        except ValueError as e:
            raise LaunchError(f"{source}: {e}", status=500) from None

    cpus = _cpus(config.get("cpus"), "cpus", broken)
    asked = client("KERNEL_CPUS")
    if asked:
        try:
            cpus = _parse_cpus(asked)
        except ValueError as e:
            raise refuse("KERNEL_CPUS", str(e)) from None
        limit = bound("max_cpus", _parse_cpus)
        if cpus > limit:
            raise refuse("KERNEL_CPUS", f"{asked} CPUs is more than the {limit:g} allowed")

    memory = 0
    if config.get("memory") not in (None, ""):
        try:
            memory = parse_memory(str(config["memory"])) * 1024 * 1024
        except ValueError as e:
            raise broken("memory", str(e)) from None
    asked = client("KERNEL_MEMORY")
    if asked:
        try:
            memory = parse_memory(asked) * 1024 * 1024
        except ValueError as e:
            raise refuse("KERNEL_MEMORY", str(e)) from None
        limit = bound("max_memory", parse_memory) * 1024 * 1024
        if memory > limit:
            raise refuse("KERNEL_MEMORY", f"{asked} is more than the {limit // (1024 * 1024)} MB allowed")

    try:
        given = config.get("mounts")
        mounts = tuple(_mount(item) for item in _list(settings.docker_mounts if given is None else given))
    except ValueError as e:
        raise broken("mounts", str(e)) from None

    user = str(config.get("user") or "")
    if user and not USER.match(user):
        raise broken("user", f"{user!r} is not uid or uid:gid")
    asked = client("KERNEL_UID")
    if asked and asked != user.split(":")[0]:
        allowed = [str(v) for v in _list(config.get("allowed_uids"))]
        if asked not in allowed:
            raise refuse("KERNEL_UID", f"uid {asked!r} is not allowed for this kernelspec")
        gid = client("KERNEL_GID")
        user = asked + (f":{gid}" if gid.isdigit() else "")
    if user.split(":")[0] == "0" and not config.get("allow_root"):
        raise broken("user", "kernels do not run as root in their container unless allow_root is set")

    gpus = _count(config.get("gpus"), "gpus", broken)
    asked = client("KERNEL_GPUS")
    if asked:
        gpus = _count(asked, "KERNEL_GPUS", refuse)
        limit = bound("max_gpus", lambda text: _count(text, "max_gpus", broken))
        if gpus > limit:
            raise refuse("KERNEL_GPUS", f"{asked} GPUs is more than the {limit} allowed")

    constraints = tuple(str(c) for c in _list(config.get("constraints")))
    for constraint in constraints:
        if not CONSTRAINT.match(constraint):
            raise broken("constraints", f"{constraint!r} is not a Swarm placement constraint (node.x==y)")

    return ContainerPlan(image, network, cpus, memory, mounts, user, constraints, gpus, tuple(used))


def _parse_cpus(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of CPUs") from None
    if not math.isfinite(value) or value <= 0 or value > 1024:
        raise ValueError(f"{text!r} is not a number of CPUs")
    return value


def _cpus(value: Any, key: str, broken: Any) -> float:
    if value is None or value == "":
        return 0.0
    try:
        return _parse_cpus(str(value))
    except ValueError as e:
        raise broken(key, str(e)) from None


def _count(value: Any, key: str, fail: Any) -> int:
    if value is None or value == "":
        return 0
    text = str(value).strip()
    if not text.isdigit() or int(text) > 64:
        raise fail(key, f"{text!r} is not a number of GPUs (0 to 64)")
    return int(text)


def container_body(plan: ContainerPlan, name: str, env: list[str], labels: Mapping[str, str]) -> dict[str, Any]:
    """
    The Engine API's C{POST /containers/create} body of a kernel container.
    GPUs are requested from the engine's C{nvidia} device driver.
    """
    host: dict[str, Any] = {
        "NetworkMode": plan.network,
        "Binds": [m.bind() for m in plan.mounts],
        "NanoCpus": int(plan.cpus * 1e9),
        "Memory": plan.memory,
        "RestartPolicy": {"Name": "no"},
    }
    if plan.gpus:
        host["DeviceRequests"] = [{"Driver": "nvidia", "Count": plan.gpus, "Capabilities": [["gpu"]]}]
    return {"Image": plan.image, "Env": env, "Labels": dict(labels), "Hostname": name[:63], "User": plan.user,
            "HostConfig": host}


def service_body(
    plan: ContainerPlan, name: str, env: list[str], labels: Mapping[str, str], stop_grace: float
) -> dict[str, Any]:
    """
    The Engine API's C{POST /services/create} body of a kernel's Swarm
    service: one replica, no restart policy of Swarm's own, the plan's
    constraints and limits, the kernel's labels on the service and on its
    container (so the engine's events name it), GPUs as generic resources.
    """
    container: dict[str, Any] = {
        "Image": plan.image,
        "Env": env,
        "Labels": dict(labels),
        "Hostname": name[:63],
        "User": plan.user,
        "Mounts": [{"Type": "bind", "Source": m.source, "Target": m.target, "ReadOnly": m.read_only}
                   for m in plan.mounts],
        "StopGracePeriod": int(stop_grace * 1e9),
    }
    resources: dict[str, Any] = {"Limits": {"NanoCPUs": int(plan.cpus * 1e9), "MemoryBytes": plan.memory}}
    if plan.gpus:
        resources["Reservations"] = {"GenericResources": [{"DiscreteResourceSpec": {"Kind": "gpu",
                                                                                   "Value": plan.gpus}}]}
    task = {
        "ContainerSpec": container,
        "RestartPolicy": {"Condition": "none"},
        "Placement": {"Constraints": list(plan.constraints)},
        "Resources": resources,
        "Networks": [{"Target": plan.network}],
    }
    body: dict[str, Any] = {"Name": name, "Labels": dict(labels), "TaskTemplate": task,
                            "Mode": {"Replicated": {"Replicas": 1}}}
    if plan.network != "host":
        # Enterprise Gateway's choice too: no virtual IP (it needs the
        # iptables/IPVS set-up), the task's own address.
        body["EndpointSpec"] = {"Mode": "dnsrr"}
    return body


def container_env(env: Mapping[str, str], contract: Mapping[str, str]) -> list[str]:
    """
    The container's C{NAME=value} list: the kernel's environment (valid
    names, without L{NOT_PASSED}) and the launch contract over it.
    """
    merged = {k: v for k, v in env.items() if ENV_NAME.match(k) and k not in NOT_PASSED}
    merged.update(contract)
    return [f"{k}={v}" for k, v in sorted(merged.items())]


def kernel_labels(kernel_id: str, gateway_id: str, username: str, spec_name: str) -> dict[str, str]:
    """
    The labels that find a kernel's container or service again: ours, and
    Enterprise Gateway's (C{kernel_id}, C{component}, C{app}) for tools
    written for it.
    """
    labels = {
        KERNEL_LABEL: kernel_id,
        USER_LABEL: username,
        SPEC_LABEL: spec_name,
        "kernel_id": kernel_id,
        "component": "kernel",
        "app": "enterprise-gateway",
    }
    if gateway_id:
        labels[GATEWAY_LABEL] = gateway_id
    return labels


__all__ = [
    "ContainerPlan",
    "GATEWAY_LABEL",
    "SPEC_LABEL",
    "Mount",
    "USER_LABEL",
    "container_body",
    "container_env",
    "container_plan",
    "service_body",
    "kernel_labels",
]
