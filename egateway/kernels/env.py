"""
Building a kernel's environment.

A kernel never sees the gateway's whole environment, nor any of its secrets
(L{NEVER_INHERITED}).  It gets, in increasing precedence:

  1. the gateway variables named in C{inherited_envs};
  2. the kernelspec's C{env}, with C{${NAME}} references resolved against 1;
  3. the client's values for C{KERNEL_*} names and names in C{client_envs};
  4. what the gateway itself sets (C{KERNEL_ID}, C{KERNEL_GATEWAY}, ...).

Client values are validated before anything starts: strings only, bounded
length, and none of the characters that would let a value escape the
quoting of a shell script a kernelspec might run.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from egateway.names import ENV_NAME as NAME

MAX_VALUE_LENGTH = 4096
PROHIBITED_CHARACTERS = frozenset("$`\n\r\0")


def _secret_variables() -> frozenset[str]:
    """
    The environment variables of every setting declared secret (the auth
    token, the JWT secret, the store's URL and key...): a kernel runs code
    its user chose, and with them it would be the gateway.
    """
    from egateway.config import settings

    return frozenset(name for info in settings() if info.secret for name in info.env)


NEVER_INHERITED = _secret_variables() | {"EG_REMOTE_PWD", "LS_COLORS"}
"""
Never in a kernel's environment, whatever C{inherited_envs}, the kernelspec
or the client say.
"""
GATEWAY_OWNED = frozenset({"KERNEL_ID", "KERNEL_GATEWAY"})


class BadEnvironment(ValueError):
    """
    A client-supplied environment is malformed; the message says which
    variable and why (never echoing a rejected value).
    """


def validate_client_env(env: Any) -> dict[str, str]:
    """
    Check the C{env} object of a start request.

    @raise BadEnvironment: for a non-object, a bad name or a bad value.
    """
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise BadEnvironment("'env' must be an object mapping names to strings")
    for name, value in env.items():
        if not NAME.match(name):
            raise BadEnvironment(f"environment variable name {name[:64]!r} is not valid")
        if not isinstance(value, str):
            raise BadEnvironment(f"environment variable '{name}' value must be a string")
        if len(value) > MAX_VALUE_LENGTH:
            raise BadEnvironment(
                f"environment variable '{name}' value exceeds maximum length of {MAX_VALUE_LENGTH}"
            )
        if PROHIBITED_CHARACTERS.intersection(value):
            raise BadEnvironment(
                f"environment variable '{name}' value contains prohibited characters "
                "($, backtick, newline, carriage return or NUL)"
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate (JSON allows "\ud800"): no process
            # environment can hold it.
            raise BadEnvironment(f"environment variable '{name}' value is not valid Unicode text") from None
    return dict(env)


def accepted_client_names(env: Mapping[str, str], client_envs: Sequence[str]) -> dict[str, str]:
    """
    The client values a kernel may receive: C{KERNEL_*} names and the
    allow-listed ones; the rest is dropped silently, as Enterprise Gateway
    does.
    """
    allow_all = "*" in client_envs
    allowed = set(client_envs)
    return {
        name: value
        for name, value in env.items()
        if (name.startswith("KERNEL_") or allow_all or name in allowed)
        and name not in GATEWAY_OWNED
        and name not in NEVER_INHERITED
    }


_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: str, scope: Mapping[str, str]) -> str:
    """
    Resolve C{${NAME}} and C{${NAME:-default}} references, as in the
    kernelspecs Enterprise Gateway ships.
    """
    return _REFERENCE.sub(
        lambda m: scope.get(m.group(1)) or (m.group(2) if m.group(2) is not None else ""),
        value,
    )


def build_kernel_env(
    *,
    gateway_env: Mapping[str, str],
    inherited_envs: Sequence[str],
    spec_env: Mapping[str, str],
    client_env: Mapping[str, str],
    client_envs: Sequence[str],
    kernel_id: str,
    username: str,
    language: str,
) -> dict[str, str]:
    env = {
        name: gateway_env[name]
        for name in inherited_envs
        if name in gateway_env and name not in NEVER_INHERITED
    }
    client = accepted_client_names(client_env, client_envs)
    scope = {**env, **client, "KERNEL_ID": kernel_id, "KERNEL_USERNAME": username}
    for name, value in spec_env.items():
        env[name] = _expand(value, scope)
    env.update(client)
    env["KERNEL_ID"] = kernel_id
    env["KERNEL_GATEWAY"] = "1"
    env["KERNEL_USERNAME"] = username
    env.setdefault("KERNEL_LANGUAGE", (language or "unknown-kernel-language").lower())
    for name in NEVER_INHERITED:
        env.pop(name, None)
    return env
