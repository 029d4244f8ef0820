"""TensorFlow image decoding and transforms shared by the input pipelines (`data`,
`image_folders`) and by prediction, and `import_tensorflow`, the one place that imports
TensorFlow for the package.

Decoding: JPEG bytes go through TensorFlow (training uses the fused ``decode_and_crop_jpeg``, so
only the crop is decoded); anything else (PNG, GIF, BMP, PPM/PGM, TIFF, WebP) is decoded by PIL
and converted to RGB, exactly as torchvision's loader does. TensorFlow converts grayscale and CMYK
JPEGs to RGB itself.

Training transform (`TrainAugment`, torchvision's ClassificationPresetTrain order):
random-resized-crop (area 8-100 %, aspect ratio 3/4-4/3, 10 attempts, else the whole image),
antialiased resize with its interpolation (default bilinear) rounded to uint8 (as torchvision's PIL
resize), random horizontal flip, then optionally TrivialAugmentWide or RandAugment (`autoaugment`,
torchvision's operations, magnitudes and fill 0) on the uint8 crop. Random erasing comes after
normalisation, so it is not applied here: `erase_box` draws the box, the train step erases it.
Every draw is a pure function of the example's stateless key. `ra_positions` lays out repeated
augmentation (torchvision's RASampler) for `data.train_batches`.

Eval transform, as a `preprocessing.Preprocessing` says: resize the shorter side to its
`resize_size` with its interpolation (antialiased; longer side truncated like torchvision; bicubic
results clamped to [0, 255] as PIL's uint8 output is), center crop its `eval_size`, normalise with
its mean/std. EXIF orientation is not applied (neither does torchvision).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import io
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

from resnet_jax.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    Preprocessing,
    check_positive_int,
    eval_preprocessing,
)


@functools.cache
def import_tensorflow() -> ModuleType:
    """Imports and returns `tensorflow`, with torchvision imported first when it is installed,
    and hides the GPUs from TensorFlow (the input pipeline runs on the host; accelerator memory
    is left to JAX).

    Importing torchvision after tensorflow in one process crashes it with a segmentation fault
    (torchvision 0.29 with tensorflow 2.21; the other order works), so every module of the
    package gets TensorFlow through this function. Warns if TensorFlow had already initialised
    its devices and so cannot hide the GPUs.
    """
    if importlib.util.find_spec("torchvision") is not None:
        importlib.import_module("torchvision")
    tf = importlib.import_module("tensorflow")
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as err:  # TF already initialised its devices in this process
        warnings.warn(f"could not hide GPUs from TensorFlow: {err}", RuntimeWarning, stacklevel=2)
    return tf


tf = import_tensorflow()

# Random-resized-crop parameters (torchvision's RandomResizedCrop defaults).
CROP_MIN_SCALE = 0.08
CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
_JPEG_MAGIC = b"\xff\xd8\xff"

# The functions given to tf.data here and in the pipelines use no Python control flow on tensors:
# skipping AutoGraph's source conversion makes building a pipeline several times faster.
plain = tf.autograph.experimental.do_not_convert


def _pil_rgb(data: bytes) -> np.ndarray:
    """Decodes any PIL-readable image bytes to uint8 RGB (palette, alpha, CMYK, 16-bit...)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _pil_decode(data: tf.Tensor) -> tf.Tensor:
    """Graph wrapper around `_pil_rgb` for the non-JPEG formats."""
    image = tf.numpy_function(_pil_rgb, [data], tf.uint8, stateful=False)
    image.set_shape([None, None, 3])
    return image


@functools.partial(tf.function, input_signature=[tf.TensorSpec([], tf.string)], autograph=False)
def decode(data: tf.Tensor) -> tf.Tensor:
    """Encoded bytes -> uint8 [H, W, 3]: TensorFlow for JPEG, PIL for everything else."""
    return tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3),
        lambda: _pil_decode(data),
    )


def probe(data: tf.Tensor) -> tf.Tensor:
    """Decodes like `decode`, cheaply (JPEG at 1/8 scale, same entropy decoding): vets a file."""
    return tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.shape(tf.io.decode_jpeg(data, channels=3, ratio=8)),
        lambda: tf.shape(_pil_decode(data)),
    )


def normalize(
    image: tf.Tensor,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> tf.Tensor:
    """uint8-valued [..., 3] -> float32 (x / 255 - mean) / std, as torchvision's transforms."""
    image = tf.cast(image, tf.float32) / 255.0
    return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def _sample_crop(
    shape: tf.Tensor, seed: tf.Tensor, min_scale: float
) -> tuple[tf.Tensor, tf.Tensor]:
    """Random-resized-crop window (begin [y, x, 0], size [h, w, -1]) for an image of `shape`,
    covering a fraction in [min_scale, 1] of its area."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=CROP_ASPECT_RANGE,
        area_range=(min_scale, 1.0),
        max_attempts=CROP_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, size


def _decode_random_crop(data: tf.Tensor, seed: tf.Tensor, min_scale: float) -> tf.Tensor:
    """Decodes only a random-resized-crop window of the image (fused for JPEG)."""

    def jpeg() -> tf.Tensor:
        begin, size = _sample_crop(tf.image.extract_jpeg_shape(data), seed, min_scale)
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        return tf.image.decode_and_crop_jpeg(data, window, channels=3)

    def other() -> tf.Tensor:
        image = _pil_decode(data)
        begin, size = _sample_crop(tf.shape(image), seed, min_scale)
        return tf.slice(image, begin, size)

    return tf.cond(tf.io.is_jpeg(data), jpeg, other)


AUTO_AUGMENTS = ("none", "ta_wide", "ra")
# fold_in tags deriving the auto-augment and erasing keys from an example's key (the crop and
# flip keys are its two splits).
_AUTO_AUGMENT_TAG, _ERASE_TAG = 1, 2


@dataclasses.dataclass(frozen=True)
class TrainAugment:
    """The training augmentation, in torchvision's ClassificationPresetTrain order:
    RandomResizedCrop(`crop_size`, scale=(`crop_min_scale`, 1), `interpolation`), horizontal
    flip with probability `hflip`, `auto_augment` ("ta_wide": TrivialAugmentWide, "ra":
    RandAugment with `ra_num_ops` ops at magnitude `ra_magnitude`, "none"), then (after
    normalisation, in the train step) random erasing with probability `random_erase`.

    `interpolation` sets the crop's resize and, as torchvision's preset hands it on, the
    auto-augment's geometric ops, which (as torchvision's tensor transforms) sample bilinear or
    nearest only: bicubic with an auto-augment is an error."""

    crop_size: int
    crop_min_scale: float = CROP_MIN_SCALE
    interpolation: str = "bilinear"
    hflip: float = 0.5
    auto_augment: str = "none"
    ra_magnitude: int = 9
    ra_num_ops: int = 2
    random_erase: float = 0.0

    def __post_init__(self) -> None:
        check_positive_int("crop_size", self.crop_size)
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )
        if self.auto_augment not in AUTO_AUGMENTS:
            raise ValueError(
                f"auto_augment must be one of {', '.join(AUTO_AUGMENTS)}, got {self.auto_augment!r}"
            )
        if self.auto_augment != "none" and self.interpolation == "bicubic":
            raise ValueError(
                f"interpolation bicubic with auto_augment {self.auto_augment!r}: the "
                "auto-augment's geometric ops sample bilinear or nearest (as torchvision's tensor "
                "transforms); use bilinear, or auto_augment 'none'"
            )
        if not 0.0 < self.crop_min_scale <= 1.0:
            raise ValueError(f"crop_min_scale must be in (0, 1], got {self.crop_min_scale}")
        for name in ("hflip", "random_erase"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"{name} must be a probability in [0, 1], got {getattr(self, name)}"
                )
        if not 0 <= self.ra_magnitude < 31:
            raise ValueError(f"ra_magnitude must be in [0, 31), got {self.ra_magnitude}")
        if not isinstance(self.ra_num_ops, int) or self.ra_num_ops < 0:
            raise ValueError(f"ra_num_ops must be a non-negative integer, got {self.ra_num_ops!r}")


def train_augment(augment: TrainAugment | None, image_size: int | None) -> TrainAugment:
    """`augment`, or `TrainAugment(crop_size=image_size)`; an error if they disagree."""
    if augment is None:
        if image_size is None:
            raise ValueError("train_batches needs augment or image_size")
        check_positive_int("image_size", image_size)
        return TrainAugment(crop_size=image_size)
    if image_size is not None and image_size != augment.crop_size:
        raise ValueError(
            f"image_size {image_size} disagrees with augment.crop_size {augment.crop_size}"
        )
    return augment


def ra_positions(
    order: np.ndarray, reps: int, replicas: int, per_replica_batch: int, steps: int
) -> np.ndarray:
    """Repeated augmentation as torchvision's RASampler: every index of `order` repeated `reps`
    times in a row, replica r taking every `replicas`-th entry from r (so the repeats of an image
    go to consecutive replicas). Returns [steps, replicas, per_replica_batch, 2] (index,
    repetition): global batch g holds entries [g*b, (g+1)*b) of every replica's stream.
    (RASampler's padding to a multiple of the replicas lies past any batch kept: the epoch is at
    most n entries of the n * reps.)"""
    stream = np.stack([np.repeat(order, reps), np.tile(np.arange(reps), len(order))], -1)
    chunk = stream[: steps * per_replica_batch * replicas]
    return chunk.reshape(steps, per_replica_batch, replicas, 2).transpose(0, 2, 1, 3)


def auto_augment_key(key: tf.Tensor) -> tf.Tensor:
    """The auto-augment seed of an example with stateless `key` (int64 [2])."""
    return tf.random.experimental.stateless_fold_in(key, _AUTO_AUGMENT_TAG, alg="philox")


def erase_box(key: tf.Tensor, size: int, p: float) -> tf.Tensor:
    """The random-erasing box of an example with stateless `key` in a `size` x `size` image:
    int32 [top, left, height, width] from torchvision's RandomErasing draw (scale 0.02-0.33,
    ratio 0.3-3.3, 10 attempts) with probability `p`, else zeros (also when no attempt fits)."""
    from resnet_jax.random_erasing import random_erasing_params  # imports this module

    erase_key = tf.random.experimental.stateless_fold_in(key, _ERASE_TAG, alg="philox")
    apply_key, box_key = tf.unstack(tf.random.experimental.stateless_split(erase_key, 2, "philox"))
    box = tf.stack(random_erasing_params(box_key, size, size))
    applied = (tf.random.stateless_uniform([], apply_key, alg="philox") < p) & (box[2] > 0)
    return tf.where(applied, box, tf.zeros_like(box))


def _train_transform(data: tf.Tensor, key: tf.Tensor, augment: TrainAugment) -> tf.Tensor:
    """Encoded image + stateless key -> augmented uint8 [S, S, 3] (all but the erasing).

    The resized crop is rounded to uint8 as torchvision's PIL transforms do; `train_batches`
    normalises whole batches (a quarter of the bytes per image to batch, one op per batch)."""
    from resnet_jax import autoaugment  # imports this module

    crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2, alg="philox"))
    image = _decode_random_crop(data, crop_key, augment.crop_min_scale)
    size, method = augment.crop_size, augment.interpolation
    image = tf.image.resize(image, [size, size], method=method, antialias=True)
    image = tf.cast(image, tf.float32)  # nearest keeps the input's uint8
    image = tf.ensure_shape(image, [size, size, 3])  # the ops need the static shape
    flip = tf.random.stateless_uniform([], flip_key) < augment.hflip
    image = tf.where(flip, tf.reverse(image, [1]), image)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
    if augment.auto_augment == "ta_wide":
        image = autoaugment.trivial_augment_wide(image, auto_augment_key(key), interpolation=method)
    elif augment.auto_augment == "ra":
        image = autoaugment.rand_augment(
            image,
            auto_augment_key(key),
            augment.ra_num_ops,
            augment.ra_magnitude,
            interpolation=method,
        )
    return image


def _eval_transform(image: tf.Tensor, preprocessing: Preprocessing) -> tf.Tensor:
    """uint8 [H, W, 3] -> shorter side resized to `preprocessing.resize_size` with its
    interpolation, center crop `eval_size`, normalise with its mean/std: float32 [S, S, 3]."""
    image_size, resize_size = preprocessing.eval_size, preprocessing.resize_size
    method = preprocessing.interpolation
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    # torchvision's Resize(int): the shorter side becomes `resize_size`, the longer one is
    # truncated.
    shorter = tf.minimum(height, width)
    new_h = tf.where(height <= width, resize_size, height * resize_size // shorter)
    new_w = tf.where(height <= width, width * resize_size // shorter, resize_size)
    image = tf.image.resize(image, tf.stack([new_h, new_w]), method=method, antialias=True)
    if method == "bicubic":  # the cubic kernel overshoots; PIL's uint8 result is clamped
        image = tf.clip_by_value(image, 0.0, 255.0)
    # torchvision's CenterCrop: offsets round((size - crop) / 2), half to even.
    top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float64) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float64) / 2.0), tf.int32)
    image = tf.slice(image, tf.stack([top, left, 0]), [image_size, image_size, 3])
    return normalize(image, preprocessing.mean, preprocessing.std)


@functools.cache
def train_fn(augment: TrainAugment) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """`_train_transform` traced once per augmentation (pipelines are built once per epoch)."""
    return tf.function(
        functools.partial(_train_transform, augment=augment),
        input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([2], tf.int64)],
        autograph=False,
    )


@functools.cache
def eval_fn(preprocessing: Preprocessing) -> Callable[[tf.Tensor], tf.Tensor]:
    """`_eval_transform` traced once per preprocessing, shared by `eval_batches` and
    prediction."""
    return tf.function(
        functools.partial(_eval_transform, preprocessing=preprocessing),
        input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)],
        autograph=False,
    )


def clean_tf_message(err: tf.errors.OpError) -> str:
    """TF op error without the `{{function_node ...}}` and `[Op:...]` decorations."""
    message = re.sub(r"\{\{[^}]*\}\}\s*", "", err.message)
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", message, flags=re.S).strip()


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file as uint8 [H, W, 3] RGB with the decoders the pipelines use."""
    data = Path(path).read_bytes()
    if not data:
        raise ValueError(f"cannot decode image {path}: the file is empty")
    if data.startswith(_JPEG_MAGIC):
        try:
            return tf.io.decode_jpeg(data, channels=3).numpy()
        except tf.errors.OpError as err:
            raise ValueError(f"cannot decode image {path}: {clean_tf_message(err)}") from err
    try:
        return _pil_rgb(data)
    except Image.UnidentifiedImageError as err:
        raise ValueError(f"cannot decode image {path}: not a known image format") from err
    except Exception as err:  # PIL's plugins raise many types on broken or unknown files
        raise ValueError(f"cannot decode image {path}: {err}") from err


def preprocess_for_eval(
    image_uint8: np.ndarray,
    image_size: int | None = None,
    *,
    preprocessing: Preprocessing | None = None,
) -> np.ndarray:
    """The evaluation transform for one decoded image (e.g. from `load_image`), for prediction:
    as `preprocessing` says, or `default_preprocessing(image_size)` when it is None (see
    `preprocessing.eval_preprocessing`)."""
    image = np.asarray(image_uint8)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"expected a uint8 [H, W, 3] RGB image, got dtype {image.dtype} shape {image.shape}"
        )
    preprocessing = eval_preprocessing(image_size, preprocessing)
    return eval_fn(preprocessing)(tf.constant(image)).numpy()
