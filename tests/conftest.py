"""Test setup: 4 host CPU devices for data-parallel tests, set before jax is imported, and a
persistent compilation cache."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# torch, and torchvision (which loads more of torch), must be imported before tensorflow in a
# process, else it segfaults; test modules get tensorflow through resnet_jax.data.
import torch  # noqa: F401
import torchvision  # noqa: F401

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
