"""Evaluate a checkpoint: `python scripts/evaluate.py --checkpoint RUN [--data-dir DIR]`.

`--pretrained NAME` evaluates named weights from the Hugging Face Hub instead (`ARCH.TAG` from
docs/pretrained.md or `hf-hub:ORG/REPO`; a 1000-class head is labelled with the ImageNet class
names, so the data's class folders must be named like them), or a resnet_jax directory.
Images are prepared as the weights' stored preprocessing says (resize, crop, interpolation,
mean/std; a checkpoint without one uses training's validation transform at its image size);
--image-size, --resize-size and --interpolation override it.

Data: `--data-dir DIR` uses DIR/val/<class>/* if it exists; else, if DIR has train/, the part of
it that training held out (the run's --val-fraction and --seed); else DIR/<class>/* itself.
`--dataset NAME` evaluates a TFDS split (`--split`, default the split training validated on).
Without either, the data the checkpoint was trained on is used (named weights need one).
Classes are matched to the checkpoint's by name; data classes the checkpoint does not know are an
error.

Prints top-1, top-5, mean cross-entropy and a per-class accuracy table (or JSON with --json);
--output-dir also gets metrics.json and confusion.png. Runs the data-parallel eval step over
every local device; the global --batch-size must be a multiple of the device count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

import jax

from resnet_jax import cli_args, evaluation, model_dir, parallel

log = logging.getLogger("resnet_jax")


def build_parser() -> argparse.ArgumentParser:
    """The command line: the checkpoint, the data, and output options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    cli_args.add_checkpoint_arguments(parser, group=source, required=False)
    cli_args.add_pretrained_argument(source)
    data_source = parser.add_mutually_exclusive_group()
    data_source.add_argument("--data-dir", type=Path, help="image folders (see above)")
    data_source.add_argument("--dataset", help="TFDS dataset name")
    parser.add_argument("--split", help="TFDS split, e.g. validation or 'train[90%%:]'")
    parser.add_argument("--tfds-data-dir", help="where TFDS keeps its data")
    cli_args.add_image_size_argument(parser)
    cli_args.add_preprocessing_arguments(parser)
    cli_args.add_batch_size_argument(
        parser,
        default=None,
        help="global batch, a multiple of the device count (default: 64 rounded up to one)",
    )
    parser.add_argument("--output-dir", type=Path, help="write metrics.json and confusion.png")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    return parser


def _data_args(args: argparse.Namespace, loaded: model_dir.LoadedModel) -> dict:
    """Keyword arguments of `evaluation.open_eval_data`: the flags, else the training run's data;
    the held-out fraction and seed always come from the run (`open_eval_data`'s defaults if it
    recorded none)."""
    config = loaded.metadata.get("config") or {}
    kwargs = {k: config[k] for k in ("val_fraction", "seed") if k in config}
    kwargs.update(split=args.split, tfds_data_dir=args.tfds_data_dir)
    if args.data_dir is not None:
        return {**kwargs, "data_dir": args.data_dir}
    if args.dataset is not None:
        return {**kwargs, "dataset": args.dataset}
    if config.get("data_dir"):
        return {**kwargs, "data_dir": config["data_dir"]}
    if config.get("dataset"):
        return {
            **kwargs,
            "dataset": config["dataset"],
            "tfds_data_dir": args.tfds_data_dir or config.get("tfds_data_dir"),
        }
    raise ValueError(f"{loaded.path} records no training data; pass --data-dir or --dataset")


def format_report(result: evaluation.EvalResult, title: str) -> str:
    """Summary line plus the per-class table, as plain text."""
    width = max(len("class"), *(len(n) for n in result.names))
    lines = [
        title,
        f"data: {result.data} ({result.count} images"
        + (f", {len(result.skipped)} unreadable skipped)" if result.skipped else ")"),
        f"top-1 {result.top1:.4f}  top-5 {result.top5:.4f}  loss {result.loss:.4f}",
        "",
        f"{'class':<{width}}  {'images':>6}  {'correct':>7}  {'accuracy':>8}",
    ]
    for row in result.per_class():
        accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        lines.append(
            f"{row['class']:<{width}}  {row['images']:>6}  {row['correct']:>7}  {accuracy:>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.split is not None and args.data_dir is not None:
        parser.error("--split applies to --dataset (image folders use DIR/val)")
    cli_args.setup_platform(log)

    devices = jax.device_count()
    batch_size = args.batch_size or -(-64 // devices) * devices
    try:  # before anything is loaded; evaluate_checkpoint would only name batch_size
        parallel.check_divisible("--batch-size", batch_size, devices)
    except ValueError as err:
        parser.error(str(err))
    # stdout carries only the report (TFDS prints its preparation progress there).
    with contextlib.redirect_stdout(sys.stderr):
        try:
            loaded = cli_args.load_model(args)
            preprocessing = cli_args.eval_preprocessing(parser, loaded, args)
            source = evaluation.open_eval_data(**_data_args(args, loaded))
        except (OSError, ValueError, RuntimeError) as err:  # RuntimeError: TFDS preparation
            parser.error(str(err))
        try:
            result = evaluation.evaluate_checkpoint(
                loaded,
                source,
                preprocessing=preprocessing,
                batch_size=batch_size,
            )
        except ValueError as err:  # class names
            parser.error(str(err))

    step = f"step {loaded.step}, " if loaded.step is not None else ""
    p = preprocessing
    where = str(loaded.path) if loaded.path.is_dir() else args.pretrained  # a named download
    title = (
        f"{where} ({step}{loaded.arch}, resize {p.resize_size} {p.interpolation}, "
        f"crop {p.eval_size} px)"
    )
    metrics = {
        "checkpoint": where,
        "step": loaded.step,
        "arch": loaded.arch,
        "image_size": p.eval_size,
        "resize_size": p.resize_size,
        "preprocessing": p.to_json(),
        **result.to_json(),
    }
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        evaluation.plot_confusion(
            result.confusion,
            result.names,
            args.output_dir / "confusion.png",
            title=f"{loaded.arch}: top-1 {result.top1:.3f} on {result.count} images",
        )
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(format_report(result, title))
        if args.output_dir is not None:
            print(f"\nwrote {args.output_dir / 'metrics.json'} and confusion.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
