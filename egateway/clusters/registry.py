"""
Finding launchers by name.

Built-in launchers are listed here; third-party ones register a factory (a
callable taking a L{LauncherContext} and returning an L{ILauncher}) under the
C{egateway.launchers} entry-point group::

    [options.entry_points]
    egateway.launchers =
        nomad = mypackage.nomad:NomadLauncher

A launcher is built on first use and kept for the life of the gateway, so it
can hold connection pools and load-balancing state.

The registry is the C{launchers} service of the gateway's tree: each launcher
it builds becomes a child service (named as the launcher), started when
built and stopped, newest first, when the registry stops, which is after
every kernel is down (see L{egateway.tap}).  Its first child, C{response},
stops the response listener remote launchers open on first use, last: no
launcher waits on it any more by then.
"""

from __future__ import annotations

import dataclasses
import importlib
from importlib.metadata import entry_points
from typing import Any, Mapping

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from zope.interface.verify import verifyObject

from egateway.clusters.interface import ILauncher, LaunchError, LauncherContext
from egateway.services import OrderedMultiService

_log = Logger()

BUILTIN = {
    "local": "egateway.clusters.local:LocalLauncher",
    "ssh": "egateway.clusters.ssh:SSHLauncher",
    "slurm": "egateway.clusters.slurm:SlurmLauncher",
    "docker": "egateway.clusters.docker:DockerLauncher",
    "docker-swarm": "egateway.clusters.swarm:SwarmLauncher",
    "kubernetes": "egateway.clusters.kubernetes:KubernetesLauncher",
    "conductor": "egateway.clusters.conductor:ConductorLauncher",
    "yarn": "egateway.clusters.yarn:YarnLauncher",
}

ENTRY_POINT_GROUP = "egateway.launchers"


class UnknownLauncher(LaunchError):
    """
    A launcher that cannot be built (500), or that this gateway does not
    have at all (501 Not Implemented: a kernelspec written for Enterprise
    Gateway asks for a cluster manager egateway has no launcher for).
    """

    status = 500


class LauncherService(Service):
    """
    One built launcher as a service: stopping it releases what the launcher
    holds (C{stop}: an SSH connection pool); launchers holding nothing have
    no C{stop}.
    """

    def __init__(self, name: str, launcher: ILauncher) -> None:
        self.name = name
        self.launcher = launcher

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        stop = getattr(self.launcher, "stop", None)
        if stop is None:
            return succeed(None)
        return maybeDeferred(stop).addErrback(
            lambda f: _log.failure("stopping the {launcher} launcher", f, launcher=self.name)
        )


class ResponseListenerKeeper(Service):
    """
    Stops the response listener, if a remote launcher (or the TLS set-up)
    made one: remote launchers bind it on first use, so a gateway that runs
    only local kernels never opens its port.
    """

    name = "response"

    def __init__(self, context: LauncherContext) -> None:
        self._context = context

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        listener = self._context.services.get("response")
        if listener is None or not listener.running:
            return succeed(None)
        return maybeDeferred(listener.stopService)


class LauncherRegistry(OrderedMultiService):
    name = "launchers"

    def __init__(
        self, context: LauncherContext, extra: dict[str, Any] | None = None, sections: Mapping[str, Any] | None = None
    ) -> None:
        """
        @param sections: each launcher's own configuration section, by
            launcher name (C{{"ssh": config.ssh, ...}}); a launcher gets
            only its own, as C{context.section}.
        """
        super().__init__()
        self._context = context
        self._sections = dict(sections or {})
        ResponseListenerKeeper(context).setServiceParent(self)
        self._factories: dict[str, Any] = dict(BUILTIN)
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            self._factories.setdefault(ep.name, ep.value)
        self._factories.update(extra or {})
        self._launchers: dict[str, ILauncher] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self._factories)

    def get(self, name: str) -> ILauncher:
        """
        @raise UnknownLauncher: if no launcher of that name is known or it
            cannot be built.
        """
        launcher = self._launchers.get(name)
        if launcher is not None:
            return launcher
        factory = self._factories.get(name)
        if factory is None:
            raise UnknownLauncher(
                f"this gateway has no launcher named {name!r}; known launchers: {', '.join(self.names)}",
                status=501,
            )
        if isinstance(factory, str):
            module_name, _, attribute = factory.partition(":")
            try:
                factory = getattr(importlib.import_module(module_name), attribute)
            except (ImportError, AttributeError) as e:
                raise UnknownLauncher(f"launcher {name!r} cannot be loaded: {e}") from None
        launcher = factory(dataclasses.replace(self._context, section=self._sections.get(name)))
        verifyObject(ILauncher, launcher)
        self._launchers[name] = launcher
        LauncherService(name, launcher).setServiceParent(self)
        return launcher

    def built(self) -> list[ILauncher]:
        return list(self._launchers.values())
