"""Training library: data-parallel equivalence, non-finite skipping, optimizer masks, schedule,
losses and eval sums. Uses a one-block-per-stage ResNet at 32 px to keep compiles cheap."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from resnet_jax import mixing, models, optim, parallel, steps
from resnet_jax.preprocessing import normalize_images

NUM_CLASSES = 5
GLOBAL_BATCH = 8
tiny = functools.partial(
    models.ResNet,
    stage_sizes=(1, 1, 1, 1),
    block_cls=models.BasicBlock,
    num_classes=NUM_CLASSES,
)


def _random_variables(model: models.ResNet, seed: int = 0) -> dict:
    """He-scaled random variables from shapes alone: no compiled init (seconds saved per test).

    Biases and BatchNorm scales are random too, so a decay wrongly applied to them shows.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape) * std).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return (rng.standard_normal(leaf.shape) * 0.1).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, models.variable_shapes(model))


def _batch(seed: int, n: int = GLOBAL_BATCH) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.standard_normal((n, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, NUM_CLASSES, n).astype(np.int32),
    }


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _trees_equal(a, b) -> bool:
    """Same structure and bit-identical leaves."""
    equal = jax.tree.map(np.array_equal, _host(a), _host(b))
    return all(jax.tree.leaves(equal))


SCHEDULE = optim.learning_rate_schedule(
    global_batch_size=GLOBAL_BATCH, steps_per_epoch=4, epochs=3, warmup_epochs=0.5
)


@pytest.fixture(scope="module")
def setup():
    """Initial state, optimizer, and the three compiled train steps (shared across tests)."""
    tx = optim.create_optimizer(schedule=SCHEDULE)
    state = steps.create_train_state(_random_variables(tiny()), tx)
    mesh = parallel.make_mesh()
    sharded = tiny(axis_name="batch")
    step_fns = {
        "single": jax.jit(steps.make_train_step(tiny(), tx, schedule=SCHEDULE, axis_name=None)),
        "shard_map": parallel.parallelize(
            steps.make_train_step(sharded, tx, schedule=SCHEDULE), mesh
        ),
        "pmap": parallel.parallelize(
            steps.make_train_step(sharded, tx, schedule=SCHEDULE), mesh, kind="pmap"
        ),
    }
    return {"state": _host(state), "mesh": mesh, "steps": step_fns}


def _run(setup, kind, batches, state=None):
    """Run `batches` through one step kind from `state`; host state and last metrics back."""
    step, mesh = setup["steps"][kind], setup["mesh"]
    state = setup["state"] if state is None else state
    if kind == "single":
        metrics = None
        for b in batches:
            state, metrics = step(state, b)
        return _host(state), _host(metrics)
    state = parallel.place_state(state, mesh, kind)
    for b in batches:
        state, metrics = step(state, parallel.prepare_batch(b, mesh, kind))
    return parallel.fetch_state(state, kind), parallel.fetch_state(metrics, kind)


@pytest.mark.parametrize("kind", ["shard_map", "pmap"])
def test_data_parallel_step_matches_single_device(setup, kind):
    assert len(jax.devices()) == 4
    batches = [_batch(1), _batch(2)]
    want_state, want_metrics = _run(setup, "single", batches)
    got_state, got_metrics = _run(setup, kind, batches)
    # Not bit-exact: BatchNorm moments and gradient sums are reduced per device and then
    # averaged across devices, a different float32 summation order than one device's.
    np.testing.assert_array_equal(got_state.step, 2)
    for part in ("params", "batch_stats", "opt_state"):
        jax.tree.map(
            functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
            getattr(got_state, part),
            getattr(want_state, part),
        )
    # The update really happened (the test would otherwise pass trivially).
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), want_state.params, setup["state"].params)
    assert max(jax.tree.leaves(moved)) > 1e-3
    for key in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=1e-5)
    np.testing.assert_allclose(got_metrics["learning_rate"], SCHEDULE(1), rtol=1e-6)
    assert got_metrics["nonfinite"] == 0


def test_nonfinite_step_is_skipped_on_every_replica(setup):
    poisoned = _batch(3)
    poisoned["image"][5, 3, 3, 1] = np.nan  # only the third device's shard sees it
    before = setup["state"]
    mid, metrics = _run(setup, "shard_map", [poisoned, poisoned])
    assert metrics["nonfinite"] == 1
    assert not np.isfinite(metrics["loss"])
    np.testing.assert_array_equal([mid.step, mid.nonfinite_steps, mid.nonfinite_streak], [2, 2, 2])
    for part in ("params", "batch_stats", "opt_state"):
        assert _trees_equal(getattr(mid, part), getattr(before, part)), part

    after, metrics = _run(setup, "shard_map", [_batch(4)], state=mid)
    assert metrics["nonfinite"] == 0
    np.testing.assert_array_equal(
        [after.step, after.nonfinite_steps, after.nonfinite_streak], [3, 2, 0]
    )
    # The learning rate follows the optimizer's count (applied updates), not the raw step; it is
    # 0 for that first update (warmup starts at 0), so look at statistics and momentum instead.
    np.testing.assert_allclose(metrics["learning_rate"], SCHEDULE(0))
    for part in ("batch_stats", "opt_state"):
        assert not _trees_equal(getattr(after, part), getattr(before, part)), part


@pytest.mark.parametrize("kind", ["shard_map", "pmap"])
def test_eval_step_sums_ignore_padding(setup, kind):
    model = tiny()
    variables = _random_variables(model, seed=1)
    batch = _batch(5)
    batch["mask"] = np.array([1, 1, 0, 1, 1, 1, 0, 0], bool)
    batch["image"][~batch["mask"]] = np.nan  # padding content must not leak into the sums
    logits = np.asarray(jax.jit(model.apply)(variables, batch["image"]), np.float64)

    mesh = setup["mesh"]
    step = parallel.parallelize(
        steps.make_eval_step(tiny(axis_name="batch")),
        mesh,
        kind=kind,
        donate=False,
        out_specs=parallel.EVAL_OUT_SPECS,
    )
    sums, predictions = step(
        parallel.place_state(variables, mesh, kind), parallel.prepare_batch(batch, mesh, kind)
    )
    sums, predictions = parallel.fetch_state(sums, kind), parallel.fetch_batch(predictions, kind)

    keep = batch["mask"]
    real, labels = logits[keep], batch["label"][keep]
    shifted = real - real.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    np.testing.assert_allclose(sums["loss"], -log_probs[np.arange(5), labels].sum(), rtol=1e-5)
    ranks = (real > real[np.arange(5), labels][:, None]).sum(1)
    assert sums["count"] == 5
    assert sums["correct_top1"] == (ranks == 0).sum()
    assert sums["correct_top5"] == 5  # 5 classes: every label is in the top 5
    np.testing.assert_array_equal(predictions[keep], real.argmax(1))
    assert predictions.shape == (GLOBAL_BATCH,)


def _uint8_batch(seed: int, n: int = GLOBAL_BATCH) -> dict:
    """A batch of random uint8 pixels, as `data.train_batches(normalize=False)` yields."""
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
        "label": rng.integers(0, NUM_CLASSES, n).astype(np.int32),
    }


# shard_map only with the slow tests: the normalisation is the same traced function inside it,
# and every fit test in test_train_cli.py trains on uint8 batches under shard_map.
@pytest.mark.parametrize("kind", ["single", pytest.param("shard_map", marks=pytest.mark.slow)])
def test_uint8_batch_is_normalised_on_device(setup, kind):
    pixels = [_uint8_batch(6), _uint8_batch(7)]
    normalised = [{**b, "image": np.asarray(normalize_images(b["image"]))} for b in pixels]
    want_state, want_metrics = _run(setup, kind, normalised)
    got_state, got_metrics = _run(setup, kind, pixels)
    # What the model computes from its input must agree: loss and metrics, the BatchNorm running
    # statistics (a wrong scale or offset moves them far) and, below, eval logits. Not the
    # gradients: XLA may round the normalisation inside the step a few float32 ulps away from the
    # host's (depending on its version), and in this tiny net that alone can flip a ReLU or a
    # max-pool choice within round-off of its threshold, moving one kernel's gradient by ~0.1
    # (seen with jax 0.8.2, and with 0.10.2 for inputs nudged by 2 ulps).
    close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5)
    jax.tree.map(close, got_state.batch_stats, want_state.batch_stats)
    jax.tree.map(close, got_metrics, want_metrics)
    np.testing.assert_array_equal(got_state.step, 2)
    assert got_metrics["loss"] > 0 and got_metrics["nonfinite"] == 0

    model = tiny()
    variables = {"params": want_state.params, "batch_stats": want_state.batch_stats}
    eval_step = jax.jit(steps.make_eval_step(model, axis_name=None))
    jax.tree.map(close, eval_step(variables, pixels[0]), eval_step(variables, normalised[0]))


def test_image_dtype_neither_uint8_nor_float_is_an_error(setup):
    ints = {**_batch(0), "image": np.zeros((GLOBAL_BATCH, 32, 32, 3), np.int32)}
    with pytest.raises(ValueError, match=r"uint8 .* or floating .*got dtype int32"):
        setup["steps"]["single"](setup["state"], ints)
    state = setup["state"]
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    with pytest.raises(ValueError, match="got dtype int32"):
        steps.make_eval_step(tiny(), axis_name=None)(variables, ints)


def test_bfloat16_step_keeps_float32_params_and_loss():
    model = tiny(dtype=jnp.bfloat16)
    tx = optim.create_optimizer(schedule=0.01)
    state = steps.create_train_state(_random_variables(model), tx)
    new, metrics = jax.jit(steps.make_train_step(model, tx, axis_name=None))(state, _batch(6))
    assert metrics["loss"].dtype == jnp.float32 and np.isfinite(metrics["loss"])
    assert metrics["nonfinite"] == 0
    dtypes = {x.dtype for x in jax.tree.leaves((new.params, new.batch_stats))}
    assert dtypes == {jnp.dtype(jnp.float32)}
    assert not np.array_equal(new.params["conv1"]["kernel"], state.params["conv1"]["kernel"])


def _params():
    return _random_variables(tiny())["params"]


def _path_name(path) -> str:
    return path[-1].key


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weight_decay_only_touches_kernels(name):
    params = _params()
    tx = optim.create_optimizer(name=name, schedule=1.0, weight_decay=0.1, momentum=0.0)
    zero_grads = jax.tree.map(np.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zero_grads, jax.jit(tx.init)(params), params)

    def check(path, old, upd):
        if _path_name(path) == "kernel":
            # Both decay by lr * wd * p here (Adam's own step is zero for zero gradients).
            np.testing.assert_allclose(old + upd, old * 0.9, rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(upd, 0.0)

    jax.tree_util.tree_map_with_path(check, params, updates)
    names = {_path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    assert names == {"kernel", "scale", "bias"}  # conv/dense kernels, BN params, fc bias


def test_frozen_and_head_labels():
    params = _params()

    def label(path, _):
        top = path[0].key
        return "frozen" if top in ("conv1", "bn1") else "head" if top == "fc" else "train"

    labels = jax.tree_util.tree_map_with_path(label, params)
    grads = jax.tree.map(lambda p: np.full_like(p, 0.5), params)
    kwargs = {"schedule": optax.constant_schedule(0.1), "weight_decay": 1e-2}
    tx = optim.create_optimizer(param_labels=labels, head_lr_multiplier=10.0, **kwargs)
    plain = optim.create_optimizer(**kwargs)
    opt_state = jax.jit(tx.init)(params)
    updates, _ = jax.jit(tx.update)(grads, opt_state, params)
    want, _ = jax.jit(plain.update)(grads, jax.jit(plain.init)(params), params)

    def check(path, lab, upd, ref):
        if lab == "frozen":
            np.testing.assert_array_equal(upd, 0.0)
        else:
            scale = 10.0 if lab == "head" else 1.0
            np.testing.assert_allclose(upd, scale * ref, rtol=1e-6)

    jax.tree_util.tree_map_with_path(check, labels, updates, want)
    new = optax.apply_updates(params, updates)
    assert _trees_equal(new["conv1"], params["conv1"])
    assert _trees_equal(new["bn1"], params["bn1"])
    # Momentum is kept only for trainable params: the frozen stem adds no optimizer state.
    trainable = sum(
        x.size
        for x, lab in zip(jax.tree.leaves(params), jax.tree.leaves(labels), strict=True)
        if lab != "frozen"
    )
    floats = [x for x in jax.tree.leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert sum(x.size for x in floats) == trainable


def test_optimizer_argument_errors():
    with pytest.raises(ValueError, match="'lamb'.*sgd, adamw"):
        optim.create_optimizer(name="lamb", schedule=0.1)
    with pytest.raises(ValueError, match="param_labels"):
        optim.create_optimizer(schedule=0.1, head_lr_multiplier=10.0)
    params = _params()
    bad = jax.tree.map(lambda _: "freeze", params)
    with pytest.raises(ValueError, match="unknown labels \\['freeze'\\]"):
        optim.create_optimizer(schedule=0.1, param_labels=bad)
    partial_labels = {k: jax.tree.map(lambda _: "train", v) for k, v in params.items() if k != "fc"}
    tx = optim.create_optimizer(schedule=0.1, param_labels=partial_labels)
    with pytest.raises(ValueError, match="missing labels for.*fc"):
        tx.init(params)


def test_schedule_warmup_then_cosine():
    sched = optim.learning_rate_schedule(
        base_lr=0.1, global_batch_size=512, steps_per_epoch=10, epochs=10, warmup_epochs=2
    )
    peak = 0.1 * 512 / 256
    at = np.array([0, 10, 20, 60, 100])
    want = [0.0, peak / 2, peak, peak / 2, 0.0]  # warmup ends at 20; cosine midpoint at 60
    np.testing.assert_allclose([sched(s) for s in at], want, rtol=1e-5, atol=1e-7)
    no_warmup = optim.learning_rate_schedule(
        global_batch_size=256, steps_per_epoch=5, epochs=2, warmup_epochs=0
    )
    np.testing.assert_allclose(no_warmup(0), 0.1)
    with pytest.raises(ValueError, match="warmup_epochs"):
        optim.learning_rate_schedule(
            global_batch_size=256, steps_per_epoch=5, epochs=2, warmup_epochs=3
        )


def test_cross_entropy_label_smoothing_by_hand():
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], np.float32)
    labels = np.array([0, 1])
    eps, k = 0.1, 3
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    targets = np.full((2, k), eps / k)
    targets[np.arange(2), labels] += 1 - eps
    per_example = -(targets * log_p).sum(1)
    got = steps.cross_entropy_loss(
        jnp.asarray(logits, jnp.bfloat16), labels, num_classes=k, label_smoothing=eps
    )
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, per_example.mean(), rtol=2e-2)  # bf16 logits
    exact = steps.cross_entropy_loss(logits, labels, num_classes=k, label_smoothing=eps)
    np.testing.assert_allclose(exact, per_example.mean(), rtol=1e-6)
    masked = steps.cross_entropy_loss(
        logits, labels, num_classes=k, label_smoothing=eps, mask=np.array([0, 1])
    )
    np.testing.assert_allclose(masked, per_example[1], rtol=1e-6)
    with pytest.raises(ValueError, match="expected 4"):
        steps.cross_entropy_loss(logits, labels, num_classes=4)


def test_batch_not_divisible_by_devices(setup):
    with pytest.raises(ValueError, match="--batch-size 10 is not divisible by the number of dev"):
        parallel.check_divisible("--batch-size", 10, 4)
    with pytest.raises(ValueError, match="--batch-size 0 .*use a positive multiple of 4"):
        parallel.check_divisible("--batch-size", 0, 4)
    parallel.check_divisible("--batch-size", 12, 4)
    with pytest.raises(ValueError, match="batch size 6 .* number of devices 4"):
        parallel.prepare_batch(_batch(0, n=6), setup["mesh"])
    ragged = {"image": np.zeros((8, 2, 2, 3)), "label": np.zeros(4)}
    with pytest.raises(ValueError, match="leading batch dimension"):
        parallel.prepare_batch(ragged, setup["mesh"], kind="pmap")
    with pytest.raises(ValueError, match="'xmap'.*shard_map, pmap"):
        parallel.parallelize(lambda s, b: (s, b), setup["mesh"], kind="xmap")


def test_model_axis_name_must_be_none_or_the_steps_axis():
    tx = optim.create_optimizer(schedule=0.1)
    with pytest.raises(ValueError, match="axis_name is 'other' but the step maps over 'batch'"):
        steps.make_train_step(tiny(axis_name="other"), tx)
    steps.make_train_step(tiny(), tx)  # per-replica BatchNorm under a mapped step
    with pytest.raises(ValueError, match="num_classes"):
        steps.make_eval_step(tiny(num_classes=None), axis_name=None)


def test_without_sync_each_device_normalises_with_its_own_batch(setup):
    """Model axis_name None under a 4-device step: each device's running statistics update is
    its own batch's (they differ), and the stored running statistics are their mean."""
    tx = optim.create_optimizer(schedule=SCHEDULE)
    step = parallel.parallelize(steps.make_train_step(tiny(), tx, schedule=SCHEDULE), setup["mesh"])
    batch = _batch(3)
    batch["image"][:2] += 1.0  # device 0's images: a clearly different batch mean
    state = setup["state"]
    new_state, _ = step(
        parallel.place_state(state, setup["mesh"]), parallel.prepare_batch(batch, setup["mesh"])
    )
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    own = [
        tiny().apply(variables, batch["image"][i : i + 2], train=True, mutable=["batch_stats"])[1]
        for i in range(0, GLOBAL_BATCH, 2)
    ]
    means = [u["batch_stats"]["bn1"]["mean"] for u in own]
    assert np.abs(means[0] - means[1]).max() > 0.01  # each device's statistics are its own
    want = jax.tree.map(lambda *u: np.mean(u, axis=0), *[u["batch_stats"] for u in own])
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
        parallel.fetch_state(new_state.batch_stats),
        want,
    )


def _collectives(text: str) -> dict[str, int]:
    ops = ("all_reduce", "all_gather", "reduce_scatter", "collective_permute", "all_to_all")
    return {op: text.count(f"stablehlo.{op}") for op in ops}


def test_collectives_in_the_resnet18_train_step(setup):
    """The lowered 4-device resnet18 step: 62 gradient + 2 metric all-reduces, plus per
    BatchNorm layer (20) one all_gather forward and one all_reduce backward with synchronised
    BatchNorm, or none per layer and one all-reduce of all running statistics without."""
    tx = optim.create_optimizer(schedule=0.1)
    batch = parallel.prepare_batch(_batch(0), setup["mesh"])
    counts = {}
    for sync in (True, False):
        model = models.get_model(
            "resnet18", num_classes=NUM_CLASSES, axis_name="batch" if sync else None
        )
        state = steps.create_train_state(_random_variables(model.clone(axis_name=None)), tx)
        step = parallel.parallelize(steps.make_train_step(model, tx), setup["mesh"])
        lowered = step.lower(parallel.place_state(state, setup["mesh"]), batch)
        counts[sync] = _collectives(lowered.as_text())
    grads_and_metrics = 62 + 2
    none = dict.fromkeys(_collectives(""), 0)
    assert counts[True] == none | {"all_reduce": grads_and_metrics + 20, "all_gather": 20}
    assert counts[False] == none | {"all_reduce": grads_and_metrics + 1}


def test_accumulation_applies_the_mean_of_the_micro_batch_gradients():
    """float64: one step over 3 micro-batches (positions k, k+3, ...) equals, by hand, the mean
    of their gradients, each micro-batch normalised on its own, the running statistics updated
    by each in turn."""
    with jax.enable_x64(True):
        model = tiny(dtype=jnp.float64, param_dtype=jnp.float64)
        variables = jax.tree.map(lambda x: x.astype(np.float64), _random_variables(model))
        tx = optim.create_optimizer(schedule=1.0, weight_decay=0.0, momentum=0.0)
        batch = _batch(8, n=6)
        batch["image"] = batch["image"].astype(np.float64)
        state = steps.create_train_state(variables, tx)
        step = jax.jit(steps.make_train_step(model, tx, axis_name=None, accum_steps=3))
        new, metrics = step(state, batch)

        def loss(params, stats, micro):
            logits, upd = model.apply(
                {"params": params, "batch_stats": stats},
                micro["image"],
                train=True,
                mutable=["batch_stats"],
            )
            ce = steps.cross_entropy_loss(logits, micro["label"], num_classes=NUM_CLASSES)
            return ce, upd["batch_stats"]

        grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
        stats, grads, losses = variables["batch_stats"], [], []
        for k in range(3):
            micro = jax.tree.map(lambda x, k=k: x[k::3], batch)
            (value, stats), g = grad_fn(variables["params"], stats, micro)
            grads.append(g)
            losses.append(value)
        mean_grad = jax.tree.map(lambda *g: sum(g) / 3, *grads)
        want_params = jax.tree.map(lambda p, g: p - g, variables["params"], mean_grad)
        close = functools.partial(np.testing.assert_allclose, rtol=1e-10, atol=1e-12)
        jax.tree.map(close, _host(new.params), _host(want_params))
        jax.tree.map(close, _host(new.batch_stats), _host(stats))
        close(metrics["loss"], np.mean(losses))
        # Not the gradient of the whole batch at once (BatchNorm sees each micro-batch alone).
        whole = jax.grad(lambda p: loss(p, variables["batch_stats"], batch)[0])(variables["params"])
        diff = jax.tree.map(lambda a, b: np.abs(a - b).max(), whole, mean_grad)
        assert max(jax.tree.leaves(diff)) > 1e-6
    tx = optim.create_optimizer(schedule=0.1)
    step = jax.jit(steps.make_train_step(tiny(), tx, axis_name=None, accum_steps=4))
    with pytest.raises(ValueError, match="accum_steps=4 must divide"):
        step(steps.create_train_state(_random_variables(tiny()), tx), _batch(0, n=6))


def test_mixing_and_accumulation_do_not_depend_on_the_device_count(setup):
    """MixUp/CutMix (both, one per micro-batch) with 2 micro-batches: the 4-device step with
    synchronised BatchNorm equals the single-device step (the same global micro-batches, the same
    mixing), as the plain data-parallel step does."""
    m = mixing.Mixing(mixup_alpha=0.2, cutmix_alpha=1.0, seed=3)
    tx = optim.create_optimizer(schedule=SCHEDULE)
    kwargs = {"schedule": SCHEDULE, "mixing": m, "accum_steps": 2, "label_smoothing": 0.1}
    single = jax.jit(steps.make_train_step(tiny(), tx, axis_name=None, **kwargs))
    sharded = parallel.parallelize(
        steps.make_train_step(tiny(axis_name="batch"), tx, **kwargs), setup["mesh"]
    )
    batches = [_batch(11, n=16), _batch(12, n=16)]
    state = setup["state"]
    for b in batches:
        state, want_metrics = single(state, b)
    got = parallel.place_state(setup["state"], setup["mesh"])
    for b in batches:
        got, got_metrics = sharded(got, parallel.prepare_batch(b, setup["mesh"]))
    got = parallel.fetch_state(got)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5)
    for part in ("params", "batch_stats"):
        jax.tree.map(close, getattr(got, part), _host(getattr(state, part)))
    close(parallel.fetch_state(got_metrics)["loss"], want_metrics["loss"])
    plain = jax.jit(steps.make_train_step(tiny(), tx, axis_name=None, schedule=SCHEDULE))
    _, unmixed = plain(setup["state"], batches[0])
    _, mixed = single(setup["state"], batches[0])
    assert abs(float(unmixed["loss"]) - float(mixed["loss"])) > 1e-3  # mixing changed the loss


def _decay_per_leaf(**kwargs) -> dict:
    """{(module, name): the decay factor each leaf got} from zero gradients, lr 1."""
    params = _params()
    tx = optim.create_optimizer(schedule=1.0, momentum=0.0, **kwargs)
    zero = jax.tree.map(np.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zero, jax.jit(tx.init)(params), params)
    out = {}
    for (path, p), u in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(updates), strict=True
    ):
        factor = -np.asarray(u) / np.asarray(p)
        np.testing.assert_allclose(factor, factor.flat[0], rtol=1e-4)
        kind = "fc" if path[0].key == "fc" else "bn" if "bn" in path[-2].key else "conv"
        out.setdefault((kind, path[-1].key), set()).add(round(float(factor.flat[0]), 5))
    return out


def test_weight_decay_groups_as_torchvision_set_weight_decay():
    defaults = _decay_per_leaf(weight_decay=0.1)
    assert defaults == {
        ("conv", "kernel"): {0.1},
        ("bn", "scale"): {0.0},
        ("bn", "bias"): {0.0},
        ("fc", "kernel"): {0.1},
        ("fc", "bias"): {0.0},
    }
    groups = _decay_per_leaf(weight_decay=0.1, norm_weight_decay=0.3, bias_weight_decay=0.2)
    assert groups[("bn", "scale")] == {0.3}
    assert groups[("bn", "bias")] == groups[("fc", "bias")] == {0.2}  # bias wins over norm
    no_bias_group = _decay_per_leaf(weight_decay=0.1, norm_weight_decay=0.3, bias_weight_decay=None)
    assert no_bias_group[("bn", "bias")] == {0.3} and no_bias_group[("fc", "bias")] == {0.1}
    everything = _decay_per_leaf(weight_decay=0.1, norm_weight_decay=None, bias_weight_decay=None)
    assert set().union(*everything.values()) == {0.1}  # torchvision's default: one group


def test_default_optimizer_state_keeps_its_structure():
    """The default SGD / AdamW state is what a single masked decay gives (checkpoints resume)."""
    params = _params()
    mask = jax.tree.map(lambda _: True, params)
    old_sgd = optax.chain(
        optax.add_decayed_weights(1e-4, mask=mask), optax.sgd(0.1, momentum=0.9, nesterov=True)
    )
    old_adamw = optax.adamw(0.1, weight_decay=1e-4, mask=mask)
    for name, old in (("sgd", old_sgd), ("adamw", old_adamw)):
        new = optim.create_optimizer(name=name, schedule=0.1)
        assert jax.tree.structure(new.init(params)) == jax.tree.structure(old.init(params))


def test_clip_grad_norm_matches_torch():
    rng = np.random.default_rng(0)
    grads = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    tensors = [torch.from_numpy(g.copy()) for g in grads.values()]
    for t in tensors:
        t.grad = t.clone()
    torch.nn.utils.clip_grad_norm_(tensors, 0.5)
    clip = optim.clip_grad_norm_as_torch(0.5)
    got, _ = clip.update(jax.tree.map(np.float32, grads), clip.init(grads))
    for g, t in zip(got.values(), tensors, strict=True):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-6)
    small, _ = clip.update({"a": np.full(2, 0.1, np.float32)}, ())
    np.testing.assert_array_equal(small["a"], np.float32(0.1))  # under the limit: unchanged
    tx = optim.create_optimizer(schedule=1.0, weight_decay=0.0, momentum=0.0, clip_grad_norm=0.5)
    updates, _ = tx.update(jax.tree.map(np.float32, grads), tx.init(grads), grads)
    norm = optax.tree.norm(updates)
    np.testing.assert_allclose(norm, 0.5, rtol=1e-5)


@pytest.mark.parametrize("method", ["linear", "constant"])
def test_warmup_and_cosine_match_torch_schedulers(method):
    """One step per epoch: torch's SequentialLR([LinearLR | ConstantLR, CosineAnnealingLR])."""
    peak, epochs, warmup, decay, lr_min = 0.4, 10, 3, 0.01, 0.02
    sched = optim.learning_rate_schedule(
        base_lr=peak,
        global_batch_size=256,
        steps_per_epoch=1,
        epochs=epochs,
        warmup_epochs=warmup,
        warmup_method=method,
        warmup_decay=decay,
        lr_min=lr_min,
    )
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    sch = torch.optim.lr_scheduler
    first = (
        sch.LinearLR(opt, start_factor=decay, total_iters=warmup)
        if method == "linear"
        else sch.ConstantLR(opt, factor=decay, total_iters=warmup)
    )
    cosine = sch.CosineAnnealingLR(opt, T_max=epochs - warmup, eta_min=lr_min)
    both = sch.SequentialLR(opt, [first, cosine], milestones=[warmup])
    want = []
    for _ in range(epochs):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        both.step()
    np.testing.assert_allclose([sched(s) for s in range(epochs)], want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="warmup_method 'cosine'"):
        optim.learning_rate_schedule(
            global_batch_size=256,
            steps_per_epoch=1,
            epochs=2,
            warmup_epochs=1,
            warmup_method="cosine",
        )
