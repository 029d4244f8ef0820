"""`TrainConfig`: every option of a training run, its help text, validation and resume rules.

Each field carries its command-line help in `metadata["help"]` (scripts/train.py builds one flag
per field from it; defining a field without help fails at import). `check_resume` is the one
place that decides whether a checkpoint may be resumed with this run's settings.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from resnet_jax import models, parallel, pretrained, transfer

PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
RECIPE_NAMES = ("tv1", "tv2", "small")
AUTO_AUGMENTS = ("none", "ta_wide", "ra")
INTERPOLATIONS = ("bilinear", "bicubic")
DEFAULT_WARMUP_EPOCHS = 5.0


class ConfigError(ValueError):
    """A bad option or missing data, found before anything is compiled."""


def _option(default: Any, help: str, parse: Any = None) -> Any:
    """A dataclass field with its command-line help (and, if the type's constructor does not
    parse the flag, the function `parse` that does)."""
    metadata = {"help": help} if parse is None else {"help": help, "parse": parse}
    return dataclasses.field(default=default, metadata=metadata)


def optional_float(text: str) -> float | None:
    """A flag's float, or None for "none" (torchvision's None)."""
    return None if text.strip().lower() == "none" else float(text)


def _every_field_has_help(cls: type) -> type:
    missing = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("help")]
    if missing:
        raise TypeError(f"{cls.__name__} fields without help: {', '.join(missing)}")
    return cls


@_every_field_has_help
@dataclasses.dataclass
class TrainConfig:
    """Every option of a training run (the flags of scripts/train.py, one to one)."""

    arch: str = _option("resnet50", f"one of: {', '.join(models.ARCHS)}")
    dataset: str = _option(
        "tf_flowers", "TFDS name (tf_flowers, imagenette, cifar10, imagenet2012, ...); downloads it"
    )
    data_dir: str | None = _option(
        None, "image folders DIR/train/<class>/* and DIR/val/<class>/* instead of TFDS"
    )
    tfds_data_dir: str | None = _option(
        None, "where TFDS keeps its data (default ~/tensorflow_datasets)"
    )
    tfds_manual_dir: str | None = _option(
        None,
        "where the archives of a dataset TFDS cannot download are (imagenet2012: "
        "ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar; default "
        "<tfds data dir>/downloads/manual)",
    )
    val_fraction: float = _option(0.2, "held-out fraction of train when --data-dir has no val/")
    image_size: int = _option(
        224,
        "training crop size in pixels, and the crop of the run's own evaluation: with "
        "--pretrained weights that state their preprocessing, evaluation keeps their resize "
        "ratio (crop_pct), interpolation and mean/std at this crop size (mean/std also "
        "normalise the training images); the resolved preprocessing is stored in every "
        "checkpoint",
    )
    batch_size: int = _option(128, "global batch over all devices and processes")
    eval_batch_size: int | None = _option(None, "global eval batch (default: --batch-size)")
    epochs: int = _option(30, "epochs to train (the schedule's length)")
    max_steps: int | None = _option(
        None, "stop after this many steps in total (truncates the schedule)"
    )
    lr: float = _option(0.1, "peak learning rate for batch 256; scaled by batch/256")
    warmup_epochs: float | None = _option(
        None,
        "linear warmup before cosine decay (default: min(5, --epochs - 1), so a 1-epoch run has "
        "none)",
    )
    weight_decay: float = _option(1e-4, "decoupled for adamw, L2 for sgd; skips BatchNorm, biases")
    label_smoothing: float = _option(0.0, "cross-entropy label smoothing")
    optimizer: str = _option("sgd", "sgd (momentum 0.9) or adamw")
    nesterov: bool = _option(
        True, "Nesterov momentum for sgd (--no-nesterov: plain momentum, torchvision's --opt sgd)"
    )
    precision: str = _option("fp32", "fp32, or bf16 (bf16 compute, fp32 params, BatchNorm, loss)")
    parallel: str = _option("shard_map", "shard_map (jit over a device mesh) or pmap")
    sync_bn: bool = _option(
        False,
        "synchronised BatchNorm: statistics over the global batch (one collective per layer "
        "and pass); without it each device normalises with its own batch and the running "
        "statistics are averaged over devices once per step",
    )
    workdir: str = _option(
        "runs/resnet50", "checkpoints, metrics.jsonl, TensorBoard, class_names.json, curves.png"
    )
    seed: int = _option(0, "initialisation, shuffling and augmentation seed")
    log_every: int = _option(
        50,
        "fetch and log the training metrics every N steps and at each epoch's end (the loop "
        "does not wait for the devices in between)",
    )
    checkpoint_every: int | None = _option(
        None, "also checkpoint every N steps (one is always written per epoch)"
    )
    keep_checkpoints: int = _option(
        3, "latest checkpoints to keep (the best by val accuracy is kept too)"
    )
    max_nonfinite: int = _option(10, "stop after this many consecutive non-finite steps")
    num_workers: int | None = _option(None, "tf.data parallel calls (default: autotune)")
    pretrained: str | None = _option(
        None,
        "start from named weights downloaded from the Hugging Face Hub (ARCH.TAG from "
        "docs/pretrained.md, e.g. resnet50.tv2_in1k, which must match --arch; or "
        "hf-hub:ORG/REPO[@REVISION] holding a torchvision-keyed --arch ResNet), a torchvision "
        "file (.pth/.pt/.safetensors) or a resnet_jax checkpoint; a head with another class "
        "count is replaced (see --head)",
    )
    freeze: str = _option(
        "none", "none: train all; stages: only --trainable; backbone: only the classifier"
    )
    head: str = _option(
        "replace",
        "replace: the classifier fc gets the data set's classes (a new layer unless the "
        "pretrained one has as many); append (with --freeze backbone): keep the pretrained "
        "classifier, frozen, and train only a new layer on top of its logits (convert_weights.py "
        "to-torch folds the two into one fc)",
    )
    trainable: str | None = _option(
        None, "with --freeze stages: comma list of stem,layer1,...,layer4,fc"
    )
    head_lr_multiplier: float = _option(1.0, "learning-rate factor for the classifier")
    recipe: str | None = _option(
        None,
        f"preset of the options below ({', '.join(RECIPE_NAMES)}; resnet_jax/recipes.py names "
        "each value's source); flags given explicitly override it",
    )
    # torchvision classification-reference options (references/classification/train.py).
    auto_augment: str = _option("none", f"one of {', '.join(AUTO_AUGMENTS)} (TrivialAugmentWide, "
                                "RandAugment)")  # fmt: skip
    ra_magnitude: int = _option(9, "RandAugment magnitude (--auto-augment ra), in [0, 30]")
    random_erase: float = _option(0.0, "random erasing probability per training image")
    train_crop_size: int | None = _option(
        None, "training random-resized-crop size (default: --image-size)"
    )
    crop_min_scale: float = _option(
        0.08,
        "smallest area fraction of the training random-resized crop (torchvision's "
        "RandomResizedCrop(scale=(MIN, 1.0)), timm's --scale MIN 1.0)",
    )
    val_resize_size: int | None = _option(
        None, "evaluation resize of the shorter side (default: the eval preprocessing's)"
    )
    val_crop_size: int | None = _option(
        None, "evaluation center crop (default: the eval preprocessing's, i.e. --image-size)"
    )
    interpolation: str | None = _option(
        None,
        "bilinear or bicubic, for the training crop, the auto-augment's geometric ops "
        "(bilinear only) and the evaluation resize (default: bilinear for training, the eval "
        "preprocessing's for evaluation)",
    )
    ra_reps: int = _option(
        1, "repeated augmentation: each image N times per epoch (torchvision's --ra-reps)"
    )
    mixup_alpha: float = _option(0.0, "MixUp Beta(alpha, alpha); 0: off")
    cutmix_alpha: float = _option(0.0, "CutMix Beta(alpha, alpha); 0: off")
    model_ema: bool = _option(
        False,
        "keep an exponential moving average of params and BatchNorm statistics, evaluated each "
        "epoch beside the model (ema_val_*) and checkpointed (load it with --ema)",
    )
    model_ema_decay: float = _option(
        0.99998,
        "EMA decay, adjusted as torchvision's to the update batch (--batch-size x "
        "--accum-steps), --model-ema-steps and --epochs",
    )
    model_ema_steps: int = _option(32, "update the EMA every N optimizer steps")
    norm_weight_decay: float | None = _option(
        0.0,
        "weight decay of normalisation-layer params; none: as --weight-decay",
        parse=optional_float,
    )
    bias_weight_decay: float | None = _option(
        0.0, "weight decay of biases; none: as their layer's group", parse=optional_float
    )
    lr_warmup_method: str = _option("linear", "linear (from the factor to the peak) or constant")
    lr_warmup_decay: float = _option(
        0.0, "warm-up start factor (linear) or factor (constant) of the peak, in [0, 1]"
    )
    lr_min: float = _option(0.0, "learning rate at the end of the cosine (absolute)")
    accum_steps: int = _option(
        1,
        "gradient accumulation: each optimizer step averages N batches of --batch-size, so "
        "the update batch (which scales --lr and counts the steps per epoch) is N x --batch-size",
    )
    clip_grad_norm: float | None = _option(
        None, "clip the gradients to this global norm (default: no clipping)"
    )
    zero_init_residual: bool = _option(
        False,
        "initialise each residual block's last BatchNorm scale to zero, so every block starts as "
        "the identity (torchvision's zero_init_residual; timm's ResNets do so by default)",
    )

    @property
    def trainable_list(self) -> list[str]:
        return [s.strip() for s in self.trainable.split(",") if s.strip()] if self.trainable else []

    @property
    def eval_bs(self) -> int:
        return self.batch_size if self.eval_batch_size is None else self.eval_batch_size

    @property
    def update_batch(self) -> int:
        """Images per optimizer step: --batch-size x --accum-steps."""
        return self.batch_size * self.accum_steps

    @property
    def train_crop(self) -> int:
        return self.image_size if self.train_crop_size is None else self.train_crop_size

    @property
    def warmup(self) -> float:
        """The warm-up in epochs: `warmup_epochs`, or by default min(5, epochs - 1)."""
        return resolved_warmup(self.warmup_epochs, self.epochs)

    def validate(self, num_devices: int) -> None:
        """Raise ConfigError naming the bad option before anything is compiled or read."""
        try:
            models.check_arch(self.arch)
        except ValueError as err:
            raise ConfigError(f"--arch: {err}") from err
        try:
            transfer.trainable_stages(self.freeze, self.trainable_list, self.head)
            if self.pretrained:
                transfer.check_pretrained_arch(self.pretrained, self.arch)
            for name, size in (
                ("--batch-size", self.batch_size),
                ("--eval-batch-size", self.eval_bs),
            ):
                parallel.check_divisible(name, size, num_devices)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        for ok, message in self._checks():
            if not ok:
                raise ConfigError(message)
        if self.freeze != "none" and not self.pretrained:
            raise ConfigError(
                f"--freeze {self.freeze} needs --pretrained: without it the frozen layers would "
                "keep their random initial weights"
            )

    def _checks(self) -> list[tuple[bool, str]]:
        def at_least_1(name: str) -> tuple[bool, str]:
            value = getattr(self, name)
            flag = "--" + name.replace("_", "-")
            return value is None or value >= 1, f"{flag} must be >= 1, got {value}"

        return [
            (self.image_size >= 32, f"--image-size must be >= 32, got {self.image_size}"),
            *map(at_least_1, ("epochs", "max_steps", "checkpoint_every", "num_workers")),
            *map(at_least_1, ("log_every", "max_nonfinite", "keep_checkpoints")),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (
                self.warmup_epochs is None or 0 <= self.warmup_epochs <= self.epochs,
                f"--warmup-epochs {self.warmup_epochs} must be in [0, --epochs {self.epochs}]",
            ),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (self.precision in PRECISIONS, f"--precision must be one of {list(PRECISIONS)}"),
            (
                self.parallel in parallel.PARALLEL_KINDS,
                f"--parallel: one of {parallel.PARALLEL_KINDS}",
            ),
            *self._recipe_checks(),
        ]

    def _recipe_checks(self) -> list[tuple[bool, str]]:
        """The checks of the torchvision-reference options (`_checks`' second half)."""

        def choice(name: str, choices: tuple) -> tuple[bool, str]:
            value, flag = getattr(self, name), "--" + name.replace("_", "-")
            ok = value is None or value in choices
            return ok, f"--{flag[2:]} must be one of {', '.join(choices)}, got {value!r}"

        def non_negative(name: str) -> tuple[bool, str]:
            value, flag = getattr(self, name), "--" + name.replace("_", "-")
            return value is None or value >= 0, f"{flag} must be >= 0, got {value}"

        def at_least(name: str, low: int) -> tuple[bool, str]:
            value, flag = getattr(self, name), "--" + name.replace("_", "-")
            return value is None or value >= low, f"{flag} must be >= {low}, got {value}"

        return [
            (self.recipe is None or self.recipe in RECIPE_NAMES,
             f"--recipe must be one of {', '.join(RECIPE_NAMES)}, got {self.recipe!r}"),
            choice("auto_augment", AUTO_AUGMENTS),
            choice("interpolation", INTERPOLATIONS),
            (self.auto_augment == "none" or self.interpolation != "bicubic",
             f"--interpolation bicubic with --auto-augment {self.auto_augment}: the "
             "auto-augment's geometric ops sample bilinear or nearest (as torchvision's tensor "
             "transforms); use --interpolation bilinear or --auto-augment none"),
            choice("lr_warmup_method", ("linear", "constant")),
            (0 <= self.ra_magnitude <= 30, f"--ra-magnitude must be in [0, 30], got "
             f"{self.ra_magnitude}"),
            (0 <= self.random_erase <= 1, f"--random-erase must be in [0, 1], got "
             f"{self.random_erase}"),
            (0 < self.crop_min_scale <= 1, f"--crop-min-scale must be in (0, 1], got "
             f"{self.crop_min_scale}"),
            *(at_least(n, 32) for n in ("train_crop_size", "val_resize_size", "val_crop_size")),
            (self.val_resize_size is None or self.val_crop_size is None
             or self.val_resize_size >= self.val_crop_size,
             f"--val-resize-size {self.val_resize_size} must be >= --val-crop-size "
             f"{self.val_crop_size}"),
            *(at_least(n, 1) for n in ("ra_reps", "model_ema_steps", "accum_steps")),
            *map(non_negative, ("mixup_alpha", "cutmix_alpha", "lr_min")),
            *map(non_negative, ("norm_weight_decay", "bias_weight_decay")),
            (0 <= self.model_ema_decay <= 1, f"--model-ema-decay must be in [0, 1], got "
             f"{self.model_ema_decay}"),
            (0 <= self.lr_warmup_decay <= 1, f"--lr-warmup-decay must be in [0, 1], got "
             f"{self.lr_warmup_decay}"),
            (self.clip_grad_norm is None or self.clip_grad_norm > 0,
             f"--clip-grad-norm must be > 0, got {self.clip_grad_norm}"),
        ]  # fmt: skip


def resolved_warmup(warmup_epochs: float | None, epochs: int) -> float:
    """`warmup_epochs`, or for None the default min(5, epochs - 1) (never negative)."""
    if warmup_epochs is not None:
        return float(warmup_epochs)
    return float(max(0, min(DEFAULT_WARMUP_EPOCHS, epochs - 1)))


# The torchvision-reference options: all define the run (the augmentation, the batches, the
# optimizer, the schedule, the EMA, the evaluation's preprocessing, which a resumed run takes
# from the checkpoint). A checkpoint written before they existed trained with their defaults.
RECIPE_OPTIONS = (
    "auto_augment", "ra_magnitude", "random_erase", "train_crop_size", "val_resize_size",
    "val_crop_size", "interpolation", "ra_reps", "mixup_alpha", "cutmix_alpha", "model_ema",
    "model_ema_decay", "model_ema_steps", "norm_weight_decay", "bias_weight_decay",
    "lr_warmup_method", "lr_warmup_decay", "lr_min", "accum_steps", "clip_grad_norm", "nesterov",
    "crop_min_scale", "zero_init_residual",
)  # fmt: skip

# Options a resumed run must share with the checkpoint's: they define the model, the data and
# its train/held-out split (seed, val_fraction), the batches and the schedule, so resuming with
# another value would silently continue a different run (validation images leaking into
# training, a schedule of another length, a model in another precision or BatchNorm).
# `pretrained` is only read at the start, so another value would be silently ignored. Everything
# else may change on resume: how long to train (max_steps), where things are (workdir,
# tfds_data_dir, tfds_manual_dir), how it runs (parallel, num_workers, eval_batch_size) and
# bookkeeping (log_every, checkpoint_every, keep_checkpoints, max_nonfinite).
RESUME_MUST_MATCH = (
    "arch", "dataset", "data_dir", "val_fraction", "seed", "image_size", "batch_size", "epochs",
    "lr", "warmup_epochs", "weight_decay", "label_smoothing", "optimizer", "precision",
    "sync_bn", "pretrained", "freeze", "head", "head_lr_multiplier",
    *RECIPE_OPTIONS,
)  # fmt: skip
# What the data and the freezing decide, recorded in the checkpoint's metadata next to "config".
RESUME_MUST_MATCH_DERIVED = ("num_classes", "class_names", "steps_per_epoch", "trainable")


def _resume_settings(config: dict) -> dict[str, Any]:
    """The RESUME_MUST_MATCH options of a config dict: paths resolved (relative to the current
    directory), the warm-up and train crop resolved, the TFDS name replaced when image folders
    are read instead (it is unused). Options the checkpoint lacks read "(not recorded)", except
    RECIPE_OPTIONS (their defaults: a checkpoint from before them trained so)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    settings = {
        key: config.get(key, defaults[key] if key in RECIPE_OPTIONS else "(not recorded)")
        for key in RESUME_MUST_MATCH
    }
    if settings["train_crop_size"] is None:  # resolved: the default is --image-size
        settings["train_crop_size"] = settings["image_size"]
    for key in ("data_dir", "pretrained"):
        if isinstance(settings[key], str) and not pretrained.is_registered_or_hub(settings[key]):
            settings[key] = str(Path(settings[key]).resolve())
    if "head" not in config:  # written before --head existed: the classifier was replaced
        settings["head"] = "replace"
    if settings["data_dir"] is not None:
        settings["dataset"] = "(image folders)"
    if isinstance(settings["epochs"], int) and "warmup_epochs" in config:
        settings["warmup_epochs"] = resolved_warmup(config["warmup_epochs"], settings["epochs"])
    return settings


def check_resume(saved: dict, current: dict, where: Path) -> None:
    """Refuse to resume from the checkpoint `where` unless its metadata `saved` agrees with this
    run's `current` metadata, listing every difference in one message (saved value, then this
    run's). Both hold "config" (a TrainConfig as a dict: RESUME_MUST_MATCH is compared); the
    RESUME_MUST_MATCH_DERIVED keys are compared where `current` has them, so this runs once
    before the data is read and once after."""
    was = _resume_settings(saved.get("config") or {})
    now = _resume_settings(current["config"])
    diffs = [
        f"--{key.replace('_', '-')} {was[key]} (now {now[key]})"
        for key in RESUME_MUST_MATCH
        if was[key] != now[key]
    ]
    diffs += [
        f"{key} {saved.get(key, '(not recorded)')} (now {current[key]})"
        for key in RESUME_MUST_MATCH_DERIVED
        if key in current and saved.get(key) != current[key]
    ]
    if diffs:
        raise ConfigError(
            f"{where} was written with other settings: {'; '.join(diffs)}. Rerun with the "
            "saved settings to resume, or use another --workdir"
        )
