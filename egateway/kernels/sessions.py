"""
Sessions in jupyter_server 2.x's model: a named document (C{path}, C{name},
C{type}) bound to a kernel.

A session goes when its kernel goes, whoever removed the kernel.  A session
is visible to whoever may see its kernel (L{egateway.kernels.policy}).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from egateway.errors import BadRequest, NotFound
from egateway.kernels.kernel import Kernel
from egateway.kernels.manager import KernelManager
from egateway.kernels.policy import Caller, may_access


@dataclass
class Session:
    id: str
    path: str
    name: str
    type: str
    kernel_id: str

    def model(self, kernel: Kernel) -> dict[str, Any]:
        model: dict[str, Any] = {
            "id": self.id,
            "path": self.path,
            "name": self.name,
            "type": self.type,
            "kernel": kernel.model(),
        }
        if self.type == "notebook":
            model["notebook"] = {"path": self.path, "name": self.name}
        return model


def _string(body: dict[str, Any], key: str, default: str | None = None) -> str | None:
    value = body.get(key, default)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"'{key}' must be a string")
    return value


class SessionManager:
    """
    Sessions, saved to the kernel store when the gateway persists kernels,
    and restored with them.
    """

    def __init__(self, kernels: KernelManager) -> None:
        self._kernels = kernels
        self.sessions: dict[str, Session] = {}
        kernels.listeners.append(self._kernel_event)
        self._persistence = kernels.persistence
        if self._persistence is not None:
            self._persistence.restored.append(self._restore)

    def _kernel_event(self, event: str, kernel: Kernel) -> None:
        if event in ("removed", "failed"):
            for session in [s for s in self.sessions.values() if s.kernel_id == kernel.id]:
                del self.sessions[session.id]
                self._forget(session)

    def _save(self, session: Session) -> None:
        if self._persistence is not None:
            from egateway.store.interface import SessionRecord

            self._persistence.save_session(
                SessionRecord(session.id, session.path, session.name, session.type, session.kernel_id)
            )

    def _forget(self, session: Session) -> None:
        if self._persistence is not None:
            self._persistence.delete_session(session.id)

    async def _restore(self) -> None:
        """
        Reload saved sessions whose kernels were restored.
        """
        for record in await self._persistence.load_sessions():
            if record.kernel_id in self._kernels.kernels:
                self.sessions[record.id] = Session(
                    record.id, record.path, record.name, record.type, record.kernel_id
                )
            else:
                self._persistence.delete_session(record.id)

    def model(self, session: Session) -> dict[str, Any]:
        return session.model(self._kernels.get(session.kernel_id))

    def get(self, session_id: str, caller: Caller | None = None) -> Session:
        """
        @raise NotFound: no such session, or (with C{hide_kernels}) one
            C{caller} may not see.
        @raise Forbidden: one C{caller} may not see, without C{hide_kernels}.
        """
        session = self.sessions.get(session_id)
        if session is None or session.kernel_id not in self._kernels.kernels:
            raise NotFound(f"Session not found: {session_id}")
        try:
            self._kernels.policy.check_access(caller, self._kernels.kernels[session.kernel_id])
        except NotFound:
            raise NotFound(f"Session not found: {session_id}") from None
        return session

    def list(self, caller: Caller | None = None) -> list[Session]:
        kernels = self._kernels.kernels
        return [
            s
            for s in self.sessions.values()
            if s.kernel_id in kernels and may_access(caller, kernels[s.kernel_id].owner, kernels[s.kernel_id].acl)
        ]

    @staticmethod
    def parse(body: Any, partial: bool = False) -> dict[str, Any]:
        """
        Read a create (or, with C{partial}, an update) request body.
        """
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        legacy = body.get("notebook")
        path = _string(body, "path")
        kind = _string(body, "type")
        if legacy is not None:
            if not isinstance(legacy, dict):
                raise BadRequest("'notebook' must be an object")
            path = path or _string(legacy, "path")
            kind = kind or "notebook"
        name = _string(body, "name")
        kernel = body.get("kernel")
        if kernel is not None:
            if not isinstance(kernel, dict):
                raise BadRequest("'kernel' must be an object with 'name' or 'id'")
            _string(kernel, "name")
            _string(kernel, "id")
        if not partial:
            if not path:
                raise BadRequest("'path' is required")
            if not kind:
                raise BadRequest("'type' is required")
        return {"path": path, "name": name, "type": kind, "kernel": kernel}

    async def create(
        self, body: Any, username: str | None = None, caller: Caller | None = None
    ) -> tuple[Session, bool]:
        """
        Create a session, starting a kernel unless an existing one is named.

        @return: the session and whether it is new (an existing session for
            the same path that C{caller} may see is returned as it is).
        """
        request = self.parse(body)
        for session in self.list(caller):
            if session.path == request["path"]:
                return session, False
        kernel_id = await self._kernel_for(request["kernel"] or {}, username, caller)
        session = Session(
            id=str(uuid.uuid4()),
            path=request["path"],
            name=request["name"] or "",
            type=request["type"],
            kernel_id=kernel_id,
        )
        self.sessions[session.id] = session
        self._save(session)
        return session, True

    async def _kernel_for(self, kernel: dict[str, Any], username: str | None, caller: Caller | None = None) -> str:
        if kernel.get("id"):
            existing = self._kernels.get(kernel["id"])
            self._kernels.policy.check_access(caller, existing)
            return existing.id
        started = await self._kernels.start_kernel(
            kernel.get("name"), kernel.get("env"), username=username, caller=caller, profile=kernel.get("profile")
        )
        return started.id

    async def update(
        self, session_id: str, body: Any, username: str | None = None, caller: Caller | None = None
    ) -> Session:
        session = self.get(session_id, caller)
        request = self.parse(body, partial=True)
        kernel = request["kernel"]
        if kernel:
            old = session.kernel_id
            current = self._kernels.get(old)
            if kernel.get("id") and kernel["id"] != old:
                session.kernel_id = await self._kernel_for(kernel, username, caller)
            elif kernel.get("name") and kernel["name"] != current.spec.name:
                session.kernel_id = await self._kernel_for(kernel, username, caller)
                await self._kernels.shutdown(old, reason="the session switched kernels")
        # After the kernel: a refused switch leaves the session as it was.
        for key in ("path", "name", "type"):
            if request[key] is not None:
                setattr(session, key, request[key])
        self._save(session)
        return session

    async def delete(self, session_id: str, caller: Caller | None = None) -> None:
        session = self.get(session_id, caller)
        del self.sessions[session_id]
        self._forget(session)
        if session.kernel_id in self._kernels.kernels:
            await self._kernels.shutdown(session.kernel_id, reason="its session was deleted")
