"""Command-line flags shared by scripts/evaluate.py, predict.py and convert_weights.py, and
the loading of the model they name (`load_model`: --checkpoint PATH or --pretrained NAME).

One definition per flag, so a flag means, checks and says the same in every script. It lives in
the package rather than in scripts/ so that the scripts import it however they are started
(`python scripts/x.py`, or loaded from their file by the tests).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from resnet_jax import cpu, model_dir, pretrained
from resnet_jax.inference import IMAGENET_NUM_CLASSES, imagenet_class_names
from resnet_jax.preprocessing import INTERPOLATIONS, Preprocessing

CHECKPOINT_HELP = (
    "training workdir, its checkpoints directory, a step directory or a save_model dir"
)
PRETRAINED_HELP = (
    "named weights: a registered ARCH.TAG (e.g. resnet50.a1_in1k, see docs/pretrained.md) or "
    "hf-hub:ORG/REPO[@REVISION], downloaded from the Hugging Face Hub (ImageNet class names "
    "for a 1000-class head); or a resnet_jax directory, as --checkpoint"
)
WHICH_CHOICES = ("best", "latest")
DEFAULT_WHICH = "best"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the flag in the usage error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (a checkpoint step)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def add_checkpoint_arguments(
    parser: argparse.ArgumentParser,
    *,
    flag: str = "--checkpoint",
    group: argparse._MutuallyExclusiveGroup | None = None,
    required: bool = True,
) -> None:
    """`flag` PATH (added to `group` when the path is one of mutually exclusive model sources),
    `--step N`, `--which best|latest` and `--ema`: what `model_dir.load(path, step=...,
    which=..., ema=...)` takes.

    `--which` defaults to None (meaning "best") so that a script can tell it was not given.
    """
    (group or parser).add_argument(flag, type=Path, required=required, help=CHECKPOINT_HELP)
    parser.add_argument(
        "--step",
        type=non_negative_int,
        help="checkpoint step to load from a workdir (default: the one --which picks)",
    )
    parser.add_argument(
        "--which",
        choices=WHICH_CHOICES,
        help=(
            "without --step, which step of a workdir to load: 'best' by the run's best metric "
            "(val_accuracy by default; the latest when no step recorded it) or 'latest' "
            f"(default: {DEFAULT_WHICH})"
        ),
    )
    parser.add_argument(
        "--ema",
        action="store_true",
        help="the checkpoint's moving average of the model (trained with --model-ema)",
    )


def add_pretrained_argument(group: argparse._MutuallyExclusiveGroup) -> None:
    """`--pretrained NAME` (see `PRETRAINED_HELP`), one of the mutually exclusive model
    sources in `group`; `load_model` reads it."""
    group.add_argument("--pretrained", metavar="NAME", help=PRETRAINED_HELP)


def add_image_size_argument(
    parser: argparse.ArgumentParser, *, default_text: str = "the stored preprocessing's"
) -> None:
    """`--image-size S`: the eval crop (None when not given: the caller applies `default_text`)."""
    parser.add_argument(
        "--image-size",
        type=positive_int,
        help=(
            f"eval crop size in pixels (default: {default_text}); without --resize-size the "
            "stored resize-to-crop ratio is kept"
        ),
    )


def add_preprocessing_arguments(parser: argparse.ArgumentParser) -> None:
    """`--resize-size R` and `--interpolation NAME`, overrides of the stored preprocessing
    (None when not given: the weights' stored preprocessing, see `model_dir.LoadedModel.
    eval_preprocessing`)."""
    parser.add_argument(
        "--resize-size",
        type=positive_int,
        help=(
            "shorter side in pixels that images are resized to before the center crop, at least "
            "--image-size (default: the weights' stored preprocessing; a checkpoint without one "
            "uses training's validation resize, 256 for 224)"
        ),
    )
    parser.add_argument(
        "--interpolation",
        choices=INTERPOLATIONS,
        help="resampling filter of that resize (default: the weights' stored preprocessing)",
    )


def eval_preprocessing(
    parser: argparse.ArgumentParser, loaded: model_dir.LoadedModel, args: argparse.Namespace
) -> Preprocessing:
    """`loaded`'s stored preprocessing with the --image-size, --resize-size and --interpolation
    overrides; a usage error (exit 2) naming the flags if they do not fit together."""
    stored = loaded.preprocessing
    image_size = args.image_size or (stored.eval_size if stored is not None else None)
    if image_size is not None:
        check_resize_size(parser, args.resize_size, image_size)
    return loaded.eval_preprocessing(
        image_size=args.image_size, resize_size=args.resize_size, interpolation=args.interpolation
    )


def load_model(args: argparse.Namespace) -> model_dir.LoadedModel:
    """The model --checkpoint PATH (`model_dir.load` with --step/--which) or --pretrained NAME
    names: a directory as --checkpoint, anything else through `pretrained.load` (a registered
    `ARCH.TAG` or `hf-hub:` name; ImageNet class names for a 1000-class head). Raises
    ValueError (`pretrained.PretrainedError` included) or OSError with a one-line message."""
    name = getattr(args, "pretrained", None)
    if name is None:
        return model_dir.load(args.checkpoint, **step_selection(args))
    if Path(name).is_dir():
        return model_dir.load(name, **step_selection(args))
    if args.step is not None or args.which is not None or getattr(args, "ema", False):
        raise ValueError("--step, --which and --ema apply to checkpoints, not to named weights")
    weights = pretrained.load(name)  # an unknown name: PretrainedError with the spelling
    classes = weights.model.num_classes
    names = imagenet_class_names() if classes == IMAGENET_NUM_CLASSES else None
    return model_dir.LoadedModel.from_pretrained(weights, names)


def check_resize_size(
    parser: argparse.ArgumentParser, resize_size: int | None, image_size: int
) -> None:
    """Usage error naming both flags unless `resize_size` (None: the default) is at least the
    eval crop `image_size` (given or the default), which is cut from the resized image."""
    if resize_size is not None and resize_size < image_size:
        parser.error(
            f"--resize-size {resize_size} is smaller than the crop size {image_size} "
            "(--image-size): the crop is cut from the resized image"
        )


def add_batch_size_argument(
    parser: argparse.ArgumentParser, *, default: int | None, help: str
) -> None:
    """`--batch-size N`, a positive integer; `help` says what a batch is in that script."""
    parser.add_argument("--batch-size", type=positive_int, default=default, help=help)


def step_selection(args: argparse.Namespace) -> dict:
    """The `step`, `which` and `ema` keyword arguments of `model_dir.load` from the flags."""
    return {"step": args.step, "which": args.which or DEFAULT_WHICH, "ema": args.ema}


def setup_platform(log: logging.Logger, **settings: bool) -> list[str]:
    """Where JAX will compute on CPU (`cpu.expected`), apply the CPU settings
    (`cpu.configure(**settings)`: all by default) and log them in one INFO line; returns their
    names (none elsewhere). Call it before the first JAX computation."""
    if not cpu.expected():
        return []
    applied = cpu.configure(**settings)
    log.info("CPU settings: %s", ", ".join(applied) or "none")
    return applied
