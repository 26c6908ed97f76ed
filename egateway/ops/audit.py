"""
The audit trail: one structured event for each security decision.

Who was refused and why, who launched which kernel where, who connected to
or shut down which kernel.  Events go through C{twisted.logger} under their
own namespace (L{AUDIT_NAMESPACE}), so an observer can separate them from
the operational log, and, with C{audit_log} set, to a JSON-lines file that
security tooling can ingest.

Call L{event} with a kind (C{"auth.failure"}, C{"request.refused"},
C{"kernel.launch"}, ...) and named fields.  A field whose name suggests a
credential (token, secret, password, authorization, cookie) is never
recorded: its value is replaced by C{"[redacted]"}.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from typing import IO, Any, Callable

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger, LogPublisher, globalLogPublisher
from twisted.web.iweb import IRequest
from zope.interface import implementer

AUDIT_NAMESPACE = "egateway.audit"
"""
The C{log_namespace} of every audit event.
"""

_log = Logger(namespace=AUDIT_NAMESPACE)
_ops_log = Logger()

_CREDENTIAL_NAME = re.compile(r"token|secret|passw|authoriz|cookie|credential", re.IGNORECASE)
_MAX_TEXT = 512


def _clean(name: str, value: Any) -> Any:
    if _CREDENTIAL_NAME.search(name):
        return "[redacted]"
    if isinstance(value, str) and len(value) > _MAX_TEXT:
        return value[:_MAX_TEXT] + "..."
    if isinstance(value, (set, frozenset)):
        return sorted(str(item) for item in value)
    return value


def _summary(fields: dict[str, Any]) -> str:
    return " ".join(f"{name}={value}" for name, value in fields.items() if value not in (None, ""))


def event(kind: str, **fields: Any) -> None:
    """
    Record one security decision.

    @param kind: what happened, dotted (C{"auth.failure"}).
    @param fields: the facts: who (C{user}), from where (C{address}), what
        (C{action}, C{kernel_id}, ...), why (C{reason}).  Plain JSON values.
    """
    clean = {name: _clean(name, value) for name, value in fields.items()}
    _log.info(
        "audit {audit_kind}: {audit_summary}",
        audit_kind=kind,
        audit_fields=clean,
        audit_summary=_summary(clean),
    )


def is_audit_event(log_event: dict[str, Any]) -> bool:
    """
    Whether a C{twisted.logger} event is an audit event.
    """
    return log_event.get("log_namespace") == AUDIT_NAMESPACE and "audit_kind" in log_event


def client_address(request: IRequest) -> str:
    """
    The peer's address as text (an IP, or C{unix} for a UNIX socket).
    """
    try:
        address = request.getClientAddress()
    except Exception:
        return "unknown"
    host = getattr(address, "host", None)
    return str(host) if host else "unix"


def actor(request: IRequest) -> dict[str, Any]:
    """
    The fields that say who made C{request}: C{user}, C{auth} (the
    authenticator), C{address}, and C{via_proxy} when a trusted front end
    relayed it.  For callers of L{event}.
    """
    identity = getattr(request, "gateway_user", None)
    fields: dict[str, Any] = {
        "user": identity.display_name if identity is not None else "anonymous",
        "auth": identity.method if identity is not None else "none",
        "address": getattr(request, "gateway_client_address", None) or client_address(request),
    }
    if identity is not None and identity.trusted_proxy:
        fields["via_proxy"] = True
    return fields


def refused(request: IRequest, status: int, reason: str, **fields: Any) -> None:
    """
    Record that C{request} was refused with C{status}, and why.
    """
    event(
        "request.refused",
        **actor(request),
        action=f"{request.method.decode('ascii', 'replace')} {request.path.decode('utf-8', 'replace')}",
        status=status,
        reason=reason,
        **fields,
    )


# -- kernel lifecycle --------------------------------------------------------


def _kernel_fields(kernel: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "kernel_id": kernel.id,
        "user": kernel.username,
        "spec": kernel.spec.name,
        "launcher": kernel.launcher_name,
    }
    profile = getattr(kernel, "profile", None)
    if profile is not None:
        fields["profile"] = getattr(profile, "name", profile)
    pool = getattr(kernel, "pool", None)
    if pool is not None:
        fields["pool"] = pool
    process = getattr(kernel, "process", None)
    if process is not None:
        try:
            fields["placement"] = process.placement.to_dict()
        except Exception:
            pass
    return fields


_KERNEL_EVENTS = {
    "started": "kernel.launch",
    "bound": "kernel.launch",
    "failed": "kernel.launch_failed",
    "restored": "kernel.restored",
    "removed": "kernel.removed",
}


def kernel_listener(event_name: str, kernel: Any) -> None:
    """
    A kernel manager listener (C{manager.listeners}) that records launches
    (a warm pool's kernel bound to its user is one, with its C{pool}),
    failed launches, restorations and removals.
    """
    kind = _KERNEL_EVENTS.get(event_name)
    if kind is None or getattr(kernel, "pooled", False):
        # A pooled kernel is nobody's: it enters the trail when bound.
        return
    fields = _kernel_fields(kernel)
    if event_name in ("failed", "removed") and getattr(kernel, "reason", ""):
        fields["reason"] = kernel.reason
    event(kind, **fields)


def watch_kernels(manager: Any) -> None:
    """
    Record C{manager}'s kernel launches and removals in the audit trail.
    """
    if kernel_listener not in manager.listeners:
        manager.listeners.append(kernel_listener)


# -- the JSON-lines file -----------------------------------------------------


def _iso(timestamp: float | None) -> str:
    moment = datetime.fromtimestamp(timestamp, timezone.utc) if timestamp else datetime.now(timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def audit_record(log_event: dict[str, Any]) -> dict[str, Any]:
    """
    The JSON object an audit event becomes in the audit file.
    """
    record: dict[str, Any] = {"time": _iso(log_event.get("log_time")), "kind": log_event["audit_kind"]}
    for name, value in log_event.get("audit_fields", {}).items():
        record.setdefault(name, value)
    return record


def _open_append_blocking(path: str) -> IO[str]:
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    return os.fdopen(descriptor, "a", buffering=64 * 1024, encoding="utf-8")


class AuditFileError(OSError):
    """
    The audit file cannot be opened; the message names it and says why.
    """


@implementer(ILogObserver)
class AuditFile(Service):
    """
    Writes every audit event as one JSON line to a file (mode 0600).

    Lines go to a 64 KiB buffer, flushed every C{flush_interval} seconds and
    at stop, so an event costs the reactor a memory copy and the disk a write
    now and then, never a write per event.
    """

    name = "audit-log"

    def __init__(
        self,
        path: str,
        clock: Any,
        publisher: LogPublisher | None = None,
        flush_interval: float = 1.0,
        opener: Callable[[str], IO[str]] = _open_append_blocking,
    ) -> None:
        self.path = path
        self._clock = clock
        self._publisher = publisher if publisher is not None else globalLogPublisher
        self._flush_interval = flush_interval
        self._opener = opener
        self._file: IO[str] | None = None
        self._flusher: LoopingCall | None = None

    def privilegedStartService(self) -> None:
        # Opened before twistd drops privileges: the audit file may be one
        # the gateway's user cannot create.
        super().privilegedStartService()
        self._open()

    def _open(self) -> None:
        if self._file is not None:
            return
        try:
            self._file = self._opener(self.path)
        except OSError as e:
            raise AuditFileError(f"cannot open the audit log {self.path}: {e.strerror or e}") from None

    def startService(self) -> None:
        super().startService()
        self._open()
        self._publisher.addObserver(self)
        self._flusher = LoopingCall(self.flush)
        self._flusher.clock = self._clock
        self._flusher.start(self._flush_interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        self._publisher.removeObserver(self)
        if self._flusher is not None and self._flusher.running:
            self._flusher.stop()
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __call__(self, log_event: dict[str, Any]) -> None:
        if self._file is None or not is_audit_event(log_event):
            return
        try:
            line = json.dumps(audit_record(log_event), default=str, sort_keys=False)
            self._file.write(line + "\n")
        except Exception as e:
            # Detach first: the error below is itself a log event we observe.
            broken, self._file = self._file, None
            try:
                broken.close()
            except Exception:
                pass
            _ops_log.error(
                "audit file {path} disabled after a write error ({error}); restart the gateway once it is writable",
                path=self.path,
                error=str(e),
            )

    def flush(self) -> None:
        if self._file is None:
            return
        try:
            self._file.flush()
        except OSError as e:
            _ops_log.error("cannot write the audit file {path}: {error}", path=self.path, error=str(e))

    def reopen(self) -> None:
        """
        Open the file at L{path} again (logrotate moved the old one away,
        then sent SIGHUP); on failure keep writing to the old one.
        """
        if self._file is None:
            return
        try:
            fresh = self._opener(self.path)
        except OSError as e:
            _ops_log.error(
                "cannot reopen the audit file {path} ({error}); still writing to the previous one",
                path=self.path,
                error=e.strerror or str(e),
            )
            return
        old, self._file = self._file, fresh
        old.close()
