"""`resnet_jax.layers`: max pooling, training BatchNorm and ReLU equal torch / plain autodiff, every
mode."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import CHECKED_JAXLIB
from jax.sharding import Mesh, PartitionSpec

from resnet_jax import layers

POOLS = [(3, 2, 1, 17), (3, 2, 1, 16), (2, 2, 0, 9), (3, 1, 1, 7), (3, 3, 0, 10)]
POOL_IDS = [f"k{k}s{s}p{p}h{h}" for k, s, p, h in POOLS]


def _torch_pool_and_grad(x: np.ndarray, g: np.ndarray, kernel: int, stride: int, padding: int):
    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    y = torch.nn.functional.max_pool2d(xt, kernel, stride, padding)
    y.backward(torch.tensor(g.transpose(0, 3, 1, 2)))
    return y.detach().numpy().transpose(0, 2, 3, 1), xt.grad.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize(("kernel", "stride", "padding", "size"), POOLS, ids=POOL_IDS)
def test_max_pool_matches_torch_including_ties(kernel, stride, padding, size):
    """Small integers make most windows tie; the gradient must go where torch sends it."""
    rng = np.random.default_rng(size)
    x = rng.integers(-2, 3, (2, size, size + 1, 3)).astype(np.float32)
    ho, wo = ((n + 2 * padding - kernel) // stride + 1 for n in (size, size + 1))
    g = rng.standard_normal((2, ho, wo, 3)).astype(np.float32)
    y, vjp = jax.vjp(lambda x: layers.max_pool(x, kernel, stride, padding), jnp.asarray(x))
    y_torch, dx_torch = _torch_pool_and_grad(x, g, kernel, stride, padding)
    np.testing.assert_array_equal(np.asarray(y), y_torch)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), dx_torch, rtol=0, atol=1e-6)


def _assert_every_mode_matches(ours, ref, shape) -> None:
    """Forward mode, reverse mode and Hessian-vector products of `ours` equal `ref`'s."""
    x = jax.random.normal(jax.random.key(0), shape)
    t = jax.random.normal(jax.random.key(1), shape)
    for mode in (
        lambda f: jax.jvp(f, (x,), (t,)),
        lambda f: jax.grad(lambda x: jnp.sum(jnp.sin(f(x))))(x),
        lambda f: jax.jvp(jax.grad(lambda x: jnp.sum(jnp.sin(f(x)))), (x,), (t,)),
    ):
        for a, b in zip(jax.tree.leaves(mode(ours)), jax.tree.leaves(mode(ref)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_max_pool_forward_mode_and_hvp_match_nn_max_pool():
    """Without ties the result is unique, so every differentiation mode equals flax's."""
    _assert_every_mode_matches(
        lambda x: layers.max_pool(x, 3, 2, 1),
        lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))),
        (2, 11, 11, 4),
    )


def test_relu_values_and_gradient_match_torch_including_zeros_and_nan():
    x = np.array([-2.0, -0.0, 0.0, 1.5, np.nan, np.inf, -np.inf], np.float32)
    g = np.arange(1, x.size + 1, dtype=np.float32)
    xt = torch.tensor(x, requires_grad=True)
    torch.relu(xt).backward(torch.tensor(g))
    y, vjp = jax.vjp(layers.relu, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jax.nn.relu(x)))
    np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0]), xt.grad.numpy())


def test_relu_forward_mode_and_hvp_match_jax_nn_relu():
    _assert_every_mode_matches(layers.relu, jax.nn.relu, (3, 7))


def test_relu_backward_keeps_the_output_not_the_pre_activation():
    """In a layer -> scale/shift -> relu -> layer chain, the backward pass needs the relu output
    for the second layer's weight gradient anyway; with `layers.relu` nothing else of that size is
    kept, with `jax.nn.relu` the pre-activation is too (the XLA of the jaxlibs checked; older ones
    keep the same for both)."""
    x = jnp.ones((512, 256))
    w = jnp.full((256, 256), 0.01)

    def temporaries(relu) -> int:
        def loss(w1, w2):
            return jnp.sum(jnp.square(relu(x @ w1 * 0.5 + 1.0) @ w2))

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(w, w).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    saved = x.size * x.dtype.itemsize if CHECKED_JAXLIB else 0
    assert temporaries(layers.relu) <= temporaries(jax.nn.relu) - saved


def _reference_batch_norm(x, scale, bias, epsilon=1e-5):
    """The textbook two-pass formula, differentiated by plain autodiff."""
    mean = x.mean((0, 1, 2))
    var = jnp.square(x - mean).mean((0, 1, 2))
    return (x - mean) * (scale * jax.lax.rsqrt(var + epsilon)) + bias, mean, var


def _bn_inputs(dtype, shape=(4, 5, 3, 6)):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 2, dtype)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, shape[-1]), dtype)
    bias = jnp.asarray(rng.standard_normal(shape[-1]), dtype)
    return x, scale, bias


def test_batch_norm_train_equals_autodiff_of_two_pass_formula_float64():
    """Values, VJP (cotangents on y, mean and var) and JVP agree to float64 round-off."""
    with jax.enable_x64(True):
        args = _bn_inputs(jnp.float64)
        cts = jax.tree.map(lambda a: jnp.cos(a * 7.0), _reference_batch_norm(*args))
        tangents = jax.tree.map(lambda a: jnp.sin(a * 5.0), args)

        def ours(*a):
            return layers.batch_norm_train(*a, 1e-5, None)

        out, vjp = jax.vjp(ours, *args)
        ref_out, ref_vjp = jax.vjp(_reference_batch_norm, *args)
        pairs = [
            (out, ref_out),
            (vjp(cts), ref_vjp(cts)),
            (jax.jvp(ours, args, tangents), jax.jvp(_reference_batch_norm, args, tangents)),
        ]
        for a, b in pairs:
            for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
                np.testing.assert_allclose(u, v, rtol=1e-11, atol=1e-11)


def test_batch_norm_train_synchronised_over_replicas_equals_global_batch():
    """Under shard_map on 4 devices the statistics and all gradients are the global batch's
    (shard_map sums the cotangents of the replicated scale and bias)."""
    devices = np.array(jax.devices()[:4])
    assert devices.size == 4, "conftest sets 4 host devices"
    mesh = Mesh(devices, ("batch",))
    x, scale, bias = _bn_inputs(jnp.float32, shape=(8, 5, 3, 6))
    ct = jnp.cos(x * 3.0)

    def loss(x, scale, bias, axis_name):
        y, _, _ = layers.batch_norm_train(x, scale, bias, 1e-5, axis_name)
        return jnp.sum(y * ct_local(axis_name))

    def ct_local(axis_name):
        if axis_name is None:
            return ct
        i = jax.lax.axis_index(axis_name)
        return jax.lax.dynamic_slice_in_dim(ct, i * 2, 2)

    def per_replica(x, scale, bias):
        y, mean, var = layers.batch_norm_train(x, scale, bias, 1e-5, "batch")
        dx, dscale, dbias = jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias, "batch")
        return y, mean, var, dx, dscale, dbias

    sharded = jax.jit(
        jax.shard_map(
            per_replica,
            mesh=mesh,
            in_specs=(PartitionSpec("batch"), PartitionSpec(), PartitionSpec()),
            out_specs=(PartitionSpec("batch"), PartitionSpec(), PartitionSpec())
            + (PartitionSpec("batch"), PartitionSpec(), PartitionSpec()),
        )
    )(x, scale, bias)
    y, mean, var = layers.batch_norm_train(x, scale, bias, 1e-5, None)
    grads = jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias, None)
    for a, b in zip(sharded, (y, mean, var, *grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_synchronised_batch_norm_equals_global_batch_float64():
    """Chan's combination of per-replica moments: values, VJP and JVP over 4 replicas equal the
    global batch's two-pass formula to float64 round-off (the batch has a large common offset,
    where a one-pass E[x^2] - E[x]^2 would lose digits)."""
    mesh = Mesh(np.array(jax.devices()[:4]), ("batch",))
    with jax.enable_x64(True):
        x, scale, bias = _bn_inputs(jnp.float64, shape=(8, 5, 3, 6))
        x = x + 1e4
        ct_y = jnp.cos(x * 7.0)
        x_dot = jnp.sin(x * 5.0)

        def per_replica(x, scale, bias):
            i = jax.lax.axis_index("batch")
            ct = jax.lax.dynamic_slice_in_dim(ct_y, i * 2, 2)
            tangent = jax.lax.dynamic_slice_in_dim(x_dot, i * 2, 2)
            _, vjp = jax.vjp(
                lambda *a: layers.batch_norm_train(*a, 1e-5, "batch")[0], x, scale, bias
            )
            dx, dscale, dbias = vjp(ct)
            _, (y_dot, mean_dot, var_dot) = jax.jvp(
                lambda x: layers.batch_norm_train(x, scale, bias, 1e-5, "batch"), (x,), (tangent,)
            )
            out = layers.batch_norm_train(x, scale, bias, 1e-5, "batch")
            # the cotangents of the replicated scale and bias come summed over the replicas
            return (out[0], dx, y_dot), (dscale, dbias), (out[1:], mean_dot, var_dot)

        sharded = jax.jit(
            jax.shard_map(
                per_replica,
                mesh=mesh,
                in_specs=(PartitionSpec("batch"), PartitionSpec(), PartitionSpec()),
                out_specs=(PartitionSpec("batch"), PartitionSpec(), PartitionSpec()),
            )
        )(x, scale, bias)
        ref_out, ref_vjp = jax.vjp(lambda *a: _reference_batch_norm(*a)[0], x, scale, bias)
        dx, dscale, dbias = ref_vjp(ct_y)
        _, (y_dot, mean_dot, var_dot) = jax.jvp(
            lambda x: _reference_batch_norm(x, scale, bias), (x,), (x_dot,)
        )
        _, mean, var = _reference_batch_norm(x, scale, bias)
        want = ((ref_out, dx, y_dot), (dscale, dbias), ((mean, var), mean_dot, var_dot))
        for got, ref in zip(jax.tree.leaves(sharded), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-11)


def _collectives(lowered_text: str) -> dict[str, int]:
    """Counts of the collective ops in lowered StableHLO text."""
    ops = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "collective_permute")
    return {op: lowered_text.count(f"stablehlo.{op}") for op in ops}


def test_synchronised_batch_norm_is_one_collective_per_pass():
    """Forward: one all_gather (the count is static: no collective); forward and backward of a
    gradient: that all_gather and one all_reduce."""
    mesh = Mesh(np.array(jax.devices()[:4]), ("batch",))
    args = _bn_inputs(jnp.float32, shape=(8, 5, 3, 6))
    spec = PartitionSpec("batch")

    def forward(x, scale, bias):
        return layers.batch_norm_train(x, scale, bias, 1e-5, "batch")

    def gradients(x, scale, bias):
        # scale and bias device-varying: their gradients stay per replica, so shard_map adds no
        # all-reduce of its own for them
        scale, bias = jax.lax.pcast((scale, bias), "batch", to="varying")

        def loss(x, scale, bias):
            return jnp.sum(jnp.sin(layers.batch_norm_train(x, scale, bias, 1e-5, "batch")[0]))

        dx, dscale, dbias = jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)
        return dx, dscale[None], dbias[None]

    def collectives(fn, out_specs):
        mapped = jax.shard_map(
            fn, mesh=mesh, in_specs=(spec, PartitionSpec(), PartitionSpec()), out_specs=out_specs
        )
        return _collectives(jax.jit(mapped).lower(*args).as_text())

    none = dict.fromkeys(("all_reduce", "all_gather", "reduce_scatter", "all_to_all",
                          "collective_permute"), 0)  # fmt: skip
    fwd = collectives(forward, (spec, PartitionSpec(), PartitionSpec()))
    assert fwd == none | {"all_gather": 1}, fwd
    grad = collectives(gradients, (spec, spec, spec))
    assert grad == none | {"all_gather": 1, "all_reduce": 1}, grad
    assert layers.batch_count(args[0], None) == 8 * 5 * 3
