"""Train a ResNet: `python scripts/train.py --arch resnet50 [--data-dir DIR | --dataset NAME]`.

Rerunning the same command resumes from the last checkpoint in --workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing

from resnet_jax import checkpoint, distributed, models, trainer

HELP = {
    "arch": f"one of: {', '.join(models.ARCHS)}",
    "dataset": "TFDS name (tf_flowers, imagenette, cifar10, imagenet2012, ...); downloads it",
    "data_dir": "image folders DIR/train/<class>/* and DIR/val/<class>/* instead of TFDS",
    "tfds_data_dir": "where TFDS keeps its data (default ~/tensorflow_datasets)",
    "tfds_manual_dir": "where the archives of a dataset TFDS cannot download are (imagenet2012: "
    "ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar; default <tfds data dir>/downloads/manual)",
    "val_fraction": "held-out fraction of train when --data-dir has no val/",
    "image_size": "training crop size in pixels",
    "batch_size": "global batch over all devices and processes",
    "eval_batch_size": "global eval batch (default: --batch-size)",
    "epochs": "epochs to train (the schedule's length)",
    "max_steps": "stop after this many steps in total (truncates the schedule)",
    "lr": "peak learning rate for batch 256; scaled by batch/256",
    "warmup_epochs": "linear warmup before cosine decay",
    "weight_decay": "decoupled for adamw, L2 for sgd; skips BatchNorm and biases",
    "label_smoothing": "cross-entropy label smoothing",
    "optimizer": "sgd (Nesterov momentum 0.9) or adamw",
    "precision": "fp32, or bf16 (bf16 compute, fp32 params, BatchNorm and loss)",
    "parallel": "shard_map (jit over a device mesh) or pmap",
    "workdir": "checkpoints, metrics.jsonl, TensorBoard, class_names.json, curves.png",
    "seed": "initialisation, shuffling and augmentation seed",
    "checkpoint_every": "also checkpoint every N steps (one is always written per epoch)",
    "keep_checkpoints": "latest checkpoints to keep (the best by val accuracy is kept too)",
    "max_nonfinite": "stop after this many consecutive non-finite steps",
    "num_workers": "tf.data parallel calls (default: autotune)",
    "pretrained": "start from torchvision weights (.pth/.pt/.safetensors) or a resnet_jax "
    "checkpoint; a head with another class count is replaced",
    "freeze": "none: train all; stages: only --trainable; backbone: only the classifier",
    "trainable": "with --freeze stages: comma list of stem,layer1,...,layer4,fc",
    "head_lr_multiplier": "learning-rate factor for the classifier",
}


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field (`--image-size` for `image_size`), plus distributed flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = trainer.TrainConfig()
    hints = typing.get_type_hints(trainer.TrainConfig)
    for field in dataclasses.fields(trainer.TrainConfig):
        kind = next(t for t in typing.get_args(hints[field.name]) or (hints[field.name],))
        default = getattr(defaults, field.name)
        # None means "not set": the help text says what happens then.
        shown = "" if default is None else f" (default: {default})"
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=kind,
            default=default,
            help=HELP[field.name] + shown,
        )
    group = parser.add_argument_group("multi-process (jax.distributed)")
    group.add_argument("--coordinator-address", help="host:port of process 0")
    group.add_argument("--num-processes", type=int)
    group.add_argument("--process-id", type=int)
    group.add_argument(
        "--distributed-auto", action="store_true", help="auto-detect (TPU pod slice, SLURM)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    # Our progress at INFO; libraries (orbax, absl, TF) only from WARNING up.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("resnet_jax").setLevel(logging.INFO)
    try:
        distributed.initialize(
            args.pop("coordinator_address"),
            args.pop("num_processes"),
            args.pop("process_id"),
            auto=args.pop("distributed_auto"),
        )
    except ValueError as err:
        parser.error(str(err))
    try:
        final = trainer.fit(trainer.TrainConfig(**args))
    except trainer.ConfigError as err:
        parser.error(str(err))
    # Disk full, permissions, a diverging run: say so in one line (the messages say what to do).
    except (checkpoint.CheckpointWriteError, trainer.NonFiniteError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    print(f"done: {trainer.describe(final)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
