"""End to end: scripts/train.py on the real flower photos, resume, and argument errors."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"


def _train(workdir: Path, flowers_dir: Path, *extra: str) -> str:
    cmd = [
        sys.executable, str(TRAIN), "--arch", "resnet18", "--data-dir", str(flowers_dir),
        "--image-size", "32", "--batch-size", "8", "--eval-batch-size", "64", "--epochs", "1",
        "--warmup-epochs", "0", "--workdir", str(workdir), *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_train_writes_everything_and_resumes(tmp_path, flowers_dir):
    workdir = tmp_path / "run"
    out = _train(workdir, flowers_dir, "--max-steps", "2")
    assert "done: step 2" in out
    assert json.loads((workdir / "class_names.json").read_text()) == {
        "0": "daisy", "1": "dandelion", "2": "roses", "3": "sunflowers", "4": "tulips",
    }  # fmt: skip
    assert (workdir / "checkpoints" / "2").is_dir()
    assert (workdir / "curves.png").stat().st_size > 0
    assert list((workdir / "tensorboard").iterdir())
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2]
    (val,) = [r for r in records if "val_loss" in r]
    assert 0 <= val["val_accuracy"] <= 1

    out = _train(workdir, flowers_dir, "--max-steps", "3")
    assert "resumed from" in out and "at step 2" in out
    assert "done: step 3" in out
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3]
    assert (workdir / "checkpoints" / "3").is_dir()


def _load_script():
    spec = importlib.util.spec_from_file_location("train_script", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    script = _load_script()
    base = ["--data-dir", str(tmp_path), "--workdir", str(tmp_path / "w")]
    with pytest.raises(SystemExit) as exit_info:
        script.main(base + args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not list((tmp_path / "w").glob("checkpoints/[0-9]*"))
