"""TorchVision's `RandomErasing` as TensorFlow ops for tf.data map functions: one [H, W, C] image
(channels last) and a stateless philox seed (int64 [2]); the result is a pure function of the two.
The box is drawn as torchvision draws it (up to 10 attempts), from TensorFlow's philox rather than
torch's generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from resnet_jax.augment import import_tensorflow

tf = import_tensorflow()
# Python control flow here is on Python values only: AutoGraph's conversion would only slow
# tracing (several times, with the 14 branches of an op choice).
plain = tf.autograph.experimental.do_not_convert


ERASE_ATTEMPTS = 10


@plain
def erase(image: tf.Tensor, top, left, height, width, value) -> tf.Tensor:
    """[H, W, C] `image` with rows top..top+height-1 and columns left..left+width-1 set to
    `value` (a scalar, [C], or a tensor broadcastable to the image), as torchvision's `erase`."""
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    rows = tf.range(shape[0])[:, tf.newaxis, tf.newaxis]
    cols = tf.range(shape[1])[tf.newaxis, :, tf.newaxis]
    inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
    return tf.where(inside, tf.cast(value, image.dtype), image)


@plain
def random_erasing_params(
    seed: tf.Tensor,
    image_height: tf.Tensor,
    image_width: tf.Tensor,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """torchvision's `RandomErasing.get_params` from a stateless `seed`: (top, left, height,
    width) int32 of the first of 10 attempts (area uniform in `scale` of the image, aspect ratio
    log-uniform in `ratio`, sides rounded half to even) that fits strictly inside the image, at
    a uniform position; (0, 0, 0, 0), nothing erased, when none fits."""
    attempt_seed, top_seed, left_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3, alg="philox")
    )
    draws = tf.random.stateless_uniform(
        [2, ERASE_ATTEMPTS], attempt_seed, dtype=tf.float64, alg="philox"
    )
    image_height, image_width = tf.cast(image_height, tf.int32), tf.cast(image_width, tf.int32)
    area = tf.cast(image_height * image_width, tf.float64)
    erase_area = area * (scale[0] + (scale[1] - scale[0]) * draws[0])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(log_low + (log_high - log_low) * draws[1])
    heights = tf.cast(tf.round(tf.sqrt(erase_area * aspect)), tf.int32)
    widths = tf.cast(tf.round(tf.sqrt(erase_area / aspect)), tf.int32)
    fits = (heights < image_height) & (widths < image_width)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    found = tf.reduce_any(fits)
    height = tf.where(found, heights[first], 0)
    width = tf.where(found, widths[first], 0)
    top = tf.random.stateless_uniform(
        [], top_seed, 0, image_height - height + 1, tf.int32, alg="philox"
    )
    left = tf.random.stateless_uniform(
        [], left_seed, 0, image_width - width + 1, tf.int32, alg="philox"
    )
    return top, left, height, width


@plain
def random_erasing(
    image: tf.Tensor,
    seed: tf.Tensor,
    p: float = 0.5,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
    value: float | Sequence[float] | str = 0.0,
) -> tf.Tensor:
    """torchvision's `RandomErasing` on one [H, W, C] image (channels last; torchvision applies it
    to the normalised float image): with probability `p` a box from `random_erasing_params` is set
    to `value` (a number, one per channel, or "random": standard normal noise per pixel)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random erasing probability p must be in [0, 1], got {p}")
    if not (0.0 < scale[0] <= scale[1] and 0.0 < ratio[0] <= ratio[1]):
        raise ValueError(
            f"random erasing needs 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], "
            f"got scale {scale}, ratio {ratio}"
        )
    image = tf.convert_to_tensor(image)
    apply_seed, box_seed, noise_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3, alg="philox")
    )
    shape = tf.shape(image)
    top, left, height, width = random_erasing_params(box_seed, shape[0], shape[1], scale, ratio)
    applied = tf.random.stateless_uniform([], apply_seed, alg="philox") < p
    height = tf.where(applied, height, 0)
    if isinstance(value, str):
        if value != "random":
            raise ValueError(
                f"random erasing value must be a number, a sequence or 'random', got {value!r}"
            )
        value = tf.random.stateless_normal(shape, noise_seed, dtype=image.dtype, alg="philox")
    return erase(image, top, left, height, width, value)
