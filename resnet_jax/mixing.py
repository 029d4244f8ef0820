"""MixUp and CutMix inside the compiled training step, as torchvision's `transforms.v2`.

Per batch (and per micro-batch under gradient accumulation) one of the enabled transforms is
chosen uniformly (torchvision's `RandomChoice([MixUp, CutMix])`), with `lam ~ Beta(alpha,
alpha)`; each example is mixed with its predecessor in the batch (the batch rolled by one) and
the one-hot targets likewise: MixUp blends whole images `lam * x + (1 - lam) * rolled`, CutMix
pastes the rolled batch's box (centre uniform over the pixels, half-sides
`int(0.5 * sqrt(1 - lam) * size)`, clipped to the image) and uses `lam` adjusted to the box's
actual area. Label smoothing is then applied by the loss to these soft targets, as torch's
`CrossEntropyLoss(label_smoothing)` does.

Randomness: every draw (the choice, `lam`, the box) is one per global batch, from
`fold_in(fold_in(key(seed), step), micro_batch)`, the same on every replica; the roll is over
the global batch (the last example of each replica's shard travels to the next replica, one
`ppermute` of one example). So the mixed global batch depends on (seed, step, global batch)
only, not on the device count.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Mixing:
    """MixUp / CutMix settings: an alpha of 0 disables that transform; `seed` keys the draws."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(
                "mixup_alpha and cutmix_alpha must be >= 0, got "
                f"{self.mixup_alpha}, {self.cutmix_alpha}"
            )
        if not self.enabled:
            raise ValueError("Mixing needs mixup_alpha > 0 or cutmix_alpha > 0")

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def roll_batch(x: jax.Array, axis_name: str | None = None) -> jax.Array:
    """`x` rolled by one along the batch: example i gets example i - 1 (the first the last).

    With `axis_name` (a mapped step, `x` a replica's shard of the global batch in axis order),
    the roll is over the global batch: each shard's last example moves to the next replica.
    """
    if axis_name is None:
        return jnp.roll(x, 1, axis=0)
    n = jax.lax.axis_size(axis_name)
    previous_last = jax.lax.ppermute(x[-1:], axis_name, perm=[(i, (i + 1) % n) for i in range(n)])
    return jnp.concatenate([previous_last, x[:-1]], axis=0)


def mix(x: jax.Array, rolled: jax.Array, lam: jax.Array) -> jax.Array:
    """`lam * x + (1 - lam) * rolled` (MixUp of images or targets; CutMix of targets)."""
    return x * lam + rolled * (1.0 - lam)


def cutmix_box(
    lam: jax.Array, center_y: jax.Array, center_x: jax.Array, height: int, width: int
) -> tuple[jax.Array, jax.Array]:
    """CutMix's box `(y1, y2, x1, x2)` (int32, end exclusive) around the centre for `lam`, and
    `lam` adjusted to the clipped box's area: `1 - (y2 - y1) * (x2 - x1) / (height * width)`."""
    r = 0.5 * jnp.sqrt(1.0 - lam)
    half_w = jnp.floor(r * width).astype(jnp.int32)
    half_h = jnp.floor(r * height).astype(jnp.int32)
    y1, y2 = jnp.maximum(center_y - half_h, 0), jnp.minimum(center_y + half_h, height)
    x1, x2 = jnp.maximum(center_x - half_w, 0), jnp.minimum(center_x + half_w, width)
    area = ((y2 - y1) * (x2 - x1)).astype(jnp.float32)
    return jnp.stack([y1, y2, x1, x2]), 1.0 - area / (height * width)


def paste_box(images: jax.Array, rolled: jax.Array, box: jax.Array) -> jax.Array:
    """NHWC `images` with `rolled`'s pixels inside `box` (`cutmix_box`)."""
    ys = jnp.arange(images.shape[1])[:, None]
    xs = jnp.arange(images.shape[2])[None, :]
    inside = (ys >= box[0]) & (ys < box[1]) & (xs >= box[2]) & (xs < box[3])
    return jnp.where(inside[None, :, :, None], rolled, images)


def mix_batch(
    mixing: Mixing,
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`(images, soft_targets)`: the NHWC float `images` and integer `labels` of one (global)
    batch after MixUp or CutMix (chosen with `key`, the same on every replica); targets are
    float32 `(batch, num_classes)` probabilities, without label smoothing."""
    key_choice, key_lam, key_y, key_x = jax.random.split(key, 4)
    height, width = images.shape[1], images.shape[2]
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    rolled_images = roll_batch(images, axis_name)
    rolled_targets = roll_batch(targets, axis_name)
    if mixing.mixup_alpha > 0 and mixing.cutmix_alpha > 0:
        use_cutmix = jax.random.bernoulli(key_choice)
    else:
        use_cutmix = jnp.asarray(mixing.cutmix_alpha > 0)
    alpha = jnp.where(use_cutmix, mixing.cutmix_alpha, mixing.mixup_alpha)
    lam = jax.random.beta(key_lam, alpha, alpha, dtype=jnp.float32)
    center_y = jax.random.randint(key_y, (), 0, height)
    center_x = jax.random.randint(key_x, (), 0, width)
    box, cut_lam = cutmix_box(lam, center_y, center_x, height, width)
    mixed = jnp.where(
        use_cutmix,
        paste_box(images, rolled_images, box),
        mix(images, rolled_images, lam.astype(images.dtype)),
    )
    target_lam = jnp.where(use_cutmix, cut_lam, lam)
    return mixed, mix(targets, rolled_targets, target_lam)


def step_key(mixing: Mixing, step: jax.Array, micro_batch: jax.Array | int = 0) -> jax.Array:
    """The key of one (micro-)batch's draws: `fold_in(fold_in(key(seed), step), micro_batch)`."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(mixing.seed), step), micro_batch)
