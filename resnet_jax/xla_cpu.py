"""Run XLA:CPU's convolutions with its Eigen kernels instead of YNNPACK's.

XLA:CPU hands dots, convolutions and reductions to YNNPACK by default. For the ResNets' kxk
convolutions YNNPACK is the slower of the two: on the 2-core development machine, batch 8, a
56x56x64 3x3 convolution takes 32 ms forward and 34 ms for its input gradient with YNNPACK, 18
and 20 ms with Eigen (`benchmarks/bench_convs.py`), and Eigen's weight-gradient convolutions
are fast enough that `resnet_jax.conv.Conv` keeps them (see there); whole ResNet-50 steps in
BENCHMARKS.md: inference 860 -> 746 ms, train step 3066 -> 2852 ms. Matmuls (`conv.Conv`'s 1x1
convolutions) and reductions stay with YNNPACK, which is faster for them.

XLA reads `XLA_FLAGS` once, when JAX starts its backends, so importing `resnet_jax` adds the flag
(by default only where JAX will compute on CPU, see `backend.cpu_expected`;
RESNET_JAX_EIGEN_CONVS=1 or 0 decides) and it takes effect only if `resnet_jax` is imported
before JAX's first computation (otherwise the import warns). It applies to every convolution the
process compiles; a `--xla_cpu_experimental_ynn_fusion_type` already in `XLA_FLAGS` is left
alone. Per jit, `COMPILER_OPTIONS` does the same:
`jax.jit(f, compiler_options=xla_cpu.COMPILER_OPTIONS)`. Which kernels convolutions really get
is asked of the CPU backend (`eigen_convolutions`), not read from the flags.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.metadata
import os
import re
from collections.abc import Callable, Iterator

from resnet_jax import backend

ENV_VAR = "RESNET_JAX_EIGEN_CONVS"
FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
# XLA_FLAGS syntax: YNNPACK's default fusion types minus individual convolutions.
FLAG = f"--{FLAG_NAME}=-individual_convolution"
# As compile options: XLA's default fusion types for YNNPACK (dots, convolutions, reductions),
# and the same without convolutions (what `FLAG` does).
YNN_DEFAULT_COMPILER_OPTIONS = {
    FLAG_NAME: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,"
    "LIBRARY_FUSION_TYPE_REDUCE"
}
COMPILER_OPTIONS = {FLAG_NAME: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
# The oldest jaxlib this was checked with: XLA aborts on flags it does not know, so older
# versions are left alone.
MIN_JAXLIB = (0, 10, 2)
# Set by `assume_eigen_convolutions` to override what the CPU backend does while tracing.
_ASSUMED: contextvars.ContextVar[bool | None] = contextvars.ContextVar("eigen_convs", default=None)


def jaxlib_version() -> tuple[int, ...]:
    """The installed jaxlib's (major, minor, patch), (0,) if it cannot be read."""
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return (0,)
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def wanted() -> bool:
    """Whether importing resnet_jax should call `use_eigen_convolutions`: RESNET_JAX_EIGEN_CONVS
    (see `backend.cpu_only_switch`), and never with a jaxlib older than `MIN_JAXLIB`."""
    return backend.cpu_only_switch(ENV_VAR) and jaxlib_version() >= MIN_JAXLIB


def use_eigen_convolutions() -> bool:
    """Add `FLAG` to `XLA_FLAGS` unless it already sets YNNPACK's fusion types; returns whether
    `XLA_FLAGS` now holds `FLAG`. Has no effect on a JAX backend that has already started."""
    flags = os.environ.get("XLA_FLAGS", "")
    if f"--{FLAG_NAME}=" not in flags:
        flags = f"{flags} {FLAG}".strip()
        os.environ["XLA_FLAGS"] = flags
    return FLAG in flags.split()


def eigen_convolutions() -> bool:
    """Whether convolutions traced now will run on Eigen rather than YNNPACK: as
    `assume_eigen_convolutions` says within its block, else `cpu_backend_convolutions_on_eigen`."""
    assumed = _ASSUMED.get()
    if assumed is not None:
        return assumed
    return cpu_backend_convolutions_on_eigen()


@functools.cache
def cpu_backend_convolutions_on_eigen() -> bool:
    """Whether JAX's CPU backend compiles a 3x3 convolution without YNNPACK: what the process
    really does, whoever set `XLA_FLAGS` (this module, the user) and whether it was set before
    the backend started. Asked once per process (a ~30 ms compile); starts the CPU backend.
    False where the process has no CPU backend (e.g. JAX_PLATFORMS=cuda): nothing runs there."""
    from jax import lax

    dims = ("NHWC", "HWIO", "NHWC")
    hlo = compiled_on_cpu(
        lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims),
        (1, 8, 8, 32),
        (3, 3, 32, 32),
    )
    return hlo is not None and "ynn_fusion" not in hlo


def compiled_on_cpu(fn: Callable, *shapes: tuple[int, ...]) -> str | None:
    """The optimised HLO text of `fn` compiled by JAX's CPU backend for float32 operands of
    `shapes`, or None where the process has no CPU backend. Starts the CPU backend: for asking
    what XLA:CPU really does with the process's flags."""
    import jax
    import jax.numpy as jnp

    try:
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    except RuntimeError:
        return None
    operands = [jax.ShapeDtypeStruct(shape, jnp.float32, sharding=cpu) for shape in shapes]
    return jax.jit(fn).lower(*operands).compile().as_text()


@contextlib.contextmanager
def assume_eigen_convolutions(eigen: bool) -> Iterator[None]:
    """Within the block, `eigen_convolutions()` returns `eigen`: for tracing a function that is
    compiled with other kernels than the process default, e.g. `YNN_DEFAULT_COMPILER_OPTIONS`
    (`conv.Conv` picks its formulation when traced; jit caches that trace, so use a fresh jit)."""
    token = _ASSUMED.set(eigen)
    try:
        yield
    finally:
        _ASSUMED.reset(token)
