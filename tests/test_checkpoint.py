"""Training checkpoints (`TrainCheckpointer`): round trips, retention, interrupted writes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint._src.path import atomicity
from test_inference import random_variables

from resnet_jax import checkpoint, model_dir, models

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


def perturbed(variables: dict, scale: float) -> dict:
    return jax.tree.map(lambda x: x * scale, variables)


def sharded_state(variables: dict, step: int) -> TrainState:
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


def step_meta(**extra) -> dict:
    return {"arch": ARCH, "num_classes": 5, "class_names": CLASSES, "image_size": SIZE, **extra}


def assert_trees_equal(actual, expected) -> None:
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
    state = sharded_state(small, step=7)
    expected = jax.device_get(state)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    shardings = jax.tree.map(lambda x: x.sharding, state)

    ckpt = checkpoint.TrainCheckpointer(tmp_path)
    assert ckpt.restore(abstract) is None and ckpt.latest_step() is None
    meta = step_meta(epoch=2, config={"lr": np.float32(0.5), "tags": ("a", "b")})
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
    assert_trees_equal(restored, expected)
    assert jax.tree.map(lambda x: x.sharding, restored) == shardings
    assert restored_meta == {**step_meta(epoch=2), "config": {"lr": 0.5, "tags": ["a", "b"]}}
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
    meta = step_meta()
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
            ckpt.save(step, state, metadata=step_meta(), metrics={"val_accuracy": acc})
        ckpt.wait()
        assert _step_dirs(tmp_path) == [2, 3]

    workdir = tmp_path / "interval"
    with checkpoint.TrainCheckpointer(workdir, save_interval_steps=5) as ckpt:
        saved = [s for s in range(12) if ckpt.save(s, state, metadata=step_meta())]
        assert saved == [0, 5, 10]
        assert ckpt.save(11, state, metadata=step_meta(), force=True)
        assert not ckpt.save(11, state, metadata=step_meta())  # not after the latest: skipped
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
            ckpt.save(1, state, metadata=step_meta(), metrics={"train_loss": 1.0})
        with pytest.raises(TypeError, match="metadata must be JSON-serialisable"):
            ckpt.save(1, state, metadata=step_meta(bad=object()))
        with pytest.raises(TypeError, match=r"metrics\['val_accuracy'\] must be a number"):
            ckpt.save(1, state, metadata=step_meta(), metrics={"val_accuracy": "high"})
        with pytest.raises(TypeError):
            ckpt.save(1.5, state, metadata=step_meta())
        assert ckpt.latest_step() is None


def test_interrupted_write_is_never_picked(tmp_path, variables, monkeypatch):
    ckpt = checkpoint.TrainCheckpointer(tmp_path)
    ckpt.save(1, variables, metadata=step_meta(), metrics={"val_accuracy": 0.5})
    ckpt.wait()

    # Everything written, then the process "dies" before orbax's final rename.
    async def crash(*args, **kwargs):
        raise OSError("simulated crash before the atomic rename")

    monkeypatch.setattr(atomicity.async_path, "rename", crash)
    ckpt.save(2, perturbed(variables, 2.0), metadata=step_meta(), metrics={"val_accuracy": 0.9})
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
        loaded = model_dir.load(where, which=which)
        assert loaded.step == 1
        assert_trees_equal(loaded.variables, variables)
    with pytest.raises(ValueError, match="unfinished checkpoint"):
        model_dir.load(partial)

    reopened = checkpoint.TrainCheckpointer(tmp_path)
    assert (reopened.all_steps(), reopened.best_step()) == ([1], 1)
    restored, _ = reopened.restore(variables)
    assert_trees_equal(restored, variables)
    reopened.save(4, variables, metadata=step_meta())
    reopened.close()
    assert _step_dirs(tmp_path) == [1, 4]
    assert not any("tmp" in p.name for p in (tmp_path / "checkpoints").iterdir())  # cleaned up


def test_relative_workdir_saves_and_loads(tmp_path, variables, monkeypatch):
    """`--workdir runs/x` (relative, the trainer's default) must work: orbax wants absolute
    paths, so the checkpointer and `load` resolve them against the current directory."""
    monkeypatch.chdir(tmp_path)
    with checkpoint.TrainCheckpointer("runs/rel") as ckpt:
        assert ckpt.directory.is_absolute()
        ckpt.save(3, variables, metadata=step_meta(epoch=0), metrics={"val_accuracy": 0.5})
    assert (tmp_path / "runs" / "rel" / "checkpoints" / "3").is_dir()
    for path in ("runs/rel", "runs/rel/checkpoints", "runs/rel/checkpoints/3"):
        loaded = model_dir.load(path)
        assert loaded.step == 3
        assert_trees_equal(loaded.variables, variables)


def test_unwritable_workdir_fails_at_construction(tmp_path):
    # Root ignores permission bits, so make the directory impossible rather than forbidden.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError, match=f"{blocker / 'run' / 'checkpoints'} cannot be created"):
        checkpoint.TrainCheckpointer(blocker / "run")


def test_nan_metric_is_never_best(tmp_path):
    state = {"w": jnp.arange(4.0)}
    with checkpoint.TrainCheckpointer(tmp_path, max_to_keep=1) as ckpt:
        ckpt.save(1, state, metadata=step_meta(), metrics={"val_accuracy": 0.5})
        ckpt.save(2, state, metadata=step_meta(), metrics={"val_accuracy": float("nan")})
        assert ckpt.best_step() == 1
        ckpt.save(3, state, metadata=step_meta())
        ckpt.wait()
        assert _step_dirs(tmp_path) == [1, 3]
