"""Training checkpoints on orbax: `TrainCheckpointer` saves, keeps and restores the full training
state under `<workdir>/checkpoints/<step>/` (layout in `model_dir`), resumes from the latest and
keeps the best by a metric. Every step directory is written to `<step>.orbax-checkpoint-tmp` and
renamed into place only once complete, so an interrupted write is never mistaken for a
checkpoint. `model_dir.load` reads the steps written here for evaluation and inference.
"""

from __future__ import annotations

import operator
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from resnet_jax import model_dir, models
from resnet_jax.model_dir import META_ITEM, STATE_ITEM


def _numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """`metrics` as {name: float} (numpy/jax scalars accepted), or raise naming the bad entry."""
    out = {}
    for name, value in metrics.items():
        try:
            out[str(name)] = float(value)
        except (TypeError, ValueError) as e:
            raise TypeError(f"metrics[{name!r}] must be a number, got {value!r}") from e
    return out


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions, ...); earlier ones are intact."""

    def __init__(self, message: str, *, step: int | None, directory: Path) -> None:
        super().__init__(message)
        self.step = step
        self.directory = directory


class TrainCheckpointer:
    """Training checkpoints under `workdir/checkpoints`, kept by recency and by a best metric.

    Retention: the last `max_to_keep` checkpoints, plus (with `keep_best`) the one with the
    highest `metrics[best_metric]` ever saved, via orbax's LatestN + BestN preservation policies.
    Saving is asynchronous (arrays are copied to host before `save` returns, so donating the
    state's buffers afterwards is safe); `wait()` / `close()` block until everything is on disk.
    A failed write (background or not) is raised as `CheckpointWriteError` by the next `save`,
    `wait` or `close`, naming the step, the directory, the cause and the last complete checkpoint,
    which stays intact. Multi-host: every process must make the same calls; orbax coordinates
    who writes what.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        max_to_keep: int = 3,
        keep_best: bool = True,
        best_metric: str = model_dir.DEFAULT_BEST_METRIC,
        save_interval_steps: int | None = None,
        async_save: bool = True,
    ) -> None:
        """Open (or create) the checkpoint directory; raise OSError if it cannot be written."""
        if not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ValueError(f"max_to_keep must be an int >= 1, got {max_to_keep!r}")
        if save_interval_steps is not None and (
            not isinstance(save_interval_steps, int) or save_interval_steps < 1
        ):
            raise ValueError(f"save_interval_steps must be None or >= 1, got {save_interval_steps}")
        self.workdir = Path(workdir).absolute()  # orbax refuses relative paths
        self.directory = self.workdir / model_dir.CHECKPOINTS_DIR
        self.best_metric = best_metric
        self._pending: int | None = None  # the step of the last save not yet known to be done
        _ensure_writable(self.directory)

        policies: list[ocp.checkpoint_managers.PreservationPolicy] = [
            ocp.checkpoint_managers.LatestN(n=max_to_keep)
        ]
        if keep_best:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=self._score, n=1, keep_checkpoints_without_metrics=False
                )
            )
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps or 1,
            best_fn=self._score,
            best_mode="max",
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, metadata={"best_metric": best_metric}
        )
        recorded = self._manager.metadata().custom_metadata.get("best_metric", best_metric)
        if recorded != best_metric:
            self._manager.close()
            raise ValueError(
                f"{self.directory} was created with best_metric={recorded!r}, not "
                f"{best_metric!r}; use the original metric or a new workdir"
            )

    def _score(self, metrics: Mapping[str, Any]) -> float:
        return model_dir.metric_score(metrics, self.best_metric)

    def save(
        self,
        step: int,
        state: Any,
        *,
        metadata: dict,
        metrics: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Save `state` (any pytree of arrays) at `step`; returns False if skipped by the save
        interval (or because `step` is not after the latest). `metadata` must name the `arch`;
        `metrics`, if given, must contain `best_metric`. `force` ignores the interval."""
        step = operator.index(step)
        if not isinstance(metadata, Mapping) or "arch" not in metadata:
            raise ValueError("metadata must be a dict with at least an 'arch' key")
        models.check_arch(metadata["arch"])
        meta = model_dir.json_round_trip(dict(metadata), "metadata")
        if metrics is not None:
            if self.best_metric not in metrics:
                raise ValueError(
                    f"metrics {sorted(metrics)} lack best_metric {self.best_metric!r}; pass it "
                    "or save with metrics=None"
                )
            metrics = _numeric_metrics(metrics)
        self._finish_pending()
        try:
            saved = self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)}
                ),
                metrics=metrics,
                force=force,
            )
        except OSError as e:
            raise self._write_error(step, e) from e
        if saved:
            self._pending = step
        return saved

    def all_steps(self) -> list[int]:
        """Steps currently on disk (or being written), ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The most recent step, or None if there is no checkpoint."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the highest `best_metric` (latest wins ties), or None if no kept
        checkpoint was saved with metrics."""
        return self._manager.best_step()

    def metrics(self, step: int) -> dict | None:
        """The metrics saved with `step`, or None."""
        return self._manager.metrics(step)

    def metadata(self, step: int) -> dict:
        """The metadata saved with `step` (arch, config, class names, ...), read without
        restoring the state; ValueError naming the file if it is missing or unreadable."""
        return model_dir.read_metadata(self.directory / str(step))

    def restore(self, state_template: Any, step: int | None = None) -> tuple[Any, dict] | None:
        """Restore `(state, metadata)` at `step` (default latest) into the structure, dtypes and
        shardings of `state_template` (arrays or ShapeDtypeStructs); None if no checkpoint."""
        if step is None:
            step = self.latest_step()
            if step is None:
                return None
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; steps: {self.all_steps()}"
            )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        STATE_ITEM: ocp.args.StandardRestore(abstract),
                        META_ITEM: ocp.args.JsonRestore(),
                    }
                ),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{self.directory / str(step)}: checkpoint does not match the state template: {e}"
            ) from e
        return restored[STATE_ITEM], dict(restored[META_ITEM])

    def wait(self) -> None:
        """Block until pending saves (and deletions) are durable; raise `CheckpointWriteError` if
        one failed."""
        self._finish_pending()

    def close(self) -> None:
        """Wait for pending work (raising `CheckpointWriteError` if it failed) and release
        orbax's background resources."""
        try:
            self._finish_pending()
        finally:
            self._manager.close()

    def _finish_pending(self) -> None:
        """Wait for the background save; turn its failure into a `CheckpointWriteError`."""
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:  # anything failing here is the write of `step`
            raise self._write_error(step, e) from e

    def _write_error(self, step: int | None, cause: BaseException) -> CheckpointWriteError:
        """The error for a failed write of `step`, naming the cause and what is still intact."""
        what = "a checkpoint" if step is None else f"checkpoint step {step}"
        reason = str(cause) if isinstance(cause, OSError) else f"{type(cause).__name__}: {cause}"
        latest = self._manager.latest_step()  # orbax forgets a step whose write failed
        intact = (
            "no checkpoint was completed before it"
            if latest is None
            else f"the last complete checkpoint, step {latest}, is intact"
        )
        return CheckpointWriteError(
            f"could not write {what} to {self.directory} ({reason}); {intact}. Free space or fix "
            "permissions there, then rerun to resume",
            step=step,
            directory=self.directory,
        )

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ensure_writable(directory: Path) -> None:
    """Create `directory` and prove a file can be written there, or raise a clear OSError
    (checking by writing, since permission bits say nothing for root or read-only mounts)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_test_"):
            pass
    except OSError as e:
        raise OSError(f"checkpoint directory {directory} cannot be created or written: {e}") from e
