"""
Whom a kernel's owner shared it with: the L{Acl} a kernel carries and the
tenancy policy (L{egateway.kernels.policy}) reads, apart from both so the
kernel need not import the policy that judges it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from egateway.errors import BadRequest

MAX_ACL_ENTRIES = 256


@dataclass(frozen=True)
class Acl:
    """
    Whom a kernel's owner shared it with.
    """

    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()

    def to_json(self) -> dict[str, list[str]]:
        return {"users": list(self.users), "groups": list(self.groups)}

    @classmethod
    def from_json(cls, data: Any) -> "Acl":
        """
        An ACL from a stored record: anything malformed is dropped (an
        unreadable ACL shares with no one).
        """
        if not isinstance(data, Mapping):
            return cls()
        return cls(
            tuple(sorted({u for u in data.get("users") or () if isinstance(u, str) and u})),
            tuple(sorted({g for g in data.get("groups") or () if isinstance(g, str) and g})),
        )

    @classmethod
    def parse(cls, body: Any) -> "Acl":
        """
        An ACL from a C{PUT .../acl} body, C{{"users": [...], "groups": [...]}}.

        @raise BadRequest: naming what is wrong.
        """
        if not isinstance(body, dict):
            raise BadRequest('the body must be {"users": [...], "groups": [...]}')
        unknown = sorted(str(k)[:32] for k in body if k not in ("users", "groups"))
        if unknown:
            raise BadRequest(f"unknown field {', '.join(unknown)}; an ACL has users and groups")
        lists = {}
        for key in ("users", "groups"):
            names = body.get(key, [])
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise BadRequest(f"'{key}' must be a list of strings")
            if len(names) > MAX_ACL_ENTRIES:
                raise BadRequest(f"'{key}' may name at most {MAX_ACL_ENTRIES} entries")
            for name in names:
                if not name or len(name) > 255 or any(c.isspace() or ord(c) < 32 or c in "/\\:" for c in name):
                    raise BadRequest(f"'{key}' holds {name[:64]!r}, which is not a user or group name")
            lists[key] = tuple(sorted(set(names)))
        return cls(lists["users"], lists["groups"])
