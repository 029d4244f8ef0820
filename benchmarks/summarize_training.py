"""Summarise a training run from its workdir/metrics.jsonl as a markdown table (for BENCHMARKS.md).

python benchmarks/summarize_training.py runs/flowers_resnet18
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def summarize(workdir: Path) -> str:
    """Per-epoch val accuracy, train time and throughput of the run in `workdir`."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((workdir / "class_names.json").read_text())
    train = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "val_accuracy" in r]
    if not train or not evals:
        raise SystemExit(f"{workdir}: no complete epoch in metrics.jsonl")
    rows = []
    batch = _batch_size(workdir)
    previous = 0  # the step of the last log point before each interval
    for e in evals:
        # Each log point's record carries images/s over the steps since the previous log point
        # (input pipeline included); a process's first interval includes compilation.
        logs = [r for r in train if r["epoch"] == e["epoch"] and "images_per_sec" in r]
        seconds = 0.0
        for r in logs:
            seconds += (r["step"] - previous) * batch / r["images_per_sec"]
            previous = r["step"]
        rate = statistics.median(r["images_per_sec"] for r in logs[1:] or logs)
        rows.append((e["epoch"], e["step"], e["val_loss"], e["val_accuracy"], seconds, rate))
    best = max(rows, key=lambda r: r[3])
    lines = [
        f"Run: `{workdir}` ({len(config)} classes)",
        "",
        "| epoch | step | val loss | val top-1 | train time (s) | median images/s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for epoch, step, loss, acc, seconds, rate in rows:
        lines.append(
            f"| {epoch + 1} | {step} | {loss:.4f} | {acc:.4f} | {seconds:.0f} | {rate:.1f} |"
        )
    lines += [
        "",
        f"Final val top-1 {rows[-1][3]:.4f}, best {best[3]:.4f} (epoch {best[0] + 1}); "
        f"median train time per epoch {statistics.median(r[4] for r in rows):.0f} s; "
        f"median {statistics.median(r[5] for r in rows):.1f} images/s.",
    ]
    return "\n".join(lines)


def _batch_size(workdir: Path) -> int:
    """The global batch size recorded in the latest checkpoint's metadata."""
    steps = sorted(
        (p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()),
        key=lambda p: int(p.name),
    )
    meta = json.loads((steps[-1] / "meta" / "metadata").read_text())
    return meta["config"]["batch_size"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    print(summarize(parser.parse_args().workdir))


if __name__ == "__main__":
    main()
