"""Reuse freed host memory between XLA:CPU executions instead of page-faulting it in every step.

XLA:CPU allocates each execution's temporary buffer with malloc (about 1.4 GB for a ResNet-50
train step at batch 8, 224 px) and frees it afterwards. glibc serves blocks that large with a fresh
`mmap` and returns them with `munmap`, so every step page-faults the whole buffer in again: on the
2-core development machine ~380,000 page faults per step, and 6.2 instead of 4.5 s of CPU time
(`benchmarks/bench_models.py`, tables in BENCHMARKS.md). `retain_freed_memory` makes glibc serve
large blocks from its heap and keep freed memory there, so the next step reuses it.

Importing `resnet_jax` calls it when XLA:CPU will be the backend, i.e. no GPU/TPU plugin for
JAX is installed (on accelerator hosts the step's temporaries live on the device, and one malloc
arena for all threads could slow a busy input pipeline). RESNET_JAX_RETAIN_HOST_MEMORY=1 forces it
on, =0 off. It only helps threads that have not allocated yet, so import `resnet_jax` before JAX's
first computation; the same effect for any process: MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=2147483647 in the environment. The price: memory freed by the process
(up to 2 GiB at the top of the heap) is not handed back to the operating system while it runs.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import os
import platform
import sys

ENV_VAR = "RESNET_JAX_RETAIN_HOST_MEMORY"

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# mallopt takes a C int: the largest heap top kept untrimmed
_KEEP_BYTES = 2**31 - 1

_applied = False


def retain_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse: one heap (no per-thread arenas, whose
    large blocks would be mmapped), no mmap for large blocks, no trimming of the heap top below
    2 GiB. Returns whether the settings are in effect (False off Linux/glibc)."""
    global _applied
    if _applied:
        return True
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_BYTES))
    _applied = all(libc.mallopt(param, value) == 1 for param, value in settings)
    return _applied


def retaining() -> bool:
    """Whether `retain_freed_memory` has put its settings in effect in this process."""
    return _applied


@functools.cache
def accelerator_plugins() -> tuple[str, ...]:
    """The installed JAX GPU/TPU plugins (`jax_plugins` entry points, and libtpu); scanned once,
    though both settings applied at import ask."""
    found = sorted(e.name for e in importlib.metadata.entry_points(group="jax_plugins"))
    return (*found, *(["libtpu"] if importlib.util.find_spec("libtpu") is not None else []))


def cpu_only_switch(env_var: str) -> bool:
    """A CPU-tuning switch: `env_var` = 1/true/yes/on or 0/false/no/off decides; unset (or
    empty), on only where XLA:CPU is the backend (no accelerator plugins installed)."""
    value = os.environ.get(env_var, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    if value:
        raise ValueError(f"{env_var}={os.environ[env_var]!r}: expected 1 or 0 (or unset)")
    return not accelerator_plugins()


def wanted() -> bool:
    """Whether importing resnet_jax should call `retain_freed_memory`
    (RESNET_JAX_RETAIN_HOST_MEMORY, see `cpu_only_switch`)."""
    return cpu_only_switch(ENV_VAR)
