"""
How the benchmark's own process (both clients: the WebSocket one and the
direct ZMQ one) takes memory from the C allocator: C{--client-malloc}.

With glibc's defaults a client that parses one 20 MB message at a time gives
the memory back to the kernel after each message and faults fresh pages in
for the next: glibc serves a block at least as large as its C{mmap}
threshold (raised to the size of the last such block freed) with a fresh
mapping, and trims the top of its heap once more than twice that threshold
lies free there.  Which client pays depends on how many such blocks it holds
at once, not on what it received: the v1 WebSocket client slices the
content out of the frame (as JupyterLab's and jupyter_server's v1 parsers
do), so it holds four 20 MB blocks at its peak where the legacy one holds
three, and crosses the trim threshold every message.  Measured on one 20 MB
message over loopback (a throwaway script, one process per client, median of
10 messages): the v1 client took 93 to 112 ms from the request to the parsed
content and 21,000 minor page faults (80 MB zeroed by the kernel), the legacy
client 41 to 47 ms and none; with L{keep_freed_memory}, the v1 client 35 to
40 ms and none.

C{keep} tells this process's allocator to keep what it frees (no fresh
mappings for large blocks, no trimming), so a stream figure measures the two
paths rather than where each client's peak falls against glibc's
thresholds.  It applies to both clients alike (one process) and to nothing
else: the gateway and every kernel run with their allocators as shipped.
"""

from __future__ import annotations

import ctypes
import ctypes.util

CHOICES = ("default", "keep")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20
"""
The largest C{mmap} threshold glibc takes on 64-bit systems; larger blocks
are still mapped, but freed blocks of the benchmark's sizes (20 MB) stay in
the heap.
"""
_NEVER_TRIM = (1 << 31) - 1


def keep_freed_memory() -> None:
    """
    Make this process's C allocator keep freed memory for its next
    allocations: no trimming of the heap, no fresh mapping for blocks up to
    32 MiB.

    @raise OSError: the C library is not glibc (no C{mallopt}), or refused.
    """
    name = ctypes.util.find_library("c") or "libc.so.6"
    libc = ctypes.CDLL(name)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        raise OSError(f"{name} has no mallopt: --client-malloc keep needs glibc")
    for option, value in ((_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), (_M_TRIM_THRESHOLD, _NEVER_TRIM)):
        if mallopt(option, value) != 1:
            raise OSError(f"mallopt({option}, {value}) was refused")


def apply(choice: str) -> None:
    """
    Set up this process's allocator as C{--client-malloc} says.
    """
    if choice == "keep":
        keep_freed_memory()
