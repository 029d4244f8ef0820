"""Model directories (`model_dir`): `load` from the four kinds of path, `save_model`,
`check_variables`, class names files, and their errors."""

import functools
import json
import logging

import jax
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding
from test_checkpoint import (
    ARCH,
    CLASSES,
    SIZE,
    assert_trees_equal,
    perturbed,
    sharded_state,
    step_meta,
)
from test_inference import random_variables

from resnet_jax import checkpoint, model_dir, models
from resnet_jax.preprocessing import Preprocessing, default_preprocessing


@pytest.fixture(scope="module")
def variables() -> dict:
    """Random resnet18 (5 classes) variables as host arrays (see `random_variables`)."""
    return random_variables(models.get_model(ARCH, num_classes=5))


def test_load_workdir_step_dir_and_model_dir(tmp_path, variables, caplog):
    other = perturbed(variables, 0.5)

    workdir = tmp_path / "run"
    with checkpoint.TrainCheckpointer(workdir) as ckpt:
        ckpt.save(
            10,
            sharded_state(variables, 10),
            metadata=step_meta(epoch=1),
            metrics={"val_accuracy": 0.8},
        )
        # A plain {params, batch_stats} host tree is a valid state too.
        ckpt.save(20, other, metadata=step_meta(epoch=2), metrics={"val_accuracy": 0.6})

    with caplog.at_level(logging.WARNING):
        best = model_dir.load(workdir)
    assert "read only" not in caplog.text  # orbax's notice for a read-only manager is dropped
    assert (best.step, best.arch, best.class_names, best.num_classes) == (10, ARCH, CLASSES, 5)
    assert best.metadata["epoch"] == 1
    assert set(best.variables) == {"params", "batch_stats"}
    device = jax.local_devices()[0]
    for leaf in jax.tree.leaves(best.variables):
        assert leaf.sharding == SingleDeviceSharding(device)
    assert_trees_equal(best.variables, variables)
    model = best.model()
    assert model == models.get_model(ARCH, num_classes=5)
    forward = jax.jit(functools.partial(model.apply, train=False))
    x = np.random.default_rng(2).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    logits = forward(best.variables, x)
    assert logits.shape == (2, 5) and np.isfinite(logits).all()
    np.testing.assert_array_equal(logits, forward(jax.device_put(variables, device), x))
    assert best.model(num_classes=None).num_classes is None  # overrides reach get_model

    for loaded in (
        model_dir.load(workdir, which="latest"),
        model_dir.load(workdir, step=20),
        model_dir.load(workdir / "checkpoints" / "20"),
    ):
        assert loaded.step == 20
        assert_trees_equal(loaded.variables, other)

    exported = model_dir.save_model(
        tmp_path / "export",
        arch=ARCH,
        variables=best.variables,
        class_names=CLASSES,
        metadata={"source": "test"},
    )
    from_model_dir = model_dir.load(exported)
    assert from_model_dir.step is None and from_model_dir.class_names == CLASSES
    assert from_model_dir.metadata["source"] == "test"
    assert from_model_dir.metadata["format"] == model_dir.MODEL_FORMAT
    assert_trees_equal(from_model_dir.variables, variables)


def test_load_errors_name_the_path(tmp_path, variables):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing'}: no such file"):
        model_dir.load(tmp_path / "missing")
    (tmp_path / "weights.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="weights.pth is a file"):
        model_dir.load(tmp_path / "weights.pth")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty} has no checkpoints"):
        model_dir.load(empty)
    unrelated = tmp_path / "unrelated"
    (unrelated / "photos" / "7").mkdir(parents=True)
    (unrelated / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match=f"{unrelated} has no checkpoints"):
        model_dir.load(unrelated)
    with pytest.raises(ValueError, match="which must be"):
        model_dir.load(empty, which="first")

    saved = model_dir.save_model(tmp_path / "m", arch=ARCH, variables=variables)
    with pytest.raises(ValueError, match="single checkpoint; step=3"):
        model_dir.load(saved, step=3)
    meta_file = saved / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "arch": "resnet81"}))
    with pytest.raises(ValueError, match=f"{saved}: Unknown arch 'resnet81'"):
        model_dir.load(saved)
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "arch"}))
    with pytest.raises(ValueError, match=f"{saved / 'meta'}: metadata has no 'arch'"):
        model_dir.load(saved)
    meta_file.write_text(json.dumps({**meta, "arch": "resnet34"}))
    with pytest.raises(
        ValueError,
        match=r"do not match resnet34 .*\n  missing \d+ leaves: .*\['batch_stats'\]\['layer1_2'\]",
    ):
        model_dir.load(saved)

    workdir = tmp_path / "run"
    with checkpoint.TrainCheckpointer(workdir) as ckpt:
        ckpt.save(1, variables, metadata=step_meta())
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 2 .*steps: \[1\]"):
        model_dir.load(workdir, step=2)
    assert model_dir.load(workdir).step == 1  # no metrics anywhere: best falls back to latest


def test_check_variables_names_every_problem(variables):
    params = jax.tree.map(np.asarray, variables["params"])  # new dicts: the fixture stays intact
    del params["bn1"]["scale"]
    params["layer2_0"]["conv1"]["kernel"] = np.zeros((1, 1, 64, 128), np.float32)
    params["extra"] = {"w": np.zeros(3)}
    params["layer9_0"] = {"b": np.zeros(2)}
    broken = {**variables, "params": params}
    with pytest.raises(ValueError) as err:
        model_dir.save_model("unused", arch=ARCH, variables=broken)
    assert str(err.value).splitlines() == [
        "save_model(unused): variables do not match resnet18 with num_classes=5:",
        "  missing 1 leaf: ['params']['bn1']['scale']",
        "  unexpected 2 leaves: ['params']['extra']['w'], ['params']['layer9_0']['b']",
        "  wrong shape for ['params']['layer2_0']['conv1']['kernel']: expected (3, 3, 64, 128), "
        "found (1, 1, 64, 128)",
    ]


def test_save_model_validates_and_protects(tmp_path, variables):
    path = tmp_path / "model"
    model_dir.save_model(path, arch=ARCH, variables=variables)
    with pytest.raises(FileExistsError, match="pass force=True"):
        model_dir.save_model(path, arch=ARCH, variables=perturbed(variables, 3.0))
    model_dir.save_model(path, arch=ARCH, variables=perturbed(variables, 3.0), force=True)
    assert_trees_equal(model_dir.load(path).variables, perturbed(variables, 3.0))

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(FileExistsError, match="not a model directory"):
        model_dir.save_model(precious, arch=ARCH, variables=variables, force=True)
    assert (precious / "thesis.tex").read_text() == "do not delete"

    fresh = tmp_path / "fresh"
    with pytest.raises(
        ValueError, match=r"do not match resnet34 with num_classes=5:\n  missing 80 leaves"
    ):
        model_dir.save_model(fresh, arch="resnet34", variables=variables)
    with pytest.raises(ValueError, match="2 class_names for a model with 5 classes"):
        model_dir.save_model(fresh, arch=ARCH, variables=variables, class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"missing \['batch_stats'\]"):
        model_dir.save_model(fresh, arch=ARCH, variables={"params": variables["params"]})
    with pytest.raises(ValueError, match=r"\['arch'\] contradict"):
        model_dir.save_model(fresh, arch=ARCH, variables=variables, metadata={"arch": "resnet50"})
    assert not fresh.exists()


def test_class_names_round_trip_and_errors(tmp_path):
    path = model_dir.write_class_names(tmp_path, CLASSES)
    assert json.loads(path.read_text()) == {str(i): c for i, c in enumerate(CLASSES)}
    assert model_dir.read_class_names(tmp_path) == CLASSES
    assert model_dir.read_class_names(path) == CLASSES
    with pytest.raises(ValueError, match="duplicates"):
        model_dir.write_class_names(tmp_path, ["a", "a"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"0": "a", "2": "b"}))
    with pytest.raises(ValueError, match=f"{bad}: expected an object with keys '0'..'n-1'"):
        model_dir.read_class_names(bad)
    with pytest.raises(FileNotFoundError, match="class names file not found"):
        model_dir.read_class_names(tmp_path / "none")


def test_num_classes_and_stored_preprocessing(tmp_path, variables):
    assert model_dir.num_classes(variables["params"]) == 5
    headless = {k: v for k, v in variables["params"].items() if k != "fc"}
    assert model_dir.num_classes(headless) is None
    # Without a recorded preprocessing: training's validation transform at the recorded size.
    saved = model_dir.save_model(
        tmp_path / "m", arch=ARCH, variables=variables, metadata={"image_size": 48}
    )
    loaded = model_dir.load(saved)
    assert "preprocessing" not in loaded.metadata
    assert loaded.preprocessing == default_preprocessing(48)
    assert loaded.eval_preprocessing().resize_size == 55  # round(48 * 256 / 224)
    bigger = loaded.eval_preprocessing(image_size=64, interpolation="bicubic")
    assert (bigger.eval_size, bigger.crop_pct, bigger.interpolation) == (64, 48 / 55, "bicubic")
    assert loaded.eval_preprocessing(image_size=64, resize_size=64).crop_pct == 1.0
    with pytest.raises(ValueError, match="eval_size must be a positive integer, got 0"):
        loaded.eval_preprocessing(image_size=0)

    # A recorded one round-trips exactly and wins over image_size.
    stored = Preprocessing(40, 1.0, "bicubic", mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    saved = model_dir.save_model(
        tmp_path / "p", arch=ARCH, variables=variables, metadata={"image_size": 48},
        preprocessing=stored,
    )  # fmt: skip
    loaded = model_dir.load(saved)
    assert loaded.metadata["preprocessing"] == stored.to_json()
    assert loaded.preprocessing == stored and loaded.eval_preprocessing() == stored
    assert loaded.eval_preprocessing(image_size=32).resize_size == 32  # crop_pct 1.0 kept
    with pytest.raises(ValueError, match=r"metadata \['preprocessing'\] contradict"):
        model_dir.save_model(
            tmp_path / "q", arch=ARCH, variables=variables, preprocessing=stored,
            metadata={"preprocessing": default_preprocessing(40).to_json()},
        )  # fmt: skip
    with pytest.raises(ValueError, match="metadata preprocessing: interpolation must be one of"):
        model_dir.save_model(
            tmp_path / "q", arch=ARCH, variables=variables,
            metadata={"preprocessing": {**stored.to_json(), "interpolation": "lanczos"}},
        )  # fmt: skip

    # Neither recorded: the size must be given.
    loaded = model_dir.load(model_dir.save_model(tmp_path / "n", arch=ARCH, variables=variables))
    assert loaded.preprocessing is None
    assert loaded.eval_preprocessing(image_size=32) == default_preprocessing(32)
    with pytest.raises(ValueError, match="no image_size or preprocessing; pass the size"):
        loaded.eval_preprocessing()


def test_training_checkpoint_preprocessing_is_read(tmp_path, variables):
    """A training step's metadata carries "preprocessing" (trainer.py writes it); `load` reads
    it from the workdir and the step directory alike, and a malformed one is named."""
    stored = Preprocessing(SIZE, 0.9, "nearest")
    workdir = tmp_path / "run"
    with checkpoint.TrainCheckpointer(workdir) as ckpt:
        meta = {**step_meta(epoch=1), "preprocessing": stored.to_json()}
        ckpt.save(10, variables, metadata=meta, metrics={"val_accuracy": 0.5})
        bad = {**stored.to_json(), "crop_pct": 1.5}
        ckpt.save(20, variables, metadata={**step_meta(epoch=2), "preprocessing": bad})
    for path in (workdir, workdir / "checkpoints" / "10"):
        loaded = model_dir.load(path, which="best")
        assert loaded.step == 10 and loaded.preprocessing == stored
    with pytest.raises(ValueError, match=r"20/meta: metadata preprocessing: crop_pct must be"):
        _ = model_dir.load(workdir, step=20).preprocessing


def test_load_ema_gives_the_moving_average_and_a_clear_error_without_one(tmp_path, variables):
    """A training state with an `ema` (--model-ema): `load(..., ema=True)` returns the
    average's params and BatchNorm statistics, plain `load` the model's; a checkpoint without
    an average says so."""
    average = perturbed(variables, 0.25)
    state = {**variables, "ema": {**average, "n_averaged": np.int32(3)}}
    workdir = tmp_path / "run"
    with checkpoint.TrainCheckpointer(workdir) as ckpt:
        ckpt.save(1, state, metadata=step_meta(epoch=1), metrics={"val_accuracy": 0.5})
    assert_trees_equal(model_dir.load(workdir, ema=True).variables, average)
    assert_trees_equal(model_dir.load(workdir).variables, variables)

    plain = tmp_path / "plain"
    with checkpoint.TrainCheckpointer(plain) as ckpt:
        ckpt.save(1, variables, metadata=step_meta(epoch=1), metrics={"val_accuracy": 0.5})
    with pytest.raises(ValueError, match="has no EMA weights .*--model-ema"):
        model_dir.load(plain, ema=True)
