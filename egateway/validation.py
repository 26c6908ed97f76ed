"""
Each layer's checks of its own configuration section, run as the gateway is
assembled.

The configuration package (L{egateway.config}) only knows shapes, types and
bounds; what a value means (a store URL, an authenticator's keys, a Slurm
time limit, a TLS listener) is known by the layer that uses it, which checks
its section with the parser it uses anyway.  This module, beside
L{egateway.tap} above every layer, runs those checks, so the configuration
never imports upward.
"""

from __future__ import annotations

from typing import Any, Mapping

from egateway import store
from egateway.api import authenticators, metrics
from egateway.clusters import settings as clusters
from egateway.config import Config, ConfigError, build_config
from egateway.kernels import pools, profiles
from egateway.ops import manhole, tls


def check_sections(config: Config) -> None:
    """
    Run every layer's check of its section; the first problem stops
    start-up.

    @raise ConfigError: naming the key and what would be accepted.
    """
    clusters.check_ports(config.kernels)
    store.check_config(config.store)
    profiles.check_config(config.profiles)
    pools.check_config(config.pools, config.profiles)
    authenticators.check_config(config.auth)
    tls.check_config(config.listen_endpoint, config.server, config.response)
    clusters.check_slurm(config.slurm)
    clusters.check_yarn(config.yarn)
    clusters.check_impersonation(config.impersonation)
    manhole_problem = manhole.check_settings(config.ops)
    if manhole_problem:
        raise ConfigError(manhole_problem)
    metrics.check_config(config.metrics)


def load_config(
    file_values: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, str | None] | None = None,
) -> Config:
    """
    L{build_config}, then every layer's checks (L{check_sections}): the
    configuration the gateway runs with.
    """
    config = build_config(file_values, environ, flags)
    check_sections(config)
    return config
