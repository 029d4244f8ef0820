"""ResNet family in flax.linen with torchvision's exact computation and parameter names.

Module and parameter names mirror torchvision (`conv1`, `bn1`, `layer1_0`, ..., `fc`) so that
weight conversion is a short mapping (see `resnet_jax.convert`). Input is NHWC, normalised with
ImageNet mean/std as torchvision expects; BatchNorm state lives in the `batch_stats` collection.
The convolutions (`resnet_jax.layers.Conv`) take XLA:CPU's fastest formulations only when the
model is compiled for CPU, so an accelerator program is plain convolutions, pooling and BatchNorm.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import layers
from resnet_jax.layers import Conv

Dtype = Any
ModuleDef = Callable[..., nn.Module]

STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")

# nn.Linear's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv_kernel_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32):
    """kaiming_normal_(mode="fan_out"): untruncated N(0, 2 / (kh * kw * out)), HWIO kernels."""
    fan_out = shape[0] * shape[1] * shape[-1]
    return jax.random.normal(key, shape, dtype) * jnp.sqrt(2.0 / fan_out).astype(dtype)


def _dense_bias_init(fan_in: int) -> Callable:
    """nn.Linear's bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class BatchNorm(nn.Module):
    """BatchNorm with PyTorch's semantics.

    Normalises with the biased batch variance and updates `running_var` with the unbiased one
    (n / (n - 1)), exactly as torch does, so converted weights fine-tune identically. Statistics
    are computed in at least float32 whatever the compute dtype. With `axis_name` they are the
    global batch's over that mapped axis (synchronised BatchNorm: one collective per layer and
    pass, see `layers.batch_norm_train`); without, each replica's own batch's.
    """

    use_running_average: bool
    momentum: float = 0.9  # Flax convention: torch's momentum 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None
    scale_init: Callable = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        stats_dtype = jnp.promote_types(self.dtype, jnp.float32)
        scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), stats_dtype)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), stats_dtype)

        xs = x.astype(stats_dtype)
        scale, bias = scale.astype(stats_dtype), bias.astype(stats_dtype)
        if self.use_running_average:
            mul = scale * jax.lax.rsqrt(running_var.value + self.epsilon)
            y = (xs - running_mean.value) * mul + bias
        else:
            y, mean, var = layers.batch_norm_train(xs, scale, bias, self.epsilon, self.axis_name)
            if not self.is_initializing():
                m = self.momentum
                count = layers.batch_count(x, self.axis_name)
                unbiased_var = var * (count / max(count - 1, 1))
                running_mean.value = m * running_mean.value + (1 - m) * mean
                running_var.value = m * running_var.value + (1 - m) * unbiased_var
        return y.astype(self.dtype)


def _pad(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """torchvision's symmetric padding (k // 2), unlike 'SAME' which pads asymmetrically."""
    p = kernel_size // 2
    return ((p, p), (p, p))


def block_layers(
    train: bool,
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    axis_name: str | None = None,
    conv: ModuleDef = Conv,
    platform: str | None = None,
) -> dict[str, ModuleDef]:
    """The `conv` and `norm` a block is built with, as `ResNet` builds them: bias-free convs with
    torchvision's init (and `platform`, when given), and `BatchNorm` on batch statistics when
    `train` (else running ones). For the blocks in other networks:
    ``BasicBlock(planes=64, **block_layers(train=True))``."""
    conv_options = {} if platform is None else {"platform": platform}
    return {
        "conv": functools.partial(
            conv,
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=conv_kernel_init,
            **conv_options,
        ),
        "norm": functools.partial(
            BatchNorm,
            use_running_average=not train,
            dtype=dtype,
            param_dtype=param_dtype,
            axis_name=axis_name,
        ),
    }


class ResidualBlock(nn.Module):
    """Fields shared by both torchvision blocks; `downsample` adds the 1x1 conv + BN shortcut.
    `conv` and `norm` are module factories: `block_layers(train)` gives ResNet's."""

    planes: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    downsample: bool = False
    groups: int = 1
    base_width: int = 64
    zero_init_residual: bool = False


class BasicBlock(ResidualBlock):
    """Two 3x3 convs with a residual connection (ResNet-18/34). expansion = 1."""

    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.groups != 1 or self.base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64 (as torchvision)")
        s = (self.strides, self.strides)
        y = self.conv(self.planes, (3, 3), s, padding=_pad(3), name="conv1")(x)
        y = layers.relu(self.norm(name="bn1")(y))
        y = self.conv(self.planes, (3, 3), padding=_pad(3), name="conv2")(y)
        last_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.norm(name="bn2", scale_init=last_init)(y)
        if self.downsample:
            x = self.conv(self.planes, (1, 1), s, padding=_pad(1), name="downsample_conv")(x)
            x = self.norm(name="downsample_bn")(x)
        return layers.relu(y + x)


class Bottleneck(ResidualBlock):
    """1x1 -> 3x3 (stride, groups) -> 1x1 with a residual connection (ResNet-50+). expansion = 4.

    The stride sits on the 3x3 conv as in torchvision ("ResNet v1.5").
    """

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = int(self.planes * (self.base_width / 64.0)) * self.groups
        s = (self.strides, self.strides)
        y = self.conv(width, (1, 1), padding=_pad(1), name="conv1")(x)
        y = layers.relu(self.norm(name="bn1")(y))
        y = self.conv(
            width, (3, 3), s, padding=_pad(3), feature_group_count=self.groups, name="conv2"
        )(y)
        y = layers.relu(self.norm(name="bn2")(y))
        y = self.conv(self.planes * self.expansion, (1, 1), padding=_pad(1), name="conv3")(y)
        last_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.norm(name="bn3", scale_init=last_init)(y)
        if self.downsample:
            out = self.planes * self.expansion
            x = self.conv(out, (1, 1), s, padding=_pad(1), name="downsample_conv")(x)
            x = self.norm(name="downsample_bn")(x)
        return layers.relu(y + x)


class FeatureInfo(NamedTuple):
    """One intermediate feature tap: its name, channel count and stride w.r.t. the input."""

    name: str
    channels: int
    reduction: int


class ResNet(nn.Module):
    """ResNet as in torchvision.models.resnet.ResNet, NHWC.

    Attributes:
      stage_sizes: blocks per stage (layer1..layer4).
      block_cls: `BasicBlock` or `Bottleneck`.
      num_classes: classifier width (the logits' size); `None` drops the head and returns
        pooled features.
      fc_classes: None: `fc` is the classifier, `num_classes` wide. Otherwise `fc` is
        `fc_classes` wide (a pretrained classifier, e.g. ImageNet's 1000 classes) and a new
        Dense layer `head` maps its logits to `num_classes` (transfer learning's `--head
        append`); `classifier_widths(params)` reads both widths back from the params.
      groups, width_per_group: ResNeXt / Wide ResNet options (torchvision's names).
      zero_init_residual: initialise each block's last BN scale to zero.
      dtype: compute dtype (e.g. bfloat16, or float64 for exactness tests); params stay
        `param_dtype` and BatchNorm statistics at least float32.
      axis_name: mapped axis over which BatchNorm statistics are averaged (data parallelism).
      frozen_bn: names among ("stem", "layer1", ..., "layer4") whose BatchNorm layers use their
        running statistics (and leave them unchanged) even when `train=True` (transfer learning).
      conv: the convolution module; `Conv` (same parameters as `nn.Conv`, XLA:CPU's fastest
        forms on CPU) by default, `flax.linen.Conv` works too.
      platform: the backend the model is compiled for, passed to each `conv` when given (None:
        `Conv` asks `jax.default_backend()` when traced); e.g. "cuda" or "tpu" to export or
        compile for an accelerator from a CPU host.
    """

    stage_sizes: Sequence[int]
    block_cls: type[nn.Module]
    num_classes: int | None = 1000
    fc_classes: int | None = None
    groups: int = 1
    width_per_group: int = 64
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None
    frozen_bn: Sequence[str] = ()
    conv: ModuleDef = Conv
    platform: str | None = None

    def feature_info(self) -> list[FeatureInfo]:
        """Channels and reduction of each tap returned by `__call__(..., return_features=True)`:
        `act1` (the stem's ReLU, before max-pooling), `stem` (after it), layer1..layer4, and
        `pre_logits`, the globally pooled layer4 features (a vector per image, pooled from the
        stride-32 map)."""
        expansion = self.block_cls.expansion
        info = [FeatureInfo("act1", 64, 2), FeatureInfo("stem", 64, 4)]
        for i, name in enumerate(STAGE_NAMES):
            info.append(FeatureInfo(name, 64 * 2**i * expansion, 4 * 2**i))
        info.append(FeatureInfo("pre_logits", 512 * expansion, 32))
        return info

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, return_features: bool = False
    ) -> jax.Array | dict[str, jax.Array]:
        """Logits (or pooled features if `num_classes is None`), or with `return_features` a dict
        of every tap in `feature_info()` plus `logits` when the model has a head (and `fc`, the
        logits of the pretrained classifier under an appended `head`, with `fc_classes`)."""
        sizes = tuple(self.stage_sizes)
        if len(sizes) != len(STAGE_NAMES) or not all(isinstance(n, int) and n > 0 for n in sizes):
            raise ValueError(
                f"stage_sizes: expected {len(STAGE_NAMES)} positive block counts (layer1..layer4), "
                f"got {self.stage_sizes!r}"
            )
        if self.fc_classes is not None and self.num_classes is None:
            raise ValueError("fc_classes needs num_classes: the appended head's width")
        frozen = set(self.frozen_bn)
        unknown = frozen - {"stem", *STAGE_NAMES}
        if unknown:
            raise ValueError(f"frozen_bn: unknown names {sorted(unknown)}; use stem, layer1..4")

        def layers_for(stage: str) -> dict[str, ModuleDef]:
            return block_layers(
                train and stage not in frozen,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                axis_name=self.axis_name,
                conv=self.conv,
                platform=self.platform,
            )

        features = {}
        x = x.astype(self.dtype)
        stem = layers_for("stem")
        x = stem["conv"](64, (7, 7), (2, 2), padding=_pad(7), name="conv1")(x)
        x = layers.relu(stem["norm"](name="bn1")(x))
        features["act1"] = x
        x = layers.max_pool(x, 3, 2, 1)
        features["stem"] = x

        in_channels = 64
        for i, (stage, num_blocks) in enumerate(zip(STAGE_NAMES, sizes, strict=True)):
            planes = 64 * 2**i
            stage_layers = layers_for(stage)
            for j in range(num_blocks):
                strides = 2 if i > 0 and j == 0 else 1
                out_channels = planes * self.block_cls.expansion
                x = self.block_cls(
                    planes=planes,
                    **stage_layers,
                    strides=strides,
                    downsample=strides != 1 or in_channels != out_channels,
                    groups=self.groups,
                    base_width=self.width_per_group,
                    zero_init_residual=self.zero_init_residual,
                    name=f"{stage}_{j}",
                )(x)
                in_channels = out_channels
            features[stage] = x

        x = jnp.mean(x.astype(jnp.promote_types(self.dtype, jnp.float32)), axis=(1, 2))
        features["pre_logits"] = x
        if self.num_classes is not None:
            fc_width = self.num_classes if self.fc_classes is None else self.fc_classes
            x = self._dense(fc_width, in_channels, "fc")(x.astype(self.dtype))
            if self.fc_classes is not None:
                features["fc"] = x
                x = self._dense(self.num_classes, fc_width, "head")(x)
            features["logits"] = x
        return features if return_features else x

    def _dense(self, features: int, fan_in: int, name: str) -> nn.Dense:
        """A classifier layer with torch.nn.Linear's initialisation."""
        return nn.Dense(
            features,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=dense_kernel_init,
            bias_init=_dense_bias_init(fan_in),
            name=name,
        )


_basic = functools.partial(ResNet, block_cls=BasicBlock)
_bottleneck = functools.partial(ResNet, block_cls=Bottleneck)

resnet18 = functools.partial(_basic, stage_sizes=(2, 2, 2, 2))
resnet34 = functools.partial(_basic, stage_sizes=(3, 4, 6, 3))
resnet50 = functools.partial(_bottleneck, stage_sizes=(3, 4, 6, 3))
resnet101 = functools.partial(_bottleneck, stage_sizes=(3, 4, 23, 3))
resnet152 = functools.partial(_bottleneck, stage_sizes=(3, 8, 36, 3))
resnext50_32x4d = functools.partial(resnet50, groups=32, width_per_group=4)
resnext101_32x8d = functools.partial(resnet101, groups=32, width_per_group=8)
resnext101_64x4d = functools.partial(resnet101, groups=64, width_per_group=4)
wide_resnet50_2 = functools.partial(resnet50, width_per_group=128)
wide_resnet101_2 = functools.partial(resnet101, width_per_group=128)

ARCHS: dict[str, Callable[..., ResNet]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
    "resnext50_32x4d": resnext50_32x4d,
    "resnext101_32x8d": resnext101_32x8d,
    "resnext101_64x4d": resnext101_64x4d,
    "wide_resnet50_2": wide_resnet50_2,
    "wide_resnet101_2": wide_resnet101_2,
}


def check_arch(name: str) -> str:
    """Return `name` if it is a known arch, else raise naming the closest match and all choices."""
    if name in ARCHS:
        return name
    close = difflib.get_close_matches(name, ARCHS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown arch {name!r}.{hint} Valid archs: {', '.join(ARCHS)}")


def get_model(name: str, **kwargs: Any) -> ResNet:
    """Build an arch by torchvision name, e.g. `get_model("resnet50", num_classes=5)`."""
    return ARCHS[check_arch(name)](**kwargs)


def classifier_widths(params: Mapping[str, Any]) -> dict[str, int | None]:
    """`{"num_classes", "fc_classes"}` of the `ResNet` a params tree belongs to, from its shapes:
    the width of `head` (when present) or `fc` (None without either), and `fc`'s width under a
    `head` (else None). ``get_model(arch, **classifier_widths(params))`` rebuilds the model."""
    widths = {name: int(np.shape(params[name]["kernel"])[-1]) for name in ("fc", "head")
              if name in params}  # fmt: skip
    if "head" in widths:
        return {"num_classes": widths["head"], "fc_classes": widths.get("fc")}
    return {"num_classes": widths.get("fc"), "fc_classes": None}


def init_variables(model: ResNet, rng: jax.Array, image_size: int = 224) -> dict:
    """Initialise `{"params", "batch_stats"}` for `model` with a dummy NHWC batch."""
    dummy = jnp.zeros((1, image_size, image_size, 3), model.dtype)
    return dict(jax.jit(functools.partial(model.init, train=False))(rng, dummy))


def variable_shapes(model: ResNet) -> dict:
    """Shape/dtype tree of the model's variables without allocating or computing anything."""
    dummy = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return dict(
        jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), dummy)
    )


def _flat_shapes(variables: Mapping) -> dict[str, tuple[int, ...]]:
    """{leaf path: shape} of the params and batch_stats of a variables tree (a missing
    collection has no leaves)."""
    tree = {c: variables.get(c, {}) for c in ("params", "batch_stats")}
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in leaves}


@functools.lru_cache(maxsize=32)
def _cached_model_shapes(model: ResNet) -> dict[str, tuple[int, ...]]:
    """`_flat_shapes` of a (hashable) model's variables; tracing one takes about a second."""
    return _flat_shapes(variable_shapes(model))


def _model_shapes(model: ResNet) -> dict[str, tuple[int, ...]]:
    """`_flat_shapes` of the variables `model` creates, cached for hashable models (those of
    `models.get_model`; list-valued attributes make a hand-built one unhashable)."""
    try:
        hash(model)
    except TypeError:
        return _flat_shapes(variable_shapes(model))
    return _cached_model_shapes(model)


def _leaves(n: int) -> str:
    return f"{n} leaf" if n == 1 else f"{n} leaves"


def check_variables(
    variables: Mapping, model: ResNet, where: str, *, what: str = "the model"
) -> None:
    """Raise ValueError unless `variables` has exactly the params and batch_stats leaves and
    shapes of `model`; the message starts with `where`, calls the model `what` and names every
    missing, unexpected and mis-shaped leaf. Dtypes are not compared."""
    want, got = _model_shapes(model), _flat_shapes(variables)
    missing = sorted(want.keys() - got.keys())
    unexpected = sorted(got.keys() - want.keys())
    misshaped = sorted(k for k in want.keys() & got.keys() if got[k] != want[k])
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{where}: variables do not match {what}:"]
    if missing:
        lines.append(f"  missing {_leaves(len(missing))}: " + ", ".join(missing))
    if unexpected:
        lines.append(f"  unexpected {_leaves(len(unexpected))}: " + ", ".join(unexpected))
    lines += [f"  wrong shape for {k}: expected {want[k]}, found {got[k]}" for k in misshaped]
    raise ValueError("\n".join(lines))
