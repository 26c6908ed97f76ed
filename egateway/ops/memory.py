"""
Giving back the memory a burst of work freed.

Restoring 1,000 kernels after a restart opens, for each, a second socket to
probe it (control as well as shell, L{egateway.kernels.launching}) and
makes the objects of 1,000 restores at once; all of it is freed once each
kernel is ready.  glibc's allocator keeps freed memory for reuse, and what
lies between blocks still in use it never returns by itself, so the
gateway kept that high-water mark for the rest of its life: 264 to 296 MiB
after a restart against 232 MiB before it with the same 1,000 kernels
connected (C{bench/scale.py}).  C{malloc_trim} returns every free page of
every arena (glibc 2.8 and later) to the system; the next allocations
reuse what is still held first.

It is called once the store's kernels are restored, in a thread of the
blocking pool: it takes the allocator's locks for a few milliseconds, and
the reactor thread must not be the one waiting on them.  Elsewhere than
glibc (musl, macOS) there is no such call and nothing is done.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Callable

from twisted.logger import Logger

_log = Logger()


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        # The symbols already loaded into the process, the C library's
        # among them: no search for the library (which runs ldconfig).
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_trim = _malloc_trim()
_PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20


def resident_bytes_blocking() -> int | None:
    """
    This process's resident set size, from C{/proc/self/statm} (C{None}
    where there is none).
    """
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def release_freed_memory_blocking() -> tuple[int | None, int | None]:
    """
    Return the C heap's free pages to the system.  Blocks for as long as
    the allocator takes (milliseconds): call it from a thread.

    @return: the resident set size before and after (C{None}s where it
        cannot be read; the same twice where the C library has no
        C{malloc_trim}).
    """
    before = resident_bytes_blocking()
    if _trim is not None:
        _trim(0)
    return before, resident_bytes_blocking()


async def release_freed_memory(run_blocking: Callable[..., Any], after: str) -> None:
    """
    L{release_freed_memory_blocking} through C{run_blocking} (the blocking
    pool's C{run}), and a log line saying how much it gave back.
    """
    before, now = await run_blocking(release_freed_memory_blocking)
    if before is not None and now is not None:
        _log.info(
            "{after}: resident memory {before:.0f} MiB, {now:.0f} MiB once freed memory was returned",
            after=after,
            before=before / MIB,
            now=now / MIB,
        )

