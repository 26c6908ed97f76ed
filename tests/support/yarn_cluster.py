"""
One real YARN (L{tests.fixtures.yarn.YarnCluster}) shared by every YARN test of a trial process: started by the
first test that asks for it (~10 s), torn down when the process exits, with its leftovers reported on stderr then.
Each test kills the applications it started and checks that it did.
"""

from __future__ import annotations

import atexit
import sys
import tempfile

from tests.fixtures.yarn import YarnCluster

MAX_ALLOCATION_MB = 2048
"""
The largest container the shared cluster grants (the node has 4096 MB): a kernel asking for more fails at once.
"""

_shared: YarnCluster | None = None


def shared_yarn() -> YarnCluster:
    """
    The process's cluster, started on first use.
    """
    global _shared
    if _shared is None:
        cluster = YarnCluster(tempfile.mkdtemp(prefix="egw-", dir="/tmp"), max_allocation_mb=MAX_ALLOCATION_MB)
        cluster.up()
        _shared = cluster
        atexit.register(_down, cluster)
    return _shared


def _down(cluster: YarnCluster) -> None:
    cluster.down()
    left = cluster.leftovers()
    if left:
        print(f"tests.support.yarn_cluster: the shared YARN left: {left}", file=sys.stderr)
