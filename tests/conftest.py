"""Test setup: 4 host CPU devices for data-parallel tests, set before jax is imported; a
persistent compilation cache; the suite's one training run on the real flower photos."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest
import torch  # torch must load before tensorflow in a process (else it segfaults)
import torchvision
from helpers import run_script

# Optimisation level 0 compiles several times faster; the tests' models are tiny, so the slower
# code costs less than the compile time it saves.
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=4",
        "--xla_backend_optimization_level=0",
    ]
).strip()

FLOWERS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flower_photos"

_TEMPORARY_XLA_CACHE: list[str] = []


def pytest_configure(config):
    """Compilations persist in pytest's cache directory (a temporary one with -p
    no:cacheprovider): this process and the scripts it launches (they inherit the variable) load
    what an earlier launch or session compiled. Set before any test module imports jax."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    cache = getattr(config, "cache", None)
    if cache is not None:
        path = str(cache.mkdir("xla_compilation_cache"))
    else:
        path = tempfile.mkdtemp(prefix="xla_compilation_cache_")
        _TEMPORARY_XLA_CACHE.append(path)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path


def pytest_unconfigure(config):
    for path in _TEMPORARY_XLA_CACHE:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def flowers_dir() -> Path:
    """The real tf_flowers photos in ../shared (never copied into the project)."""
    if not (FLOWERS / "train").is_dir():
        pytest.fail(
            f"flower photos not found at {FLOWERS}; tests expect ../shared/data beside the repo"
        )
    return FLOWERS


class FineTuneRun(NamedTuple):
    """`finetuned_run`: the launches, and the workdir as the first one left it."""

    workdir: Path
    weights: Path  # the torchvision-format file it started from
    first: subprocess.CompletedProcess  # trained steps 1-2
    after_first: Path  # a copy of the workdir after `first`, without its checkpoints
    steps_after_first: list[str]  # the checkpoint step directories after `first`
    resumed: subprocess.CompletedProcess  # the same command resumed to step 3


@pytest.fixture(scope="session")
def finetuned_run(tmp_path_factory, flowers_dir) -> FineTuneRun:
    """The suite's one end-to-end training on the whole flower data set (tests/test_train_cli.py
    checks what it writes and the resume, tests/test_transfer.py the fine-tuning, evaluate.py and
    predict.py on the result): scripts/train.py starts from torchvision resnet18 weights (an
    ImageNet-shaped 1000-class head, non-trivial BatchNorm statistics), replaces the head and
    trains layer4 and the head for 2 steps at 32 px; the same command then resumes to step 3
    (its compilations come from the persistent cache the first launch filled)."""
    root = tmp_path_factory.mktemp("finetune")
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
        "--trainable", "layer4,fc", "--data-dir", str(flowers_dir), "--image-size", "32",
        "--batch-size", "8", "--eval-batch-size", "64", "--epochs", "1", "--warmup-epochs", "0",
        "--lr", "0.5", "--workdir", str(workdir),
    ]  # fmt: skip
    first = run_script("train.py", *flags, "--max-steps", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    after_first = root / "after_first"
    shutil.copytree(workdir, after_first, ignore=shutil.ignore_patterns("checkpoints"))
    steps_after_first = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    resumed = run_script("train.py", *flags, "--max-steps", "3")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return FineTuneRun(workdir, weights, first, after_first, steps_after_first, resumed)
