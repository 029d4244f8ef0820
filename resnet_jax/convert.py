"""torchvision <-> Flax weight conversion for every arch in `resnet_jax.models.ARCHS`.

Flax module names mirror torchvision's (see `models`), so the mapping is a renaming plus a kernel
transpose; every key and shape is checked against the model's own variable tree before anything is
copied. torch is imported lazily so the rest of the package (and TensorFlow) never loads it.

Converted models compute torchvision's logits to float64 round-off in float64, and in float32 to
within 1e-4 of the logits' scale (1e-3 for the 101/152-layer archs; tests/test_convert.py) with
float32 matmul/convolution precision "highest" (`jax.default_matmul_precision("highest")`). On
Ampere/Hopper GPUs XLA's default precision computes float32 matmuls and convolutions with TF32
(10-bit mantissas), whose differences from torch's float32 results are larger than that.

One module, over 450 lines, because reading, checking and writing a state_dict share its key
mapping and validation; split, each half would import the other's private helpers.
"""

from __future__ import annotations

import functools
import os
import re
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from numpy.typing import DTypeLike

from resnet_jax import models

TORCH_SUFFIXES = (".pth", ".pt")  # torch.save / torch.load files
SAFETENSORS_SUFFIX = ".safetensors"
# Every weights file type this module reads and writes, compared case-insensitively.
WEIGHTS_SUFFIXES = (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX)
WRAPPER_KEYS = ("state_dict", "model")
# Key prefixes torch's own wrappers put before every key of the one module they wrap:
# DataParallel/DistributedDataParallel (`module.`) and torch.compile (`_orig_mod.`).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# (collection, Flax leaf) -> torchvision parameter/buffer name.
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_MODULE_NAMES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
# torchvision's state_dict order: registration order of modules, then parameters, then buffers.
_ORDER = (
    *("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"),
    *models.STAGE_NAMES,
    *("downsample", "fc", "weight", "bias", "running_mean", "running_var", "num_batches_tracked"),
)


class WeightsMismatchError(ValueError):
    """Weights whose keys or shapes do not fit the requested arch (message lists every problem).

    `missing`, `unexpected` and `mismatched` (wrong shape) hold the offending torchvision key
    names, in torchvision's order for expected keys and the source's order for unexpected ones.
    """

    def __init__(
        self,
        message: str,
        *,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)
        self.mismatched = tuple(mismatched)


class WeightsFileError(ValueError):
    """A weights file that cannot be read: corrupt, truncated, not weights-only, unknown type."""


class _Leaf(NamedTuple):
    """One torchvision tensor: where it lives in the Flax tree and its shape on either side."""

    flax_path: tuple[str, ...]  # (collection, module, ..., leaf)
    torch_shape: tuple[int, ...]


# By rank: conv (O, I/g, kh, kw) <-> (kh, kw, I/g, O), Linear (out, in) <-> (in, out)
_FLAX_AXES = {4: (2, 3, 1, 0), 2: (1, 0)}
_TORCH_AXES = {4: (3, 2, 0, 1), 2: (1, 0)}


def _axes(ndim: int, axes_by_ndim: Mapping[int, tuple[int, ...]]) -> tuple[int, ...]:
    return axes_by_ndim.get(ndim, tuple(range(ndim)))


def _to_flax_layout(a: np.ndarray, dtype: DTypeLike | None = None) -> np.ndarray:
    """torch layout -> Flax layout in `dtype` (None: a's), as a C-contiguous copy (never a view
    of the caller's memory)."""
    return np.array(np.transpose(a, _axes(a.ndim, _FLAX_AXES)), dtype=dtype, order="C", copy=True)


def _to_torch_layout(a: np.ndarray) -> np.ndarray:
    """Flax layout -> torch layout, as a C-contiguous copy."""
    return np.array(np.transpose(a, _axes(a.ndim, _TORCH_AXES)), order="C", copy=True)


def _torch_key(flax_path: tuple[str, ...]) -> str:
    """('params', 'layer1_0', 'downsample_conv', 'kernel') -> 'layer1.0.downsample.0.weight'."""
    collection, *modules, leaf = flax_path
    parts = [_MODULE_NAMES.get(m, re.sub(r"^(layer\d)_(\d+)$", r"\1.\2", m)) for m in modules]
    if (collection, leaf) not in _LEAF_NAMES:  # not a ResNet leaf: keep its Flax path
        return "/".join(flax_path)
    return ".".join([*parts, _LEAF_NAMES[collection, leaf]])


def _order_key(torch_key: str) -> tuple:
    """Sort key reproducing torchvision's `state_dict()` order."""
    return tuple(
        (0, int(p)) if p.isdigit() else (1, _ORDER.index(p)) if p in _ORDER else (2, p)
        for p in torch_key.split(".")
    )


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested mapping -> {path tuple: leaf}."""
    flat = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, (*prefix, name)))
        else:
            flat[(*prefix, name)] = value
    return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    """{path tuple: leaf} -> nested dicts."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


@functools.cache
def _traced(arch: str) -> dict[str, _Leaf]:
    """Every torchvision key of `arch` with a 1-class head, in torchvision's order, with its Flax
    path and torch shape, from the model's own variable tree (traced once per arch)."""
    shapes = models.variable_shapes(models.get_model(arch, num_classes=1))
    leaves = {}
    for path, leaf in _flatten(shapes).items():
        torch_shape = tuple(leaf.shape[i] for i in _axes(len(leaf.shape), _TORCH_AXES))
        leaves[_torch_key(path)] = _Leaf(path, torch_shape)
    return dict(sorted(leaves.items(), key=lambda kv: _order_key(kv[0])))


@functools.cache
def _expected(arch: str, num_classes: int | None) -> dict[str, _Leaf]:
    """`_traced(arch)` with a `num_classes` head (torch dim 0 of fc.weight and fc.bias), or none."""
    expected = {}
    for key, leaf in _traced(arch).items():
        if leaf.flax_path[:2] == ("params", "fc"):
            if num_classes is None:
                continue
            leaf = leaf._replace(torch_shape=(num_classes, *leaf.torch_shape[1:]))
        expected[key] = leaf
    return expected


def _classes_in(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """Classifier width from torch-named shapes, None when there is no `fc`."""
    if "fc.bias" in shapes and len(shapes["fc.bias"]) == 1:
        return shapes["fc.bias"][0]
    if "fc.weight" in shapes and len(shapes["fc.weight"]) == 2:
        return shapes["fc.weight"][0]
    return None


def _matches_arch(shapes: Mapping[str, tuple[int, ...]], arch: str) -> bool:
    """True when `shapes` (torch names, no num_batches_tracked) is exactly `arch` with its head."""
    expected = _expected(arch, _classes_in(shapes))
    return shapes == {k: leaf.torch_shape for k, leaf in expected.items()}


def _shapes_of(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key -> shape, leaving out torch's `num_batches_tracked` counters."""
    return {
        k: tuple(v.shape) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")
    }


def _layout(keys: Collection[str]) -> tuple[tuple[int, ...], bool]:
    """(blocks per stage, has bottleneck blocks) read off torchvision keys."""
    blocks: dict[str, set[str]] = {stage: set() for stage in models.STAGE_NAMES}
    for key in keys:
        stage, _, rest = key.partition(".")
        if stage in blocks:
            blocks[stage].add(rest.partition(".")[0])
    return tuple(len(b) for b in blocks.values()), "layer1.0.conv3.weight" in keys


@functools.cache
def _arch_layout(arch: str) -> tuple[tuple[int, ...], bool]:
    """`_layout` of an arch from its model definition, without tracing it."""
    model = models.get_model(arch)
    return tuple(model.stage_sizes), model.block_cls.expansion > 1


def detect_arch(state_dict: Mapping[str, Any]) -> str | None:
    """The arch in `models.ARCHS` whose keys and shapes `state_dict` has exactly, else None."""
    return _detect(_shapes_of(_unwrap(state_dict)))


def _detect(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """`detect_arch` on torch-named shapes."""
    layout = _layout(shapes)  # cheap filter: only archs with this block layout get traced
    candidates = [arch for arch in models.ARCHS if _arch_layout(arch) == layout]
    return next((arch for arch in candidates if _matches_arch(shapes, arch)), None)


def _fmt(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _check(
    shapes: Mapping[str, tuple[int, ...]], arch: str, num_classes: int | None, source: str
) -> None:
    """Raise `WeightsMismatchError` unless `shapes` (torch names) is exactly `arch`'s key set."""
    expected = {k: leaf.torch_shape for k, leaf in _expected(arch, num_classes).items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    misshaped = [k for k in expected if k in shapes and shapes[k] != expected[k]]
    if not (missing or unexpected or misshaped):
        return
    keys = {"missing": missing, "unexpected": unexpected, "mismatched": misshaped}
    if not shapes:
        raise WeightsMismatchError(f"{source} contains no tensors", **keys)
    other = _detect(shapes)
    if other is None and not any(k in shapes for k in expected if not k.startswith("fc.")):
        nested = _nested_arch(shapes)
        if nested is not None:
            prefix, found = nested
            raise WeightsMismatchError(
                f"{source} is not a torchvision ResNet state_dict at its top level, but its keys "
                f"under {prefix!r} are a {found} state_dict (the prefix is an attribute of the "
                "module that was saved, e.g. a PyTorch Lightning module's); pass them without "
                f"it: {{k.removeprefix({prefix!r}): v for k, v in state_dict.items() "
                f"if k.startswith({prefix!r})}}",
                **keys,
            )
        sample = ", ".join(repr(k) for k in list(shapes)[:3])
        raise WeightsMismatchError(
            f"{source} is not a torchvision ResNet state_dict: none of its {len(shapes)} keys "
            f"(e.g. {sample}) is a {arch} key",
            **keys,
        )
    if other is not None and other != arch:
        raise WeightsMismatchError(
            f"{source} looks like a {other} state_dict, not {arch} ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(misshaped)} mis-shaped keys)",
            **keys,
        )
    found_classes = _classes_in(shapes)
    if other == arch and found_classes != num_classes:
        has = "no classifier (fc)" if found_classes is None else f"{found_classes} classes"
        raise WeightsMismatchError(
            f"{source} has {has} while num_classes={num_classes} was requested for {arch}",
            **keys,
        )
    lines = [f"{source} does not match {arch} (num_classes={num_classes}):"]
    if missing:
        lines.append(f"  missing {len(missing)} keys: " + ", ".join(missing))
    if unexpected:
        lines.append(f"  unexpected {len(unexpected)} keys: " + ", ".join(unexpected))
    for k in misshaped:
        lines.append(
            f"  wrong shape for {k}: expected {_fmt(expected[k])}, found {_fmt(shapes[k])}"
        )
    raise WeightsMismatchError("\n".join(lines), **keys)


def _to_numpy(value: Any, key: str, source: str) -> np.ndarray:
    """torch.Tensor / array-like -> numpy, keeping the dtype (bfloat16 via ml_dtypes)."""
    if hasattr(value, "detach"):  # a torch.Tensor; checked by duck type so torch stays unimported
        import torch

        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    if hasattr(value, "__array__"):
        return np.asarray(value)
    raise WeightsFileError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")


def _strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Remove `WRAPPER_PREFIXES` shared by every key, in any nesting (`module._orig_mod.`)."""
    while state_dict:
        shared = [p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)]
        if not shared:
            break
        state_dict = {k.removeprefix(shared[0]): v for k, v in state_dict.items()}
    return state_dict


def _unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Strip `{"state_dict": ...}` / `{"model": ...}` wrappers and the key prefixes of torch's
    module wrappers (`module.`, `_orig_mod.`).

    Other prefixes shared by keys (Lightning's `model.`, `backbone.`, `ema.`) are attributes of
    the user's own module, which may hold several networks, so they are never guessed away:
    `_check` names the prefix and the arch found under it instead.
    """
    while True:
        inner = next((state_dict[k] for k in WRAPPER_KEYS if k in state_dict), None)
        if not isinstance(inner, Mapping):
            break
        state_dict = inner
    return _strip_wrapper_prefixes(state_dict)


def _nested_arch(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, str] | None:
    """(prefix, arch) for the first dotted prefix, one or two names deep (`model.`,
    `model.backbone.`), whose keys are, without it, exactly an arch in `models.ARCHS`."""
    prefixes = sorted(
        {".".join(k.split(".")[:depth]) + "." for k in shapes for depth in (1, 2)}
        - {k + "." for k in shapes}
    )
    for prefix in prefixes:
        inner = {k.removeprefix(prefix): v for k, v in shapes.items() if k.startswith(prefix)}
        found = _detect(_strip_wrapper_prefixes(inner))
        if found is not None:
            return prefix, found
    return None


def _first_line(err: BaseException, prefer: str = "") -> str:
    """First sentence of an exception's message, from the first line containing `prefer`."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [""]
    line = next((ln for ln in lines if prefer and prefer in ln.lower()), lines[0])
    return f"{type(err).__name__}: {line.split('. ')[0]}"


def _read_file(path: Path) -> Mapping[str, Any]:
    """Read a `.pth`/`.pt` (weights_only) or `.safetensors` file into a mapping."""
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        import ml_dtypes  # noqa: F401  (lets numpy, hence safetensors.numpy, read bfloat16)
        import safetensors.numpy

        try:
            return safetensors.numpy.load_file(path)
        except Exception as err:
            raise WeightsFileError(
                f"cannot read {path} as safetensors (truncated or corrupt?): {_first_line(err)}"
            ) from err
    if suffix not in TORCH_SUFFIXES:
        raise WeightsFileError(
            f"{path}: unknown weights file type {suffix!r}; expected .pth, .pt or .safetensors"
        )
    import pickle

    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" not in str(err).lower():
            raise WeightsFileError(f"cannot read {path}: {_first_line(err)}") from err
        raise WeightsFileError(
            f"{path} is not a plain weights file: torch.load(weights_only=True) refused it because "
            f"unpickling it could run arbitrary code ({_first_line(err, 'unsupported')})"
        ) from err
    except Exception as err:
        raise WeightsFileError(
            f"cannot read {path} as a PyTorch file (truncated or corrupt?): {_first_line(err)}"
        ) from err
    if not isinstance(loaded, Mapping):
        raise WeightsFileError(f"{path} holds a {type(loaded).__name__}, not a state_dict")
    return loaded


def is_torch_weights_file(path: str | os.PathLike) -> bool:
    """Whether `path` is named like a torchvision weights file this module reads (.pth, .pt,
    .safetensors, in any case), e.g. to tell it from a resnet_jax checkpoint directory; the
    file's existence and contents are not checked."""
    return Path(path).suffix.lower() in WEIGHTS_SUFFIXES


def _source_name(source: Any) -> str:
    """How error messages refer to a weights source."""
    return str(source) if isinstance(source, str | Path) else "the given state_dict"


def load_state_dict(source: Mapping[str, Any] | str | Path) -> dict[str, np.ndarray]:
    """A state_dict or weights file as `{torch key: numpy array}`, minus wrapper dicts and the
    `module.`/`_orig_mod.` key prefixes of DataParallel and torch.compile."""
    name = _source_name(source)
    if isinstance(source, str | Path):
        source = _read_file(Path(source))
    if not isinstance(source, Mapping):
        raise TypeError(f"expected a state_dict or a path, got {type(source).__name__}")
    return {k: _to_numpy(v, k, name) for k, v in _unwrap(source).items()}


def num_classes_of(state_dict: Mapping[str, Any]) -> int | None:
    """Classifier width of a torchvision state_dict (`fc.weight` rows), None if headless."""
    return _classes_in(_shapes_of(_unwrap(state_dict)))


def _is_floating(dtype: DTypeLike) -> bool:
    """Whether `dtype` is a floating-point type, ml_dtypes' bfloat16 included."""
    return bool(jnp.issubdtype(dtype, jnp.floating))


def from_torchvision(
    source: Mapping[str, Any] | str | Path,
    arch: str,
    num_classes: int | None = None,
    *,
    dtype: DTypeLike | None = np.float32,
) -> dict[str, dict]:
    """torchvision weights -> `{"params", "batch_stats"}` for `models.get_model(arch, ...)`.

    `num_classes=None` takes the head from the weights (none if they have no `fc`). Raises
    `WeightsMismatchError` listing every missing, unexpected or mis-shaped key.

    Every leaf is cast to `dtype`, float32 by default whatever the file holds: the models keep
    float32 parameters and statistics (also when computing in bfloat16), and float16 or bfloat16
    BatchNorm statistics would make `var + eps` and its rsqrt lose precision. `dtype=None` keeps
    the file's float types (exact round trips of float16/bfloat16 files); `jnp.float64` serves
    exactness checks under `jax_enable_x64`. torch's integer `num_batches_tracked` counters are
    not part of the Flax variables and are dropped (`to_torchvision` writes them as 0).
    """
    models.check_arch(arch)
    if dtype is not None and not _is_floating(dtype):
        raise ValueError(f"dtype must be a floating-point type or None, got {dtype!r}")
    state_dict = load_state_dict(source)
    if num_classes is None:
        num_classes = num_classes_of(state_dict)
    name = _source_name(source)
    _check(_shapes_of(state_dict), arch, num_classes, name)
    expected = _expected(arch, num_classes)
    not_float = [
        f"{k} ({state_dict[k].dtype})" for k in expected if not _is_floating(state_dict[k].dtype)
    ]
    if not_float:
        raise WeightsFileError(
            f"{name}: expected floating-point tensors, found {len(not_float)} others: "
            + ", ".join(not_float)
        )
    flat = {
        leaf.flax_path: _to_flax_layout(state_dict[key], dtype) for key, leaf in expected.items()
    }
    return _unflatten(flat)


def _to_tensor(a: np.ndarray) -> Any:
    """numpy -> torch.Tensor sharing memory; ml_dtypes' bfloat16 (unknown to torch) via int16."""
    import torch

    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def fold_appended_head(variables: Mapping[str, Any]) -> dict:
    """`variables` of a model with an appended `head` on its `fc` (`ResNet.fc_classes`) as
    those of the plain model computing the same logits: two linear layers with nothing between
    compose into one, ``fc(x) @ W_h + b_h = x @ (W_fc @ W_h) + (b_fc @ W_h + b_h)``. Computed in
    float64, stored in fc's dtype. Variables without a `head` are returned as they are."""
    params = dict(variables["params"])
    if "head" not in params:
        return dict(variables)
    head, fc = params.pop("head"), params["fc"]
    dtype = np.asarray(fc["kernel"]).dtype
    w_fc, b_fc, w_head, b_head = (
        np.asarray(layer[name], np.float64)
        for layer, name in ((fc, "kernel"), (fc, "bias"), (head, "kernel"), (head, "bias"))
    )
    params["fc"] = {
        "kernel": (w_fc @ w_head).astype(dtype),
        "bias": (b_fc @ w_head + b_head).astype(dtype),
    }
    return {**variables, "params": params}


def to_torchvision(variables: Mapping[str, Any], arch: str) -> OrderedDict[str, Any]:
    """Flax `{"params", "batch_stats"}` -> torchvision state_dict (strict-loadable, same dtype).

    A model with an appended `head` (`--head append`) is exported with `fc` and `head` folded
    into one `fc` (`fold_appended_head`), so it loads into torchvision's model; its other leaves
    are copied as they are.

    Every parameter and running statistic is copied bit for bit, so torch -> Flax -> torch gives
    them back unchanged (for a file that is not float32, with `from_torchvision(..., dtype=None)`);
    each BatchNorm's `num_batches_tracked` is written as 0, because the Flax variables hold no
    counter: `models.BatchNorm` updates its statistics with momentum 0.9 (torch's 0.1) and never
    counts batches, so after training here no count would describe the statistics. torch only
    reads the counter with `momentum=None` (a cumulative average): there a counter of 0 makes the
    next train-mode batch restart the average; set the counters yourself to continue one.
    """
    import torch

    models.check_arch(arch)
    variables = fold_appended_head(variables)
    flat = {_torch_key(p): _to_torch_layout(np.asarray(v)) for p, v in _flatten(variables).items()}
    shapes = _shapes_of(flat)
    num_classes = _classes_in(shapes)
    _check(shapes, arch, num_classes, "the Flax variables (shown with torchvision key names)")
    out: OrderedDict[str, Any] = OrderedDict()
    for key in _expected(arch, num_classes):
        out[key] = _to_tensor(flat[key])
        if key.endswith(".running_var"):  # torchvision's BN buffers end with this counter
            counter = key.removesuffix("running_var") + "num_batches_tracked"
            out[counter] = torch.zeros((), dtype=torch.int64)
    return out


def save_torchvision(state_dict: Mapping[str, Any], path: str | Path) -> Path:
    """Write a torch state_dict to `.pth`/`.pt` (torch.save) or `.safetensors`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not is_torch_weights_file(path):
        raise ValueError(
            f"{path}: unknown weights file type {suffix!r}; use .pth, .pt or .safetensors"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == SAFETENSORS_SUFFIX:
        import safetensors.torch

        safetensors.torch.save_file(dict(state_dict), path)
    else:
        import torch

        torch.save(OrderedDict(state_dict), path)
    return path
