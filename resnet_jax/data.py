"""Input pipelines (tf.data) for training and evaluating ResNets on image folders or TFDS.

Two kinds of source, one preprocessing:

* Image folders ``DIR/train/<class>/*`` and optionally ``DIR/val/<class>/*`` (torchvision's
  ImageFolder layout: classes are the sorted folder names, index = position). Every file is
  decoded once when the source is opened, so unreadable files are reported and left out up front
  instead of failing mid-epoch.
* TFDS datasets (``tfds.builder(name).download_and_prepare()``), read as encoded bytes.

Decoding: JPEG bytes go through TensorFlow (training uses the fused ``decode_and_crop_jpeg``, so
only the crop is decoded); anything else (PNG, GIF, BMP, PPM/PGM, TIFF, WebP) is decoded by PIL
and converted to RGB, exactly as torchvision's loader does. TensorFlow converts grayscale and CMYK
JPEGs to RGB itself.

Training transform: random-resized-crop (area 8-100 %, aspect ratio 3/4-4/3, 10 attempts, else
the whole image), bilinear antialiased resize rounded to uint8 (as torchvision's PIL resize),
random horizontal flip, ImageNet mean/std (applied per batch; ``normalize=False`` leaves the
uint8 pixels for `normalize_images` to normalise on the devices, as training does). Eval
transform: resize the shorter side to ``resize_size`` (default ``round(image_size * 256 / 224)``;
torchvision's IMAGENET1K_V2 weights use 232 for 224) (bilinear, antialiased; longer side
truncated like torchvision), center crop, same normalisation.

Determinism: an epoch is a function of ``(seed, epoch)`` only. For image folders the example
order is a stateless shuffle of the file indices, and every example's augmentation uses a key
folded from ``(seed, epoch)`` and its example index, so the stream is bit-identical whatever the
parallelism, the per-process shard of an example does not change its pixels, and resuming at
``start_batch`` drops file indices before anything is read or decoded. TFDS sources (no random
access) shuffle files and a buffer with seeds derived from ``(seed, epoch)`` and skip records
before decoding; every process reads all records and keeps its share.

Batches are dicts of numpy arrays: training {"image", "label"}, evaluation adds "mask" (real
examples, the last batches are padded so every process yields the same number) and "index"
(position in the eval split). EXIF orientation is not applied (neither does torchvision).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import io
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

# The TensorFlow-free pieces (ImageNet statistics, their on-device normalisation, the eval
# resize size) live in `preprocessing`; re-exported here for pipeline users.
from resnet_jax.preprocessing import IMAGENET_MEAN as IMAGENET_MEAN
from resnet_jax.preprocessing import IMAGENET_STD as IMAGENET_STD
from resnet_jax.preprocessing import check_positive_int
from resnet_jax.preprocessing import eval_resize_size as eval_resize_size
from resnet_jax.preprocessing import normalize_images as normalize_images

try:  # the input pipeline runs on the host; leave accelerator memory to JAX
    tf.config.set_visible_devices([], "GPU")
except RuntimeError as err:  # TF already initialised its devices in this process
    warnings.warn(f"could not hide GPUs from TensorFlow: {err}", RuntimeWarning, stacklevel=1)

# torchvision ImageFolder's extensions (plus .gif); everything but JPEG is decoded by PIL.
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif",
)  # fmt: skip
# Records held by the shuffle buffer of TFDS sources (files are shuffled too); a split that fits
# gets a uniform permutation.
TFDS_SHUFFLE_BUFFER = 10_000
# Random-resized-crop parameters (torchvision's RandomResizedCrop defaults).
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10

AUTOTUNE = tf.data.AUTOTUNE
_JPEG_MAGIC = b"\xff\xd8\xff"
# Tags keeping the random streams derived from (seed, epoch) independent of each other.
_SHUFFLE, _AUGMENT, _HOLDOUT = 0, 1, 2


# The functions given to tf.data here use no Python control flow on tensors: skipping AutoGraph's
# source conversion makes building a pipeline several times faster.
_plain = tf.autograph.experimental.do_not_convert


class BadImageWarning(UserWarning):
    """Some image files could not be decoded and were left out of the source."""


@dataclasses.dataclass(frozen=True)
class FileSplit:
    """One split of an image-folder source: file paths and their class indices."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)


@dataclasses.dataclass(frozen=True)
class TfdsSplit:
    """One split of a prepared TFDS dataset, read with images left encoded."""

    builder: Any = dataclasses.field(repr=False)
    split: str
    size: int

    def __len__(self) -> int:
        return self.size

    def records(self, *, shuffle_seed: int | None = None) -> tf.data.Dataset:
        """(encoded image, label) records in a fixed order, or files shuffled by `shuffle_seed`."""
        read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed)
        ds = self.builder.as_dataset(
            split=self.split,
            decoders={"image": tfds.decode.SkipDecoding()},
            shuffle_files=shuffle_seed is not None,
            read_config=read_config,
        )
        return ds.map(_plain(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32))))


@dataclasses.dataclass(frozen=True)
class DataSource:
    """A dataset found on disk or in TFDS: class names, split sizes and how to read each split."""

    class_names: list[str]
    num_train: int
    num_eval: int
    train_split: FileSplit | TfdsSplit = dataclasses.field(repr=False)
    eval_split: FileSplit | TfdsSplit = dataclasses.field(repr=False)
    origin: str = ""
    skipped: tuple[tuple[str, str], ...] = ()  # (path, reason) of files left out as unreadable


# --------------------------------------------------------------------------------------------
# Decoding and transforms (tf graph code shared by every pipeline and by the numpy helpers)


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
def _decode(data: tf.Tensor) -> tf.Tensor:
    """Encoded bytes -> uint8 [H, W, 3]: TensorFlow for JPEG, PIL for everything else."""
    return tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3),
        lambda: _pil_decode(data),
    )


def _probe(data: tf.Tensor) -> tf.Tensor:
    """Decodes like `_decode`, cheaply (JPEG at 1/8 scale, same entropy decoding): vets a file."""
    return tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.shape(tf.io.decode_jpeg(data, channels=3, ratio=8)),
        lambda: tf.shape(_pil_decode(data)),
    )


def _normalize(image: tf.Tensor) -> tf.Tensor:
    """uint8-valued [..., 3] -> float32 (x / 255 - mean) / std, as torchvision's transforms."""
    image = tf.cast(image, tf.float32) / 255.0
    return (image - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


def _sample_crop(shape: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Random-resized-crop window (begin [y, x, 0], size [h, w, -1]) for an image of `shape`."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=CROP_ASPECT_RANGE,
        area_range=CROP_AREA_RANGE,
        max_attempts=CROP_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, size


def _decode_random_crop(data: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Decodes only a random-resized-crop window of the image (fused for JPEG)."""

    def jpeg() -> tf.Tensor:
        begin, size = _sample_crop(tf.image.extract_jpeg_shape(data), seed)
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        return tf.image.decode_and_crop_jpeg(data, window, channels=3)

    def other() -> tf.Tensor:
        image = _pil_decode(data)
        begin, size = _sample_crop(tf.shape(image), seed)
        return tf.slice(image, begin, size)

    return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def _train_transform(data: tf.Tensor, key: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded image + stateless key -> augmented uint8 [S, S, 3].

    The resized crop is rounded to uint8 as torchvision's PIL transforms do; `train_batches`
    normalises whole batches (a quarter of the bytes per image to batch, one op per batch)."""
    crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2, alg="philox"))
    image = _decode_random_crop(data, crop_key)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    image = tf.image.stateless_random_flip_left_right(image, flip_key)
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _eval_transform(image: tf.Tensor, image_size: int, resize_size: int) -> tf.Tensor:
    """uint8 [H, W, 3] -> shorter side resized to `resize_size`, center crop, normalise:
    float32 [S, S, 3]."""
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    # torchvision's Resize(int): the shorter side becomes `resize_size`, the longer one is
    # truncated.
    shorter = tf.minimum(height, width)
    new_h = tf.where(height <= width, resize_size, height * resize_size // shorter)
    new_w = tf.where(height <= width, width * resize_size // shorter, resize_size)
    image = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear", antialias=True)
    # torchvision's CenterCrop: offsets round((size - crop) / 2), half to even.
    top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float64) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float64) / 2.0), tf.int32)
    image = tf.slice(image, tf.stack([top, left, 0]), [image_size, image_size, 3])
    return _normalize(image)


@functools.cache
def _train_fn(image_size: int) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """`_train_transform` traced once per image size (pipelines are built once per epoch)."""
    return tf.function(
        functools.partial(_train_transform, image_size=image_size),
        input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([2], tf.int64)],
        autograph=False,
    )


@functools.cache
def _eval_fn(image_size: int, resize_size: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """`_eval_transform` traced once per (crop, resize) size, shared by `eval_batches` and
    prediction."""
    return tf.function(
        functools.partial(_eval_transform, image_size=image_size, resize_size=resize_size),
        input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)],
        autograph=False,
    )


def _clean_tf_message(err: tf.errors.OpError) -> str:
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
            raise ValueError(f"cannot decode image {path}: {_clean_tf_message(err)}") from err
    try:
        return _pil_rgb(data)
    except Image.UnidentifiedImageError as err:
        raise ValueError(f"cannot decode image {path}: not a known image format") from err
    except Exception as err:  # PIL's plugins raise many types on broken or unknown files
        raise ValueError(f"cannot decode image {path}: {err}") from err


def preprocess_for_eval(
    image_uint8: np.ndarray, image_size: int, *, resize_size: int | None = None
) -> np.ndarray:
    """The evaluation transform for one decoded image (e.g. from `load_image`), for prediction:
    shorter side resized to `resize_size` (see `eval_resize_size`), center crop `image_size`."""
    image = np.asarray(image_uint8)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"expected a uint8 [H, W, 3] RGB image, got dtype {image.dtype} shape {image.shape}"
        )
    resize_size = eval_resize_size(image_size, resize_size)
    return _eval_fn(image_size, resize_size)(tf.constant(image)).numpy()


# --------------------------------------------------------------------------------------------
# Opening sources


def open_source(
    *,
    dataset: str = "tf_flowers",
    data_dir: str | os.PathLike | None = None,
    tfds_data_dir: str | None = None,
    tfds_manual_dir: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataSource:
    """Finds a dataset: image folders under `data_dir` if given, else the TFDS `dataset`.

    Image folders without `val/` hold out `val_fraction` of every class (rounded, at least one
    image left for training), chosen by a permutation seeded with `seed`. A TFDS dataset uses its
    'validation' (else 'test') split; with only 'train' (tf_flowers) the first
    ``1 - val_fraction`` of it (whole percent) trains and the rest evaluates.
    `tfds_manual_dir` is where datasets that cannot be downloaded (imagenet2012) expect their
    archives.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    _check_seed(seed)
    if data_dir is not None:
        return _open_folders(Path(data_dir), val_fraction, seed)
    return _open_tfds(dataset, tfds_data_dir, tfds_manual_dir, val_fraction)


def _list_class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the class sub-folders of `split_dir` (error if there are none)."""
    names = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not names:
        raise ValueError(f"no class folders in {split_dir}: expected {split_dir}/<class>/<image>")
    return names


def list_images(folder: str | os.PathLike) -> list[str]:
    """Image files (by extension, case-insensitive) anywhere under `folder`, sorted, a folder's
    own files before its subfolders': what the image-folder sources and prediction read."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        found.extend(
            os.path.join(root, name)
            for name in sorted(files)
            if name.lower().endswith(IMAGE_EXTENSIONS)
        )
    return found


def _scan_split(split_dir: Path, class_names: Sequence[str]) -> dict[str, list[str]]:
    """Image files of every class folder of `split_dir` (error naming an empty one)."""
    files = {}
    for name in class_names:
        files[name] = list_images(split_dir / name)
        if not files[name]:
            raise ValueError(
                f"class folder {split_dir / name} has no images "
                f"(expected files ending in {', '.join(IMAGE_EXTENSIONS)})"
            )
    return files


def _readable_mask(paths: Sequence[str]) -> np.ndarray:
    """Which files decode (in parallel, with the pipelines' decoders); a bool per path."""
    ds = tf.data.Dataset.from_tensor_slices(list(paths)).enumerate()
    ds = ds.map(_plain(lambda i, p: (i, _probe(tf.io.read_file(p)))), num_parallel_calls=AUTOTUNE)
    ok = np.zeros(len(paths), dtype=bool)
    for index, _ in ds.ignore_errors().as_numpy_iterator():
        ok[index] = True
    return ok


def _unreadable_reason(path: str) -> str:
    """Why `path` failed to decode (only called for the few files that did)."""
    try:
        load_image(path)
    except (OSError, ValueError) as err:
        return str(err).removeprefix(f"cannot decode image {path}: ")
    return "failed to decode in the tf.data pipeline"


def _drop_unreadable(
    files: dict[Path, dict[str, list[str]]],
) -> tuple[dict[Path, dict[str, list[str]]], tuple[tuple[str, str], ...]]:
    """Vets every file of every split folder; returns the readable ones and (path, reason) of
    the rest, warning about them; a class folder left without images is an error."""
    flat = [p for by_class in files.values() for paths in by_class.values() for p in paths]
    ok = dict(zip(flat, _readable_mask(flat), strict=True))
    bad = tuple((p, _unreadable_reason(p)) for p in flat if not ok[p])
    if bad:
        listed = "; ".join(f"{p} ({why})" for p, why in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        warnings.warn(
            f"skipped {len(bad)} unreadable image file(s) of {len(flat)}: {listed}{more}",
            BadImageWarning,
            stacklevel=4,
        )
    kept = {}
    for split_dir, by_class in files.items():
        kept[split_dir] = {name: [p for p in paths if ok[p]] for name, paths in by_class.items()}
        for name, paths in kept[split_dir].items():
            if not paths:
                raise ValueError(f"class folder {split_dir / name} has no readable images")
    return kept, bad


def _file_split(by_class: dict[str, list[str]], class_names: Sequence[str]) -> FileSplit:
    """Flattens {class: files} into a FileSplit in class order."""
    index = {name: i for i, name in enumerate(class_names)}
    pairs = [(p, index[name]) for name, paths in by_class.items() for p in paths]
    pairs.sort(key=lambda pair: (pair[1], pair[0]))
    return FileSplit(tuple(p for p, _ in pairs), tuple(label for _, label in pairs))


def open_class_folders(root: str | os.PathLike) -> DataSource:
    """Every image of `root/<class>/...` as the eval split of a source (no training split), for
    evaluating on a folder of class folders: listed and vetted like the training folders
    (unreadable files skipped with a `BadImageWarning`), classes in sorted order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist")
    names = _list_class_folders(root)
    files, skipped = _drop_unreadable({root: _scan_split(root, names)})
    split = _file_split(files[root], names)
    return DataSource(
        class_names=names,
        num_train=0,
        num_eval=len(split),
        train_split=FileSplit((), ()),
        eval_split=split,
        origin=f"image folders {root}",
        skipped=skipped,
    )


def _hold_out(
    by_class: dict[str, list[str]], val_fraction: float, seed: int
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Stratified, seeded split of every class into (train, held-out) file lists."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _HOLDOUT]))
    train, held = {}, {}
    for name in sorted(by_class):
        paths = by_class[name]
        count = min(round(len(paths) * val_fraction), len(paths) - 1)
        order = rng.permutation(len(paths))
        held[name] = sorted(paths[i] for i in order[:count])
        train[name] = sorted(paths[i] for i in order[count:])
    return train, held


def _open_folders(root: Path, val_fraction: float, seed: int) -> DataSource:
    """Image-folder source: DIR/train/<class>/* and DIR/val/<class>/* (or a held-out part)."""
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist")
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir():
        raise FileNotFoundError(
            f"{root} has no train/ folder: expected {root}/train/<class>/<image> "
            f"(and optionally {root}/val/<class>/<image>)"
        )
    class_names = _list_class_folders(train_dir)
    files = {train_dir: _scan_split(train_dir, class_names)}
    if val_dir.is_dir():
        val_classes = _list_class_folders(val_dir)
        unknown = sorted(set(val_classes) - set(class_names))
        if unknown:
            raise ValueError(f"{val_dir} has class folders not in {train_dir}: {unknown}")
        files[val_dir] = _scan_split(val_dir, val_classes)
    files, skipped = _drop_unreadable(files)
    if val_dir in files:
        train, held = files[train_dir], files[val_dir]
        origin = f"image folders {train_dir} and {val_dir}"
    else:
        train, held = _hold_out(files[train_dir], val_fraction, seed)
        num_held = sum(map(len, held.values()))
        origin = (
            f"image folders {train_dir} ({num_held} images held out: {val_fraction:.0%} of each "
            f"class, rounded, seed {seed})"
        )
    train_split = _file_split(train, class_names)
    eval_split = _file_split(held, class_names)
    return DataSource(
        class_names=class_names,
        num_train=len(train_split),
        num_eval=len(eval_split),
        train_split=train_split,
        eval_split=eval_split,
        origin=origin,
        skipped=skipped,
    )


def _tfds_builder(name: str, data_dir: str | None) -> Any:
    """`tfds.builder(name)` with a short error (and close matches) for an unknown name."""
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as err:
        close = difflib.get_close_matches(name, tfds.list_builders(), n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"TFDS dataset {name!r} not found{hint}") from err


def _open_tfds(
    name: str, data_dir: str | None, manual_dir: str | None, val_fraction: float
) -> DataSource:
    """TFDS source: prepares the dataset (downloads where possible) and picks the splits."""
    builder = _tfds_builder(name, data_dir)
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
        builder.download_and_prepare(download_config=config)
    except Exception as err:  # download, extraction or manual-dir failures alike
        if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
            hint = (
                f"{name} must be downloaded by hand into the manual directory "
                "(tfds_manual_dir, --tfds-manual-dir of scripts/train.py; TFDS's default is "
                "<tfds data dir>/downloads/manual): "
                f"{' '.join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())}"
            )
        else:
            hint = "TFDS needs network access to download it; offline, pass image folders instead"
        raise RuntimeError(
            f"could not prepare TFDS dataset {name!r} in {builder.data_dir}: "
            f"{type(err).__name__}: {' '.join(str(err).split()).rstrip('.')}. {hint}"
        ) from err
    features = builder.info.features
    names = list(features.keys())  # FeaturesDict is not a full Mapping
    label = features["label"] if "label" in names else None
    if "image" not in names or not isinstance(label, tfds.features.ClassLabel):
        raise ValueError(
            f"TFDS dataset {name!r} needs an 'image' feature and a ClassLabel 'label', "
            f"it has {features}"
        )
    splits = builder.info.splits
    held_out = next((s for s in ("validation", "test") if s in splits), None)
    if held_out is None:
        percent = round((1.0 - val_fraction) * 100)
        train_name, eval_name = f"train[:{percent}%]", f"train[{percent}%:]"
    else:
        train_name, eval_name = "train", held_out
    train_split, eval_split = (tfds_split(builder, split) for split in (train_name, eval_name))
    return DataSource(
        class_names=list(label.names),
        num_train=train_split.size,
        num_eval=eval_split.size,
        train_split=train_split,
        eval_split=eval_split,
        origin=f"TFDS {builder.info.full_name} in {builder.data_dir} ({train_name} / {eval_name})",
    )


def tfds_split(builder: Any, split: str) -> TfdsSplit:
    """`split` (a name or slice such as 'train[:80%]') of a prepared TFDS `builder`, sized by
    its known cardinality; an unknown split raises from TFDS (ValueError or KeyError)."""
    ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    size = int(ds.cardinality())
    if size < 0:
        raise ValueError(f"TFDS split {builder.name}/{split} has no known size")
    return TfdsSplit(builder, split, size)


# --------------------------------------------------------------------------------------------
# Batches


def _check_seed(seed: int) -> None:
    """Seeds feed numpy's SeedSequence: non-negative integers."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _check_process(process_index: int, process_count: int) -> None:
    """Validates a (process_index, process_count) pair."""
    check_positive_int("process_count", process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")


def steps_per_epoch(source: DataSource, global_batch_size: int) -> int:
    """Full global batches in one training epoch (the remainder is dropped)."""
    check_positive_int("global_batch_size", global_batch_size)
    steps = source.num_train // global_batch_size
    if steps == 0:
        raise ValueError(
            f"global batch size {global_batch_size} exceeds the {source.num_train} training "
            f"examples of {source.origin}"
        )
    return steps


def eval_steps(source: DataSource, global_batch_size: int) -> int:
    """Global batches covering the eval split once (the last one padded)."""
    check_positive_int("global_batch_size", global_batch_size)
    return math.ceil(source.num_eval / global_batch_size)


def _derived_seed(seed: int, epoch: int, tag: int) -> np.ndarray:
    """Two uint32 words from (seed, epoch, tag): independent streams per purpose and epoch."""
    return np.random.SeedSequence([seed, epoch, tag]).generate_state(2).astype(np.int64)


def _pipeline_options(num_workers: int | None) -> tf.data.Options:
    """Deterministic tf.data options; `num_workers` caps the threads (one per op) if given."""
    options = tf.data.Options()
    options.deterministic = True
    if num_workers is not None:
        check_positive_int("num_workers", num_workers)
        options.threading.private_threadpool_size = num_workers
        options.threading.max_intra_op_parallelism = 1
    return options


def _loader(split: FileSplit | TfdsSplit) -> Callable[[tf.Tensor], tf.Tensor]:
    """Record key -> encoded bytes: files are read, TFDS records already hold the bytes."""
    return tf.io.read_file if isinstance(split, FileSplit) else tf.identity


def _shard_positions(
    positions: tf.data.Dataset, batch_size: int, process_count: int, index: int
) -> tf.data.Dataset:
    """Keeps this process's slice of every global batch from a stream of (position, record)."""
    mine = positions.filter(_plain(lambda pos, _: (pos // batch_size) % process_count == index))
    return mine.map(_plain(lambda _, record: record))


def _train_records(
    split: FileSplit | TfdsSplit,
    seed: int,
    epoch: int,
    first: int,
    stop: int,
    batch_size: int,
    process_count: int,
    process_index: int,
) -> tf.data.Dataset:
    """(key, label, example index) of this process's examples for global positions [first, stop)."""
    if isinstance(split, FileSplit):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(len(split), dtype=tf.int64),
            seed=_derived_seed(seed, epoch, _SHUFFLE),
            alg="philox",
        ).numpy()
        order = order[first:stop].reshape(-1, process_count, batch_size)[:, process_index]
        order = order.reshape(-1)
        # object arrays: a fixed-width unicode array of a million paths would take ~0.5 GB
        paths, labels = np.asarray(split.paths, dtype=object), np.asarray(split.labels, np.int32)
        return tf.data.Dataset.from_tensor_slices((paths[order], labels[order], order))
    file_seed, buffer_seed = (int(s) for s in _derived_seed(seed, epoch, _SHUFFLE))
    ds = split.records(shuffle_seed=file_seed).enumerate()
    ds = ds.shuffle(min(len(split), TFDS_SHUFFLE_BUFFER), seed=buffer_seed)
    ds = ds.map(_plain(lambda index, record: (record[0], record[1], index)))
    ds = ds.take(stop).skip(first).enumerate()
    return _shard_positions(ds, batch_size, process_count, process_index)


def train_batches(
    source: DataSource,
    *,
    batch_size: int,
    image_size: int,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int | None = None,
    normalize: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of this process's augmented batches {"image": f32 [B,S,S,3], "label": i32 [B]}.

    `normalize=False` yields the same pixels as uint8 [B,S,S,3] before the ImageNet
    normalisation (`normalize_images` of them equals the normalised batch within float32
    rounding): a quarter of the bytes to copy to the devices and no host CPU spent on it, for
    steps that normalise on the device (`train.make_train_step` accepts uint8).

    `batch_size` is per process; global batch g holds positions [g*B*P, (g+1)*B*P) of the
    epoch's order and process i takes its i-th slice of B. Deterministic in (seed, epoch);
    `start_batch=k` yields global batches k, k+1, ... exactly as a full epoch would.
    `num_workers` bounds the decoding threads (default: tf.data's autotuning).
    """
    check_positive_int("batch_size", batch_size)
    check_positive_int("image_size", image_size)
    _check_seed(seed)
    _check_process(process_index, process_count)
    if epoch < 0:
        raise ValueError(f"epoch must be non-negative, got {epoch}")
    global_batch = batch_size * process_count
    steps = steps_per_epoch(source, global_batch)
    if not 0 <= start_batch <= steps:
        raise ValueError(
            f"start_batch must be in [0, {steps}] (batches per epoch), got {start_batch}"
        )
    split = source.train_split
    records = _train_records(
        split,
        seed,
        epoch,
        start_batch * global_batch,
        steps * global_batch,
        batch_size,
        process_count,
        process_index,
    )
    load, base_key = _loader(split), tf.constant(_derived_seed(seed, epoch, _AUGMENT))
    transform = _train_fn(image_size)

    @_plain
    def example(key: tf.Tensor, label: tf.Tensor, index: tf.Tensor) -> dict[str, tf.Tensor]:
        aug_key = tf.random.experimental.stateless_fold_in(base_key, index, alg="philox")
        return {"image": transform(load(key), aug_key), "label": label}

    ds = records.map(example, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    if normalize:
        ds = ds.map(_plain(lambda batch: {**batch, "image": _normalize(batch["image"])}))
    return ds.prefetch(AUTOTUNE).with_options(_pipeline_options(num_workers)).as_numpy_iterator()


def _eval_records(split: FileSplit | TfdsSplit, padded: int) -> tf.data.Dataset:
    """(key, label, index, mask) of the whole split in order, then padding up to `padded`."""
    if isinstance(split, FileSplit):
        real = tf.data.Dataset.from_tensor_slices(
            (list(split.paths), np.asarray(split.labels, dtype=np.int32))
        )
    else:
        real = split.records()
    real = real.enumerate().map(_plain(lambda i, r: (r[0], r[1], tf.cast(i, tf.int32), True)))
    pad = tf.data.Dataset.from_tensors((tf.constant(""), 0, -1, False))
    return real.concatenate(pad.repeat(padded - len(split)))


def eval_batches(
    source: DataSource,
    *,
    batch_size: int,
    image_size: int,
    resize_size: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The eval split once over all processes, in order, as padded per-process batches.

    Images: shorter side resized to `resize_size` (see `eval_resize_size`), center crop
    `image_size`.

    Batches are {"image": f32 [B,S,S,3], "label": i32 [B], "mask": bool [B], "index": i32 [B]}:
    `mask` marks real examples (padding has zero images, label 0, index -1) and `index` is the
    example's position in the eval split. Every process yields `eval_steps(source, B * P)`
    batches, so collectives stay in step.

    Unlike training there is no uint8 option: the resized crop is normalised as float without
    rounding to uint8 first, so a uint8 form would change the images (by up to half a level).
    """
    check_positive_int("batch_size", batch_size)
    resize_size = eval_resize_size(image_size, resize_size)
    _check_process(process_index, process_count)
    if source.num_eval == 0:
        raise ValueError(f"{source.origin} has no evaluation examples")
    global_batch = batch_size * process_count
    split = source.eval_split
    records = _eval_records(split, eval_steps(source, global_batch) * global_batch)
    records = _shard_positions(records.enumerate(), batch_size, process_count, process_index)
    load, transform = _loader(split), _eval_fn(image_size, resize_size)

    @_plain
    def example(key: tf.Tensor, label: tf.Tensor, index: tf.Tensor, mask: tf.Tensor) -> dict:
        image = tf.cond(
            mask,
            lambda: transform(_decode(load(key))),
            lambda: tf.zeros([image_size, image_size, 3]),
        )
        return {"image": image, "label": label, "mask": mask, "index": index}

    ds = records.map(example, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)
    return ds.with_options(_pipeline_options(num_workers)).as_numpy_iterator()
