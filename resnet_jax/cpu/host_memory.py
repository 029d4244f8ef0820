"""Reuse freed host memory between XLA:CPU executions instead of page-faulting it in every step.

XLA:CPU allocates each execution's temporary buffer with malloc (about 1.4 GB for a ResNet-50
train step at batch 8, 224 px) and frees it afterwards. glibc serves blocks that large with a fresh
`mmap` and returns them with `munmap`, so every step page-faults the whole buffer in again: on a
2-core machine ~380,000 page faults per step, and 6.2 instead of 4.5 s of CPU time
(`benchmarks/bench_models.py`). `retain_freed_memory` makes glibc serve large blocks from its heap
and keep freed memory there (the heap top is never trimmed, whatever a step's size), so the next
step reuses it. The price: memory freed by the process is not handed back to the operating system
while it runs. It only helps threads that have not allocated yet, so `resnet_jax.cpu.configure`
calls it before JAX's first computation. The same effect for any process, from the environment:
MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776.
"""

from __future__ import annotations

import ctypes
import platform
import sys

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# M_TRIM_THRESHOLD -1: never trim the heap top (mallopt(3))
_NEVER_TRIM = -1

_applied = False


def retain_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse: one heap (no per-thread arenas, whose
    large blocks would be mmapped), no mmap for large blocks, no trimming of the heap top.
    Returns whether the settings are in effect (False off Linux/glibc)."""
    global _applied
    if _applied:
        return True
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
    _applied = all(libc.mallopt(param, value) == 1 for param, value in settings)
    return _applied


def retaining() -> bool:
    """Whether `retain_freed_memory` has put its settings in effect in this process."""
    return _applied
