"""Process-wide settings that make XLA:CPU train ResNets fast, applied only by `configure()`.

Importing `resnet_jax` changes nothing in the process. A program that will compute on CPU
(`expected()`) calls `configure()` once, before JAX's first computation (XLA reads `XLA_FLAGS`
when JAX starts its backends, and glibc's malloc settings only reach threads that have not
allocated yet); the scripts do it through `resnet_jax.cli_args.setup_platform`. It applies:

- `eigen_convolutions`: XLA:CPU's convolutions on Eigen instead of YNNPACK (`xla_flags`);
- `multi_output_fusion`: XLA:CPU's fusion without copies of elementwise work (`xla_flags`);
- `retain_host_memory`: glibc keeps freed memory for reuse (`host_memory`).

The XLA flags only affect XLA:CPU (GPU/TPU compilers ignore them) and are only added for a jaxlib
whose XLA knows them (`xla_flags.supported`); a setting the user already put in `XLA_FLAGS` wins.
`resnet_jax.cpu.conv` holds the convolution formulations `resnet_jax.models.Conv` uses on CPU.
docs/performance.md gives the figures behind each setting.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
import warnings

from resnet_jax.cpu import host_memory, xla_flags

PLUGIN_GROUP = "jax_plugins"  # entry-point group and namespace package of JAX's PJRT plugins
SETTINGS = ("eigen_convolutions", "multi_output_fusion", "retain_host_memory")


@functools.cache
def accelerator_plugins() -> tuple[str, ...]:
    """The installed GPU/TPU backends for JAX: `jax_plugins` entry points, path-based plugins in
    the `jax_plugins` namespace package, and libtpu (or TPU_LIBRARY_PATH). Scanned once."""
    found = {e.name for e in importlib.metadata.entry_points(group=PLUGIN_GROUP)}
    spec = importlib.util.find_spec(PLUGIN_GROUP)
    if spec is not None and spec.submodule_search_locations:
        found.update(m.name for m in pkgutil.iter_modules(spec.submodule_search_locations))
    if os.environ.get("TPU_LIBRARY_PATH") or importlib.util.find_spec("libtpu") is not None:
        found.add("libtpu")
    return tuple(sorted(found))


def expected(platforms: str | None = None) -> bool:
    """Whether JAX will compute on CPU, decided without importing or starting JAX: the first of
    `platforms` (JAX's `jax_platforms` setting; default: the JAX_PLATFORMS environment variable)
    is cpu, or, where none is named, no GPU/TPU plugin is installed."""
    if platforms is None:
        platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms.strip():
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not accelerator_plugins()


def jax_started() -> bool:
    """Whether JAX has already started its backends in this process: XLA has read `XLA_FLAGS`
    and JAX's threads have allocated, so settings made now come too late for them."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge  # no public API tells this without starting a backend
    except ImportError:
        return False
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started and started())


def configure(
    *,
    eigen_convolutions: bool = True,
    multi_output_fusion: bool = True,
    retain_host_memory: bool = True,
) -> list[str]:
    """Apply the CPU settings asked for (see the module docstring); returns the names of those in
    effect afterwards, in `SETTINGS` order. The XLA flags are skipped for a jaxlib older than
    `xla_flags.MIN_JAXLIB`, Eigen convolutions where `XLA_FLAGS` already choose YNNPACK's fusion
    types, host memory off Linux/glibc. Calling it again changes nothing. Warns (RuntimeWarning)
    when it changes a setting after JAX has started its backends: the change then comes too
    late to take full effect in this process."""
    before = (os.environ.get("XLA_FLAGS"), host_memory.retaining())
    applied = []
    flags_known = xla_flags.supported()
    if eigen_convolutions and flags_known and xla_flags.use_eigen_convolutions():
        applied.append("eigen_convolutions")
    if multi_output_fusion and flags_known:
        xla_flags.use_multi_output_fusion()
        applied.append("multi_output_fusion")
    if retain_host_memory and host_memory.retain_freed_memory():
        applied.append("retain_host_memory")
    changed = (os.environ.get("XLA_FLAGS"), host_memory.retaining()) != before
    if changed and jax_started():
        warnings.warn(
            f"resnet_jax.cpu.configure() ran after JAX started its backends: its settings "
            f"({', '.join(applied)}) come too late to take full effect in this process. Call it "
            "before the first JAX computation.",
            RuntimeWarning,
            stacklevel=2,
        )
    return applied
