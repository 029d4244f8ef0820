"""The models' layers below the module level: convolution, max pooling, training-mode BatchNorm
and ReLU.

`Conv` decides in Python, from the platform the model is compiled for, between XLA:CPU's fastest
formulations (`resnet_jax.cpu.conv`) and XLA's plain convolution (GPU/TPU), so an accelerator
program holds no CPU code. Max pooling, BatchNorm and ReLU have hand-written JVPs that XLA runs
fast.

Autodiff of `nn.max_pool` goes through XLA's select-and-scatter (about 200 ms for the ResNet-50
stem at batch 8 on two cores) and autodiff of a two-pass BatchNorm materialises `x - mean` and
re-reads it several times. These functions compute the same values with torch's semantics, but
their tangents are a few fused elementwise passes and reductions. They are `custom_jvp` (not
`custom_vjp`), so forward mode, reverse mode and Hessian-vector products all keep working.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
Pads = tuple[tuple[int, int], ...]
Padding = str | int | Sequence[int | tuple[int, int]]
# The models' layouts: NHWC activations, HWIO kernels (flax's and `Conv`'s).
DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def pad_spatial(x: jax.Array, padding: Pads, value: float = 0.0) -> jax.Array:
    """Pad the spatial dims of an NHWC array by `((top, bottom), (left, right))` with `value`."""
    if not any(p for pair in padding for p in pair):
        return x
    fill = jnp.asarray(value, x.dtype)
    return lax.pad(x, fill, ((0, 0, 0), *((lo, hi, 0) for lo, hi in padding), (0, 0, 0)))


def window_taps(
    xp: jax.Array, kernel_size: tuple[int, int], strides: tuple[int, int]
) -> list[jax.Array]:
    """What each kernel tap (i, j), row-major, sees of the padded NHWC input `xp`:
    `xp[:, i::sh, j::sw]` cropped to the output size, each (N, Ho, Wo, C)."""
    (kh, kw), (sh, sw) = kernel_size, strides
    n, hp, wp, c = xp.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    return [
        lax.slice(
            xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1)
        )
        for i in range(kh)
        for j in range(kw)
    ]


def _pool_taps(x: jax.Array, kernel: int, stride: int, padding: int, fill: float):
    """`window_taps` of a square pooling window over `x` padded with `fill`."""
    xp = pad_spatial(x, ((padding, padding), (padding, padding)), fill)
    return window_taps(xp, (kernel, kernel), (stride, stride))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, kernel: int, stride: int, padding: int) -> jax.Array:
    """torch's `max_pool2d(x, kernel, stride, padding)` on NHWC input (padding never wins).

    The gradient flows to the first maximum of each window in row-major order, as in torch.
    """
    taps = _pool_taps(x, kernel, stride, padding, -jnp.inf)
    return functools.reduce(jnp.maximum, taps)


@max_pool.defjvp
def _max_pool_jvp(kernel, stride, padding, primals, tangents):
    (x,), (x_dot,) = primals, tangents
    taps = _pool_taps(x, kernel, stride, padding, -jnp.inf)
    y = functools.reduce(jnp.maximum, taps)
    # Index of the first tap holding the maximum: ties (e.g. zeros after a ReLU) go to the
    # earliest position, as torch routes its gradient.
    first = jnp.full(y.shape, len(taps), jnp.int8)
    for t in reversed(range(len(taps))):
        first = jnp.where(taps[t] == y, jnp.int8(t), first)
    tangent_taps = _pool_taps(x_dot, kernel, stride, padding, 0.0)
    zero = jnp.zeros((), x_dot.dtype)
    y_dot = functools.reduce(
        jnp.add, (jnp.where(first == t, tap, zero) for t, tap in enumerate(tangent_taps))
    )
    return y, y_dot


@jax.custom_jvp
def relu(x: jax.Array) -> jax.Array:
    """`jax.nn.relu` whose derivative, as torch's, reads the output: the tangent where the output
    is not 0, else 0 (a NaN input passes its tangent, as in torch; `jax.nn.relu` gives 0).

    The backward pass then keeps only the output, which the next layer keeps anyway, and XLA can
    free the pre-activation (a BatchNorm output or residual sum) after the forward pass: a fifth
    less memory for a ResNet-50 train step (BENCHMARKS.md, item 15). (`output > 0` would not
    do: XLA rewrites `max(x, 0) > 0` as `x > 0`, back to the input.)
    """
    with jax.named_scope("relu"):
        return jnp.maximum(x, 0)


@relu.defjvp
def _relu_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    y = relu(x)
    with jax.named_scope("relu"):
        return y, jnp.where(y != 0, x_dot, jnp.zeros_like(x_dot))


def _channel_sum(x: jax.Array) -> jax.Array:
    """Sum over every axis but the last (features)."""
    return x.sum(tuple(range(x.ndim - 1)))


def batch_count(x: jax.Array, axis_name: str | None) -> int:
    """Values per feature that BatchNorm statistics average over (all replicas included).

    A Python int: every replica holds the same static shape, so the count needs no collective.
    """
    count = x.size // x.shape[-1]
    return count if axis_name is None else count * lax.axis_size(axis_name)


def _batch_moments(x: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array, int]:
    """`(mean, biased variance, count)` per feature, over all replicas of `axis_name` if given.

    Each replica computes its own mean and sum of squared deviations M2 in two passes (no
    cancellation); with `axis_name` one `all_gather` of the stacked `[mean, M2]` brings every
    replica's pair and Chan et al.'s parallel formula combines them exactly (equal counts):
    mean = mean of the means, M2 = sum of the M2s + n_local * sum (mean_i - mean)^2.
    """
    n_local = x.size // x.shape[-1]
    mean = _channel_sum(x) / n_local
    centred = x - mean
    m2 = _channel_sum(centred * centred)
    if axis_name is None:
        return mean, m2 / n_local, n_local
    # "invarying": the result is the same on every replica, so what is computed from it may be a
    # replicated (P()) output of shard_map, like the running statistics.
    gathered = lax.all_gather(jnp.stack([mean, m2]), axis_name, to="invarying")
    means, m2s = gathered[:, 0], gathered[:, 1]
    mean = means.mean(0)
    m2 = m2s.sum(0) + n_local * jnp.square(means - mean).sum(0)
    n = n_local * gathered.shape[0]
    return mean, m2 / n, n


def _batch_norm_primal(x, scale, bias, epsilon, axis_name):
    mean, var, n = _batch_moments(x, axis_name)
    rstd = lax.rsqrt(var + epsilon)
    return (x - mean) * (scale * rstd) + bias, mean, var, rstd, n


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def batch_norm_train(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, axis_name: str | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode BatchNorm over all but the last axis: `(y, batch mean, biased variance)`.

    With `axis_name`, the statistics are those of the global batch across replicas
    (synchronised BatchNorm) at one collective per pass: one `all_gather` of each replica's
    `[mean, M2]` forward (`_batch_moments`) and one `psum` of two stacked channel sums in the
    tangent, so one all-reduce in the backward pass. Compute in float32 or wider; the caller
    casts.
    """
    y, mean, var, *_ = _batch_norm_primal(x, scale, bias, epsilon, axis_name)
    return y, mean, var


@batch_norm_train.defjvp
def _batch_norm_jvp(epsilon, axis_name, primals, tangents):
    x, scale, bias = primals
    y, mean, var, rstd, n = _batch_norm_primal(x, scale, bias, epsilon, axis_name)
    # Checkpointed: the backward pass recomputes `x - mean` inside its fused loops from the saved
    # `x` and `mean` instead of the forward pass writing it out as a whole extra tensor.
    tangent = jax.checkpoint(functools.partial(_batch_norm_tangent, axis_name=axis_name, n=n))
    return (y, mean, var), tangent(x, mean, scale, rstd, *tangents)


def _batch_norm_tangent(x, mean, scale, rstd, x_dot, scale_dot, bias_dot, *, axis_name, n):
    """The tangents of `(y, mean, var)`; linear in `x_dot`, `scale_dot`, `bias_dot`.

    The two channel sums are stacked into one `psum`. The replicated sums are made
    device-varying once, as a whole, before `y_dot` uses them: the transpose of that one cast is
    the backward pass's single all-reduce (a cast per sum would be one all-reduce each).
    """
    centred = x - mean
    sums = jnp.stack([_channel_sum(x_dot), _channel_sum(centred * x_dot)]) / n
    if axis_name is not None:
        sums = lax.psum(sums, axis_name)
    mean_dot, var_dot = sums[0], 2 * sums[1]  # sum(centred) == 0
    if axis_name is not None:
        local = lax.pcast(sums, axis_name, to="varying")
        local_mean_dot, local_var_dot = local[0], 2 * local[1]
    else:
        local_mean_dot, local_var_dot = mean_dot, var_dot
    a = scale * rstd
    a_dot = scale_dot * rstd - 0.5 * a * rstd * rstd * local_var_dot
    y_dot = (x_dot - local_mean_dot) * a + centred * a_dot + bias_dot
    return y_dot, mean_dot, var_dot


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """Broadcast an int to a pair; reject anything that is not one or two positive ints."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"Conv: {name} must be a positive int or a pair of them, got {value!r}")
    return pair


def _padding(
    padding: Padding, spatial: Sequence[int], kernel_size: tuple[int, int], strides: tuple[int, int]
) -> tuple[tuple[int, int], ...]:
    """Explicit ((lo, hi), (lo, hi)) padding from 'SAME', 'VALID', an int or explicit pairs."""
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID"):
            raise ValueError(
                f"Conv: padding must be 'SAME', 'VALID', an int or pairs, got {padding!r}"
            )
        return tuple(lax.padtype_to_pads(spatial, kernel_size, strides, padding))
    if isinstance(padding, int):
        return ((padding, padding),) * 2
    pairs = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    if len(pairs) != 2 or any(len(p) != 2 for p in pairs):
        raise ValueError(f"Conv: padding must be ((lo, hi), (lo, hi)) for 2-D, got {padding!r}")
    return pairs


class Conv(nn.Module):
    """2-D convolution with `nn.Conv`'s parameters (`kernel` HWIO, optional `bias`) and result.

    Supports the subset of `nn.Conv` used by the ResNets: NHWC input, `strides`, `padding`
    ('SAME', 'VALID', an int or explicit `((lo, hi), (lo, hi))`), `feature_group_count`,
    `use_bias`, `dtype`, `param_dtype`, `kernel_init`, `bias_init`. `platform` is the backend the
    program is compiled for (None: `jax.default_backend()` when traced): for "cpu" the
    convolution takes XLA:CPU's fastest form (`resnet_jax.cpu.conv.conv2d`, same values and
    gradients), for any other platform it is XLA's plain convolution.
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Padding = "SAME"
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    platform: str | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Convolve an NHWC batch; returns NHWC with `features` channels."""
        if inputs.ndim != 4:
            raise ValueError(f"Conv: expected an NHWC input (4 dims), got shape {inputs.shape}")
        kernel_size = _pair(self.kernel_size, "kernel_size")
        strides = _pair(self.strides, "strides")
        groups = self.feature_group_count
        in_features = inputs.shape[-1]
        if in_features % groups or self.features % groups:
            raise ValueError(
                f"Conv: input channels ({in_features}) and features ({self.features}) must be "
                f"divisible by feature_group_count ({groups})"
            )
        padding = _padding(self.padding, inputs.shape[1:3], kernel_size, strides)
        kernel_shape = (*kernel_size, in_features // groups, self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        if (self.platform or jax.default_backend()).lower() == "cpu":
            from resnet_jax.cpu import conv as cpu_conv

            y = cpu_conv.conv2d(inputs, kernel, strides, padding, groups)
        else:
            y = lax.conv_general_dilated(
                inputs,
                kernel,
                strides,
                padding,
                dimension_numbers=DIMENSION_NUMBERS,
                feature_group_count=groups,
            )
        return y if bias is None else y + bias
