"""Per-replica training and evaluation steps: state, loss, optimizer and learning-rate schedule.

One per-replica step function serves every layout: plain `jax.jit` on one device
(`axis_name=None`), or data-parallel through `resnet_jax.parallel` (`jit(shard_map)` over a 1-D
mesh, or `pmap`), where gradients and metrics are averaged over the mapped axis. No data
loading, checkpoint I/O or flag parsing lives here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from resnet_jax.parallel import BATCH_AXIS
from resnet_jax.preprocessing import normalize_images

OPTIMIZERS = ("sgd", "adamw")
PARAM_LABELS = ("train", "frozen", "head")


@flax.struct.dataclass
class TrainState:
    """Everything needed to resume training, as one pytree (checkpoint it whole)."""

    step: jax.Array  # int32 scalar: steps taken, including skipped non-finite ones
    params: Any
    batch_stats: Any
    opt_state: Any
    nonfinite_steps: jax.Array  # int32: total steps skipped for a non-finite loss/gradient
    nonfinite_streak: jax.Array  # int32: consecutive skipped steps up to now


def learning_rate_schedule(
    *,
    base_lr: float = 0.1,
    global_batch_size: int,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: float = 5,
) -> optax.Schedule:
    """Linear warmup from 0 then cosine decay to 0, peak `base_lr * global_batch_size / 256`.

    The linear scaling rule keeps the recipe valid across batch sizes (Goyal et al. 2017).
    """
    if global_batch_size <= 0 or steps_per_epoch <= 0 or epochs <= 0:
        raise ValueError(
            "learning_rate_schedule: global_batch_size, steps_per_epoch and epochs must be "
            f"positive, got {global_batch_size}, {steps_per_epoch}, {epochs}"
        )
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(
            f"learning_rate_schedule: warmup_epochs must be in [0, epochs={epochs}], "
            f"got {warmup_epochs}"
        )
    peak = base_lr * global_batch_size / 256.0
    total_steps = epochs * steps_per_epoch
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    cosine = optax.cosine_decay_schedule(peak, decay_steps=max(total_steps - warmup_steps, 1))
    if warmup_steps == 0:
        return cosine
    warmup = optax.linear_schedule(0.0, peak, transition_steps=warmup_steps)
    return optax.join_schedules([warmup, cosine], boundaries=[warmup_steps])


def _decay_mask(params: Any) -> Any:
    """True for conv/dense `kernel`s only: BatchNorm scales/biases and dense biases get no decay."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def _checked_labels(param_labels: Any) -> Callable[[Any], Any]:
    """Wrap `param_labels` so a tree that does not match the params fails with a readable error."""
    bad = sorted({str(v) for v in jax.tree.leaves(param_labels)} - set(PARAM_LABELS))
    if bad:
        raise ValueError(f"param_labels: unknown labels {bad}; use {', '.join(PARAM_LABELS)}")

    def labels_for(params: Any) -> Any:
        want = jax.tree.structure(params)
        if jax.tree.structure(param_labels) != want:
            got = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
            have = {
                jax.tree_util.keystr(p)
                for p, _ in jax.tree_util.tree_leaves_with_path(param_labels)
            }
            raise ValueError(
                "param_labels must have exactly the params' structure; "
                f"missing labels for {sorted(got - have)[:5]}, "
                f"labels for unknown params {sorted(have - got)[:5]}"
            )
        return param_labels

    return labels_for


def create_optimizer(
    *,
    name: str = "sgd",
    schedule: optax.ScalarOrSchedule,
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
    nesterov: bool = True,
    param_labels: Any | None = None,
    head_lr_multiplier: float = 1.0,
) -> optax.GradientTransformation:
    """SGD (Nesterov momentum, L2 decay as torch's SGD) or AdamW (decoupled decay).

    Weight decay applies to conv/dense kernels only. With `param_labels` (a tree like the params
    with leaves "train" / "frozen" / "head"), frozen params get exactly zero update and no
    optimizer state, and head params use the learning rate times `head_lr_multiplier`.
    `momentum` and `nesterov` only apply to SGD.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; choices: {', '.join(OPTIMIZERS)}")
    if param_labels is None and head_lr_multiplier != 1.0:
        raise ValueError(
            "head_lr_multiplier only affects params labelled 'head'; pass param_labels"
        )

    def build(lr: optax.ScalarOrSchedule) -> optax.GradientTransformation:
        if name == "adamw":
            return optax.adamw(lr, weight_decay=weight_decay, mask=_decay_mask)
        return optax.chain(
            optax.add_decayed_weights(weight_decay, mask=_decay_mask),
            optax.sgd(lr, momentum=momentum, nesterov=nesterov),
        )

    if param_labels is None:
        return build(schedule)

    def head_lr(count: jax.Array) -> jax.Array:
        base = schedule(count) if callable(schedule) else schedule
        return base * head_lr_multiplier

    return optax.multi_transform(
        {"train": build(schedule), "frozen": optax.set_to_zero(), "head": build(head_lr)},
        _checked_labels(param_labels),
    )


def create_train_state(variables: dict, tx: optax.GradientTransformation) -> TrainState:
    """Fresh `TrainState` at step 0 from `{"params", "batch_stats"}` (e.g. `init_variables`)."""
    if "params" not in variables:
        raise ValueError(
            f"create_train_state: variables need a 'params' entry, got keys {sorted(variables)}"
        )
    params = variables["params"]
    # Three distinct counters: one shared buffer would be donated three times by the step.
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        nonfinite_steps=jnp.zeros((), jnp.int32),
        nonfinite_streak=jnp.zeros((), jnp.int32),
    )


def _per_example_ce(
    logits: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float
) -> jax.Array:
    """Float32 cross-entropy per example against (optionally smoothed) one-hot labels."""
    if logits.shape[-1] != num_classes:
        raise ValueError(f"logits have {logits.shape[-1]} classes, expected {num_classes}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def cross_entropy_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    label_smoothing: float = 0.0,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Mean float32 cross-entropy; smoothing as torch (target (1-e)*onehot + e/K); `mask` 0/1."""
    losses = _per_example_ce(logits, labels, num_classes, label_smoothing)
    if mask is None:
        return losses.mean()
    mask = mask.astype(jnp.float32)
    return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _model_input(images: jax.Array) -> jax.Array:
    """A batch's images as the model takes them: uint8 is normalised here (float32), floating
    images are taken as already normalised. The model casts to its compute dtype itself."""
    if images.dtype == jnp.uint8:
        return normalize_images(images)
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images
    raise ValueError(
        f'batch["image"] must be uint8 (normalised on device) or floating (already normalised), '
        f"got dtype {images.dtype}"
    )


def _check_model(model: nn.Module, axis_name: str | None) -> int:
    """The model's class count, after checking its BatchNorm axis: None (each replica normalises
    with its own batch) or the step's `axis_name` (synchronised BatchNorm)."""
    model_axis = getattr(model, "axis_name", None)
    if model_axis is not None and model_axis != axis_name:
        raise ValueError(
            f"model.axis_name is {model_axis!r} but the step maps over {axis_name!r}; build the "
            f"model with axis_name={axis_name!r} (synchronised BatchNorm) or None (per-replica "
            "BatchNorm statistics)"
        )
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        raise ValueError("the model needs a classification head (num_classes is None)")
    return num_classes


def _trainable_leaves(params: Any, trainable: Any | None) -> list[bool]:
    """One bool per params leaf (flattening order): whether it trains (`trainable` None: all)."""
    leaves, treedef = jax.tree.flatten(params)
    if trainable is None:
        return [True] * len(leaves)
    try:
        flags = treedef.flatten_up_to(trainable)
    except ValueError as err:
        raise ValueError(
            f"trainable must be a tree of bools with exactly the params' structure: {err}"
        ) from err
    if not all(isinstance(f, (bool, np.bool_)) for f in flags):
        raise ValueError("trainable must hold Python bools (static: they decide what compiles)")
    return [bool(f) for f in flags]


def _apply_trained_grads(
    tx: optax.GradientTransformation, state: TrainState, grads: list, trains: list[bool]
) -> tuple[Any, Any]:
    """New params and optimizer state from the gradients of the trained leaves (`trains`, in
    flattening order); frozen leaves get zero gradients and keep their values exactly."""
    leaves, treedef = jax.tree.flatten(state.params)
    it = iter(grads)
    full_grads = treedef.unflatten(
        [next(it) if t else jnp.zeros_like(leaf) for leaf, t in zip(leaves, trains, strict=True)]
    )
    updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
    new_leaves = [
        optax.apply_updates(leaf, update) if t else leaf
        for leaf, update, t in zip(leaves, treedef.flatten_up_to(updates), trains, strict=True)
    ]
    return treedef.unflatten(new_leaves), opt_state


def _next_state(
    state: TrainState, finite: jax.Array, params: Any, batch_stats: Any, opt_state: Any
) -> TrainState:
    """The state after a step: the new values where `finite`, else the old ones; `step` always
    advances and the non-finite counters count a skipped step."""

    def keep_if_finite(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    skipped = (~finite).astype(jnp.int32)
    return TrainState(
        step=state.step + 1,
        params=keep_if_finite(params, state.params),
        batch_stats=keep_if_finite(batch_stats, state.batch_stats),
        opt_state=keep_if_finite(opt_state, state.opt_state),
        nonfinite_steps=state.nonfinite_steps + skipped,
        nonfinite_streak=(state.nonfinite_streak + 1) * skipped,
    )


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    schedule: optax.Schedule | None = None,
    label_smoothing: float = 0.0,
    axis_name: str | None = BATCH_AXIS,
    trainable: Any | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Per-replica training step `(state, {"image", "label"}) -> (state, metrics)`.

    With `axis_name`, gradients and metrics are averaged over that mapped axis (wrap with
    `parallelize`); with `None` it is a single-device step for `jax.jit`. BatchNorm under a
    mapped step follows `model.axis_name`: the step's axis synchronises the batch statistics
    across replicas (inside the model, one collective per layer and pass); None lets each
    replica normalise with its own batch, and the step then averages the updated running
    statistics over the axis (one all-reduce per step) so the state stays replicated.

    A non-finite loss, gradient or BatchNorm statistic skips the update: params, batch_stats
    and opt_state stay as they were, `step` still advances (the data position stays consistent),
    `nonfinite_steps` and `nonfinite_streak` grow; a finite step resets the streak. Metrics:
    loss, accuracy, grad_norm, nonfinite (0/1), and learning_rate when `schedule` is given
    (evaluated at the optimizer's own count `step - nonfinite_steps`, which skipped steps do not
    advance; this assumes `opt_state` was created together with `step` 0).

    `trainable` (a tree like the params with a Python bool per leaf; default: all True) says
    which params train. Only those are differentiated, averaged over the axis and counted in
    grad_norm and the finite check, so a frozen backbone costs its forward pass only (XLA gets
    no backward pass to drop). Frozen params keep their values exactly; pair this with an
    optimizer that gives them no update (`create_optimizer(param_labels=...)`, "frozen"), which
    receives zero gradients for them.

    `batch["image"]` is uint8 pixels (normalised on the device: the host sends a quarter of the
    bytes) or floating, already normalised images (`_model_input`).

    (Its length is this contract; the code is one closure of ~55 lines, the traced step.)
    """
    num_classes = _check_model(model, axis_name)
    per_replica_bn = getattr(model, "axis_name", None) is None

    def loss_fn(params, batch_stats, batch):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            _model_input(batch["image"]),
            train=True,
            mutable=["batch_stats"],
        )
        loss = cross_entropy_loss(
            logits, batch["label"], num_classes=num_classes, label_smoothing=label_smoothing
        )
        return loss, (logits, updates["batch_stats"])

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        leaves, treedef = jax.tree.flatten(state.params)
        trains = _trainable_leaves(state.params, trainable)
        trained = [leaf for leaf, t in zip(leaves, trains, strict=True) if t]
        if axis_name is not None:
            # Differentiate each replica's own loss: under shard_map's replication checking, a
            # gradient w.r.t. replicated (invariant) params would already be summed over the
            # axis, and the pmean below would then give N times the mean. Marking the params
            # device-varying first yields per-replica gradients under both shard_map and pmap.
            trained = jax.lax.pcast(trained, axis_name, to="varying")

        def trained_loss(trained, batch_stats, batch):
            it = iter(trained)
            params = [next(it) if t else leaf for leaf, t in zip(leaves, trains, strict=True)]
            return loss_fn(treedef.unflatten(params), batch_stats, batch)

        grad_fn = jax.value_and_grad(trained_loss, has_aux=True)
        (loss, (logits, batch_stats)), grads = grad_fn(trained, state.batch_stats, batch)
        accuracy = (jnp.argmax(logits, -1) == batch["label"]).mean(dtype=jnp.float32)
        if axis_name is not None:
            grads, loss, accuracy = jax.lax.pmean((grads, loss, accuracy), axis_name)
            if per_replica_bn:  # as one vector: one all-reduce, not one per statistic
                flat, unflatten = jax.flatten_util.ravel_pytree(batch_stats)
                batch_stats = unflatten(jax.lax.pmean(flat, axis_name))

        new_params, opt_state = _apply_trained_grads(tx, state, grads, trains)
        grad_norm = optax.tree.norm(grads)
        # Sums propagate any NaN/inf, so scalars suffice (and reuse the reported grad norm); a
        # float32 overflow of a finite gradient's squared norm (norm > ~1e19) counts too.
        stats_sum = sum(jnp.sum(x) for x in jax.tree.leaves(batch_stats))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(stats_sum)
        new_state = _next_state(state, finite, new_params, batch_stats, opt_state)
        metrics = {
            "loss": loss,
            "accuracy": accuracy,
            "grad_norm": grad_norm,
            "nonfinite": (~finite).astype(jnp.int32),
        }
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(
                schedule(state.step - state.nonfinite_steps), jnp.float32
            )
        return new_state, metrics

    return step


def make_eval_step(
    model: nn.Module, *, axis_name: str | None = BATCH_AXIS
) -> Callable[[dict, dict], tuple[dict, jax.Array]]:
    """Per-replica eval `(variables, {"image", "label", "mask"?}) -> (sums, predictions)`.

    `sums` holds totals over the replica group (not means, so the caller can accumulate over
    batches of any size): "loss" (float32), "correct_top1", "correct_top5", "count" (int32),
    counting only examples with a true `mask` (padding). `predictions` are the per-example
    top-1 classes (int32, padding included) for confusion matrices. Parallelize it with
    `out_specs=EVAL_OUT_SPECS`. `batch["image"]` is uint8 (normalised on the device with
    `preprocessing.normalize_images`) or floating (already normalised), as in `make_train_step`.
    """
    num_classes = _check_model(model, axis_name)
    k = min(5, num_classes)

    def step(variables: dict, batch: dict) -> tuple[dict, jax.Array]:
        logits = model.apply(
            {"params": variables["params"], "batch_stats": variables["batch_stats"]},
            _model_input(batch["image"]),
            train=False,
        )
        labels = batch["label"]
        mask = batch.get("mask")
        mask = jnp.ones(labels.shape, bool) if mask is None else mask.astype(bool)
        losses = _per_example_ce(logits, labels, num_classes, 0.0)
        _, top = jax.lax.top_k(logits.astype(jnp.float32), k)
        hits = top == labels[:, None]
        sums = {
            "loss": jnp.where(mask, losses, 0.0).sum(),
            "correct_top1": (hits[:, 0] & mask).sum(dtype=jnp.int32),
            "correct_top5": (hits.any(-1) & mask).sum(dtype=jnp.int32),
            "count": mask.sum(dtype=jnp.int32),
        }
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name)
        return sums, top[:, 0].astype(jnp.int32)

    return step
