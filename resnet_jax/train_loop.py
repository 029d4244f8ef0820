"""The training loop over a prepared `trainer.Run`: epochs of steps with periodic actions.

`train(run)` runs `Loop` to the run's last step. The loop does not wait for the devices between
log points (every `log_every` steps, at each epoch's end and before every checkpoint): steps
are dispatched asynchronously with the input batches placed two ahead
(`parallel.prefetch_to_device`), each step's metrics stay on the devices, and the steps run
under `jax.transfer_guard_device_to_host("disallow")`, so a stray fetch fails loudly; the
periodic actions (log, evaluate, checkpoint, stop requests) allow transfers explicitly. A log
point fetches the interval's metrics at once, writes one record per step (the log point's
record also holds `images_per_sec` over the interval) and checks them for a run of non-finite
steps. SIGINT/SIGTERM are read from a host flag after every step in a single-process run; a
multi-process run agrees on them with one all-gather per log point (and every `log_every`
evaluation batches), so all processes stop after the same step.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import jax
import numpy as np
from jax.experimental import multihost_utils

from resnet_jax import augment, data, evaluation, parallel
from resnet_jax.metrics_log import MetricsWriter, ProgressBar, plot_curves

if TYPE_CHECKING:
    from resnet_jax.trainer import Run

log = logging.getLogger("resnet_jax")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag (handlers installed until `restore`).

    `poll` says which signal to stop for. In a single-process run it reads the flag (no device
    work, any step). With several processes they must stop after the same step, so `poll` only
    answers at agreed points (`collective=True`, on every process alike): one all-gather of the
    processes' flags; otherwise it returns None.
    """

    def __init__(self, process_count: int | None = None) -> None:
        self.signum: int | None = None
        self.process_count = jax.process_count() if process_count is None else process_count
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        log.warning("received %s: checkpointing soon", signal.Signals(signum).name)

    def poll(self, collective: bool) -> int | None:
        if self.process_count == 1:
            return self.signum
        if not collective:
            return None
        received = multihost_utils.process_allgather(np.int32(self.signum or 0))
        return int(np.max(received)) or None

    def every(self, n: int) -> Callable[[], int | None]:
        """A `poll` for evaluation's `stop` (called before every batch): collective every `n`-th
        call, starting with the first."""
        calls = itertools.count()
        return lambda: self.poll(collective=next(calls) % n == 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _transfers_allowed() -> contextlib.AbstractContextManager:
    """Where a periodic action may fetch from the devices (inside the loop's guard)."""
    return jax.transfer_guard_device_to_host("allow")


class Loop:
    """The training loop over a `Run`: `run_epoch` until done, with the periodic actions `log`,
    `evaluate`, `save` and `checkpoint_and_exit` (each callable alone, e.g. in tests).

    Holds the placed state, the host's step counter, the metrics writer and progress bar
    (process 0) and the stop request.
    """

    def __init__(self, run: Run, stop: StopRequest | None = None) -> None:
        self.run, self.cfg = run, run.config
        self.state = run.state
        self.step = run.start_step
        is_main = jax.process_index() == 0
        workdir = Path(self.cfg.workdir)
        self.writer = MetricsWriter(workdir, self.step, run.redo_eval) if is_main else None
        self.progress = ProgressBar(run.total_steps, self.step, is_main)
        self.stop = StopRequest() if stop is None else stop
        self.streak = int(parallel.fetch_state(self.state.nonfinite_streak, self.cfg.parallel))
        self._tick = time.perf_counter()
        self.ema_result: evaluation.EvalResult | None = None  # set by `evaluate`

    def run_epoch(self) -> evaluation.EvalResult:
        """Train from `step` to the end of its epoch (or the last step), then evaluate and
        checkpoint. Between log points nothing waits for the devices (see the module doc)."""
        run, cfg = self.run, self.cfg
        epoch, first_batch = divmod(self.step, run.steps_per_epoch)
        batches = parallel.prefetch_to_device(self._train_batches(epoch, first_batch),
                                              run.mesh, cfg.parallel, size=2)  # fmt: skip
        pending: list[dict] = []  # this interval's metrics, on the devices
        self._tick = time.perf_counter()
        with jax.transfer_guard_device_to_host("disallow"):
            for inputs in batches:
                self.state, metrics = run.train_step(self.state, inputs)
                self.step += 1
                pending.append(metrics)
                end = self.step % run.steps_per_epoch == 0 or self.step >= run.total_steps
                save = cfg.checkpoint_every is not None and self.step % cfg.checkpoint_every == 0
                if end or save or self.step % cfg.log_every == 0:
                    with _transfers_allowed():
                        self.log(epoch, pending)
                        pending = []
                        signum = self.stop.poll(collective=True)
                        if signum is None and save and not end:
                            self.save()
                else:
                    signum = self.stop.poll(collective=False)
                if signum is not None:
                    with _transfers_allowed():
                        self.log(epoch, pending)
                        self.checkpoint_and_exit(signum)
                if end:
                    break
        try:
            result = self.evaluate(epoch)
        except evaluation.EvalInterrupted as stopped:
            self.checkpoint_and_exit(stopped.signum)
        self.save({"val_accuracy": result.top1, **result.as_metrics(), **self._ema_metrics()})
        return result

    def _ema_metrics(self) -> dict:
        """The last evaluation's EMA metrics, prefixed "ema_" (none without --model-ema)."""
        if self.ema_result is None:
            return {}
        return {"ema_" + k: v for k, v in self.ema_result.as_metrics().items()}

    def _train_batches(self, epoch: int, first_batch: int) -> Iterator[dict]:
        cfg = self.cfg
        return data.train_batches(
            self.run.source,
            batch_size=cfg.update_batch // jax.process_count(),
            augment=augment.TrainAugment(
                crop_size=cfg.train_crop,
                crop_min_scale=cfg.crop_min_scale,
                interpolation=cfg.interpolation or "bilinear",
                auto_augment=cfg.auto_augment,
                ra_magnitude=cfg.ra_magnitude,
                random_erase=cfg.random_erase,
            ),
            ra_reps=cfg.ra_reps,
            devices_per_process=jax.local_device_count(),
            seed=self.cfg.seed,
            epoch=epoch,
            start_batch=first_batch,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            num_workers=self.cfg.num_workers,
            normalize=False,  # uint8: a quarter of the bytes; the step normalises
        )

    def log(self, epoch: int, pending: list[dict]) -> None:
        """Fetch the metrics of the steps up to `step` (`pending`, one dict per step), write one
        record per step, the last with the interval's images/s, and raise NonFiniteError at the
        step where `max_nonfinite` consecutive steps were skipped."""
        if not pending:
            return
        fetched = parallel.fetch_state(pending, self.cfg.parallel)  # waits for the steps
        now = time.perf_counter()  # after the wait: the interval's device time, not its dispatch
        images_per_sec = len(pending) * self.cfg.update_batch / (now - self._tick)
        self._tick = now
        first = self.step - len(pending) + 1
        record: dict[str, Any] = {}
        for step, metrics in enumerate(fetched, first):
            record = {f"train_{k}": float(v) for k, v in metrics.items()}
            if step == self.step:
                record["images_per_sec"] = images_per_sec
            if self.writer:
                self.writer.write(step, {"epoch": epoch, **record})
            self.streak = self.streak + 1 if metrics["nonfinite"] else 0
            if self.streak >= self.cfg.max_nonfinite:
                raise NonFiniteError(
                    f"{self.streak} consecutive steps had a non-finite loss or gradient (last at "
                    f"step {step}); stopping. The last good checkpoint "
                    f"(step {self.run.ckpt.latest_step()}) in {self.run.ckpt.directory} is "
                    "intact: lower --lr or check the data."
                )
        self.progress.update(len(pending), record)

    def evaluate(self, epoch: int) -> evaluation.EvalResult:
        """Evaluate the state on the whole eval split, prepared as `run.preprocessing` says, log
        the result and return it; a stop request is agreed every `log_every` batches
        (EvalInterrupted). With --model-ema the average is evaluated too: its metrics are
        logged and written prefixed "ema_" (`ema_result`), the returned result stays the
        model's."""
        variables = {"params": self.state.params, "batch_stats": self.state.batch_stats}
        result = self._evaluate(epoch, variables, "")
        self.ema_result = None
        if self.state.ema is not None:
            self.ema_result = self._evaluate(epoch, self.state.ema.variables(), "ema_")
        return result

    def _evaluate(self, epoch: int, variables: dict, prefix: str) -> evaluation.EvalResult:
        run, cfg = self.run, self.cfg
        batches = data.eval_batches(
            run.source,
            batch_size=cfg.eval_bs // jax.process_count(),
            preprocessing=run.preprocessing,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            num_workers=cfg.num_workers,
        )
        stop = self.stop.every(cfg.log_every)
        result = evaluation.evaluate(run.eval_step, variables, batches, run.mesh, cfg.parallel,
                                     run.num_classes, stop=stop)  # fmt: skip
        if self.writer:
            metrics = {prefix + k: v for k, v in result.as_metrics().items()}
            self.writer.write(self.step, {"epoch": epoch, **metrics})
        log.info(
            "epoch %d step %d: %sval loss %.4f  top-1 %.4f  top-5 %.4f (%d images)",
            epoch, self.step, prefix.replace("_", " ").upper(), result.loss, result.top1,
            result.top5, result.count,
        )  # fmt: skip
        return result

    def save(self, metrics: dict | None = None) -> None:
        """Checkpoint the state at `step` (with the evaluation's `metrics`, if any)."""
        # One copy of the state: pmap's per-device stack would not restore into the plain
        # template (here or in model_dir.load). shard_map's replicated arrays are saved as is.
        pmap = self.cfg.parallel == "pmap"
        saved = parallel.fetch_state(self.state, "pmap") if pmap else self.state
        self.run.ckpt.save(self.step, saved, metadata=self.run.metadata, metrics=metrics,
                           force=True)  # fmt: skip

    def checkpoint_and_exit(self, signum: int) -> NoReturn:
        """Checkpoint `step` without metrics (a rerun evaluates it first if it ends an epoch),
        wait for the write, and exit with 128 + `signum`."""
        self.save()
        self.run.ckpt.wait()
        log.warning("checkpoint written at step %d; exiting", self.step)
        raise SystemExit(128 + signum)

    def close(self) -> None:
        self.stop.restore()
        self.progress.close()
        self.run.ckpt.close()
        if self.writer:
            self.writer.close()


def train(run: Run) -> dict[str, Any]:
    """Run `Loop` over `run` to its last step; returns the final metrics (last evaluation and
    step counters) and draws workdir/curves.png."""
    loop = Loop(run)
    result = None
    try:
        if run.redo_eval:
            if loop.step >= run.total_steps:
                log.info("training already complete at step %d; evaluating", loop.step)
            try:
                result = loop.evaluate((loop.step - 1) // run.steps_per_epoch)
            except evaluation.EvalInterrupted as stopped:  # nothing new: the rerun evaluates
                log.warning("evaluation at step %d abandoned; exiting", loop.step)
                raise SystemExit(128 + stopped.signum) from None
        while loop.step < run.total_steps:
            result = loop.run_epoch()
    finally:
        loop.close()
    final = {"step": loop.step, "epochs_completed": loop.step / run.steps_per_epoch}
    if result is not None:
        final.update(result.as_metrics())
        final.update(loop._ema_metrics())
    if loop.writer and loop.writer.path.exists():
        plot_curves(loop.writer.path, Path(run.config.workdir) / "curves.png")
    return final
