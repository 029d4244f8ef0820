"""Prediction with trained (or converted torchvision) models, for research code.

    predictor = Predictor.from_checkpoint("runs/flowers")   # workdir, step dir or save_model dir
    predictor = Predictor.from_pretrained("resnet50.a1_in1k")  # named Hub weights
    probs = predictor.predict_proba(["a.jpg", "b.png"])     # [N, classes] float32
    predictor.top_k(["a.jpg"], k=3)                          # [[("daisy", 0.91), ...]]

Images are preprocessed with `data.preprocess_for_eval` as the weights' stored
`preprocessing.Preprocessing` says (a checkpoint's metadata, else `default_preprocessing` of its
training image size; named weights' own), with the `image_size`, `resize_size` and
`interpolation` given overriding it, and run through a jitted forward pass in fixed-size batches
(the last one zero-padded, its padding dropped), so one shape is compiled whatever the input
count. Scoring a checkpoint on a labelled split is `evaluation.evaluate_checkpoint`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from PIL import Image

from resnet_jax import convert, model_dir, models
from resnet_jax.preprocessing import (
    Preprocessing,
    check_positive_int,
    default_preprocessing,
    eval_preprocessing,
)

IMAGENET_CLASSES_FILE = Path(__file__).with_name("imagenet_classes.json")
IMAGENET_NUM_CLASSES = 1000  # len(imagenet_class_names())
DEFAULT_BATCH_SIZE = 32
# What `Predictor` accepts as one image: a file path, a uint8 array [H, W] / [H, W, C] or a PIL
# image.
ImageLike = str | os.PathLike | np.ndarray | Image.Image


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names in torchvision's index order (for its pretrained weights)."""
    return json.loads(IMAGENET_CLASSES_FILE.read_text())


def class_names_for(num_classes: int, class_names: Sequence[str] | None, what: str) -> list[str]:
    """`class_names` if given, else the ImageNet names for a 1000-class head; ValueError naming
    `what` (the weights) for another head without names."""
    if class_names is not None:
        return list(class_names)
    if num_classes != IMAGENET_NUM_CLASSES:
        raise ValueError(
            f"{what} have a {num_classes}-class head (ImageNet has {IMAGENET_NUM_CLASSES}); "
            "pass class_names for it"
        )
    return imagenet_class_names()


def _to_rgb(image: np.ndarray, where: str) -> np.ndarray:
    """uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] -> [H, W, 3] the way PIL's
    `convert("RGB")` does it (gray replicated, alpha dropped), so arrays match decoded files."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"{where}: expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or 0 in image.shape:
        raise ValueError(
            f"{where}: expected a non-empty [H, W] or [H, W, 1|3|4] image, got shape {image.shape}"
        )
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    return image[..., :3]


def _as_image_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    """One path, PIL image or array ([H, W] or [H, W, C]), a stack [N, H, W, C], or a sequence
    of single images -> a list of single images."""
    if isinstance(images, str | os.PathLike | Image.Image):
        return [images]
    if isinstance(images, np.ndarray | jax.Array):
        images = np.asarray(images)
        if images.ndim in (2, 3):
            return [images]
        if images.ndim == 4:
            return list(images)
        raise ValueError(
            f"expected an image array [H, W], [H, W, C] or a stack [N, H, W, C], "
            f"got shape {images.shape}"
        )
    if not isinstance(images, Sequence):
        raise TypeError(
            f"expected a path, a PIL image, a uint8 array or a sequence of them, got "
            f"{type(images).__name__}"
        )
    return list(images)


def _logits(model: nn.Module, variables: dict, images: jax.Array) -> jax.Array:
    """Eval-mode forward pass."""
    return model.apply(variables, images, train=False)


# Compiled once per (model, batch shape) and shared by every Predictor of an equal model.
_shared_logits = jax.jit(_logits, static_argnums=0)


class Predictor:
    """A classifier with its preprocessing: images in, class probabilities out.

    `model` is a `models.ResNet` with a head, `variables` its {"params", "batch_stats"},
    `class_names` one label per output; images are prepared as `preprocessing` says, or as
    `default_preprocessing(image_size)` (training's validation transform) when it is None (give
    one of the two). The `preprocessing` attribute holds the one used, `image_size` and
    `resize_size` its crop and resize. Inference runs on the default device, `batch_size` images
    per compiled call.
    """

    def __init__(
        self,
        model: nn.Module,
        variables: Mapping[str, Any],
        class_names: Sequence[str],
        image_size: int | None = None,
        *,
        preprocessing: Preprocessing | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        """Validate the pieces against each other and put the variables on the device."""
        num_classes = getattr(model, "num_classes", None)
        if num_classes is None:
            raise ValueError("Predictor needs a model with a classification head (num_classes)")
        if isinstance(class_names, str) or len(class_names) != num_classes:
            raise ValueError(
                f"class_names must list one name per class: the model has {num_classes} "
                f"classes, got {class_names if isinstance(class_names, str) else len(class_names)}"
            )
        # Checked here, at construction, rather than when the first image is preprocessed.
        self.preprocessing = eval_preprocessing(image_size, preprocessing)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.class_names = [str(c) for c in class_names]
        self.model = model
        models.check_variables(variables, model, "Predictor")
        self.variables = jax.device_put({c: variables[c] for c in model_dir.VARIABLE_COLLECTIONS})
        try:
            hash(model)
        except TypeError:  # e.g. list-valued attributes: a compilation of its own
            self._logits = jax.jit(functools.partial(_logits, model))
        else:
            self._logits = functools.partial(_shared_logits, model)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        step: int | None = None,
        which: str = "best",
        image_size: int | None = None,
        resize_size: int | None = None,
        interpolation: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> Predictor:
        """Load with `model_dir.load` (workdir, checkpoints dir, step dir or save_model dir)
        and predict as `from_loaded` does."""
        return cls.from_loaded(
            model_dir.load(path, step=step, which=which),
            image_size=image_size,
            resize_size=resize_size,
            interpolation=interpolation,
            batch_size=batch_size,
        )

    @classmethod
    def from_loaded(
        cls,
        loaded: model_dir.LoadedModel,
        *,
        image_size: int | None = None,
        resize_size: int | None = None,
        interpolation: str | None = None,
        preprocessing: Preprocessing | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> Predictor:
        """A checkpoint already read with `model_dir.load`, preprocessing as it stored
        (`LoadedModel.eval_preprocessing`: the given `image_size`, `resize_size` and
        `interpolation` override it; a new `image_size` alone keeps its crop fraction), or as
        `preprocessing` says when given (then without the three overrides)."""
        overrides = dict(
            image_size=image_size, resize_size=resize_size, interpolation=interpolation
        )
        if preprocessing is None:
            preprocessing = loaded.eval_preprocessing(**overrides)
        elif any(v is not None for v in overrides.values()):
            raise ValueError("give preprocessing or image_size/resize_size/interpolation, not both")
        return cls(
            loaded.model(),
            loaded.variables,
            _class_names_of(loaded),
            preprocessing=preprocessing,
            batch_size=batch_size,
        )

    @classmethod
    def from_torchvision(
        cls,
        weights: str | os.PathLike | Mapping[str, Any],
        arch: str,
        *,
        image_size: int = 224,
        resize_size: int | None = None,
        interpolation: str | None = None,
        class_names: Sequence[str] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> Predictor:
        """torchvision weights (file or state_dict) of `arch`, as float32 whatever the file's
        dtype, prepared as `default_preprocessing(image_size)` with `resize_size` and
        `interpolation` overriding it; 1000-class heads get the ImageNet names, other heads
        need `class_names`."""
        variables = convert.from_torchvision(weights, arch)
        num_classes = model_dir.num_classes(variables["params"])
        if num_classes is None:
            raise ValueError(f"the {arch} weights have no classification head (fc)")
        preprocessing = default_preprocessing(image_size).override(
            resize_size=resize_size, interpolation=interpolation
        )
        return cls(
            models.get_model(arch, num_classes=num_classes),
            variables,
            class_names_for(num_classes, class_names, "the weights"),
            preprocessing=preprocessing,
            batch_size=batch_size,
        )

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        *,
        arch: str | None = None,
        image_size: int | None = None,
        resize_size: int | None = None,
        interpolation: str | None = None,
        class_names: Sequence[str] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> Predictor:
        """Named weights (`pretrained.load(name, arch=arch)`: a registered `ARCH.TAG` or
        `hf-hub:ORG/REPO[@REVISION]`), prepared as they state (the given `image_size`,
        `resize_size` and `interpolation` override it, as in `from_loaded`); 1000-class heads
        get the ImageNet names, other heads need `class_names`. Raises
        `pretrained.PretrainedError` if the weights cannot be loaded."""
        from resnet_jax import pretrained

        weights = pretrained.load(name, arch=arch)
        num_classes = weights.model.num_classes
        if num_classes is None:
            raise ValueError(f"{name}: the weights have no classification head (fc)")
        preprocessing = weights.preprocessing.override(
            eval_size=image_size, resize_size=resize_size, interpolation=interpolation
        )
        return cls(
            weights.model,
            weights.variables,
            class_names_for(num_classes, class_names, f"{name}: the weights"),
            preprocessing=preprocessing,
            batch_size=batch_size,
        )

    @property
    def image_size(self) -> int:
        """The eval crop size in pixels (`preprocessing.eval_size`)."""
        return self.preprocessing.eval_size

    @property
    def resize_size(self) -> int:
        """The shorter side images are resized to before the crop."""
        return self.preprocessing.resize_size

    @property
    def num_classes(self) -> int:
        """Number of outputs (= len(class_names))."""
        return len(self.class_names)

    def preprocess(self, image: ImageLike) -> np.ndarray:
        """One image (path, uint8 array or PIL image) -> the model input, float32 [S, S, 3];
        errors name the file that could not be decoded."""
        from resnet_jax import data  # TensorFlow takes seconds to import: not before it decodes

        if isinstance(image, str | os.PathLike):
            rgb = data.load_image(image)
        elif isinstance(image, Image.Image):
            rgb = np.asarray(image.convert("RGB"))
        else:
            rgb = _to_rgb(image, "image array")
        return data.preprocess_for_eval(rgb, preprocessing=self.preprocessing)

    def _batches(self, images: list[ImageLike]) -> Iterator[np.ndarray]:
        """Logits for `batch_size` images at a time; the last batch is padded with zeros to the
        same shape (one compilation) and its padding rows dropped."""
        for start in range(0, len(images), self.batch_size):
            chunk = np.stack(
                [self.preprocess(im) for im in images[start : start + self.batch_size]]
            )
            padded = np.zeros((self.batch_size, *chunk.shape[1:]), chunk.dtype)
            padded[: len(chunk)] = chunk
            logits = self._logits(self.variables, padded)
            yield np.asarray(logits, np.float32)[: len(chunk)]

    def predict_logits(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Raw classifier outputs, float32 [N, classes], in input order."""
        images = _as_image_list(images)
        if not images:
            return np.zeros((0, self.num_classes), np.float32)
        return np.concatenate(list(self._batches(images)))

    def predict_proba(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Softmax probabilities, float32 [N, classes] (rows sum to 1), in input order.

        `images`: a path, a PIL image, a uint8 array ([H, W] gray, [H, W, 1|3|4]), a stack
        [N, H, W, C], or a sequence of those single images. Files are decoded like the training
        pipeline (grayscale, palette, RGBA, CMYK converted to RGB).
        """
        logits = self.predict_logits(images).astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits)
        return (probs / probs.sum(axis=-1, keepdims=True)).astype(np.float32)

    def top_k(
        self, images: ImageLike | Sequence[ImageLike], k: int = 5
    ) -> list[list[tuple[str, float]]]:
        """Per image, the `k` most probable (class name, probability), most probable first
        (ties by class index)."""
        k = check_positive_int("k", k)
        if k > self.num_classes:
            raise ValueError(f"k={k} exceeds the model's {self.num_classes} classes")
        probs = self.predict_proba(images)
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        return [
            [(self.class_names[c], float(row[c])) for c in top]
            for row, top in zip(probs, order, strict=True)
        ]


def _class_names_of(loaded: model_dir.LoadedModel) -> list[str]:
    """The checkpoint's class names, or "0".."n-1" when it recorded none."""
    if loaded.num_classes is None:
        raise ValueError(f"{loaded.path}: the model has no classification head")
    if loaded.class_names is not None:
        return list(loaded.class_names)
    return [str(i) for i in range(loaded.num_classes)]
