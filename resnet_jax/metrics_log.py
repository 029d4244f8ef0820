"""What a training run logs (process 0 only): metrics.jsonl, TensorBoard, a progress bar, curves.

`MetricsWriter` appends one JSON object per record to `workdir/metrics.jsonl` and mirrors the
numbers to TensorBoard; `plot_curves` draws train/val loss and accuracy from that file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from resnet_jax import data


class MetricsWriter:
    """Appends one JSON object per record to workdir/metrics.jsonl and mirrors to TensorBoard.

    Opening it keeps only the complete records up to `resume_step` (without its evaluation if
    `redo_eval`): what a killed run logged after its last checkpoint is logged again by the
    resumed one, and a line cut short by the kill would make the file unreadable.
    """

    def __init__(self, workdir: Path, resume_step: int = 0, redo_eval: bool = False):
        tf = data.import_tensorflow()
        self.path = workdir / "metrics.jsonl"
        keep_records_up_to(self.path, resume_step, drop_eval_at_step=redo_eval)
        self._file = self.path.open("a")
        self._tb = tf.summary.create_file_writer(str(workdir / "tensorboard"))
        self._tf = tf

    def write(self, step: int, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({"step": step, "time": time.time(), **record}) + "\n")
        self._file.flush()
        with self._tb.as_default(step=step):
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self._tf.summary.scalar(key, value)

    def close(self) -> None:
        self._file.close()
        self._tb.close()


def keep_records_up_to(path: Path, step: int, drop_eval_at_step: bool = False) -> None:
    """Rewrite the JSON-lines file `path` (atomically) without records after `step` (nor the
    evaluation at `step` if `drop_eval_at_step`) and without lines that are not complete JSON
    objects; leave it untouched if there is nothing to drop."""
    if not path.exists():
        return
    text = path.read_text()
    kept = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        redone = drop_eval_at_step and "train_loss" not in record  # an eval at `step`
        if record["step"] < step or (record["step"] == step and not redone):
            kept.append(line)
    new_text = "".join(line + "\n" for line in kept)
    if new_text != text:  # also when only the last newline is missing
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(new_text)
        tmp.replace(path)


class ProgressBar:
    """tqdm bar over steps with the last logged loss, accuracy and images/s (process 0 only)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step")

    def update(self, steps: int, record: dict[str, float]) -> None:
        """Advance by `steps` and show `record`'s train_loss, train_accuracy, images_per_sec."""
        self._bar.set_postfix(
            loss=f"{record['train_loss']:.4f}",
            acc=f"{record['train_accuracy']:.3f}",
            img_s=f"{record['images_per_sec']:.1f}",
            refresh=False,
        )
        self._bar.update(steps)

    def close(self) -> None:
        self._bar.close()


def plot_curves(metrics_path: Path, out_path: Path) -> Path:
    """PNG of train loss/accuracy per step and val loss/accuracy per eval, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train_rec = [r for r in records if "train_loss" in r]
    val_rec = [r for r in records if "val_loss" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.plot([r["step"] for r in train_rec], [r[f"train_{key}"] for r in train_rec],
                label=f"train {key}", alpha=0.6)  # fmt: skip
        ax.plot([r["step"] for r in val_rec], [r[f"val_{key}"] for r in val_rec], "o-",
                label=f"val {key}")  # fmt: skip
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
