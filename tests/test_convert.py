"""torchvision <-> Flax conversion: numerical parity for every arch, exact round trips, errors.

Parity uses random torchvision weights with randomised BN affine parameters and running statistics
collected from random batches (hand-picked statistics make deep random nets explode). float64 on
both sides proves the structure (differences are rounding only); float32 is checked with a
depth-aware tolerance because accumulation order differs between XLA and torch, with JAX's
float32 matmuls and convolutions at precision "highest" (as `resnet_jax.convert` states: on
GPUs with TF32, XLA's default precision is coarser than these tolerances).
"""

import torch  # noqa: I001  (torch before anything that could pull in TensorFlow)
import torchvision

import os
import pickle
import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import convert, models

H, W = 64, 48  # non-square, and 48 reaches odd sizes (3 -> 2) where padding matters


@pytest.fixture(scope="module", autouse=True)
def _highest_matmul_precision():
    """Full float32 matmuls and convolutions, the precision the parity tolerances hold at."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Batch-2 forwards gain nothing from threads, and spinning threads on shared cores cost 5x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _random_torchvision(arch: str, seed: int) -> torch.nn.Module:
    """Random torchvision model, BN affine randomised and running stats collected from batches."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.momentum = None  # cumulative average over the batches below
        model.train()
        for _ in range(3):
            model(torch.randn(2, 3, H, W))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def _numpy(state_dict) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in state_dict.items()}


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def _apply(model: models.ResNet, variables: dict, x: np.ndarray, **kw):
    """Un-jitted forward: op-by-op compiles are cached across archs (same layer shapes), which
    makes the 10 archs x 2 dtypes ~1.6x cheaper in CPU time than jitting every whole net."""
    return model.apply(variables, jnp.asarray(x), **kw)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality (memcmp speed; unlike ==, tells -0.0 from 0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _flat(tree: dict) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_trees_identical(a: dict, b: dict) -> None:
    flat_a, flat_b = _flat(a), _flat(b)
    assert flat_a.keys() == flat_b.keys()
    for path, value in flat_a.items():
        assert _same_bits(value, flat_b[path]), path


class Case(NamedTuple):
    """One arch's torchvision model (float64 by now), its weights and reference logits."""

    arch: str
    model: torch.nn.Module  # float64: its state_dict() is the float64 weights
    x: np.ndarray  # NCHW float64
    sd32: dict[str, np.ndarray]
    logits32: np.ndarray
    logits64: np.ndarray
    variables32: dict  # convert.from_torchvision(sd32)


@pytest.fixture(scope="module", params=list(models.ARCHS))
def case(request) -> Case:
    arch = request.param
    model = _random_torchvision(arch, seed=list(models.ARCHS).index(arch))
    x = torch.randn(2, 3, H, W, dtype=torch.float64)
    with torch.no_grad():
        logits32 = model(x.float()).numpy()
        sd32 = _numpy(model.state_dict())
        model.double()
        logits64 = model(x).numpy()
    variables32 = convert.from_torchvision(sd32, arch)
    return Case(arch, model, x.numpy(), sd32, logits32, logits64, variables32)


# The 101/152-layer archs' float64 parity runs only with the slow tests: they are built from the
# blocks of the 50-layer archs checked here in float64 (same code, more blocks, the same or twice
# the width), and their float32 parity below runs for every arch.
DEEP_ARCHS = ("resnet101", "resnet152", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet101_2")


@pytest.mark.parametrize(
    "case",
    [pytest.param(a, marks=[pytest.mark.slow] if a in DEEP_ARCHS else []) for a in models.ARCHS],
    indirect=True,
)
def test_float64_logits_match_torchvision(case: Case):
    with jax.enable_x64(True):
        model = models.get_model(case.arch, dtype=jnp.float64, param_dtype=jnp.float64)
        variables = convert.from_torchvision(case.model.state_dict(), case.arch, dtype=None)
        logits = np.asarray(_apply(model, variables, _nhwc(case.x)))
    assert {a.dtype for a in jax.tree.leaves(variables)} == {np.dtype(np.float64)}
    assert logits.dtype == np.float64
    np.testing.assert_allclose(logits, case.logits64, rtol=0, atol=1e-9)
    assert jnp.zeros(1).dtype == jnp.float32, "x64 leaked out of the test"


def test_float32_logits_match_torchvision(case: Case):
    model = models.get_model(case.arch)
    logits = np.asarray(_apply(model, case.variables32, _nhwc(case.x).astype(np.float32)))
    depth = sum(model.stage_sizes) * (3 if model.block_cls.expansion > 1 else 2) + 2
    scale = max(1.0, float(np.abs(case.logits32).max()))
    tol = (1e-4 if depth <= 50 else 1e-3) * scale  # measured: <= 3e-5 and <= 2.5e-4 of scale
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, case.logits32, rtol=0, atol=tol)


def test_param_count_matches_torchvision(case: Case):
    count = sum(a.size for a in jax.tree.leaves(case.variables32["params"]))
    assert count == sum(p.numel() for p in case.model.parameters())


def test_round_trips_are_bit_identical(case: Case):
    back = convert.to_torchvision(case.variables32, case.arch)
    assert list(back) == list(case.sd32)  # torchvision's key order, num_batches_tracked included
    for key, value in back.items():
        if key.endswith("num_batches_tracked"):
            assert value.dtype == torch.int64 and value.item() == 0
        else:
            assert _same_bits(value.numpy(), case.sd32[key]), key
    case.model.load_state_dict(back, strict=True)
    _assert_trees_identical(convert.from_torchvision(back, case.arch), case.variables32)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_train_mode_output_and_running_stats_match_torchvision(arch):
    torch_model = _random_torchvision(arch, seed=100).double().train()
    variables = convert.from_torchvision(torch_model.state_dict(), arch, dtype=np.float64)
    x = torch.randn(2, 3, H, W, dtype=torch.float64)
    with torch.no_grad():
        expected = torch_model(x).numpy()  # also updates the running stats (unbiased variance)
    expected_stats = convert.from_torchvision(torch_model.state_dict(), arch, dtype=np.float64)[
        "batch_stats"
    ]
    with jax.enable_x64(True):
        model = models.get_model(arch, dtype=jnp.float64, param_dtype=jnp.float64)
        logits, updated = _apply(
            model, variables, _nhwc(x.numpy()), train=True, mutable=["batch_stats"]
        )
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-9)
    new, want = _flat(updated["batch_stats"]), _flat(expected_stats)
    old = _flat(variables["batch_stats"])
    assert new.keys() == want.keys()
    for path, value in new.items():
        assert not np.allclose(value, old[path]), path  # the batch really moved the statistics
        np.testing.assert_allclose(np.asarray(value), want[path], rtol=1e-12, atol=1e-12)


# ---- files, wrappers, dtypes -------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_sd() -> dict[str, torch.Tensor]:
    """A resnet18 state_dict with 10 classes and every float tensor random (so swapped leaves,
    e.g. running_mean <-> running_var, cannot go unnoticed)."""
    torch.manual_seed(1)
    sd = torchvision.models.resnet18(num_classes=10).state_dict()
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in sd.items()}


def _zeros_state_dict(model_fn: Callable[..., torch.nn.Module], **kw) -> dict[str, np.ndarray]:
    """Zero weights with torchvision's exact keys and shapes, built without any init cost."""
    with torch.device("meta"):
        sd = model_fn(**kw).state_dict()
    return {k: np.zeros(v.shape, np.float32) for k, v in sd.items()}


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
def test_file_round_trip(tmp_path, small_sd, suffix):
    variables = convert.from_torchvision(small_sd, "resnet18")
    assert variables["params"]["fc"]["kernel"].shape == (512, 10)
    path = convert.save_torchvision(
        convert.to_torchvision(variables, "resnet18"), tmp_path / f"w{suffix}"
    )
    order = sorted if suffix == ".safetensors" else list  # safetensors stores keys sorted
    assert order(convert.load_state_dict(path)) == order(small_sd)
    _assert_trees_identical(convert.from_torchvision(path, "resnet18"), variables)
    _assert_trees_identical(convert.from_torchvision(str(path), "resnet18"), variables)


def test_weights_file_suffixes_in_any_case(tmp_path, small_sd):
    for name in ("w.pth", "W.PTH", "w.Pt", "w.safetensors", "dir/W.SafeTensors"):
        assert convert.is_torch_weights_file(name) and convert.is_torch_weights_file(
            tmp_path / name
        )
    for name in ("run", "w.ckpt", "w.pth.bak", "checkpoints/4", "w.bin"):
        assert not convert.is_torch_weights_file(name), name
    expected = convert.from_torchvision(small_sd, "resnet18")
    for name in ("UPPER.PTH", "Mixed.SafeTensors"):
        path = convert.save_torchvision(small_sd, tmp_path / name)
        _assert_trees_identical(convert.from_torchvision(path, "resnet18"), expected)


def test_files_written_by_torch_and_safetensors_directly(tmp_path, small_sd):
    import safetensors.torch

    expected = convert.from_torchvision(small_sd, "resnet18")
    torch.save(small_sd, tmp_path / "plain.pth")
    safetensors.torch.save_file(small_sd, tmp_path / "plain.safetensors")
    for name in ("plain.pth", "plain.safetensors"):
        _assert_trees_identical(convert.from_torchvision(tmp_path / name, "resnet18"), expected)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd},
        lambda sd: {"model": sd, "epoch": 3, "optimizer": {"lr": 0.1}},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {"model": {f"module.{k}": v for k, v in sd.items()}}},
        lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
    ],
    ids=["state_dict", "model", "module-prefix", "nested", "compile-prefix", "ddp-of-compiled"],
)
def test_wrappers_dataparallel_and_compile_prefixes(tmp_path, small_sd, wrap):
    expected = convert.from_torchvision(small_sd, "resnet18")
    torch.save(wrap(small_sd), tmp_path / "wrapped.pth")
    _assert_trees_identical(
        convert.from_torchvision(tmp_path / "wrapped.pth", "resnet18"), expected
    )
    _assert_trees_identical(convert.from_torchvision(wrap(small_sd), "resnet18"), expected)
    assert convert.num_classes_of(wrap(small_sd)) == 10
    assert convert.detect_arch(wrap(small_sd)) == "resnet18"


def test_round_trip_resets_only_the_batch_counters(small_sd):
    """Documented in to_torchvision: parameters and statistics come back bit-identical, the
    num_batches_tracked counters (which the Flax variables do not hold) as 0."""
    counted = {
        k: torch.tensor(17) if k.endswith("num_batches_tracked") else v for k, v in small_sd.items()
    }
    back = convert.to_torchvision(convert.from_torchvision(counted, "resnet18"), "resnet18")
    assert list(back) == list(counted)
    for key, value in counted.items():
        if key.endswith("num_batches_tracked"):
            assert back[key].dtype == torch.int64 and back[key].item() == 0, key
        else:
            assert torch.equal(back[key], value), key


def test_converted_arrays_do_not_alias_the_source(small_sd):
    variables = convert.from_torchvision(small_sd, "resnet18")
    assert not np.shares_memory(variables["params"]["fc"]["bias"], small_sd["fc.bias"].numpy())
    back = convert.to_torchvision(variables, "resnet18")
    assert not np.shares_memory(back["fc.bias"].numpy(), variables["params"]["fc"]["bias"])


def test_headless_state_dict_gives_headless_variables(small_sd):
    headless = {k: v for k, v in small_sd.items() if not k.startswith("fc.")}
    assert convert.num_classes_of(headless) is None
    variables = convert.from_torchvision(headless, "resnet18")
    assert "fc" not in variables["params"]
    expected = models.variable_shapes(models.get_model("resnet18", num_classes=None))
    assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda s: s.shape, expected)
    assert list(convert.to_torchvision(variables, "resnet18")) == list(headless)


def test_bfloat16_round_trip_keeping_the_file_dtype(tmp_path, small_sd):
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in small_sd.items()}
    variables = convert.from_torchvision(bf16, "resnet18", dtype=None)
    assert variables["params"]["conv1"]["kernel"].dtype == jnp.bfloat16
    back = convert.to_torchvision(variables, "resnet18")
    assert list(back) == list(bf16)
    for key, value in bf16.items():
        if value.is_floating_point():
            assert back[key].dtype == torch.bfloat16 and torch.equal(back[key], value), key
    for suffix in (".pth", ".safetensors"):
        path = convert.save_torchvision(back, tmp_path / f"bf16{suffix}")
        _assert_trees_identical(convert.from_torchvision(path, "resnet18", dtype=None), variables)


@pytest.mark.parametrize("file_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_float_types_become_float32_by_default(tmp_path, small_sd, file_dtype):
    """Half-precision (or float64) files give the float32 variables the models expect, with the
    file's values exactly (float16/bfloat16 -> float32 is exact)."""
    cast = {k: v.to(file_dtype) if v.is_floating_point() else v for k, v in small_sd.items()}
    path = convert.save_torchvision(cast, tmp_path / "half.pth")
    for source in (cast, path):
        variables = convert.from_torchvision(source, "resnet18")
        assert {a.dtype for a in jax.tree.leaves(variables)} == {np.dtype(np.float32)}
        kept = convert.from_torchvision(source, "resnet18", dtype=None)
        _assert_trees_identical(variables, jax.tree.map(lambda a: a.astype(np.float32), kept))
    assert convert.to_torchvision(variables, "resnet18")["fc.bias"].dtype == torch.float32
    wide = convert.from_torchvision(cast, "resnet18", dtype=np.float64)
    assert wide["batch_stats"]["bn1"]["var"].dtype == np.float64


def test_dtype_argument_and_tensor_types_are_checked(small_sd):
    with pytest.raises(ValueError, match="dtype must be a floating-point type or None, got"):
        convert.from_torchvision(small_sd, "resnet18", dtype=np.int32)
    ints = {**small_sd, "bn1.running_mean": torch.zeros(64, dtype=torch.int64)}
    with pytest.raises(convert.WeightsFileError, match=r"bn1.running_mean \(int64\)"):
        convert.from_torchvision(ints, "resnet18")


@pytest.mark.parametrize(
    "arch", ["resnet50", "resnext50_32x4d", "wide_resnet50_2", "resnext101_64x4d"]
)
def test_detect_arch_tells_same_key_archs_apart(arch):
    # resnet50 / resnext50_32x4d / wide_resnet50_2 share every key and differ only in shapes;
    # resnext101_32x8d and resnext101_64x4d even share every width and differ only in groups.
    sd = _zeros_state_dict(getattr(torchvision.models, arch), num_classes=7)
    assert convert.detect_arch(sd) == arch
    assert convert.detect_arch({k: v for k, v in sd.items() if not k.startswith("fc.")}) == arch
    assert convert.detect_arch({"features.0.weight": np.zeros((3, 3))}) is None


# ---- errors -------------------------------------------------------------------------------------


def test_mismatch_lists_every_missing_unexpected_and_misshaped_key(small_sd):
    sd = dict(small_sd)
    del sd["layer1.0.conv1.weight"], sd["bn1.running_var"]
    sd["layer5.0.conv1.weight"] = torch.zeros(3)
    sd["extra.bias"] = torch.zeros(3)
    sd["layer2.0.conv2.weight"] = torch.zeros(128, 128, 1, 1)
    sd["layer3.1.bn1.bias"] = torch.zeros(7)
    with pytest.raises(convert.WeightsMismatchError) as err:
        convert.from_torchvision(sd, "resnet18")
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "missing 2 keys: bn1.running_var, layer1.0.conv1.weight" in msg
    assert "unexpected 2 keys: layer5.0.conv1.weight, extra.bias" in msg
    assert "layer2.0.conv2.weight: expected (128, 128, 3, 3), found (128, 128, 1, 1)" in msg
    assert "layer3.1.bn1.bias: expected (256), found (7)" in msg


@pytest.mark.parametrize(
    ("actual", "requested"), [("resnet50", "resnet34"), ("resnext50_32x4d", "resnet50")]
)
def test_wrong_arch_names_the_arch_it_looks_like(actual, requested):
    sd = _zeros_state_dict(getattr(torchvision.models, actual))
    with pytest.raises(convert.WeightsMismatchError, match="state_dict") as err:
        convert.from_torchvision(sd, requested)
    assert f"looks like a {actual} state_dict, not {requested}" in str(err.value)
    assert "\n" not in str(err.value)


def test_num_classes_mismatch_says_how_many_classes(small_sd):
    with pytest.raises(convert.WeightsMismatchError) as err:
        convert.from_torchvision(small_sd, "resnet18", num_classes=5)
    assert "has 10 classes while num_classes=5 was requested" in str(err.value)
    headless = {k: v for k, v in small_sd.items() if not k.startswith("fc.")}
    with pytest.raises(convert.WeightsMismatchError, match="has no classifier"):
        convert.from_torchvision(headless, "resnet18", num_classes=5)


def test_non_resnet_state_dict_is_one_line():
    sd = _zeros_state_dict(torchvision.models.squeezenet1_1)
    with_fc = {**sd, "fc.weight": np.zeros((10, 512)), "fc.bias": np.zeros(10)}  # as GoogLeNet
    for state_dict in (sd, with_fc):
        with pytest.raises(convert.WeightsMismatchError) as err:
            convert.from_torchvision(state_dict, "resnet18")
        msg = str(err.value)
        assert "is not a torchvision ResNet state_dict" in msg and "features.0.weight" in msg
        assert "\n" not in msg
    with pytest.raises(convert.WeightsMismatchError, match="contains no tensors"):
        convert.from_torchvision({}, "resnet18")


@pytest.mark.parametrize("prefix", ["model.", "model._orig_mod.", "net.backbone."])
def test_other_key_prefix_is_named_with_the_arch_under_it(small_sd, prefix):
    """Lightning-style attribute prefixes are not stripped (the module may hold several
    networks); the error says which prefix holds which arch and how to pass it."""
    lightning = {"state_dict": {f"{prefix}{k}": v for k, v in small_sd.items()}, "epoch": 3}
    lightning["state_dict"]["criterion.weight"] = torch.ones(10)
    assert convert.detect_arch(lightning) is None
    with pytest.raises(convert.WeightsMismatchError) as err:
        convert.from_torchvision(lightning, "resnet34")
    shown = prefix.removesuffix("_orig_mod.")
    msg = str(err.value)
    assert f"its keys under {shown!r} are a resnet18 state_dict" in msg and "\n" not in msg
    assert f"k.removeprefix({shown!r})" in msg
    stripped = {k.removeprefix(shown): v for k, v in lightning["state_dict"].items()
                if k.startswith(shown)}  # fmt: skip
    expected = convert.from_torchvision(small_sd, "resnet18")
    _assert_trees_identical(convert.from_torchvision(stripped, "resnet18"), expected)


def test_to_torchvision_validates_the_flax_tree(small_sd):
    variables = convert.from_torchvision(small_sd, "resnet18")
    variables["params"]["layer1_0"]["conv1"]["kernel"] = np.zeros((1, 1, 64, 64), np.float32)
    del variables["batch_stats"]["bn1"]["mean"]
    with pytest.raises(convert.WeightsMismatchError) as err:
        convert.to_torchvision(variables, "resnet18")
    msg = str(err.value)
    assert "Flax variables" in msg and "missing 1 keys: bn1.running_mean" in msg
    assert "layer1.0.conv1.weight: expected (64, 64, 3, 3), found (64, 64, 1, 1)" in msg
    with pytest.raises(ValueError, match="Unknown arch 'resnet19'"):
        convert.to_torchvision(variables, "resnet19")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_is_a_clear_error(tmp_path, small_sd, suffix):
    path = convert.save_torchvision(small_sd, tmp_path / f"w{suffix}")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(convert.WeightsFileError) as err:
        convert.from_torchvision(path, "resnet18")
    msg = str(err.value)
    assert str(path) in msg and "truncated or corrupt" in msg and "\n" not in msg
    assert err.value.__cause__ is not None


class _RunsCode:
    """Unpickling this would run a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    payload = {"conv1.weight": _RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(convert.WeightsFileError) as err:
        convert.from_torchvision(path, "resnet18")
    assert not marker.exists()
    msg = str(err.value)
    assert str(path) in msg and "weights_only=True" in msg and "arbitrary code" in msg
    assert "system" in msg  # torch's reason: the blocked global
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)


def test_other_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        convert.from_torchvision(missing, "resnet18")
    ckpt = tmp_path / "w.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(convert.WeightsFileError, match="unknown weights file type '.ckpt'"):
        convert.load_state_dict(ckpt)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), tensor)
    with pytest.raises(convert.WeightsFileError, match="holds a Tensor, not a state_dict"):
        convert.load_state_dict(tensor)
    not_tensor = tmp_path / "strings.pth"
    torch.save({"conv1.weight": "hello"}, not_tensor)
    with pytest.raises(convert.WeightsFileError, match="'conv1.weight' is a str, not a tensor"):
        convert.load_state_dict(not_tensor)
    with pytest.raises(ValueError, match="unknown weights file type '.bin'"):
        convert.save_torchvision({}, tmp_path / "w.bin")


def test_appended_head_folds_into_one_torchvision_fc():
    """A model with a `head` appended on its 1000-class fc (`--head append`) exports as one
    `fc` (W_fc @ W_head, b_fc @ W_head + b_head) that torchvision loads strictly and that gives
    the same float32 logits."""
    model = models.get_model("resnet18", num_classes=3, fc_classes=1000)
    variables = jax.tree.map(np.asarray, models.init_variables(model, jax.random.key(4), H))
    head = variables["params"]["head"]
    head["bias"] = head["bias"] + 0.5  # a bias the fold must carry over
    state_dict = convert.to_torchvision(variables, "resnet18")
    assert (
        state_dict["fc.weight"].shape == (3, 512) and state_dict["fc.weight"].dtype == torch.float32
    )
    net = torchvision.models.resnet18(num_classes=3)
    net.load_state_dict(state_dict, strict=True)
    x = np.random.default_rng(5).normal(size=(2, 3, H, W)).astype(np.float32)
    with torch.no_grad():
        expected = net.eval()(torch.from_numpy(x)).numpy()
    logits = np.asarray(_apply(model, variables, _nhwc(x)))
    np.testing.assert_allclose(
        logits, expected, rtol=0, atol=1e-4 * max(1.0, np.abs(expected).max())
    )
    plain = convert.fold_appended_head(variables)
    assert "head" not in plain["params"] and "head" in variables["params"]  # the input is kept
