"""Max pooling, training-mode BatchNorm and ReLU with hand-written JVPs that XLA:CPU runs fast.

Autodiff of `nn.max_pool` goes through XLA's select-and-scatter (about 200 ms for the ResNet-50
stem at batch 8 on two cores) and autodiff of a two-pass BatchNorm materialises `x - mean` and
re-reads it several times. These functions compute the same values with torch's semantics, but
their tangents are a few fused elementwise passes and reductions. They are `custom_jvp` (not
`custom_vjp`), so forward mode, reverse mode and Hessian-vector products all keep working.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

Pads = tuple[tuple[int, int], ...]


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


def _channel_sum(x: jax.Array, axis_name: str | None) -> jax.Array:
    """Sum over every axis but the last (features), and over `axis_name` replicas if given."""
    total = x.sum(tuple(range(x.ndim - 1)))
    return total if axis_name is None else lax.psum(total, axis_name)


def batch_count(x: jax.Array, axis_name: str | None) -> int | jax.Array:
    """Values per feature that BatchNorm statistics average over (all replicas included)."""
    count = x.size // x.shape[-1]
    return count if axis_name is None else count * lax.psum(1, axis_name)


def _batch_norm_primal(x, scale, bias, epsilon, axis_name):
    n = batch_count(x, axis_name)
    mean = _channel_sum(x, axis_name) / n
    centred = x - mean
    var = _channel_sum(centred * centred, axis_name) / n  # two-pass: no cancellation
    rstd = lax.rsqrt(var + epsilon)
    return centred * (scale * rstd) + bias, mean, var, rstd, n


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def batch_norm_train(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, axis_name: str | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode BatchNorm over all but the last axis: `(y, batch mean, biased variance)`.

    With `axis_name`, the statistics are those of the global batch across replicas
    (synchronised BatchNorm). Compute in float32 or wider; the caller casts.
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
    """The tangents of `(y, mean, var)`; linear in `x_dot`, `scale_dot`, `bias_dot`."""
    centred = x - mean
    mean_dot = _channel_sum(x_dot, axis_name) / n
    var_dot = 2 * _channel_sum(centred * x_dot, axis_name) / n  # sum(centred) == 0
    a = scale * rstd
    a_dot = scale_dot * rstd - 0.5 * a * rstd * rstd * var_dot
    y_dot = (x_dot - mean_dot) * a + centred * a_dot + bias_dot
    return y_dot, mean_dot, var_dot
