"""Which JAX backend this process will compute on, decided without importing JAX or starting it.

The CPU tunings applied when `resnet_jax` is imported (`host_memory`, `xla_cpu`, `cpu_fusion`) and
the choice of cross-process collectives (`distributed`) must be made before JAX starts a backend,
so they cannot ask JAX; they all ask here.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys

PLUGIN_GROUP = "jax_plugins"  # entry-point group and namespace package of JAX's PJRT plugins


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


def cpu_expected(platforms: str | None = None) -> bool:
    """Whether JAX will compute on CPU: the first of `platforms` (JAX's `jax_platforms` setting;
    default: the JAX_PLATFORMS environment variable) is cpu, or, where none is named, no GPU/TPU
    plugin is installed."""
    if platforms is None:
        platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms.strip():
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not accelerator_plugins()


def cpu_only_switch(env_var: str) -> bool:
    """A CPU-tuning switch: `env_var` = 1/true/yes/on or 0/false/no/off decides; unset (or
    empty), on only where JAX will compute on CPU (`cpu_expected`)."""
    value = os.environ.get(env_var, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    if value:
        raise ValueError(f"{env_var}={os.environ[env_var]!r}: expected 1 or 0 (or unset)")
    return cpu_expected()


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
