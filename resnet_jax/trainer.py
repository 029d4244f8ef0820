"""Setting up a training run: `prepare(config) -> Run`, and `fit(config)`.

`fit(config)` is `train_loop.train(prepare(config))`. `prepare` validates the options, loads
(downloads) pretrained weights unless the workdir holds a checkpoint to resume, before it writes
anything there (so a failed download leaves no trace), opens the workdir, checks a checkpoint
there may be resumed (`train_config.check_resume`, before and after the data is read), opens
the data, builds the model and optimizer, restores the checkpoint and compiles the steps, each
in a small function. The run's eval preprocessing (`Preprocessing`: the pretrained weights', at
--image-size, else `default_preprocessing`) is saved in every checkpoint's metadata under
"preprocessing"; its mean/std normalise the train and eval steps' images. Everything
a run writes (checkpoints, class_names.json, metrics.jsonl, TensorBoard events, curves.png)
goes to the workdir; rerunning with the same workdir resumes from its last complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from resnet_jax import (
    checkpoint,
    data,
    model_dir,
    models,
    optim,
    parallel,
    recipes,
    steps,
    transfer,
)
from resnet_jax import ema as ema_lib
from resnet_jax import mixing as mixing_lib
from resnet_jax.preprocessing import Preprocessing, default_preprocessing
from resnet_jax.train_config import PRECISIONS, ConfigError, TrainConfig, check_resume
from resnet_jax.train_loop import Loop, NonFiniteError, StopRequest, train

__all__ = ["ConfigError", "Loop", "NonFiniteError", "Run", "StopRequest", "TrainConfig"]
__all__ += ["describe", "fit", "prepare", "train"]

log = logging.getLogger("resnet_jax")


@dataclasses.dataclass
class Run:
    """What `prepare` sets up: the options, the data, the placed state and the compiled steps."""

    config: TrainConfig
    mesh: jax.sharding.Mesh
    ckpt: checkpoint.TrainCheckpointer
    source: data.DataSource
    metadata: dict[str, Any]  # saved with every checkpoint
    preprocessing: Preprocessing  # the eval transform, and the steps' mean/std
    steps_per_epoch: int
    total_steps: int
    state: steps.TrainState  # on the devices, as the train step takes it
    start_step: int
    train_step: Callable
    eval_step: Callable
    # Evaluate before training: the run is already complete, or a signal checkpointed an
    # epoch's last step before its evaluation.
    redo_eval: bool

    @property
    def num_classes(self) -> int:
        return len(self.source.class_names)


# --------------------------------------------------------------------------------------------
# prepare(config) -> Run


def prepare(cfg: TrainConfig) -> Run:
    """Check everything that can be wrong before anything is compiled (ConfigError), then build
    the state (resumed from `cfg.workdir` if it holds a checkpoint) and the compiled steps."""
    mesh = parallel.make_mesh()
    cfg.validate(mesh.size)
    pretrained = None if _has_step_directory(cfg) else _load_pretrained(cfg)
    ckpt = _open_checkpointer(cfg)
    try:
        return _prepare(cfg, mesh, ckpt, pretrained)
    except BaseException:
        ckpt.close()
        raise


def _has_step_directory(cfg: TrainConfig) -> bool:
    """Whether the workdir holds a step directory (a checkpoint to resume: the pretrained
    weights are then not loaded), looked up without creating anything."""
    directory = Path(cfg.workdir) / model_dir.CHECKPOINTS_DIR
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _prepare(
    cfg: TrainConfig,
    mesh: jax.sharding.Mesh,
    ckpt: checkpoint.TrainCheckpointer,
    pretrained: transfer.PretrainedWeights | None,
) -> Run:
    trainable = transfer.trainable_stages(cfg.freeze, cfg.trainable_list, cfg.head)
    latest = ckpt.latest_step()
    where = ckpt.directory / str(latest)
    saved = None
    if latest is not None:  # refuse another run's settings before reading any data
        try:
            saved = ckpt.metadata(latest)
        except ValueError as err:
            raise ConfigError(f"{err}; use another --workdir") from err
        check_resume(saved, {"config": _config_record(cfg)}, where)
    if latest is not None:
        pretrained = None  # resumed: the checkpoint holds the weights
    elif pretrained is None:  # only step directories orbax does not count: start afresh
        pretrained = _load_pretrained(cfg)
    source = _open_data(cfg)
    if pretrained is not None:
        try:
            transfer.check_head_trains(pretrained.variables, len(source.class_names), trainable)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    steps_per_epoch, total_steps = _schedule_length(cfg, source)
    preprocessing = _preprocessing(cfg, pretrained, saved)
    fc_classes = _fc_classes(cfg, pretrained, saved)
    metadata = {
        "arch": cfg.arch,
        "num_classes": len(source.class_names),
        "class_names": list(source.class_names),
        "image_size": cfg.image_size,
        "steps_per_epoch": steps_per_epoch,
        "trainable": list(trainable),
        "preprocessing": preprocessing.to_json(),
        "config": _config_record(cfg),
    }
    if fc_classes is not None:
        metadata["fc_classes"] = fc_classes
    if saved is not None:
        check_resume(saved, metadata, where)
    model = _build_model(cfg, len(source.class_names), trainable, fc_classes)
    variables = None if pretrained is None else pretrained.variables
    del pretrained
    state, tx, schedule = _initial_state(cfg, model, variables, trainable, steps_per_epoch)
    del variables
    state, resumed = _restore(ckpt, state, latest)
    train_step, eval_step = _compile(cfg, mesh, model, tx, schedule, trainable, state,
                                     preprocessing, steps_per_epoch)  # fmt: skip
    if jax.process_index() == 0:
        model_dir.write_class_names(cfg.workdir, source.class_names)
    start_step = int(state.step)
    redo_eval = resumed and (
        start_step >= total_steps
        or (start_step % steps_per_epoch == 0 and not ckpt.metrics(start_step))
    )
    log.info(
        "%s: %d classes, %d train / %d eval images; %d steps/epoch of %d images on %d device(s)",
        source.origin, len(source.class_names), source.num_train, source.num_eval,
        steps_per_epoch, cfg.update_batch, mesh.size,
    )  # fmt: skip
    log.info("options: %s; eval %s", recipes.summary(cfg), preprocessing.to_json())
    return Run(
        config=cfg,
        mesh=mesh,
        ckpt=ckpt,
        source=source,
        metadata=metadata,
        preprocessing=preprocessing,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        state=parallel.place_state(state, mesh, cfg.parallel),
        start_step=start_step,
        train_step=train_step,
        eval_step=eval_step,
        redo_eval=redo_eval,
    )


def _config_record(cfg: TrainConfig) -> dict[str, Any]:
    """The options as saved in checkpoint metadata: data_dir resolved, so evaluate.py finds the
    data whatever its working directory."""
    resolved = None if cfg.data_dir is None else str(Path(cfg.data_dir).resolve())
    return dataclasses.asdict(cfg) | {"data_dir": resolved}


def _open_checkpointer(cfg: TrainConfig) -> checkpoint.TrainCheckpointer:
    """The workdir's checkpointer: an unusable --workdir fails here, before any data is read."""
    try:
        return checkpoint.TrainCheckpointer(cfg.workdir, max_to_keep=cfg.keep_checkpoints)
    except OSError as err:
        raise ConfigError(f"--workdir {cfg.workdir}: {err}") from err


def _load_pretrained(cfg: TrainConfig) -> transfer.PretrainedWeights | None:
    """--pretrained's weights (`transfer.load_pretrained`: a name downloaded from the Hub, a
    torchvision file or a resnet_jax checkpoint), or None without --pretrained."""
    if not cfg.pretrained:
        return None
    try:
        pretrained = transfer.load_pretrained(cfg.pretrained, cfg.arch)
    except (OSError, ValueError) as err:  # pretrained.PretrainedError is a ValueError
        raise ConfigError(str(err)) from err
    log.info("loaded pretrained %s weights from %s", cfg.arch, pretrained.origin)
    return pretrained


def _preprocessing(
    cfg: TrainConfig, pretrained: transfer.PretrainedWeights | None, saved: dict | None
) -> Preprocessing:
    """The run's eval preprocessing: a resumed checkpoint's (the pretrained weights are not
    read again), else the pretrained weights' at --image-size (their crop_pct, interpolation,
    mean and std), else `default_preprocessing(--image-size)`; then --val-crop-size,
    --val-resize-size and --interpolation replace its fields where given."""
    if saved is not None and "preprocessing" in saved:
        try:
            return Preprocessing.from_json(saved["preprocessing"])
        except ValueError as err:
            raise ConfigError(f"{cfg.workdir}: checkpoint metadata: {err}") from err
    if pretrained is None or pretrained.preprocessing is None:
        base = default_preprocessing(cfg.image_size)
    else:
        base = pretrained.preprocessing.override(eval_size=cfg.image_size)
    try:
        return base.override(
            eval_size=cfg.val_crop_size,
            resize_size=cfg.val_resize_size,
            interpolation=cfg.interpolation,
        )
    except ValueError as err:
        raise ConfigError(f"--val-resize-size/--val-crop-size: {err}") from err


def _fc_classes(
    cfg: TrainConfig, pretrained: transfer.PretrainedWeights | None, saved: dict | None
) -> int | None:
    """With --head append, the pretrained classifier's width (from the weights, or a resumed
    checkpoint's metadata), else None."""
    if cfg.head != "append":
        return None
    if pretrained is not None:
        return transfer.appended_fc_classes(pretrained.variables)
    return int((saved or {})["fc_classes"])


def _open_data(cfg: TrainConfig) -> data.DataSource:
    """The data source; an unreadable or empty one, or one without evaluation images, is a
    ConfigError (else a whole epoch would train before the evaluation fails)."""
    try:
        source = data.open_source(
            dataset=cfg.dataset,
            data_dir=cfg.data_dir,
            tfds_data_dir=cfg.tfds_data_dir,
            tfds_manual_dir=cfg.tfds_manual_dir,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            file_list_cache=Path(cfg.workdir) / "file_list.json",
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    except (OSError, ValueError, RuntimeError) as err:  # RuntimeError: TFDS cannot prepare it
        raise ConfigError(str(err)) from err
    if source.num_eval == 0:
        raise ConfigError(
            f"{source.origin}: no evaluation images; raise --val-fraction (now "
            f"{cfg.val_fraction}) or give the data a validation split"
        )
    return source


def _schedule_length(cfg: TrainConfig, source: data.DataSource) -> tuple[int, int]:
    """(optimizer steps per epoch, each of --batch-size x --accum-steps images, with
    --ra-reps repetitions; steps to train in total: the epochs', cut at --max-steps)."""
    try:
        steps_per_epoch = data.steps_per_epoch(source, cfg.update_batch, cfg.ra_reps)
    except ValueError as err:
        raise ConfigError(f"--batch-size (x --accum-steps): {err}") from err
    total_steps = steps_per_epoch * cfg.epochs
    return steps_per_epoch, min(total_steps, cfg.max_steps or total_steps)


def _build_model(
    cfg: TrainConfig, num_classes: int, trainable: tuple[str, ...], fc_classes: int | None
) -> models.ResNet:
    """The model for the steps: BatchNorm synchronised over the mesh with --sync-bn, else per
    device; with `fc_classes`, a `head` appended on a `fc_classes`-wide fc."""
    return models.get_model(
        cfg.arch,
        num_classes=num_classes,
        fc_classes=fc_classes,
        dtype=PRECISIONS[cfg.precision],
        axis_name=parallel.BATCH_AXIS if cfg.sync_bn else None,
        frozen_bn=transfer.frozen_bn(trainable),
        zero_init_residual=cfg.zero_init_residual,
    )


def _initial_state(
    cfg: TrainConfig,
    model: models.ResNet,
    pretrained: dict | None,
    trainable: tuple[str, ...],
    steps_per_epoch: int,
) -> tuple[steps.TrainState, Any, Any]:
    """(fresh TrainState on the host from the seed and `pretrained`, optimizer, LR schedule)."""
    variables = models.init_variables(model.clone(axis_name=None), jax.random.key(cfg.seed), 64)
    if pretrained is not None:
        variables = transfer.merge_pretrained(variables, pretrained)
    labels = None
    if cfg.freeze != "none" or cfg.head_lr_multiplier != 1.0:
        labels = transfer.param_labels(variables["params"], trainable)
        log.info("training %s; frozen: the rest", ", ".join(trainable))
    schedule = optim.learning_rate_schedule(
        base_lr=cfg.lr,
        global_batch_size=cfg.update_batch,
        steps_per_epoch=steps_per_epoch,
        epochs=cfg.epochs,
        warmup_epochs=cfg.warmup,
        warmup_method=cfg.lr_warmup_method,
        warmup_decay=cfg.lr_warmup_decay,
        lr_min=cfg.lr_min,
    )
    tx = optim.create_optimizer(
        name=cfg.optimizer,
        schedule=schedule,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        norm_weight_decay=cfg.norm_weight_decay,
        bias_weight_decay=cfg.bias_weight_decay,
        clip_grad_norm=cfg.clip_grad_norm,
        param_labels=labels,
        head_lr_multiplier=cfg.head_lr_multiplier,
    )
    return steps.create_train_state(variables, tx, ema=cfg.model_ema), tx, schedule


def _restore(
    ckpt: checkpoint.TrainCheckpointer, state: steps.TrainState, latest: int | None
) -> tuple[steps.TrainState, bool]:
    """(the checkpointed state at `latest` if there is one, else `state`; whether restored)."""
    try:
        restored = ckpt.restore(state, step=latest)
    except ValueError as err:
        raise ConfigError(f"{err}; use another --workdir or the original settings") from err
    if restored is None:
        return state, False
    log.info("resumed from %s at step %d", ckpt.directory, int(restored[0].step))
    return restored[0], True


def _compile(
    cfg, mesh, model, tx, schedule, trainable, state, preprocessing, steps_per_epoch
) -> tuple[Callable, Callable]:
    """The parallelized (jit-compiled on first call) train and eval steps; uint8 images are
    normalised with `preprocessing`'s mean/std. The train step mixes with --mixup-alpha /
    --cutmix-alpha, accumulates --accum-steps batches and updates the --model-ema average
    (its decay adjusted to the update batch, --model-ema-steps and --epochs, and reset during
    the warm-up, as torchvision's reference)."""
    mask = None
    if cfg.freeze != "none":
        mask = transfer.trainable_mask(state.params, trainable)
    mean_std = (preprocessing.mean, preprocessing.std)
    mixing = None
    if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
        mixing = mixing_lib.Mixing(cfg.mixup_alpha, cfg.cutmix_alpha, seed=cfg.seed)
    ema = None
    if cfg.model_ema:
        decay = ema_lib.adjusted_decay(
            cfg.model_ema_decay,
            global_batch_size=cfg.update_batch,
            ema_steps=cfg.model_ema_steps,
            epochs=cfg.epochs,
        )
        ema = ema_lib.EmaSchedule(decay, steps_per_epoch, cfg.model_ema_steps, cfg.warmup)
    train_step = steps.make_train_step(
        model, tx, schedule=schedule, label_smoothing=cfg.label_smoothing, trainable=mask,
        mean_std=mean_std, mixing=mixing, accum_steps=cfg.accum_steps, ema=ema,
    )  # fmt: skip
    eval_step = steps.make_eval_step(model, mean_std=mean_std)
    return (
        parallel.parallelize(train_step, mesh, kind=cfg.parallel),
        parallel.parallelize(
            eval_step, mesh, kind=cfg.parallel, donate=False, out_specs=parallel.EVAL_OUT_SPECS
        ),
    )


def fit(cfg: TrainConfig) -> dict[str, Any]:
    """Train `cfg.arch` on `cfg`'s data; resume from `cfg.workdir` if it holds a checkpoint.

    Returns the final metrics (last eval and step counters).
    """
    return train(prepare(cfg))


def describe(final: dict[str, Any]) -> str:
    """One line summary of `fit`'s result."""
    parts = [f"step {final['step']}", f"epochs {final['epochs_completed']:.2f}"]
    for key in ("val_loss", "val_accuracy", "val_top5"):
        if key in final and math.isfinite(final[key]):
            parts.append(f"{key} {final[key]:.4f}")
    return ", ".join(parts)
