"""Input pipelines (tf.data) for training and evaluating ResNets on image folders or TFDS.

Two kinds of source, one preprocessing (`augment`):

* Image folders ``DIR/train/<class>/*`` and optionally ``DIR/val/<class>/*`` (`image_folders`:
  torchvision's ImageFolder layout, every file vetted once when the source is opened, the vetted
  lists optionally cached in a file).
* TFDS datasets (``tfds.builder(name).download_and_prepare()``), read as encoded bytes. Before
  downloading, the download hosts are checked with a short timeout, so that without network
  opening fails within seconds instead of after TFDS's minutes of retries.

Training batches: the `augment.TrainAugment` transform (random-resized-crop, flip, optional
TrivialAugmentWide/RandAugment), ImageNet mean/std (applied per batch; ``normalize=False`` leaves
the uint8 pixels for `normalize_images` to normalise on the devices, as training does), and with
random erasing a per-example box ("erase_box") that the train step erases after normalising.
Repeated augmentation (``ra_reps`` N > 1, image folders only) follows torchvision's RASampler.
Eval batches: the eval transform a `preprocessing.Preprocessing` describes
(default: `default_preprocessing(image_size)`, training's validation transform): shorter side
resized, center crop, normalisation with its mean/std.

Several processes: every process yields the same number of batches (collectives stay in step).
Image folders: global batch g holds positions [g*B*P, (g+1)*B*P) of the epoch's order and process
i reads only its i-th slice of B. TFDS: each process reads only its own contiguous share of the
split (`tfds.even_splits`; training shares are equal, the remainder dropped) and batches it, so
TFDS batches depend on the process count.

Determinism: an epoch is a function of ``(seed, epoch)`` (and the process count, for TFDS). For
image folders the example order is a stateless shuffle of the file indices, and every example's
augmentation uses a key folded from ``(seed, epoch)`` and its example index, so the stream is
bit-identical whatever the parallelism, the process of an example does not change its pixels,
and resuming at ``start_batch`` drops file indices before anything is read or decoded. With
repeated augmentation the key also folds in the repetition (0..N-1). TFDS
sources (no random access) shuffle files and a buffer with seeds derived from ``(seed, epoch)``
and skip records before decoding.

Batches are dicts of numpy arrays: training {"image", "label"}, evaluation adds "mask" (real
examples, the last batches are padded so every process yields the same number) and "index"
(position in the eval split).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from resnet_jax import augment as augment_lib
from resnet_jax import image_folders, tfds_sources

# Re-exported for pipeline users: the decoders, the TensorFlow-free preprocessing pieces, the
# image-folder and TFDS pieces.
from resnet_jax.augment import import_tensorflow as import_tensorflow
from resnet_jax.augment import load_image as load_image
from resnet_jax.augment import preprocess_for_eval as preprocess_for_eval
from resnet_jax.image_folders import IMAGE_EXTENSIONS as IMAGE_EXTENSIONS
from resnet_jax.image_folders import AllGather
from resnet_jax.image_folders import BadImageWarning as BadImageWarning
from resnet_jax.image_folders import FileSplit as FileSplit
from resnet_jax.image_folders import list_images as list_images
from resnet_jax.preprocessing import IMAGENET_MEAN as IMAGENET_MEAN
from resnet_jax.preprocessing import IMAGENET_STD as IMAGENET_STD
from resnet_jax.preprocessing import Preprocessing as Preprocessing
from resnet_jax.preprocessing import check_positive_int, check_process, eval_preprocessing
from resnet_jax.preprocessing import default_preprocessing as default_preprocessing
from resnet_jax.preprocessing import normalize_images as normalize_images
from resnet_jax.tfds_sources import TfdsSplit as TfdsSplit
from resnet_jax.tfds_sources import check_download_hosts as check_download_hosts
from resnet_jax.tfds_sources import tfds_split as tfds_split

tf = import_tensorflow()

AUTOTUNE = tf.data.AUTOTUNE
# Records held by the shuffle buffer of TFDS sources (files are shuffled too); a share that fits
# gets a uniform permutation.
TFDS_SHUFFLE_BUFFER = 10_000
# Tags keeping the random streams derived from (seed, epoch) independent of each other
# (image_folders uses 2 for the held-out split).
_SHUFFLE, _AUGMENT = 0, 1


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


def _from_folders(folders: image_folders.Folders) -> DataSource:
    """The DataSource of an image-folder source."""
    return DataSource(
        class_names=folders.class_names,
        num_train=len(folders.train),
        num_eval=len(folders.eval),
        train_split=folders.train,
        eval_split=folders.eval,
        origin=folders.origin,
        skipped=folders.skipped,
    )


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
    file_list_cache: str | os.PathLike | None = None,
    process_index: int = 0,
    process_count: int = 1,
    allgather: AllGather | None = None,
) -> DataSource:
    """Finds a dataset: image folders under `data_dir` if given, else the TFDS `dataset`.

    Image folders: every file is decoded once to leave out unreadable ones (a `BadImageWarning`
    lists them). Process `process_index` of `process_count` decodes only every
    `process_count`-th file and the results are combined with `allgather` (an array [n] from
    each process -> [process_count, n]; default `jax.experimental.multihost_utils.
    process_allgather`, called only with several processes, by all of them together). With
    `file_list_cache` (a JSON file path), process 0 writes the vetted lists there (paths
    relative to `data_dir`, unreadable files with reasons, a fingerprint of every file's name,
    size and modification time); a later open reuses them instead of decoding when the
    fingerprint still matches, giving the same lists in the same order. Without `val/`,
    `val_fraction` of every class is held out (rounded, at least one image left for training),
    chosen by a permutation seeded with `seed`.

    TFDS: uses the 'validation' (else 'test') split; with only 'train' (tf_flowers) the first
    ``1 - val_fraction`` of it (whole percent) trains and the rest evaluates. The splits hold
    only this process's share (see the module docstring); pass the same `process_index` and
    `process_count` to the batches. `tfds_manual_dir` is where datasets that cannot be
    downloaded (imagenet2012) expect their archives. Raises RuntimeError naming the dataset
    when it cannot be prepared, within seconds when there is no network.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    _check_seed(seed)
    check_process(process_index, process_count)
    if data_dir is not None:
        cache = None if file_list_cache is None else Path(file_list_cache)
        vetting = image_folders.Vetting(cache, process_index, process_count, allgather)
        return _from_folders(
            image_folders.open_folders(Path(data_dir), val_fraction, seed, vetting)
        )
    class_names, train_split, eval_split, origin = tfds_sources.open_tfds(
        dataset, tfds_data_dir, tfds_manual_dir, val_fraction, process_index, process_count
    )
    return DataSource(
        class_names=class_names,
        num_train=train_split.size,
        num_eval=eval_split.size,
        train_split=train_split,
        eval_split=eval_split,
        origin=origin,
    )


def open_class_folders(root: str | os.PathLike) -> DataSource:
    """Every image of `root/<class>/...` as the eval split of a source (no training split), for
    evaluating on a folder of class folders: listed and vetted like the training folders
    (unreadable files skipped with a `BadImageWarning`), classes in sorted order."""
    return _from_folders(image_folders.open_class_folders(root))


# --------------------------------------------------------------------------------------------
# Batches


def _check_seed(seed: int) -> None:
    """Seeds feed numpy's SeedSequence: non-negative integers."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def steps_per_epoch(source: DataSource, global_batch_size: int, ra_reps: int = 1) -> int:
    """Full global batches in one training epoch (the remainder is dropped). With repeated
    augmentation (`ra_reps` > 1) the epoch keeps torchvision's RASampler length: every replica
    yields floor(n // 256 * 256 / replicas) examples, so the epoch holds n // 256 * 256 examples
    (repetitions included) whatever the replica count, and the first ~n / ra_reps images of the
    epoch's order appear ra_reps times each."""
    check_positive_int("global_batch_size", global_batch_size)
    check_positive_int("ra_reps", ra_reps)
    examples = source.num_train if ra_reps == 1 else source.num_train // 256 * 256
    steps = examples // global_batch_size
    if steps == 0:
        raise ValueError(
            f"global batch size {global_batch_size} exceeds the {examples} training examples of "
            f"an epoch of {source.origin}"
            + (" (repeated augmentation uses n // 256 * 256 of them)" if ra_reps > 1 else "")
        )
    return steps


def eval_steps(source: DataSource, global_batch_size: int) -> int:
    """Global batches covering the eval split once (the last one padded)."""
    check_positive_int("global_batch_size", global_batch_size)
    return math.ceil(source.num_eval / global_batch_size)


def _derived_seed(seed: int, epoch: int, tag: int) -> np.ndarray:
    """Two uint32 words from (seed, epoch, tag): independent streams per purpose and epoch."""
    return np.random.SeedSequence([seed, epoch, tag]).generate_state(2).astype(np.int64)


def _file_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's order of an image-folder split: a stateless shuffle of range(n)."""
    return tf.random.experimental.stateless_shuffle(
        tf.range(n, dtype=tf.int64), seed=_derived_seed(seed, epoch, _SHUFFLE), alg="philox"
    ).numpy()


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
    mine = positions.filter(
        augment_lib.plain(lambda pos, _: (pos // batch_size) % process_count == index)
    )
    return mine.map(augment_lib.plain(lambda _, record: record))


def _train_records(
    split: FileSplit | TfdsSplit,
    seed: int,
    epoch: int,
    first: int,
    stop: int,
    batch_size: int,
    process_count: int,
    process_index: int,
    ra: tuple[int, int] = (1, 1),
) -> tf.data.Dataset:
    """(key, label, example index[, repetition]) of this process's examples for global positions
    [first, stop); `ra` (reps, devices per process) with reps > 1: RASampler's order, the
    repetition included."""
    if isinstance(split, FileSplit):
        order = _file_order(len(split), seed, epoch)
        # object arrays: a fixed-width unicode array of a million paths would take ~0.5 GB
        paths, labels = np.asarray(split.paths, dtype=object), np.asarray(split.labels, np.int32)
        reps, devices = ra
        if reps == 1:
            order = order[first:stop].reshape(-1, process_count, batch_size)[:, process_index]
            order = order.reshape(-1)
            return tf.data.Dataset.from_tensor_slices((paths[order], labels[order], order))
        global_batch = batch_size * process_count
        picked = augment_lib.ra_positions(
            order, reps, process_count * devices, batch_size // devices, stop // global_batch
        )[first // global_batch :]
        mine = picked.reshape(-1, process_count, batch_size, 2)[:, process_index].reshape(-1, 2)
        index, rep = mine[:, 0], mine[:, 1]
        return tf.data.Dataset.from_tensor_slices((paths[index], labels[index], index, rep))
    if ra[0] > 1:
        raise ValueError("repeated augmentation (ra_reps > 1) needs an image-folder source")
    split.check_process(process_index, process_count)
    offset = split.share_offset
    file_seed, buffer_seed = (int(s) for s in _derived_seed(seed, epoch, _SHUFFLE))
    ds = split.records(shuffle_seed=file_seed).enumerate()
    ds = ds.shuffle(min(split.share_size, TFDS_SHUFFLE_BUFFER), seed=buffer_seed)
    ds = ds.map(augment_lib.plain(lambda index, record: (record[0], record[1], index + offset)))
    # Global positions [first, stop) hold this process's share positions [first/P, stop/P).
    return ds.take(stop // process_count).skip(first // process_count)


def train_batches(
    source: DataSource,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    augment: augment_lib.TrainAugment | None = None,
    image_size: int | None = None,
    start_batch: int = 0,
    ra_reps: int = 1,
    devices_per_process: int = 1,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int | None = None,
    normalize: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of this process's augmented batches {"image": f32 [B,S,S,3], "label": i32 [B]}.

    `augment` is the transform (default `TrainAugment(crop_size=image_size)`; give one of the
    two, both only if they agree on the size). With `augment.random_erase` > 0 batches also hold
    "erase_box" i32 [B, 4] (top, left, height, width; zeros: no erase, see
    `augment.erase_box`), which the train step erases after normalising (`steps._model_input`).

    `normalize=False` yields the same pixels as uint8 [B,S,S,3] before the ImageNet
    normalisation (`normalize_images` of them equals the normalised batch within float32
    rounding): a quarter of the bytes to copy to the devices and no host CPU spent on it, for
    steps that normalise on the device (`steps.make_train_step` accepts uint8).

    `batch_size` is per process; image folders: global batch g holds positions
    [g*B*P, (g+1)*B*P) of the epoch's order and process i takes its i-th slice of B; TFDS:
    process i batches its own share (see the module docstring). `ra_reps` N > 1 (image folders):
    torchvision's RASampler over process_count * `devices_per_process` replicas
    (`augment.ra_positions`; a process's batch is its devices' batches in a row, as the devices
    shard it), every repetition augmented with its own key; the epoch is
    `steps_per_epoch(source, B * P, N)` batches. Deterministic in (seed, epoch);
    `start_batch=k` yields global batches k, k+1, ... exactly as a full epoch would.
    `num_workers` bounds the decoding threads (default: tf.data's autotuning).

    (Over 80 lines: the argument checks and the traced per-example function are one contract.)
    """
    check_positive_int("batch_size", batch_size)
    augment = augment_lib.train_augment(augment, image_size)
    _check_seed(seed)
    check_process(process_index, process_count)
    check_positive_int("devices_per_process", devices_per_process)
    if ra_reps > 1 and batch_size % devices_per_process:
        raise ValueError(
            f"devices_per_process {devices_per_process} must divide batch_size {batch_size}"
        )
    if epoch < 0:
        raise ValueError(f"epoch must be non-negative, got {epoch}")
    global_batch = batch_size * process_count
    steps = steps_per_epoch(source, global_batch, ra_reps)
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
        (ra_reps, devices_per_process),
    )
    load, base_key = _loader(split), tf.constant(_derived_seed(seed, epoch, _AUGMENT))
    transform = augment_lib.train_fn(augment)

    @augment_lib.plain
    def example(key: tf.Tensor, label: tf.Tensor, index: tf.Tensor, *rep) -> dict:
        aug_key = tf.random.experimental.stateless_fold_in(base_key, index, alg="philox")
        if rep:  # repeated augmentation: one key per repetition
            aug_key = tf.random.experimental.stateless_fold_in(aug_key, rep[0], alg="philox")
        out = {"image": transform(load(key), aug_key), "label": label}
        if augment.random_erase > 0:
            out["erase_box"] = augment_lib.erase_box(
                aug_key, augment.crop_size, augment.random_erase
            )
        return out

    ds = records.map(example, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    if normalize:
        ds = ds.map(
            augment_lib.plain(
                lambda batch: {**batch, "image": augment_lib.normalize(batch["image"])}
            )
        )
    return ds.prefetch(AUTOTUNE).with_options(_pipeline_options(num_workers)).as_numpy_iterator()


def _eval_records(
    split: FileSplit | TfdsSplit,
    batch_size: int,
    steps: int,
    process_index: int,
    process_count: int,
) -> tf.data.Dataset:
    """(key, label, index, mask) of this process's eval examples in order, padded to `steps`
    batches: image folders take their slice of every global batch of the padded split, TFDS
    processes their own share."""
    if isinstance(split, FileSplit):
        real = tf.data.Dataset.from_tensor_slices(
            (list(split.paths), np.asarray(split.labels, dtype=np.int32))
        )
        offset, count = 0, len(split)
    else:
        split.check_process(process_index, process_count)
        real, offset, count = split.records(), split.share_offset, split.share_size
    real = real.enumerate().map(
        augment_lib.plain(lambda i, r: (r[0], r[1], tf.cast(i + offset, tf.int32), True))
    )
    pad = tf.data.Dataset.from_tensors((tf.constant(""), 0, -1, False))
    if isinstance(split, TfdsSplit):
        return real.concatenate(pad.repeat(steps * batch_size - count))
    records = real.concatenate(pad.repeat(steps * batch_size * process_count - count))
    return _shard_positions(records.enumerate(), batch_size, process_count, process_index)


def eval_batches(
    source: DataSource,
    *,
    batch_size: int,
    image_size: int | None = None,
    preprocessing: Preprocessing | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The eval split once over all processes, in order, as padded per-process batches.

    Images: as `preprocessing` says (shorter side resized with its interpolation, center crop
    its `eval_size`, its mean/std), or `default_preprocessing(image_size)` when it is None; give
    one of the two (both only if they agree on the size).

    Batches are {"image": f32 [B,S,S,3], "label": i32 [B], "mask": bool [B], "index": i32 [B]}:
    `mask` marks real examples (padding has zero images, label 0, index -1) and `index` is the
    example's position in the eval split. Every process yields `eval_steps(source, B * P)`
    batches, so collectives stay in step; together they hold every example once.

    Unlike training there is no uint8 option: the resized crop is normalised as float without
    rounding to uint8 first, so a uint8 form would change the images (by up to half a level).
    """
    check_positive_int("batch_size", batch_size)
    preprocessing = eval_preprocessing(image_size, preprocessing)
    image_size = preprocessing.eval_size
    check_process(process_index, process_count)
    if source.num_eval == 0:
        raise ValueError(f"{source.origin} has no evaluation examples")
    split = source.eval_split
    steps = eval_steps(source, batch_size * process_count)
    records = _eval_records(split, batch_size, steps, process_index, process_count)
    load, transform = _loader(split), augment_lib.eval_fn(preprocessing)

    @augment_lib.plain
    def example(key: tf.Tensor, label: tf.Tensor, index: tf.Tensor, mask: tf.Tensor) -> dict:
        image = tf.cond(
            mask,
            lambda: transform(augment_lib.decode(load(key))),
            lambda: tf.zeros([image_size, image_size, 3]),
        )
        return {"image": image, "label": label, "mask": mask, "index": index}

    ds = records.map(example, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)
    return ds.with_options(_pipeline_options(num_workers)).as_numpy_iterator()
