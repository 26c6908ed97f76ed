"""
The YARN ResourceManager's REST API (C{/ws/v1/cluster}) through treq, so
no call blocks the reactor and no thread pool or C{yarn-api-client} is
needed.

Endpoints are written as Enterprise Gateway's users write
C{EG_YARN_ENDPOINT}: the RM's base URL (C{http://rm:8088}) or its
C{.../ws/v1/cluster} form; with none, C{yarn-site.xml} in
C{HADOOP_CONF_DIR} names them (L{endpoints_from_site}).  With two or more
(ResourceManager HA) the client keeps using the one that last answered as
the active RM and moves to the next when it cannot be reached or answers
as a standby (a redirect to the active one, or C{haState} STANDBY), so a
failover loses no kernel.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ElementTree
from typing import Any, Mapping, Sequence
from urllib.parse import urlencode

from treq.client import HTTPClient
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from egateway.clusters.http_json import Unreachable, json_request

_log = Logger()

API_PATH = "/ws/v1/cluster"

LIVE_STATES = frozenset({"NEW", "NEW_SAVING", "SUBMITTED", "ACCEPTED", "RUNNING"})
FINAL_STATES = frozenset({"FINISHED", "FAILED", "KILLED"})

REQUEST_TIMEOUT = 10.0


class YarnAPIError(Exception):
    """
    No ResourceManager answered (C{status} 0), or the active one refused
    (its status and message).
    """

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)

    @property
    def not_found(self) -> bool:
        return self.status == 404


def base_url(endpoint: str) -> str:
    """
    The RM's base URL from either form of C{EG_YARN_ENDPOINT}.

    @raise ValueError: not an http(s) URL.
    """
    url = endpoint.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{endpoint!r} is not an http:// or https:// URL of a ResourceManager")
    for suffix in (API_PATH, "/ws/v1"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
            break
    return url


def endpoints_from_site(conf_dir: str) -> list[str]:
    """
    The RM web addresses C{yarn-site.xml} in C{conf_dir} names: each HA
    RM's C{yarn.resourcemanager.webapp.address.<id>}, else the single
    C{yarn.resourcemanager.webapp.address} (or the hostname's port 8088).
    """
    try:
        root = ElementTree.parse(os.path.join(conf_dir, "yarn-site.xml")).getroot()
    except (OSError, ElementTree.ParseError):
        return []
    props = {
        (p.findtext("name") or "").strip(): (p.findtext("value") or "").strip() for p in root.iter("property")
    }
    ids = [i.strip() for i in props.get("yarn.resourcemanager.ha.rm-ids", "").split(",") if i.strip()]
    if props.get("yarn.resourcemanager.ha.enabled", "").lower() == "true" and ids:
        addresses = [props.get(f"yarn.resourcemanager.webapp.address.{i}", "") for i in ids]
    else:
        host = props.get("yarn.resourcemanager.hostname", "")
        addresses = [props.get("yarn.resourcemanager.webapp.address", f"{host}:8088" if host else "")]
    return [f"http://{a}" for a in addresses if a]


class ResourceManagers:
    """
    The RM REST API of one cluster, over one or more (HA) endpoints.
    """

    def __init__(self, reactor: Any, endpoints: Sequence[str]) -> None:
        self._reactor = reactor
        self.endpoints = [base_url(e) for e in endpoints if e.strip()]
        if not self.endpoints:
            raise ValueError("no ResourceManager endpoint")
        self._active = 0
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 4
        self._http = HTTPClient(Agent(reactor, pool=self._pool))

    @property
    def active(self) -> str:
        return self.endpoints[self._active]

    async def call(
        self, method: str, path: str, query: Mapping[str, Any] | None = None, body: Any = None
    ) -> Any:
        """
        One request to the active RM (trying the others when it cannot
        answer as the active one); its decoded JSON.

        @raise YarnAPIError: no RM answered as active, or it answered an
            error (with its message).
        """
        url_path = API_PATH + path + ("?" + urlencode(query) if query else "")
        headers = Headers({b"Accept": [b"application/json"], b"Content-Type": [b"application/json"]})
        data = json.dumps(body).encode() if body is not None else None
        failures = []
        for attempt in range(len(self.endpoints)):
            index = (self._active + attempt) % len(self.endpoints)
            endpoint = self.endpoints[index]
            try:
                # Redirects are not followed: a standby RM's redirect says
                # to move on to the next endpoint.
                code, parsed, text = await json_request(
                    self._http, self._reactor, method, endpoint + url_path, data=data, headers=headers,
                    timeout=REQUEST_TIMEOUT, allow_redirects=False,
                )
            except Unreachable as e:
                failures.append(f"{endpoint}: {e}")
                continue
            if isinstance(parsed, str):
                # Not JSON: nothing the RM's API answers, so no answer.
                parsed = None
            if code in (301, 302, 307) or _standby(parsed):
                failures.append(f"{endpoint}: standby")
                continue
            if index != self._active:
                _log.info("YARN: the active ResourceManager is now {endpoint}", endpoint=endpoint)
                self._active = index
            if code >= 400:
                raise YarnAPIError(code, _message(parsed, text, code))
            return parsed
        raise YarnAPIError(0, "no active YARN ResourceManager answered: " + "; ".join(failures))

    # -- what the launcher asks ------------------------------------------------

    async def applications(self, **query: Any) -> list[dict[str, Any]]:
        """
        C{GET /apps} with C{query} (C{applicationTags}, C{startedTimeBegin},
        C{states}).
        """
        found = await self.call("GET", "/apps", {k: v for k, v in query.items() if v not in (None, "")})
        return list(((found or {}).get("apps") or {}).get("app") or [])

    async def application(self, app_id: str) -> dict[str, Any] | None:
        try:
            return ((await self.call("GET", f"/apps/{app_id}")) or {}).get("app")
        except YarnAPIError as e:
            if e.not_found:
                return None
            raise

    async def kill(self, app_id: str) -> None:
        """
        Ask the RM to kill the application (it answers 202 and kills
        asynchronously); an application already ended is left alone.
        """
        try:
            await self.call("PUT", f"/apps/{app_id}/state", body={"state": "KILLED"})
        except YarnAPIError as e:
            if not e.not_found and "already" not in e.message.lower() and e.status != 400:
                raise

    async def queue(self, name: str) -> str:
        """
        The queue's capacity and use in words (C{"queue default: capacity
        100%, used 95%"}), or C{""} when the scheduler does not say.
        """
        try:
            info = ((await self.call("GET", "/scheduler")) or {}).get("scheduler", {}).get("schedulerInfo", {})
        except YarnAPIError:
            return ""
        for queue in _queues(info):
            if queue.get("queueName") in (name, name.rsplit(".", 1)[-1]):
                return _describe_queue(queue)
        if info.get("type") == "fifoScheduler":
            return (
                f"queue {name or 'default'} (FIFO scheduler): capacity {info.get('capacity', '?')}, "
                f"used {info.get('usedCapacity', '?')}, {info.get('availNodeCapacity', '?')} MB free of "
                f"{info.get('totalNodeCapacity', '?')} MB"
            )
        return ""

    async def close(self) -> None:
        await self._pool.closeCachedConnections()


def _standby(parsed: Any) -> bool:
    info = parsed.get("clusterInfo") if isinstance(parsed, dict) else None
    return isinstance(info, dict) and str(info.get("haState", "")).upper() == "STANDBY"


def _message(parsed: Any, text: str, code: int) -> str:
    if isinstance(parsed, dict):
        exception = parsed.get("RemoteException") or {}
        if exception.get("message"):
            return str(exception["message"])
    return text.strip()[:500] or f"HTTP {code}"


def _queues(info: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    found = []
    todo = [info]
    while todo:
        queue = todo.pop()
        found.append(queue)
        todo.extend(((queue.get("queues") or {}).get("queue")) or [])
    return found


def _describe_queue(queue: Mapping[str, Any]) -> str:
    return (
        f"queue {queue.get('queueName')}: capacity {queue.get('capacity', '?')}%, "
        f"used {queue.get('usedCapacity', '?')}%, max {queue.get('maxCapacity', '?')}%"
    )


__all__ = ["FINAL_STATES", "LIVE_STATES", "ResourceManagers", "YarnAPIError", "base_url", "endpoints_from_site"]
