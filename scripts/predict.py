"""Classify images: `python scripts/predict.py --checkpoint RUN IMAGE_OR_FOLDER ...`.

Folders are searched recursively for image files (.jpg .jpeg .png .bmp .gif, any case); files
named on the command line are read whatever their extension. `--pretrained NAME` takes named
weights from the Hugging Face Hub (`ARCH.TAG` from docs/pretrained.md or `hf-hub:ORG/REPO`), a
resnet_jax directory, or with --arch a torchvision file; `--torchvision-weights FILE --arch NAME`
a torchvision file. ImageNet class names label a 1000-class head of named or torchvision weights.
Images are prepared as the weights' stored preprocessing says (resize, crop, interpolation,
mean/std); --image-size, --resize-size and --interpolation override it.

Unreadable images are reported on stderr (and as {"path", "error"} entries with --json), the
rest are still classified, and the exit status is then 1. Missing inputs, a folder without
images or a bad checkpoint stop the run before anything is predicted (status 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from resnet_jax import cli_args, inference, models

log = logging.getLogger("resnet_jax")


def build_parser() -> argparse.ArgumentParser:
    """The command line: inputs, the model source, and output options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("inputs", nargs="+", type=Path, help="image files and/or folders")
    source = parser.add_mutually_exclusive_group(required=True)
    cli_args.add_checkpoint_arguments(parser, group=source, required=False)
    cli_args.add_pretrained_argument(source)
    source.add_argument(
        "--torchvision-weights", type=Path, help="torchvision state_dict (.pth/.pt/.safetensors)"
    )
    parser.add_argument(
        "--arch",
        help=f"with --torchvision-weights or a --pretrained file: {', '.join(models.ARCHS)}",
    )
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per image")
    cli_args.add_batch_size_argument(
        parser,
        default=inference.DEFAULT_BATCH_SIZE,
        help="images per forward pass (default: %(default)s)",
    )
    cli_args.add_image_size_argument(
        parser, default_text="the stored preprocessing's; 224 for torchvision weights"
    )
    cli_args.add_preprocessing_arguments(parser)
    parser.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list of {path, predictions: [{class, probability}]} instead",
    )
    return parser


def _predictor(args: argparse.Namespace, parser: argparse.ArgumentParser) -> inference.Predictor:
    """The Predictor the flags ask for: torchvision weights, a checkpoint or named weights."""
    weights_file = args.torchvision_weights
    if args.pretrained is not None and Path(args.pretrained).is_file():
        weights_file = Path(args.pretrained)
    if weights_file is not None:
        if args.arch is None:
            flag = "--pretrained FILE" if args.pretrained else "--torchvision-weights"
            parser.error(f"{flag} needs --arch")
        if args.step is not None or args.which is not None:
            parser.error("--step and --which apply to --checkpoint")
        image_size = args.image_size or 224
        cli_args.check_resize_size(parser, args.resize_size, image_size)
        return inference.Predictor.from_torchvision(
            weights_file,
            args.arch,
            image_size=image_size,
            resize_size=args.resize_size,
            interpolation=args.interpolation,
            batch_size=args.batch_size,
        )
    if args.arch is not None:
        parser.error("--arch applies to torchvision weights files (a checkpoint records its arch)")
    loaded = cli_args.load_model(args)
    preprocessing = cli_args.eval_preprocessing(parser, loaded, args)
    return inference.Predictor.from_loaded(
        loaded, preprocessing=preprocessing, batch_size=args.batch_size
    )


def find_images(inputs: list[Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (recursive, sorted)."""
    from resnet_jax import data  # TensorFlow takes seconds to import: not for --help or errors

    found = []
    for path in inputs:
        if path.is_dir():
            images = [Path(p) for p in data.list_images(path)]
            if not images:
                raise ValueError(
                    f"folder {path} has no image files ({', '.join(data.IMAGE_EXTENSIONS)})"
                )
            found.extend(images)
        else:
            found.append(path)
    return found


def predict(
    predictor: inference.Predictor, paths: list[Path], k: int
) -> Iterator[tuple[Path, list[tuple[str, float]] | None, str | None]]:
    """(path, top-k, None) per readable image and (path, None, error) per unreadable one, in
    input order, decoding and predicting one batch at a time."""
    from resnet_jax import data  # as in find_images: imported once there are images to read

    for start in range(0, len(paths), predictor.batch_size):
        chunk = paths[start : start + predictor.batch_size]
        decoded = {}
        for path in chunk:
            try:
                decoded[path] = data.load_image(path)
            except (OSError, ValueError) as err:
                decoded[path] = err
        good = [p for p in chunk if not isinstance(decoded[p], Exception)]
        results = dict(zip(good, predictor.top_k([decoded[p] for p in good], k), strict=True))
        for path in chunk:
            if path in results:
                yield path, results[path], None
            else:
                yield path, None, str(decoded[path])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    cli_args.setup_platform(log)
    missing = [str(p) for p in args.inputs if not p.exists()]
    if missing:
        parser.error(f"no such file or folder: {', '.join(missing)}")
    try:
        predictor = _predictor(args, parser)
        if not 1 <= args.top_k <= predictor.num_classes:
            parser.error(f"--top-k must be in [1, {predictor.num_classes}], got {args.top_k}")
        paths = find_images(args.inputs)
    except (OSError, ValueError) as err:
        parser.error(str(err))

    records, failures = [], 0
    for path, top, error in predict(predictor, paths, args.top_k):
        if error is not None:
            failures += 1
            print(f"error: {error}", file=sys.stderr)
            records.append({"path": str(path), "error": error})
            continue
        records.append(
            {
                "path": str(path),
                "predictions": [{"class": c, "probability": p} for c, p in top],
            }
        )
        if not args.json:
            print(path)
            for name, prob in top:
                print(f"  {prob:8.4f}  {name}")
    if args.json:
        print(json.dumps(records, indent=2))
    if failures:
        print(f"{failures} of {len(paths)} image(s) could not be read", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
