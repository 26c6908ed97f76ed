"""
The gateway's main log: text or JSON lines, a level, a file reopened on
SIGHUP for logrotate, the same under C{twistd} and C{twist}.

twistd takes a log observer from the application (its C{ILogObserver}
component), twist from its options' C{fileLogObserverFactory}; both are set
up after C{makeService}, which is where L{install} hands ours over.  Under
twistd, ours replaces its C{LogFile}, whose size-based rotation and SIGUSR1
handler would otherwise fight logrotate and the drain signal.

A JSON line is one object: C{time} (ISO 8601, UTC), C{level},
C{namespace}, C{message} (rendered) and the event's own fields that are
plain values (C{kernel_id}, C{user}, C{launcher}, ...), so a log pipeline
can select a kernel's lines without parsing text.  Fields named like
credentials are left out, as in the audit trail.
"""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from egateway.ops.audit import _CREDENTIAL_NAME, _iso

_LEGACY_KEYS = frozenset({"message", "format", "isError", "system", "time", "why", "failure", "printed"})
"""
Keys C{twisted.python.log} adds to its events; they repeat what the record
already says.
"""

_SCALARS = (str, int, float, bool, type(None))


def json_record(event: dict[str, Any]) -> dict[str, Any]:
    """
    The JSON object one log event becomes.
    """
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": _iso(event.get("log_time")),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace") or event.get("system") or "-",
        "message": formatEvent(event),
    }
    for name, value in event.items():
        if name.startswith("log_") or name in _LEGACY_KEYS or name in record:
            continue
        if _CREDENTIAL_NAME.search(name) or not isinstance(value, _SCALARS):
            continue
        record[name] = value
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        record["traceback"] = failure.getTraceback()
    return record


def json_line(event: dict[str, Any]) -> str:
    return json.dumps(json_record(event), default=str) + "\n"


def text_line(event: dict[str, Any]) -> str | None:
    return formatEventAsClassicLogText(event)


def _open_append_blocking(path: str) -> IO[str]:
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    return os.fdopen(descriptor, "a", encoding="utf-8", errors="replace")


class LogSetupError(OSError):
    """
    The log file cannot be opened; the message names it and says why.
    """


@implementer(ILogObserver)
class MainLog:
    """
    Writes each event as a line to a file (or a stream) it owns.  Each line
    is written and flushed at once, as Twisted's own file observers do, so
    nothing is lost when the process dies.

    @ivar path: the file, reopened by L{reopen}; empty for C{stream}.
    """

    def __init__(self, log_format: str, path: str = "", stream: IO[str] | None = None) -> None:
        # Absolute: twistd changes directory (--rundir) before a reopen.
        self.path = os.path.abspath(path) if path else ""
        self._format = json_line if log_format == "json" else text_line
        self._stream = stream if stream is not None else sys.stdout
        self._file: IO[str] | None = None
        if path:
            self._file = self._open(path)

    @staticmethod
    def _open(path: str) -> IO[str]:
        try:
            return _open_append_blocking(path)
        except OSError as e:
            raise LogSetupError(f"cannot open the log file {path}: {e.strerror or e}") from None

    def __call__(self, event: dict[str, Any]) -> None:
        line = self._format(event)
        if not line:
            return
        out = self._file if self._file is not None else self._stream
        try:
            out.write(line)
            out.flush()
        except (OSError, ValueError):
            # Nowhere left to say it; the next reopen may fix it.
            pass

    def reopen(self) -> None:
        """
        Open the file at L{path} again (logrotate moved the old one away);
        on failure keep writing to the old one.
        """
        if not self.path:
            return
        try:
            fresh = self._open(self.path)
        except LogSetupError:
            return
        old, self._file = self._file, fresh
        if old is not None:
            old.close()


def level_named(name: str) -> LogLevel:
    return LogLevel.levelWithName(name)


def filtered(observer: ILogObserver, level: str) -> ILogObserver:
    return FilteringLogObserver(observer, [LogLevelFilterPredicate(defaultLogLevel=level_named(level))])


def install(settings: Any, runner_options: Any, service: Any) -> MainLog | None:
    """
    Make the runner (twistd or twist, whose options are C{runner_options})
    log through a L{MainLog} for the C{ops} settings.  Under twistd it is
    set on the application when C{service} joins it.

    @return: the main log, for SIGHUP to reopen; C{None} when the runner
        is neither (a test building the service) or logs to syslog.
    """
    if runner_options is None:
        return None
    if "fileLogObserverFactory" in runner_options:
        return _install_twist(settings, runner_options)
    if "logfile" in runner_options and not runner_options.get("syslog"):
        return _install_twistd(settings, runner_options, service)
    return None


def _install_twist(settings: Any, options: Any) -> MainLog | None:
    if (settings.log_format, settings.log_file, settings.log_level) == ("text", "", "info"):
        # Nothing asked of egateway: twist's own --log-format, --log-level
        # and --log-file stay in charge.
        return None
    main = MainLog(settings.log_format, settings.log_file, options["logFile"])
    options["fileLogObserverFactory"] = lambda stream: main
    options["logLevel"] = level_named(settings.log_level)
    return main


def _install_twistd(settings: Any, options: Any, service: Any) -> MainLog:
    path = settings.log_file or options["logfile"]
    if path == "-" or (not path and options.get("nodaemon")):
        path = ""
    elif not path:
        path = "twistd.log"
    main = MainLog(settings.log_format, path)
    service.log_observer = filtered(main, settings.log_level)
    return main
