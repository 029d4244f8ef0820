"""XLA:CPU options that make ResNet training fast, and probes of what XLA:CPU really does.

Two options, both added to `XLA_FLAGS` by `resnet_jax.cpu.configure`:

- Eigen convolutions (`EIGEN_CONVOLUTIONS_FLAG`): XLA:CPU hands dots, convolutions and reductions
  to YNNPACK by default; for the ResNets' kxk convolutions XLA's Eigen kernels are faster (a
  56x56x64 3x3 convolution at batch 8 on 2 cores: 18 instead of 32 ms forward, 20 instead of 34 ms
  for its input gradient, `benchmarks/bench_convs.py`). Matmuls and reductions stay with YNNPACK.
  Per jit, `COMPILER_OPTIONS` does the same (`jax.jit(f, compiler_options=COMPILER_OPTIONS)`),
  and `YNN_DEFAULT_COMPILER_OPTIONS` restores XLA's default.
- Multi-output fusion (`MULTI_OUTPUT_FUSION_FLAG`): by default XLA:CPU's loop fusion copies a cheap
  elementwise producer into every consumer; along a ResNet stage each block's residual addition
  is then recomputed in the fusions of all later blocks (work growing with the square of a
  stage's depth). The backend option `xla_cpu_use_multi_output_fusion` stops the copying. It has
  no per-jit form: JAX's `compiler_options` do not reach XLA's backend options.

XLA reads `XLA_FLAGS` once, when JAX starts its backends, and aborts on flags it does not know,
so the options are only added for a jaxlib at least `MIN_JAXLIB` (`supported`). Which kernels and
fusion the process really gets is asked of the CPU backend (`eigen_convolutions`,
`multi_output_fusion`), not read from the flags: the user may have set them, or set them too late.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.metadata
import os
import re
from collections.abc import Callable, Iterator

YNN_FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
# XLA_FLAGS syntax: YNNPACK's default fusion types minus individual convolutions.
EIGEN_CONVOLUTIONS_FLAG = f"--{YNN_FLAG_NAME}=-individual_convolution"
# As compile options: XLA's default fusion types for YNNPACK (dots, convolutions, reductions),
# and the same without convolutions (what `EIGEN_CONVOLUTIONS_FLAG` does).
YNN_DEFAULT_COMPILER_OPTIONS = {
    YNN_FLAG_NAME: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,"
    "LIBRARY_FUSION_TYPE_REDUCE"
}
COMPILER_OPTIONS = {YNN_FLAG_NAME: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
MULTI_OUTPUT_FUSION_OPTION = "xla_cpu_use_multi_output_fusion"
MULTI_OUTPUT_FUSION_FLAG = f"--xla_backend_extra_options={MULTI_OUTPUT_FUSION_OPTION}"
# The oldest jaxlib these flags were checked with.
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


def supported() -> bool:
    """Whether the installed jaxlib is at least `MIN_JAXLIB`, so that its XLA knows the flags."""
    return jaxlib_version() >= MIN_JAXLIB


def use_eigen_convolutions() -> bool:
    """Add `EIGEN_CONVOLUTIONS_FLAG` to `XLA_FLAGS` unless they already set YNNPACK's fusion types;
    returns whether `XLA_FLAGS` now hold it. No effect on a JAX backend that has already started."""
    flags = os.environ.get("XLA_FLAGS", "")
    if f"--{YNN_FLAG_NAME}=" not in flags:
        flags = f"{flags} {EIGEN_CONVOLUTIONS_FLAG}".strip()
        os.environ["XLA_FLAGS"] = flags
    return EIGEN_CONVOLUTIONS_FLAG in flags.split()


def use_multi_output_fusion() -> None:
    """Add `MULTI_OUTPUT_FUSION_FLAG` to `XLA_FLAGS` unless they already name the option (XLA
    accumulates repeated `--xla_backend_extra_options`, so the user's backend options stay).
    No effect on a JAX backend that has already started."""
    flags = os.environ.get("XLA_FLAGS", "")
    if MULTI_OUTPUT_FUSION_OPTION not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {MULTI_OUTPUT_FUSION_FLAG}".strip()


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


def eigen_convolutions() -> bool:
    """Whether convolutions traced now will run on Eigen rather than YNNPACK: as
    `assume_eigen_convolutions` says within its block, else `cpu_backend_convolutions_on_eigen`."""
    assumed = _ASSUMED.get()
    if assumed is not None:
        return assumed
    return cpu_backend_convolutions_on_eigen()


@functools.cache
def cpu_backend_convolutions_on_eigen() -> bool:
    """Whether JAX's CPU backend compiles a 3x3 convolution without YNNPACK, whoever set
    `XLA_FLAGS` and whenever. Asked once per process (a ~30 ms compile); starts the CPU backend.
    False where the process has no CPU backend."""
    from jax import lax

    dims = ("NHWC", "HWIO", "NHWC")
    hlo = compiled_on_cpu(
        lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims),
        (1, 8, 8, 32),
        (3, 3, 32, 32),
    )
    return hlo is not None and "ynn_fusion" not in hlo


@contextlib.contextmanager
def assume_eigen_convolutions(eigen: bool) -> Iterator[None]:
    """Within the block, `eigen_convolutions()` returns `eigen`: for tracing a function that is
    compiled with other kernels than the process default, e.g. `YNN_DEFAULT_COMPILER_OPTIONS`
    (`resnet_jax.cpu.conv` picks its formulation when traced; jit caches that trace, so use a
    fresh jit)."""
    token = _ASSUMED.set(eigen)
    try:
        yield
    finally:
        _ASSUMED.reset(token)


def _residual_chain(x, w):
    """Four residual steps, x <- relu(x @ w + x): the pattern whose additions XLA copies."""
    import jax

    for _ in range(4):
        x = jax.nn.relu(x @ w + x)
    return x


@functools.cache
def multi_output_fusion() -> bool:
    """Whether JAX's CPU backend compiles without copying elementwise work into several fusions:
    no fusion of `_residual_chain` holds more than one of its additions (with the copies, the
    last one holds all four). Asked once per process (a small compile); starts the CPU backend.
    False where the process has no CPU backend."""
    hlo = compiled_on_cpu(_residual_chain, (64, 32), (32, 32))
    return hlo is not None and max_fused_additions(hlo) <= 1


def _fused_computations(optimized_hlo: str) -> list[str]:
    """The fused computations of an optimised HLO module's text."""
    computations = re.split(r"\n(?=\S)", optimized_hlo)
    return [c for c in computations if "fused" in c.split(" ", 1)[0]]


def max_fused_additions(optimized_hlo: str) -> int:
    """The most `add` instructions in one fused computation of an optimised HLO module's text."""
    fused = _fused_computations(optimized_hlo)
    return max((len(re.findall(r" add\(", c)) for c in fused), default=0)


def most_blocks_per_fusion(optimized_hlo: str, block_name: str = r"layer\d_\d+") -> int:
    """The most residual blocks whose operations one fused computation holds, told apart by the
    module names (`block_name`, a regex; ResNet's are layer1_0 ...) in XLA's op_name metadata.
    Without copies a fusion spans a block's end and the next block's start; with them, up to a
    whole stage."""
    block = re.compile(rf'op_name="[^"]*/({block_name})/')
    return max((len(set(block.findall(c))) for c in _fused_computations(optimized_hlo)), default=0)
