"""
The gateway's configuration: the schema (L{egateway.config.schema}), the
loader that reads TOML, environment and command line into it
(L{egateway.config.loader}), and its descriptions for people
(L{egateway.config.reference}).

A leaf: nothing here imports another part of the gateway.  Each layer checks
what its own section's values mean (L{egateway.validation} runs those
checks), so the schema never needs to know the layers above it.
"""

from egateway.config.loader import build_config, load_toml
from egateway.config.reference import describe, flag_table, help_text, reference_markdown
from egateway.config.schema import (
    AuthConfig,
    Config,
    ConfigError,
    CullingConfig,
    ImpersonationConfig,
    KernelsConfig,
    MetricsConfig,
    OpsConfig,
    PoolConfig,
    ProfileConfig,
    ResponseConfig,
    ServerConfig,
    SettingInfo,
    SlurmConfig,
    YarnConfig,
    SSHConfig,
    StoreConfig,
    TenancyConfig,
    setting,
    settings,
    table_settings,
)

__all__ = [
    "AuthConfig",
    "Config",
    "ConfigError",
    "CullingConfig",
    "ImpersonationConfig",
    "KernelsConfig",
    "MetricsConfig",
    "OpsConfig",
    "PoolConfig",
    "ProfileConfig",
    "ResponseConfig",
    "SSHConfig",
    "ServerConfig",
    "SettingInfo",
    "SlurmConfig",
    "YarnConfig",
    "StoreConfig",
    "TenancyConfig",
    "build_config",
    "describe",
    "flag_table",
    "help_text",
    "load_toml",
    "reference_markdown",
    "setting",
    "settings",
    "table_settings",
]
