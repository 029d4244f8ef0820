"""XLA:CPU's convolution kernels, YNNPACK (XLA's default) vs Eigen, on ResNet-50's kxk shapes.

Times the forward convolution and its input gradient (what `resnet_jax.conv.Conv` leaves to
XLA's convolution; its weight gradients and 1x1 convolutions are matmuls) for each distinct
kxk convolution of ResNet-50 at 224 px, compiled once with each kernel library through
per-jit compiler options, alternating, medians. `resnet_jax.xla_cpu` picks Eigen by default.

Example: python benchmarks/bench_convs.py --batch-size 8 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax import xla_cpu

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
KERNELS = {"YNNPACK": xla_cpu.YNN_DEFAULT_COMPILER_OPTIONS, "Eigen": xla_cpu.COMPILER_OPTIONS}


def _functions(stride: int, pad: int) -> dict:
    """The forward convolution and its input gradient, as functions of (x, w)."""

    def forward(x, w):
        return lax.conv_general_dilated(
            x, w, (stride,) * 2, ((pad, pad),) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def input_grad(x, w):
        y, vjp = jax.vjp(lambda x: forward(x, w), x)
        return vjp(jnp.ones_like(y))[0]

    return {"forward": forward, "input grad": input_grad}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7, help="alternating timed calls per variant")
    args = p.parse_args(argv)

    print(f"batch {args.batch_size}, jax {jax.__version__}, {jax.devices()[0].device_kind}")
    print("| input | channels | kernel/stride | pass | YNNPACK ms | Eigen ms | Eigen/YNNPACK |")
    print("|---|---|---|---|---|---|---|")
    key = jax.random.key(0)
    for size, cin, cout, k, stride in SHAPES:
        x = jax.random.normal(key, (args.batch_size, size, size, cin))
        w = jax.random.normal(key, (k, k, cin, cout)) * 0.05
        for name, fn in _functions(stride, k // 2).items():
            compiled = {
                lib: jax.jit(fn, compiler_options=opts).lower(x, w).compile()
                for lib, opts in KERNELS.items()
            }
            times = {lib: [] for lib in KERNELS}
            for _ in range(args.rounds + 1):  # the first round warms up
                for lib, c in compiled.items():
                    start = time.perf_counter()
                    c(x, w).block_until_ready()
                    times[lib].append(time.perf_counter() - start)
            ynn, eigen = (statistics.median(times[lib][1:]) * 1e3 for lib in KERNELS)
            print(
                f"| {size}x{size} | {cin}->{cout} | {k}x{k}/{stride} | {name} | {ynn:.1f} | "
                f"{eigen:.1f} | {eigen / ynn:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
