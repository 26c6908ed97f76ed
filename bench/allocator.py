"""
How the benchmark's clients and kernels take memory from the C allocator:
C{--malloc}.

With glibc's defaults a process that handles one 20 MB message at a time
gives the memory back to the kernel after each message and faults fresh
pages in for the next: glibc serves a block at least as large as its
C{mmap} threshold (raised to the size of the last such block freed) with a
fresh mapping, and trims the top of its heap once more than twice that
threshold lies free there.  Which process pays depends on how many such
blocks it holds at once, not on what it received: a v1 WebSocket client
that slices the content out of the frame (as JupyterLab's and
jupyter_server's v1 parsers do, and the benchmark's client did until it
decoded each part from a view of the frame) holds four 20 MB blocks at its
peak where the legacy one holds three, and crosses the trim threshold every
message.  Measured on one 20 MB message over loopback (a throwaway script,
one process per client, median of 10 messages): that v1 client took 93 to
112 ms from the request to the parsed content and 21,000 minor page faults
(80 MB zeroed by the kernel), the legacy client 41 to 47 ms and none;
keeping freed memory, the v1 client 35 to 46 ms and none.  Each side's kernel pays the same way
for building and signing the output, in whatever state its heap happens to
be, which is most of why the same code's 20 MB figure moves by 0.2 from one
run to the next.

C{keep} makes the allocator keep what it frees (no fresh mapping for blocks
up to 32 MiB, no trimming) in this process (both clients) and in both
sides' kernels (a copy of the kernelspec whose C{env} says so, used by both
sides), so a large-output figure measures the two paths rather than where
each process's peak falls against glibc's thresholds.  The gateway always
runs with its allocator as shipped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil

CHOICES = ("default", "keep")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
"""
The largest C{mmap} threshold glibc takes on 64-bit systems; larger blocks
are still mapped, but freed blocks of the benchmark's sizes (20 MB) stay in
the heap.
"""
NEVER_TRIM = (1 << 31) - 1

KEEP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(NEVER_TRIM)}
"""
The same settings for a child process, through glibc's environment.
"""


def keep_freed_memory() -> None:
    """
    Make this process's C allocator keep freed memory for its next
    allocations.

    @raise OSError: the C library is not glibc (no C{mallopt}), or refused.
    """
    name = ctypes.util.find_library("c") or "libc.so.6"
    libc = ctypes.CDLL(name)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        raise OSError(f"{name} has no mallopt: --malloc keep needs glibc")
    for option, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, NEVER_TRIM)):
        if mallopt(option, value) != 1:
            raise OSError(f"mallopt({option}, {value}) was refused")


def kernelspec_keeping_memory(name: str, workdir: str) -> tuple[str, str]:
    """
    Copy kernelspec C{name} under C{workdir}, its C{env} telling glibc to
    keep freed memory (L{KEEP_ENV}).

    @return: the copy's name, and the directory to put first on
        C{JUPYTER_PATH} so that both sides find it.
    @raise jupyter_client.kernelspec.NoSuchKernel: no kernelspec C{name}.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec(name)
    data_dir = os.path.join(workdir, "allocator-kernelspecs")
    copy_name = f"{name}-malloc-keep"
    target = os.path.join(data_dir, "kernels", copy_name)
    shutil.copytree(spec.resource_dir, target, dirs_exist_ok=True)
    body = spec.to_dict()
    body["env"] = {**body.get("env", {}), **KEEP_ENV}
    body["display_name"] = f"{spec.display_name} (allocator keeps freed memory)"
    with open(os.path.join(target, "kernel.json"), "w") as f:
        json.dump(body, f, indent=1)
    return copy_name, data_dir


def apply(choice: str, kernelspec: str, workdir: str) -> str:
    """
    Set up the clients' and kernels' allocators as C{--malloc} says.

    @return: the kernelspec both sides are to start.
    """
    if choice != "keep":
        return kernelspec
    keep_freed_memory()
    copy_name, data_dir = kernelspec_keeping_memory(kernelspec, workdir)
    os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (data_dir, os.environ.get("JUPYTER_PATH", "")) if p)
    return copy_name
