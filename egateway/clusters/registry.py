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
"""

from __future__ import annotations

import dataclasses
import importlib
from importlib.metadata import entry_points
from typing import Any, Mapping

from twisted.logger import Logger
from zope.interface.verify import verifyObject

from egateway.clusters.interface import ILauncher, LaunchError, LauncherContext

_log = Logger()

BUILTIN = {
    "local": "egateway.clusters.local:LocalLauncher",
    "ssh": "egateway.clusters.ssh:SSHLauncher",
    "slurm": "egateway.clusters.slurm:SlurmLauncher",
    "docker": "egateway.clusters.docker:DockerLauncher",
    "docker-swarm": "egateway.clusters.swarm:SwarmLauncher",
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


class LauncherRegistry:
    def __init__(
        self, context: LauncherContext, extra: dict[str, Any] | None = None, sections: Mapping[str, Any] | None = None
    ) -> None:
        """
        @param sections: each launcher's own configuration section, by
            launcher name (C{{"ssh": config.ssh, ...}}); a launcher gets
            only its own, as C{context.section}.
        """
        self._context = context
        self._sections = dict(sections or {})
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
        return launcher

    def built(self) -> list[ILauncher]:
        return list(self._launchers.values())

    def stop(self) -> Any:
        """
        Release what launchers hold (connection pools, the response
        listener); called once every kernel is down.
        """
        from twisted.internet.defer import DeferredList, maybeDeferred

        stops = [
            maybeDeferred(launcher.stop)
            for launcher in self._launchers.values()
            if hasattr(launcher, "stop")
        ]
        listener = self._context.services.get("response")
        if listener is not None and listener.running:
            stops.append(maybeDeferred(listener.stopService))
        return DeferredList(stops)
