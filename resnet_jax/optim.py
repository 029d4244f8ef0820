"""Optimizer and learning-rate schedule, with torchvision's classification-reference options.

`learning_rate_schedule`: warmup (linear from a factor, or constant at a factor: torch's
`LinearLR(start_factor)` / `ConstantLR(factor)`) then cosine annealing to an absolute `lr_min`
(torch's `CosineAnnealingLR(eta_min)`), evaluated per optimizer step (the reference steps its
schedulers per epoch). `create_optimizer`: SGD or AdamW with torchvision's `set_weight_decay`
groups (biases, normalisation-layer params, the rest), clipping by global norm as torch's
`clip_grad_norm_`, and frozen/head labels for transfer learning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "adamw")
PARAM_LABELS = ("train", "frozen", "head")
WARMUP_METHODS = ("linear", "constant")


def learning_rate_schedule(
    *,
    base_lr: float = 0.1,
    global_batch_size: int,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: float = 5,
    warmup_method: str = "linear",
    warmup_decay: float = 0.0,
    lr_min: float = 0.0,
) -> optax.Schedule:
    """Warmup then cosine decay to `lr_min`, peak `base_lr * global_batch_size / 256`.

    The linear scaling rule keeps the recipe valid across batch sizes (Goyal et al. 2017).
    Warmup lasts `round(warmup_epochs * steps_per_epoch)` steps: "linear" rises from
    `warmup_decay * peak` to the peak (torch's `LinearLR(start_factor=warmup_decay)`),
    "constant" holds `warmup_decay * peak` (`ConstantLR(factor=warmup_decay)`). The cosine then
    goes from the peak to `lr_min` (absolute, not scaled: torch's `eta_min`) over the remaining
    steps.
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
    if warmup_method not in WARMUP_METHODS:
        raise ValueError(
            f"learning_rate_schedule: warmup_method {warmup_method!r}; choices: "
            f"{', '.join(WARMUP_METHODS)}"
        )
    if not 0 <= warmup_decay <= 1 or lr_min < 0:
        raise ValueError(
            "learning_rate_schedule: warmup_decay must be in [0, 1] and lr_min >= 0, got "
            f"{warmup_decay}, {lr_min}"
        )
    peak = base_lr * global_batch_size / 256.0
    total_steps = epochs * steps_per_epoch
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    decay_steps = max(total_steps - warmup_steps, 1)

    # optax's alpha is lr_min as a fraction of the peak: (peak - lr_min) * cos + lr_min.
    alpha = lr_min / peak if peak else 0.0
    cosine = optax.cosine_decay_schedule(peak, decay_steps=decay_steps, alpha=alpha)

    if warmup_steps == 0:
        return cosine
    if warmup_method == "linear":
        warmup = optax.linear_schedule(warmup_decay * peak, peak, transition_steps=warmup_steps)
    else:
        warmup = optax.constant_schedule(warmup_decay * peak)
    return optax.join_schedules([warmup, cosine], boundaries=[warmup_steps])


def _decay_groups(
    params: Any, norm_weight_decay: float | None, bias_weight_decay: float | None
) -> Any:
    """Each leaf's group, as torchvision's `set_weight_decay`: "bias" (any `bias`, if
    `bias_weight_decay` is set), else "norm" (a normalisation layer's params: a module without
    a `kernel`, if `norm_weight_decay` is set), else "other"."""

    def group(path, _):
        name = getattr(path[-1], "key", None)
        if name == "bias" and bias_weight_decay is not None:
            return "bias"
        module = params
        for key in path[:-1]:
            module = module[key.key]
        if "kernel" not in module and norm_weight_decay is not None:
            return "norm"
        return "other"

    return jax.tree_util.tree_map_with_path(group, params)


def _weight_decay(
    weight_decay: float, norm_weight_decay: float | None, bias_weight_decay: float | None
) -> optax.GradientTransformation:
    """Adds `decay * param` per group (`_decay_groups`). The "other" group's transform is always
    there, so the default (kernels only) keeps the optimizer state of a plain masked decay."""
    decays = {"other": weight_decay, "norm": norm_weight_decay, "bias": bias_weight_decay}
    parts = []
    for name, decay in decays.items():
        if name == "other" or decay:

            def in_group(params, name=name):
                groups = _decay_groups(params, norm_weight_decay, bias_weight_decay)
                return jax.tree.map(lambda g: g == name, groups)

            parts.append(optax.add_decayed_weights(decay or 0.0, mask=in_group))
    return parts[0] if len(parts) == 1 else optax.chain(*parts)


class _ClipState(NamedTuple):
    """`clip_grad_norm_as_torch` keeps no state."""


def clip_grad_norm_as_torch(max_norm: float) -> optax.GradientTransformation:
    """Scale all gradients by `min(1, max_norm / (global_norm + 1e-6))`, as torch's
    `nn.utils.clip_grad_norm_` (optax's `clip_by_global_norm` omits the 1e-6)."""
    if max_norm <= 0:
        raise ValueError(f"clip_grad_norm must be positive, got {max_norm}")

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: _ClipState(), update)


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
    norm_weight_decay: float | None = 0.0,
    bias_weight_decay: float | None = 0.0,
    momentum: float = 0.9,
    nesterov: bool = True,
    clip_grad_norm: float | None = None,
    param_labels: Any | None = None,
    head_lr_multiplier: float = 1.0,
) -> optax.GradientTransformation:
    """SGD (Nesterov momentum, L2 decay as torch's SGD) or AdamW (decoupled decay, as torch's).

    Weight decay per group as torchvision's `set_weight_decay` (`_decay_groups`): every `bias`
    gets `bias_weight_decay`, other normalisation-layer params `norm_weight_decay`, the rest
    (conv/dense kernels, and the groups whose decay is None) `weight_decay`. The defaults (0.0
    for both) decay the kernels only; None is torchvision's "no separate group".
    `clip_grad_norm` scales the gradients to that global norm first (`clip_grad_norm_as_torch`).
    With `param_labels` (a tree like the params with leaves "train" / "frozen" / "head"),
    frozen params get exactly zero update and no optimizer state, and head params use the
    learning rate times `head_lr_multiplier`. `momentum` and `nesterov` only apply to SGD.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; choices: {', '.join(OPTIMIZERS)}")
    if param_labels is None and head_lr_multiplier != 1.0:
        raise ValueError(
            "head_lr_multiplier only affects params labelled 'head'; pass param_labels"
        )
    decay = _weight_decay(weight_decay, norm_weight_decay, bias_weight_decay)

    def build(lr: optax.ScalarOrSchedule) -> optax.GradientTransformation:
        if name == "adamw":  # optax.adamw's composition, with the decay groups
            return optax.chain(optax.scale_by_adam(), decay, optax.scale_by_learning_rate(lr))
        return optax.chain(decay, optax.sgd(lr, momentum=momentum, nesterov=nesterov))

    if param_labels is None:
        tx = build(schedule)
    else:

        def head_lr(count: jax.Array) -> jax.Array:
            base = schedule(count) if callable(schedule) else schedule
            return base * head_lr_multiplier

        tx = optax.multi_transform(
            {"train": build(schedule), "frozen": optax.set_to_zero(), "head": build(head_lr)},
            _checked_labels(param_labels),
        )
    if clip_grad_norm is None:
        return tx
    return optax.chain(clip_grad_norm_as_torch(clip_grad_norm), tx)
