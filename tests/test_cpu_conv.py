"""`resnet_jax.models.Conv` is a drop-in for `nn.Conv`: same parameters, values and gradients.

On CPU it computes `resnet_jax.cpu.conv.conv2d`, whose formulations (1x1 as matmul, weight gradient
by im2col or per-tap matmuls, grouped convolutions as one dense convolution per merged group of
channels) are checked against flax's `nn.Conv` in float32 and, with x64 enabled, to float64
round-off, with XLA:CPU's convolutions on Eigen (what `resnet_jax.cpu.configure` sets) and on
YNNPACK, which pick different formulations. For other platforms `Conv` lowers to plain
convolutions (checked by exporting for CUDA/TPU, which needs no GPU).
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from resnet_jax import models
from resnet_jax.cpu import conv, xla_flags
from resnet_jax.cpu.conv import conv2d
from resnet_jax.models import Conv

P0, P1, P3 = ((0, 0), (0, 0)), ((1, 1), (1, 1)), ((3, 3), (3, 3))
# kernel, stride, padding, groups, spatial size, in channels, features, use_bias. On CPU the
# sizes pick every formulation: 1x1 matmul; im2col for outputs of <= 64 pixels; otherwise XLA's
# own conv with Eigen convolutions (at this batch of 3), and with YNNPACK's XLA conv + per-tap
# matmul dW (>= 16 channels) or + im2col dW (fewer); grouped: one XLA conv per merged group
# (block-diagonal kernels), with their own dW (Eigen, at this batch) or a per-tap matmul dW
# batched over the groups (YNNPACK).
CASES = [
    (1, 1, P0, 1, 9, 8, 16, False),
    (1, 2, P0, 1, 9, 8, 16, False),  # strided 1x1 (downsample), odd size
    (3, 1, P1, 1, 9, 16, 8, False),  # 81 output pixels: per-tap dW
    (3, 2, P1, 1, 17, 16, 16, True),
    (7, 2, P3, 1, 17, 3, 8, False),  # the stem: im2col dW
    (3, 1, "SAME", 1, 10, 4, 8, True),
    (5, 3, ((2, 1), (0, 2)), 1, 28, 4, 8, False),  # asymmetric padding, stride 3
    (3, 2, P1, 1, 9, 16, 16, False),  # 5x5 output: im2col convolution
    (3, 1, P1, 1, 2, 16, 8, False),  # 2x2 output
    (3, 2, "VALID", 1, 10, 4, 8, False),
    (3, 2, P1, 32, 5, 64, 64, False),  # ResNeXt-style: 2 channels per group, merged by 8
    (3, 1, P1, 32, 6, 64, 64, False),  # the same, stride 1
    (1, 1, "SAME", 2, 5, 8, 8, True),  # grouped 1x1
    (3, 1, P1, 2, 9, 16, 16, False),  # 8 channels per group, merged into one (dense)
    (3, 2, P1, 4, 11, 16, 16, True),  # 4 channels per group, strided: merged into one
    (3, 1, P1, 4, 9, 8, 16, False),  # 2 channels in and 4 out per group: merged into one
    (3, 1, P1, 2, 9, 64, 32, False),  # 32 channels per group: not merged
]
# above conv.MATMUL_WEIGHT_GRAD_MAX_BATCH, so that Eigen keeps XLA's weight gradient
BATCH = 5
IDS = [f"k{c[0]}s{c[1]}g{c[3]}h{c[4]}{'b' if c[7] else ''}-{c[2]}" for c in CASES]
# the cases checked to float64 round-off and with forward mode: one of each formulation
EXACT = (1, 3, 4, 7, 10, 11, 14, 16)


@pytest.fixture(params=["eigen", "ynn"])
def cpu_convs(request):
    """Trace `conv2d` as if XLA:CPU's convolutions were on Eigen (the default) or YNNPACK."""
    with xla_flags.assume_eigen_convolutions(request.param == "eigen"):
        yield request.param


def _random_like(tree, seed: int = 0):
    """Random normal leaves (numpy, no XLA compile) with `tree`'s shapes and dtypes; BN variances
    stay positive. Scaled by 1/sqrt(fan-in) so activations stay O(1) through a ResNet."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        if "'var'" in name:
            return jnp.asarray(rng.uniform(0.5, 2.0, s.shape), s.dtype)
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
        return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, tree)


def _compare(ref: nn.Module, ours: nn.Module, x: jax.Array):
    """Output and d(sum(y * cotangent))/d(params, x) of both modules on the same variables."""
    shapes = jax.eval_shape(ref.init, jax.random.key(0), x)
    assert jax.eval_shape(ours.init, jax.random.key(0), x) == shapes  # names, shapes, dtypes
    variables = _random_like(shapes)
    cotangent = _random_like(jax.eval_shape(ref.apply, variables, x), seed=1)

    def run(module):
        def loss(v, x):
            y = module.apply(v, x)
            return jnp.sum(y * cotangent), y

        (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables, x)
        return y, grads

    return jax.jit(lambda: (run(ref), run(ours)))()


def _assert_close(actual, expected, rtol: float) -> None:
    """Leafwise max-abs error relative to the expected leaf's max-abs value."""
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        a, e = np.asarray(a), np.asarray(e)
        err = np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-30)
        assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


def _pair(case, dtype):
    k, s, padding, groups, size, cin, features, bias = case
    kw = dict(
        features=features,
        kernel_size=(k, k),
        strides=s,
        padding=padding,
        feature_group_count=groups,
        use_bias=bias,
        dtype=dtype,
        param_dtype=dtype,
    )
    x = jax.random.normal(jax.random.key(1), (BATCH, size, size, cin), dtype)
    return nn.Conv(**kw), Conv(**kw, platform="cpu"), x


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_nn_conv_float32(case, cpu_convs):
    (y_ref, g_ref), (y, g) = _compare(*_pair(case, jnp.float32))
    _assert_close(y, y_ref, 1e-5)
    _assert_close(g, g_ref, 2e-5)  # (d params, d x)


@pytest.mark.parametrize("case", [CASES[i] for i in EXACT], ids=[IDS[i] for i in EXACT])
def test_matches_nn_conv_float64(case, cpu_convs):
    with jax.enable_x64(True):
        (y_ref, g_ref), (y, g) = _compare(*_pair(case, jnp.float64))
        assert y.dtype == jnp.float64
        _assert_close(y, y_ref, 1e-13)
        _assert_close(g, g_ref, 1e-13)


@pytest.mark.parametrize("case", [CASES[i] for i in EXACT], ids=[IDS[i] for i in EXACT])
def test_forward_mode_and_hessian_vector_products_match(case, cpu_convs):
    """Forward-mode AD works (no custom_vjp) and jvp-of-grad equals nn.Conv's."""
    ref, ours, x = _pair(case, jnp.float32)
    variables = _random_like(jax.eval_shape(ref.init, jax.random.key(0), x))
    tangents = (_random_like(variables, seed=2), _random_like(x, seed=3))

    def run(module):
        def loss(v, x):
            return jnp.sum(jnp.tanh(module.apply(v, x)))

        grad = jax.grad(loss, argnums=(0, 1))
        return jax.jvp(lambda v, x: module.apply(v, x), (variables, x), tangents), jax.jvp(
            grad, (variables, x), tangents
        )[1]

    expected, actual = jax.jit(lambda: (run(ref), run(ours)))()
    _assert_close(actual, expected, 5e-5)


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=[IDS[0], IDS[3]])
def test_init_equals_nn_conv(case):
    """Same parameter names, shapes and initial values: checkpoints/converters are unchanged."""
    ref, ours, x = _pair(case, jnp.float32)
    v_ref, v = (jax.jit(m.init)(jax.random.key(0), x) for m in (ref, ours))
    assert jax.tree.structure(v) == jax.tree.structure(v_ref)
    jax.tree.map(np.testing.assert_array_equal, v, v_ref)


def _lowered(fn, platform: str, *shapes) -> str:
    specs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    return export.export(jax.jit(fn), platforms=(platform,))(*specs).mlir_module()


def _conv_grads(platform: str, strides: int, padding, groups: int = 1):
    """(x, kernel) -> the input and kernel gradients of `Conv(platform=platform)`'s summed output,
    features = kernel.shape[3]."""

    def grads(x, w):
        module = Conv(
            w.shape[3],
            w.shape[:2],
            strides,
            padding,
            feature_group_count=groups,
            use_bias=False,
            platform=platform,
        )
        return jax.grad(lambda x, w: module.apply({"params": {"kernel": w}}, x).sum(), (0, 1))(x, w)

    return grads


def _lowered_conv(platform: str, strides: int, padding, groups: int, *shapes) -> str:
    """The exported gradients of `Conv(platform=platform)`, lowered for that platform: no
    platform branch (`stablehlo.case`) in any of them."""
    text = _lowered(_conv_grads(platform, strides, padding, groups), platform, *shapes)
    assert "stablehlo.case" not in text
    return text


@pytest.mark.parametrize(
    ("kernel", "size", "batch", "xla_convs"),
    [(1, 9, 3, 0), (3, 9, 3, 0), (3, 17, 3, {"eigen": 2, "ynn": 1}), (3, 17, 2, 1)],
    # YNNPACK, or a batch of 1-2: XLA's dx and a matmul dW
    ids=["1x1 matmul", "5x5-output im2col", "9x9 output", "9x9 output, batch 2"],
)
def test_fast_formulation_only_on_cpu(kernel, size, batch, xla_convs, cpu_convs):
    """`Conv(platform="cpu")` computes `conv2d`'s formulations (matmuls, fewer XLA
    convolutions); for CUDA/TPU it is XLA's plain convolution and its own gradients."""
    pad = ((kernel // 2,) * 2,) * 2
    shapes = ((batch, size, size, 16), (kernel, kernel, 16, 8))
    cpu = _lowered_conv("cpu", 2, pad, 1, *shapes)
    xla_convs = xla_convs if isinstance(xla_convs, int) else xla_convs[cpu_convs]
    assert ("stablehlo.dot_general" in cpu) is (xla_convs < 2)
    assert cpu.count("stablehlo.convolution") == xla_convs
    for platform in ("cuda", "tpu"):
        other = _lowered_conv(platform, 2, pad, 1, *shapes)
        assert "stablehlo.dot_general" not in other
        assert other.count("stablehlo.convolution") == 2  # XLA's/cuDNN's dx and dW


@pytest.mark.parametrize(
    ("cin_per_group", "groups", "merge"),
    [(4, 32, 4), (8, 32, 2), (16, 32, 1), (32, 32, 1), (16, 16, 1), (4, 64, 4), (16, 64, 2)]
    + [(32, 64, 2), (3, 6, 6), (1, 1024, 32), (64, 2, 1)],
)
def test_grouped_convolutions_merge_groups(cin_per_group, groups, merge):
    """At least MERGED_GROUP_CHANNELS input channels per merged group, at most
    MAX_GROUP_CONVOLUTIONS merged groups (fully merged where neither can hold)."""
    assert conv._merge_factor(cin_per_group, groups) == merge


def test_grouped_weight_gradient_alone_matches_xla():
    """Only the kernel's gradient of a grouped convolution with merged groups, all-ones
    cotangent: a program in which a multiply-and-reduce form of the block-diagonal kernels
    crashed XLA:CPU (segmentation fault)."""
    x = jax.random.normal(jax.random.key(0), (BATCH, 8, 8, 32))
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 32))

    def kernel_grad(convolve):
        def fn(x, w):
            y, vjp = jax.vjp(lambda x, w: convolve(x, w, (1, 1), P1, 8), x, w)
            return vjp(jnp.ones_like(y))[1]

        return jax.jit(fn)(x, w)

    _assert_close(kernel_grad(conv2d), kernel_grad(conv._lax_conv), 2e-5)  # XLA's grouped conv


@pytest.mark.parametrize(
    ("batch", "stride", "convolutions", "matmul_dw"),
    [(2, 1, 4, True), (2, 2, 4, True), (8, 1, 8, False), (8, 2, 8, False)],
    ids=["batch 2: matmul dW", "batch 2, strided", "batch 8: per-group dW", "batch 8, strided"],
)
def test_grouped_convolutions_are_dense_only_on_cpu(batch, stride, convolutions, matmul_dw):
    """On CPU (convolutions on Eigen) a grouped convolution (here 4 merged groups of 16 channels)
    is one dense XLA convolution per merged group, never XLA's grouped one nor its batch-grouped
    weight gradient; other platforms keep XLA's/cuDNN's own grouped dx and dW convolutions."""
    groups = 16
    shapes = ((batch, 17, 17, 64), (3, 3, 64 // groups, 64))
    with xla_flags.assume_eigen_convolutions(True):
        cpu = _lowered_conv("cpu", stride, P1, groups, *shapes)
    assert ("stablehlo.dot_general" in cpu) is matmul_dw
    assert cpu.count("stablehlo.convolution") == convolutions  # dx (and dW) per merged group
    assert re.search(r"(batch|feature)_group_count = (?!1\b)", cpu) is None
    for platform in ("cuda", "tpu"):
        other = _lowered_conv(platform, stride, P1, groups, *shapes)
        assert "stablehlo.dot_general" not in other
        assert other.count("stablehlo.convolution") == 2
        assert f"batch_group_count = {groups}" in other


def _convolutions_inside_fusions(hlo: str) -> int:
    """Convolutions that an optimized HLO module holds outside its entry computation, i.e. in
    fusions, where XLA:CPU emits them as plain loops."""
    computations = hlo.split("\n\n")
    return sum(c.count(" convolution(") for c in computations if not c.startswith("ENTRY"))


@pytest.mark.parametrize(
    ("x_shape", "features", "groups"),
    [((16, 16, 16, 64), 64, 1), ((32, 12, 12, 32), 32, 1), ((16, 20, 20, 128), 128, 32)]
    + [((16, 16, 16, 256), 256, 32)],
    ids=["dy copy: batch = height = width", "x copy: batch = channels", "grouped, x copy"]
    + ["grouped, both"],
)
def test_no_convolution_is_fused_into_a_loop(x_shape, features, groups):
    """Shapes at which XLA's own weight gradient makes layout copies of the shape of a
    convolution reading the same operand: with multi-output fusion (`resnet_jax.cpu.configure`,
    which tests/conftest.py calls) XLA:CPU would fuse the convolution with the copy (a plain
    loop, 10x slower), so `conv2d` takes the matmul weight gradient there (optimisation level 2:
    the tests run at 0)."""
    assert xla_flags.multi_output_fusion(), (
        "this process runs without multi-output fusion: tests/conftest.py must call "
        "resnet_jax.cpu.configure() before JAX starts"
    )

    def grads(x, w):
        y, vjp = jax.vjp(lambda x, w: conv2d(x, w, (1, 1), P1, groups), x, w)
        return y, vjp(jnp.sin(y))

    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, x_shape[3] // groups, features), jnp.float32)
    options = {"xla_backend_optimization_level": 2}
    hlo = jax.jit(grads, compiler_options=options).lower(x, w).compile().as_text()
    assert hlo.count(" convolution(") > 0
    assert _convolutions_inside_fusions(hlo) == 0


def test_small_resnet_grads_match_nn_conv():
    """A bottleneck ResNet (stem 7x7/2, 1x1, strided 3x3, strided 1x1 downsample) built with
    `conv=Conv` has nn.Conv's variables and the same loss and gradients (float64, under jit)."""
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3)))
        labels = jnp.array([1, 3])
        ref, ours = (
            models.ResNet(
                stage_sizes=(1, 1, 1, 1),
                block_cls=models.Bottleneck,
                num_classes=5,
                dtype=jnp.float64,
                param_dtype=jnp.float64,
                conv=conv,
            )
            for conv in (nn.Conv, functools.partial(Conv, platform="cpu"))
        )
        shapes = models.variable_shapes(ref)
        assert models.variable_shapes(ours) == shapes
        variables = _random_like(shapes)

        def loss_and_grads(model):
            def loss(params):
                logits, _ = model.apply(
                    {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
                )
                log_probs = jax.nn.log_softmax(logits)
                return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], 1))

            return jax.value_and_grad(loss)(variables["params"])

        (loss_ref, g_ref), (loss, g) = jax.jit(
            lambda: (loss_and_grads(ref), loss_and_grads(ours))
        )()
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-12)
    _assert_close(g, g_ref, 1e-10)


@pytest.mark.parametrize(
    ("kwargs", "shape", "message"),
    [
        (dict(kernel_size=(3, 3)), (9, 9, 4), "NHWC"),
        (dict(kernel_size=(3, 3), feature_group_count=3), (1, 9, 9, 4), "divisible"),
        (dict(kernel_size=(3,)), (1, 9, 9, 4), "kernel_size"),
        (dict(kernel_size=(3, 3), strides=0), (1, 9, 9, 4), "strides"),
        (dict(kernel_size=(3, 3), padding=((1, 1),)), (1, 9, 9, 4), "padding"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, shape, message):
    with pytest.raises(ValueError, match=message):
        Conv(features=8, **kwargs).init(jax.random.key(0), jnp.zeros(shape))
