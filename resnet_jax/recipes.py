"""Training presets (`--recipe`): torchvision's published ImageNet recipes as TrainConfig values.

Each value is written once, with its source in a comment. "train.py" is torchvision's
references/classification/train.py (`get_args_parser` defaults); "README" its
references/classification/README.md (the defaults table: `--batch_size 32` per GPU on 8 GPUs,
`--epochs 90`, `--lr 0.1`, `--momentum 0.9`, `--weight-decay 1e-4`, `--lr-step-size 30`,
`--lr-gamma 0.1`, and the ResNet section `train.py --model $MODEL`); "V2 recipe" the command of
torchvision's ResNet50_Weights.IMAGENET1K_V2 (the README's recipe link, also in the PyTorch blog
"How to Train State-Of-The-Art Models Using TorchVision's Latest Primitives"): `--model resnet50
--batch-size 128 --lr 0.5 --lr-scheduler cosineannealinglr --lr-warmup-epochs 5
--lr-warmup-method linear --auto-augment ta_wide --epochs 600 --random-erase 0.1 --weight-decay
0.00002 --norm-weight-decay 0.0 --label-smoothing 0.1 --mixup-alpha 0.2 --cutmix-alpha 1.0
--train-crop-size 176 --model-ema --val-resize-size 232 --ra-sampler --ra-reps 4` on 8 GPUs.

Conversions: torchvision's `--batch-size` is per GPU (8 GPUs), ours global; torchvision's `--lr`
is for its global batch, ours per 256 images (scaled by batch/256), so ours is
`lr_torchvision * 256 / global_batch`: the same effective learning rate at their batch size.
Deviations the presets cannot remove: our schedule is always warm-up then cosine (tv1's step
schedule, x0.1 every 30 epochs, becomes a cosine over 90 epochs).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from resnet_jax.train_config import RECIPE_OPTIONS, ConfigError, TrainConfig

_GPUS = 8  # README: "all models have been trained on 8x V100 GPUs"

# torchvision train.py's argparse defaults, as our options.
_TORCHVISION_DEFAULTS: dict[str, Any] = {
    "optimizer": "sgd",  # train.py --opt sgd: torch.optim.SGD with --momentum 0.9 ...
    "nesterov": False,  # ... and without Nesterov momentum
    "image_size": 224,  # train.py --val-crop-size 224 (our eval crop)
    "train_crop_size": 224,  # train.py --train-crop-size 224
    "val_resize_size": 256,  # train.py --val-resize-size 256
    "val_crop_size": 224,  # train.py --val-crop-size 224
    "interpolation": "bilinear",  # train.py --interpolation bilinear
    "auto_augment": "none",  # train.py --auto-augment None
    "ra_magnitude": 9,  # train.py --ra-magnitude 9
    "random_erase": 0.0,  # train.py --random-erase 0.0
    "ra_reps": 1,  # train.py: no --ra-sampler
    "mixup_alpha": 0.0,  # train.py --mixup-alpha 0.0
    "cutmix_alpha": 0.0,  # train.py --cutmix-alpha 0.0
    "label_smoothing": 0.0,  # train.py --label-smoothing 0.0
    "norm_weight_decay": None,  # train.py --norm-weight-decay None (as --weight-decay)
    "bias_weight_decay": None,  # train.py --bias-weight-decay None (as --weight-decay)
    "warmup_epochs": 0.0,  # train.py --lr-warmup-epochs 0
    "lr_warmup_method": "constant",  # train.py --lr-warmup-method constant
    "lr_warmup_decay": 0.01,  # train.py --lr-warmup-decay 0.01
    "lr_min": 0.0,  # train.py --lr-min 0.0
    "model_ema": False,  # train.py: no --model-ema
    "model_ema_steps": 32,  # train.py --model-ema-steps 32
    "model_ema_decay": 0.99998,  # train.py --model-ema-decay 0.99998
    "clip_grad_norm": None,  # train.py --clip-grad-norm None
    "accum_steps": 1,  # torchvision has no gradient accumulation
    "crop_min_scale": 0.08,  # presets.py: RandomResizedCrop's default scale=(0.08, 1.0)
    "zero_init_residual": False,  # train.py builds the model without zero_init_residual
}

_TV1 = _TORCHVISION_DEFAULTS | {
    "batch_size": 32 * _GPUS,  # README table --batch_size 32 (per GPU)
    "lr": 0.1 * 256 / (32 * _GPUS),  # README table --lr 0.1 at batch 256
    "epochs": 90,  # README table --epochs 90
    "weight_decay": 1e-4,  # README table --weight-decay 1e-4
}

_TV2 = _TORCHVISION_DEFAULTS | {
    "batch_size": 128 * _GPUS,  # V2 recipe --batch-size 128 (per GPU)
    "lr": 0.5 * 256 / (128 * _GPUS),  # V2 recipe --lr 0.5 at batch 1024
    "epochs": 600,  # V2 recipe --epochs 600
    "warmup_epochs": 5.0,  # V2 recipe --lr-warmup-epochs 5
    "lr_warmup_method": "linear",  # V2 recipe --lr-warmup-method linear
    "auto_augment": "ta_wide",  # V2 recipe --auto-augment ta_wide
    "random_erase": 0.1,  # V2 recipe --random-erase 0.1
    "weight_decay": 2e-5,  # V2 recipe --weight-decay 0.00002
    "norm_weight_decay": 0.0,  # V2 recipe --norm-weight-decay 0.0
    "label_smoothing": 0.1,  # V2 recipe --label-smoothing 0.1
    "mixup_alpha": 0.2,  # V2 recipe --mixup-alpha 0.2
    "cutmix_alpha": 1.0,  # V2 recipe --cutmix-alpha 1.0
    "train_crop_size": 176,  # V2 recipe --train-crop-size 176
    "model_ema": True,  # V2 recipe --model-ema
    "val_resize_size": 232,  # V2 recipe --val-resize-size 232
    "ra_reps": 4,  # V2 recipe --ra-sampler --ra-reps 4
}

# Ours, not torchvision's: the V2 recipe's augmentation for a few thousand images trained from
# scratch on one machine (BENCHMARKS.md: on the flower photos in 40 epochs it does not beat crop
# and flip yet).
# TrivialAugmentWide, random erasing, label smoothing and the EMA stay; MixUp and CutMix go (a
# run this short on data this small underfits with them: its train top-1 stays far below its
# val top-1); the weight decay is the small-data value (V2's 2e-5 suits 600 ImageNet epochs);
# the EMA decay averages over about 7% of the run at 3,000 images (the reference's adjusted
# decay scales its horizon with the data set size); no repeated augmentation (on one device it
# repeats an image within a batch).
_SMALL = _TV2 | {
    "batch_size": 32,
    "lr": 0.4,
    "epochs": 40,
    "warmup_epochs": 2.0,
    "nesterov": True,
    "weight_decay": 5e-4,
    "mixup_alpha": 0.0,
    "cutmix_alpha": 0.0,
    "train_crop_size": None,
    "val_resize_size": None,
    "val_crop_size": None,
    "ra_reps": 1,
    "model_ema_decay": 0.995,
    "model_ema_steps": 4,
    "crop_min_scale": 0.25,
    "zero_init_residual": True,
}

RECIPES: dict[str, dict[str, Any]] = {"tv1": _TV1, "tv2": _TV2, "small": _SMALL}


def config(explicit: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of `explicit` options (those the user gave, by field name) over the
    preset `explicit["recipe"]` names (none: the TrainConfig defaults); ConfigError for an
    unknown recipe or option."""
    name = explicit.get("recipe")
    if name is not None and name not in RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}, got {name!r}")
    values = (RECIPES[name] if name else {}) | explicit
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"unknown option(s): {', '.join(unknown)}")
    return TrainConfig(**values)


SUMMARY_OPTIONS = ("recipe", "batch_size", "lr", "epochs", "warmup_epochs", "weight_decay",
                   "label_smoothing", "optimizer", "image_size", *RECIPE_OPTIONS)  # fmt: skip


def summary(cfg: TrainConfig) -> str:
    """The resolved recipe options as one line `name=value ...` (for the log)."""
    return " ".join(f"{name}={getattr(cfg, name)}" for name in SUMMARY_OPTIONS)


def main(argv: list[str]) -> int:
    """`python -m resnet_jax.recipes NAME`: print the preset's resolved options, one per line."""
    if len(argv) != 1 or argv[0] not in RECIPES:
        print(f"usage: python -m resnet_jax.recipes {{{','.join(RECIPES)}}}", file=sys.stderr)
        return 2
    print(summary(config({"recipe": argv[0]})).replace(" ", "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
