"""Prediction and evaluation with trained (or converted torchvision) models, for research code.

    predictor = Predictor.from_checkpoint("runs/flowers")   # workdir, step dir or save_model dir
    probs = predictor.predict_proba(["a.jpg", "b.png"])     # [N, classes] float32
    predictor.top_k(["a.jpg"], k=3)                          # [[("daisy", 0.91), ...]]

Images are preprocessed with `data.preprocess_for_eval` (the validation transform) at the
checkpoint's training image size and run through a jitted forward pass in fixed-size batches (the
last one zero-padded, its padding dropped), so one shape is compiled whatever the input count.
The resize before the crop is `image_size * 256 / 224` unless `resize_size` is given
(torchvision's IMAGENET1K_V2 weights were evaluated at 232 for a 224 crop).

`evaluate_checkpoint` scores a checkpoint on an image folder or a TFDS split with the
data-parallel eval step over every device.

TensorFlow (imported by `resnet_jax.data`) is only imported when images are first decoded or
data is opened, never at import time: `Predictor.from_torchvision` reads its weights with torch
before that, as torch must load before TensorFlow in one process.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import numpy as np
from PIL import Image

from resnet_jax import checkpoint, models, train, trainer
from resnet_jax.preprocessing import check_positive_int, eval_resize_size

if TYPE_CHECKING:
    from resnet_jax.data import DataSource

IMAGENET_CLASSES_FILE = Path(__file__).with_name("imagenet_classes.json")
DEFAULT_BATCH_SIZE = 32
# What `Predictor` accepts as one image: a file path, a uint8 array [H, W] / [H, W, C] or a PIL
# image.
ImageLike = str | os.PathLike | np.ndarray | Image.Image


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names in torchvision's index order (for its pretrained weights)."""
    return json.loads(IMAGENET_CLASSES_FILE.read_text())


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
    `class_names` one label per output and `image_size` the eval crop size. `resize_size` is the
    shorter side the image is resized to before the crop (None: `image_size * 256 / 224`, as in
    training's validation transform; torchvision's IMAGENET1K_V2 weights want 232 for 224); the
    `resize_size` attribute holds the size used. Inference runs on the default device,
    `batch_size` images per compiled call.
    """

    def __init__(
        self,
        model: nn.Module,
        variables: Mapping[str, Any],
        class_names: Sequence[str],
        image_size: int,
        *,
        resize_size: int | None = None,
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
        self.image_size = check_positive_int("image_size", image_size)
        # Checked at construction: data (TensorFlow) is only imported once images are decoded.
        self.resize_size = eval_resize_size(self.image_size, resize_size)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.class_names = [str(c) for c in class_names]
        self.model = model
        checkpoint.check_variables(variables, model, "Predictor")
        self.variables = jax.device_put({c: variables[c] for c in checkpoint.VARIABLE_COLLECTIONS})
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
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> Predictor:
        """Load with `checkpoint.load` (workdir, checkpoints dir, step dir or save_model dir);
        `image_size` defaults to the size recorded at training time."""
        return cls.from_loaded(
            checkpoint.load(path, step=step, which=which),
            image_size=image_size,
            resize_size=resize_size,
            batch_size=batch_size,
        )

    @classmethod
    def from_loaded(
        cls,
        loaded: checkpoint.LoadedModel,
        *,
        image_size: int | None = None,
        resize_size: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> Predictor:
        """A checkpoint already read with `checkpoint.load` (e.g. to resolve its image size
        first with `image_size_of`); `image_size` defaults to the size recorded at training time.
        """
        return cls(
            loaded.model(),
            loaded.variables,
            _class_names_of(loaded),
            image_size_of(loaded, image_size),
            resize_size=resize_size,
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
        class_names: Sequence[str] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> Predictor:
        """torchvision weights (file or state_dict) of `arch`, as float32 whatever the file's
        dtype; 1000-class heads get the ImageNet names, other heads need `class_names`. Reads
        the weights (torch) before any TensorFlow."""
        from resnet_jax import convert  # imports torch only to read .pth/.pt files

        variables = convert.from_torchvision(weights, arch)
        if "fc" not in variables["params"]:
            raise ValueError(f"the {arch} weights have no classification head (fc)")
        num_classes = int(variables["params"]["fc"]["bias"].shape[0])
        if class_names is None:
            if num_classes != 1000:
                raise ValueError(
                    f"the weights have a {num_classes}-class head (ImageNet has 1000); "
                    "pass class_names for it"
                )
            class_names = imagenet_class_names()
        model = models.get_model(arch, num_classes=num_classes)
        return cls(
            model,
            variables,
            class_names,
            image_size,
            resize_size=resize_size,
            batch_size=batch_size,
        )

    @property
    def num_classes(self) -> int:
        """Number of outputs (= len(class_names))."""
        return len(self.class_names)

    def preprocess(self, image: ImageLike) -> np.ndarray:
        """One image (path, uint8 array or PIL image) -> the model input, float32 [S, S, 3];
        errors name the file that could not be decoded."""
        from resnet_jax import data  # TensorFlow: only once images are actually decoded

        if isinstance(image, str | os.PathLike):
            rgb = data.load_image(image)
        elif isinstance(image, Image.Image):
            rgb = np.asarray(image.convert("RGB"))
        else:
            rgb = _to_rgb(image, "image array")
        return data.preprocess_for_eval(rgb, self.image_size, resize_size=self.resize_size)

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


def _class_names_of(loaded: checkpoint.LoadedModel) -> list[str]:
    """The checkpoint's class names, or "0".."n-1" when it recorded none."""
    if loaded.num_classes is None:
        raise ValueError(f"{loaded.path}: the model has no classification head")
    if loaded.class_names is not None:
        return list(loaded.class_names)
    return [str(i) for i in range(loaded.num_classes)]


def image_size_of(loaded: checkpoint.LoadedModel, override: int | None) -> int:
    """`override`, else the training image size recorded in the checkpoint metadata."""
    if override is not None:
        return check_positive_int("image_size", override)
    size = loaded.metadata.get("image_size")
    if size is None:
        raise ValueError(
            f"{loaded.path}: checkpoint metadata has no image_size; pass the size to use"
        )
    return check_positive_int(f"{loaded.path}: metadata image_size", size)


# --------------------------------------------------------------------------------------------
# Evaluation on a labelled split


@dataclasses.dataclass
class Evaluation:
    """Loss, top-1/top-5 and the confusion matrix of a model on one labelled split."""

    class_names: list[str]  # the model's classes: rows/columns of `confusion`
    loss: float
    top1: float
    top5: float
    count: int
    confusion: np.ndarray  # [true, predicted] counts over the whole split
    data: str  # where the examples came from
    skipped: tuple[tuple[str, str], ...] = ()  # unreadable files left out: (path, reason)

    def per_class(self) -> list[dict[str, Any]]:
        """Per class: images, correct top-1 predictions and accuracy (None without images)."""
        rows = []
        for i, name in enumerate(self.class_names):
            images, correct = int(self.confusion[i].sum()), int(self.confusion[i, i])
            accuracy = correct / images if images else None
            rows.append({"class": name, "images": images, "correct": correct, "accuracy": accuracy})
        return rows

    def to_json(self) -> dict[str, Any]:
        """Everything as JSON-ready Python values."""
        return {
            "data": self.data,
            "count": self.count,
            "top1": self.top1,
            "top5": self.top5,
            "loss": self.loss,
            "per_class": self.per_class(),
            "class_names": self.class_names,
            "confusion": self.confusion.tolist(),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }


def open_eval_data(
    *,
    data_dir: str | os.PathLike | None = None,
    dataset: str | None = None,
    split: str | None = None,
    tfds_data_dir: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataSource:
    """The labelled examples to evaluate on, as a `data.DataSource` whose eval split is used.

    `data_dir`: its `val/` class folders if present; else, with a `train/` folder, the part of it
    training held out (`val_fraction`, `seed`: pass the run's); else `data_dir` itself as a folder
    of class folders. `dataset`: a TFDS dataset's `split`, or by default the split training
    validated on ('validation', else 'test', else the held-out end of 'train').
    """
    from resnet_jax import data

    if (data_dir is None) == (dataset is None):
        raise ValueError("pass exactly one of data_dir (image folders) and dataset (TFDS)")
    if data_dir is not None:
        if split is not None:
            raise ValueError("split applies to TFDS datasets; image folders use val/")
        root = Path(data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"data directory {root} does not exist")
        if (root / "val").is_dir():
            return data.open_class_folders(root / "val")
        if (root / "train").is_dir():
            return data.open_source(data_dir=root, val_fraction=val_fraction, seed=seed)
        return data.open_class_folders(root)
    source = data.open_source(
        dataset=dataset, tfds_data_dir=tfds_data_dir, val_fraction=val_fraction, seed=seed
    )
    if split is None:
        return source
    builder = source.eval_split.builder
    try:
        eval_split = data.tfds_split(builder, split)
    except (ValueError, KeyError) as err:
        raise ValueError(f"TFDS dataset {dataset!r}, split {split!r}: {err}") from err
    return dataclasses.replace(
        source,
        num_eval=eval_split.size,
        eval_split=eval_split,
        origin=f"TFDS {builder.info.full_name} in {builder.data_dir} ({split})",
    )


def label_map(data_names: Sequence[str], model_names: Sequence[str] | None) -> np.ndarray:
    """Index array taking the data's label indices to the model's, matched by class name.

    Every data class must be one of the model's (the model may know more). A model without
    class names must have exactly as many classes as the data, taken in the same order.
    """
    if model_names is None:
        return np.arange(len(data_names), dtype=np.int32)
    position = {name: i for i, name in enumerate(model_names)}
    unknown = [name for name in data_names if name not in position]
    if unknown:
        raise ValueError(
            f"class names do not match: the data has classes {unknown} that the checkpoint "
            f"does not know; the checkpoint's classes are {list(model_names)}"
        )
    return np.asarray([position[name] for name in data_names], dtype=np.int32)


def _relabelled(batches: Iterator[dict], mapping: np.ndarray) -> Iterator[dict]:
    """Eval batches with labels translated by `mapping` (padding keeps a valid index)."""
    for batch in batches:
        yield {**batch, "label": mapping[batch["label"]]}


def evaluate_checkpoint(
    loaded: checkpoint.LoadedModel,
    source: DataSource,
    *,
    image_size: int,
    batch_size: int,
    resize_size: int | None = None,
    kind: str = "shard_map",
) -> Evaluation:
    """Score `loaded` on the eval split of `source` with the data-parallel eval step over every
    device: `batch_size` (global, a multiple of the device count) images per step, the last
    batch padded and masked, every example counted exactly once. Classes are matched by name.
    Images are resized to `resize_size` (see `preprocessing.eval_resize_size`) and cropped to
    `image_size`."""
    from resnet_jax import data

    if loaded.num_classes is None:
        raise ValueError(f"{loaded.path}: the model has no classification head to evaluate")
    if loaded.class_names is None and len(source.class_names) != loaded.num_classes:
        raise ValueError(
            f"{loaded.path} records no class names and has {loaded.num_classes} classes, but "
            f"{source.origin} has {len(source.class_names)}"
        )
    mapping = label_map(source.class_names, loaded.class_names)
    mesh = train.make_mesh()
    train.check_divisible("batch_size", batch_size, mesh.size)
    model = loaded.model(axis_name=train.BATCH_AXIS)
    step = train.parallelize(
        train.make_eval_step(model), mesh, kind=kind, donate=False, out_specs=train.EVAL_OUT_SPECS
    )
    variables = train.place_state(loaded.variables, mesh, kind)
    batches = data.eval_batches(
        source,
        batch_size=batch_size // jax.process_count(),
        image_size=image_size,
        resize_size=resize_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    result = trainer.evaluate(
        step, variables, _relabelled(batches, mapping), mesh, kind, loaded.num_classes
    )
    confusion = result.confusion
    if jax.process_count() > 1:  # each process counted its own examples
        from jax.experimental import multihost_utils

        confusion = np.asarray(multihost_utils.process_allgather(confusion)).sum(axis=0)
    names = loaded.class_names or list(source.class_names)
    return Evaluation(
        class_names=list(names),
        loss=result.loss,
        top1=result.top1,
        top5=result.top5,
        count=result.count,
        confusion=confusion,
        data=source.origin,
        skipped=source.skipped,
    )


def plot_confusion(
    confusion: np.ndarray, class_names: Sequence[str], path: str | os.PathLike, title: str = ""
) -> Path:
    """PNG of a [true, predicted] count matrix, rows normalised for colour, counts written in
    the cells and classes on the axes when there are few enough to read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion)
    n = len(class_names)
    rows = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    side = min(max(4.0, 0.45 * n + 2.5), 40.0)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    shown = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 50:
        ax.set_xticks(range(n), class_names, rotation=90)
        ax.set_yticks(range(n), class_names)
    if n <= 30:
        for (i, j), count in np.ndenumerate(confusion):
            color = "white" if share[i, j] > 0.5 else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=color, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"confusion matrix ({int(confusion.sum())} images)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
