"""The TensorFlow-free part of the image preprocessing, shared by the tf.data pipelines (`data`),
the train and eval steps (`steps`) and `inference.Predictor`: the ImageNet statistics, their
on-device normalisation of uint8 batches, the eval transform's resize size and the argument
checks. Kept apart from `data` so the steps and a Predictor validate and normalise without
importing TensorFlow.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# torchvision's ImageNet statistics (per RGB channel, on [0, 1] pixels).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The eval transform resizes the shorter side to image_size * 256 / 224 before the center crop.
EVAL_RESIZE_RATIO = 256 / 224


def check_positive_int(name: str, value: Any) -> int:
    """`value` as an int, or a ValueError naming `name` unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def eval_resize_size(image_size: int, resize_size: int | None = None) -> int:
    """The shorter side the eval transform resizes to before cropping `image_size`: `resize_size`,
    or ``round(image_size * 256 / 224)`` when None (the ratio training validates with; torchvision's
    IMAGENET1K_V2 weights want 232 for 224). Raises naming the argument unless both are positive
    integers and the crop fits (`resize_size` >= `image_size`).
    """
    image_size = check_positive_int("image_size", image_size)
    if resize_size is None:
        return round(image_size * EVAL_RESIZE_RATIO)
    resize_size = check_positive_int("resize_size", resize_size)
    if resize_size < image_size:
        raise ValueError(
            f"resize_size {resize_size} is smaller than image_size {image_size}: the center crop "
            "is cut from the resized image, so the resize must be at least the crop"
        )
    return resize_size


def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 [..., 3] images -> float32 ``(x / 255 - IMAGENET_MEAN) / IMAGENET_STD``.

    The same float32 operations, in the same order, as the tf.data pipeline's normalisation
    (`data.train_batches(normalize=True)`), so the two agree within float32 rounding. Runs on
    the devices: the input pipeline can then send uint8 (a quarter of the bytes) and spend no
    host CPU on it. Raises ValueError naming the dtype unless `images` are uint8.
    """
    images = jnp.asarray(images)
    if images.dtype != jnp.uint8:
        raise ValueError(f"normalize_images expects uint8 images, got dtype {images.dtype}")
    scaled = images.astype(jnp.float32) / 255.0
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    return (scaled - mean) / jnp.asarray(IMAGENET_STD, jnp.float32)


def check_process(process_index: int, process_count: int) -> None:
    """ValueError naming the argument unless `process_count` is a positive integer and
    0 <= `process_index` < `process_count`."""
    check_positive_int("process_count", process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
