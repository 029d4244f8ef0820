"""XLA:CPU convolutions on ResNet shapes: kernel libraries, and ResNeXt's grouped convolutions.

Default: YNNPACK (XLA's default) vs Eigen (what `resnet_jax.cpu.configure` picks), the forward
convolution and its input gradient for each distinct kxk convolution of ResNet-50 at 224 px,
compiled once with each kernel library through per-jit compiler options.

`--grouped`: the grouped 3x3 convolutions of a ResNeXt (`--arch`, default resnext50_32x4d; each
distinct shape at 224 px), per pass: XLA's grouped convolution
with its own gradients, the same on the merged groups `resnet_jax.cpu.conv` uses (block-diagonal
kernels, fewer and larger groups), and `resnet_jax.cpu.conv.conv2d` (one dense convolution per
merged group), all on the process's kernels (Eigen: the script applies the library's CPU settings
first, `resnet_jax.cli_args.setup_platform`).
`--merge-sweep`: the same shapes, forward + input gradient + weight gradient of `conv.conv2d`
with groups merged into at least 4 (i.e. not merged), 8, ..., 64 input channels per merged group
without a cap on their number, and with the library's settings: the sweep that chose
`conv.MERGED_GROUP_CHANNELS`.
`--weight-grad`: ResNet-50's kxk convolutions (outputs above `conv.SMALL_OUTPUT_PIXELS`), forward
+ input gradient + weight gradient, XLA's own weight gradient vs a matmul weight gradient
(`conv._conv_matmul_weight_grad`), on Eigen; then the same for the ResNeXt's grouped convolutions
as `conv._split_groups_conv`; "library" says which one `conv.conv2d` takes. Run at several batch
sizes, it chose `conv.MATMUL_WEIGHT_GRAD_MAX_BATCH`.
`--vs-torch ARCH`: every distinct convolution of ARCH (1x1, kxk, grouped; shapes recorded from
torchvision's model at --image-size), forward + the gradients a train step needs, `conv.conv2d`
vs torch's `Conv2d` (NCHW, as `bench_models.py` runs it), each times how often the net runs it:
where a whole network's train step gains or loses against torch's.

Variants alternate call by call; medians.
Example: python benchmarks/bench_convs.py --batch-size 8 --rounds 7
"""

from __future__ import annotations

import argparse
import collections
import functools
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator
from unittest import mock

import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax import cli_args, layers, models
from resnet_jax.cpu import conv, xla_flags

# (input size, in channels, out channels, kernel, stride) of ResNet-50's kxk convolutions
SHAPES = [
    (224, 3, 64, 7, 2),
    (56, 64, 64, 3, 1),
    (56, 128, 128, 3, 2),
    (28, 128, 128, 3, 1),
    (28, 256, 256, 3, 2),
    (14, 256, 256, 3, 1),
    (14, 512, 512, 3, 2),
    (7, 512, 512, 3, 1),
]
KERNELS = {"YNNPACK": xla_flags.YNN_DEFAULT_COMPILER_OPTIONS, "Eigen": xla_flags.COMPILER_OPTIONS}


def _passes(convolve: Callable, weight_grad: bool) -> dict[str, Callable]:
    """The convolution, its input gradient and optionally its weight gradient, of (x, w)."""

    def grad(argnum: int) -> Callable:
        def pass_(x, w):
            y, vjp = jax.vjp(convolve, x, w)
            return vjp(jnp.ones_like(y))[argnum]

        return pass_

    passes = {"forward": convolve, "input grad": grad(0)}
    if weight_grad:
        passes["weight grad"] = grad(1)
    return passes


def _medians_ms(compiled: dict[str, Callable], x, w, rounds: int) -> list[float]:
    """Median wall time (ms) of each compiled variant, called alternately; one warm-up round."""
    times = {name: [] for name in compiled}
    for _ in range(rounds + 1):
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(x, w))
            times[name].append(time.perf_counter() - start)
    return [statistics.median(t[1:]) * 1e3 for t in times.values()]


def kernel_libraries(batch: int, rounds: int) -> None:
    """YNNPACK vs Eigen on ResNet-50's kxk convolutions."""
    print("| input | channels | kernel/stride | pass | YNNPACK ms | Eigen ms | Eigen/YNNPACK |")
    print("|---|---|---|---|---|---|---|")
    key = jax.random.key(0)
    for size, cin, cout, k, stride in SHAPES:
        x = jax.random.normal(key, (batch, size, size, cin))
        w = jax.random.normal(key, (k, k, cin, cout)) * 0.05
        pad = ((k // 2, k // 2),) * 2

        def convolve(x, w, stride=stride, pad=pad):
            return lax.conv_general_dilated(
                x, w, (stride,) * 2, pad, dimension_numbers=layers.DIMENSION_NUMBERS
            )

        for name, fn in _passes(convolve, weight_grad=False).items():
            compiled = {
                lib: jax.jit(fn, compiler_options=opts).lower(x, w).compile()
                for lib, opts in KERNELS.items()
            }
            ynn, eigen = _medians_ms(compiled, x, w, rounds)
            print(
                f"| {size}x{size} | {cin}->{cout} | {k}x{k}/{stride} | {name} | {ynn:.1f} | "
                f"{eigen:.1f} | {eigen / ynn:.2f} |",
                flush=True,
            )


@functools.cache
def grouped_shapes(arch: str) -> tuple[int, tuple[tuple[int, int, int], ...]]:
    """The groups of `arch` and the (input size, channels, stride) of each distinct grouped
    convolution it runs at 224 px, in the order the net runs them (recorded once per arch)."""
    grouped = [
        (shape[2], shape[1], stride[0], groups)
        for shape, _, _, stride, _, groups in _torchvision_convolutions(arch, 1, 224)
        if groups > 1
    ]
    if not grouped:
        raise SystemExit(f"bench_convs: {arch} has no grouped convolutions; choose a ResNeXt")
    return grouped[0][3], tuple(shape[:3] for shape in grouped)


def _grouped_operands(arch: str, batch: int) -> Iterator[tuple]:
    """(size, channels, groups, stride, x, w) for each of `arch`'s grouped shapes, random data."""
    key = jax.random.key(0)
    groups, shapes = grouped_shapes(arch)
    for size, channels, stride in shapes:
        x = jax.random.normal(key, (batch, size, size, channels))
        w = jax.random.normal(key, (3, 3, channels // groups, channels)) * 0.05
        yield size, channels, groups, stride, x, w


def _xla_merged(x, w, strides, pad, groups):
    """XLA's grouped convolution over the merged groups `conv.conv2d` uses (block-diagonal
    kernels), with XLA's own gradients."""
    kernels = conv._block_diagonal_kernels(w, groups)
    merged, kh, kw, cin, _ = kernels.shape
    kernel = jnp.moveaxis(kernels, 0, 3).reshape(kh, kw, cin, -1)
    return conv._lax_conv(x, kernel, strides, pad, merged)


def grouped(arch: str, batch: int, rounds: int) -> None:
    """XLA's grouped convolution and gradients, on the groups as they are and merged, vs
    `conv.conv2d` on `arch`'s grouped shapes."""
    print(
        "| input | channels/groups | stride | pass | XLA ms | XLA merged ms | resnet_jax ms "
        "| XLA/resnet_jax |"
    )
    print("|---|---|---|---|---|---|---|---|")
    pad = ((1, 1), (1, 1))
    for size, channels, groups, stride, x, w in _grouped_operands(arch, batch):
        strides = (stride, stride)
        variants = {
            "XLA": lambda x, w, s=strides, g=groups: conv._lax_conv(x, w, s, pad, g),
            "XLA merged": lambda x, w, s=strides, g=groups: _xla_merged(x, w, s, pad, g),
            "resnet_jax": lambda x, w, s=strides, g=groups: conv.conv2d(x, w, s, pad, g),
        }
        passes = {name: _passes(fn, weight_grad=True) for name, fn in variants.items()}
        for pass_name in passes["XLA"]:
            compiled = {
                name: jax.jit(p[pass_name]).lower(x, w).compile() for name, p in passes.items()
            }
            xla_ms, merged_ms, ours_ms = _medians_ms(compiled, x, w, rounds)
            print(
                f"| {size}x{size} | {channels}/{groups} | {stride} | {pass_name} | {xla_ms:.1f} | "
                f"{merged_ms:.1f} | {ours_ms:.1f} | {xla_ms / ours_ms:.1f} |",
                flush=True,
            )


def merge_sweep(arch: str, batch: int, rounds: int) -> None:
    """All three passes of `conv.conv2d` on `arch`'s grouped shapes for several
    `conv.MERGED_GROUP_CHANNELS` (read when the convolution is traced), uncapped, and with the
    library's settings."""
    targets = (4, 8, 16, 32, 64)
    groups, _ = grouped_shapes(arch)
    settings = {t: dict(MERGED_GROUP_CHANNELS=t, MAX_GROUP_CONVOLUTIONS=groups) for t in targets}
    settings["library"] = dict(MERGED_GROUP_CHANNELS=conv.MERGED_GROUP_CHANNELS)
    print(
        "| input | channels/groups | stride | "
        + " | ".join(f"merged to {t} ms" for t in targets)
        + f" | library ({conv.MERGED_GROUP_CHANNELS}, <= {conv.MAX_GROUP_CONVOLUTIONS} groups) ms |"
    )
    print("|---|---|---|" + "---|" * len(settings))
    pad = ((1, 1), (1, 1))
    for size, channels, groups, stride, x, w in _grouped_operands(arch, batch):
        compiled = {}
        for name, patch in settings.items():
            fn = _all_passes(conv.conv2d, stride, pad, groups)
            with mock.patch.multiple(conv, **patch):  # a fresh `fn`: jit caches traces by function
                compiled[name] = jax.jit(fn).lower(x, w).compile()
        medians = _medians_ms(compiled, x, w, rounds)
        print(
            f"| {size}x{size} | {channels}/{groups} | {stride} | "
            + " | ".join(f"{ms:.1f}" for ms in medians)
            + " |",
            flush=True,
        )


def _all_passes(
    convolve: Callable, stride: int, pad, groups: int = 1, input_grad: bool = True
) -> Callable:
    """(x, w) -> `convolve(x, w, strides, pad, groups)` and its gradients (cotangent: the
    output): both, or only the weight gradient (`input_grad=False`, a net's stem)."""

    def fn(x, w):
        y, vjp = jax.vjp(lambda x, w: convolve(x, w, (stride, stride), pad, groups), x, w)
        dx, dw = vjp(y)
        return (y, (dx, dw)) if input_grad else (y, dw)

    return fn


def weight_grad(arch: str, batch: int, rounds: int) -> None:
    """Forward + input gradient + weight gradient with XLA's own vs a matmul weight gradient,
    on the process's kernels (Eigen): ResNet-50's convolutions as XLA's, `arch`'s grouped ones
    as `conv._split_groups_conv`."""
    print("| input | channels | kernel/stride | XLA dW ms | matmul dW ms | XLA/matmul | library |")
    print("|---|---|---|---|---|---|---|")
    key = jax.random.key(0)
    groups, shapes = grouped_shapes(arch)
    cases = [
        (size, f"{cin}->{cout}", k, stride, (batch, size, size, cin), (k, k, cin, cout), 1)
        for size, cin, cout, k, stride in SHAPES
        if (size // stride) ** 2 > conv.SMALL_OUTPUT_PIXELS  # else always one im2col matmul
    ] + [
        (
            size,
            f"{ch}/{groups}",
            3,
            stride,
            (batch, size, size, ch),
            (3, 3, ch // groups, ch),
            groups,
        )
        for size, ch, stride in shapes
    ]
    for size, channels, k, stride, x_shape, w_shape, groups in cases:
        x = jax.random.normal(key, x_shape)
        w = jax.random.normal(key, w_shape) * 0.05
        pad = ((k // 2, k // 2),) * 2
        forward = conv._lax_conv if groups == 1 else conv._split_groups_conv
        matmul = functools.partial(conv._conv_matmul_weight_grad, forward=forward)
        compiled = {
            name: jax.jit(_all_passes(convolve, stride, pad, groups)).lower(x, w).compile()
            for name, convolve in (("XLA", forward), ("matmul", matmul))
        }
        xla_ms, matmul_ms = _medians_ms(compiled, x, w, rounds)
        chosen = conv._cpu_formulation(x.shape, w.shape, (stride, stride), pad, groups)
        own = chosen is None or getattr(chosen, "func", None) is conv._split_groups_conv
        print(
            f"| {size}x{size} | {channels} | {k}x{k}/{stride} | {xla_ms:.1f} | "
            f"{matmul_ms:.1f} | {xla_ms / matmul_ms:.2f} | {'XLA' if own else 'matmul'} |",
            flush=True,
        )


def _torchvision_convolutions(arch: str, batch: int, size: int) -> collections.Counter:
    """How often torchvision's `arch` runs each distinct convolution on a (batch, 3, size, size)
    input, keyed by (NCHW input shape, out channels, kernel, stride, padding, groups)."""
    import torch
    import torchvision

    model = getattr(torchvision.models, arch)().eval()  # eval: any batch size, same shapes
    counts: collections.Counter = collections.Counter()

    def record(module, inputs, _output) -> None:
        counts[
            (
                tuple(inputs[0].shape),
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                module.groups,
            )
        ] += 1

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(record)
    with torch.no_grad():
        model(torch.zeros(batch, 3, size, size))
    return counts


def vs_torch(arch: str, batch: int, size: int, rounds: int) -> None:
    """Each convolution of `arch`'s train step (forward, weight gradient and, except for the
    stem, input gradient; cotangent: the output), torch's `Conv2d` vs `conv.conv2d`, alternating."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    print(
        "| input | channels/groups | kernel/stride | runs per step | torch ms | resnet_jax ms "
        "| resnet_jax/torch |"
    )
    print("|---|---|---|---|---|---|---|")
    totals = {"torch": 0.0, "resnet_jax": 0.0}
    for (shape, cout, kernel, stride, padding, groups), count in _torchvision_convolutions(
        arch, batch, size
    ).items():
        n, cin, h, w_ = shape
        stem = cin == 3  # the image needs no gradient
        x_t = torch.randn(shape, requires_grad=not stem)
        layer = torch.nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)

        def torch_step(layer=layer, x_t=x_t) -> None:
            y = layer(x_t)
            y.backward(y.detach())

        x = jnp.asarray(x_t.detach().permute(0, 2, 3, 1).numpy())
        w = jnp.asarray(layer.weight.detach().permute(2, 3, 1, 0).numpy())
        pads = tuple((p, p) for p in padding)
        passes = _all_passes(conv.conv2d, stride[0], pads, groups, input_grad=not stem)
        step = jax.jit(passes).lower(x, w).compile()  # cotangent y, as torch's above
        times = {"torch": [], "resnet_jax": []}
        for _ in range(rounds + 1):
            start = time.perf_counter()
            torch_step()
            times["torch"].append(time.perf_counter() - start)
            start = time.perf_counter()
            jax.block_until_ready(step(x, w))
            times["resnet_jax"].append(time.perf_counter() - start)
        torch_ms, ours_ms = (statistics.median(t[1:]) * 1e3 for t in times.values())
        totals["torch"] += count * torch_ms
        totals["resnet_jax"] += count * ours_ms
        print(
            f"| {h}x{w_} | {cin}->{cout}/{groups} | {kernel[0]}x{kernel[1]}/{stride[0]} | {count} "
            f"| {torch_ms:.1f} | {ours_ms:.1f} | {ours_ms / torch_ms:.2f} |",
            flush=True,
        )
    print(
        f"| all | {arch} | | | {totals['torch']:.0f} | {totals['resnet_jax']:.0f} "
        f"| {totals['resnet_jax'] / totals['torch']:.2f} |"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7, help="alternating timed calls per variant")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--grouped", action="store_true", help="a ResNeXt's grouped convolutions")
    mode.add_argument(
        "--merge-sweep", action="store_true", help="merged groups of several sizes (a ResNeXt)"
    )
    mode.add_argument(
        "--weight-grad", action="store_true", help="XLA's vs a matmul weight gradient"
    )
    mode.add_argument(
        "--vs-torch",
        metavar="ARCH",
        type=models.check_arch,
        help="every convolution of ARCH's train step, conv.conv2d vs torch",
    )
    p.add_argument("--image-size", type=int, default=224, help="for --vs-torch")
    p.add_argument(
        "--arch",
        type=models.check_arch,
        default="resnext50_32x4d",
        help="the ResNeXt of --grouped, --merge-sweep and --weight-grad's grouped convolutions",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log = logging.getLogger("benchmarks")
    log.setLevel(logging.INFO)
    cli_args.setup_platform(log)  # before JAX starts

    print(f"batch {args.batch_size}, jax {jax.__version__}, {jax.devices()[0].device_kind}")
    if args.vs_torch:
        print(f"{args.vs_torch} at {args.image_size} px")
        vs_torch(args.vs_torch, args.batch_size, args.image_size, args.rounds)
        return
    modes = {"grouped": grouped, "merge_sweep": merge_sweep, "weight_grad": weight_grad}
    bench = next((fn for name, fn in modes.items() if getattr(args, name)), None)
    if bench is None:
        kernel_libraries(args.batch_size, args.rounds)
    else:
        print(f"grouped convolutions of {args.arch}")
        bench(args.arch, args.batch_size, args.rounds)


if __name__ == "__main__":
    main()
