"""Convert weights between torchvision files and resnet_jax (Flax/orbax) model directories.

    python scripts/convert_weights.py to-flax --arch resnet50 --input resnet50.pth --output DIR
    python scripts/convert_weights.py to-flax --input resnet50.a1_in1k --output DIR
    python scripts/convert_weights.py to-torch --input DIR --output resnet50.pth [--step N]

`to-flax` reads a torchvision state_dict (.pth/.pt via torch.load(weights_only=True), or
.safetensors), checks every key and shape against --arch, and writes a directory that
`resnet_jax.model_dir.load` (and scripts/evaluate.py, predict.py, train.py --pretrained) read,
in float32 whatever the file's float type (float16, bfloat16, float64).
`--input NAME` takes named weights from the Hugging Face Hub instead (`ARCH.TAG` from
docs/pretrained.md, or `hf-hub:ORG/REPO[@REVISION]`; the arch comes from the name, --arch is
optional and must agree). A 1000-class head is labelled with the ImageNet class names unless
--class-names is given. The directory records the eval preprocessing evaluate.py, predict.py
and `Predictor.from_checkpoint` use: named weights' own (--image-size overrides its crop,
keeping its resize ratio), else training's validation transform at --image-size (default 224,
the crop torchvision's ImageNet weights are evaluated at).
`to-torch` writes a state_dict that torchvision.models.<arch>(num_classes=...) loads strictly;
from a training workdir it exports --step, else the step --which picks (the best by the run's
metric unless --which latest), and prints which step it wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

from resnet_jax import cli_args, convert, model_dir, models, pretrained
from resnet_jax.inference import IMAGENET_NUM_CLASSES, imagenet_class_names
from resnet_jax.preprocessing import Preprocessing, default_preprocessing

TORCHVISION_EVAL_SIZE = 224  # torchvision's eval crop for its ImageNet weights


def build_parser() -> argparse.ArgumentParser:
    """Two subcommands, one per direction."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    to_flax = sub.add_parser("to-flax", help="torchvision .pth/.pt/.safetensors -> Flax directory")
    to_flax.add_argument(
        "--arch",
        help=f"one of: {', '.join(models.ARCHS)} (required for a file; a NAME implies it)",
    )
    to_flax.add_argument(
        "--input",
        required=True,
        help="torchvision weights file, or NAME: ARCH.TAG or hf-hub:ORG/REPO (Hub weights)",
    )
    to_flax.add_argument("--output", type=Path, required=True, help="model directory to write")
    to_flax.add_argument(
        "--num-classes", type=int, help="expected classifier width (default: read from the file)"
    )
    to_flax.add_argument(
        "--class-names",
        type=Path,
        help="JSON list, class_names.json ({'0': name, ...}) or text file with one name a line",
    )
    to_flax.add_argument(
        "--image-size",
        type=cli_args.positive_int,
        help=(
            "eval crop size to record for evaluate.py/predict.py (default: a NAME's own, "
            f"{TORCHVISION_EVAL_SIZE} for a file)"
        ),
    )
    to_flax.add_argument("--force", action="store_true", help="replace an existing model dir")

    to_torch = sub.add_parser("to-torch", help="Flax model directory -> torchvision state_dict")
    cli_args.add_checkpoint_arguments(to_torch, flag="--input")
    to_torch.add_argument(
        "--output", type=Path, required=True, help="file to write: .pth, .pt or .safetensors"
    )
    to_torch.add_argument("--force", action="store_true", help="replace an existing file")
    return parser


def read_class_names(path: Path) -> list[str]:
    """Class names from a JSON list, a class_names.json object, or a text file (one a line)."""
    if path.suffix.lower() != ".json":
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    try:
        names = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    return names if isinstance(names, list) else model_dir.read_class_names(path)


def _summary(arch: str, variables: dict) -> str:
    """'resnet50, 25,557,032 parameters, 1000 classes' for the printed report."""
    count = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(variables["params"]))
    num_classes = model_dir.num_classes(variables["params"])
    classes = "no classifier head" if num_classes is None else f"{num_classes} classes"
    return f"{arch}, {count:,} parameters, {classes}"


def _read_input(args: argparse.Namespace) -> tuple[str, dict, dict, Preprocessing]:
    """(arch, variables, metadata, preprocessing) of to-flax's --input: named Hub weights
    (`pretrained.load`) or a torchvision file."""
    if pretrained.is_registered_or_hub(args.input):
        weights = pretrained.load(args.input, arch=args.arch)
        classes = weights.model.num_classes
        if args.num_classes is not None and args.num_classes != classes:
            raise ValueError(
                f"--num-classes {args.num_classes}: {args.input} has a {classes}-class head"
            )
        preprocessing = weights.preprocessing.override(eval_size=args.image_size)
        metadata = {**model_dir.pretrained_metadata(weights), "converted_from": args.input}
        metadata["image_size"] = preprocessing.eval_size
        return weights.arch, dict(weights.variables), metadata, preprocessing
    if args.arch is None:
        raise ValueError(f"--input {args.input} is a weights file: pass its --arch")
    path = Path(args.input)
    variables = convert.from_torchvision(path, args.arch, num_classes=args.num_classes)
    image_size = args.image_size or TORCHVISION_EVAL_SIZE
    metadata = {"converted_from": str(path), "image_size": image_size}
    return args.arch, variables, metadata, default_preprocessing(image_size)


def to_flax(args: argparse.Namespace) -> str:
    """Convert named Hub weights or a torchvision file into a model directory; returns the
    report line."""
    arch, variables, metadata, preprocessing = _read_input(args)
    num_classes = model_dir.num_classes(variables["params"])
    if args.class_names is not None:
        class_names, names_from = read_class_names(args.class_names), str(args.class_names)
    elif num_classes == IMAGENET_NUM_CLASSES:
        class_names, names_from = imagenet_class_names(), "ImageNet"
    else:
        class_names, names_from = None, None
    model_dir.save_model(
        args.output,
        arch=arch,
        variables=variables,
        class_names=class_names,
        metadata=metadata,
        preprocessing=preprocessing,
        force=args.force,
    )
    names = f"; class names: {names_from}" if names_from else ""
    p = preprocessing
    prep = f"; eval: resize {p.resize_size} {p.interpolation}, crop {p.eval_size}"
    return f"wrote {args.output}: {_summary(arch, variables)}{names}{prep}"


def to_torch(args: argparse.Namespace) -> str:
    """Convert a model directory into a torchvision state_dict file; returns the report line."""
    if args.output.exists() and not args.force:
        raise FileExistsError(f"{args.output} already exists; pass --force to overwrite it")
    loaded = model_dir.load(args.input, **cli_args.step_selection(args))
    state_dict = convert.to_torchvision(loaded.variables, loaded.arch)
    convert.save_torchvision(state_dict, args.output)
    step = "" if loaded.step is None else f" (step {loaded.step})"
    note = " (class names are not stored in torch files)" if loaded.class_names else ""
    return (
        f"wrote {args.output} from {loaded.path}{step}: "
        f"{_summary(loaded.arch, loaded.variables)}{note}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run one conversion; bad input ends with a one-paragraph error and exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        report = to_flax(args) if args.command == "to-flax" else to_torch(args)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
