"""The benchmark commands run end to end on tiny shapes, so that the prepared GPU run (rarely
possible) and the CPU tools cannot break unseen. Their timings are not checked: benchmarks are
commands, not timed tests."""

import json
import re
import subprocess
import sys

import pytest
from helpers import CHECKED_JAXLIB, LAUNCH_TIMEOUT_S, ROOT, script_env

pytestmark = pytest.mark.launches

BENCHMARKS = ROOT / "benchmarks"
TINY = ("--archs", "resnet18", "--batch-sizes", "2", "--image-size", "32", "--rounds", "1")


def _run(*command: str, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command,
        cwd=ROOT,
        env=script_env(**env),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _rows(table: str, first_cell: str) -> list[list[str]]:
    """The cells of the markdown table rows whose first cell matches `first_cell` (a regex)."""
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in table.splitlines()
        if re.match(rf"\| {first_cell} \|", line)
    ]


def test_gpu_benchmark_script_writes_its_table(tmp_path):
    """`gpu_benchmark.sh` (here on CPU, with its documented dry-run overrides) writes the
    report to $OUT/gpu_benchmark.md: the command, the environment and one row per framework,
    mode and dtype, JAX's with its ratio to torch."""
    _run(
        "bash",
        str(BENCHMARKS / "gpu_benchmark.sh"),
        *TINY,
        "--modes",
        "infer",
        "--dtypes",
        "fp32",
        "--steps",
        "1",
        OUT=str(tmp_path),
        PYTHON=sys.executable,
        BENCH_TRAIN_ARGS="--arch resnet18 --batch-size 4 --image-size 32 --steps 4 --log-every 2",
    )
    report = (tmp_path / "gpu_benchmark.md").read_text()
    assert re.search(r"loop [\d.]+ images/s, bare step [\d.]+ images/s, loop overhead", report)
    assert report.startswith("## GPU, ")
    assert "`python benchmarks/bench_models.py --archs resnet50 --batch-sizes 256" in report
    assert re.search(r"python 3\.\d+.*, jax \S+ \(cpu: cpu\), torch ", report)
    rows = _rows(report, "resnet18")
    assert [row[2:5] for row in rows] == [["infer", "fp32", "torch"], ["infer", "fp32", "jax-Conv"]]
    torch_row, jax_row = rows
    assert torch_row[9] == "1.00"
    assert float(jax_row[9]) > 0 and float(jax_row[5]) > 0  # vs torch, median ms
    assert jax_row[13].startswith("XLA temp ")


def test_convolutions_vs_torch_cover_the_net():
    """`bench_convs.py --vs-torch` times every distinct convolution of the net once, with how
    often a step runs it: resnet18 has 20 convolutions (and 11 distinct shapes)."""
    result = _run(
        sys.executable,
        str(BENCHMARKS / "bench_convs.py"),
        "--vs-torch",
        "resnet18",
        "--batch-size",
        "1",
        "--image-size",
        "32",
        "--rounds",
        "1",
    )
    rows = _rows(result.stdout, r"\d+x\d+")
    assert len(rows) == 11
    assert sum(int(row[3]) for row in rows) == 20
    assert rows[0][:3] == ["32x32", "3->64/1", "7x7/2"]
    (total,) = _rows(result.stdout, "all")
    assert total[1] == "resnet18"


def test_model_benchmark_compares_group_caps(tmp_path):
    """`bench_models.py` applies the library's CPU settings first (all but those left out), times
    a ResNeXt as the library traces it and with a cap of 16 grouped convolutions per layer
    (`jax-Conv-cap16`), each with its ratio to torch, and writes the table with its command to
    --output."""
    report = tmp_path / "report.md"
    result = _run(
        sys.executable,
        str(BENCHMARKS / "bench_models.py"),
        *("--archs", "resnext50_32x4d", "--batch-sizes", "2", "--image-size", "32"),
        *("--rounds", "1", "--steps", "1", "--modes", "infer"),
        *("--impls", "torch,jax-Conv,jax-Conv-cap16", "--output", str(report)),
        *("--without-cpu-setting", "retain_host_memory"),
    )
    settings = "eigen_convolutions, multi_output_fusion" if CHECKED_JAXLIB else "none"
    assert f"CPU settings: {settings}\n" in result.stderr
    text = report.read_text()
    assert "freed host memory retained for reuse (retain_host_memory): no" in text
    eigen = "yes" if CHECKED_JAXLIB else "no"
    assert f"convolutions on Eigen, not YNNPACK (eigen_convolutions): {eigen}" in text
    assert "--impls torch,jax-Conv,jax-Conv-cap16" in text
    rows = _rows(text, "resnext50_32x4d")
    assert [row[4] for row in rows] == ["torch", "jax-Conv", "jax-Conv-cap16"]
    assert all(float(row[9]) > 0 for row in rows)


def test_training_summary_has_raw_and_ema_columns(tmp_path):
    """summarize_training.py tabulates each epoch's val top-1, the EMA's beside it, and the time
    from the logged images/s at the checkpoint's batch size."""
    records = [
        {"step": 10, "epoch": 0, "train_loss": 1.0, "images_per_sec": 20.0},
        {"step": 10, "epoch": 0, "val_loss": 0.9, "val_accuracy": 0.5},
        {"step": 10, "epoch": 0, "ema_val_loss": 1.1, "ema_val_accuracy": 0.4},
        {"step": 20, "epoch": 1, "train_loss": 0.5, "images_per_sec": 40.0},
        {"step": 20, "epoch": 1, "val_loss": 0.6, "val_accuracy": 0.75},
        {"step": 20, "epoch": 1, "ema_val_loss": 0.5, "ema_val_accuracy": 0.8},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "class_names.json").write_text(json.dumps(["a", "b"]))
    meta = tmp_path / "checkpoints" / "20" / "meta"
    meta.mkdir(parents=True)
    (meta / "metadata").write_text(json.dumps({"config": {"batch_size": 4}}))
    table = _run(sys.executable, str(BENCHMARKS / "summarize_training.py"), str(tmp_path)).stdout
    assert _rows(table, "1") == [["1", "10", "0.9000", "0.5000", "0.4000", "2", "20.0"]]
    assert _rows(table, "2") == [["2", "20", "0.6000", "0.7500", "0.8000", "1", "40.0"]]
    assert "Final val top-1 0.7500, best 0.7500 (epoch 2)." in table
    assert "Final EMA val top-1 0.8000, best 0.8000 (epoch 2)." in table
    every = _run(
        sys.executable, str(BENCHMARKS / "summarize_training.py"), str(tmp_path), "--every", "3"
    )
    assert _rows(every.stdout, "1") == [] and len(_rows(every.stdout, "2")) == 1  # the last
