"""
IBM Spectrum Conductor's REST API, the part Enterprise Gateway's
C{ConductorClusterProcessProxy} uses, through a Twisted HTTP client:

  - submit: C{POST <master REST>/v1/submissions/create}, Spark's REST
    submission request (what C{spark-submit --master <master REST>} sends to
    the instance group's Spark master), answered with a C{submissionId}, the
    driver id;
  - state and host: C{GET <endpoint>/v1/applications?driverid=<id>},
    answered with C{{"applist": [{"applicationid", "state", "driver":
    {"id", "host"}}]}};
  - kill: C{POST <endpoint>/v1/submissions/kill/<driver id>}.

Every request carries C{Authorization: PlatformToken token=<credential>}
(Enterprise Gateway's C{EGO_SERVICE_CREDENTIAL}).  Nothing here was tried
against a real Conductor: it follows the requests Enterprise Gateway makes
and the tests run it against C{tests/support/conductor_emulator.py}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import quote, urlencode

from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from egateway.clusters.http_json import Unreachable, json_request
from egateway.clusters.interface import LaunchError

REQUEST_TIMEOUT = 30.0

RUNNING_STATES = frozenset({"SUBMITTED", "WAITING", "RUNNING"})
"""
States of an application that has not ended (Enterprise Gateway's initial
states); every other state (C{FINISHED}, C{KILLED}, C{RECLAIMED},
C{FAILED}, C{ERROR}) is final.
"""


class ConductorError(LaunchError):
    """
    Conductor refused a request or could not be reached; the message
    quotes its answer.
    """


@dataclass(frozen=True)
class Application:
    """
    One entry of Conductor's C{applist}.
    """

    application_id: str
    state: str
    driver_id: str
    host: str
    raw: Mapping[str, Any]

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> "Application":
        driver = entry.get("driver") if isinstance(entry.get("driver"), dict) else {}
        return cls(
            application_id=str(entry.get("applicationid") or ""),
            state=str(entry.get("state") or "").upper(),
            driver_id=str(driver.get("id") or ""),
            host=str(driver.get("host") or ""),
            raw=entry,
        )

    def describe(self) -> str:
        """
        Its state, and whatever Conductor says about why it is in it.
        """
        detail = next(
            (str(self.raw[k]) for k in ("diagnostics", "message", "reason") if self.raw.get(k)), ""
        )
        return f"{self.state or 'unknown state'}" + (f": {detail}" if detail else "")


class ConductorAPI:
    """
    The REST calls, with one connection pool.
    """

    def __init__(self, reactor: Any, credential: str) -> None:
        self._reactor = reactor
        self._credential = credential
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._http = HTTPClient(Agent(reactor, pool=self._pool))

    async def _call(self, method: str, url: str, body: Any = None, what: str = "") -> Any:
        headers = Headers(
            {
                b"Accept": [b"application/json"],
                b"Content-Type": [b"application/json"],
                b"Authorization": [f"PlatformToken token={self._credential}".encode("utf-8")],
            }
        )
        data = json.dumps(body).encode("utf-8") if body is not None else None
        try:
            code, parsed, text = await json_request(
                self._http, self._reactor, method, url, data=data, headers=headers, timeout=REQUEST_TIMEOUT
            )
        except Unreachable as e:
            raise ConductorError(f"cannot reach Conductor at {url} to {what}: {e}") from None
        if code >= 400:
            message = parsed.get("message") if isinstance(parsed, dict) else text.strip()[:300]
            raise ConductorError(
                f"Conductor refused to {what} ({code}): {message or 'no message'}",
                status=403 if code in (401, 403) else 500,
            )
        if isinstance(parsed, str):
            raise ConductorError(f"Conductor's answer to {what} is not JSON: {text.strip()[:300]}")
        return parsed

    async def submit(self, master_rest: str, request: Mapping[str, Any]) -> str:
        """
        Submit a driver; its id.

        @raise ConductorError: refused (quoting Conductor's message).
        """
        answer = await self._call(
            "POST", f"{master_rest.rstrip('/')}/v1/submissions/create", dict(request), "submit the kernel"
        )
        if not isinstance(answer, dict) or not answer.get("success") or not answer.get("submissionId"):
            message = answer.get("message") if isinstance(answer, dict) else answer
            raise ConductorError(f"Conductor did not accept the kernel's submission: {message or answer}")
        return str(answer["submissionId"])

    async def application(self, endpoint: str, driver_id: str) -> Application | None:
        """
        The application of driver C{driver_id}, or C{None} while Conductor
        lists none.
        """
        url = f"{endpoint.rstrip('/')}/v1/applications?{urlencode({'driverid': driver_id})}"
        answer = await self._call("GET", url, what=f"look up driver {driver_id}")
        entries = answer.get("applist") if isinstance(answer, dict) else None
        for entry in entries or ():
            if isinstance(entry, dict):
                return Application.from_entry(entry)
        return None

    async def kill(self, endpoint: str, driver_id: str) -> None:
        """
        Ask Conductor to kill driver C{driver_id}.
        """
        await self._call(
            "POST",
            f"{endpoint.rstrip('/')}/v1/submissions/kill/{quote(driver_id, safe='')}",
            what=f"kill driver {driver_id}",
        )

    async def close(self) -> None:
        await self._pool.closeCachedConnections()


__all__ = ["Application", "ConductorAPI", "ConductorError", "RUNNING_STATES"]
