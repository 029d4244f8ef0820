"""TorchVision's automatic augmentations, TrivialAugmentWide and RandAugment, as TensorFlow ops for
tf.data map functions: each takes one uint8 [H, W, 3] image and a stateless philox seed (int64
[2], as `augment` derives per example), and its result is a pure function of the two, so a resumed
run augments bit-exactly as the uninterrupted one.

The operations (`apply_op`) reproduce torchvision 0.29's `transforms.autoaugment._apply_op` on a
uint8 tensor: the affine ones (ShearX/Y about the top-left corner, TranslateX/Y by whole pixels,
Rotate about the centre) with torchvision's tensor warp (`affine_warp`: nearest, the transforms'
default, or bilinear, what torchvision's training preset passes; pixels from outside the image
take `fill`, 0 when None); Brightness, Color, Contrast and Sharpness as float32 blends truncated
to uint8 (`_blend`) with black, the grayscale image, the grayscale mean and the 3x3
(1, 1, 1 / 1, 5, 1 / 1, 1, 1) / 13 blur (border pixels unblurred);
Posterize (keep the top bits), Solarize (invert values >= the threshold), AutoContrast (per
channel min-max stretch) and Equalize (torchvision's histogram lookup table) exactly. The
augmentation spaces, magnitude bins and signs are torchvision's. Random draws use TensorFlow's
philox, not torch's generator: the distributions are torchvision's, not its random streams.
"""

from __future__ import annotations

import dataclasses
import math

from resnet_jax import affine_warp
from resnet_jax.augment import import_tensorflow

tf = import_tensorflow()
# Python control flow here is on Python values only: AutoGraph's conversion would only slow
# tracing (several times, with the 14 branches of an op choice).
plain = tf.autograph.experimental.do_not_convert


@dataclasses.dataclass(frozen=True)
class _Linear:
    """Magnitudes `torch.linspace(start, end, num_bins)`, negated with probability 1/2 when
    `signed`; `end` is multiplied by the image height (axis 0) or width (axis 1) when `axis` is
    set (RandAugment's translations)."""

    start: float
    end: float
    signed: bool
    axis: int | None = None


@dataclasses.dataclass(frozen=True)
class _PosterizeBits:
    """Posterize bits `8 - round(arange(num_bins) / ((num_bins - 1) / spread))`."""

    spread: int


# op -> magnitudes (None: the op takes none), in torchvision's order (the op index drawn picks
# from it).
TRIVIAL_AUGMENT_WIDE_SPACE: dict[str, _Linear | _PosterizeBits | None] = {
    "Identity": None,
    "ShearX": _Linear(0.0, 0.99, True),
    "ShearY": _Linear(0.0, 0.99, True),
    "TranslateX": _Linear(0.0, 32.0, True),
    "TranslateY": _Linear(0.0, 32.0, True),
    "Rotate": _Linear(0.0, 135.0, True),
    "Brightness": _Linear(0.0, 0.99, True),
    "Color": _Linear(0.0, 0.99, True),
    "Contrast": _Linear(0.0, 0.99, True),
    "Sharpness": _Linear(0.0, 0.99, True),
    "Posterize": _PosterizeBits(6),
    "Solarize": _Linear(255.0, 0.0, False),
    "AutoContrast": None,
    "Equalize": None,
}
RAND_AUGMENT_SPACE: dict[str, _Linear | _PosterizeBits | None] = {
    "Identity": None,
    "ShearX": _Linear(0.0, 0.3, True),
    "ShearY": _Linear(0.0, 0.3, True),
    "TranslateX": _Linear(0.0, 150.0 / 331.0, True, axis=1),
    "TranslateY": _Linear(0.0, 150.0 / 331.0, True, axis=0),
    "Rotate": _Linear(0.0, 30.0, True),
    "Brightness": _Linear(0.0, 0.9, True),
    "Color": _Linear(0.0, 0.9, True),
    "Contrast": _Linear(0.0, 0.9, True),
    "Sharpness": _Linear(0.0, 0.9, True),
    "Posterize": _PosterizeBits(4),
    "Solarize": _Linear(255.0, 0.0, False),
    "AutoContrast": None,
    "Equalize": None,
}
OPS = tuple(TRIVIAL_AUGMENT_WIDE_SPACE)


def _blend(image: tf.Tensor, other: tf.Tensor, ratio: tf.Tensor) -> tf.Tensor:
    """torchvision's `_blend`: float32 ratio * image + (1 - ratio) * other, clamped, truncated."""
    ratio = tf.cast(ratio, tf.float64)
    mixed = tf.cast(ratio, tf.float32) * tf.cast(image, tf.float32) + tf.cast(
        1.0 - ratio, tf.float32
    ) * tf.cast(other, tf.float32)
    return tf.cast(tf.clip_by_value(mixed, 0.0, 255.0), tf.uint8)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
    """torchvision's `rgb_to_grayscale` on uint8: float32 0.2989 R + 0.587 G + 0.114 B,
    truncated; [H, W, 1]."""
    r, g, b = tf.unstack(tf.cast(image, tf.float32), axis=-1)
    return tf.cast(0.2989 * r + 0.587 * g + 0.114 * b, tf.uint8)[..., tf.newaxis]


def _contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blend with the mean of the grayscale image (summed exactly in int64, one float32
    division: torch's float32 sum is exact up to 2**24 / 255 pixels)."""
    gray = tf.cast(_grayscale(image), tf.int64)
    mean = tf.cast(tf.reduce_sum(gray), tf.float32) / tf.cast(tf.size(gray), tf.float32)
    return _blend(image, mean, factor)


def _sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blend with the image blurred by torchvision's 3x3 kernel (centre weight 5 of 13), the
    one-pixel border left unblurred; images under 3x3 pixels are returned as they are.

    The blur is an integer sum rounded by integer division: a sum of integers over 13 is never
    halfway between integers, so this equals torch's float32 convolution rounded."""

    def sharpen() -> tf.Tensor:
        pixels = tf.cast(image, tf.int32)
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        rows_sum = pixels[:, :-2] + pixels[:, 1:-1] + pixels[:, 2:]
        total = rows_sum[:-2] + rows_sum[1:-1] + rows_sum[2:] + 4 * pixels[1:-1, 1:-1]
        blurred = tf.pad((2 * total + 13) // 26, [[1, 1], [1, 1], [0, 0]])
        rows = tf.range(height)[:, tf.newaxis, tf.newaxis]
        cols = tf.range(width)[tf.newaxis, :, tf.newaxis]
        interior = (rows > 0) & (rows < height - 1) & (cols > 0) & (cols < width - 1)
        return _blend(image, tf.where(interior, blurred, pixels), factor)

    shape = tf.shape(image)
    return tf.cond((shape[0] > 2) & (shape[1] > 2), sharpen, lambda: image)


def _posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
    """Keeps the top `bits` bits of each value (0 bits: black)."""
    bits = tf.cast(bits, tf.int32)
    mask = tf.cast(tf.bitwise.left_shift(255, 8 - bits) & 255, tf.uint8)
    return tf.bitwise.bitwise_and(image, mask)


def _solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
    """Inverts the values >= `threshold` (compared in float32, as torch)."""
    above = tf.cast(image, tf.float32) >= tf.cast(threshold, tf.float32)
    return tf.where(above, 255 - image, image)


def _autocontrast(image: tf.Tensor) -> tf.Tensor:
    """Per channel, (x - min) * 255 / (max - min) in float32, truncated; constant channels are
    left as they are."""
    pixels = tf.cast(image, tf.float32)
    low = tf.reduce_min(pixels, axis=[0, 1])
    high = tf.reduce_max(pixels, axis=[0, 1])
    flat = tf.equal(high, low)
    scale = tf.where(flat, 1.0, 255.0 / tf.where(flat, 1.0, high - low))
    low = tf.where(flat, 0.0, low)
    return tf.cast(tf.clip_by_value((pixels - low) * scale, 0.0, 255.0), tf.uint8)


def _equalize(image: tf.Tensor) -> tf.Tensor:
    """torchvision's tensor `equalize`, per channel: step = (pixels - count of the highest value
    present) // 255; the lookup table is (cumulative histogram + step // 2) // step shifted one
    value up; a channel with step 0 is left as it is."""
    channels = image.shape[-1]
    offsets = tf.range(channels) * 256
    values = tf.reshape(tf.cast(image, tf.int32), [-1, channels]) + offsets
    hist = tf.reshape(
        tf.math.bincount(values, minlength=256 * channels, maxlength=256 * channels),
        [channels, 256],
    )
    top = tf.reduce_max(values, axis=0) - offsets
    step = (tf.reduce_sum(hist, axis=1) - tf.gather(hist, top, batch_dims=1)) // 255
    step = step[:, tf.newaxis]
    lut = (tf.cumsum(hist, axis=1) + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(tf.pad(lut[:, :-1], [[0, 0], [1, 0]]), 0, 255)
    lut = tf.where(step == 0, tf.range(256)[tf.newaxis, :], lut)
    return tf.reshape(tf.cast(tf.gather(tf.reshape(lut, [-1]), values), tf.uint8), tf.shape(image))


@plain
def apply_op(
    image: tf.Tensor,
    op: str,
    magnitude: float | tf.Tensor,
    fill: affine_warp.Fill = None,
    interpolation: str = "nearest",
) -> tf.Tensor:
    """One torchvision augmentation `op` (a name in `OPS`) with an explicit `magnitude` (already
    signed) on a uint8 [H, W, 3] image, as torchvision's `_apply_op` with `interpolation`
    ("nearest" or "bilinear", for the affine ops)."""
    affine_warp.check_interpolation(interpolation)
    if op not in OPS:
        raise ValueError(f"unknown augmentation op {op!r}; expected one of {', '.join(OPS)}")
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8:
        raise ValueError(f"apply_op needs a uint8 image, got {image.dtype.name}")
    if not isinstance(magnitude, tf.Tensor):  # tf.cast would round a Python float to float32
        magnitude = tf.constant(magnitude, tf.float64)
    magnitude = tf.cast(magnitude, tf.float64)
    shape = tf.shape(image)
    half_h, half_w = tf.cast(shape[0], tf.float64) * 0.5, tf.cast(shape[1], tf.float64) * 0.5
    shear_angle = tf.atan(magnitude) * (180.0 / math.pi)
    shift = tf.cast(tf.cast(magnitude, tf.int64), tf.float64)  # int() truncates toward zero
    zero = tf.constant(0.0, tf.float64)
    matrix = None  # the affine ops' inverse matrix
    if op in ("ShearX", "ShearY"):
        shear = (shear_angle, zero) if op == "ShearX" else (zero, shear_angle)
        matrix = affine_warp.inverse_affine_matrix((-half_w, -half_h), zero, (0.0, 0.0), shear)
    elif op in ("TranslateX", "TranslateY"):
        translate = (shift, 0.0) if op == "TranslateX" else (0.0, shift)
        matrix = affine_warp.inverse_affine_matrix((0.0, 0.0), zero, translate, (zero, zero))
    elif op == "Rotate":
        matrix = affine_warp.inverse_affine_matrix((0.0, 0.0), -magnitude, (0.0, 0.0), (zero, zero))
    if matrix is not None:
        return affine_warp.affine(image, matrix, fill, interpolation)
    if op == "Brightness":
        return _blend(image, tf.zeros_like(image), 1.0 + magnitude)
    if op == "Color":
        return _blend(image, _grayscale(image), 1.0 + magnitude)
    if op == "Contrast":
        return _contrast(image, 1.0 + magnitude)
    if op == "Sharpness":
        return _sharpness(image, 1.0 + magnitude)
    if op == "Posterize":
        return _posterize(image, tf.cast(magnitude, tf.int32))
    if op == "Solarize":
        return _solarize(image, magnitude)
    if op == "AutoContrast":
        return _autocontrast(image)
    if op == "Equalize":
        return _equalize(image)
    return image


def _linspace_at(start: tf.Tensor, end: tf.Tensor, num: int, index: tf.Tensor) -> tf.Tensor:
    """Entry `index` of float32 `torch.linspace(start, end, num)` (torch's scalar formula: from
    the start for the first half, from the end for the second)."""
    start, end = tf.cast(start, tf.float32), tf.cast(end, tf.float32)
    step = (end - start) / float(num - 1)
    from_start = start + step * tf.cast(index, tf.float32)
    from_end = end - step * tf.cast(num - 1 - index, tf.float32)
    return tf.where(index < num // 2, from_start, from_end)


@plain
def op_magnitude(
    space: dict,
    op: str,
    bin_index: tf.Tensor,
    negate: tf.Tensor,
    num_bins: int,
    image_shape: tf.Tensor,
) -> tf.Tensor:
    """The float64 magnitude of `op` at `bin_index` of `space` (negated when `negate` and the op
    is signed), for an image of `image_shape` [H, W, ...]; 0 for ops without magnitudes."""
    spec = space[op]
    bin_index = tf.cast(bin_index, tf.int32)
    if spec is None:
        return tf.constant(0.0, tf.float64)
    if isinstance(spec, _PosterizeBits):
        ratio = tf.cast(bin_index, tf.float32) / tf.constant(
            (num_bins - 1) / spec.spread, tf.float32
        )
        return tf.cast(8 - tf.cast(tf.round(ratio), tf.int32), tf.float64)
    end = spec.end
    if spec.axis is not None:
        end = tf.cast(spec.end * tf.cast(image_shape[spec.axis], tf.float64), tf.float32)
    value = tf.cast(_linspace_at(spec.start, end, num_bins, bin_index), tf.float64)
    return tf.where(tf.cast(negate, tf.bool) & spec.signed, -value, value)


def _check_bins(num_magnitude_bins: int) -> None:
    if not isinstance(num_magnitude_bins, int) or num_magnitude_bins < 2:
        raise ValueError(f"num_magnitude_bins must be an integer >= 2, got {num_magnitude_bins!r}")


def _apply_drawn_op(
    image, space, op_index, bin_index, negate, num_bins, fill, interpolation
) -> tf.Tensor:
    """`apply_op` with the op `space[op_index]` chosen in the graph (only that branch runs)."""
    shape = tf.shape(image)

    def branch(op: str):
        magnitude = op_magnitude(space, op, bin_index, negate, num_bins, shape)
        return lambda: apply_op(image, op, magnitude, fill, interpolation)

    return tf.switch_case(tf.cast(op_index, tf.int32), [branch(op) for op in space])


@plain
def trivial_augment_wide_params(
    seed: tf.Tensor, num_magnitude_bins: int = 31
) -> tuple[tf.Tensor, ...]:
    """TrivialAugmentWide's draw for `seed`: (op index into `TRIVIAL_AUGMENT_WIDE_SPACE`,
    magnitude bin, negate), each uniform, as int32 scalars."""
    _check_bins(num_magnitude_bins)
    op_seed, bin_seed, sign_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3, alg="philox")
    )
    draw = lambda s, n: tf.random.stateless_uniform([], s, 0, n, tf.int32, alg="philox")  # noqa: E731
    return draw(op_seed, len(OPS)), draw(bin_seed, num_magnitude_bins), draw(sign_seed, 2)


@plain
def trivial_augment_wide(
    image: tf.Tensor,
    seed: tf.Tensor,
    num_magnitude_bins: int = 31,
    fill: affine_warp.Fill = None,
    interpolation: str = "nearest",
) -> tf.Tensor:
    """torchvision's `TrivialAugmentWide` on a uint8 [H, W, 3] image: one op, one magnitude bin
    and one sign drawn uniformly from the stateless `seed` (int64 [2])."""
    affine_warp.check_interpolation(interpolation)
    op_index, bin_index, negate = trivial_augment_wide_params(seed, num_magnitude_bins)
    space = TRIVIAL_AUGMENT_WIDE_SPACE
    return _apply_drawn_op(
        image, space, op_index, bin_index, negate, num_magnitude_bins, fill, interpolation
    )


@plain
def rand_augment_params(seed: tf.Tensor, num_ops: int = 2) -> tuple[tf.Tensor, tf.Tensor]:
    """RandAugment's draws for `seed`: op indices into `RAND_AUGMENT_SPACE` and negate flags,
    int32 [num_ops] each, uniform and independent."""
    op_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2, alg="philox"))
    ops = tf.random.stateless_uniform(
        [num_ops], op_seed, 0, len(RAND_AUGMENT_SPACE), tf.int32, alg="philox"
    )
    return ops, tf.random.stateless_uniform([num_ops], sign_seed, 0, 2, tf.int32, alg="philox")


@plain
def rand_augment(
    image: tf.Tensor,
    seed: tf.Tensor,
    num_ops: int = 2,
    magnitude: int = 9,
    num_magnitude_bins: int = 31,
    fill: affine_warp.Fill = None,
    interpolation: str = "nearest",
) -> tf.Tensor:
    """torchvision's `RandAugment` on a uint8 [H, W, 3] image: `num_ops` ops drawn uniformly (with
    replacement) from the stateless `seed`, each at magnitude bin `magnitude` with a random sign,
    applied in turn."""
    _check_bins(num_magnitude_bins)
    affine_warp.check_interpolation(interpolation)
    if not 0 <= magnitude < num_magnitude_bins:
        raise ValueError(f"magnitude must be in [0, {num_magnitude_bins}), got {magnitude}")
    if num_ops < 0:
        raise ValueError(f"num_ops must be >= 0, got {num_ops}")
    ops, negate = rand_augment_params(seed, num_ops)
    for i in range(num_ops):
        image = _apply_drawn_op(
            image,
            RAND_AUGMENT_SPACE,
            ops[i],
            magnitude,
            negate[i],
            num_magnitude_bins,
            fill,
            interpolation,
        )
    return image
