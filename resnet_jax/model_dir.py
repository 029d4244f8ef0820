"""Model directories on disk: `save_model` writes one, `load` reads any of the four kinds.

On-disk layout (every directory below is written to `<name>.orbax-checkpoint-tmp` and renamed
into place only once complete, so an interrupted write is never mistaken for a model):

    <workdir>/class_names.json            {"0": "daisy", ...} (`write_class_names`)
    <workdir>/checkpoints/metadata/       orbax root metadata: {"best_metric": ...}
    <workdir>/checkpoints/<step>/state/   the full training state (orbax PyTree)
    <workdir>/checkpoints/<step>/meta/    JSON metadata (arch, num_classes, class_names,
                                          preprocessing, ...)
    <workdir>/checkpoints/<step>/metrics/ the step's metrics (orbax-managed)
    <model_dir>/state/, <model_dir>/meta/ a `save_model` export: {params, batch_stats} + JSON

`checkpoint.TrainCheckpointer` writes the `checkpoints/` part during training. A `save_model`
directory has the same shape as a step directory, so `load()` reads both the same way; it also
takes a workdir or its `checkpoints` directory and picks a step there.

The metadata key "preprocessing" holds the eval transform the weights want
(`preprocessing.Preprocessing.to_json`); a directory without it is evaluated with
`default_preprocessing` of its metadata's `image_size` (training's validation transform).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax.core import unfreeze

from resnet_jax import models
from resnet_jax.preprocessing import Preprocessing, default_preprocessing

if TYPE_CHECKING:
    from resnet_jax.pretrained import Pretrained

log = logging.getLogger(__name__)

STATE_ITEM = "state"
META_ITEM = "meta"
CHECKPOINTS_DIR = "checkpoints"
CLASS_NAMES_FILE = "class_names.json"
MODEL_FORMAT = "resnet_jax.model"
MODEL_FORMAT_VERSION = 1
VARIABLE_COLLECTIONS = ("params", "batch_stats")
DEFAULT_BEST_METRIC = "val_accuracy"
PREPROCESSING_KEY = "preprocessing"
_TMP_SUFFIX = ocp.step.TMP_DIR_SUFFIX


def json_round_trip(obj: Any, what: str) -> Any:
    """Round-trip `obj` through JSON (numpy scalars and paths allowed) so what is saved is what
    `load` returns; raise naming `what` if it cannot be represented."""

    def default(o: Any) -> Any:
        if isinstance(o, np.generic | np.ndarray | jax.Array) and np.ndim(o) == 0:
            return np.asarray(o).item()
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        raise TypeError(f"{type(o).__name__} value {o!r}")

    try:
        return json.loads(json.dumps(obj, default=default))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable; cannot encode {e}") from e


def metric_score(metrics: Mapping[str, Any] | None, name: str) -> float:
    """Score of a checkpoint for `name` (higher is better); missing or NaN scores -inf."""
    if not metrics or name not in metrics:
        return -math.inf
    value = float(metrics[name])
    return -math.inf if math.isnan(value) else value


def is_model_dir(path: Path) -> bool:
    """Whether `path` holds a finished state + metadata pair (a step or `save_model` dir)."""
    return (path / STATE_ITEM).is_dir() and (path / META_ITEM).is_dir()


def read_metadata(directory: Path) -> dict:
    """The JSON metadata item of a step or model directory, with errors naming the path."""
    try:
        meta = ocp.JsonCheckpointHandler().restore(epath.Path(directory / META_ITEM))
    except (OSError, ValueError) as e:
        raise ValueError(f"{directory / META_ITEM}: unreadable checkpoint metadata ({e})") from e
    if not isinstance(meta, Mapping):
        raise ValueError(f"{directory / META_ITEM}: expected a JSON object, got {type(meta)}")
    return dict(meta)


def num_classes(params: Mapping[str, Any]) -> int | None:
    """Width of a ResNet params tree's `fc` (its kernel's outputs), None if headless. The model's
    class count, which an appended `head` sets, is `models.classifier_widths`."""
    if "fc" not in params:
        return None
    return int(np.shape(params["fc"]["kernel"])[-1])


def _check_arch_variables(arch: str, variables: Mapping, where: str) -> None:
    """`check_variables` against the `arch` model with the variables' classifier widths
    (`models.classifier_widths`: `fc`, and an appended `head` if any)."""
    widths = models.classifier_widths(variables["params"])
    model = models.get_model(arch, **widths)
    shown = ", ".join(f"{k}={v}" for k, v in widths.items() if v is not None) or "no head"
    models.check_variables(variables, model, where, what=f"{arch} with {shown}")


def _check_class_names(class_names: Sequence[str] | None, classes: int | None, where: str) -> None:
    """Raise unless `class_names` is None or unique non-empty strings, one per class."""
    if class_names is None:
        return
    if isinstance(class_names, str) or not all(isinstance(c, str) and c for c in class_names):
        raise ValueError(f"{where}: class_names must be a list of non-empty strings")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"{where}: class_names has duplicates: {list(class_names)}")
    if classes is not None and len(class_names) != classes:
        raise ValueError(
            f"{where}: {len(class_names)} class_names for a model with {classes} classes"
        )


def save_model(
    path: str | Path,
    *,
    arch: str,
    variables: Mapping[str, Any],
    class_names: Sequence[str] | None = None,
    metadata: dict | None = None,
    preprocessing: Preprocessing | None = None,
    force: bool = False,
) -> Path:
    """Export `{"params", "batch_stats"}` of `arch` with JSON metadata (arch, num_classes,
    class_names, preprocessing, ...) as a directory `load()` reads. `preprocessing` is stored
    under "preprocessing" (None keeps `metadata`'s, if any, which must then be valid). Refuses
    to replace an existing path unless `force=True`, and never replaces anything that is not
    itself a model directory. Multi-host: every process must call it."""
    path = Path(path)
    models.check_arch(arch)
    missing = [c for c in VARIABLE_COLLECTIONS if c not in variables]
    extra = sorted(set(variables) - set(VARIABLE_COLLECTIONS))
    if missing or extra:
        raise ValueError(
            f"save_model({path}): variables must have exactly {list(VARIABLE_COLLECTIONS)}; "
            f"missing {missing}, unexpected {extra}"
        )
    tree = {c: unfreeze(variables[c]) for c in VARIABLE_COLLECTIONS}
    classes = models.classifier_widths(tree["params"])["num_classes"]
    _check_class_names(class_names, classes, f"save_model({path})")
    _check_arch_variables(arch, tree, f"save_model({path})")

    meta = json_round_trip(dict(metadata or {}), "metadata")
    fixed = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "arch": arch,
        "num_classes": classes,
        "class_names": list(class_names) if class_names is not None else None,
    }
    if preprocessing is not None:
        fixed[PREPROCESSING_KEY] = preprocessing.to_json()
    elif PREPROCESSING_KEY in meta:
        _stored_preprocessing(meta, f"save_model({path}): metadata")
    clashes = [k for k in fixed if k in meta and meta[k] != fixed[k]]
    if clashes:
        raise ValueError(f"save_model({path}): metadata {clashes} contradict the arguments")
    meta.update(fixed)

    if path.exists() or path.is_symlink():
        if not force:
            raise FileExistsError(f"{path} already exists; pass force=True to overwrite it")
        if not is_model_dir(path):
            raise FileExistsError(f"{path} exists and is not a model directory; not overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(
            path.absolute(),
            args=ocp.args.Composite(
                **{STATE_ITEM: ocp.args.StandardSave(tree), META_ITEM: ocp.args.JsonSave(meta)}
            ),
            force=force,
        )
    return path


def pretrained_metadata(weights: Pretrained) -> dict[str, Any]:
    """Metadata recording where named weights (`pretrained.load`) came from: their name, Hub
    repo and commit, licence, eval size ("image_size") and preprocessing."""
    return {
        "pretrained": weights.name,
        "hub_repo": weights.source.repo,
        "hub_revision": weights.source.revision,
        "license": weights.license,
        "image_size": weights.preprocessing.eval_size,
        PREPROCESSING_KEY: weights.preprocessing.to_json(),
    }


@dataclasses.dataclass
class LoadedModel:
    """Model variables plus what is needed to rebuild and label the model; `path` is the
    directory it was read from (for named weights, the downloaded file)."""

    arch: str
    variables: dict
    class_names: list[str] | None
    metadata: dict
    path: Path
    step: int | None = None

    @classmethod
    def from_pretrained(cls, weights: Pretrained, class_names: Sequence[str] | None) -> LoadedModel:
        """Named weights from `pretrained.load` as a LoadedModel labelled with `class_names`,
        with `pretrained_metadata` (so their preprocessing is the stored one)."""
        classes = num_classes(weights.variables["params"])
        _check_class_names(class_names, classes, weights.name)
        meta = {
            **pretrained_metadata(weights),
            "arch": weights.arch,
            "num_classes": classes,
            "class_names": None if class_names is None else list(class_names),
        }
        variables = {c: weights.variables[c] for c in VARIABLE_COLLECTIONS}
        names = meta["class_names"]
        return cls(weights.arch, variables, names, meta, weights.source.path)

    @property
    def num_classes(self) -> int | None:
        """Classifier width (None for a headless model)."""
        return models.classifier_widths(self.variables["params"])["num_classes"]

    def model(self, **overrides: Any) -> models.ResNet:
        """The `models.ResNet` these variables belong to; `overrides` go to `get_model`."""
        widths = models.classifier_widths(self.variables["params"])
        return models.get_model(self.arch, **{**widths, **overrides})

    @property
    def preprocessing(self) -> Preprocessing | None:
        """The eval preprocessing the weights were saved with (metadata "preprocessing"), else
        `default_preprocessing` of the metadata's `image_size`, else None (neither recorded).
        Raises ValueError naming the path if the recorded one is malformed."""
        where = f"{self.path / META_ITEM}: metadata"
        if PREPROCESSING_KEY in self.metadata:
            return _stored_preprocessing(self.metadata, where)
        size = self.metadata.get("image_size")
        if size is None:
            return None
        try:
            return default_preprocessing(size)
        except ValueError as e:
            raise ValueError(f"{where} image_size: {e}") from e

    def eval_preprocessing(
        self,
        *,
        image_size: int | None = None,
        resize_size: int | None = None,
        interpolation: str | None = None,
    ) -> Preprocessing:
        """`preprocessing` with the given fields overridden (`Preprocessing.override`: a new
        `image_size` keeps the crop fraction unless `resize_size` is given too). Without a
        recorded preprocessing, `image_size` is required and the rest defaults as
        `default_preprocessing(image_size)`; raises ValueError naming the path if it is None."""
        stored = self.preprocessing
        if stored is None:
            if image_size is None:
                raise ValueError(
                    f"{self.path}: checkpoint metadata has no image_size or preprocessing; pass "
                    "the size to use"
                )
            stored = default_preprocessing(image_size)
        return stored.override(
            eval_size=image_size, resize_size=resize_size, interpolation=interpolation
        )


def _stored_preprocessing(meta: Mapping[str, Any], where: str) -> Preprocessing:
    """`meta["preprocessing"]` as a Preprocessing; ValueError starting with `where` if bad."""
    try:
        return Preprocessing.from_json(meta[PREPROCESSING_KEY])
    except ValueError as e:
        raise ValueError(f"{where} {PREPROCESSING_KEY}: {e}") from e


def _restore_variables(directory: Path, ema: bool = False) -> dict:
    """Restore only params and batch_stats of a state item (with `ema`, those of its moving
    average, `TrainState.ema`) onto the first local device, whatever the sharding (and device
    count) they were saved with."""
    state_dir = epath.Path((directory / STATE_ITEM).absolute())
    try:
        saved = ocp.PyTreeCheckpointHandler().metadata(state_dir).tree
    except (OSError, ValueError) as e:
        raise ValueError(f"{state_dir}: unreadable checkpoint state ({e})") from e
    if ema:
        if not isinstance(saved, Mapping) or not isinstance(saved.get("ema"), Mapping):
            raise ValueError(
                f"{state_dir}: the checkpoint has no EMA weights (train with --model-ema to "
                "keep them); load it without ema"
            )
        saved = saved["ema"]
    missing = [c for c in VARIABLE_COLLECTIONS if not isinstance(saved, Mapping) or c not in saved]
    if missing:
        raise ValueError(f"{state_dir}: checkpoint state has no {missing}")
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    template = {
        c: jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), saved[c]
        )
        for c in VARIABLE_COLLECTIONS
    }
    if ema:
        template = {"ema": template}
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            state_dir.absolute(),
            args=ocp.args.PyTreeRestore(
                item=template,
                restore_args=ocp.checkpoint_utils.construct_restore_args(template),
                partial_restore=True,
            ),
        )
    return restored["ema"] if ema else restored


def _load_model_dir(directory: Path, step: int | None, ema: bool = False) -> LoadedModel:
    """Read metadata and variables (with `ema`, the moving average's) of one step or
    `save_model` directory."""
    meta = read_metadata(directory)
    arch = meta.get("arch")
    if not isinstance(arch, str):
        raise ValueError(f"{directory / META_ITEM}: metadata has no 'arch' string")
    try:
        models.check_arch(arch)
    except ValueError as e:
        raise ValueError(f"{directory}: {e}") from e
    variables = _restore_variables(directory, ema)
    classes = models.classifier_widths(variables["params"])["num_classes"]
    if meta.get("num_classes", classes) != classes:
        raise ValueError(
            f"{directory}: metadata num_classes={meta['num_classes']} but the classifier has "
            f"{classes} outputs"
        )
    _check_arch_variables(arch, variables, str(directory))
    class_names = meta.get("class_names")
    _check_class_names(class_names, classes, str(directory / META_ITEM))
    return LoadedModel(arch, variables, class_names, meta, directory, step)


class _OpenedReadOnlyNotice(logging.Filter):
    """Drops orbax's warning "Given directory is read only" for a manager opened with
    read_only=True: loading opens it so on purpose, and the line reads like a problem with the
    user's directory."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


def _read_only_manager(root: Path) -> ocp.CheckpointManager:
    """A CheckpointManager over `root` that never writes, creates or deletes anything."""
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    notice = _OpenedReadOnlyNotice()
    absl_logger = logging.getLogger("absl")  # orbax logs through absl, i.e. this logger
    absl_logger.addFilter(notice)
    try:
        return ocp.CheckpointManager(root.absolute(), options=options)
    finally:
        absl_logger.removeFilter(notice)


def _pick_step(root: Path, step: int | None, which: str) -> int:
    """The step to load from checkpoint directory `root`: `step`, else best or latest."""
    with _read_only_manager(root) as manager:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(
                f"{root} has no checkpoints: expected a save_model or step directory (with "
                f"{STATE_ITEM}/ and {META_ITEM}/), a training workdir (with {CHECKPOINTS_DIR}/), "
                "or a checkpoints directory with completed step subdirectories"
            )
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(f"no checkpoint for step {step} in {root}; steps: {steps}")
            return step
        if which == "latest":
            return steps[-1]
        best_metric = manager.metadata().custom_metadata.get("best_metric", DEFAULT_BEST_METRIC)
        scored = [(s, manager.metrics(s)) for s in steps]
        scored = [(s, m) for s, m in scored if m and best_metric in m]
        if not scored:
            log.warning("%s: no checkpoint has %r; loading the latest", root, best_metric)
            return steps[-1]
        return max(scored, key=lambda sm: (metric_score(sm[1], best_metric), sm[0]))[0]


def load(
    path: str | Path, step: int | None = None, which: str = "best", ema: bool = False
) -> LoadedModel:
    """Load params, batch_stats and metadata for research code, onto the default device.

    `path` may be a `save_model` directory, a training workdir, its `checkpoints` directory, or
    one step directory. From a workdir, `step` picks a step, else `which` ("best" by the run's
    best metric, falling back to latest when no step has it; or "latest"). Optimizer state is
    never read. `ema`: the checkpoint's moving average of the model (`--model-ema`) instead
    of the model's own variables; ValueError if it has none.
    """
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; a checkpoint is a directory")
    if _TMP_SUFFIX in path.name:
        raise ValueError(f"{path} is an unfinished checkpoint write (orbax temporary directory)")
    if is_model_dir(path):
        if step is not None:
            raise ValueError(f"{path} is a single checkpoint; step={step} does not apply")
        in_run = path.parent.name == CHECKPOINTS_DIR and path.name.isdigit()
        return _load_model_dir(path, int(path.name) if in_run else None, ema)
    root = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    chosen = _pick_step(root, step, which)
    return _load_model_dir(root / str(chosen), chosen, ema)


def write_class_names(workdir: str | Path, class_names: Sequence[str]) -> Path:
    """Write `workdir/class_names.json` as {"0": name, ...} (index -> label), atomically and from
    process 0 only; returns its path."""
    _check_class_names(class_names, None, "write_class_names")
    path = Path(workdir) / CLASS_NAMES_FILE
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({str(i): c for i, c in enumerate(class_names)}, indent=2))
        os.replace(tmp, path)
    return path


def read_class_names(path: str | Path) -> list[str]:
    """Class names ordered by index from a class_names.json (or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / CLASS_NAMES_FILE
    try:
        mapping = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: class names file not found") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    expected = [str(i) for i in range(len(mapping))] if isinstance(mapping, dict) else None
    if expected is None or sorted(mapping, key=lambda k: (len(k), k)) != expected:
        raise ValueError(f"{path}: expected an object with keys '0'..'n-1' mapping to class names")
    names = [mapping[k] for k in expected]
    _check_class_names(names, None, str(path))
    return names
