"""Test setup: 4 host CPU devices for data-parallel tests (set before jax is imported), a
persistent compilation cache, and the image data sets the tests read.

`synthetic_folders` is a small learnable image-folder data set made in the session (no files
needed). `flowers_dir` is the real flower photos, from the environment variable
RESNET_JAX_FLOWERS (a directory with train/ and val/ class folders); without it the tests that
use it are deselected and the terminal summary says how many.
"""

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import resnet_jax.cpu

# Optimisation level 0 compiles several times faster; the tests' models are tiny, so the slower
# code costs less than the compile time it saves.
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=4",
        "--xla_backend_optimization_level=0",
    ]
).strip()
# The CPU settings scripts/train.py and the benchmarks apply: tests run what users run on CPU.
resnet_jax.cpu.configure()

FLOWERS_ENV = "RESNET_JAX_FLOWERS"
# Classes of the synthetic set: a dominant colour each (their luminances differ too, so the
# grayscale images stay separable), in class-index order.
SYNTHETIC_COLOURS = {
    "blue": (30, 40, 200),
    "green": (40, 190, 40),
    "red": (200, 40, 30),
    "yellow": (220, 210, 40),
}
# Per class: (format, mode) of every file; train has 12, val 4.
_TRAIN_FILES = [("jpg", "RGB")] * 7 + [
    ("png", "RGB"),
    ("png", "RGBA"),
    ("png", "P"),
    ("jpg", "L"),
    ("png", "L"),
]
_VAL_FILES = [("jpg", "RGB"), ("png", "RGB"), ("png", "P"), ("jpg", "L")]
_TEMPORARY_XLA_CACHE: list[str] = []
# Tests deselected for want of the flower photos.
_FLOWER_TESTS = pytest.StashKey[int]()
# Modules with a failed test (or fixture), whose `module_tmp` directories are kept.
_FAILED_MODULES = pytest.StashKey[set[str]]()


def pytest_configure(config):
    """Compilations persist in pytest's cache directory (a temporary one with -p
    no:cacheprovider): this process and the scripts it launches (they inherit the variable) load
    what an earlier launch or session compiled. Set before any test module imports jax. A
    RESNET_JAX_FLOWERS that is not a data set directory stops the session."""
    flowers = os.environ.get(FLOWERS_ENV)
    if flowers and not all((Path(flowers) / split).is_dir() for split in ("train", "val")):
        raise pytest.UsageError(
            f"{FLOWERS_ENV}={flowers}: expected a directory with train/<class>/ and "
            "val/<class>/ folders of the flower photos"
        )
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


def pytest_collection_modifyitems(config, items):
    """Without RESNET_JAX_FLOWERS, deselects the tests that use `flowers_dir`."""
    if os.environ.get(FLOWERS_ENV):
        return
    need = [item for item in items if "flowers_dir" in getattr(item, "fixturenames", ())]
    if need:
        items[:] = [item for item in items if item not in set(need)]
        config.hook.pytest_deselected(items=need)
    config.stash[_FLOWER_TESTS] = len(need)


def pytest_sessionfinish(session):
    """An xdist worker hands its count of deselected flower tests to the controller."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["flower_tests"] = session.config.stash.get(_FLOWER_TESTS, 0)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """The xdist controller keeps the workers' count (each worker collects every test)."""
    count = getattr(node, "workeroutput", {}).get("flower_tests", 0)
    node.config.stash[_FLOWER_TESTS] = max(count, node.config.stash.get(_FLOWER_TESTS, 0))


def pytest_terminal_summary(terminalreporter, config):
    count = config.stash.get(_FLOWER_TESTS, 0)
    if count:
        tests = "1 test needs" if count == 1 else f"{count} tests need"
        terminalreporter.write_line(
            f"{tests} the real flower photos: set {FLOWERS_ENV}=DIR "
            "(DIR/train/<class>/*, DIR/val/<class>/*) to run them"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed and getattr(item, "module", None) is not None:
        item.config.stash.setdefault(_FAILED_MODULES, set()).add(item.module.__name__)


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory) -> Iterator[Callable[[str], Path]]:
    """`tmp_path_factory.mktemp` for a module's fixtures. What it made is removed after the
    module unless a test of the module failed, as tmp_path_retention_policy "failed"
    (pyproject.toml) treats each test's `tmp_path`: a session's training runs and checkpoints
    would otherwise hold gigabytes of disk until the end."""
    made: list[Path] = []

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    if request.module.__name__ not in request.config.stash.get(_FAILED_MODULES, set()):
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def flowers_dir() -> Path:
    """The real tf_flowers photos: the directory RESNET_JAX_FLOWERS names (train/ and val/
    class folders; 2934 and 736 photos of 5 classes), never copied into the project."""
    return Path(os.environ[FLOWERS_ENV])


def synthetic_image(colour: tuple[int, int, int], size: tuple[int, int], seed: int) -> np.ndarray:
    """uint8 [H, W, 3]: noise around `colour` with a lighter random rectangle on it."""
    rng = np.random.default_rng(seed)
    height, width = size
    image = np.asarray(colour, np.float32) + rng.normal(0, 25, (height, width, 3))
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    image[top : top + height // 3, left : left + width // 3] += 50
    return np.clip(image, 0, 255).astype(np.uint8)


def write_synthetic_folders(root: Path) -> Path:
    """Writes `synthetic_folders`' files under `root` and returns it."""
    for split, files in (("train", _TRAIN_FILES), ("val", _VAL_FILES)):
        for c, (name, colour) in enumerate(SYNTHETIC_COLOURS.items()):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, (ext, mode) in enumerate(files):
                size = (40 + 8 * ((i + c) % 4), 48 + 6 * ((i * 3 + c) % 5))
                seed = 1000 * (split == "val") + 100 * c + i
                image = Image.fromarray(synthetic_image(colour, size, seed)).convert(mode)
                image.save(folder / f"{i:02d}_{mode.lower()}.{ext}", quality=90)
    return root


@pytest.fixture(scope="session")
def synthetic_folders(tmp_path_factory) -> Path:
    """A small learnable image-folder data set, DIR/train/<class>/* and DIR/val/<class>/*.

    4 classes (blue, green, red, yellow: noisy images of that colour with a lighter rectangle),
    12 train and 4 val images per class (48 / 16 in all), 40-64 px high and 48-72 px wide.
    Per class, train: 7 RGB JPEGs, PNGs in RGB, RGBA and P (palette) mode, and a grayscale (L)
    JPEG and PNG; val: an RGB JPEG, an RGB PNG, a P PNG and an L JPEG. Every file is readable.
    Session-scoped: tests must not change it (copy it first).
    """
    return write_synthetic_folders(tmp_path_factory.mktemp("synthetic"))
