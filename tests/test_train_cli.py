"""End to end: scripts/train.py on the real flower photos, resume, and argument errors.

The training run is conftest.py's `finetuned_run` (2 steps, then resumed to step 3), which
tests/test_transfer.py checks too: the suite's one run over the whole data set."""

import json

import pytest
from helpers import load_script, metrics_records


def test_train_writes_everything_and_resumes(finetuned_run):
    run = finetuned_run
    out = run.first.stdout + run.first.stderr
    assert "done: step 2" in out
    first = run.after_first  # the workdir as the first launch left it (checkpoints listed)
    assert json.loads((first / "class_names.json").read_text()) == {
        "0": "daisy", "1": "dandelion", "2": "roses", "3": "sunflowers", "4": "tulips",
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
    records = metrics_records(run.workdir)
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3]
    assert (run.workdir / "checkpoints" / "3").is_dir()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "resnet5O"], "Did you mean 'resnet50'"),
        (["--image-size", "16"], "--image-size must be >= 32"),
        (["--batch-size", "6"], "--batch-size 6 is not divisible by the number of devices 4"),
        (
            ["--epochs", "2", "--warmup-epochs", "3"],
            "--warmup-epochs 3.0 must be in [0, --epochs 2]",
        ),
        (["--data-dir", "/nonexistent/flowers"], "/nonexistent/flowers"),
        (["--num-processes", "2"], "go together"),
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
