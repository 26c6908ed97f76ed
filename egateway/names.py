"""
Name rules several layers share: what an environment variable may be called,
what a kernel id placed in a cluster's names and an installation's gateway
id may hold.

A leaf, so the configuration checks of any layer, the launchers and the
kernel manager can all hold names to one rule without importing each other.
"""

from __future__ import annotations

import re

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
"""
An environment variable name a client may set for its kernel and a remote
launcher passes on; anything else is refused or dropped.
"""

KERNEL_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}\Z")
"""
A kernel id a launcher may put into a cluster's object names (Slurm job
names, container and service names): clients may choose kernel ids.
"""

GATEWAY_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")


def check_gateway_id(gateway_id: str) -> str:
    """
    The id, checked: it reaches process environments, a remote command's
    arguments and Slurm's job records, so it is held to a plain alphabet.

    @raise ValueError: empty, too long, or another character than letters,
        digits, C{.}, C{_} and C{-}.
    """
    if not GATEWAY_ID_PATTERN.match(gateway_id):
        raise ValueError(f"gateway id {gateway_id[:80]!r} is not 1 to 64 letters, digits, . _ -")
    return gateway_id
