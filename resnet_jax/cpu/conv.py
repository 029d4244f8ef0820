"""Convolution formulations that make ResNet training fast on XLA:CPU (`conv2d`).

`conv2d` computes `lax.conv_general_dilated`'s result (NHWC input, HWIO kernel) in the form
XLA:CPU runs fastest, picked from the shapes when it is traced; `resnet_jax.models.Conv` calls it
when its platform is cpu (elsewhere it emits the plain convolution). 1x1 convolutions are
matmuls (so forward, input- and weight-gradients are all matmuls) and outputs of <= 64 pixels
one im2col matmul. Other kxk convolutions keep XLA's convolution; their weight gradient becomes
per-tap matmuls when XLA:CPU runs convolutions on YNNPACK (its default; `resnet_jax.cpu.configure`
moves them to Eigen), whose weight-gradient convolution is slow, on Eigen for batches of 1 or 2,
where Eigen's is, and at the few shapes where XLA:CPU's multi-output fusion would turn a
convolution into a plain loop. Grouped convolutions (ResNeXt) become one dense XLA convolution per
merged group of channels (adjacent groups merged into at least 16 input channels, block-diagonal
kernels): XLA:CPU's grouped convolution is up to 3x slower than those, and its weight gradient, a
batch-grouped convolution, 80-220x slower. Their weight gradient is then the dense convolutions'
own or, where ungrouped ones take matmuls, per-tap matmuls batched over the groups. Which kernels
and fusion XLA:CPU uses is asked of the CPU backend when a convolution is traced
(`xla_flags.eigen_convolutions`, `xla_flags.multi_output_fusion`); docs/performance.md has the
figures and the benchmarks behind each choice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax import layers
from resnet_jax.cpu import xla_flags
from resnet_jax.layers import DIMENSION_NUMBERS, Pads

# Below this many input channels one im2col matmul beats a matmul per kernel tap (the stem).
PER_TAP_MIN_CHANNELS = 16
# Outputs with at most this many pixels per image are computed as one im2col matmul.
SMALL_OUTPUT_PIXELS = 64
# Up to this batch size, Eigen's weight-gradient convolution is slower than per-tap matmuls
# (also on the dense convolutions of a grouped one, `_split_groups_conv`).
MATMUL_WEIGHT_GRAD_MAX_BATCH = 2
# Grouped convolutions merge adjacent groups into groups of at least this many input channels,
# and into at most this many groups (each one convolution: compile time grows with their number;
# 16 compiles a ResNeXt-101 train step 10-22 s faster and runs it up to 11% slower, BENCHMARKS.md
# item 19).
MERGED_GROUP_CHANNELS = 16
MAX_GROUP_CONVOLUTIONS = 32


def _lax_conv(
    x: jax.Array,
    w: jax.Array,
    strides: tuple[int, int],
    padding: Pads,
    groups: int,
) -> jax.Array:
    """XLA's own NHWC/HWIO convolution (the reference, and the form kept where it is fastest)."""
    return lax.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=DIMENSION_NUMBERS, feature_group_count=groups
    )


def _rows(a: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N*H*W, C): 2-D operands keep XLA:CPU dots free of operand transposes."""
    return a.reshape(-1, a.shape[-1])


def _matmul_conv(
    x: jax.Array,
    w: jax.Array,
    strides: tuple[int, int],
    padding: Pads,
    per_tap: bool,
    groups: int = 1,
) -> jax.Array:
    """A convolution as matmuls of the taps' input slices with the kernel.

    `per_tap`: sum over taps (i, j) of `slice2d @ w[i, j]` (no patch matrix; best with many
    channels). Otherwise one (N*Ho*Wo, kh*kw*C) x (kh*kw*C, K) im2col matmul (best with few
    channels, e.g. the 3-channel stem). Either way autodiff turns the weight gradient into
    matmuls of the same slices with dy: `slice2d.T @ dy2d`, a dot XLA:CPU reads in place.
    Grouped: per tap, one matmul batched over the groups.
    """
    kh, kw, cin_per_group, k = w.shape
    taps = layers.window_taps(layers.pad_spatial(x, padding), (kh, kw), strides)
    if groups > 1:
        w = w.reshape(kh, kw, cin_per_group, groups, k // groups)
        y = functools.reduce(
            jnp.add,
            (
                jnp.einsum("pgc,cgo->pgo", t.reshape(-1, groups, cin_per_group), w[i // kw, i % kw])
                for i, t in enumerate(taps)
            ),
        ).reshape(-1, k)
    elif per_tap:
        y = functools.reduce(jnp.add, (_rows(t) @ w[i // kw, i % kw] for i, t in enumerate(taps)))
    else:
        y = _rows(jnp.concatenate(taps, axis=3)) @ w.reshape(-1, k)
    return y.reshape(*taps[0].shape[:3], k)


def _output_shift_conv(x: jax.Array, w: jax.Array, padding: Pads, groups: int = 1) -> jax.Array:
    """A stride-1 convolution as, per tap (i, j), the full-size product `x2d @ w[i, j]`, padded
    like the input and cropped at the tap's offset, summed over the taps.

    The same arithmetic as `_matmul_conv`'s per-tap form, but the shifts are on the output side,
    so autodiff's weight gradient is `x2d.T @ shifted_dy2d`: `x` is read in place and only `dy`
    is shifted. Nothing in it is computed from `x` alone, which XLA:CPU's scheduler would run
    early in the forward pass and keep until the backward pass (kh*kw input-sized copies per
    convolution). Grouped: per tap, one matmul batched over the groups.
    """
    kh, kw, cin_per_group, k = w.shape
    n, h, width, _ = x.shape
    (top, bottom), (left, right) = padding
    ho, wo = h + top + bottom - kh + 1, width + left + right - kw + 1
    if groups > 1:
        x_rows = x.reshape(-1, groups, cin_per_group)
        w = w.reshape(kh, kw, cin_per_group, groups, k // groups)
        product = functools.partial(jnp.einsum, "pgc,cgo->pgo", x_rows)
    else:
        product = functools.partial(jnp.matmul, _rows(x))
    shifted = []
    for i in range(kh):
        for j in range(kw):
            z = layers.pad_spatial(product(w[i, j]).reshape(n, h, width, k), padding)
            shifted.append(lax.slice(z, (0, i, j, 0), (n, i + ho, j + wo, k)))
    return functools.reduce(jnp.add, shifted)


def _merge_factor(cin_per_group: int, groups: int) -> int:
    """How many adjacent groups `_block_diagonal_kernels` merges into one: the fewest (a divisor of
    `groups`) that give at least `MERGED_GROUP_CHANNELS` input channels per merged group and at
    most `MAX_GROUP_CONVOLUTIONS` merged groups."""
    return min(
        f
        for f in range(1, groups + 1)
        if groups % f == 0
        and (f * cin_per_group >= MERGED_GROUP_CHANNELS or f == groups)
        and groups // f <= MAX_GROUP_CONVOLUTIONS
    )


def _block_diagonal_kernels(w: jax.Array, groups: int) -> jax.Array:
    """A grouped HWIO kernel as one dense kernel per `_merge_factor` adjacent groups, each
    block-diagonal: (merged groups, kh, kw, input channels, output channels) of a merged group."""
    kh, kw, cin_per_group, k = w.shape
    merge = _merge_factor(cin_per_group, groups)
    merged = groups // merge
    # (merged, kh, kw, merge, cin_per_group, k // groups): the blocks of each merged group
    blocks = w.reshape(kh, kw, cin_per_group, merged, merge, k // groups).transpose(
        3, 0, 1, 4, 2, 5
    )
    # Block g to row g * (merge + 1) of merge * merge zero rows: (input group g, output group g).
    # A pad, not a product with the identity, so that autodiff's transpose is a strided slice
    # (a multiply-and-reduce there crashed XLA:CPU when only the weight gradient was computed).
    spread = lax.pad(
        blocks, jnp.zeros((), w.dtype), [(0, 0, 0)] * 3 + [(0, 0, merge)] + [(0, 0, 0)] * 2
    )
    kernels = spread.reshape(merged, kh, kw, merge, merge, cin_per_group, k // groups)
    return kernels.transpose(0, 1, 2, 3, 5, 4, 6).reshape(merged, kh, kw, -1, k // merged)


def _split_groups_conv(
    x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Pads, groups: int
) -> jax.Array:
    """A grouped convolution as one dense XLA convolution per merged group of channels
    (`_block_diagonal_kernels`), outputs concatenated.

    XLA:CPU's grouped convolution (`feature_group_count`) is slower than separate convolutions
    over the same channels, and slower still with few channels per group; its weight gradient is
    a batch-grouped convolution, 80-220x slower, where each dense convolution's is Eigen's fast
    one (`benchmarks/bench_convs.py --grouped`, `--merge-sweep`).
    """
    kernels = _block_diagonal_kernels(w, groups)
    outputs = [
        _lax_conv(part, kernel, strides, padding, 1)
        for part, kernel in zip(jnp.split(x, len(kernels), axis=3), kernels, strict=True)
    ]
    return jnp.concatenate(outputs, axis=3)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _conv_matmul_weight_grad(
    x: jax.Array,
    w: jax.Array,
    strides: tuple[int, int],
    padding: Pads,
    groups: int,
    forward: Callable = _lax_conv,
) -> jax.Array:
    """`forward` (XLA's convolution, or `_split_groups_conv`); differentiated so that its weight
    gradient is made of matmuls.

    The tangent is `forward(dx, w)` (whose transpose is the input-gradient convolution) plus a
    matmul convolution of `x` with `dw` (whose transpose is the matmul weight gradient): for
    stride 1 `_output_shift_conv` (the backward pass shifts `dy`, not `x`), otherwise
    `_matmul_conv`, checkpointed so that the backward pass re-slices `x` instead of the forward
    pass storing kh*kw slices.
    A custom JVP, not a custom VJP, keeps forward-mode and higher-order differentiation working.
    """
    return forward(x, w, strides, padding, groups)


@_conv_matmul_weight_grad.defjvp
def _conv_jvp(strides, padding, groups, forward, primals, tangents):
    x, w = primals
    x_dot, w_dot = tangents
    per_tap = x.shape[-1] >= PER_TAP_MIN_CHANNELS
    if strides == (1, 1) and (per_tap or groups > 1):
        w_term = functools.partial(_output_shift_conv, padding=padding, groups=groups)
    else:
        w_term = jax.checkpoint(
            lambda x, w_dot: _matmul_conv(x, w_dot, strides, padding, per_tap, groups)
        )
    y = forward(x, w, strides, padding, groups)
    return y, forward(x_dot, w, strides, padding, groups) + w_term(x, w_dot)


def _matmul_conv1x1(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Pads):
    """A 1x1 convolution as one matmul of the (padded, subsampled) input; autodiff: matmuls."""
    return _matmul_conv(x, w, strides, padding, per_tap=True)


def _im2col_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Pads):
    """A kxk convolution as one im2col matmul, for small outputs only.

    XLA:CPU's own forward and input-gradient convolutions are very slow at tiny outputs (~50x at
    2x2); the patch matrix is kh*kw times the input, and autodiff gives a matmul weight gradient
    and a pad-and-add input gradient.
    """
    return _matmul_conv(x, w, strides, padding, per_tap=False)


def _weight_grad_copies_collide(x_shape: Sequence[int], y_shape: Sequence[int]) -> bool:
    """Whether XLA's own weight gradient of a convolution with these input and output shapes
    risks a convolution emitted as a plain loop.

    XLA:CPU's weight-gradient convolution reads layout copies of `x`, (C, H, W, N), and of `dy`,
    (Ho, Wo, N, K). Multi-output fusion (`xla_flags.MULTI_OUTPUT_FUSION_FLAG`) fuses siblings of
    equal shape that read the same operand, and counts a convolution as fusible: the forward
    convolution with the copy of `x` when the two shapes are equal, the input-gradient
    convolution (N, H, W, C) with the copy of `dy`. A convolution inside a fusion is emitted as
    a plain loop, 10x slower or worse (resnet18 at batch 16, 64 px: its 16x16x64 convolutions).
    """
    n, h, w, c = x_shape
    _, ho, wo, k = y_shape
    return (c, h, w, n) == (n, ho, wo, k) or (ho, wo, n, k) == (n, h, w, c)


def _cpu_formulation(
    x_shape: Sequence[int], w_shape: Sequence[int], strides, padding, groups: int
) -> Callable | None:
    """The CPU-specific implementation for this convolution, or None to keep XLA's."""
    (kh, kw), (sh, sw) = w_shape[:2], strides
    ho = (x_shape[1] + sum(padding[0]) - kh) // sh + 1
    wo = (x_shape[2] + sum(padding[1]) - kw) // sw + 1
    if groups == 1 and (kh, kw) == (1, 1):
        return _matmul_conv1x1
    if groups == 1 and ho * wo <= SMALL_OUTPUT_PIXELS:
        return _im2col_conv
    # Eigen's own weight gradient (of each merged group's convolution if grouped) beats the
    # per-tap matmuls above these batches, unless XLA's multi-output fusion could turn a
    # convolution into a loop
    merged = groups // _merge_factor(w_shape[2], groups)
    own_weight_grad = (
        xla_flags.eigen_convolutions()
        and x_shape[0] > MATMUL_WEIGHT_GRAD_MAX_BATCH
        and not (
            xla_flags.multi_output_fusion()
            and _weight_grad_copies_collide(
                (*x_shape[:3], x_shape[3] // merged), (x_shape[0], ho, wo, w_shape[3] // merged)
            )
        )
    )
    if groups != 1:
        # Grouped (ResNeXt): never XLA's grouped convolution; its weight gradient, a
        # batch-grouped convolution, is 80-220x slower than per-tap matmuls.
        if own_weight_grad:
            return functools.partial(_split_groups_conv, groups=groups)
        return functools.partial(
            _conv_matmul_weight_grad, groups=groups, forward=_split_groups_conv
        )
    if own_weight_grad:
        return None
    return functools.partial(_conv_matmul_weight_grad, groups=1)


def conv2d(
    x: jax.Array,
    w: jax.Array,
    strides: Sequence[int] = (1, 1),
    padding: Sequence[Sequence[int]] = ((0, 0), (0, 0)),
    groups: int = 1,
) -> jax.Array:
    """NHWC x HWIO convolution equal to `lax.conv_general_dilated`, in XLA:CPU's fastest form.

    Grouped -> one XLA convolution per merged group of channels (block-diagonal kernels);
    1x1 -> matmul; small outputs -> im2col matmul; otherwise XLA's convolution, with a matmul
    weight gradient if XLA:CPU's convolutions are on YNNPACK or the batch is tiny. The form is
    chosen in Python when traced, for whatever backend the program is compiled for: use it for
    XLA:CPU programs (GPU/TPU run XLA's plain convolution faster).
    """
    strides = tuple(strides)
    padding = tuple(tuple(p) for p in padding)
    fast = _cpu_formulation(x.shape, w.shape, strides, padding, groups)
    if fast is None:
        return _lax_conv(x, w, strides, padding, groups)
    return fast(x, w, strides, padding)
