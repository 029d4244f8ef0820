"""Transfer learning: load pretrained weights, replace or extend the head, choose what trains.

What trains, as `freeze`:
  - "none":     train every parameter after loading the weights;
  - "stages":   train only the named stages (e.g. `trainable=("layer4", "fc")`);
  - "backbone": train only the classifier.
What the classifier is, as `head`:
  - "replace":  `fc` is the classifier: a pretrained head with the data set's class count is
                kept, any other is replaced by a new one;
  - "append":   the pretrained classifier `fc` stays, frozen, and a new Dense layer `head` on
                top of its logits (`ResNet.fc_classes`) maps them to the data set's classes; only
                `head` trains (with `freeze="backbone"`, the one mode it combines with).
Frozen parameters get exactly zero update (optax labels, see `optim.create_optimizer`) and
frozen stages' BatchNorm layers use and keep their running statistics (`ResNet.frozen_bn`).
Pretrained weights are a registry name or `hf-hub:` repo (`resnet_jax.pretrained`), a
torchvision file or a resnet_jax checkpoint (`load_pretrained`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from resnet_jax import convert, model_dir, models, pretrained, pretrained_registry
from resnet_jax.preprocessing import Preprocessing

log = logging.getLogger("resnet_jax")

FREEZE_MODES = ("none", "stages", "backbone")
HEAD_MODES = ("replace", "append")
STAGES = ("stem", *models.STAGE_NAMES, "fc")
APPENDED_HEAD = "head"  # the new layer's name (and stage) under head="append"


def stage_of(top_level_name: str) -> str:
    """Which stage a top-level param/BN name belongs to: conv1/bn1 -> stem, layer3_5 -> layer3."""
    if top_level_name in ("conv1", "bn1"):
        return "stem"
    return top_level_name.split("_")[0]


def trainable_stages(
    freeze: str, trainable: Sequence[str] | None = None, head: str = "replace"
) -> tuple[str, ...]:
    """The stages that train under `freeze` and `head` (validated; `trainable` only with
    "stages"; `head="append"` only with "backbone", and then only the appended head trains)."""
    if freeze not in FREEZE_MODES:
        raise ValueError(f"--freeze must be one of {', '.join(FREEZE_MODES)}, got {freeze!r}")
    if head not in HEAD_MODES:
        raise ValueError(f"--head must be one of {', '.join(HEAD_MODES)}, got {head!r}")
    if head == "append":
        if freeze != "backbone":
            raise ValueError(
                f"--head append trains only the new layer on top of the pretrained classifier; "
                f"use it with --freeze backbone, not --freeze {freeze}"
            )
        return (APPENDED_HEAD,)
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
    """Optimizer labels per param: "head" (the classifier: fc, or the appended head), "train" or
    "frozen", by stage."""

    def label(top: str) -> str:
        if stage_of(top) not in trainable:
            return "frozen"
        return "head" if top in ("fc", APPENDED_HEAD) else "train"

    return {
        top: jax.tree.map(functools.partial(lambda lab, _: lab, label(top)), sub)
        for top, sub in params.items()
    }


def check_head_trains(
    pretrained: Mapping[str, Any], num_classes: int, trainable: Sequence[str]
) -> None:
    """Raise unless the head trains whenever `merge_pretrained` makes it a fresh random layer
    (pretrained weights without one, or with another class count): layers trained under a
    frozen random head would only learn to fit fixed random logits. With an appended head
    (`trainable` holds it), raise unless the weights have a classifier `fc` to append to."""
    if APPENDED_HEAD in trainable:
        if "fc" not in pretrained["params"] or APPENDED_HEAD in pretrained["params"]:
            has = "no classifier (fc)" if "fc" not in pretrained["params"] else "a head already"
            raise ValueError(
                f"--head append stacks a new layer on the pretrained classifier, but the "
                f"pretrained weights have {has}; use --head replace"
            )
        return
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


@dataclasses.dataclass(frozen=True)
class PretrainedWeights:
    """What `load_pretrained` returns: `{"params", "batch_stats"}` on the host, the weights'
    eval preprocessing (None when the source states none: a torchvision file, a checkpoint
    without it) and where they came from, for the log."""

    variables: dict
    preprocessing: Preprocessing | None
    origin: str


def check_pretrained_arch(name: str, arch: str) -> None:
    """Raise ValueError if `name` is a registered `ARCH.TAG` of another arch than `arch` (what
    can be checked before anything is downloaded)."""
    entry = pretrained_registry.REGISTRY.get(name)
    if entry is not None and entry.arch != arch:
        raise ValueError(
            f"--pretrained {name} holds {entry.arch} weights but --arch is {arch}; "
            f"pass --arch {entry.arch}"
        )


def load_pretrained(name: str | Path, arch: str) -> PretrainedWeights:
    """The weights `name` for `arch`: a registered `ARCH.TAG` or `hf-hub:ORG/REPO[@REVISION]`
    (downloaded through `pretrained.load`, which raises `pretrained.PretrainedError`, a
    ValueError), a torchvision file (.pth/.pt/.safetensors in any case, through
    `convert.from_torchvision`) or a resnet_jax checkpoint or model directory (`model_dir.load`,
    its stored preprocessing included). The file's classifier is kept, whatever its width."""
    if isinstance(name, str) and pretrained.is_registered_or_hub(name):
        check_pretrained_arch(name, arch)
        weights = pretrained.load(name, arch=arch)
        origin = f"{name} (Hub repo {weights.source.repo}, commit {weights.source.revision})"
        return PretrainedWeights(dict(weights.variables), weights.preprocessing, origin)
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(
            f"--pretrained {path}: no such file or directory, nor a registered name ARCH.TAG "
            f"or {pretrained.HUB_PREFIX}ORG/REPO (see docs/pretrained.md)"
        )
    if convert.is_torch_weights_file(path):
        return PretrainedWeights(convert.from_torchvision(path, arch), None, str(path))

    loaded = model_dir.load(path)
    if loaded.arch != arch:
        raise ValueError(f"--pretrained {path} holds a {loaded.arch} checkpoint, not {arch}")
    stored = loaded.metadata.get("preprocessing")
    preprocessing = None if stored is None else Preprocessing.from_json(stored)
    variables = {k: jax.device_get(v) for k, v in loaded.variables.items()}
    return PretrainedWeights(variables, preprocessing, str(path))


def appended_fc_classes(pretrained: Mapping[str, Any]) -> int:
    """The width of the pretrained classifier `fc` an appended head takes as input."""
    return int(np.shape(pretrained["params"]["fc"]["kernel"])[-1])


def merge_pretrained(fresh: Mapping[str, Any], pretrained: Mapping[str, Any]) -> dict:
    """`fresh` variables with every pretrained leaf copied in. The head follows `fresh`: a
    pretrained head with another class count is replaced by the fresh one, headless pretrained
    weights get the fresh head (both logged), and a headless `fresh` model drops the pretrained
    head; an appended `head` in `fresh` (head="append") is kept, fresh, on the pretrained fc."""
    params = dict(pretrained["params"])
    if APPENDED_HEAD in fresh["params"] and APPENDED_HEAD not in params:
        params[APPENDED_HEAD] = fresh["params"][APPENDED_HEAD]
        log.info(
            "appending a new %d-class layer %r on the pretrained %d-class fc",
            model_dir.num_classes({"fc": fresh["params"][APPENDED_HEAD]}),
            APPENDED_HEAD, appended_fc_classes(pretrained),
        )  # fmt: skip
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
