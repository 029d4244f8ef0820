"""Data-parallel evaluation on a labelled split: loss, top-1/top-5 and the confusion matrix.

`evaluate` runs a parallelized eval step (`steps.make_eval_step` under `parallel.parallelize`)
over padded, masked batches and totals them into an `EvalResult`; the trainer calls it every
epoch. `evaluate_checkpoint` scores a loaded model (`model_dir.load`) on the eval split of a
`data.DataSource` from `open_eval_data`, matching classes by name; scripts/evaluate.py reports
the result and draws it with `plot_confusion`.

`resnet_jax.data` (TensorFlow, seconds to import) is imported by the functions that read data,
so importing this module stays quick.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from resnet_jax import model_dir, parallel, steps
from resnet_jax.preprocessing import Preprocessing

if TYPE_CHECKING:
    from resnet_jax.data import DataSource


@dataclasses.dataclass
class EvalResult:
    """Totals over a whole split: mean loss, top-1/top-5 accuracy and the confusion matrix.

    `class_names` label the rows/columns of `confusion` (None: "0".."n-1"), `data` says where
    the examples came from and `skipped` lists unreadable files left out, as (path, reason).
    """

    loss: float
    top1: float
    top5: float
    count: int
    confusion: np.ndarray  # [true, predicted] counts
    class_names: list[str] | None = None
    data: str | None = None
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def names(self) -> list[str]:
        """`class_names`, or "0".."n-1" when there are none."""
        if self.class_names is not None:
            return list(self.class_names)
        return [str(i) for i in range(len(self.confusion))]

    def as_metrics(self, prefix: str = "val_") -> dict[str, float]:
        """{prefix}loss, {prefix}accuracy (top-1) and {prefix}top5, as logged and checkpointed."""
        return {
            f"{prefix}loss": self.loss,
            f"{prefix}accuracy": self.top1,
            f"{prefix}top5": self.top5,
        }

    def per_class(self) -> list[dict[str, Any]]:
        """Per class: images, correct top-1 predictions and accuracy (None without images)."""
        rows = []
        for i, name in enumerate(self.names):
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
            "class_names": self.names,
            "confusion": np.asarray(self.confusion).tolist(),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }


class EvalInterrupted(Exception):
    """`evaluate` was abandoned: its `stop` callback returned a signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"evaluation interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def evaluate(
    eval_step: Callable,
    variables: dict,
    batches: Iterator[dict],
    mesh: jax.sharding.Mesh,
    kind: str,
    num_classes: int,
    stop: Callable[[], int | None] | None = None,
) -> EvalResult:
    """Run a parallelized eval step over padded, masked batches and total the results; the
    confusion matrix counts this process's examples.

    `stop` is called before every batch (on every process alike: it may be collective); when it
    returns a signal number the evaluation is abandoned with `EvalInterrupted`, so a stop request
    is not held up by a long evaluation.
    """
    totals: dict[str, float] = {}
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for batch in batches:
        signum = None if stop is None else stop()
        if signum is not None:
            raise EvalInterrupted(signum)
        sums, predictions = eval_step(variables, parallel.prepare_batch(batch, mesh, kind))
        for key, value in parallel.fetch_state(sums, kind).items():
            totals[key] = totals.get(key, 0) + value.item()
        predictions = parallel.fetch_batch(predictions, kind)
        mask = batch["mask"].astype(bool)
        np.add.at(confusion, (batch["label"][mask], predictions[mask]), 1)
    count = int(totals.get("count", 0))
    if count == 0:
        raise ValueError("evaluation split is empty")
    return EvalResult(
        loss=totals["loss"] / count,
        top1=totals["correct_top1"] / count,
        top5=totals["correct_top5"] / count,
        count=count,
        confusion=confusion,
    )


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
    loaded: model_dir.LoadedModel,
    source: DataSource,
    *,
    batch_size: int,
    preprocessing: Preprocessing | None = None,
    kind: str = "shard_map",
) -> EvalResult:
    """Score `loaded` on the eval split of `source` with the data-parallel eval step over every
    device: `batch_size` (global, a multiple of the device count) images per step, the last
    batch padded and masked, every example counted exactly once (the confusion matrix summed over
    processes). Classes are matched by name. Images are prepared as `preprocessing` says (None:
    the one `loaded` stored, `LoadedModel.eval_preprocessing()`)."""
    from resnet_jax import data

    classes = loaded.num_classes
    if classes is None:
        raise ValueError(f"{loaded.path}: the model has no classification head to evaluate")
    if loaded.class_names is None and len(source.class_names) != classes:
        raise ValueError(
            f"{loaded.path} records no class names and has {classes} classes, but "
            f"{source.origin} has {len(source.class_names)}"
        )
    if preprocessing is None:
        preprocessing = loaded.eval_preprocessing()
    mapping = label_map(source.class_names, loaded.class_names)
    mesh = parallel.make_mesh()
    parallel.check_divisible("batch_size", batch_size, mesh.size)
    model = loaded.model(axis_name=parallel.BATCH_AXIS)
    step = parallel.parallelize(
        steps.make_eval_step(model),
        mesh,
        kind=kind,
        donate=False,
        out_specs=parallel.EVAL_OUT_SPECS,
    )
    variables = parallel.place_state(loaded.variables, mesh, kind)
    batches = data.eval_batches(
        source,
        batch_size=batch_size // jax.process_count(),
        preprocessing=preprocessing,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    result = evaluate(step, variables, _relabelled(batches, mapping), mesh, kind, classes)
    confusion = result.confusion
    if jax.process_count() > 1:  # each process counted its own examples
        from jax.experimental import multihost_utils

        confusion = np.asarray(multihost_utils.process_allgather(confusion)).sum(axis=0)
    return dataclasses.replace(
        result,
        confusion=confusion,
        class_names=list(loaded.class_names or source.class_names),
        data=source.origin,
        skipped=source.skipped,
    )


def plot_confusion(
    confusion: np.ndarray, class_names: Sequence[str], path: str | os.PathLike, title: str = ""
) -> Path:
    """PNG of a [true, predicted] count matrix, rows normalised for colour, counts written in
    the cells and classes on the axes when there are few enough to read. Draws on a figure of
    its own (no pyplot), so matplotlib's global backend and figures are left alone."""
    from matplotlib.figure import Figure  # matplotlib: only when a plot is asked for

    confusion = np.asarray(confusion)
    n = len(class_names)
    rows = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    side = min(max(4.0, 0.45 * n + 2.5), 40.0)
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.subplots()
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
    return path
