"""Per-replica training and evaluation steps: state, loss, mixing, accumulation and EMA updates.

One per-replica step function serves every layout: plain `jax.jit` on one device
(`axis_name=None`), or data-parallel through `resnet_jax.parallel` (`jit(shard_map)` over a 1-D
mesh, or `pmap`), where gradients and metrics are averaged over the mapped axis. No data
loading, checkpoint I/O or flag parsing lives here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from resnet_jax import ema as ema_lib
from resnet_jax import mixing as mixing_lib
from resnet_jax.parallel import BATCH_AXIS
from resnet_jax.preprocessing import IMAGENET_MEAN, IMAGENET_STD, normalize_images


@flax.struct.dataclass
class TrainState:
    """Everything needed to resume training, as one pytree (checkpoint it whole)."""

    step: jax.Array  # int32 scalar: steps taken, including skipped non-finite ones
    params: Any
    batch_stats: Any
    opt_state: Any
    nonfinite_steps: jax.Array  # int32: total steps skipped for a non-finite loss/gradient
    nonfinite_streak: jax.Array  # int32: consecutive skipped steps up to now
    ema: ema_lib.EmaState | None = None  # the model's moving average, when training keeps one


def create_train_state(
    variables: dict, tx: optax.GradientTransformation, *, ema: bool = False
) -> TrainState:
    """Fresh `TrainState` at step 0 from `{"params", "batch_stats"}` (e.g. `init_variables`);
    with `ema`, its moving average starts as a copy (`ema.init`)."""
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
        ema=ema_lib.init(params, variables.get("batch_stats", {})) if ema else None,
    )


def _per_example_ce(
    logits: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float
) -> jax.Array:
    """Float32 cross-entropy per example against (optionally smoothed) targets: one-hot from
    integer `labels` `(batch,)`, or `labels` as class probabilities `(batch, num_classes)`."""
    if logits.shape[-1] != num_classes:
        raise ValueError(f"logits have {logits.shape[-1]} classes, expected {num_classes}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if labels.ndim == logits.ndim:
        targets = labels.astype(jnp.float32)
    else:
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
    """Mean float32 cross-entropy, as torch's `CrossEntropyLoss(label_smoothing=e)` for class
    indices or probabilities (`_per_example_ce`): target `(1 - e) * target + e / K`; `mask` 0/1."""
    losses = _per_example_ce(logits, labels, num_classes, label_smoothing)
    if mask is None:
        return losses.mean()
    mask = mask.astype(jnp.float32)
    return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _model_input(
    images: jax.Array,
    mean_std: tuple[Sequence[float], Sequence[float]],
    erase_box: jax.Array | None = None,
) -> jax.Array:
    """A batch's images as the model takes them: uint8 is normalised here (float32) with
    `mean_std`, floating images are taken as already normalised; then, with `erase_box`
    (int [B, 4] top, left, height, width from `data.train_batches`), each box is set to 0 (after
    normalisation, as torchvision's RandomErasing; zero-sized boxes erase nothing). The model
    casts to its compute dtype itself."""
    if images.dtype == jnp.uint8:
        images = normalize_images(images, *mean_std)
    elif not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f'batch["image"] must be uint8 (normalised on device) or floating (already '
            f"normalised), got dtype {images.dtype}"
        )
    if erase_box is None:
        return images
    return _erase(images, erase_box)


def _erase(images: jax.Array, boxes: jax.Array) -> jax.Array:
    """[B, H, W, C] images with each example's box (top, left, height, width) set to 0."""
    top, left, height, width = (boxes[:, i, None, None] for i in range(4))
    rows = jnp.arange(images.shape[1])[None, :, None]
    cols = jnp.arange(images.shape[2])[None, None, :]
    inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
    return jnp.where(inside[..., None], jnp.zeros((), images.dtype), images)


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
    state: TrainState,
    finite: jax.Array,
    params: Any,
    batch_stats: Any,
    opt_state: Any,
    ema: ema_lib.EmaState | None,
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
        ema=keep_if_finite(ema, state.ema),
    )


def _micro_batches(batch: dict, accum_steps: int) -> dict:
    """`batch` (leading size n) as `accum_steps` micro-batches `(accum_steps, n / accum_steps,
    ...)`; micro-batch k holds positions k, k + accum_steps, ... so that the global micro-batches
    are the same for any number of replicas (each replica's shard is contiguous)."""
    n = batch["label"].shape[0]
    if n % accum_steps:
        raise ValueError(
            f"accum_steps={accum_steps} must divide each replica's batch size, got {n}"
        )
    return jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(n // accum_steps, accum_steps, *x.shape[1:]), 0, 1),
        batch,
    )


def _accumulate(
    micro_step: Callable, trained: list, batch_stats: Any, batch: dict, n: int, varying: str | None
) -> tuple[list, jax.Array, jax.Array, Any]:
    """`micro_step(stats, micro_batch, index) -> (grads, loss, accuracy, stats)` over the `n`
    micro-batches of `batch` in a `lax.scan`: the mean gradient, loss and accuracy, and the
    running statistics after the last micro-batch. `varying`: the mapped axis over which the
    statistics differ per replica (per-replica BatchNorm), so the scan's carry is typed so."""

    def body(carry, xs):
        grads_sum, stats = carry
        grads, loss, accuracy, stats = micro_step(stats, *xs)
        return (jax.tree.map(jnp.add, grads_sum, grads), stats), (loss, accuracy)

    if varying is not None:
        batch_stats = jax.lax.pcast(batch_stats, varying, to="varying")
    carry = (jax.tree.map(jnp.zeros_like, trained), batch_stats)
    xs = (_micro_batches(batch, n), jnp.arange(n))
    (grads, batch_stats), (losses, accuracies) = jax.lax.scan(body, carry, xs)
    return jax.tree.map(lambda g: g / n, grads), losses.mean(), accuracies.mean(), batch_stats


def _average_statistics(batch_stats: Any, axis_name: str) -> Any:
    """Running statistics averaged over the replicas, as one vector: one all-reduce, not one
    per statistic."""
    flat, unflatten = jax.flatten_util.ravel_pytree(batch_stats)
    return unflatten(jax.lax.pmean(flat, axis_name))


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    schedule: optax.Schedule | None = None,
    label_smoothing: float = 0.0,
    axis_name: str | None = BATCH_AXIS,
    trainable: Any | None = None,
    mean_std: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD),
    mixing: mixing_lib.Mixing | None = None,
    accum_steps: int = 1,
    ema: ema_lib.EmaSchedule | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Per-replica training step `(state, {"image", "label"}) -> (state, metrics)`.

    With `axis_name`, gradients and metrics are averaged over that mapped axis (wrap with
    `parallelize`); with `None` it is a single-device step for `jax.jit`. BatchNorm under a
    mapped step follows `model.axis_name`: the step's axis synchronises the batch statistics
    across replicas (inside the model, one collective per layer and pass); None lets each
    replica normalise with its own batch, and the step then averages the updated running
    statistics over the axis (one all-reduce per step) so the state stays replicated.

    A non-finite loss, gradient or BatchNorm statistic skips the update: params, batch_stats,
    opt_state and ema stay as they were, `step` still advances (the data position stays
    consistent), `nonfinite_steps` and `nonfinite_streak` grow; a finite step resets the streak.
    Metrics: loss, accuracy, grad_norm, nonfinite (0/1), and learning_rate when `schedule` is
    given (evaluated at the optimizer's own count `step - nonfinite_steps`, which skipped steps
    do not advance; this assumes `opt_state` was created together with `step` 0).

    `trainable` (a tree like the params with a Python bool per leaf; default: all True) says
    which params train. Only those are differentiated, averaged over the axis and counted in
    grad_norm and the finite check, so a frozen backbone costs its forward pass only (XLA gets
    no backward pass to drop). Frozen params keep their values exactly; pair this with an
    optimizer that gives them no update (`optim.create_optimizer(param_labels=...)`, "frozen"),
    which receives zero gradients for them.

    `batch["image"]` is uint8 pixels (normalised on the device with `mean_std`, the weights'
    per-channel (mean, std): the host sends a quarter of the bytes) or floating, already
    normalised images (`_model_input`).

    `accum_steps` N > 1: the batch holds N micro-batches (`_micro_batches`), run one after
    another in a `lax.scan`; each is normalised by BatchNorm on its own and updates the running
    statistics in turn (as N torch forward passes), and one optimizer update applies the mean
    of their gradients; loss and accuracy are their means. `mixing`: MixUp/CutMix of each
    (micro-)batch on the device (`mixing.mix_batch`, keyed by `step` and the micro-batch), the
    loss on the soft targets and accuracy against their argmax (as torchvision's reference).
    `ema`: the step updates `state.ema` (create the state with `ema=True`) after the optimizer
    update (`ema.scheduled_update` at batch `step`).

    (Over 80 lines for this contract: the traced code is the `step` closure, ~65 lines.)
    """
    num_classes = _check_model(model, axis_name)
    per_replica_bn = getattr(model, "axis_name", None) is None
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")

    def loss_fn(params, batch_stats, images, targets):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        loss = cross_entropy_loss(
            logits, targets, num_classes=num_classes, label_smoothing=label_smoothing
        )
        return loss, (logits, updates["batch_stats"])

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        if ema is not None and state.ema is None:
            raise ValueError("make_train_step(ema=...) needs create_train_state(..., ema=True)")
        leaves, treedef = jax.tree.flatten(state.params)
        trains = _trainable_leaves(state.params, trainable)
        trained = [leaf for leaf, t in zip(leaves, trains, strict=True) if t]
        if axis_name is not None:
            # Differentiate each replica's own loss: under shard_map's replication checking, a
            # gradient w.r.t. replicated (invariant) params would already be summed over the
            # axis, and the pmean below would then give N times the mean. Marking the params
            # device-varying first yields per-replica gradients under both shard_map and pmap.
            trained = jax.lax.pcast(trained, axis_name, to="varying")

        def trained_loss(trained, batch_stats, images, targets):
            it = iter(trained)
            params = [next(it) if t else leaf for leaf, t in zip(leaves, trains, strict=True)]
            return loss_fn(treedef.unflatten(params), batch_stats, images, targets)

        grad_fn = jax.value_and_grad(trained_loss, has_aux=True)

        def micro_step(batch_stats, micro, index):
            """Gradients, loss, accuracy and new running statistics of one micro-batch."""
            images = _model_input(micro["image"], mean_std, micro.get("erase_box"))
            labels = micro["label"]
            targets = labels
            if mixing is not None:
                key = mixing_lib.step_key(mixing, state.step, index)
                images, targets = mixing_lib.mix_batch(
                    mixing, key, images, labels, num_classes=num_classes, axis_name=axis_name
                )
                labels = jnp.argmax(targets, -1)
            (loss, (logits, batch_stats)), grads = grad_fn(trained, batch_stats, images, targets)
            accuracy = (jnp.argmax(logits, -1) == labels).mean(dtype=jnp.float32)
            return grads, loss, accuracy, batch_stats

        if accum_steps == 1:
            grads, loss, accuracy, batch_stats = micro_step(state.batch_stats, batch, 0)
        else:
            varying = axis_name if per_replica_bn else None
            grads, loss, accuracy, batch_stats = _accumulate(
                micro_step, trained, state.batch_stats, batch, accum_steps, varying
            )
        if axis_name is not None:
            grads, loss, accuracy = jax.lax.pmean((grads, loss, accuracy), axis_name)
            if per_replica_bn:
                batch_stats = _average_statistics(batch_stats, axis_name)

        new_params, opt_state = _apply_trained_grads(tx, state, grads, trains)
        grad_norm = optax.tree.norm(grads)
        # Sums propagate any NaN/inf, so scalars suffice (and reuse the reported grad norm); a
        # float32 overflow of a finite gradient's squared norm (norm > ~1e19) counts too.
        stats_sum = sum(jnp.sum(x) for x in jax.tree.leaves(batch_stats))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(stats_sum)
        new_ema = state.ema
        if ema is not None:
            new_ema = ema_lib.scheduled_update(ema, state.ema, state.step, new_params, batch_stats)
        new_state = _next_state(state, finite, new_params, batch_stats, opt_state, new_ema)
        metrics = {
            "loss": loss,
            "accuracy": accuracy,
            "grad_norm": grad_norm,
            "nonfinite": (~finite).astype(jnp.int32),
        }
        if schedule is not None:  # at the optimizer's own count, which skipped steps keep
            metrics["learning_rate"] = jnp.asarray(
                schedule(state.step - state.nonfinite_steps), jnp.float32
            )
        return new_state, metrics

    return step


def make_eval_step(
    model: nn.Module,
    *,
    axis_name: str | None = BATCH_AXIS,
    mean_std: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD),
) -> Callable[[dict, dict], tuple[dict, jax.Array]]:
    """Per-replica eval `(variables, {"image", "label", "mask"?}) -> (sums, predictions)`.

    `sums` holds totals over the replica group (not means, so the caller can accumulate over
    batches of any size): "loss" (float32), "correct_top1", "correct_top5", "count" (int32),
    counting only examples with a true `mask` (padding). `predictions` are the per-example
    top-1 classes (int32, padding included) for confusion matrices. Parallelize it with
    `out_specs=EVAL_OUT_SPECS`. `batch["image"]` is uint8 (normalised on the device with
    `preprocessing.normalize_images` and `mean_std`) or floating (already normalised), as in
    `make_train_step`.
    """
    num_classes = _check_model(model, axis_name)
    k = min(5, num_classes)

    def step(variables: dict, batch: dict) -> tuple[dict, jax.Array]:
        logits = model.apply(
            {"params": variables["params"], "batch_stats": variables["batch_stats"]},
            _model_input(batch["image"], mean_std),
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
