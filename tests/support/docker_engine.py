"""
One private Docker engine with a one-node swarm (L{tests.fixtures.docker.DockerDaemon}) shared by every Docker
test of a trial process: started by the first test that asks for it, torn down when the process exits (and its
leftovers reported on stderr then). Each test removes what it created and checks that it did.
"""

from __future__ import annotations

import tempfile

from tests.fixtures._support import PerProcess
from tests.fixtures.docker import DockerDaemon


def _start() -> DockerDaemon:
    daemon = DockerDaemon(tempfile.mkdtemp(prefix="egw-", dir="/tmp"), swarm=True)
    daemon.up()
    return daemon


shared_docker = PerProcess("tests.support.docker_engine: the shared Docker engine", _start)
"""
The process's engine, started on first use.
"""
