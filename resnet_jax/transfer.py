"""Transfer learning: load pretrained weights, replace the head, choose what trains.

The three modes of the ResNet tutorial, as `freeze`:
  - "none":     train every parameter after loading the weights;
  - "stages":   train only the named stages (e.g. `trainable=("layer4", "fc")`);
  - "backbone": train only the (new) classifier.
Frozen parameters get exactly zero update (optax labels, see `steps.create_optimizer`) and
frozen stages' BatchNorm layers use and keep their running statistics (`ResNet.frozen_bn`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from resnet_jax import convert, model_dir, models

log = logging.getLogger("resnet_jax")

FREEZE_MODES = ("none", "stages", "backbone")
STAGES = ("stem", *models.STAGE_NAMES, "fc")


def stage_of(top_level_name: str) -> str:
    """Which stage a top-level param/BN name belongs to: conv1/bn1 -> stem, layer3_5 -> layer3."""
    if top_level_name in ("conv1", "bn1"):
        return "stem"
    return top_level_name.split("_")[0]


def trainable_stages(freeze: str, trainable: Sequence[str] | None = None) -> tuple[str, ...]:
    """The stages that train under `freeze` (validated; `trainable` only with "stages")."""
    if freeze not in FREEZE_MODES:
        raise ValueError(f"--freeze must be one of {', '.join(FREEZE_MODES)}, got {freeze!r}")
    if freeze != "stages":
        if trainable:
            raise ValueError(f"--trainable only applies to --freeze stages, not {freeze!r}")
        return STAGES if freeze == "none" else ("fc",)
    if not trainable:
        raise ValueError(f"--freeze stages needs --trainable, a comma list from {','.join(STAGES)}")
    unknown = [s for s in trainable if s not in STAGES]
    if unknown:
        raise ValueError(f"--trainable: unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    return tuple(s for s in STAGES if s in trainable)


def frozen_bn(trainable: Sequence[str]) -> tuple[str, ...]:
    """BatchNorm groups to run in inference mode: every non-trainable stage but the head."""
    return tuple(s for s in ("stem", *models.STAGE_NAMES) if s not in trainable)


def trainable_mask(params: Mapping[str, Any], trainable: Sequence[str]) -> dict:
    """A Python bool per param, True in the `trainable` stages (`param_labels` other than
    "frozen"): `steps.make_train_step`'s `trainable`, so frozen stages are not differentiated."""
    return jax.tree.map(lambda label: label != "frozen", param_labels(params, trainable))


def param_labels(params: Mapping[str, Any], trainable: Sequence[str]) -> dict:
    """Optimizer labels per param: "head" (fc), "train" or "frozen", by stage."""

    def label(top: str) -> str:
        if stage_of(top) not in trainable:
            return "frozen"
        return "head" if top == "fc" else "train"

    return {
        top: jax.tree.map(functools.partial(lambda lab, _: lab, label(top)), sub)
        for top, sub in params.items()
    }


def check_head_trains(
    pretrained: Mapping[str, Any], num_classes: int, trainable: Sequence[str]
) -> None:
    """Raise unless the head trains whenever `merge_pretrained` makes it a fresh random layer
    (pretrained weights without one, or with another class count): layers trained under a
    frozen random head would only learn to fit fixed random logits."""
    if "fc" in trainable:
        return
    old_classes = model_dir.num_classes(pretrained["params"])
    if old_classes == num_classes:
        return
    why = (
        "the pretrained weights have no head"
        if old_classes is None
        else f"the pretrained head has {old_classes} classes, the data set {num_classes}"
    )
    raise ValueError(
        f"{why}, so fc is a new, randomly initialised layer, but --trainable "
        f"{','.join(trainable)} keeps it frozen; add fc to --trainable"
    )


def load_pretrained(path: str | Path, arch: str) -> dict:
    """`{"params", "batch_stats"}` from a torchvision file or a resnet_jax checkpoint for `arch`.

    torchvision files (.pth/.pt/.safetensors in any case, `convert.is_torch_weights_file`) go
    through `convert.from_torchvision`; anything else is read with `model_dir.load`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--pretrained {path}: no such file or directory")
    if convert.is_torch_weights_file(path):
        return convert.from_torchvision(path, arch)

    loaded = model_dir.load(path)
    if loaded.arch != arch:
        raise ValueError(f"--pretrained {path} holds a {loaded.arch} checkpoint, not {arch}")
    return {k: jax.device_get(v) for k, v in loaded.variables.items()}


def merge_pretrained(fresh: Mapping[str, Any], pretrained: Mapping[str, Any]) -> dict:
    """`fresh` variables with every pretrained leaf copied in. The head follows `fresh`: a
    pretrained head with another class count is replaced by the fresh one, headless pretrained
    weights get the fresh head (both logged), and a headless `fresh` model drops the pretrained
    head."""
    params = dict(pretrained["params"])
    new_classes, old_classes = (model_dir.num_classes(v["params"]) for v in (fresh, pretrained))
    new_fc, old_fc = fresh["params"].get("fc"), params.pop("fc", None)
    if new_fc is not None:
        if old_fc is None:
            log.info("pretrained weights have no head: adding a new %d-class fc", new_classes)
            old_fc = new_fc
        elif np.shape(old_fc["kernel"]) != np.shape(new_fc["kernel"]):
            log.info(
                "pretrained head has %d classes, the data set %d: replacing fc with a freshly "
                "initialised %d-class head",
                old_classes, new_classes, new_classes,
            )  # fmt: skip
            old_fc = new_fc
        params["fc"] = old_fc
    merged = {"params": params, "batch_stats": dict(pretrained["batch_stats"])}
    expected = jax.tree.map(np.shape, dict(fresh))
    found = jax.tree.map(np.shape, merged)
    if expected != found:
        raise ValueError("pretrained weights do not match the model's structure")
    # Keep the fresh variables' dtypes (e.g. float32 params from a float64 file).
    return jax.tree.map(lambda f, p: np.asarray(p, dtype=np.asarray(f).dtype), dict(fresh), merged)
