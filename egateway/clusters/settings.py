"""
The clusters layer's checks of its configuration: the C{[slurm]}, C{[yarn]} and
C{[impersonation]} sections and the kernels' port range, each held to the
parser the launchers use, so a value they would refuse at the first launch
stops start-up instead.  The gateway's assembly runs them
(L{egateway.validation}).
"""

from __future__ import annotations

import os
import re

from egateway.clusters.impersonation import ImpersonationSetupError, command_template
from egateway.clusters.ports import PortRange
from egateway.clusters.slurm_jobs import check_name, parse_memory, parse_time_limit
from egateway.clusters.yarn_api import base_url
from egateway.config import ConfigError, ImpersonationConfig, KernelsConfig, SlurmConfig, YarnConfig

_JOB_NAME_PREFIX = re.compile(r"^[A-Za-z0-9_.\-]{0,64}$")


def check_ports(kernels: KernelsConfig) -> None:
    with ConfigError.about("kernels.port_range"):
        PortRange.parse(kernels.port_range)


def check_slurm(slurm: SlurmConfig) -> None:
    checks = [
        ("slurm_partition", check_name),
        ("slurm_account", check_name),
        ("slurm_qos", check_name),
        ("slurm_time_limit", parse_time_limit),
        ("slurm_max_time_limit", parse_time_limit),
        ("slurm_max_memory", parse_memory),
    ]
    for name, check in checks:
        value = getattr(slurm, name)
        if value:
            with ConfigError.about(f"slurm.{name}"):
                check(value)
    if not _JOB_NAME_PREFIX.match(slurm.slurm_job_name_prefix):
        raise ConfigError(
            f"slurm.slurm_job_name_prefix: {slurm.slurm_job_name_prefix!r} may hold only letters, digits, _ . -"
        )


def check_yarn(yarn: YarnConfig) -> None:
    for name in ("yarn_endpoint", "alt_yarn_endpoint"):
        value = getattr(yarn, name)
        if value:
            with ConfigError.about(f"yarn.{name}"):
                base_url(value)
    if yarn.alt_yarn_endpoint and not yarn.yarn_endpoint:
        raise ConfigError("yarn.alt_yarn_endpoint: set yarn_endpoint (EG_YARN_ENDPOINT) too")


def check_impersonation(impersonation: ImpersonationConfig) -> None:
    with ConfigError.about("impersonation.sudo_command", ImpersonationSetupError):
        command_template(impersonation.sudo_command)
    if "{user}" not in impersonation.ssh_user_key_file:
        raise ConfigError("impersonation.ssh_user_key_file: must contain {user}, e.g. ~{user}/.ssh/id_ed25519")
    if not os.path.isabs(impersonation.impersonation_runtime_dir):
        raise ConfigError("impersonation.impersonation_runtime_dir: must be an absolute path")
