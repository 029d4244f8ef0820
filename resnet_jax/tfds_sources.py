"""TFDS sources: a prepared TFDS dataset's splits, of which each process reads only its share.

`open_tfds` prepares the dataset (`download_and_prepare`) after checking with a short timeout
that its download hosts answer, so that without network it fails within seconds, naming the
dataset, instead of after TFDS's minutes of download retries. Each split is read as encoded
image bytes; process i of P reads only the i-th of ``tfds.even_splits(split, P)`` (contiguous
shares in order; training shares equal, the remainder dropped).
"""

from __future__ import annotations

import dataclasses
import difflib
import socket
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from resnet_jax.augment import import_tensorflow, plain
from resnet_jax.preprocessing import check_process

tf = import_tensorflow()
import tensorflow_datasets as tfds  # noqa: E402  (after TensorFlow: see import_tensorflow)

# Seconds to wait for each download host of a TFDS dataset before reporting that there is no
# network.
NETWORK_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True)
class TfdsSplit:
    """One split of a prepared TFDS dataset, read with images left encoded.

    `size` examples in all; this process reads only its share: TFDS split `share`, holding
    `share_size` examples from position `share_offset` of the split (the whole split for one
    process)."""

    builder: Any = dataclasses.field(repr=False)
    split: str
    size: int
    process_index: int = 0
    process_count: int = 1
    share: Any = None
    share_size: int = 0
    share_offset: int = 0

    def __len__(self) -> int:
        return self.size

    def records(self, *, shuffle_seed: int | None = None) -> tf.data.Dataset:
        """(encoded image, label) records of this process's share in a fixed order, or with
        files shuffled by `shuffle_seed`."""
        read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed)
        ds = self.builder.as_dataset(
            split=self.share,
            decoders={"image": tfds.decode.SkipDecoding()},
            shuffle_files=shuffle_seed is not None,
            read_config=read_config,
        )
        return ds.map(plain(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32))))

    def check_process(self, process_index: int, process_count: int) -> None:
        """ValueError unless the split was opened for this (process_index, process_count)."""
        if (process_index, process_count) != (self.process_index, self.process_count):
            raise ValueError(
                f"TFDS split {self.split!r} was opened for process {self.process_index} of "
                f"{self.process_count}, not {process_index} of {process_count}: pass the same "
                "process_index and process_count to open_source and to the batches"
            )


def _tfds_builder(name: str, data_dir: str | None) -> Any:
    """`tfds.builder(name)` with a short error (and close matches) for an unknown name."""
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as err:
        close = difflib.get_close_matches(name, tfds.list_builders(), n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"TFDS dataset {name!r} not found{hint}") from err


def check_download_hosts(
    name: str, urls: Iterable[str], timeout: float = NETWORK_TIMEOUT_S
) -> None:
    """Raises RuntimeError naming dataset `name` unless every host of `urls` accepts a TCP
    connection within `timeout` seconds (name resolution included): without network TFDS would
    retry each download for minutes before failing."""
    hosts = set()
    for url in urls:
        parts = urlsplit(url)
        if parts.hostname:
            hosts.add((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)))
    for host, port in sorted(hosts):
        errors: list[OSError] = []

        def connect(host: str = host, port: int = port, errors: list = errors) -> None:
            try:
                socket.create_connection((host, port), timeout=timeout).close()
            except OSError as err:
                errors.append(err)

        # A thread bounds name resolution too, which has no timeout of its own.
        attempt = threading.Thread(target=connect, daemon=True)
        attempt.start()
        attempt.join(timeout)
        if attempt.is_alive():
            reason = f"no answer within {timeout:g} s"
        elif errors:
            reason = str(errors[0])
        else:
            continue
        raise RuntimeError(
            f"could not prepare TFDS dataset {name!r}: no network connection to its download "
            f"host {host}:{port} ({reason}). Offline, train on image folders instead: data_dir "
            "(--data-dir DIR of scripts/train.py, with DIR/train/<class>/<image>), or prepare "
            "the dataset where there is network and pass its tfds_data_dir (--tfds-data-dir)"
        )


def _prepare_tfds(builder: Any, name: str, manual_dir: str | None) -> None:
    """Downloads (after checking the network) and prepares `builder` unless it is prepared."""
    if builder.is_prepared():
        return
    manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if not manual:  # datasets downloaded by hand need no network
        check_download_hosts(name, builder.url_infos or {})
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
        builder.download_and_prepare(download_config=config)
    except Exception as err:  # download, extraction or manual-dir failures alike
        if manual:
            hint = (
                f"{name} must be downloaded by hand into the manual directory "
                "(tfds_manual_dir, --tfds-manual-dir of scripts/train.py; TFDS's default is "
                f"<tfds data dir>/downloads/manual): {' '.join(manual.split())}"
            )
        else:
            hint = "TFDS needs network access to download it; offline, pass image folders instead"
        raise RuntimeError(
            f"could not prepare TFDS dataset {name!r} in {builder.data_dir}: "
            f"{type(err).__name__}: {' '.join(str(err).split()).rstrip('.')}. {hint}"
        ) from err


def open_tfds(
    name: str,
    data_dir: str | None,
    manual_dir: str | None,
    val_fraction: float,
    process_index: int,
    process_count: int,
) -> tuple[list[str], TfdsSplit, TfdsSplit, str]:
    """Prepares TFDS dataset `name` and returns its class names, this process's shares of the
    train and eval splits and a description of them (see `data.open_source`)."""
    builder = _tfds_builder(name, data_dir)
    _prepare_tfds(builder, name, manual_dir)
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
    process = dict(process_index=process_index, process_count=process_count)
    train_split = tfds_split(builder, train_name, drop_remainder=True, **process)
    eval_split = tfds_split(builder, eval_name, **process)
    origin = f"TFDS {builder.info.full_name} in {builder.data_dir} ({train_name} / {eval_name})"
    return list(label.names), train_split, eval_split, origin


def _tfds_size(builder: Any, split: Any) -> int:
    """Examples in `split` of a prepared builder, from its known cardinality."""
    ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    size = int(ds.cardinality())
    if size < 0:
        raise ValueError(f"TFDS split {builder.name}/{split} has no known size")
    return size


def tfds_split(
    builder: Any,
    split: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = False,
) -> TfdsSplit:
    """`split` (a name or slice such as 'train[:80%]') of a prepared TFDS `builder`, of which
    this process reads its share: the `process_index`-th of `tfds.even_splits(split,
    process_count, drop_remainder=drop_remainder)` (contiguous, in order; with
    `drop_remainder` all equal). An unknown split raises from TFDS (ValueError or KeyError)."""
    check_process(process_index, process_count)
    size = _tfds_size(builder, split)
    if process_count == 1:
        return TfdsSplit(builder, split, size, share=split, share_size=size)
    shares = tfds.even_splits(split, n=process_count, drop_remainder=drop_remainder)
    sizes = [_tfds_size(builder, share) for share in shares[: process_index + 1]]
    return TfdsSplit(
        builder,
        split,
        size,
        process_index=process_index,
        process_count=process_count,
        share=shares[process_index],
        share_size=sizes[-1],
        share_offset=sum(sizes[:-1]),
    )
