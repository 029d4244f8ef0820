"""Make XLA:CPU fuse elementwise work without copying it into several consumers.

By default XLA:CPU's loop fusion copies a cheap elementwise producer into every consumer that can
take it. Along a ResNet stage this compounds: a block's output, relu(bn3(conv3) + x), feeds the
next block's first convolution and its residual addition; both fusions take a copy, each copy
reaches back through that block's addition to its input, the previous block's output, and so on.
The k-th block of a stage then recomputes the additions of all blocks before it, in the forward
pass and again in the backward pass: work and memory traffic grow with the square of a stage's
depth. In resnet152's layer3 (36 blocks) one fusion held 36 additions, and on the 2-core
development machine its train step took 1.40x torch's time (0.98x without the copies), its
inference 1.19x (0.77x); resnet50's stages have at most 6 blocks: inference 0.85x -> 0.76x, the
train step unchanged within the noise (BENCHMARKS.md, "Where the time goes", item 12). XLA:CPU's
backend option `xla_cpu_use_multi_output_fusion` turns the copying off (and fuses sibling loops
into multi-output fusions instead).

As with `xla_cpu`, importing `resnet_jax` adds the option to `XLA_FLAGS` (by default only where JAX
will compute on CPU, see `backend.cpu_expected`; RESNET_JAX_MULTI_OUTPUT_FUSION=1 or 0 decides),
and it takes effect only if `resnet_jax` is imported before JAX's first computation. It applies to
every program the process compiles on CPU; it cannot be set per jit (JAX's `compiler_options` do
not reach XLA's backend options). XLA accumulates repeated `--xla_backend_extra_options`, so
backend options the user set stay; an `xla_cpu_use_multi_output_fusion` already named in
`XLA_FLAGS` is left alone. `in_effect` asks the CPU backend what it really does.
"""

from __future__ import annotations

import functools
import os
import re

from resnet_jax import backend, xla_cpu

ENV_VAR = "RESNET_JAX_MULTI_OUTPUT_FUSION"
OPTION = "xla_cpu_use_multi_output_fusion"
FLAG = f"--xla_backend_extra_options={OPTION}"


def wanted() -> bool:
    """Whether importing resnet_jax should call `use_multi_output_fusion`: RESNET_JAX_MULTI_OUTPUT_
    FUSION (see `backend.cpu_only_switch`), and never with a jaxlib older than the one checked
    (`xla_cpu.MIN_JAXLIB`)."""
    return backend.cpu_only_switch(ENV_VAR) and xla_cpu.jaxlib_version() >= xla_cpu.MIN_JAXLIB


def use_multi_output_fusion() -> None:
    """Add `FLAG` to `XLA_FLAGS` unless they already name `OPTION`. Has no effect on a JAX backend
    that has already started."""
    flags = os.environ.get("XLA_FLAGS", "")
    if OPTION not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()


def _residual_chain(x, w):
    """Four residual steps, x <- relu(x @ w + x): the pattern whose additions XLA copies."""
    import jax

    for _ in range(4):
        x = jax.nn.relu(x @ w + x)
    return x


@functools.cache
def in_effect() -> bool:
    """Whether JAX's CPU backend compiles without copying elementwise work into several fusions:
    no fusion of `_residual_chain` holds more than one of its additions (with the copies, the
    last one holds all four). Asked once per process (a small compile); starts the CPU backend.
    False where the process has no CPU backend."""
    hlo = xla_cpu.compiled_on_cpu(_residual_chain, (64, 32), (32, 32))
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
