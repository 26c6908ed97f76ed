"""
The gateway process's file descriptors: how many it may hold, and whether a
launch still has room.

Every kernel costs the gateway descriptors: the TCP connections of its ZMQ
sockets, a local kernel's pipes and log file, and for each client three
more sockets and the WebSocket (13 per kernel with one client in
C{bench/scale.py}).  When they run out, nothing says so: libzmq opens its
connections in its own I/O thread, fails there and retries, so the next
kernel starts but never answers, and its launch ends at the launch timeout
as "timed out waiting for the kernel to answer kernel_info" (measured under
C{prlimit --nofile=70}: nine kernels, then a 504 after 30 s, nothing in the
log).  A launch now checks first and is refused at once, naming the cause
and the setting to raise.

The check is cheap on purpose, since it runs on the reactor thread for every
launch: descriptors are handed out lowest first, so the lowest free one is
a lower bound on how many are in use (a full count reads C{/proc/self/fd},
11 ms at 13,000 descriptors, and is only done to word a refusal).
"""

from __future__ import annotations

import errno
import os
import resource

LAUNCH_RESERVE = 32
"""
Descriptors that must stay free for a launch to go ahead: one kernel with a
client (13), a second client, and room for the API's own connections.
"""


def soft_limit() -> int | None:
    """
    The process's C{RLIMIT_NOFILE} soft limit, or C{None} when unlimited.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def lowest_free() -> int | None:
    """
    The lowest descriptor number not in use (every one below it is), or
    C{None} when none is free.
    """
    try:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE):
            return None
        raise
    os.close(fd)
    return fd


def count_in_use() -> int | None:
    """
    How many descriptors the process holds, or C{None} without C{/proc}.
    """
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def shortage(reserve: int = LAUNCH_RESERVE) -> str | None:
    """
    Why a launch must not go ahead for lack of descriptors, or C{None} when
    at least C{reserve} are surely free.
    """
    limit = soft_limit()
    if limit is None:
        return None
    free_from = lowest_free()
    if free_from is not None and free_from + reserve <= limit:
        return None
    held = count_in_use()
    if held is not None and held + reserve <= limit:
        # Holes below the lowest free one were miscounted as used: room.
        return None
    return (
        f"the gateway holds {held if held is not None else 'nearly all'} of the {limit} file descriptors "
        f"it may open, and a kernel needs about {reserve} free; raise its limit (LimitNOFILE in the systemd "
        f"unit, ulimit -n) or lower max_kernels"
    )
