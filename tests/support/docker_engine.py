"""
One private Docker engine with a one-node swarm (L{tests.fixtures.docker.DockerDaemon}) shared by every Docker
test of a trial process: started by the first test that asks for it, torn down when the process exits (and its
leftovers reported on stderr then). Each test removes what it created and checks that it did.
"""

from __future__ import annotations

import atexit
import sys
import tempfile

from tests.fixtures.docker import DockerDaemon

_shared: DockerDaemon | None = None


def shared_docker() -> DockerDaemon:
    """
    The process's engine, started on first use.
    """
    global _shared
    if _shared is None:
        daemon = DockerDaemon(tempfile.mkdtemp(prefix="egw-", dir="/tmp"), swarm=True)
        daemon.up()
        _shared = daemon
        atexit.register(_down, daemon)
    return _shared


def _down(daemon: DockerDaemon) -> None:
    daemon.down()
    left = daemon.leftovers()
    if left:
        print(f"tests.support.docker_engine: the shared Docker engine left: {left}", file=sys.stderr)
