"""glibc's thresholds for freed memory (noah_ray.nn.malloc), checked by what the process's resident
memory does when a 24 MiB block is freed: with glibc's defaults the block (above the initial
128 KiB mmap threshold) is a mapping of its own and leaves with ``free``; with
``keep_freed_memory`` it comes from the heap, which is never trimmed.  Fresh subprocesses: the
setting is process-wide."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from noah_ray.nn.malloc import keep_freed_memory, on_glibc

pytestmark = pytest.mark.skipif(not (on_glibc() and os.path.exists("/proc/self/statm")),
                                reason="glibc on Linux only")

_SCRIPT = r"""
import ctypes, os, sys
from noah_ray.nn.malloc import keep_freed_memory
print(keep_freed_memory())
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
size = 24 << 20
block = libc.malloc(size)
ctypes.memset(block, 1, size)          # touch every page
held = rss()
libc.free(block)
print(held - rss())
"""


def _freed_bytes(env_extra: dict[str, str]) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env,
                         timeout=60, check=True).stdout.split()
    return out[0], int(out[1])


def test_freed_block_is_kept_by_the_process():
    took, released = _freed_bytes({})
    assert took == "True"
    assert released < 1 << 20          # the 24 MiB stay resident for the next step


def test_users_glibc_setting_wins_and_gives_the_default_behaviour_back():
    took, released = _freed_bytes({"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert took == "False"
    assert released > 20 << 20         # glibc's default: the mapping is returned on free


def test_environment_is_read_from_the_given_mapping():
    assert keep_freed_memory({"MALLOC_MMAP_THRESHOLD_": "65536"}) is False
