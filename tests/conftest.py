"""Test setup: 4 host CPU devices for data-parallel tests, set before jax is imported."""

import os
from pathlib import Path

import pytest
import torch  # noqa: F401  # torch must load before tensorflow in a process (else it segfaults)

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


@pytest.fixture(scope="session")
def flowers_dir() -> Path:
    """The real tf_flowers photos in ../shared (never copied into the project)."""
    if not (FLOWERS / "train").is_dir():
        pytest.fail(
            f"flower photos not found at {FLOWERS}; tests expect ../shared/data beside the repo"
        )
    return FLOWERS
