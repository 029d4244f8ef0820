"""Pretrained ImageNet ResNets by name, downloaded from the Hugging Face Hub; torch is not needed.

`load("resnet50.a1_in1k")` takes a name from the registry (`pretrained_registry.REGISTRY`, the
table in docs/pretrained.md); `load("hf-hub:ORG/REPO")` (optionally `@REVISION`) any Hub repo
whose `model.safetensors` holds a torchvision-keyed ResNet, its arch given as `arch=` or read from
the repo's `config.json` (timm's layout: `architecture`, `pretrained_cfg`). The file goes through
`huggingface_hub.hf_hub_download`, so its cache (`HF_HOME`, `HF_HUB_CACHE`), offline mode
(`HF_HUB_OFFLINE=1` loads from the cache only), endpoint (`HF_ENDPOINT`), token (`HF_TOKEN`) and
progress bar (`HF_HUB_DISABLE_PROGRESS_BARS`) apply; huggingface_hub reads these variables when
it is first imported, which this module defers to the first download. The weights are converted
by `convert.from_torchvision`. Every failure is a `PretrainedError` whose message is one line
naming the weights, the repo and what to do.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from numpy.typing import DTypeLike

from resnet_jax import convert, models
from resnet_jax.preprocessing import Preprocessing, default_preprocessing
from resnet_jax.pretrained_registry import REGISTRY, Entry

__all__ = [
    "HUB_PREFIX",
    "WEIGHTS_FILE",
    "Preprocessing",
    "Pretrained",
    "PretrainedError",
    "Source",
    "is_registered_or_hub",
    "load",
]

HUB_PREFIX = "hf-hub:"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LIBRARY_NAME = "resnet_jax"
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")
# Preprocessing of a Hub repo whose config.json states none: torchvision's V1 eval transform.
_DEFAULT_PREPROCESSING = default_preprocessing(224)


class PretrainedError(ValueError):
    """Named weights that cannot be loaded; the message is one line naming the weights, the Hub
    repo and what to do."""


@dataclasses.dataclass(frozen=True)
class Source:
    """Where loaded weights came from: Hub repo, the commit they were resolved to, the file's
    name in the repo and its path in the local cache."""

    repo: str
    revision: str
    filename: str
    path: Path


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Loaded weights: `model.apply(variables, images, train=False)` classifies NHWC images
    prepared as `preprocessing` says; `license` is the weights' licence ("unknown" when a Hub
    repo does not state one)."""

    name: str
    arch: str
    model: models.ResNet
    variables: dict[str, dict]
    preprocessing: Preprocessing
    source: Source
    license: str


def _spelling() -> str:
    """How names are spelled, for error messages."""
    return (
        f"use a registered name ARCH.TAG (e.g. 'resnet50.a1_in1k'; {len(REGISTRY)} in "
        "resnet_jax.pretrained_registry.REGISTRY, listed in docs/pretrained.md) or "
        f"'{HUB_PREFIX}ORG/REPO[@REVISION]' for a Hub repo"
    )


def is_registered_or_hub(name: str) -> bool:
    """Whether `load` handles `name` itself: a registered `ARCH.TAG` or an `hf-hub:` name (which
    may still fail to download); callers route anything else, such as a local file, elsewhere."""
    return name in REGISTRY or name.startswith(HUB_PREFIX)


def _one_line(text: str) -> str:
    """`text` with its whitespace runs (newlines included) collapsed to single spaces."""
    return " ".join(str(text).split())


def _first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def _fail(name: str, repo: str, problem: str, todo: str) -> PretrainedError:
    """A `PretrainedError` saying, on one line, what went wrong for `name` from `repo` and what
    to do about it."""
    return PretrainedError(
        _one_line(f"cannot load {name!r} from Hub repo {repo!r}: {problem}; {todo}")
    )


def _download_error(name: str, repo: str, filename: str, err: Exception) -> PretrainedError:
    """Translate a huggingface_hub download failure into a one-line `PretrainedError`."""
    from huggingface_hub import constants, errors

    if isinstance(err, errors.RevisionNotFoundError):
        return _fail(name, repo, "the revision does not exist", "check the @REVISION part")
    if isinstance(err, errors.RemoteEntryNotFoundError):
        return _fail(
            name,
            repo,
            f"the repo has no {filename}",
            "pick a repo that holds one, see docs/pretrained.md",
        )
    if isinstance(err, errors.RepositoryNotFoundError):
        return _fail(
            name,
            repo,
            f"no such repo at {constants.ENDPOINT} (or it is private or gated)",
            "check the name (see docs/pretrained.md); for a private repo set HF_TOKEN",
        )
    if isinstance(err, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
        if constants.HF_HUB_OFFLINE:
            problem = (
                f"{filename} is not in the cache {constants.HF_HUB_CACHE} and HF_HUB_OFFLINE is set"
            )
            todo = "run once online (unset HF_HUB_OFFLINE) or point HF_HOME at a cache that has it"
        else:
            problem = f"{filename} is not cached and {constants.ENDPOINT} could not be reached"
            todo = "check the connection or HF_ENDPOINT, or set HF_HOME to a cache that has it"
        return _fail(name, repo, problem, todo)
    return _fail(
        name, repo, f"download of {filename} failed ({type(err).__name__}: {_first_line(err)})",
        "check the connection, HF_ENDPOINT and HF_TOKEN and retry",
    )  # fmt: skip


def _download(name: str, repo: str, revision: str | None, filename: str, force: bool) -> Path:
    """Local path of `filename` from Hub `repo` at `revision` (default branch if None), downloaded
    into huggingface_hub's cache unless already there."""
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(
            repo, filename, revision=revision, library_name=LIBRARY_NAME, force_download=force
        )
    except Exception as err:  # huggingface_hub's many error types, translated one by one
        raise _download_error(name, repo, filename, err) from err
    return Path(path)


def _commit_of(path: Path) -> str:
    """The commit a cached file belongs to: its snapshot folder's name in huggingface_hub's cache
    (`.../snapshots/<commit>/<filename>`)."""
    return path.parent.name if path.parent.parent.name == "snapshots" else "unknown"


def _parse_hub_name(name: str) -> tuple[str, str | None]:
    """`hf-hub:ORG/REPO[@REVISION]` -> (repo, revision or None); ValueError if malformed."""
    repo, _, revision = name.removeprefix(HUB_PREFIX).partition("@")
    if not _HUB_NAME.fullmatch(repo) or (revision == "" and "@" in name):
        raise PretrainedError(
            _one_line(f"{name!r} is not a Hub name: expected '{HUB_PREFIX}ORG/REPO[@REVISION]'")
        )
    return repo, revision or None


def _size_of(cfg: dict[str, Any], key: str) -> int | None:
    """Image size from a timm `input_size`-style entry ([C, H, W] or an int), None if absent."""
    value = cfg.get(key)
    if value is None:
        return None
    size = value[-1] if isinstance(value, list | tuple) else value
    return int(size)


def _hub_preprocessing(cfg: dict[str, Any]) -> Preprocessing:
    """Eval preprocessing from a timm `pretrained_cfg`: its test-time size and crop where it
    states them (what timm's published accuracy uses), else its train-time ones."""
    default = _DEFAULT_PREPROCESSING
    size = _size_of(cfg, "test_input_size") or _size_of(cfg, "input_size") or default.eval_size
    crop = cfg.get("test_crop_pct") or cfg.get("crop_pct") or default.crop_pct
    return Preprocessing(
        eval_size=size,
        crop_pct=float(crop),
        interpolation=str(cfg.get("interpolation", default.interpolation)),
        mean=tuple(float(m) for m in cfg.get("mean", default.mean)),
        std=tuple(float(s) for s in cfg.get("std", default.std)),
    )


def _hub_config(name: str, repo: str, revision: str | None, force: bool) -> dict[str, Any] | None:
    """The repo's config.json as a dict, None if the repo has none."""
    from huggingface_hub import errors

    try:
        path = _download(name, repo, revision, CONFIG_FILE, force)
    except PretrainedError as err:
        if isinstance(err.__cause__, errors.RemoteEntryNotFoundError):
            return None
        raise
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(
            name, repo, f"its {CONFIG_FILE} is not valid JSON ({err})", "pass arch= explicitly"
        ) from err
    if not isinstance(config, dict):
        raise _fail(name, repo, f"its {CONFIG_FILE} is not a JSON object", "pass arch= explicitly")
    return config


def _hub_arch(name: str, repo: str, config: dict[str, Any] | None, arch: str | None) -> str:
    """The arch of a Hub repo: `arch` if given, else config.json's `architecture` (or its
    `model_args`' `arch`); must be one of `models.ARCHS`."""
    if arch is None and config is not None:
        arch = config.get("architecture") or (config.get("model_args") or {}).get("arch")
    if arch is None:
        raise _fail(name, repo, f"its {CONFIG_FILE} names no architecture", "pass arch=ARCH")
    if arch not in models.ARCHS:
        raise _fail(
            name, repo, f"{arch!r} is not a torchvision ResNet arch this library builds",
            f"pass arch= one of {', '.join(models.ARCHS)} if the weights are torchvision-keyed",
        )  # fmt: skip
    return arch


def _resolve(
    name: str, arch: str | None, force: bool
) -> tuple[str, str | None, str, Preprocessing, str]:
    """(repo, revision, arch, preprocessing, licence) for a name; raises `PretrainedError` for an
    unknown name or an `arch` that contradicts the registry."""
    entry: Entry | None = REGISTRY.get(name)
    if entry is not None:
        if arch is not None and arch != entry.arch:
            raise PretrainedError(
                _one_line(f"{name!r} holds {entry.arch} weights, not arch={arch!r}; drop arch=")
            )
        return entry.repo, None, entry.arch, entry.preprocessing, entry.license
    if name.startswith(HUB_PREFIX):
        repo, revision = _parse_hub_name(name)
        config = _hub_config(name, repo, revision, force)
        cfg = (config or {}).get("pretrained_cfg") or {}
        arch = _hub_arch(name, repo, config, arch)
        license = str(cfg.get("license") or (config or {}).get("license") or "unknown")
        try:
            preprocessing = _hub_preprocessing(cfg)
        except (TypeError, ValueError) as err:
            raise _fail(
                name,
                repo,
                f"its config.json's pretrained_cfg is unusable ({err})",
                "pass a repo whose preprocessing resnet_jax supports",
            ) from err
        return repo, revision, arch, preprocessing, license
    close = difflib.get_close_matches(name, REGISTRY, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise PretrainedError(_one_line(f"unknown pretrained weights {name!r}.{hint} {_spelling()}"))


def _convert(
    name: str, repo: str, path: Path, arch: str, num_classes: int | None, dtype: DTypeLike
) -> tuple[dict[str, dict], int | None]:
    """(variables, head width) of the downloaded file for `arch`: float64 leaves when `dtype` is
    float64, else float32; without `fc` when `num_classes` differs from the file's head."""
    leaf_dtype = np.float64 if jnp.dtype(dtype) == jnp.float64 else np.float32
    try:
        state_dict = convert.load_state_dict(path)
        file_classes = convert.num_classes_of(state_dict)
        if num_classes is not None and num_classes != file_classes:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
            file_classes = None
        variables = convert.from_torchvision(state_dict, arch, file_classes, dtype=leaf_dtype)
    except convert.WeightsFileError as err:
        why = _first_line(err).replace(f"{path} ", "it ")
        raise _fail(
            name, repo, f"the downloaded {path.name} ({path}) is unreadable: {why}",
            "call load(..., force_download=True) to download it again",
        ) from err  # fmt: skip
    except convert.WeightsMismatchError as err:
        found = convert.detect_arch(convert.load_state_dict(path))
        todo = f"pass arch={found!r}" if found else "use a repo holding a torchvision-keyed ResNet"
        why = _first_line(err).replace("the given state_dict", "it")
        raise _fail(name, repo, f"{path.name} does not fit {arch}: {why}", todo) from err
    return variables, num_classes if num_classes is not None else file_classes


def load(
    name: str,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    dtype: DTypeLike = jnp.float32,
    force_download: bool = False,
) -> Pretrained:
    """Download (or take from the cache) and convert the weights called `name`.

    `name` is a registry name `ARCH.TAG` or `hf-hub:ORG/REPO[@REVISION]`; `arch` names the arch
    of an `hf-hub:` repo whose config.json does not (for a registry name it must be None or
    agree). `num_classes=None` keeps the file's classifier; another width than the file's gives
    a model with that head and variables without `fc`, to be completed with a fresh head by
    `transfer.merge_pretrained`. `dtype` is the model's compute dtype; variables are float64
    when it is float64 (exactness checks under `jax_enable_x64`), else float32.
    `force_download` fetches the files again even when cached. Raises `PretrainedError`.
    """
    repo, revision, arch, preprocessing, license = _resolve(name, arch, force_download)
    path = _download(name, repo, revision, WEIGHTS_FILE, force_download)
    variables, classes = _convert(name, repo, path, arch, num_classes, dtype)
    param_dtype = jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32
    model = models.get_model(arch, num_classes=classes, dtype=dtype, param_dtype=param_dtype)
    source = Source(repo=repo, revision=_commit_of(path), filename=WEIGHTS_FILE, path=path)
    return Pretrained(name, arch, model, variables, preprocessing, source, license)
