"""Helpers shared by the test modules: the scripts, run in this process or as subprocesses."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from resnet_jax.cpu import xla_flags

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
LAUNCH_TIMEOUT_S = 600  # generous: the machine may be shared; a hang fails here, not forever
# What `resnet_jax.cpu.configure` does to XLA:CPU, for the jaxlibs it does it for; older ones are
# left alone (test_cpu.py::test_configure_applies_what_is_asked), and their XLA may not run
# convolutions on YNNPACK.
CHECKED_JAXLIB = xla_flags.supported()
checked_jaxlib = pytest.mark.skipif(
    not CHECKED_JAXLIB,
    reason=f"jaxlib older than {xla_flags.MIN_JAXLIB}: resnet_jax leaves XLA's CPU settings alone",
)


def load_script(name: str) -> ModuleType:
    """scripts/<name> as a fresh module, to call its main() in this process."""
    path = SCRIPTS / name
    spec = importlib.util.spec_from_file_location(f"{path.stem}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_env(**overrides: str) -> dict[str, str]:
    """This process's environment for a script launch: the same XLA flags (see conftest.py) and
    persistent compilation cache, every compilation kept (a later launch of the same programs,
    a resumed run, only loads them); `overrides` replace or add variables."""
    return {
        **os.environ,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "PYTHONUNBUFFERED": "1",
        **overrides,
    }


def run_script(name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run `python scripts/<name> ARGS` to completion, capturing its output as text."""
    return subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
        cwd=ROOT,
        env=script_env(**env),
    )


def cpu_probe(code: str, xla_flags: str, timeout: int = 180, **env: str) -> dict:
    """Run `code` in a fresh CPU-only Python process with these XLA_FLAGS (XLA reads them once
    per process) and variables, without glibc's MALLOC_* variables; return the JSON object its
    last output line prints."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environ = dict(inherited, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu", **env)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def metrics_records(workdir: Path, complete_only: bool = False) -> list[dict]:
    """The records of a training run's metrics.jsonl (none before it exists); `complete_only`
    skips a last line still being written."""
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(s) for s in lines if not complete_only or s.endswith("}")]
