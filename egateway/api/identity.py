"""
Who is calling: the identity an authenticator established for a request.

Every request carries one (C{request.gateway_user}).  The username in it is
the one the gateway acts for; a client's C{KERNEL_USERNAME} counts only when
no authenticator vouched for a user, or when the request came through a
trusted front end (see L{launch_username}).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from egateway.errors import Forbidden


@dataclass(frozen=True)
class Identity:
    """
    @ivar username: the verified user; empty when the credential names no
        user (the shared token, or no authentication at all).
    @ivar groups: the user's groups, as the authenticator reported them.
    @ivar admin: may act on every user's kernels (from the authenticator or
        from C{admin_users}/C{admin_groups}).
    @ivar authenticated: some authenticator accepted the request's
        credentials; C{False} only when the gateway requires none.
    @ivar method: the authenticator that accepted it (C{token},
        C{user-tokens}, C{jwt}, C{jupyterhub}, C{trusted-proxy}), or
        C{none}.
    @ivar trusted_proxy: the request came from a trusted front end, which
        may assert the user in C{KERNEL_USERNAME}.
    """

    username: str
    groups: frozenset[str] = field(default_factory=frozenset)
    admin: bool = False
    authenticated: bool = False
    method: str = "none"
    trusted_proxy: bool = False

    @property
    def display_name(self) -> str:
        """
        How logs and audit events name the caller.
        """
        return self.username or ("anonymous" if not self.authenticated else f"({self.method})")


ANONYMOUS = Identity(username="", authenticated=False, method="none")
"""
The caller of a gateway that requires no credentials (today's default).
"""


_USERNAME = re.compile(r"^(?!-)[^\s/\\:\x00-\x1f\x7f]{1,255}\Z")


def valid_username(name: Any) -> bool:
    """
    Whether C{name} can serve as a user name: it becomes C{KERNEL_USERNAME},
    a path component on cluster hosts and an argument to impersonation
    commands, so no whitespace, separators or control characters, no leading
    dash, at most 255 characters.
    """
    return isinstance(name, str) and bool(_USERNAME.match(name))


def launch_username(identity: Identity, env: Any) -> str | None:
    """
    The user a kernel launched by C{identity} runs for.

      - A verified user launches as themself; a C{KERNEL_USERNAME} naming
        anyone else is refused.
      - A trusted front end (or a gateway with no authentication, as
        Enterprise Gateway always was) may name the user in
        C{KERNEL_USERNAME}.
      - Any other authenticated caller without a user (the shared token
        when trusted proxies are configured) may not name one.

    @param env: the start request's C{env} (validated later by the kernel
        manager; only a string C{KERNEL_USERNAME} is looked at here).
    @return: the user name, or C{None} to let the kernel manager choose
        (the client's C{KERNEL_USERNAME}, else its default).
    @raise Forbidden: C{KERNEL_USERNAME} disagrees with the identity.
    """
    asserted = env.get("KERNEL_USERNAME") if isinstance(env, Mapping) else None
    if not isinstance(asserted, str) or not asserted:
        asserted = None
    if identity.username:
        if asserted is not None and asserted != identity.username:
            raise Forbidden(
                f"KERNEL_USERNAME {asserted[:64]!r} does not match the authenticated user "
                f"{identity.username!r}; omit it or send your own user name"
            )
        return identity.username
    if identity.trusted_proxy or not identity.authenticated:
        return asserted
    if asserted is not None:
        raise Forbidden(
            "KERNEL_USERNAME may only be asserted by a trusted front end (trusted_proxies); "
            "authenticate as the user instead"
        )
    return None
