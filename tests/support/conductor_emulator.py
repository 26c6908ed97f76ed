"""
A small emulator of the IBM Spectrum Conductor REST calls egateway's
conductor launcher makes (the ones Enterprise Gateway's Conductor process
proxy makes), for tests: no real Conductor can run here.

It serves, on loopback, in the test's reactor:

  - C{POST /v1/submissions/create}: Spark's REST submission request; runs
    C{[spark.pyspark.python or this interpreter, appResource, *appArgs]} as
    a local process with the request's C{environmentVariables} (the
    "driver"), and answers C{{"submissionId": "driver-..."}};
  - C{GET /v1/applications?driverid=<id>} (or C{applicationid=},
    C{applicationname=}): C{{"applist": [...]}} with C{applicationid},
    C{applicationname}, C{state} and C{driver: {id, host, state}};
  - C{POST /v1/submissions/kill/<driver id>}: SIGTERM to the driver's
    process group, state C{KILLED}.

Every request must carry C{Authorization: PlatformToken token=<credential>}
(else 401).  A driver is C{RUNNING} from its start, C{FINISHED} when it
exits 0, C{FAILED} otherwise, C{KILLED} when killed.  Knobs for tests:
C{refuse_submissions} (the submission answer's C{success: false} with a
message), C{hold_waiting} (applications stay C{WAITING} with no host),
L{ConductorEmulator.kill_from_outside} (an operator's kill), and
C{requests} (what was asked, in order).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.protocol import ProcessProtocol
from twisted.web import resource, server

REST_HOST = "127.0.0.1"


@dataclass
class Driver:
    driver_id: str
    application_id: str
    name: str
    state: str = "RUNNING"
    pid: int = 0
    exit_code: int | None = None
    ended: bool = False
    output: list[bytes] = field(default_factory=list)

    def entry(self, host: str, hold_waiting: bool) -> dict[str, Any]:
        state = "WAITING" if hold_waiting and self.state == "RUNNING" else self.state
        return {
            "applicationid": self.application_id,
            "applicationname": self.name,
            "state": state,
            "driver": {"id": self.driver_id, "host": "" if state == "WAITING" else host, "state": state},
        }


class _DriverProcess(ProcessProtocol):
    def __init__(self, emulator: "ConductorEmulator", driver: Driver) -> None:
        self._emulator = emulator
        self._driver = driver

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self._driver.output.append(data)

    def processEnded(self, reason: Any) -> None:
        code = getattr(reason.value, "exitCode", None)
        self._driver.exit_code = code
        self._driver.ended = True
        if self._driver.state == "RUNNING":
            self._driver.state = "FINISHED" if code == 0 else "FAILED"
        self._emulator.ended(self._driver)


class ConductorEmulator(resource.Resource):
    isLeaf = True

    def __init__(self, reactor: Any, credential: str) -> None:
        super().__init__()
        self._reactor = reactor
        self.credential = credential
        self.drivers: dict[str, Driver] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self.refuse_submissions = ""
        self.hold_waiting = False
        self._port: Any = None
        self._ended: dict[str, list[Any]] = {}

    # -- lifecycle ---------------------------------------------------------

    def listen(self) -> str:
        """
        Listen on a free loopback port; the base URL.
        """
        site = server.Site(self)
        site.displayTracebacks = False
        self._port = self._reactor.listenTCP(0, site, interface=REST_HOST)
        return f"http://{REST_HOST}:{self._port.getHost().port}"

    async def stop(self) -> None:
        """
        Kill every driver still running and stop listening.
        """
        from twisted.internet.defer import Deferred, gatherResults

        waits = []
        for driver in self.drivers.values():
            if not driver.ended and driver.pid:
                d: Deferred[None] = Deferred()
                self._ended.setdefault(driver.driver_id, []).append(d)
                waits.append(d)
                self._signal(driver, signal.SIGKILL)
        await gatherResults(waits)
        if self._port is not None:
            await self._port.stopListening()

    def ended(self, driver: Driver) -> None:
        for d in self._ended.pop(driver.driver_id, []):
            d.callback(None)

    def _signal(self, driver: Driver, signum: int) -> None:
        for target in (lambda: os.killpg(driver.pid, signum), lambda: os.kill(driver.pid, signum)):
            try:
                target()
                return
            except (ProcessLookupError, PermissionError):
                continue

    def kill_from_outside(self, driver_id: str) -> None:
        """
        An operator kills the driver in Conductor.
        """
        driver = self.drivers[driver_id]
        driver.state = "KILLED"
        self._signal(driver, signal.SIGTERM)

    # -- the REST API ------------------------------------------------------

    def render(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        method = request.method.decode()
        path = request.path.decode()
        body = request.content.read()
        self.requests.append((method, path, json.loads(body) if body else None))
        expected = f"PlatformToken token={self.credential}".encode()
        if request.getHeader(b"Authorization") != expected:
            request.setResponseCode(401)
            return json.dumps({"message": "Invalid credential"}).encode()
        if method == "POST" and path == "/v1/submissions/create":
            return json.dumps(self._create(json.loads(body))).encode()
        if method == "GET" and path == "/v1/applications":
            return json.dumps({"applist": self._list(request.args)}).encode()
        if method == "POST" and path.startswith("/v1/submissions/kill/"):
            driver = self.drivers.get(path.rsplit("/", 1)[1])
            if driver is None:
                request.setResponseCode(404)
                return json.dumps({"message": "no such driver"}).encode()
            if driver.state in ("RUNNING", "WAITING"):
                driver.state = "KILLED"
                self._signal(driver, signal.SIGTERM)
            return json.dumps({"action": "KillSubmissionResponse", "success": True,
                               "submissionId": driver.driver_id}).encode()
        request.setResponseCode(404)
        return json.dumps({"message": f"no route {method} {path}"}).encode()

    def _create(self, submission: dict[str, Any]) -> dict[str, Any]:
        if self.refuse_submissions:
            return {"action": "CreateSubmissionResponse", "success": False, "message": self.refuse_submissions}
        number = len(self.drivers) + 1
        properties = submission.get("sparkProperties") or {}
        driver = Driver(
            driver_id=f"driver-20261206000000-{number:04d}",
            application_id=f"app-20261206000000-{number:04d}",
            name=str(properties.get("spark.app.name") or ""),
        )
        python = str(properties.get("spark.pyspark.python") or sys.executable)
        argv = [python, str(submission["appResource"]), *map(str, submission.get("appArgs") or [])]
        env = {k: v for k, v in os.environ.items() if not k.startswith("EG_")}
        env.update({str(k): str(v) for k, v in (submission.get("environmentVariables") or {}).items()})
        process = self._reactor.spawnProcess(_DriverProcess(self, driver), argv[0], argv, env=env,
                                             childFDs={0: "w", 1: "r", 2: "r"})
        driver.pid = process.pid
        self.drivers[driver.driver_id] = driver
        return {"action": "CreateSubmissionResponse", "success": True, "submissionId": driver.driver_id}

    def _list(self, args: dict[bytes, list[bytes]]) -> list[dict[str, Any]]:
        def wanted(driver: Driver) -> bool:
            for key, value in ((b"driverid", driver.driver_id), (b"applicationid", driver.application_id),
                               (b"applicationname", driver.name)):
                if key in args and args[key][0].decode() != value:
                    return False
            return True

        return [d.entry(REST_HOST, self.hold_waiting) for d in self.drivers.values() if wanted(d)]
