"""Reuse freed host memory between XLA:CPU executions instead of page-faulting it in every step.

XLA:CPU allocates each execution's temporary buffer with malloc (about 1.4 GB for a ResNet-50
train step at batch 8, 224 px) and frees it afterwards. glibc serves blocks that large with a fresh
`mmap` and returns them with `munmap`, so every step page-faults the whole buffer in again: on the
2-core development machine ~380,000 page faults per step, and 6.2 instead of 4.5 s of CPU time
(`benchmarks/bench_models.py`, tables in BENCHMARKS.md). `retain_freed_memory` makes glibc serve
large blocks from its heap and keep freed memory there, so the next step reuses it.

Importing `resnet_jax` calls it when XLA:CPU will be the backend (`backend.cpu_expected`:
JAX_PLATFORMS names cpu first, or no GPU/TPU plugin for JAX is installed; on accelerator hosts
the step's temporaries live on the device, and one malloc arena for all threads could slow a
busy input pipeline). RESNET_JAX_RETAIN_HOST_MEMORY=1 forces it
on, =0 off. It only helps threads that have not allocated yet, so import `resnet_jax` before JAX's
first computation; the same effect for any process: MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=1099511627776 in the environment. The price: memory freed by the
process is not handed back to the operating system while it runs. (Trimming used to start
above 2 GiB, the most a positive `mallopt` value allows; steps with larger temporaries, e.g.
ResNet-50 at batch 32 with 4.1 GB, then faulted a million pages per step.)
"""

from __future__ import annotations

import ctypes
import platform
import sys

from resnet_jax import backend

ENV_VAR = "RESNET_JAX_RETAIN_HOST_MEMORY"

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


def wanted() -> bool:
    """Whether importing resnet_jax should call `retain_freed_memory`
    (RESNET_JAX_RETAIN_HOST_MEMORY, see `backend.cpu_only_switch`)."""
    return backend.cpu_only_switch(ENV_VAR)
