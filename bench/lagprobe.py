#!/usr/bin/env python
"""
Reactor lag seen from outside: C{GET /api} again and again on one keep-alive
connection, recording how long each answer took, until SIGTERM; then the
latencies (ms) as one JSON list on stdout.

A separate process, so the benchmark's own event loop (a thousand WebSocket
clients) adds nothing to the figures.  C{GET /api} does almost no work in
the gateway, so its latency is the time the request waited for the reactor
plus a loopback round trip (the idle figure shows that floor).

    python bench/lagprobe.py URL TOKEN [INTERVAL_S]
"""

from __future__ import annotations

import http.client
import json
import signal
import sys
import time
from urllib.parse import urlsplit


def main() -> None:
    url, token = sys.argv[1], sys.argv[2]
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 0.02
    parts = urlsplit(url)
    stop = False
    samples: list[float] = []
    errors = 0

    def stopping(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, stopping)
    signal.signal(signal.SIGINT, stopping)
    headers = {"Authorization": f"token {token}"}
    connection: http.client.HTTPConnection | None = None
    while not stop:
        if connection is None:
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        start = time.perf_counter()
        try:
            connection.request("GET", "/api", headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status == 200:
                samples.append((time.perf_counter() - start) * 1000)
            else:
                errors += 1
        except (OSError, http.client.HTTPException):
            errors += 1
            connection.close()
            connection = None
        time.sleep(interval)
    json.dump({"ms": samples, "errors": errors}, sys.stdout)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
