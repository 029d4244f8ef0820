"""Exponential moving average of the model (params and BatchNorm statistics), as torchvision's
classification reference (`utils.ExponentialMovingAverage`: `AveragedModel` with
`use_buffers=True` and `avg = decay * avg + (1 - decay) * model`).

The reference updates the average every `model_ema_steps` batches (batch index within the epoch
`% steps == 0`, after the optimizer step), first copies the model (`n_averaged == 0`) and, during
the learning-rate warmup epochs, resets `n_averaged` to 0 after each update so the average keeps
copying the model until warmup ends. Its decay is adjusted to the run's length:
`adjusted_decay`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class EmaState:
    """The averaged variables and how many updates they average (torch's `n_averaged`)."""

    params: Any
    batch_stats: Any
    n_averaged: jax.Array  # int32 scalar; 0: the next update copies the model

    def variables(self) -> dict:
        """`{"params", "batch_stats"}` for `model.apply` / evaluation / export."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def init(params: Any, batch_stats: Any) -> EmaState:
    """A copy of the model's variables with `n_averaged` 0 (as `AveragedModel`'s deepcopy)."""
    copy = jax.tree.map(jnp.array, (params, batch_stats))
    return EmaState(params=copy[0], batch_stats=copy[1], n_averaged=jnp.zeros((), jnp.int32))


def adjusted_decay(decay: float, *, global_batch_size: int, ema_steps: int, epochs: int) -> float:
    """The reference's decay for a run: `alpha = min(1, (1 - decay) * global_batch_size *
    ema_steps / epochs)`, decay `1 - alpha` (pycls's rule: an EMA horizon independent of the
    batch size, update interval and epochs; the dataset size is taken as a constant)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"model_ema_decay must be in [0, 1], got {decay}")
    if global_batch_size <= 0 or ema_steps <= 0 or epochs <= 0:
        raise ValueError(
            "adjusted_decay: global_batch_size, ema_steps and epochs must be positive, got "
            f"{global_batch_size}, {ema_steps}, {epochs}"
        )
    alpha = min(1.0, (1.0 - decay) * global_batch_size * ema_steps / epochs)
    return 1.0 - alpha


def update(ema: EmaState, params: Any, batch_stats: Any, decay: float | jax.Array) -> EmaState:
    """One `AveragedModel.update_parameters`: copy when `n_averaged` is 0, else
    `decay * avg + (1 - decay) * model` for params and BatchNorm statistics; `n_averaged + 1`."""
    first = ema.n_averaged == 0

    def average(avg, new):
        blended = decay * avg + (1.0 - decay) * new
        return jnp.where(first, new, blended.astype(avg.dtype))

    return EmaState(
        params=jax.tree.map(average, ema.params, params),
        batch_stats=jax.tree.map(average, ema.batch_stats, batch_stats),
        n_averaged=ema.n_averaged + 1,
    )


@dataclasses.dataclass(frozen=True)
class EmaSchedule:
    """When the training step updates the average: `decay` (already `adjusted_decay`), every
    `every_steps` batches of each epoch (`steps_per_epoch` batches), resetting `n_averaged`
    during the first `warmup_epochs` epochs."""

    decay: float
    steps_per_epoch: int
    every_steps: int = 32
    warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"EmaSchedule: decay must be in [0, 1], got {self.decay}")
        if self.steps_per_epoch <= 0 or self.every_steps <= 0 or self.warmup_epochs < 0:
            raise ValueError(
                "EmaSchedule: steps_per_epoch and every_steps must be positive and "
                f"warmup_epochs >= 0, got {self.steps_per_epoch}, {self.every_steps}, "
                f"{self.warmup_epochs}"
            )


def scheduled_update(
    schedule: EmaSchedule, ema: EmaState, step: jax.Array, params: Any, batch_stats: Any
) -> EmaState:
    """The average after batch `step` (0-based, counted over the whole run) trained the model to
    `params` / `batch_stats`, as the reference's loop: updated when `(step % steps_per_epoch)
    % every_steps == 0`, with `n_averaged` reset to 0 while `step // steps_per_epoch <
    warmup_epochs`; otherwise unchanged."""
    epoch, index = jnp.divmod(step, schedule.steps_per_epoch)
    updated = update(ema, params, batch_stats, schedule.decay)
    updated = updated.replace(
        n_averaged=jnp.where(epoch < schedule.warmup_epochs, 0, updated.n_averaged)
    )
    due = index % schedule.every_steps == 0
    return jax.tree.map(lambda new, old: jnp.where(due, new, old), updated, ema)
