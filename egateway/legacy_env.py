"""
Enterprise Gateway's C{EG_*} and Kernel Gateway's C{KG_*} variables that
egateway does not take.

An operator moving from Enterprise Gateway keeps its environment (a systemd
C{EnvironmentFile}, a Helm chart's values).  egateway takes the variables
that have a setting here (L{egateway.config}); any other would silently do
nothing, so the gateway names them all in one warning at start-up, each
with the setting that replaces it where there is one.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from egateway.config import settings

PREFIXES = ("EG_", "KG_")

REPLACEMENTS = {
    "EG_SSL_VERSION": "tls_min_version (EG_TLS_MIN_VERSION)",
    "KG_SSL_VERSION": "tls_min_version (EG_TLS_MIN_VERSION)",
    "EG_AUTHORIZED_ORIGIN": "allow_origin (EG_ALLOW_ORIGIN)",
    "EG_TRUST_XHEADERS": "trusted_proxies (EG_TRUSTED_PROXIES)",
    "KG_TRUST_XHEADERS": "trusted_proxies (EG_TRUSTED_PROXIES)",
    "EG_AUTHORIZER_CLASS": "authenticators (EG_AUTHENTICATORS)",
    "EG_AUTH_TYPE": "authenticators (EG_AUTHENTICATORS)",
    "EG_PROHIBITED_UIDS": "prohibited_users and min_uid (EG_PROHIBITED_USERS, EG_MIN_UID)",
    "EG_PROHIBITED_GIDS": "min_uid (EG_MIN_UID); primary gid 0 is always refused",
    "EG_PERSISTENCE_ROOT": "store_url (EG_STORE_URL)",
    "EG_KERNEL_SESSION_LOCATION": "store_url (EG_STORE_URL)",
    "EG_AVAILABILITY_MODE": "store_url (EG_STORE_URL) naming a Redis that several gateways share",
    "EG_RESPONSE_ADDRESS": "response_ip and response_port (EG_RESPONSE_IP, EG_RESPONSE_PORT)",
    "EG_RESPONSE_ADDR_ANY": 'response_ip = "0.0.0.0" (EG_RESPONSE_IP)',
    "EG_MIN_PORT_RANGE_SIZE": "port_range (EG_PORT_RANGE)",
    "EG_MAX_PORT_RANGE_RETRIES": "port_range (EG_PORT_RANGE)",
    "EG_MAX_POLL_ATTEMPTS": "launch_timeout (EG_KERNEL_LAUNCH_TIMEOUT)",
    "EG_REMOTE_PWD": "ssh_key_files (EG_SSH_KEY_FILES): SSH logins use keys",
    "EG_ENABLE_TUNNELING": "kernel_encryption (EG_KERNEL_ENCRYPTION) for encrypted kernel channels",
    "KG_FORCE_KERNEL_NAME": "default_kernel_name with allowed_kernelspecs (EG_DEFAULT_KERNEL_NAME, EG_ALLOWED_KERNELS)",
    "EG_ALTERNATE_SIGINT": "EG_ALTERNATE_SIGINT in the kernelspec's env",
}
"""
What replaces each variable egateway does not take, where something does.
"""


def taken_names() -> frozenset[str]:
    return frozenset(name for info in settings() for name in info.env)


def untaken_environment(environ: Mapping[str, str], passed_to_kernels: Iterable[str] = ()) -> list[str]:
    """
    Each C{EG_*}/C{KG_*} variable in C{environ} that no setting takes and
    that is not handed to kernels (C{inherited_envs}), sorted, with
    C{" (use ...)"} naming its replacement where there is one.
    """
    ignored = taken_names() | frozenset(passed_to_kernels)
    found = []
    for name in sorted(environ):
        if not name.startswith(PREFIXES) or name in ignored:
            continue
        replacement = REPLACEMENTS.get(name)
        found.append(f"{name} (use {replacement})" if replacement else name)
    return found
