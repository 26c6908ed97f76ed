"""
Start-up warnings about how exposed a configuration leaves the gateway:
what is legal but weaker than an operator may think.

  - the shared token beside per-user credentials is a super-user;
  - users told apart while impersonation is off still share one account:
    their kernels can read each other's connection files (and so run code
    in each other's kernels) and the gateway's own files;
  - secret-bearing files (the config file, the store key, the TLS key, the
    SSH keys) that other users can read;
  - checks turned off: any JWT audience, any JupyterHub token, a short
    shared token (the failed-login limit does not slow a guesser who tries
    a new token every time).

Each is one warning in the log, naming what to change.  Nothing here
refuses to start: these are choices a deployment may make knowingly.
"""

from __future__ import annotations

import os
import stat
from typing import Any, Sequence

from twisted.application.service import Service
from twisted.logger import Logger

_log = Logger()

PER_USER = ("trusted-proxy", "user-tokens", "jwt", "jupyterhub")
"""
Authenticators that tell users apart.
"""

SHORT_TOKEN = 32


def posture_warnings(
    config: Any, config_file: str = "", data_dir: str = "", *, authenticators: Sequence[str]
) -> list[str]:
    """
    What to warn about for C{config}.  Reads the modes of the files it
    names (a few C{stat} calls on local files).

    @param config_file: the C{--config} file, if any.
    @param data_dir: the data directory (where the default store key is).
    @param authenticators: the authenticators C{config} turns on, in order
        (as the API decides them: L{egateway.api.authenticators.enabled_authenticators}).
    """
    auth = config.auth
    methods = list(authenticators)
    per_user = [name for name in methods if name in PER_USER]
    warnings = []
    if "token" in methods and per_user:
        warnings.append(
            f"the shared token (auth_token) is accepted beside per-user credentials ({', '.join(per_user)}): whoever "
            "holds it names any user in KERNEL_USERNAME and sees and acts on every kernel, a super-user; give it "
            "only to trusted services, or remove it"
        )
    if per_user and not config.impersonation.impersonation_enabled:
        warnings.append(
            f"users are told apart ({', '.join(per_user)}) but impersonation is off: every kernel runs as one "
            f"account (locally the gateway's own, uid {os.getuid()}), so a user's kernel can read other kernels' "
            "connection files and run code in them, and read the gateway's files (its config file, store key, "
            "TLS key); set impersonation_enabled to run each kernel as its user"
        )
    if auth.auth_token and len(auth.auth_token) < SHORT_TOKEN:
        warnings.append(
            f"the shared token is {len(auth.auth_token)} characters long: failed logins are limited per token, so "
            f"only its length stops guessing; use at least {SHORT_TOKEN} random characters "
            "(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    if "jwt" in methods and auth.jwt_any_audience:
        warnings.append(
            "jwt_any_audience is on: a JWT the identity provider issued for any other service is accepted here"
        )
    if "jupyterhub" in methods and not auth.jupyterhub_scope:
        warnings.append(
            "jupyterhub_scope is empty: any token the Hub accepts (whatever it was made for) is full access to "
            "the gateway; set it to access:services!service=<the gateway's service name>"
        )
    warnings.extend(_metrics_warnings(config.metrics))
    for what, path in _secret_files(config, config_file, data_dir):
        mode = _mode(path)
        if mode is not None and mode & (stat.S_IRGRP | stat.S_IROTH):
            warnings.append(
                f"{what} {path} is readable by other users (mode {stat.S_IMODE(mode):04o}); chmod 600 it"
            )
    return warnings


def _metrics_warnings(metrics: Any) -> list[str]:
    """
    A metrics listener anyone can read, and a guessable metrics token.
    """
    warnings = []
    listen = metrics.metrics_listen
    local = listen.startswith("unix:") or any(
        f"interface={name}" in listen for name in ("127.", "localhost", "\\:\\:1", "::1")
    )
    if listen and not metrics.on_main_listener and not local:
        warnings.append(
            f"metrics_listen ({listen}) serves /metrics to whoever reaches it (kernel counts, kernelspec names, "
            "launch failures); set metrics_token or metrics_networks, or listen on a loopback interface"
        )
    if metrics.metrics_token and len(metrics.metrics_token) < SHORT_TOKEN:
        warnings.append(
            f"the metrics token is {len(metrics.metrics_token)} characters long; use at least {SHORT_TOKEN} random "
            "characters"
        )
    return warnings


def _secret_files(config: Any, config_file: str, data_dir: str) -> list[tuple[str, str]]:
    files = []
    if config_file:
        files.append(("the config file", config_file))
    store = config.store
    if store.persistence and not store.store_key:
        key_file = store.store_key_file or (os.path.join(data_dir, "store.key") if data_dir else "")
        if key_file:
            files.append(("the store key file", key_file))
    server = config.server
    if server.keyfile or server.certfile:
        files.append(("the TLS private key", server.keyfile or server.certfile))
    if config.auth.user_tokens_file:
        files.append(("the user tokens file", config.auth.user_tokens_file))
    for key_file in config.ssh.ssh_key_files:
        files.append(("the SSH key", os.path.expanduser(key_file)))
    return files


def _mode(path: str) -> int | None:
    try:
        return os.stat(path).st_mode
    except OSError:
        # Missing (not created yet, or optional): nothing to expose.
        return None


PR_SET_DUMPABLE = 4


def protect_process() -> bool:
    """
    Make the gateway's process non-dumpable (Linux C{prctl}): other
    processes of its user, kernels without impersonation among them, can
    then no longer read its memory or C{/proc/<pid>/environ} (where the
    auth token, the JWT secret and the store key may be) nor attach a
    debugger to it.  Kernels start from a fresh C{exec} and are dumpable as
    usual.  No core dumps of the gateway are written either.

    @return: whether it worked (C{False} off Linux).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        done = libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        done = False
    if not done:
        _log.warn(
            "security: could not make the gateway's process non-dumpable; processes of its user (kernels "
            "without impersonation) may read its memory and environment"
        )
    return done


class PostureWarnings(Service):
    """
    Logs L{posture_warnings} once, as the gateway starts.
    """

    name = "posture"

    def __init__(
        self, config: Any, config_file: str = "", data_dir: str = "", *, authenticators: Sequence[str]
    ) -> None:
        self._config = config
        self._config_file = config_file
        self._data_dir = data_dir
        self._authenticators = authenticators

    def startService(self) -> None:
        super().startService()
        # Not "warning": the legacy log bridge takes an event with that key
        # for a Python warning.
        for concern in posture_warnings(
            self._config, self._config_file, self._data_dir, authenticators=self._authenticators
        ):
            _log.warn("security: {concern}", concern=concern)
