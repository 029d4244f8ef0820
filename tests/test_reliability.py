"""Faults never lose work or give an unclear error: scripts/train.py under SIGKILL (even while a
checkpoint is being written), SIGTERM, a full disk mid-run and an unusable --workdir.

One chain of launches on one workdir ends bit-identical to an uninterrupted run with the same
seed (same compiled code, same batches, restored optimizer state, so no tolerance is needed):

    A  SIGKILL while checkpoint 2 is being written: only orbax's temporary directory is left,
       and the next launch resumes from checkpoint 1
    B  SIGTERM mid-training: exit 128+15 with a checkpoint at the step it had reached (usually
       an epoch's last, before its evaluation: the next launch evaluates that epoch first)
    C  a file-size limit (a full disk, as far as the writes can tell): the next checkpoint fails,
       the run stops with one line naming the directory and the cause, checkpoints stay intact
    D  runs to the end

All launches share the suite's persistent compilation cache (see conftest.py; kept in pytest's
cache directory, so later sessions skip compiling too), so only the reference run compiles; they
use one CPU device at XLA's default optimisation level, which runs these steps fastest once
compiled.
The slow test kills a run at many more moments.
"""

import errno
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import pytest
from helpers import LAUNCH_TIMEOUT_S, ROOT, SCRIPTS, load_script, metrics_records
from orbax.checkpoint._src.path import atomicity

from resnet_jax import checkpoint, metrics_log, model_dir, models

pytestmark = pytest.mark.launches

TRAIN = SCRIPTS / "train.py"
TRAIN_PER_CLASS, VAL_PER_CLASS = 6, 1  # 24 images: 3 steps per epoch of 8
STEPS_PER_EPOCH, EPOCHS = 3, 2
STEPS = STEPS_PER_EPOCH * EPOCHS
FLAGS = [
    "--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--eval-batch-size", "8",
    "--epochs", str(EPOCHS), "--warmup-epochs", "0", "--checkpoint-every", "1",
    "--num-workers", "1", "--seed", "7", "--keep-checkpoints", str(STEPS),  # keep all to compare
]  # fmt: skip
FILE_SIZE_LIMIT = 1 << 20  # far below a resnet18 checkpoint, far above every other file written
TMP_SUFFIX = ".orbax-checkpoint-tmp"
INTACT = re.compile(
    r"train\.py: error: could not write checkpoint step (\d+) to (\S+) \((.+)\); "
    r"the last complete checkpoint, step (\d+), is intact"
)


class Setup(NamedTuple):
    """Where launches keep their logs, the data they train on, the shared compilation cache."""

    root: Path
    data: Path
    xla_cache: Path


@pytest.fixture(scope="module")
def setup(module_tmp, synthetic_folders: Path) -> Setup:
    """A few of the `synthetic_folders` images, linked: 6 train and 1 val image per class."""
    root = module_tmp("reliability")
    data = root / "data"
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for class_dir in sorted((synthetic_folders / split).iterdir()):
            (data / split / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                (data / split / class_dir.name / image.name).symlink_to(image)
    return Setup(root, data, Path(os.environ["JAX_COMPILATION_CACHE_DIR"]))  # see conftest.py


class _Launch:
    """scripts/train.py as a subprocess, its output in a log file."""

    started_here: list["_Launch"] = []  # killed at the end of the module if still running

    def __init__(
        self,
        name: str,
        workdir: Path,
        setup: Setup,
        prefix: tuple[str, ...] = (),
        flags: tuple[str, ...] = (),
        data: Path | None = None,
    ) -> None:
        self.name, self.workdir = name, workdir
        self.log_path = setup.root / f"{name}.log"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))},
            "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": str(setup.xla_cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "PYTHONUNBUFFERED": "1",
        }
        data = setup.data if data is None else data
        cmd = [*prefix, sys.executable, str(TRAIN), *FLAGS, *flags, "--data-dir", str(data)]
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [*cmd, "--workdir", str(workdir)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            )
        self.started = time.time()
        _Launch.started_here.append(self)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"launch {self.name} still running after {LAUNCH_TIMEOUT_S} s:\n"
                        f"{self.tail()}")  # fmt: skip

    def wait_until(self, condition: Callable[[], bool], what: str, poll_s: float = 0.002) -> None:
        """Poll `condition` until true; fail if the process exits first or it takes too long."""
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"launch {self.name} exited ({self.proc.returncode}) before {what}:\n"
                            f"{self.tail()}")  # fmt: skip
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"launch {self.name}: no {what} after {LAUNCH_TIMEOUT_S} s")
            time.sleep(poll_s)

    def trained_step(self, step: int) -> Callable[[], bool]:
        """Whether this launch has logged training step `step` or a later one."""
        return lambda: any(
            "train_loss" in r and r["step"] >= step and r["time"] >= self.started
            for r in metrics_records(self.workdir, complete_only=True)
        )

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL
        self.proc.wait()

    def tail(self, chars: int = 4000) -> str:
        return self.log()[-chars:]


@pytest.fixture(scope="module", autouse=True)
def _no_launch_outlives_the_module():
    yield
    for launch in _Launch.started_here:
        if launch.proc.poll() is None:
            launch.kill()
    _Launch.started_here.clear()


def _step_dirs(workdir: Path) -> list[str]:
    """The names in workdir/checkpoints (none before a run has created it)."""
    checkpoints = workdir / "checkpoints"
    if not checkpoints.is_dir():
        return []
    return sorted(p.name for p in checkpoints.iterdir() if p.name != "metadata")


def _resumed_at(launch: _Launch) -> int | None:
    found = re.findall(
        rf"resumed from {re.escape(str(launch.workdir / 'checkpoints'))} at step (\d+)",
        launch.log(),
    )
    assert len(found) <= 1, found
    return int(found[0]) if found else None


def _assert_same_variables(got: dict, want: dict, where: str = "") -> None:
    """params and batch_stats are bit-identical."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for collection in ("params", "batch_stats"):
        leaves = jax.tree_util.tree_leaves_with_path(got[collection])
        assert len(leaves) > 0
        for (path, a), b in zip(leaves, jax.tree.leaves(want[collection]), strict=True):
            a, b = np.asarray(a), np.asarray(b)
            assert a.dtype == b.dtype and np.array_equal(a, b), (
                f"{where}{collection}{jax.tree_util.keystr(path)} differs from the "
                f"uninterrupted run (max |diff| {np.abs(a - b).max()})"
            )


def _comparable(records: list[dict]) -> list[dict]:
    """metrics.jsonl records without the wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in ("time", "images_per_sec")} for r in records]


def _sources_digest() -> str:
    """Hash of the code every launch runs (an edit mid-test would make the runs incomparable)."""
    files = sorted([*(ROOT / "resnet_jax").glob("*.py"), TRAIN])
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


@pytest.fixture(scope="module")
def reference(setup: Setup) -> Path:
    """The uninterrupted run (it also fills the compilation cache for every later launch)."""
    (setup.root / "sources.sha256").write_text(_sources_digest())
    run = _Launch("reference", setup.root / "reference", setup)
    assert run.wait() == 0, run.tail()
    assert f"done: step {STEPS}" in run.log()
    return run.workdir


@pytest.fixture(scope="module")
def chain(setup: Setup, reference: Path) -> dict:
    """Launches A..D of the module docstring on one workdir, with what was seen between them."""
    workdir = setup.root / "chain"
    seen: dict = {"workdir": workdir}

    # A: SIGKILL as soon as orbax starts writing checkpoint 2 (a --checkpoint-every one).
    a = _Launch("A", workdir, setup)
    tmp2 = workdir / "checkpoints" / f"2{TMP_SUFFIX}"
    a.wait_until(tmp2.exists, "checkpoint 2's temporary directory")
    a.kill()
    seen["after_A"] = _step_dirs(workdir)
    seen["latest_after_A"] = model_dir.load(workdir, which="latest").step

    # B: SIGTERM while it computes step 3, the last of epoch 0 (a step takes over a second here):
    # it stops right after it, before that epoch's evaluation, which the next launch runs first.
    b = _Launch("B", workdir, setup)
    b.wait_until(b.trained_step(2), "training step 2", poll_s=0.01)
    time.sleep(0.25)  # past the check that follows step 2
    b.proc.send_signal(signal.SIGTERM)
    seen["B_code"] = b.wait()
    seen["after_B"] = _step_dirs(workdir)
    seen["latest_after_B"] = model_dir.load(workdir, which="latest").step
    seen["records_after_B"] = metrics_records(workdir)

    # C: every file it writes is limited to 1 MiB (ulimit -f counts KiB), so its first
    # checkpoint cannot be written. Python ignores SIGXFSZ: the write fails with EFBIG.
    ulimit = ("/bin/sh", "-c", f'ulimit -f {FILE_SIZE_LIMIT // 1024} && exec "$0" "$@"')
    c = _Launch("C", workdir, setup, prefix=ulimit)
    seen["C_code"] = c.wait()
    seen["loaded_after_C"] = model_dir.load(workdir, which="latest")

    # D: finishes.
    d = _Launch("D", workdir, setup)
    seen["D_code"] = d.wait()
    seen["launches"] = {x.name: x for x in (a, b, c, d)}
    return seen


def test_sigkill_while_writing_a_checkpoint_leaves_it_unused(chain):
    """The half-written checkpoint is a temporary directory that nothing loads, and the next
    launch resumes from the last complete checkpoint and removes it."""
    assert f"2{TMP_SUFFIX}" in chain["after_A"]
    assert "2" not in chain["after_A"] and "1" in chain["after_A"]
    assert chain["latest_after_A"] == 1  # model_dir.load ignores it too
    assert _resumed_at(chain["launches"]["B"]) == 1
    assert not [name for name in chain["after_B"] if TMP_SUFFIX in name]


def test_sigterm_checkpoints_the_step_reached_and_the_rerun_resumes_there(chain):
    launches = chain["launches"]
    assert chain["B_code"] == 128 + signal.SIGTERM, launches["B"].tail()
    assert "Traceback" not in launches["B"].log()
    stopped = re.findall(r"checkpoint written at step (\d+); exiting", launches["B"].log())
    assert len(stopped) == 1, launches["B"].tail()
    stop_step = int(stopped[0])
    assert 2 <= stop_step < STEPS
    trained = [r["step"] for r in chain["records_after_B"] if "train_loss" in r]
    assert trained == list(range(1, stop_step + 1))  # the step it had reached
    assert chain["latest_after_B"] == stop_step and str(stop_step) in chain["after_B"]
    assert _resumed_at(launches["C"]) == stop_step
    if stop_step % STEPS_PER_EPOCH == 0:  # the skipped evaluation comes first
        first = re.search(r"epoch (\d+) step (\d+): val loss", launches["C"].log())
        assert first and int(first[2]) == stop_step, launches["C"].tail()


def test_full_disk_mid_run_is_one_clear_line_and_keeps_the_checkpoints(chain, reference):
    launch = chain["launches"]["C"]
    assert chain["C_code"] == 1, launch.tail()
    # One line says what happened, not a traceback. Around it orbax logs its threads' failures,
    # which can end up on the same line of the merged output: look for the message anywhere.
    log = launch.log()
    assert log.count("train.py: error") == 1, launch.tail()
    # no frame of the project's own code (site-packages frames of orbax's threads may appear,
    # and the clone's directory may itself be called resnet_jax)
    own_code = re.escape(str(ROOT)) + r"/(resnet_jax|scripts)/"
    assert not re.search(rf'File "{own_code}', log), launch.tail()
    match = INTACT.search(log)
    assert match, launch.tail()
    failed, directory, cause, intact = match.groups()
    error = log[match.start() :].split("\n", 1)[0]
    start = _resumed_at(launch)
    assert directory == str(chain["workdir"] / "checkpoints")
    assert "File too large" in cause
    loaded = chain["loaded_after_C"]  # the latest complete checkpoint, read right after C
    assert int(failed) == start + 1 and int(intact) == start == loaded.step
    assert "rerun to resume" in error
    _assert_same_variables(loaded.variables, model_dir.load(reference, step=start).variables)
    assert _resumed_at(chain["launches"]["D"]) == start


def test_interrupted_chain_ends_bit_identical_to_an_uninterrupted_run(chain, reference):
    launch = chain["launches"]["D"]
    assert chain["D_code"] == 0, launch.tail()
    assert f"done: step {STEPS}" in launch.log()
    assert _resumed_at(launch) == chain["loaded_after_C"].step
    _assert_finished_like(chain["workdir"], reference)


def _assert_finished_like(workdir: Path, reference: Path) -> None:
    """`workdir` holds a finished run bit-identical to the reference, and the same metrics."""
    assert _sources_digest() == (reference.parent / "sources.sha256").read_text(), (
        "resnet_jax/ or scripts/train.py changed while this test ran: rerun it"
    )
    kept = set(_step_dirs(workdir))
    assert not [name for name in kept if not name.isdigit()], kept  # no temporary dirs left
    assert sorted(kept) == _step_dirs(reference) == [str(s) for s in range(1, STEPS + 1)]
    for step in range(1, STEPS + 1):
        got, want = (model_dir.load(w, step=step).variables for w in (workdir, reference))
        _assert_same_variables(got, want, f"step {step}: ")
    # The same batches in the same order: every step's loss and accuracy, once each, and the
    # evaluations at each epoch's end (also one a SIGTERM at an epoch's last step postponed).
    assert _comparable(metrics_records(workdir)) == _comparable(metrics_records(reference))
    train_steps = [r["step"] for r in metrics_records(workdir) if "train_loss" in r]
    assert train_steps == list(range(1, STEPS + 1))
    # Training really moves the weights from step to step, so equality is not trivially true.
    earlier, last = (model_dir.load(reference, step=s).variables for s in (STEPS - 1, STEPS))
    assert not np.array_equal(earlier["params"]["fc"]["kernel"], last["params"]["fc"]["kernel"])


def _evaluated(launch: _Launch, step: int) -> Callable[[], bool]:
    """Whether this launch has logged the evaluation at `step`."""
    return lambda: any(
        "val_loss" in r and r["step"] == step and r["time"] >= launch.started
        for r in metrics_records(launch.workdir, complete_only=True)
    )


def _writing(launch: _Launch, step: int) -> Callable[[], bool]:
    """Whether orbax is writing checkpoint `step` (its temporary directory exists)."""
    return (launch.workdir / "checkpoints" / f"{step}{TMP_SUFFIX}").exists


@pytest.mark.slow
def test_sigkill_at_many_moments_then_finishes_bit_identical(setup, reference):
    """SIGKILL during start-up, during the first checkpoint ever, right after a step, between an
    evaluation and its checkpoint, during a later checkpoint, then let it finish."""
    workdir = setup.root / "many_kills"
    moments = [
        ("start-up", lambda run: lambda: time.time() > run.started + 3),
        ("writing checkpoint 1", lambda run: _writing(run, 1)),
        ("training step 2 logged", lambda run: run.trained_step(2)),
        ("evaluation at step 3 logged", lambda run: _evaluated(run, 3)),
        ("writing checkpoint 4", lambda run: _writing(run, 4)),
        ("training step 5 logged", lambda run: run.trained_step(5)),
    ]
    for i, (what, condition) in enumerate(moments):
        run = _Launch(f"kill{i}", workdir, setup)
        run.wait_until(condition(run), what)
        run.kill()
        complete = [int(name) for name in _step_dirs(workdir) if name.isdigit()]
        if complete:  # whatever the moment, the newest finished step directory loads
            assert model_dir.load(workdir, which="latest").step == max(complete), what
    last = _Launch("finish", workdir, setup)
    assert last.wait() == 0, last.tail()
    assert f"done: step {STEPS}" in last.log()
    _assert_finished_like(workdir, reference)


# ------------------------------------------------------------------------------------------------
# Workdir problems found before anything is compiled, and failed writes, in this process


def _refuse_to_compile(monkeypatch) -> None:
    """Make reaching model initialisation or step compilation fail the test."""
    from resnet_jax import parallel

    def forbidden(*args, **kwargs):
        raise AssertionError("got past the workdir check")

    monkeypatch.setattr(models, "init_variables", forbidden)
    monkeypatch.setattr(parallel, "parallelize", forbidden)


@pytest.mark.parametrize("problem", ["parent is a file", "not writable"])
def test_unusable_workdir_is_a_one_line_usage_error_before_compiling(
    problem, tmp_path, capsys, monkeypatch
):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    workdir = blocker / "run" if problem == "parent is a file" else tmp_path / "readonly"
    script = load_script("train.py")
    _refuse_to_compile(monkeypatch)
    with monkeypatch.context() as patch, pytest.raises(SystemExit) as exit_info:
        if problem == "not writable":  # root ignores permission bits: make the probe fail
            workdir.mkdir()

            def denied(*args, dir=None, **kwargs):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))

            patch.setattr(checkpoint.tempfile, "NamedTemporaryFile", denied)
        script.main(["--data-dir", str(tmp_path), "--workdir", str(workdir), "--arch", "resnet18"])
    assert exit_info.value.code == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    expected_errno = errno.ENOTDIR if problem == "parent is a file" else errno.EACCES
    assert error.endswith(  # "train.py: error: ..." (the program name is pytest's here)
        f": error: --workdir {workdir}: checkpoint directory {workdir / 'checkpoints'} cannot be "
        f"created or written: [Errno {expected_errno}] {os.strerror(expected_errno)}: "
        f"'{workdir / 'checkpoints'}'"
    )


def _state(value: float) -> dict:
    rng = np.random.default_rng(int(value))
    return {
        "params": {"w": rng.normal(size=(256, 256)).astype(np.float32) * value},
        "batch_stats": {"mean": np.full(4, value, np.float32)},
    }


def test_failed_background_write_names_step_directory_and_cause(tmp_path, monkeypatch):
    """A save failing in the background (here the disk fills up before the final rename) is
    raised by the next save or by wait(), with the earlier checkpoints intact and loadable."""
    meta = {"arch": "resnet18"}
    ckpt = checkpoint.TrainCheckpointer(tmp_path, max_to_keep=2)
    for step in (1, 2):
        ckpt.save(step, _state(step), metadata=meta)
    ckpt.wait()

    async def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomicity.async_path, "rename", disk_full)
    directory = tmp_path / "checkpoints"
    for failing in (3, 4):
        assert ckpt.save(failing, _state(failing), metadata=meta)  # the write is in background
        with pytest.raises(checkpoint.CheckpointWriteError) as err:
            if failing == 3:  # the next save reports it (and does not start)
                ckpt.save(4, _state(4), metadata=meta)
            else:
                ckpt.wait()
        assert isinstance(err.value, OSError)
        assert (err.value.step, err.value.directory) == (failing, directory)
        assert str(err.value).startswith(
            f"could not write checkpoint step {failing} to {directory} ([Errno 28] No space left "
            "on device); the last complete checkpoint, step 2, is intact."
        )
        assert ckpt.latest_step() == 2
    monkeypatch.undo()
    ckpt.close()  # each failure was reported once
    assert sorted(p.name for p in directory.iterdir()) == [
        "1", "2", f"3{TMP_SUFFIX}", f"4{TMP_SUFFIX}", "metadata",
    ]  # fmt: skip
    with checkpoint.TrainCheckpointer(tmp_path, max_to_keep=2) as reopened:
        assert reopened.all_steps() == [1, 2]  # retention deleted nothing for the failed saves
        for step in (1, 2):
            restored, saved_meta = reopened.restore(_state(0), step=step)
            assert saved_meta == meta
            jax.tree.map(np.testing.assert_array_equal, restored, _state(step))


def test_failed_write_before_any_checkpoint_says_so(tmp_path, monkeypatch):
    async def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomicity.async_path, "rename", disk_full)
    ckpt = checkpoint.TrainCheckpointer(tmp_path)
    ckpt.save(1, _state(1), metadata={"arch": "resnet18"})
    with pytest.raises(checkpoint.CheckpointWriteError, match="no checkpoint was completed"):
        ckpt.close()
    assert ckpt.latest_step() is None


def test_resumed_metrics_drop_what_was_logged_after_the_checkpoint(tmp_path):
    """A killed run's records after its last checkpoint, and a line cut short, are dropped (the
    resumed run logs them again); the evaluation at the resumed step only if it is redone."""
    lines = [
        '{"step": 1, "train_loss": 2.0}',
        '{"step": 2, "train_loss": 1.9}',
        '{"step": 2, "val_loss": 1.5}',
        '{"step": 3, "train_loss": 1.8}',
        '{"step": 4, "train_lo',
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines))
    metrics_log.keep_records_up_to(path, 2)
    assert path.read_text() == "".join(line + "\n" for line in lines[:3])
    metrics_log.keep_records_up_to(path, 2, drop_eval_at_step=True)
    assert path.read_text() == "".join(line + "\n" for line in lines[:2])
    path.write_text(lines[0])  # complete, but the kill came before its newline
    metrics_log.keep_records_up_to(path, 5)
    assert path.read_text() == lines[0] + "\n"


# Every torchvision-reference option on (tiny sizes). Repeated augmentation keeps RASampler's
# n // 256 * 256 examples per epoch (repetitions included), so this run reads 256 training
# images (64 per class, each of the fixture's 12 linked several times): 256 / (8 x 2) = 16
# optimizer steps per epoch.
EVERY_OPTION = (
    "--auto-augment", "ta_wide", "--random-erase", "0.25", "--mixup-alpha", "0.2",
    "--cutmix-alpha", "1.0", "--model-ema", "--model-ema-steps", "3", "--accum-steps", "2",
    "--ra-reps", "2", "--clip-grad-norm", "1.0", "--epochs", "1", "--checkpoint-every", "1000",
    "--train-crop-size", "40", "--val-resize-size", "36", "--lr-warmup-method", "constant",
    "--lr-warmup-decay", "0.1", "--lr-min", "0.001",
    "--norm-weight-decay", "none", "--crop-min-scale", "0.3", "--zero-init-residual",
)  # fmt: skip
EVERY_OPTION_STEPS, EVERY_OPTION_STOP = 16, 7


def test_every_recipe_option_resumes_bit_identical(setup, synthetic_folders):
    """A run with every option on, stopped at --max-steps mid-epoch and rerun without it, ends
    bit-identical (params, BatchNorm statistics and their EMA) to an uninterrupted run; the EMA
    is evaluated beside the model and `load(..., ema=True)` exports it."""
    data = setup.root / "data256"
    for class_dir in sorted((synthetic_folders / "train").iterdir()):
        (data / "train" / class_dir.name).mkdir(parents=True)
        images = sorted(class_dir.iterdir())
        for i in range(64):
            image = images[i % len(images)]
            (data / "train" / class_dir.name / f"{i:02d}{image.suffix}").symlink_to(image)
    (data / "val").symlink_to(setup.data / "val")
    reference, resumed = setup.root / "options_ref", setup.root / "options_resumed"
    run = _Launch("options_ref", reference, setup, flags=EVERY_OPTION, data=data)
    assert run.wait() == 0, run.tail()
    assert "steps/epoch of 16 images" in run.log()
    assert "auto_augment=ta_wide" in run.log()  # the resolved options, logged once
    stop = ("--max-steps", str(EVERY_OPTION_STOP))
    first = _Launch("options_1", resumed, setup, flags=(*EVERY_OPTION, *stop), data=data)
    assert first.wait() == 0, first.tail()
    second = _Launch("options_2", resumed, setup, flags=EVERY_OPTION, data=data)
    assert second.wait() == 0, second.tail()
    assert _resumed_at(second) == EVERY_OPTION_STOP
    for ema in (False, True):
        got, want = (model_dir.load(w, step=EVERY_OPTION_STEPS, ema=ema) for w in
                     (resumed, reference))  # fmt: skip
        _assert_same_variables(got.variables, want.variables, f"ema={ema}: ")
    raw, ema = (model_dir.load(reference, ema=e).variables for e in (False, True))
    assert not np.array_equal(raw["params"]["fc"]["kernel"], ema["params"]["fc"]["kernel"])
    train = [r for r in metrics_records(reference) if "train_loss" in r]
    assert _comparable(train) == _comparable(
        [r for r in metrics_records(resumed) if "train_loss" in r]
    )
    (last,) = [r for r in metrics_records(reference) if "ema_val_accuracy" in r]
    assert last["step"] == EVERY_OPTION_STEPS
    meta = model_dir.load(reference).metadata
    assert meta["config"]["model_ema"] and meta["preprocessing"]["eval_size"] == 32
    assert meta["config"]["crop_min_scale"] == 0.3 and meta["config"]["zero_init_residual"]
    for workdir in (reference, resumed):  # passed: their checkpoints are no longer needed
        shutil.rmtree(workdir)
