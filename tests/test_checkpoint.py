"""Checkpointing: round trips, retention, interrupted writes, `load()` and its errors."""

import functools
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint._src.path import atomicity
from test_inference import random_variables

from resnet_jax import checkpoint, models

ARCH = "resnet18"
CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
SIZE = 32


@struct.dataclass
class TrainState:
    """Stand-in with the fields of the trainer's state."""

    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    nonfinite_steps: jax.Array
    nonfinite_streak: jax.Array


@pytest.fixture(scope="module")
def variables() -> dict:
    """Random resnet18 (5 classes) variables as host arrays, without compiling an init: He-scaled
    kernels, BatchNorm scales near 1 and running statistics away from their initial values."""
    return random_variables(models.get_model(ARCH, num_classes=5))


def _perturbed(variables: dict, scale: float) -> dict:
    return jax.tree.map(lambda x: x * scale, variables)


def _sharded_state(variables: dict, step: int) -> TrainState:
    """A TrainState (SGD-momentum trace of 0.5s) laid out over the 4 CPU devices: each leaf
    sharded on its last axis that divides by 4, the rest (scalars, the 5-class bias) replicated.
    Built on the host and placed with one device_put, so nothing is compiled."""
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = jax.tree.map(
        lambda s: np.full(s.shape, 0.5, s.dtype), jax.eval_shape(tx.init, variables["params"])
    )
    state = TrainState(
        step=np.int32(step),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=opt_state,
        nonfinite_steps=np.int32(3),
        nonfinite_streak=np.int32(1),
    )
    mesh = Mesh(np.array(jax.devices()[:4]), ("batch",))

    def sharding(x) -> NamedSharding:
        axes = [a for a in range(np.ndim(x)) if x.shape[a] % 4 == 0]
        return NamedSharding(mesh, P(*[None] * axes[-1], "batch") if axes else P())

    shardings = jax.tree.map(sharding, state)
    return jax.device_put(state, shardings)


def _meta(**extra) -> dict:
    return {"arch": ARCH, "num_classes": 5, "class_names": CLASSES, "image_size": SIZE, **extra}


def _assert_trees_equal(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def _step_dirs(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_round_trip_is_exact_and_keeps_shardings(tmp_path):
    rng = np.random.default_rng(1)
    small = {  # the shape of a model's variables without its size
        "params": {
            "conv1": {"kernel": rng.normal(size=(3, 3, 3, 8)).astype(np.float32)},
            "bn1": {"scale": np.ones(8, np.float32), "bias": rng.normal(size=8).astype(np.float32)},
            "fc": {"kernel": rng.normal(size=(8, 5)).astype(np.float32), "bias": np.zeros(5)},
        },
        "batch_stats": {"bn1": {"mean": rng.normal(size=8), "var": rng.uniform(1, 2, 8)}},
    }
    small = jax.tree.map(lambda x: x.astype(np.float32), small)
    state = _sharded_state(small, step=7)
    expected = jax.device_get(state)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    shardings = jax.tree.map(lambda x: x.sharding, state)

    ckpt = checkpoint.TrainCheckpointer(tmp_path)
    assert ckpt.restore(abstract) is None and ckpt.latest_step() is None
    meta = _meta(epoch=2, config={"lr": np.float32(0.5), "tags": ("a", "b")})
    assert ckpt.save(7, state, metadata=meta, metrics={"val_accuracy": np.float32(0.75)})
    # The async save must already hold its own copy: the trainer donates the state's buffers.
    jax.tree.map(lambda x: x.delete(), state)
    ckpt.close()

    reopened = checkpoint.TrainCheckpointer(tmp_path)
    assert reopened.latest_step() == 7 and reopened.best_step() == 7
    assert reopened.metrics(7) == {"val_accuracy": 0.75}
    restored, restored_meta = reopened.restore(abstract)
    assert isinstance(restored, TrainState)
    assert isinstance(restored.opt_state[0], optax.TraceState)
    _assert_trees_equal(restored, expected)
    assert jax.tree.map(lambda x: x.sharding, restored) == shardings
    assert restored_meta == {**_meta(epoch=2), "config": {"lr": 0.5, "tags": ["a", "b"]}}
    assert reopened.metadata(7) == restored_meta  # without restoring the state
    with pytest.raises(ValueError, match=r"/8/.*unreadable checkpoint metadata"):
        reopened.metadata(8)
    with pytest.raises(FileNotFoundError, match=r"step 8 .*steps: \[7\]"):
        reopened.restore(abstract, step=8)
    wrong = {"params": abstract.params}
    with pytest.raises(ValueError, match="does not match the state template"):
        reopened.restore(wrong)
    reopened.close()


def test_retention_keeps_latest_and_best(tmp_path):
    state = {"w": jnp.arange(4.0)}
    meta = _meta()
    with checkpoint.TrainCheckpointer(tmp_path, max_to_keep=2) as ckpt:
        for step, acc in [(1, 0.2), (2, 0.9), (3, 0.3), (4, 0.4), (5, 0.5)]:
            assert ckpt.save(step, state, metadata=meta, metrics={"val_accuracy": acc})
        assert ckpt.save(6, state, metadata=meta)  # mid-epoch save without metrics
        ckpt.wait()
        assert _step_dirs(tmp_path) == [2, 5, 6]
        assert (ckpt.best_step(), ckpt.latest_step()) == (2, 6)

    with checkpoint.TrainCheckpointer(tmp_path, max_to_keep=2) as ckpt:
        assert (ckpt.all_steps(), ckpt.best_step()) == ([2, 5, 6], 2)  # metrics read back
        assert ckpt.save(7, state, metadata=meta, metrics={"val_accuracy": 0.95})
        ckpt.wait()
        assert _step_dirs(tmp_path) == [6, 7] and ckpt.best_step() == 7

    with pytest.raises(ValueError, match="best_metric='val_accuracy'"):
        checkpoint.TrainCheckpointer(tmp_path, best_metric="val_loss")


def test_retention_without_best_and_save_interval(tmp_path):
    state = {"w": jnp.arange(4.0)}
    with checkpoint.TrainCheckpointer(tmp_path, max_to_keep=2, keep_best=False) as ckpt:
        for step, acc in [(1, 0.9), (2, 0.1), (3, 0.2)]:
            ckpt.save(step, state, metadata=_meta(), metrics={"val_accuracy": acc})
        ckpt.wait()
        assert _step_dirs(tmp_path) == [2, 3]

    workdir = tmp_path / "interval"
    with checkpoint.TrainCheckpointer(workdir, save_interval_steps=5) as ckpt:
        saved = [s for s in range(12) if ckpt.save(s, state, metadata=_meta())]
        assert saved == [0, 5, 10]
        assert ckpt.save(11, state, metadata=_meta(), force=True)
        assert not ckpt.save(11, state, metadata=_meta())  # not after the latest: skipped
        ckpt.wait()
        assert _step_dirs(workdir) == [5, 10, 11]


def test_save_validates_metadata_and_metrics(tmp_path):
    state = {"w": jnp.arange(4.0)}
    with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="'arch'"):
            ckpt.save(1, state, metadata={"epoch": 1})
        with pytest.raises(ValueError, match="Did you mean 'resnet18'"):
            ckpt.save(1, state, metadata={"arch": "resnet81"})
        with pytest.raises(ValueError, match="lack best_metric 'val_accuracy'"):
            ckpt.save(1, state, metadata=_meta(), metrics={"train_loss": 1.0})
        with pytest.raises(TypeError, match="metadata must be JSON-serialisable"):
            ckpt.save(1, state, metadata=_meta(bad=object()))
        with pytest.raises(TypeError, match=r"metrics\['val_accuracy'\] must be a number"):
            ckpt.save(1, state, metadata=_meta(), metrics={"val_accuracy": "high"})
        with pytest.raises(TypeError):
            ckpt.save(1.5, state, metadata=_meta())
        assert ckpt.latest_step() is None


def test_interrupted_write_is_never_picked(tmp_path, variables, monkeypatch):
    ckpt = checkpoint.TrainCheckpointer(tmp_path)
    ckpt.save(1, variables, metadata=_meta(), metrics={"val_accuracy": 0.5})
    ckpt.wait()

    # Everything written, then the process "dies" before orbax's final rename.
    async def crash(*args, **kwargs):
        raise OSError("simulated crash before the atomic rename")

    monkeypatch.setattr(atomicity.async_path, "rename", crash)
    ckpt.save(2, _perturbed(variables, 2.0), metadata=_meta(), metrics={"val_accuracy": 0.9})
    with pytest.raises(OSError, match="simulated crash"):
        ckpt.wait()
    monkeypatch.undo()
    assert ckpt.latest_step() == 1
    ckpt.close()  # the failure was reported once; closing is clean
    # A second, hand-made leftover: a partially written step with a truncated file.
    partial = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "_METADATA").write_text('{"tree_metad')
    leftovers = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if "tmp" in p.name)
    assert leftovers == ["2.orbax-checkpoint-tmp", "3.orbax-checkpoint-tmp"]

    for where, which in ((tmp_path, "best"), (tmp_path / "checkpoints", "latest")):
        loaded = checkpoint.load(where, which=which)
        assert loaded.step == 1
        _assert_trees_equal(loaded.variables, variables)
    with pytest.raises(ValueError, match="unfinished checkpoint"):
        checkpoint.load(partial)

    reopened = checkpoint.TrainCheckpointer(tmp_path)
    assert (reopened.all_steps(), reopened.best_step()) == ([1], 1)
    restored, _ = reopened.restore(variables)
    _assert_trees_equal(restored, variables)
    reopened.save(4, variables, metadata=_meta())
    reopened.close()
    assert _step_dirs(tmp_path) == [1, 4]
    assert not any("tmp" in p.name for p in (tmp_path / "checkpoints").iterdir())  # cleaned up


def test_load_workdir_step_dir_and_model_dir(tmp_path, variables, caplog):
    other = _perturbed(variables, 0.5)

    workdir = tmp_path / "run"
    with checkpoint.TrainCheckpointer(workdir) as ckpt:
        ckpt.save(
            10,
            _sharded_state(variables, 10),
            metadata=_meta(epoch=1),
            metrics={"val_accuracy": 0.8},
        )
        # A plain {params, batch_stats} host tree is a valid state too.
        ckpt.save(20, other, metadata=_meta(epoch=2), metrics={"val_accuracy": 0.6})

    with caplog.at_level(logging.WARNING):
        best = checkpoint.load(workdir)
    assert "read only" not in caplog.text  # orbax's notice for a read-only manager is dropped
    assert (best.step, best.arch, best.class_names, best.num_classes) == (10, ARCH, CLASSES, 5)
    assert best.metadata["epoch"] == 1
    assert set(best.variables) == {"params", "batch_stats"}
    device = jax.local_devices()[0]
    for leaf in jax.tree.leaves(best.variables):
        assert leaf.sharding == SingleDeviceSharding(device)
    _assert_trees_equal(best.variables, variables)
    model = best.model()
    assert model == models.get_model(ARCH, num_classes=5)
    forward = jax.jit(functools.partial(model.apply, train=False))
    x = np.random.default_rng(2).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    logits = forward(best.variables, x)
    assert logits.shape == (2, 5) and np.isfinite(logits).all()
    np.testing.assert_array_equal(logits, forward(jax.device_put(variables, device), x))
    assert best.model(num_classes=None).num_classes is None  # overrides reach get_model

    for loaded in (
        checkpoint.load(workdir, which="latest"),
        checkpoint.load(workdir, step=20),
        checkpoint.load(workdir / "checkpoints" / "20"),
    ):
        assert loaded.step == 20
        _assert_trees_equal(loaded.variables, other)

    exported = checkpoint.save_model(
        tmp_path / "export",
        arch=ARCH,
        variables=best.variables,
        class_names=CLASSES,
        metadata={"source": "test"},
    )
    from_model_dir = checkpoint.load(exported)
    assert from_model_dir.step is None and from_model_dir.class_names == CLASSES
    assert from_model_dir.metadata["source"] == "test"
    assert from_model_dir.metadata["format"] == checkpoint.MODEL_FORMAT
    _assert_trees_equal(from_model_dir.variables, variables)


def test_relative_workdir_saves_and_loads(tmp_path, variables, monkeypatch):
    """`--workdir runs/x` (relative, the trainer's default) must work: orbax wants absolute
    paths, so the checkpointer and `load` resolve them against the current directory."""
    monkeypatch.chdir(tmp_path)
    with checkpoint.TrainCheckpointer("runs/rel") as ckpt:
        assert ckpt.directory.is_absolute()
        ckpt.save(3, variables, metadata=_meta(epoch=0), metrics={"val_accuracy": 0.5})
    assert (tmp_path / "runs" / "rel" / "checkpoints" / "3").is_dir()
    for path in ("runs/rel", "runs/rel/checkpoints", "runs/rel/checkpoints/3"):
        loaded = checkpoint.load(path)
        assert loaded.step == 3
        _assert_trees_equal(loaded.variables, variables)


def test_load_errors_name_the_path(tmp_path, variables):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing'}: no such file"):
        checkpoint.load(tmp_path / "missing")
    (tmp_path / "weights.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="weights.pth is a file"):
        checkpoint.load(tmp_path / "weights.pth")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty} has no checkpoints"):
        checkpoint.load(empty)
    unrelated = tmp_path / "unrelated"
    (unrelated / "photos" / "7").mkdir(parents=True)
    (unrelated / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match=f"{unrelated} has no checkpoints"):
        checkpoint.load(unrelated)
    with pytest.raises(ValueError, match="which must be"):
        checkpoint.load(empty, which="first")

    model_dir = checkpoint.save_model(tmp_path / "m", arch=ARCH, variables=variables)
    with pytest.raises(ValueError, match="single checkpoint; step=3"):
        checkpoint.load(model_dir, step=3)
    meta_file = model_dir / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "arch": "resnet81"}))
    with pytest.raises(ValueError, match=f"{model_dir}: Unknown arch 'resnet81'"):
        checkpoint.load(model_dir)
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "arch"}))
    with pytest.raises(ValueError, match=f"{model_dir / 'meta'}: metadata has no 'arch'"):
        checkpoint.load(model_dir)
    meta_file.write_text(json.dumps({**meta, "arch": "resnet34"}))
    with pytest.raises(
        ValueError,
        match=r"do not match resnet34 .*\n  missing \d+ leaves: .*\['batch_stats'\]\['layer1_2'\]",
    ):
        checkpoint.load(model_dir)

    workdir = tmp_path / "run"
    with checkpoint.TrainCheckpointer(workdir) as ckpt:
        ckpt.save(1, variables, metadata=_meta())
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 2 .*steps: \[1\]"):
        checkpoint.load(workdir, step=2)
    assert checkpoint.load(workdir).step == 1  # no metrics anywhere: best falls back to latest


def test_check_variables_names_every_problem(variables):
    params = jax.tree.map(np.asarray, variables["params"])  # new dicts: the fixture stays intact
    del params["bn1"]["scale"]
    params["layer2_0"]["conv1"]["kernel"] = np.zeros((1, 1, 64, 128), np.float32)
    params["extra"] = {"w": np.zeros(3)}
    params["layer9_0"] = {"b": np.zeros(2)}
    broken = {**variables, "params": params}
    with pytest.raises(ValueError) as err:
        checkpoint.save_model("unused", arch=ARCH, variables=broken)
    assert str(err.value).splitlines() == [
        "save_model(unused): variables do not match resnet18 with num_classes=5:",
        "  missing 1 leaf: ['params']['bn1']['scale']",
        "  unexpected 2 leaves: ['params']['extra']['w'], ['params']['layer9_0']['b']",
        "  wrong shape for ['params']['layer2_0']['conv1']['kernel']: expected (3, 3, 64, 128), "
        "found (1, 1, 64, 128)",
    ]


def test_save_model_validates_and_protects(tmp_path, variables):
    path = tmp_path / "model"
    checkpoint.save_model(path, arch=ARCH, variables=variables)
    with pytest.raises(FileExistsError, match="pass force=True"):
        checkpoint.save_model(path, arch=ARCH, variables=_perturbed(variables, 3.0))
    checkpoint.save_model(path, arch=ARCH, variables=_perturbed(variables, 3.0), force=True)
    _assert_trees_equal(checkpoint.load(path).variables, _perturbed(variables, 3.0))

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(FileExistsError, match="not a model directory"):
        checkpoint.save_model(precious, arch=ARCH, variables=variables, force=True)
    assert (precious / "thesis.tex").read_text() == "do not delete"

    fresh = tmp_path / "fresh"
    with pytest.raises(
        ValueError, match=r"do not match resnet34 with num_classes=5:\n  missing 80 leaves"
    ):
        checkpoint.save_model(fresh, arch="resnet34", variables=variables)
    with pytest.raises(ValueError, match="2 class_names for a model with 5 classes"):
        checkpoint.save_model(fresh, arch=ARCH, variables=variables, class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"missing \['batch_stats'\]"):
        checkpoint.save_model(fresh, arch=ARCH, variables={"params": variables["params"]})
    with pytest.raises(ValueError, match=r"\['arch'\] contradict"):
        checkpoint.save_model(fresh, arch=ARCH, variables=variables, metadata={"arch": "resnet50"})
    assert not fresh.exists()


def test_unwritable_workdir_fails_at_construction(tmp_path):
    # Root ignores permission bits, so make the directory impossible rather than forbidden.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError, match=f"{blocker / 'run' / 'checkpoints'} cannot be created"):
        checkpoint.TrainCheckpointer(blocker / "run")


def test_class_names_round_trip_and_errors(tmp_path):
    path = checkpoint.write_class_names(tmp_path, CLASSES)
    assert json.loads(path.read_text()) == {str(i): c for i, c in enumerate(CLASSES)}
    assert checkpoint.read_class_names(tmp_path) == CLASSES
    assert checkpoint.read_class_names(path) == CLASSES
    with pytest.raises(ValueError, match="duplicates"):
        checkpoint.write_class_names(tmp_path, ["a", "a"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"0": "a", "2": "b"}))
    with pytest.raises(ValueError, match=f"{bad}: expected an object with keys '0'..'n-1'"):
        checkpoint.read_class_names(bad)
    with pytest.raises(FileNotFoundError, match="class names file not found"):
        checkpoint.read_class_names(tmp_path / "none")


def test_nan_metric_is_never_best(tmp_path):
    state = {"w": jnp.arange(4.0)}
    with checkpoint.TrainCheckpointer(tmp_path, max_to_keep=1) as ckpt:
        ckpt.save(1, state, metadata=_meta(), metrics={"val_accuracy": 0.5})
        ckpt.save(2, state, metadata=_meta(), metrics={"val_accuracy": float("nan")})
        assert ckpt.best_step() == 1
        ckpt.save(3, state, metadata=_meta())
        ckpt.wait()
        assert _step_dirs(tmp_path) == [1, 3]
