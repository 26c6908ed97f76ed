"""
Kernelspecs: discovery on disk (in a thread, never on the reactor), the
launcher each one asks for, and the models the REST API serves.

Three kernelspec dialects choose a launcher:

  - egateway's own: C{metadata.egateway = {"launcher": "ssh", "config": {...}}};
  - Enterprise Gateway's: C{metadata.process_proxy = {"class_name": ..., "config": {...}}};
  - gateway_provisioners': C{metadata.kernel_provisioner = {"provisioner_name": ..., "config": {...}}}.

A spec with none of them runs locally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from egateway.observe import OneShotObserver

_log = Logger()

ENTERPRISE_GATEWAY_CLASSES = {
    "enterprise_gateway.services.processproxies.processproxy.LocalProcessProxy": "local",
    "enterprise_gateway.services.processproxies.distributed.DistributedProcessProxy": "ssh",
    "enterprise_gateway.services.processproxies.yarn.YarnClusterProcessProxy": "yarn",
    "enterprise_gateway.services.processproxies.k8s.KubernetesProcessProxy": "kubernetes",
    "enterprise_gateway.services.processproxies.docker_swarm.DockerSwarmProcessProxy": "docker-swarm",
    "enterprise_gateway.services.processproxies.docker_swarm.DockerProcessProxy": "docker",
    "enterprise_gateway.services.processproxies.conductor.ConductorClusterProcessProxy": "conductor",
    "enterprise_gateway.services.processproxies.crd.CustomResourceProcessProxy": "kubernetes-crd",
    "enterprise_gateway.services.processproxies.spark_operator.SparkOperatorProcessProxy": "spark-operator",
}
"""
Enterprise Gateway process-proxy classes and the egateway launcher that
replaces each.
"""

PROVISIONER_NAMES = {
    "local-provisioner": "local",
    "distributed-provisioner": "ssh",
    "yarn-provisioner": "yarn",
    "kubernetes-provisioner": "kubernetes",
    "docker-provisioner": "docker",
    "docker-swarm-provisioner": "docker-swarm",
    "spark-operator-provisioner": "spark-operator",
}


@dataclass(frozen=True)
class KernelSpec:
    """
    One kernelspec as read from its C{kernel.json}.
    """

    name: str
    argv: tuple[str, ...]
    display_name: str
    language: str
    resource_dir: str
    env: Mapping[str, str] = field(default_factory=dict)
    interrupt_mode: str = "signal"
    metadata: Mapping[str, Any] = field(default_factory=dict)
    resources: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict)

    @property
    def launcher_name(self) -> str:
        """
        The name of the launcher this spec asks for.
        """
        own = self.metadata.get("egateway")
        if isinstance(own, dict) and own.get("launcher"):
            return str(own["launcher"])
        proxy = self.metadata.get("process_proxy")
        if isinstance(proxy, dict) and proxy.get("class_name"):
            name = str(proxy["class_name"])
            return ENTERPRISE_GATEWAY_CLASSES.get(name, name)
        provisioner = self.metadata.get("kernel_provisioner")
        if isinstance(provisioner, dict) and provisioner.get("provisioner_name"):
            name = str(provisioner["provisioner_name"])
            return PROVISIONER_NAMES.get(name, name)
        return "local"

    @property
    def launcher_origin(self) -> str:
        """
        What the spec's metadata names that chose its launcher, for
        messages: C{"process_proxy class_name enterprise_gateway...."}
        (empty for egateway's own dialect and for local specs).
        """
        for key, field_name in (("process_proxy", "class_name"), ("kernel_provisioner", "provisioner_name")):
            section = self.metadata.get(key)
            if isinstance(section, dict) and section.get(field_name):
                return f"{key} {field_name} {section[field_name]}"
        return ""

    @property
    def launcher_config(self) -> Mapping[str, Any]:
        """
        The spec's configuration for its launcher, whichever dialect it uses.
        """
        for key in ("egateway", "process_proxy", "kernel_provisioner"):
            section = self.metadata.get(key)
            if isinstance(section, dict) and isinstance(section.get("config"), dict):
                return section["config"]
        return {}

    def model(self, base_url: str = "/") -> dict[str, Any]:
        """
        The C{/api/kernelspecs} model of this spec.
        """
        resources: dict[str, str] = {}
        for filename in self.resources:
            stem, ext = os.path.splitext(filename)
            key = stem if stem.startswith("logo-") else filename
            resources[key] = f"{base_url}kernelspecs/{self.name}/{filename}"
        return {"name": self.name, "spec": dict(self.raw), "resources": resources}

    @classmethod
    def from_json(cls, name: str, resource_dir: str, data: Mapping[str, Any], resources: Sequence[str] = ()) -> "KernelSpec":
        """
        @raise ValueError: if required fields are missing or mistyped.
        """
        argv = data.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("argv must be a non-empty list of strings")
        env = data.get("env") or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise ValueError("env must map strings to strings")
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ValueError("metadata must be an object")
        interrupt_mode = data.get("interrupt_mode", "signal")
        if interrupt_mode not in ("signal", "message"):
            raise ValueError("interrupt_mode must be 'signal' or 'message'")
        raw = {
            "argv": list(argv),
            "env": dict(env),
            "display_name": str(data.get("display_name", name)),
            "language": str(data.get("language", "")),
            "interrupt_mode": interrupt_mode,
            "metadata": metadata,
        }
        return cls(
            name=name,
            argv=tuple(argv),
            display_name=raw["display_name"],
            language=raw["language"],
            resource_dir=resource_dir,
            env=dict(env),
            interrupt_mode=interrupt_mode,
            metadata=metadata,
            resources=tuple(resources),
            raw=raw,
        )


RESOURCE_FILES = ("kernel.js", "kernel.css")


def scan_blocking(extra_dirs: Sequence[str]) -> dict[str, KernelSpec]:
    """
    Read every kernelspec on disk.  Blocking: run in a thread.

    Specs that fail to load are skipped with a log line naming the problem.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    manager = KernelSpecManager()
    manager.kernel_dirs = [*extra_dirs, *manager.kernel_dirs]
    found: dict[str, KernelSpec] = {}
    for name, resource_dir in manager.find_kernel_specs().items():
        try:
            spec = manager.get_kernel_spec(name)
            data = spec.to_dict()
            files = sorted(
                f
                for f in os.listdir(spec.resource_dir)
                if f in RESOURCE_FILES or (f.startswith("logo-") and os.path.isfile(os.path.join(spec.resource_dir, f)))
            )
            found[name] = KernelSpec.from_json(name, spec.resource_dir, data, files)
        except Exception as e:
            _log.error(
                "kernelspec {name} in {path} skipped: {error}",
                name=name,
                path=resource_dir,
                error=str(e),
            )
    return found


class NoSuchKernelSpec(KeyError):
    """
    No kernelspec by this name is offered.
    """


class KernelSpecCatalog:
    """
    The kernelspecs the gateway offers, rescanned at most every C{ttl}
    seconds, always in a worker thread.
    """

    def __init__(
        self,
        clock: Any,
        threadpool: ThreadPool,
        extra_dirs: Sequence[str] = (),
        allowed: Sequence[str] = (),
        default_name: str = "",
        ttl: float = 5.0,
        reactor: Any = None,
    ) -> None:
        self._clock = clock
        self._threadpool = threadpool
        self._reactor = reactor if reactor is not None else clock
        self._extra_dirs = tuple(extra_dirs)
        self._allowed = frozenset(allowed)
        self._default_name = default_name
        self._ttl = ttl
        self._specs: dict[str, KernelSpec] | None = None
        self._scanned_at = float("-inf")
        self._scanning: OneShotObserver[dict[str, KernelSpec]] | None = None

    @property
    def default_name(self) -> str:
        return self._default_name or "python3"

    def all(self) -> Deferred[dict[str, KernelSpec]]:
        """
        Every offered spec, rescanning if the last scan is older than the
        ttl.  Concurrent callers share one scan.
        """
        if self._specs is not None and self._clock.seconds() - self._scanned_at < self._ttl:
            from twisted.internet.defer import succeed

            return succeed(self._specs)
        scanning = self._scanning
        if scanning is None:
            scanning = self._scanning = OneShotObserver()
            deferToThreadPool(self._reactor, self._threadpool, scan_blocking, self._extra_dirs).addBoth(
                self._scanned, scanning
            )
        return scanning.when_fired()

    def _scanned(self, result: Any, scanning: OneShotObserver[dict[str, KernelSpec]]) -> None:
        self._scanning = None
        if isinstance(result, dict):
            if self._allowed:
                result = {k: v for k, v in result.items() if k in self._allowed}
            self._specs = result
            self._scanned_at = self._clock.seconds()
            scanning.fire(result)
        else:
            _log.failure("scanning kernelspecs failed", result)
            scanning.fire(self._specs if self._specs is not None else result)

    async def get(self, name: str) -> KernelSpec:
        """
        @raise NoSuchKernelSpec: if no spec of that name is offered.
        """
        specs = await self.all()
        try:
            return specs[name]
        except KeyError:
            raise NoSuchKernelSpec(name) from None
