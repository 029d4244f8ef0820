"""Image-folder sources: torchvision's ImageFolder layout, listed, vetted and split.

``DIR/train/<class>/*`` and optionally ``DIR/val/<class>/*``: classes are the sorted folder names
of train/ (index = position). Every file is decoded once (cheaply, see `augment.probe`) when the
source is opened, so unreadable files are reported and left out up front instead of failing
mid-epoch. With several processes each one decodes only its share of the files and the results
are gathered, and a file-list cache (a JSON file) keeps the vetted lists: a later open of an
unchanged folder (same names, sizes and modification times) reads them instead of decoding
every file again. Without val/, a seeded stratified part of train/ is held out for evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from resnet_jax.augment import import_tensorflow, load_image, plain, probe

tf = import_tensorflow()

# torchvision ImageFolder's extensions (plus .gif); everything but JPEG is decoded by PIL.
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif",
)  # fmt: skip
# Version of the file-list cache's JSON layout; a cache of another version is rebuilt.
CACHE_FORMAT = 1
# Seed tag of the held-out split (the pipelines' tags are 0 and 1).
_HOLDOUT = 2

# {split folder: {class name: [file paths]}}
Files = dict[Path, dict[str, list[str]]]
# Gathers one array from every process: x [n] -> [process_count, n].
AllGather = Callable[[np.ndarray], Any]


class BadImageWarning(UserWarning):
    """Some image files could not be decoded and were left out of the source."""


@dataclasses.dataclass(frozen=True)
class FileSplit:
    """One split of an image-folder source: file paths and their class indices."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)


class Folders(NamedTuple):
    """What an image-folder source holds (`data.DataSource` wraps it)."""

    class_names: list[str]
    train: FileSplit
    eval: FileSplit
    origin: str
    skipped: tuple[tuple[str, str], ...]  # (path, reason) of files left out as unreadable


@dataclasses.dataclass(frozen=True)
class Vetting:
    """How to vet the files: which share this process decodes, how the shares are gathered and
    where the vetted lists are cached (None: no cache)."""

    cache: Path | None = None
    process_index: int = 0
    process_count: int = 1
    allgather: AllGather | None = None

    def gather(self, x: np.ndarray) -> np.ndarray:
        """[process_count, n] from every process's `x` [n] (`x[None]` for one process)."""
        if self.process_count == 1:
            return x[None]
        if self.allgather is None:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x))
        return np.asarray(self.allgather(x))


def list_class_folders(split_dir: Path) -> list[str]:
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


def _decodes(paths: Sequence[str]) -> np.ndarray:
    """Which files decode (in parallel, with the pipelines' decoders); a bool per path."""
    ds = tf.data.Dataset.from_tensor_slices(list(paths)).enumerate()
    ds = ds.map(
        plain(lambda i, p: (i, probe(tf.io.read_file(p)))), num_parallel_calls=tf.data.AUTOTUNE
    )
    ok = np.zeros(len(paths), dtype=bool)
    for index, _ in ds.ignore_errors().as_numpy_iterator():
        ok[index] = True
    return ok


def _readable_mask(paths: Sequence[str], vetting: Vetting) -> np.ndarray:
    """Which files decode: this process decodes paths[process_index::process_count] and the
    shares of all processes are gathered into one bool per path."""
    count = vetting.process_count
    width = math.ceil(len(paths) / count)
    mine = np.ones(width, dtype=np.uint8)
    share = paths[vetting.process_index :: count]
    mine[: len(share)] = _decodes(share)
    gathered = vetting.gather(mine)
    ok = np.empty(len(paths), dtype=bool)
    for index in range(count):
        ok[index::count] = gathered[index][: len(ok[index::count])]
    return ok


def _unreadable_reason(path: str) -> str:
    """Why `path` failed to decode (only called for the few files that did)."""
    try:
        load_image(path)
    except (OSError, ValueError) as err:
        return str(err).removeprefix(f"cannot decode image {path}: ")
    return "failed to decode in the tf.data pipeline"


def _fingerprint(root: str, files: Files) -> str:
    """SHA-256 of every listed file's path (relative to `root`), size and modification time."""
    digest = hashlib.sha256()
    for by_class in files.values():
        for paths in by_class.values():
            for path in paths:
                stat = os.stat(path)
                relative = os.path.relpath(path, root)
                digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_cache(path: Path, root: str, fingerprint: str, files: Files) -> dict | None:
    """The vetted lists of a cache file that matches the listed `files`, else None."""
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cached, dict) or cached.get("format") != CACHE_FORMAT:
        return None
    if cached.get("fingerprint") != fingerprint:
        return None
    splits = {os.path.relpath(split_dir, root): by_class for split_dir, by_class in files.items()}
    if set(cached.get("splits", {})) != set(splits):
        return None
    return cached


def _write_cache(path: Path, cached: dict) -> None:
    """Writes the cache JSON atomically (a temporary file renamed over `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp{os.getpid()}")
    temporary.write_text(json.dumps(cached, indent=1))
    os.replace(temporary, path)


def _vet(root: Path, files: Files, vetting: Vetting) -> tuple[Files, tuple[tuple[str, str], ...]]:
    """The readable files of every split folder (from the cache when it matches, else decoded)
    and (path, reason) of the rest."""
    prefix = str(root)
    fingerprint = _fingerprint(prefix, files) if vetting.cache is not None else ""
    cached = None
    if vetting.cache is not None:
        cached = _read_cache(vetting.cache, prefix, fingerprint, files)
        # Every process must take the same branch: the decoding gathers across processes.
        if not vetting.gather(np.array([cached is not None], np.uint8)).all():
            cached = None
    if cached is not None:
        kept = {}
        for split_dir in files:
            by_class = cached["splits"][os.path.relpath(split_dir, prefix)]
            kept[split_dir] = {
                name: [str(root / rel) for rel in paths] for name, paths in by_class.items()
            }
        bad = tuple((str(root / rel), why) for rel, why in cached["skipped"])
        return kept, bad
    flat = [p for by_class in files.values() for paths in by_class.values() for p in paths]
    ok = dict(zip(flat, _readable_mask(flat, vetting), strict=True))
    bad = tuple((p, _unreadable_reason(p)) for p in flat if not ok[p])
    kept = {
        split_dir: {name: [p for p in paths if ok[p]] for name, paths in by_class.items()}
        for split_dir, by_class in files.items()
    }
    if vetting.cache is not None and vetting.process_index == 0:
        splits = {
            os.path.relpath(split_dir, prefix): {
                name: [os.path.relpath(p, prefix) for p in paths]
                for name, paths in by_class.items()
            }
            for split_dir, by_class in kept.items()
        }
        skipped = [[os.path.relpath(p, prefix), why] for p, why in bad]
        _write_cache(
            vetting.cache,
            {
                "format": CACHE_FORMAT,
                "fingerprint": fingerprint,
                "splits": splits,
                "skipped": skipped,
            },  # fmt: skip
        )
    return kept, bad


def _drop_unreadable(
    root: Path, files: Files, vetting: Vetting
) -> tuple[Files, tuple[tuple[str, str], ...]]:
    """Vets every file of every split folder; returns the readable ones and (path, reason) of
    the rest, warning about them; a class folder left without images is an error."""
    kept, bad = _vet(root, files, vetting)
    if bad:
        total = sum(len(paths) for by_class in files.values() for paths in by_class.values())
        listed = "; ".join(f"{p} ({why})" for p, why in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        warnings.warn(
            f"skipped {len(bad)} unreadable image file(s) of {total}: {listed}{more}",
            BadImageWarning,
            stacklevel=4,
        )
    for split_dir, by_class in kept.items():
        for name, paths in by_class.items():
            if not paths:
                raise ValueError(f"class folder {split_dir / name} has no readable images")
    return kept, bad


def _file_split(by_class: dict[str, list[str]], class_names: Sequence[str]) -> FileSplit:
    """Flattens {class: files} into a FileSplit in class order."""
    index = {name: i for i, name in enumerate(class_names)}
    pairs = [(p, index[name]) for name, paths in by_class.items() for p in paths]
    pairs.sort(key=lambda pair: (pair[1], pair[0]))
    return FileSplit(tuple(p for p, _ in pairs), tuple(label for _, label in pairs))


def open_class_folders(root: str | os.PathLike, vetting: Vetting = Vetting()) -> Folders:
    """Every image of `root/<class>/...` as the eval split (no training split), listed and
    vetted like the training folders, classes in sorted order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist")
    names = list_class_folders(root)
    files, skipped = _drop_unreadable(root, {root: _scan_split(root, names)}, vetting)
    split = _file_split(files[root], names)
    return Folders(names, FileSplit((), ()), split, f"image folders {root}", skipped)


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


def open_folders(root: Path, val_fraction: float, seed: int, vetting: Vetting) -> Folders:
    """DIR/train/<class>/* and DIR/val/<class>/* (or a held-out part of train/), vetted."""
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist")
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir():
        raise FileNotFoundError(
            f"{root} has no train/ folder: expected {root}/train/<class>/<image> "
            f"(and optionally {root}/val/<class>/<image>)"
        )
    class_names = list_class_folders(train_dir)
    files = {train_dir: _scan_split(train_dir, class_names)}
    if val_dir.is_dir():
        val_classes = list_class_folders(val_dir)
        unknown = sorted(set(val_classes) - set(class_names))
        if unknown:
            raise ValueError(f"{val_dir} has class folders not in {train_dir}: {unknown}")
        files[val_dir] = _scan_split(val_dir, val_classes)
    files, skipped = _drop_unreadable(root, files, vetting)
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
    return Folders(
        class_names,
        _file_split(train, class_names),
        _file_split(held, class_names),
        origin,
        skipped,
    )
