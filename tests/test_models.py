"""Structure of the Flax ResNets: parameter counts, options, feature taps, BatchNorm semantics,
and programs for GPU/TPU free of CPU code."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from resnet_jax import models, optim, steps
from resnet_jax.cpu import xla_flags

# torchvision.models.<arch>().parameters() totals (also checked against torchvision itself in
# tests/test_convert.py).
TORCHVISION_PARAM_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
}


# One block per stage: the same structure at a fraction of the compile time.
tiny_basic = functools.partial(models.ResNet, stage_sizes=(1, 1, 1, 1), block_cls=models.BasicBlock)
tiny_bottleneck = functools.partial(
    models.ResNet, stage_sizes=(1, 1, 1, 1), block_cls=models.Bottleneck
)


KEY = jax.random.key(0)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("arch", list(models.ARCHS))
def test_param_count_matches_torchvision(arch):
    shapes = models.variable_shapes(models.get_model(arch))
    assert _count(shapes["params"]) == TORCHVISION_PARAM_COUNTS[arch]


def test_get_model_typo_lists_valid_names():
    with pytest.raises(ValueError, match="resnet50") as err:
        models.get_model("resnet5O")
    for name in models.ARCHS:
        assert name in str(err.value)
    assert "Did you mean 'resnet50'" in str(err.value)


# Initialising is the slow part on CPU (compiling the RNG), so each tiny net is initialised once
# and the variants below (bf16, frozen BN, no head) reuse its variables: they share the tree.
@pytest.fixture(scope="module")
def basic_vars():
    return models.init_variables(tiny_basic(num_classes=7, zero_init_residual=True), KEY, 32)


@pytest.fixture(scope="module")
def bottleneck_vars():
    return models.init_variables(tiny_bottleneck(num_classes=7, zero_init_residual=True), KEY, 32)


def _train_apply(model: models.ResNet):
    """Jitted training-mode forward (3x faster to compile than running a net op by op)."""
    return jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))


@pytest.mark.parametrize("make_model", [tiny_basic, tiny_bottleneck])
def test_features_match_feature_info(make_model, basic_vars, bottleneck_vars):
    model = make_model(num_classes=7)
    variables = basic_vars if make_model is tiny_basic else bottleneck_vars
    x = jnp.ones((2, 64, 64, 3))
    feats = model.apply(variables, x, train=False, return_features=True)
    for info in model.feature_info():
        f = feats[info.name]
        assert f.shape[-1] == info.channels, info
        if f.ndim == 4:
            assert f.shape[1:3] == (64 // info.reduction, 64 // info.reduction), info
    assert feats["logits"].shape == (2, 7)
    np.testing.assert_array_equal(feats["logits"], model.apply(variables, x, train=False))


def test_no_head_returns_pooled_features(basic_vars):
    headless = {
        **basic_vars,
        "params": {k: v for k, v in basic_vars["params"].items() if k != "fc"},
    }
    # The input of the test above: its (op by op) compiled operations serve here too.
    out = tiny_basic(num_classes=None).apply(headless, jnp.ones((2, 64, 64, 3)), train=False)
    assert out.shape == (2, 512)
    shapes = models.variable_shapes(tiny_basic(num_classes=None))
    assert "fc" not in shapes["params"]


def test_bfloat16_compute_keeps_float32_params_and_stats(basic_vars):
    model = tiny_basic(num_classes=7, dtype=jnp.bfloat16)
    shapes = models.variable_shapes(model)
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    out, updates = _train_apply(model)(basic_vars, jnp.ones((2, 32, 32, 3)))
    assert out.dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}


def test_zero_init_residual(basic_vars, bottleneck_vars):
    assert not np.any(bottleneck_vars["params"]["layer2_0"]["bn3"]["scale"])
    assert np.all(bottleneck_vars["params"]["layer2_0"]["bn1"]["scale"] == 1)
    assert not np.any(basic_vars["params"]["layer1_0"]["bn2"]["scale"])
    assert np.all(basic_vars["params"]["layer1_0"]["bn1"]["scale"] == 1)


def test_batchnorm_updates_running_var_with_unbiased_variance():
    bn = models.BatchNorm(use_running_average=False)
    x = jax.random.normal(jax.random.key(1), (4, 3, 2, 5)) * 3 + 1
    variables = bn.init(jax.random.key(0), x)
    y, updates = bn.apply(variables, x, mutable=["batch_stats"])
    flat = np.asarray(x).reshape(-1, 5)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-5)
    expected_var = 0.9 + 0.1 * flat.var(0, ddof=1)
    np.testing.assert_allclose(updates["batch_stats"]["var"], expected_var, rtol=1e-5)
    # The output is normalised with the biased variance, as torch does.
    expected_y = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 5), expected_y, atol=1e-4)


def test_frozen_bn_stages_keep_running_statistics(basic_vars):
    model = tiny_basic(num_classes=7, frozen_bn=("stem", "layer1"))
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    _, updates = _train_apply(model)(basic_vars, x)
    old, new = basic_vars["batch_stats"], updates["batch_stats"]
    for name in ("bn1", "layer1_0"):
        jax.tree.map(np.testing.assert_array_equal, old[name], new[name])
    assert not np.allclose(old["layer2_0"]["bn1"]["mean"], new["layer2_0"]["bn1"]["mean"])


def test_fully_frozen_bn_normalises_with_running_statistics(basic_vars):
    """With every BatchNorm frozen, train mode computes what eval mode does (running statistics,
    not the batch's), so a frozen backbone behaves in training as it will at inference."""
    model = tiny_basic(num_classes=7, frozen_bn=("stem", *models.STAGE_NAMES))
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    train_logits, _ = _train_apply(model)(basic_vars, x)
    np.testing.assert_allclose(train_logits, model.apply(basic_vars, x, train=False), atol=1e-5)
    unfrozen_logits, _ = _train_apply(tiny_basic(num_classes=7))(basic_vars, x)
    assert not np.allclose(unfrozen_logits, train_logits, atol=1e-3)


@pytest.mark.parametrize("train", [False, True])
def test_block_on_its_own_computes_what_it_does_inside_resnet(bottleneck_vars, train):
    """A Bottleneck built outside ResNet with `block_layers` (ResNet's conv and norm) and the
    net's layer2_0 variables maps the net's layer1 features to its layer2 features, and in
    training updates the BatchNorm statistics alike."""
    model = tiny_bottleneck(num_classes=7)
    # The fixture's zero_init_residual zeroes bn3's scale, which would leave only the shortcut.
    block_params = bottleneck_vars["params"]["layer2_0"]
    bn3 = {**block_params["bn3"], "scale": jnp.full_like(block_params["bn3"]["scale"], 0.5)}
    params = {**bottleneck_vars["params"], "layer2_0": {**block_params, "bn3": bn3}}
    variables = {**bottleneck_vars, "params": params}
    x = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
    run = functools.partial(model.apply, train=train, return_features=True, mutable=["batch_stats"])
    feats, updates = jax.jit(run)(variables, x)
    block = models.Bottleneck(
        planes=128, strides=2, downsample=True, **models.block_layers(train=train)
    )
    own = {c: variables[c]["layer2_0"] for c in ("params", "batch_stats")}
    out, own_updates = jax.jit(functools.partial(block.apply, mutable=["batch_stats"]))(
        own, feats["layer1"]
    )
    np.testing.assert_allclose(out, feats["layer2"], rtol=1e-5, atol=1e-5)
    if train:
        jax.tree.map(
            functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6),
            own_updates["batch_stats"],
            updates["batch_stats"]["layer2_0"],
        )
        assert not np.allclose(
            own_updates["batch_stats"]["bn1"]["mean"], own["batch_stats"]["bn1"]["mean"]
        )
    else:  # running statistics: read, left as they were
        jax.tree.map(np.testing.assert_array_equal, own_updates["batch_stats"], own["batch_stats"])


@pytest.mark.parametrize("sizes", [(2, 2, 2), (2, 2, 2, 2, 2), (2, 0, 2, 2), (2, 2.0, 2, 2)])
def test_bad_stage_sizes_are_named(sizes):
    model = models.ResNet(stage_sizes=sizes, block_cls=models.BasicBlock)
    with pytest.raises(ValueError, match=r"stage_sizes: expected 4 positive block counts"):
        model.init(KEY, jnp.ones((1, 32, 32, 3)))


def test_frozen_bn_rejects_unknown_stage():
    with pytest.raises(ValueError, match="layer5"):
        models.variable_shapes(tiny_basic(frozen_bn=("layer5",)))


def test_basic_block_rejects_groups():
    with pytest.raises(ValueError, match="groups=1"):
        models.variable_shapes(tiny_basic(groups=2))


def test_conv_init_is_torchs_kaiming_normal_fan_out():
    kernel = models.conv_kernel_init(jax.random.key(0), (3, 3, 64, 256))
    np.testing.assert_allclose(np.std(kernel), np.sqrt(2 / (3 * 3 * 256)), rtol=0.02)
    assert np.abs(kernel).max() > 3 * np.sqrt(2 / (3 * 3 * 256))  # not truncated at 2 sigma


@pytest.fixture
def backend_compiles(monkeypatch):
    """The names of the functions XLA compiles while the test runs (JAX's compile events)."""
    compiled = []

    def listener(event: str, _duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield compiled
    jax.monitoring.unregister_event_duration_listener(listener)


def test_accelerator_train_step_has_no_cpu_code(monkeypatch, backend_compiles):
    """The library's ResNet-50 bf16 train step at batch 256, 224 px, exported for CUDA and for
    TPU: tracing runs no probe of XLA:CPU and compiles nothing, and the program holds no platform
    branch (`stablehlo.case`) and no matmul besides the classifier's (its forward and two
    gradients): every convolution is XLA's own."""

    def no_probe(*args, **kwargs):
        raise AssertionError("XLA:CPU probed while tracing for an accelerator")

    for probe in ("compiled_on_cpu", "cpu_backend_convolutions_on_eigen", "multi_output_fusion"):
        monkeypatch.setattr(xla_flags, probe, no_probe)
    batch = {
        "image": jax.ShapeDtypeStruct((256, 224, 224, 3), jnp.uint8),
        "label": jax.ShapeDtypeStruct((256,), jnp.int32),
    }
    for platform in ("cuda", "tpu"):
        model = models.resnet50(dtype=jnp.bfloat16, platform=platform)
        tx = optim.create_optimizer(schedule=0.1)
        state = jax.eval_shape(
            lambda v, tx=tx: steps.create_train_state(v, tx), models.variable_shapes(model)
        )
        step = steps.make_train_step(model, tx, axis_name=None)
        before = len(backend_compiles)
        text = export.export(jax.jit(step), platforms=(platform,))(state, batch).mlir_module()
        assert backend_compiles[before:] == [], platform
        assert text.count("stablehlo.case") == 0, platform
        assert text.count("stablehlo.dot_general") == 3, platform
        # 53 convolutions, each with its input gradient and weight gradient; the stem's input
        # gradient is not needed
        assert text.count("stablehlo.convolution") == 53 * 3 - 1, platform
    jax.jit(lambda x: x + 1)(jnp.ones(3))  # the listener sees a compile
    assert len(backend_compiles) > 0


def test_platform_reaches_every_convolution():
    """`ResNet(platform=...)` builds each of its convolutions with that platform; with the
    default None a model can take `flax.linen.Conv` (which has no such field)."""
    import flax.linen as nn

    shapes = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    for platform in ("cpu", "tpu"):
        model = tiny_bottleneck(num_classes=3, platform=platform)
        convs = []

        def record(next_fun, args, kwargs, context, convs=convs):
            if isinstance(context.module, models.Conv):
                convs.append(context.module.platform)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            jax.eval_shape(model.init, KEY, shapes)
        assert convs == [platform] * 17  # stem, 4 x (3 + downsample)
    flax_conv = tiny_bottleneck(num_classes=3, conv=nn.Conv)
    own_conv = tiny_bottleneck(num_classes=3)
    assert models.variable_shapes(flax_conv) == models.variable_shapes(own_conv)


def test_appended_head_maps_the_fc_logits_and_its_widths_read_back(basic_vars):
    """`fc_classes`: fc keeps its width, a `head` (nn.Linear's init) maps its logits to
    `num_classes`; `classifier_widths` reads both back from the params, for `get_model`."""
    model = tiny_basic(num_classes=3, fc_classes=1000)
    variables = models.init_variables(model, KEY, 64)
    params = variables["params"]
    assert params["fc"]["kernel"].shape == (512, 1000) and params["head"]["kernel"].shape == (
        1000,
        3,
    )
    assert np.abs(params["head"]["bias"]).max() <= 1000**-0.5
    out = model.apply(variables, jnp.ones((2, 64, 64, 3)), return_features=True)
    head = params["head"]
    expected = out["fc"] @ head["kernel"] + head["bias"]
    np.testing.assert_allclose(out["logits"], expected, rtol=1e-5, atol=1e-6)
    assert models.classifier_widths(params) == {"num_classes": 3, "fc_classes": 1000}
    assert models.classifier_widths(basic_vars["params"]) == {  # basic_vars: 7 classes
        "num_classes": 7,
        "fc_classes": None,
    }
    assert models.classifier_widths({}) == {"num_classes": None, "fc_classes": None}
    with pytest.raises(ValueError, match="fc_classes needs num_classes"):
        models.variable_shapes(tiny_basic(num_classes=None, fc_classes=1000))
