"""The training loop behind `scripts/train.py`: data -> data-parallel step -> eval -> checkpoints.

`fit(TrainConfig(...))` trains, evaluates every epoch, checkpoints under `workdir` and resumes
from the last complete checkpoint when run again with the same workdir. Everything it writes
(checkpoints, class_names.json, metrics.jsonl, TensorBoard events, curves.png) goes to `workdir`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from resnet_jax import checkpoint, models, train, transfer

log = logging.getLogger("resnet_jax")

PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


@dataclasses.dataclass
class TrainConfig:
    """Every option of a training run (the CLI flags of scripts/train.py, one to one)."""

    arch: str = "resnet50"
    dataset: str = "tf_flowers"
    data_dir: str | None = None
    tfds_data_dir: str | None = None
    tfds_manual_dir: str | None = None  # archives of datasets TFDS cannot download (imagenet2012)
    val_fraction: float = 0.2
    image_size: int = 224
    batch_size: int = 128  # global, over all devices and processes
    eval_batch_size: int | None = None  # default: batch_size
    epochs: int = 30
    max_steps: int | None = None
    lr: float = 0.1  # for batch 256; scaled by batch_size / 256
    warmup_epochs: float = 5.0
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    optimizer: str = "sgd"
    precision: str = "fp32"
    parallel: str = "shard_map"
    workdir: str = "runs/resnet50"
    seed: int = 0
    checkpoint_every: int | None = None  # steps; an end-of-epoch checkpoint is always written
    keep_checkpoints: int = 3
    max_nonfinite: int = 10  # consecutive skipped steps before giving up
    num_workers: int | None = None  # tf.data parallelism (default AUTOTUNE)
    pretrained: str | None = None  # torchvision .pth/.safetensors or a resnet_jax checkpoint
    freeze: str = "none"  # none | stages | backbone (see resnet_jax.transfer)
    trainable: str | None = None  # with freeze="stages": comma list, e.g. "layer4,fc"
    head_lr_multiplier: float = 1.0

    def validate(self, num_devices: int) -> None:
        """Raise ConfigError naming the bad option before anything is compiled or read."""
        try:
            models.check_arch(self.arch)
        except ValueError as err:
            raise ConfigError(f"--arch: {err}") from err
        default_warmup = self.warmup_epochs == TrainConfig.warmup_epochs  # the field's default
        checks = [
            (self.image_size >= 32, f"--image-size must be >= 32, got {self.image_size}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1"),
            (
                self.checkpoint_every is None or self.checkpoint_every >= 1,
                f"--checkpoint-every must be >= 1, got {self.checkpoint_every}",
            ),
            (
                self.num_workers is None or self.num_workers >= 1,
                f"--num-workers must be >= 1, got {self.num_workers}",
            ),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (
                0 <= self.warmup_epochs <= self.epochs,
                f"--warmup-epochs {self.warmup_epochs} must be in [0, --epochs {self.epochs}]"
                + (" (that is its default: give a shorter warmup)" if default_warmup else ""),
            ),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (self.precision in PRECISIONS, f"--precision must be one of {list(PRECISIONS)}"),
            (self.parallel in train.PARALLEL_KINDS, f"--parallel: one of {train.PARALLEL_KINDS}"),
            (self.max_nonfinite >= 1, "--max-nonfinite must be >= 1"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1"),
        ]
        try:
            transfer.trainable_stages(self.freeze, self.trainable_list)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if self.freeze != "none" and not self.pretrained:
            raise ConfigError(
                f"--freeze {self.freeze} needs --pretrained: without it the frozen layers would "
                "keep their random initial weights"
            )
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        for name, size in (("--batch-size", self.batch_size), ("--eval-batch-size", self.eval_bs)):
            try:
                train.check_divisible(name, size, num_devices)
            except ValueError as err:
                raise ConfigError(str(err)) from err

    @property
    def trainable_list(self) -> list[str]:
        return [s.strip() for s in self.trainable.split(",") if s.strip()] if self.trainable else []

    @property
    def eval_bs(self) -> int:
        return self.batch_size if self.eval_batch_size is None else self.eval_batch_size


# --------------------------------------------------------------------------------------------
# Metrics: JSON lines + TensorBoard, process 0 only


class MetricsWriter:
    """Appends one JSON object per record to workdir/metrics.jsonl and mirrors to TensorBoard.

    Opening it keeps only the complete records up to `resume_step` (without its evaluation if
    `redo_eval`): what a killed run logged after its last checkpoint is logged again by the
    resumed one, and a line cut short by the kill would make the file unreadable.
    """

    def __init__(self, workdir: Path, resume_step: int = 0, redo_eval: bool = False):
        import tensorflow as tf  # already loaded by resnet_jax.data

        self.path = workdir / "metrics.jsonl"
        _keep_records_up_to(self.path, resume_step, drop_eval_at_step=redo_eval)
        self._file = self.path.open("a")
        self._tb = tf.summary.create_file_writer(str(workdir / "tensorboard"))
        self._tf = tf

    def write(self, step: int, record: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, "time": time.time(), **record}) + "\n")
        self._file.flush()
        with self._tb.as_default(step=step):
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self._tf.summary.scalar(key, value)

    def close(self) -> None:
        self._file.close()
        self._tb.close()


def _keep_records_up_to(path: Path, step: int, drop_eval_at_step: bool = False) -> None:
    """Rewrite the JSON-lines file `path` (atomically) without records after `step` (nor the
    evaluation at `step` if `drop_eval_at_step`) and without lines that are not complete JSON
    objects; leave it untouched if there is nothing to drop."""
    if not path.exists():
        return
    text = path.read_text()
    kept = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        redone = drop_eval_at_step and "train_loss" not in record  # an eval at `step`
        if record["step"] < step or (record["step"] == step and not redone):
            kept.append(line)
    new_text = "".join(line + "\n" for line in kept)
    if new_text != text:  # also when only the last newline is missing
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(new_text)
        tmp.replace(path)


def plot_curves(metrics_path: Path, out_path: Path) -> Path:
    """PNG of train loss/accuracy per step and val loss/accuracy per eval, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train_rec = [r for r in records if "train_loss" in r]
    val_rec = [r for r in records if "val_loss" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.plot([r["step"] for r in train_rec], [r[f"train_{key}"] for r in train_rec],
                label=f"train {key}", alpha=0.6)  # fmt: skip
        ax.plot([r["step"] for r in val_rec], [r[f"val_{key}"] for r in val_rec], "o-",
                label=f"val {key}")  # fmt: skip
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


# --------------------------------------------------------------------------------------------
# Evaluation


@dataclasses.dataclass
class EvalResult:
    """Totals over a whole split: loss and top-1/top-5 accuracy, plus the confusion matrix."""

    loss: float
    top1: float
    top5: float
    count: int
    confusion: np.ndarray  # [true, predicted] counts, this process's examples

    def as_metrics(self, prefix: str = "val_") -> dict[str, float]:
        return {
            f"{prefix}loss": self.loss,
            f"{prefix}accuracy": self.top1,
            f"{prefix}top5": self.top5,
        }


class EvalInterrupted(Exception):
    """`evaluate` was abandoned: its `stop` callback returned a signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"evaluation interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def evaluate(
    eval_step: Callable,
    variables: dict,
    batches: Iterator[dict],
    mesh,
    kind: str,
    num_classes: int,
    stop: Callable[[], int | None] | None = None,
) -> EvalResult:
    """Run a parallelized eval step over padded, masked batches and total the results.

    `stop` is called before every batch (on every process alike: it may be collective); when it
    returns a signal number the evaluation is abandoned with `EvalInterrupted`, so a stop request
    is not held up by a long evaluation.
    """
    totals: dict[str, float] = {}
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for batch in batches:
        signum = None if stop is None else stop()
        if signum is not None:
            raise EvalInterrupted(signum)
        sums, predictions = eval_step(variables, train.prepare_batch(batch, mesh, kind))
        for key, value in train.fetch_state(sums, kind).items():
            totals[key] = totals.get(key, 0) + value.item()
        predictions = train.fetch_batch(predictions, kind)
        mask = batch["mask"].astype(bool)
        np.add.at(confusion, (batch["label"][mask], predictions[mask]), 1)
    count = int(totals.get("count", 0))
    if count == 0:
        raise ValueError("evaluation split is empty")
    return EvalResult(
        loss=totals["loss"] / count,
        top1=totals["correct_top1"] / count,
        top5=totals["correct_top5"] / count,
        count=count,
        confusion=confusion,
    )


# --------------------------------------------------------------------------------------------
# Signals: finish the current step, checkpoint, exit


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after every step and evaluation batch."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        log.warning(
            "received %s: checkpointing after this step or evaluation batch",
            signal.Signals(signum).name,
        )

    def agreed(self) -> int | None:
        """The signal any process received, identical on every process, so all of them stop
        (and join the checkpoint save) after the same step; one all-gather when multi-process."""
        if jax.process_count() == 1:
            return self.signum
        received = multihost_utils.process_allgather(np.int32(self.signum or 0))
        return int(received.max()) or None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class ConfigError(ValueError):
    """A bad option or missing data, found before anything is compiled."""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


# --------------------------------------------------------------------------------------------
# The run


def fit(cfg: TrainConfig) -> dict[str, Any]:
    """Train `cfg.arch` on `cfg`'s data; resume from `cfg.workdir` if it holds a checkpoint.

    Returns the final metrics (last eval and step counters).
    """
    mesh = train.make_mesh()
    cfg.validate(mesh.size)
    is_main = jax.process_index() == 0
    workdir = Path(cfg.workdir)
    trainable = transfer.trainable_stages(cfg.freeze, cfg.trainable_list)
    try:  # an unusable --workdir fails here, before any data is read or anything compiled
        ckpt = checkpoint.TrainCheckpointer(workdir, max_to_keep=cfg.keep_checkpoints)
    except OSError as err:
        raise ConfigError(f"--workdir {workdir}: {err}") from err
    latest = ckpt.latest_step()
    saved_meta = None
    if latest is not None:  # resuming: refuse another run's settings before reading any data
        try:
            saved_meta = ckpt.metadata(latest)
        except ValueError as err:
            raise ConfigError(f"{err}; use another --workdir") from err
        _check_same_settings(saved_meta.get("config"), cfg, ckpt.directory / str(latest))

    # ---------------------------------------------------------------- pretrained weights
    # Read before tensorflow is imported: torchvision files need torch, which must load first.
    pretrained = None
    if cfg.pretrained and latest is None:
        try:
            pretrained = transfer.load_pretrained(cfg.pretrained, cfg.arch)
        except (OSError, ValueError) as err:
            raise ConfigError(str(err)) from err
        log.info("loaded pretrained %s weights from %s", cfg.arch, cfg.pretrained)

    # ---------------------------------------------------------------- data
    from resnet_jax import data  # imports tensorflow: after any torch use (see convert)

    try:
        source = data.open_source(
            dataset=cfg.dataset,
            data_dir=cfg.data_dir,
            tfds_data_dir=cfg.tfds_data_dir,
            tfds_manual_dir=cfg.tfds_manual_dir,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
        )
    except (OSError, ValueError, RuntimeError) as err:  # RuntimeError: TFDS cannot prepare it
        raise ConfigError(str(err)) from err
    if source.num_eval == 0:  # else a whole epoch would train before the evaluation fails
        raise ConfigError(
            f"{source.origin}: no evaluation images; raise --val-fraction (now "
            f"{cfg.val_fraction}) or give the data a validation split"
        )
    num_classes = len(source.class_names)
    if pretrained is not None:
        try:
            transfer.check_head_trains(pretrained, num_classes, trainable)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    try:
        steps_per_epoch = data.steps_per_epoch(source, cfg.batch_size)
    except ValueError as err:
        raise ConfigError(f"--batch-size: {err}") from err
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    per_process_batch = cfg.batch_size // jax.process_count()
    per_process_eval_batch = cfg.eval_bs // jax.process_count()
    log.info(
        "%s: %d classes, %d train / %d eval images; %d steps/epoch of %d images on %d device(s)",
        source.origin, num_classes, source.num_train, source.num_eval, steps_per_epoch,
        cfg.batch_size, mesh.size,
    )  # fmt: skip
    metadata = {
        "arch": cfg.arch,
        "num_classes": num_classes,
        "class_names": list(source.class_names),
        "image_size": cfg.image_size,
        "steps_per_epoch": steps_per_epoch,
        "trainable": list(trainable),
        # Resolved: evaluate.py reads the data from there, whatever its working directory.
        "config": dataclasses.asdict(cfg)
        | {"data_dir": None if cfg.data_dir is None else str(Path(cfg.data_dir).resolve())},
    }
    if saved_meta is not None:
        _check_resumable(saved_meta, metadata, workdir)

    # ---------------------------------------------------------------- model and optimizer
    model = models.get_model(
        cfg.arch,
        num_classes=num_classes,
        dtype=PRECISIONS[cfg.precision],
        axis_name=train.BATCH_AXIS,
        frozen_bn=transfer.frozen_bn(trainable),
    )
    variables = models.init_variables(model.clone(axis_name=None), jax.random.key(cfg.seed), 64)
    if pretrained is not None:
        variables = transfer.merge_pretrained(variables, pretrained)
        del pretrained
    labels = mask = None
    if cfg.freeze != "none" or cfg.head_lr_multiplier != 1.0:
        labels = transfer.param_labels(variables["params"], trainable)
        log.info("training %s; frozen: the rest", ", ".join(trainable))
    if cfg.freeze != "none":
        mask = transfer.trainable_mask(variables["params"], trainable)
    schedule = train.learning_rate_schedule(
        base_lr=cfg.lr,
        global_batch_size=cfg.batch_size,
        steps_per_epoch=steps_per_epoch,
        epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
    )
    tx = train.create_optimizer(
        name=cfg.optimizer,
        schedule=schedule,
        weight_decay=cfg.weight_decay,
        param_labels=labels,
        head_lr_multiplier=cfg.head_lr_multiplier,
    )
    state = train.create_train_state(variables, tx)
    del variables

    # ---------------------------------------------------------------- checkpoints and resume
    try:
        restored = ckpt.restore(state, step=latest)
    except ValueError as err:
        raise ConfigError(f"{err}; use another --workdir or the original settings") from err
    if restored is not None:
        state, _ = restored
        log.info("resumed from %s at step %d", ckpt.directory, int(state.step))
    if is_main:
        checkpoint.write_class_names(workdir, source.class_names)
    start_step = int(state.step)
    # An evaluation a resumed run does first: the final one if training is already complete, or
    # that of an epoch whose last step a signal checkpointed before evaluating (no eval metrics).
    redo_eval = restored is not None and (
        start_step >= total_steps
        or (start_step % steps_per_epoch == 0 and not ckpt.metrics(start_step))
    )

    # ---------------------------------------------------------------- compiled steps
    train_step = train.parallelize(
        train.make_train_step(
            model,
            tx,
            schedule=schedule,
            label_smoothing=cfg.label_smoothing,
            trainable=mask,
        ),
        mesh,
        kind=cfg.parallel,
    )
    eval_step = train.parallelize(
        train.make_eval_step(model),
        mesh,
        kind=cfg.parallel,
        donate=False,
        out_specs=train.EVAL_OUT_SPECS,
    )
    state = train.place_state(state, mesh, cfg.parallel)

    def run_eval(epoch: int) -> EvalResult:
        batches = data.eval_batches(
            source,
            batch_size=per_process_eval_batch,
            image_size=cfg.image_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            num_workers=cfg.num_workers,
        )
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        result = evaluate(
            eval_step, variables, batches, mesh, cfg.parallel, num_classes, stop=stop.agreed
        )
        if writer:
            writer.write(step, {"epoch": epoch, **result.as_metrics()})
        log.info(
            "epoch %d step %d: val loss %.4f  top-1 %.4f  top-5 %.4f (%d images)",
            epoch, step, result.loss, result.top1, result.top5, result.count,
        )  # fmt: skip
        return result

    def save(metrics: dict | None = None) -> None:
        # One copy of the state: pmap's per-device stack would not restore into the plain
        # template (here or in checkpoint.load). shard_map's replicated arrays are saved as is.
        saved = train.fetch_state(state, "pmap") if cfg.parallel == "pmap" else state
        ckpt.save(step, saved, metadata=metadata, metrics=metrics, force=True)

    def checkpoint_and_exit(signum: int) -> NoReturn:
        save()  # no metrics: a rerun evaluates this step first if it ends an epoch (redo_eval)
        ckpt.wait()
        log.warning("checkpoint written at step %d; exiting", step)
        raise SystemExit(128 + signum)

    # ---------------------------------------------------------------- loop
    writer = MetricsWriter(workdir, start_step, redo_eval=redo_eval) if is_main else None
    stop = _StopRequest()
    step = start_step
    result: EvalResult | None = None
    streak = int(train.fetch_state(state.nonfinite_streak, cfg.parallel))
    progress = _ProgressBar(total_steps, start_step, is_main)
    try:
        if redo_eval:
            if step >= total_steps:
                log.info("training already complete at step %d; evaluating", step)
            try:
                result = run_eval((step - 1) // steps_per_epoch)
            except EvalInterrupted as stopped:  # nothing new to save: the rerun evaluates again
                log.warning("evaluation at step %d abandoned; exiting", step)
                raise SystemExit(128 + stopped.signum) from None
        while step < total_steps:
            epoch, first_batch = divmod(step, steps_per_epoch)
            batches = iter(
                data.train_batches(
                    source,
                    batch_size=per_process_batch,
                    image_size=cfg.image_size,
                    seed=cfg.seed,
                    epoch=epoch,
                    start_batch=first_batch,
                    process_index=jax.process_index(),
                    process_count=jax.process_count(),
                    num_workers=cfg.num_workers,
                    normalize=False,  # uint8: a quarter of the bytes; the step normalises
                )
            )
            tick = time.perf_counter()
            inputs = _next_on_device(batches, mesh, cfg.parallel)
            while inputs is not None:
                state, metrics = train_step(state, inputs)
                # The next batch is read and copied to the devices while this step runs (the
                # step is dispatched asynchronously; reading its metrics waits for it), so an
                # accelerator does not idle for the copy. Past the last step, one batch is
                # read for nothing.
                inputs = _next_on_device(batches, mesh, cfg.parallel)
                metrics = train.fetch_state(metrics, cfg.parallel)
                step += 1
                now = time.perf_counter()
                record = {f"train_{k}": float(v) for k, v in metrics.items()}
                record["images_per_sec"] = cfg.batch_size / (now - tick)
                tick = now
                if writer:
                    writer.write(step, {"epoch": epoch, **record})
                progress.update(record)
                streak = streak + 1 if metrics["nonfinite"] else 0
                if streak >= cfg.max_nonfinite:
                    raise NonFiniteError(
                        f"{streak} consecutive steps had a non-finite loss or gradient (last at "
                        f"step {step}); stopping. The last good checkpoint "
                        f"(step {ckpt.latest_step()}) in {ckpt.directory} is intact: lower --lr "
                        "or check the data."
                    )
                signum = stop.agreed()
                if signum is not None:
                    checkpoint_and_exit(signum)
                end_of_epoch = step % steps_per_epoch == 0
                if step >= total_steps or end_of_epoch:
                    break
                if cfg.checkpoint_every is not None and step % cfg.checkpoint_every == 0:
                    save()
            try:
                result = run_eval(epoch)
            except EvalInterrupted as stopped:
                checkpoint_and_exit(stopped.signum)
            save({"val_accuracy": result.top1, **result.as_metrics()})
    finally:
        stop.restore()
        progress.close()
        ckpt.close()
        if writer:
            writer.close()
    final = {"step": step, "epochs_completed": step / steps_per_epoch}
    if result is not None:
        final.update(result.as_metrics())
    if writer and writer.path.exists():
        plot_curves(writer.path, workdir / "curves.png")
    return final


def _next_on_device(batches: Iterator[dict], mesh: jax.sharding.Mesh, parallel: str) -> dict | None:
    """The next training batch placed on the devices for the step, or None when none is left."""
    batch = next(batches, None)
    return None if batch is None else train.prepare_batch(batch, mesh, parallel)


# Options a resumed run must share with the checkpoint's: they define the model, the data and
# its train/held-out split (seed, val_fraction), the batches and the schedule, so resuming with
# another value would silently continue a different run (validation images leaking into
# training, a schedule of another length, a model in another precision). `pretrained` is only
# read at the start, so another value would be silently ignored. Everything else may change on
# resume: how long to train (max_steps), where things are (workdir, tfds_data_dir,
# tfds_manual_dir), how it runs (parallel, num_workers, eval_batch_size) and bookkeeping
# (checkpoint_every, keep_checkpoints, max_nonfinite). `trainable` is compared as the parsed
# stage list (`_check_resumable`).
RESUME_MUST_MATCH = (
    "arch", "dataset", "data_dir", "val_fraction", "seed", "image_size", "batch_size", "epochs",
    "lr", "warmup_epochs", "weight_decay", "label_smoothing", "optimizer", "precision",
    "pretrained", "freeze", "head_lr_multiplier",
)  # fmt: skip


def _resume_settings(config: dict) -> dict[str, Any]:
    """The RESUME_MUST_MATCH options of a config dict, paths resolved (relative to the current
    directory), the TFDS name replaced when image folders are read instead (it is unused)."""
    settings = {key: config.get(key, "(not recorded)") for key in RESUME_MUST_MATCH}
    for key in ("data_dir", "pretrained"):
        if isinstance(settings[key], str):
            settings[key] = str(Path(settings[key]).resolve())
    if settings["data_dir"] is not None:
        settings["dataset"] = "(image folders)"
    return settings


def _check_same_settings(saved_config: dict | None, cfg: TrainConfig, where: Path) -> None:
    """Refuse to resume from the checkpoint `where` when a RESUME_MUST_MATCH option differs,
    listing every difference (saved value vs this run's)."""
    saved = _resume_settings(saved_config or {})
    now = _resume_settings(dataclasses.asdict(cfg))
    diffs = [
        f"--{key.replace('_', '-')} {saved[key]} (now {now[key]})"
        for key in RESUME_MUST_MATCH
        if saved[key] != now[key]
    ]
    if diffs:
        raise ConfigError(
            f"{where} was written with other settings: {'; '.join(diffs)}. Rerun with the "
            "saved settings to resume, or use another --workdir"
        )


def _check_resumable(saved: dict, current: dict, workdir: Path) -> None:
    """Refuse to resume a run whose classes or batch layout differ from the command's."""
    for key in ("arch", "num_classes", "class_names", "steps_per_epoch", "trainable"):
        if saved.get(key) != current[key]:
            raise ConfigError(
                f"{workdir} holds a checkpoint with {key}={saved.get(key)!r} but this run has "
                f"{key}={current[key]!r}; use another --workdir or the original settings"
            )


class _ProgressBar:
    """tqdm bar over steps with loss, accuracy and images/s (process 0 only)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step")

    def update(self, record: dict[str, float]) -> None:
        self._bar.set_postfix(
            loss=f"{record['train_loss']:.4f}",
            acc=f"{record['train_accuracy']:.3f}",
            img_s=f"{record['images_per_sec']:.1f}",
            refresh=False,
        )
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def describe(final: dict[str, Any]) -> str:
    """One line summary of `fit`'s result."""
    parts = [f"step {final['step']}", f"epochs {final['epochs_completed']:.2f}"]
    for key in ("val_loss", "val_accuracy", "val_top5"):
        if key in final and math.isfinite(final[key]):
            parts.append(f"{key} {final[key]:.4f}")
    return ", ".join(parts)
