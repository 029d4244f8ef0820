"""End to end: scripts/train.py on synthetic image folders (fine-tuning torchvision weights, resume,
evaluate and predict on the result), and argument errors.

`finetuned_run` (2 steps, then resumed to step 3) is the suite's one run over the whole data set."""

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import hub_standin
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import torchvision
from helpers import ROOT, load_script, metrics_records, run_script
from jax.experimental import multihost_utils
from PIL import Image
from test_transfer import _changed_stages

from resnet_jax import (
    checkpoint,
    convert,
    inference,
    model_dir,
    models,
    parallel,
    pretrained_registry,
    train_config,
    trainer,
    transfer,
)

pytestmark = pytest.mark.launches


class FineTuneRun(NamedTuple):
    """`finetuned_run`: the launches, and the workdir as the first one left it."""

    workdir: Path
    weights: Path  # the torchvision-format file it started from
    first: subprocess.CompletedProcess  # trained steps 1-2
    after_first: Path  # a copy of the workdir after `first`, without its checkpoints
    steps_after_first: list[str]  # the checkpoint step directories after `first`
    resumed: subprocess.CompletedProcess  # the same command resumed to step 3


@pytest.fixture(scope="module")
def finetuned_run(module_tmp, synthetic_folders) -> FineTuneRun:
    """The suite's one end-to-end training on a whole data set, `synthetic_folders` (the tests
    below check what it writes, the resume, the fine-tuning, and evaluate.py and predict.py on
    the result): scripts/train.py starts from torchvision resnet18 weights (an
    ImageNet-shaped 1000-class head, non-trivial BatchNorm statistics), replaces the head and
    trains layer4 and the head for 2 steps at 32 px; the same command then resumes to step 3
    (its compilations come from the persistent cache the first launch filled)."""
    root = module_tmp("finetune")
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    weights = root / "resnet18_imagenet.pth"
    torch.save(net.state_dict(), weights)
    workdir = root / "run"
    flags = [
        "--arch", "resnet18", "--pretrained", str(weights), "--freeze", "stages",
        "--trainable", "layer4,fc", "--data-dir", str(synthetic_folders), "--image-size", "32",
        "--batch-size", "8", "--eval-batch-size", "64", "--epochs", "1", "--warmup-epochs", "0",
        "--lr", "0.5", "--workdir", str(workdir),
    ]  # fmt: skip
    first = run_script("train.py", *flags, "--max-steps", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    after_first = root / "after_first"
    shutil.copytree(workdir, after_first, ignore=shutil.ignore_patterns("checkpoints"))
    steps_after_first = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    # JAX's debug log names each compilation loaded from the persistent cache
    resumed = run_script(
        "train.py", *flags, "--max-steps", "3", JAX_DEBUG_LOG_MODULES="jax._src.compiler"
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return FineTuneRun(workdir, weights, first, after_first, steps_after_first, resumed)


def test_train_writes_everything_and_resumes(finetuned_run):
    run = finetuned_run
    out = run.first.stdout + run.first.stderr
    assert "done: step 2" in out
    first = run.after_first  # the workdir as the first launch left it (checkpoints listed)
    assert json.loads((first / "class_names.json").read_text()) == {
        "0": "blue", "1": "green", "2": "red", "3": "yellow",
    }  # fmt: skip
    assert "2" in run.steps_after_first
    assert (first / "curves.png").stat().st_size > 0
    assert list((first / "tensorboard").iterdir())
    records = metrics_records(first)
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2]
    (val,) = [r for r in records if "val_loss" in r]
    assert 0 <= val["val_accuracy"] <= 1

    out = run.resumed.stdout + run.resumed.stderr
    assert "resumed from" in out and "at step 2" in out
    assert "done: step 3" in out
    # the resumed launch compiles nothing: its train and eval steps, like everything else it
    # runs, come from the persistent compilation cache the first launch filled
    assert out.count("Persistent compilation cache hit for 'jit_step'") == 2
    assert "PERSISTENT COMPILATION CACHE MISS" not in out
    records = metrics_records(run.workdir)
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3]
    assert (run.workdir / "checkpoints" / "3").is_dir()


def test_finetune_from_torchvision_file(finetuned_run, synthetic_folders, capsys):
    """The tutorial's flow (`finetuned_run`): torchvision ImageNet-shaped weights
    -> new 4-class head -> train the last stage and the head; everything else must stay exactly
    as loaded, also after the run is resumed."""
    run = finetuned_run
    assert "head has 1000 classes, the data set 4" in run.first.stderr
    loaded = model_dir.load(run.workdir, which="latest")
    assert loaded.num_classes == 4 and loaded.class_names[0] == "blue"
    start = convert.from_torchvision(run.weights, "resnet18")
    start["params"].pop("fc")
    heads = []
    for step in (2, 3):  # the first launch's last checkpoint, and the resumed launch's
        variables = model_dir.load(run.workdir, step=step).variables
        after = {k: dict(v) for k, v in variables.items()}
        heads.append(after["params"].pop("fc"))
        assert heads[-1]["kernel"].shape == (512, 4)
        for collection in ("params", "batch_stats"):
            same, changed = _changed_stages(start[collection], after[collection])
            assert same == {"stem", "layer1", "layer2", "layer3"}, (step, collection)
            assert changed == {"layer4"}, (step, collection)
    _, changed = _changed_stages({"fc": heads[0]}, {"fc": heads[1]})
    assert changed == {"fc"}  # every leaf of the new head trains

    # ... then evaluate and predict with the fine-tuned checkpoint through the CLIs.
    proc = run_script("evaluate.py", "--checkpoint", str(run.workdir), "--data-dir",
                      str(synthetic_folders), "--batch-size", "64", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["count"] == 16 and 0 <= report["top1"] <= 1
    assert sum(c["images"] for c in report["per_class"]) == 16
    photos = sorted((synthetic_folders / "val" / "red").iterdir())[:3]
    args = ["--checkpoint", str(run.workdir), "--top-k", "2", "--json", *map(str, photos)]
    assert load_script("predict.py").main(args) == 0  # its own process: tests/test_eval_predict_cli
    predictions = json.loads(capsys.readouterr().out)
    assert [p["path"] for p in predictions] == [str(p) for p in photos]
    for p in predictions:
        assert {c["class"] for c in p["predictions"]} <= set(loaded.class_names)
        assert p["predictions"][0]["probability"] >= p["predictions"][1]["probability"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "resnet5O"], "Did you mean 'resnet50'"),
        (["--image-size", "16"], "--image-size must be >= 32"),
        (["--batch-size", "6"], "--batch-size 6 is not divisible by the number of devices 4"),
        (
            ["--epochs", "2", "--warmup-epochs", "3"],
            "--warmup-epochs 3.0 must be in [0, --epochs 2]\n",
        ),
        (["--log-every", "0"], "--log-every must be >= 1, got 0"),
        (["--data-dir", "/nonexistent/flowers"], "/nonexistent/flowers"),
        (["--num-processes", "2"], "go together"),
        (["--freeze", "backbone"], "--freeze backbone needs --pretrained"),
        (["--eval-batch-size", "0"], "--eval-batch-size 0 is not divisible"),
        (["--checkpoint-every", "0"], "--checkpoint-every must be >= 1, got 0"),
        (["--checkpoint-every", "-3"], "--checkpoint-every must be >= 1, got -3"),
        (["--num-workers", "0"], "--num-workers must be >= 1, got 0"),
    ],
)
def test_bad_arguments_are_usage_errors_before_compiling(args, message, tmp_path, capsys):
    script = load_script("train.py")
    base = ["--data-dir", str(tmp_path), "--workdir", str(tmp_path / "w")]
    with pytest.raises(SystemExit) as exit_info:
        script.main(base + args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not list((tmp_path / "w").glob("checkpoints/[0-9]*"))


# ------------------------------------------------------------------------------------------------
# trainer.fit in this process on a tiny data set (4 devices, see conftest.py)


@pytest.fixture(scope="module")
def tiny_data(module_tmp) -> Path:
    """Two classes of 6 train and 2 val small JPEGs: 3 steps per epoch of 4 images."""
    root = module_tmp("tiny_data")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for name in ("ant", "bee"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


def _tiny_config(data_dir: Path | str, workdir: Path, **overrides) -> trainer.TrainConfig:
    """resnet18 at 32 px on `tiny_data`, one epoch of 3 steps of 4 images."""
    options = dict(
        arch="resnet18", data_dir=str(data_dir), image_size=32, batch_size=4, epochs=1,
        warmup_epochs=0, num_workers=1, workdir=str(workdir),
    )  # fmt: skip
    return trainer.TrainConfig(**(options | overrides))


def test_pmap_checkpoints_resume_and_load_like_shard_map(tiny_data, tmp_path, monkeypatch):
    """--parallel pmap keeps one state copy per device; its checkpoints hold one copy (the
    plain state's shapes), so a rerun resumes and checkpoint.load reads them. The run is started
    with a relative --data-dir: the checkpoint records it resolved (for evaluate.py)."""
    monkeypatch.chdir(tiny_data)
    workdir = tmp_path / "run"
    final = trainer.fit(_tiny_config("train/..", workdir, parallel="pmap", max_steps=1))
    assert final["step"] == 1
    resumed = trainer.fit(_tiny_config("train/..", workdir, parallel="pmap", max_steps=2))
    assert resumed["step"] == 2
    loaded = model_dir.load(workdir, which="latest")
    assert loaded.step == 2 and loaded.variables["params"]["fc"]["kernel"].shape == (512, 2)
    assert loaded.metadata["config"]["data_dir"] == str(tiny_data)


def test_the_loop_fetches_and_agrees_only_at_log_points(tiny_data, tmp_path, monkeypatch):
    """Between log points (every --log-every 2 steps and at the epoch ends, 3 and 6) the loop
    neither fetches from the devices nor calls a cross-process collective: the steps run under
    a disallowing device-to-host transfer guard, every fetch of metrics or state and every
    all-gather of stop requests (here a pretended 2-process run) happens at a log point or in
    evaluation."""
    run = trainer.prepare(_tiny_config(tiny_data, tmp_path / "run", epochs=2, log_every=2))
    dispatched = [0]
    guarded = []
    events = []
    train_step = run.train_step

    def step(state, batch):
        state, metrics = train_step(state, batch)
        dispatched[0] += 1
        # (host CPU arrays are no transfer, so on CPU the guard is checked as a setting)
        guarded.append(jax.config.jax_transfer_guard_device_to_host)
        return state, metrics

    fetch_state = parallel.fetch_state

    def fetch(tree, *args, **kwargs):
        events.append(("fetch", dispatched[0]))
        return fetch_state(tree, *args, **kwargs)

    def allgather(value):
        events.append(("allgather", dispatched[0]))
        return np.zeros(2, np.int32)

    run.train_step = step
    monkeypatch.setattr(parallel, "fetch_state", fetch)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    loop = trainer.Loop(run, stop=trainer.StopRequest(process_count=2))
    try:
        loop.run_epoch()
        loop.run_epoch()
    finally:
        loop.close()
    assert loop.step == 6 and guarded == ["disallow"] * 6
    assert {at for _, at in events} == {0, 2, 3, 4, 6}  # 0: the restored streak counter
    gathers = [at for what, at in events if what == "allgather"]
    # one per log point, and one per evaluation (a single batch of 4 images)
    assert gathers == [2, 3, 3, 4, 6, 6]
    records = metrics_records(tmp_path / "run")
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4, 5, 6]
    with_speed = [r["step"] for r in records if "images_per_sec" in r]
    assert with_speed == [2, 3, 4, 6]


def test_images_per_sec_counts_the_wait_for_the_steps(tiny_data, tmp_path, monkeypatch):
    """Steps are dispatched asynchronously, so a log point's images/s is timed after its fetch
    has waited for them: when the fetch at the epoch's end (step 3, one step of 4 images after
    the log point at step 2) takes 3 s, that interval reports at most 4 / 3 images/s."""
    run = trainer.prepare(_tiny_config(tiny_data, tmp_path / "run", epochs=1, log_every=2))
    fetch_state = parallel.fetch_state

    def slow_fetch(tree, *args, **kwargs):
        if isinstance(tree, list) and len(tree) == 1:  # the metrics of step 3 alone
            time.sleep(3.0)
        return fetch_state(tree, *args, **kwargs)

    monkeypatch.setattr(parallel, "fetch_state", slow_fetch)
    loop = trainer.Loop(run)
    try:
        loop.run_epoch()
    finally:
        loop.close()
    records = metrics_records(tmp_path / "run")
    speeds = {r["step"]: r["images_per_sec"] for r in records if "images_per_sec" in r}
    assert list(speeds) == [2, 3] and speeds[3] <= 4 / 3.0


def test_flags_come_from_the_config_fields(capsys):
    """Every TrainConfig field is a flag with its field's help; --sync-bn is a switch; the
    default warm-up of a 1-epoch run is none (a 5-epoch default would not fit)."""
    parser = load_script("train.py").build_parser()
    args = vars(parser.parse_args(["--sync-bn", "--log-every", "7", "--epochs", "1"]))
    assert args["sync_bn"] is True and args["log_every"] == 7
    names = {f.name for f in dataclasses.fields(trainer.TrainConfig)}
    config = trainer.TrainConfig(**{k: v for k, v in args.items() if k in names})
    assert config.warmup == 0.0
    config.validate(4)
    assert trainer.TrainConfig(epochs=30).warmup == 5.0
    with pytest.raises(
        trainer.ConfigError, match=r"--warmup-epochs 2 must be in \[0, --epochs 1\]"
    ):
        trainer.TrainConfig(epochs=1, warmup_epochs=2).validate(4)
    help_text = parser.format_help()
    for field in dataclasses.fields(trainer.TrainConfig):
        assert "--" + field.name.replace("_", "-") in help_text
    assert "synchronised BatchNorm" in help_text
    assert "HELP" not in vars(load_script("train.py"))


def _refuse_to_compile(monkeypatch) -> None:
    """Make reaching model initialisation or step compilation fail the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("got past the argument checks")

    monkeypatch.setattr(models, "init_variables", forbidden)
    monkeypatch.setattr(parallel, "parallelize", forbidden)


def test_a_new_head_that_stays_frozen_is_a_usage_error(tiny_data, tmp_path, capsys, monkeypatch):
    """ImageNet-shaped weights on a 2-class data set get a new random head: freezing it (the
    stages to train lack fc) is refused before anything compiles."""
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    _refuse_to_compile(monkeypatch)
    args = [
        "--arch", "resnet18", "--data-dir", str(tiny_data), "--workdir", str(tmp_path / "w"),
        "--pretrained", str(weights), "--freeze", "stages", "--trainable", "layer4",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        load_script("train.py").main(args)
    assert exit_info.value.code == 2
    assert (
        "the pretrained head has 1000 classes, the data set 2, so fc is a new, randomly "
        "initialised layer, but --trainable layer4 keeps it frozen; add fc to --trainable"
    ) in capsys.readouterr().err


def test_a_held_out_fraction_that_rounds_to_no_image_is_a_usage_error(
    tiny_data, tmp_path, monkeypatch
):
    """6 images per class, 5 % held out: round(0.3) = 0 of every class. Refused up front (it
    used to fail after training a whole epoch, on every rerun)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train").symlink_to(tiny_data / "train")
    _refuse_to_compile(monkeypatch)
    config = _tiny_config(tmp_path / "data", tmp_path / "w", val_fraction=0.05)
    with pytest.raises(trainer.ConfigError, match=r"\(0 images held out: 5% .* raise --val-fr"):
        trainer.fit(config)


def _usage_error(args: list[str], capsys) -> str:
    """Run scripts/train.py's main on `args`; assert it is a usage error, return its one line."""
    with pytest.raises(SystemExit) as exit_info:
        load_script("train.py").main(args)
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in line  # the whole message, on the last line
    return line


def test_data_and_checkpoint_problems_are_one_line_usage_errors(
    tiny_data, tmp_path, capsys, monkeypatch
):
    """Problems found after the arguments are parsed (data, an incompatible checkpoint) are
    usage errors too, not tracebacks."""
    import tensorflow_datasets as tfds

    _refuse_to_compile(monkeypatch)
    workdir = ["--arch", "resnet18", "--workdir", str(tmp_path / "w")]
    base = [*workdir, "--data-dir", str(tiny_data), "--batch-size", "4"]
    line = _usage_error([*base, "--batch-size", "16"], capsys)
    assert "--batch-size (x --accum-steps): global batch size 16 exceeds the 12 training" in line

    def offline(self, *args, **kwargs):
        raise ConnectionError("no route to download.tensorflow.org")

    with monkeypatch.context() as patch:
        patch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
        tfds_args = ["--dataset", "tf_flowers", "--tfds-data-dir", str(tmp_path / "tfds")]
        line = _usage_error([*workdir, *tfds_args], capsys)
    assert "could not prepare TFDS dataset 'tf_flowers'" in line

    # A checkpoint of this run's settings whose state is not this code's (another version).
    _fake_checkpoint(_tiny_config(tiny_data, tmp_path / "w"))
    monkeypatch.setattr(models, "init_variables", _fake_init_variables)
    line = _usage_error([*base, "--image-size", "32", "--epochs", "1", "--warmup-epochs", "0"],
                        capsys)  # fmt: skip
    assert "checkpoint does not match the state template" in line
    assert line.endswith("use another --workdir or the original settings")


def _fake_init_variables(model, key, image_size=64):
    """`models.init_variables` without compiling: zeros of the right shapes."""
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), models.variable_shapes(model))


def _fake_checkpoint(cfg: trainer.TrainConfig) -> None:
    """A step-1 checkpoint in `cfg.workdir` with the metadata `fit(cfg)` writes on `tiny_data`
    and a state that is not a training state."""
    metadata = {
        "arch": cfg.arch, "num_classes": 2, "class_names": ["ant", "bee"],
        "image_size": cfg.image_size, "steps_per_epoch": 3, "trainable": list(transfer.STAGES),
        "config": dataclasses.asdict(cfg),
    }  # fmt: skip
    with checkpoint.TrainCheckpointer(cfg.workdir) as ckpt:
        ckpt.save(1, {"params": {"w": np.zeros(3)}}, metadata=metadata)


def test_resuming_with_other_settings_lists_them(tiny_data, tmp_path, monkeypatch):
    """Options that define the run must match the checkpoint's (another seed or
    --val-fraction would move validation images into training); the others may change."""
    _refuse_to_compile(monkeypatch)
    workdir = tmp_path / "w"
    _fake_checkpoint(_tiny_config(tiny_data, workdir, max_steps=1))
    changed = _tiny_config(tiny_data, workdir, seed=3, lr=0.2, optimizer="adamw")
    with pytest.raises(trainer.ConfigError) as err:
        trainer.fit(changed)
    assert str(err.value) == (
        f"{workdir / 'checkpoints' / '1'} was written with other settings: --seed 0 (now 3); "
        "--lr 0.1 (now 0.2); --optimizer sgd (now adamw). Rerun with the saved settings to "
        "resume, or use another --workdir"
    )
    # Allowed: longer, elsewhere (a relative --data-dir naming the same folder), differently
    # run. The checks pass and the fake state is what fails.
    monkeypatch.chdir(tiny_data)
    monkeypatch.setattr(models, "init_variables", _fake_init_variables)
    allowed = _tiny_config(
        "train/..", workdir, max_steps=2, num_workers=2, eval_batch_size=8, parallel="pmap",
        checkpoint_every=1, keep_checkpoints=5, max_nonfinite=3,
    )  # fmt: skip
    with pytest.raises(trainer.ConfigError, match="does not match the state template"):
        trainer.fit(allowed)
    (workdir / "checkpoints" / "1" / "meta" / "metadata").write_text('{"arch": "resn')  # cut short
    with pytest.raises(trainer.ConfigError, match=r"unreadable checkpoint metadata.*--workdir"):
        trainer.fit(allowed)


def test_a_diverging_run_ends_with_one_line(tmp_path, capsys, monkeypatch):
    message = "10 consecutive steps had a non-finite loss or gradient (last at step 12); stopping."

    def diverge(cfg):
        raise trainer.NonFiniteError(message)

    monkeypatch.setattr(trainer, "fit", diverge)
    assert load_script("train.py").main(["--workdir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip().endswith(f": error: {message}")


def test_tfds_manual_dir_reaches_the_builder(tmp_path, capsys, monkeypatch):
    """imagenet2012 cannot be downloaded: TFDS looks for its archives in --tfds-manual-dir."""
    _refuse_to_compile(monkeypatch)
    manual = tmp_path / "imagenet_archives"
    args = [
        "--arch", "resnet18", "--workdir", str(tmp_path / "w"), "--dataset", "imagenet2012",
        "--tfds-data-dir", str(tmp_path / "tfds"), "--tfds-manual-dir", str(manual),
    ]  # fmt: skip
    line = _usage_error(args, capsys)
    assert f"Manual directory {manual} does not exist or is empty" in line
    assert "--tfds-manual-dir" in line


def test_sigterm_during_evaluation_checkpoints_without_waiting_for_it(
    tiny_data, tmp_path, monkeypatch
):
    """A SIGTERM arriving while the final evaluation runs abandons it at the next batch: the
    run checkpoints its last step (without eval metrics) and exits; the rerun evaluates it."""
    from resnet_jax import data

    eval_batches = data.eval_batches

    def terminated_during_eval(*args, **kwargs):
        for batch in eval_batches(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            yield batch
            pytest.fail("the evaluation went on after the signal")

    workdir = tmp_path / "run"
    config = _tiny_config(tiny_data, workdir, parallel="pmap", max_steps=1)
    with monkeypatch.context() as patch, pytest.raises(SystemExit) as exit_info:
        patch.setattr(data, "eval_batches", terminated_during_eval)
        trainer.fit(config)
    assert exit_info.value.code == 128 + signal.SIGTERM
    with checkpoint.TrainCheckpointer(workdir) as ckpt:
        assert ckpt.all_steps() == [1] and ckpt.metrics(1) is None
    assert not [r for r in metrics_records(workdir) if "val_loss" in r]
    final = trainer.fit(config)
    assert final["step"] == 1 and 0 <= final["val_accuracy"] <= 1
    assert [r["step"] for r in metrics_records(workdir) if "val_loss" in r] == [1]


def test_bench_train_measures_the_loop_and_the_bare_step(tmp_path):
    """benchmarks/bench_train.py at its smallest: both speeds and the overhead come out."""
    spec = importlib.util.spec_from_file_location(
        "bench_train", ROOT / "benchmarks" / "bench_train.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(
        ["--image-size", "32", "--batch-size", "8", "--steps", "6", "--log-every", "2"]
    )
    assert result["loop_images_per_sec"] > 0 and result["bare_step_images_per_sec"] > 0
    assert math.isfinite(result["loop_overhead_percent"])


# ------------------------------------------------------------------------------------------------
# --pretrained NAME through the local Hub stand-in (tests/hub_standin.py), --head append


@pytest.fixture(scope="module")
def hub(module_tmp):
    """The Hub stand-in serving a random 1000-class torchvision resnet18 as the registry's
    `timm/resnet18.tv_in1k`, and its weights."""
    weights = hub_standin.resnet18_weights()
    repos = {"timm/resnet18.tv_in1k": {"model.safetensors": weights}}
    with hub_standin.HubStandIn(repos) as server:
        yield {"server": server, "weights": weights, "tmp": module_tmp("hub")}


def _train_from_hub(hub, hf_home: Path, *args: str, offline: bool = False):
    """scripts/train.py `args` in a fresh process pointed at the stand-in, cache in `hf_home`."""
    env = {"HF_ENDPOINT": hub["server"].url, "HF_HOME": str(hf_home),
           "HF_HUB_OFFLINE": "1" if offline else "0", "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip
    return run_script("train.py", *args, **env)


def test_head_append_from_a_registry_name(hub, tiny_data, tmp_path):
    """`--pretrained resnet18.tv_in1k --freeze backbone --head append`: downloaded through the
    stand-in, the 1000-class fc kept (frozen) with the backbone, a 2-class head trained on top;
    the weights' preprocessing, at --image-size, is stored in the checkpoint's metadata."""
    workdir = tmp_path / "w"
    proc = _train_from_hub(
        hub, hub["tmp"] / "hf_home", "--arch", "resnet18", "--pretrained", "resnet18.tv_in1k",
        "--freeze", "backbone", "--head", "append", "--data-dir", str(tiny_data),
        "--image-size", "32", "--batch-size", "4", "--epochs", "1", "--max-steps", "2",
        "--lr", "0.5", "--workdir", str(workdir),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "loaded pretrained resnet18 weights from resnet18.tv_in1k (Hub repo " in proc.stderr
    assert "appending a new 2-class layer 'head' on the pretrained 1000-class fc" in proc.stderr
    loaded = model_dir.load(workdir, which="latest")
    registered = pretrained_registry.REGISTRY["resnet18.tv_in1k"].preprocessing
    assert loaded.metadata["preprocessing"] == registered.override(eval_size=32).to_json()
    assert loaded.metadata["fc_classes"] == 1000 and loaded.metadata["trainable"] == ["head"]
    start = convert.from_torchvision(safetensors.numpy.load(hub["weights"]), "resnet18")
    after = {k: dict(v) for k, v in loaded.variables.items()}
    assert after["params"].pop("head")["kernel"].shape == (1000, 2)
    for collection in ("params", "batch_stats"):
        same, changed = _changed_stages(start[collection], after[collection])
        kept = {"stem", *models.STAGE_NAMES} | ({"fc"} if collection == "params" else set())
        assert not changed and same == kept, collection
    # Evaluation and prediction rebuild the model with its appended head.
    evaluate = ["--checkpoint", str(workdir), "--data-dir", str(tiny_data), "--batch-size", "4"]
    assert load_script("evaluate.py").main(evaluate) == 0
    image = next((tiny_data / "val" / "ant").iterdir())
    probs = inference.Predictor.from_checkpoint(workdir).predict_proba([image])
    assert probs.shape == (1, 2) and np.isclose(probs.sum(), 1.0)


@pytest.mark.parametrize(
    ("name", "offline", "says"),
    [
        ("resnet18.tv_in1k", True, "is not in the cache"),
        # a corrupt download and a file of another arch: tests/test_pretrained.py (the message)
        ("hf-hub:org/missing", False, "no such repo at"),
    ],
)
def test_pretrained_name_that_cannot_load_is_one_line_and_writes_nothing(
    hub, tiny_data, tmp_path, name, offline, says
):
    """Offline with an empty cache, a missing repo: exit 2, the last line
    names the weights and the repo, and the workdir is not even created."""
    workdir = tmp_path / "w"
    proc = _train_from_hub(
        hub, tmp_path / "empty_hf_home", "--arch", "resnet18", "--pretrained", name,
        "--freeze", "backbone", "--data-dir", str(tiny_data), "--workdir", str(workdir),
        offline=offline,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("train.py: error: cannot load ") and says in line, line
    repo = name.removeprefix("hf-hub:") if name.startswith("hf-hub:") else "timm/" + name
    assert repr(name) in line and repr(repo) in line, line
    assert not workdir.exists()


def test_pretrained_name_of_another_arch_is_a_usage_error(tiny_data, tmp_path, capsys):
    workdir = tmp_path / "w"
    line = _usage_error(
        ["--arch", "resnet34", "--pretrained", "resnet18.tv_in1k", "--freeze", "backbone",
         "--data-dir", str(tiny_data), "--workdir", str(workdir)], capsys
    )  # fmt: skip
    assert line.endswith(
        "--pretrained resnet18.tv_in1k holds resnet18 weights but --arch is resnet34; "
        "pass --arch resnet18"
    )
    assert not workdir.exists()


def test_head_append_needs_freeze_backbone_thus_pretrained(tiny_data, tmp_path, capsys):
    base = ["--data-dir", str(tiny_data), "--workdir", str(tmp_path / "w"), "--head", "append"]
    line = _usage_error([*base, "--pretrained", "x.pth", "--freeze", "none"], capsys)
    assert "use it with --freeze backbone, not --freeze none" in line
    line = _usage_error([*base, "--freeze", "backbone"], capsys)
    assert "--freeze backbone needs --pretrained" in line


def test_a_registered_name_resumes_whatever_the_working_directory(tmp_path, monkeypatch):
    """A NAME is not a path: resuming from another directory compares it as written."""
    config = dataclasses.asdict(trainer.TrainConfig(pretrained="resnet18.tv_in1k"))
    monkeypatch.chdir(tmp_path)
    trainer.check_resume({"config": config}, {"config": dict(config)}, tmp_path)
    assert train_config._resume_settings(config)["pretrained"] == "resnet18.tv_in1k"
