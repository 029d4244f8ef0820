"""Summarise a training run from its workdir/metrics.jsonl as a markdown table (for BENCHMARKS.md).

python benchmarks/summarize_training.py runs/flowers_resnet18 [--every 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def summarize(workdir: Path, every: int = 1) -> str:
    """Per-epoch val accuracy (and the EMA weights' with --model-ema), train time and throughput
    of the run in `workdir`: a row for every `every`-th epoch and the last; the closing lines
    cover all epochs."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((workdir / "class_names.json").read_text())
    train = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "val_accuracy" in r]
    ema = {r["step"]: r["ema_val_accuracy"] for r in records if "ema_val_accuracy" in r}
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
    ema_column = bool(ema)
    lines = [
        f"Run: `{workdir}` ({len(config)} classes)",
        "",
        "| epoch | step | val loss | val top-1 |"
        + (" EMA val top-1 |" if ema_column else "")
        + " train time (s) | median images/s |",
        "|---:|---:|---:|---:|" + ("---:|" if ema_column else "") + "---:|---:|",
    ]
    shown = [r for r in rows if (r[0] + 1) % every == 0 or r is rows[-1]]
    for epoch, step, loss, acc, seconds, rate in shown:
        ema_cell = f" {ema[step]:.4f} |" if ema_column else ""
        lines.append(
            f"| {epoch + 1} | {step} | {loss:.4f} | {acc:.4f} |{ema_cell} {seconds:.0f} | "
            f"{rate:.1f} |"
        )
    lines += ["", _final_line("val top-1", [(r[0], r[3]) for r in rows])]
    if ema_column:
        lines.append(_final_line("EMA val top-1", [(r[0], ema[r[1]]) for r in rows]))
    lines.append(
        f"Median train time per epoch {statistics.median(r[4] for r in rows):.0f} s; "
        f"median {statistics.median(r[5] for r in rows):.1f} images/s."
    )
    return "\n".join(lines)


def _final_line(name: str, by_epoch: list[tuple[int, float]]) -> str:
    """The line "Final NAME x, best y (epoch e)." for (epoch, accuracy) pairs."""
    best_epoch, best = max(by_epoch, key=lambda pair: pair[1])
    return f"Final {name} {by_epoch[-1][1]:.4f}, best {best:.4f} (epoch {best_epoch + 1})."


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
    parser.add_argument("--every", type=int, default=1, help="a row every N epochs (and the last)")
    args = parser.parse_args()
    if args.every < 1:
        parser.error(f"--every must be >= 1, got {args.every}")
    print(summarize(args.workdir, args.every))


if __name__ == "__main__":
    main()
