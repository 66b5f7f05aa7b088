"""glibc's handling of freed memory in a process that trains on the CPU (:func:`keep_freed_memory`).

torch allocates CPU tensors with the C library's ``malloc``.  glibc serves a block above its
*mmap threshold* with a mapping of its own, unmapped again on ``free``, and gives free space at the
top of the heap back to the kernel once it exceeds the *trim threshold*.  By default both adapt to
the largest mapped block freed so far.  A supernet step allocates tensors whose sizes change with
every random subnet (VPT's width changes the sequence length layer by layer), so blocks keep
landing above the threshold, and the heap is trimmed between steps: the next step faults its
memory in again, a kernel-zeroed 4 KiB page at a time.

:func:`keep_freed_memory` fixes both thresholds: blocks up to glibc's cap for the mmap threshold
(32 MiB on 64-bit) come from the heap, and the heap is never trimmed, so the process keeps the
memory of its largest step for the next (as torch's CUDA caching allocator does on a GPU).  Its
resident memory stays at the high-water mark instead of falling between steps.  Measured in
``docs/benchmarks.md`` (Supernet step, round 4).

A user's own glibc settings win: when ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` is
in the environment, nothing is changed (``MALLOC_TRIM_THRESHOLD_=131072`` gives glibc's default
trimming back).  Off glibc (macOS, musl) nothing is changed either.
"""

from __future__ import annotations

import ctypes
import os

#: ``mallopt`` parameters (glibc ``malloc.h``)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc's cap on the mmap threshold on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``): 4 MiB x sizeof(long)
MMAP_THRESHOLD_MAX = 32 * 2**20
#: the environment variables through which a user sets these thresholds for glibc
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def on_glibc() -> bool:
    """Whether the running C library is glibc (asked of the library itself, not guessed from the
    executable's file as ``platform.libc_ver`` does)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):   # no such name off glibc / off POSIX
        return False


def keep_freed_memory(environ: dict[str, str] | None = None) -> bool:
    """Serve blocks up to 32 MiB from the heap and never trim it (module docstring).  True when
    glibc took both settings; False when the user set either in the environment or the C library
    is not glibc.  Idempotent."""
    env = os.environ if environ is None else environ
    if any(k in env for k in USER_SETTINGS) or not on_glibc():
        return False
    libc = ctypes.CDLL(None)
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; -1 as the trim threshold is glibc's "never trim"
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
