"""The TensorFlow-free part of the image preprocessing, shared by the tf.data pipelines (`data`),
the train and eval steps (`steps`), `inference.Predictor`, model directories and pretrained
weights: `Preprocessing` (the eval transform's parameters, stored with the weights),
`default_preprocessing`, the ImageNet statistics, their on-device normalisation of uint8 batches
and the argument checks. Kept apart from `data` so the steps and a Predictor validate and
normalise without importing TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# torchvision's ImageNet statistics (per RGB channel, on [0, 1] pixels).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The default eval transform resizes the shorter side to image_size * 256 / 224 before the crop.
EVAL_RESIZE_RATIO = 256 / 224
# Resampling filters of the eval resize (names as timm's pretrained configs spell them).
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# How far below an integer eval_size / crop_pct may fall and still count as that integer: a
# crop_pct computed as eval_size / resize_size divides back to resize_size only within rounding.
_FLOOR_SLACK = 1e-6


def check_positive_int(name: str, value: Any) -> int:
    """`value` as an int, or a ValueError naming `name` unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _channel_stats(name: str, value: Any) -> tuple[float, float, float]:
    """`value` as three floats (per RGB channel), or a ValueError naming `name`; `std` entries
    must be positive, all must be finite."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
        raise ValueError(f"{name} must be three numbers (one per RGB channel), got {value!r}")
    if len(value) != 3 or any(
        isinstance(v, bool) or not isinstance(v, int | float | np.number) for v in value
    ):
        raise ValueError(f"{name} must be three numbers (one per RGB channel), got {value!r}")
    stats = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in stats) or (name == "std" and min(stats) <= 0):
        kind = "positive" if name == "std" else "finite"
        raise ValueError(f"{name} must be three {kind} numbers, got {value!r}")
    return stats  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for evaluation: resize the shorter side to `resize_size` with
    `interpolation` (one of `INTERPOLATIONS`), center-crop `eval_size` (so `crop_pct` is about
    `eval_size / resize_size`, in (0, 1]), scale to [0, 1] and normalise per RGB channel with
    `mean` and `std`. Construction checks every field and raises ValueError naming the bad one;
    `mean` and `std` are stored as tuples of floats."""

    eval_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        set_field = object.__setattr__  # the dataclass is frozen; fields are normalised once here
        set_field(self, "eval_size", check_positive_int("eval_size", self.eval_size))
        crop = self.crop_pct
        if isinstance(crop, bool) or not isinstance(crop, int | float | np.number):
            raise ValueError(f"crop_pct must be a number in (0, 1], got {crop!r}")
        if not 0.0 < float(crop) <= 1.0:
            raise ValueError(f"crop_pct must be a number in (0, 1], got {crop!r}")
        set_field(self, "crop_pct", float(crop))
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )
        set_field(self, "mean", _channel_stats("mean", self.mean))
        set_field(self, "std", _channel_stats("std", self.std))

    @property
    def resize_size(self) -> int:
        """Shorter side before the center crop: floor(eval_size / crop_pct), as timm rounds (a
        quotient within 1e-6 below an integer counts as that integer)."""
        return math.floor(self.eval_size / self.crop_pct + _FLOOR_SLACK)

    @classmethod
    def with_resize(
        cls,
        eval_size: int,
        resize_size: int,
        interpolation: str = "bilinear",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> Preprocessing:
        """The preprocessing that resizes to `resize_size` and crops `eval_size` (crop_pct
        ``eval_size / resize_size``). Raises naming the argument unless both are positive
        integers and the crop fits (`resize_size` >= `eval_size`)."""
        eval_size = check_positive_int("eval_size", eval_size)
        resize_size = check_positive_int("resize_size", resize_size)
        if resize_size < eval_size:
            raise ValueError(
                f"resize_size {resize_size} is smaller than image_size {eval_size}: the center "
                "crop is cut from the resized image, so the resize must be at least the crop"
            )
        return cls(eval_size, eval_size / resize_size, interpolation, tuple(mean), tuple(std))

    def override(
        self,
        *,
        eval_size: int | None = None,
        resize_size: int | None = None,
        interpolation: str | None = None,
    ) -> Preprocessing:
        """This preprocessing with the given fields replaced (None keeps a field). A new
        `eval_size` without `resize_size` keeps `crop_pct` (the resize scales with the crop);
        a `resize_size` sets the crop fraction to ``eval_size / resize_size``."""
        size = self.eval_size if eval_size is None else eval_size
        interp = self.interpolation if interpolation is None else interpolation
        if resize_size is not None:
            return Preprocessing.with_resize(size, resize_size, interp, self.mean, self.std)
        return dataclasses.replace(self, eval_size=size, interpolation=interp)

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (`mean`/`std` as lists); `from_json` inverts it."""
        return {
            "eval_size": self.eval_size,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_json(cls, data: Any) -> Preprocessing:
        """A Preprocessing from `to_json`'s dict; ValueError naming the missing, unknown or bad
        field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"preprocessing must be a JSON object, got {data!r}")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"preprocessing has unknown field(s) {', '.join(map(str, unknown))}")
        missing = [f for f in fields if f not in data]
        if missing:
            raise ValueError(f"preprocessing is missing field(s) {', '.join(missing)}")
        return cls(**{f: data[f] for f in fields})


def default_preprocessing(image_size: int) -> Preprocessing:
    """The eval preprocessing of a model trained here at `image_size` (training's validation
    transform): resize to ``round(image_size * 256 / 224)`` (256 for 224), bilinear, center crop,
    ImageNet mean/std."""
    image_size = check_positive_int("image_size", image_size)
    return Preprocessing.with_resize(image_size, round(image_size * EVAL_RESIZE_RATIO))


def eval_preprocessing(
    image_size: int | None = None, preprocessing: Preprocessing | None = None
) -> Preprocessing:
    """The eval preprocessing a pipeline call asks for: `preprocessing`, or
    `default_preprocessing(image_size)` when it is None. ValueError if neither is given, or if
    both are and `image_size` is not `preprocessing.eval_size`."""
    if preprocessing is None:
        if image_size is None:
            raise ValueError("give image_size or preprocessing")
        return default_preprocessing(image_size)
    if not isinstance(preprocessing, Preprocessing):
        raise ValueError(f"preprocessing must be a Preprocessing, got {preprocessing!r}")
    if image_size is not None and image_size != preprocessing.eval_size:
        raise ValueError(
            f"image_size {image_size} differs from preprocessing.eval_size "
            f"{preprocessing.eval_size}: give one of them"
        )
    return preprocessing


def eval_resize_size(image_size: int, resize_size: int | None = None) -> int:
    """The shorter side the eval transform resizes to before cropping `image_size`: `resize_size`,
    or `default_preprocessing(image_size)`'s when None (torchvision's IMAGENET1K_V2 weights want
    232 for 224). Raises naming the argument unless both are positive integers and the crop fits
    (`resize_size` >= `image_size`).
    """
    image_size = check_positive_int("image_size", image_size)
    if resize_size is None:
        return default_preprocessing(image_size).resize_size
    return Preprocessing.with_resize(image_size, resize_size).resize_size


def normalize_images(
    images: jax.Array,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> jax.Array:
    """uint8 [..., 3] images -> float32 ``(x / 255 - mean) / std`` (per RGB channel; ImageNet's
    statistics by default, a `Preprocessing`'s for weights trained with others).

    The same float32 operations, in the same order, as the tf.data pipeline's normalisation
    (`data.train_batches(normalize=True)`), so the two agree within float32 rounding. Runs on
    the devices: the input pipeline can then send uint8 (a quarter of the bytes) and spend no
    host CPU on it. Raises ValueError naming the dtype unless `images` are uint8.
    """
    images = jnp.asarray(images)
    if images.dtype != jnp.uint8:
        raise ValueError(f"normalize_images expects uint8 images, got dtype {images.dtype}")
    scaled = images.astype(jnp.float32) / 255.0
    return (scaled - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def check_process(process_index: int, process_count: int) -> None:
    """ValueError naming the argument unless `process_count` is a positive integer and
    0 <= `process_index` < `process_count`."""
    check_positive_int("process_count", process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
