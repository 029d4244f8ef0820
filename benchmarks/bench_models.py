"""Train-step and inference speed: resnet_jax (with nn.Conv and with models.Conv) vs torchvision.

Both frameworks run identical shapes in one process, alternating round by round so that machine
noise hits them alike; times are medians over all timed steps. A train step is forward, backward
and an SGD-momentum update (optax.sgd / torch.optim.SGD, lr 0.1, momentum 0.9) with BatchNorm in
training mode; inference is the forward pass in eval mode. CPU runs float32; on a GPU both float32
and bfloat16 (torch: autocast + channels_last + cudnn.benchmark; JAX: compute dtype bfloat16,
float32 params).

On CPU the script first applies the library's CPU settings (`resnet_jax.cli_args.setup_platform`,
see docs/performance.md), as the training script does; `--without-cpu-setting NAME` leaves one
out. `retain_host_memory` makes glibc keep freed memory for reuse; in one process that holds for
torch as well, so `--without-cpu-setting retain_host_memory` measures both with glibc's default
behaviour. "page faults/step" shows the difference; "peak RSS" is the RSS growth during a phase,
so memory retained from earlier phases does not show in it. `eigen_convolutions` sends XLA:CPU's
convolutions to Eigen; `jax-Conv-ynn` compiles the same model with XLA's default YNNPACK
convolutions, to compare the two in one run; `jax-Conv-cap16` traces it with grouped
convolutions merged into at most 16 per layer (`resnet_jax.cpu.conv.MAX_GROUP_CONVOLUTIONS`, 32 by
default; it trades step time for compile time on ResNeXts). On a GPU the note
column adds device memory: for JAX the step's footprint from XLA's memory analysis (arguments +
outputs - donated buffers + temporaries), for torch the CUDA peak over the timed steps. A case
that raises (e.g. out of memory) gets a "failed" row naming the error, the other cases still run,
and the script exits non-zero after writing the report.

Example: python benchmarks/bench_models.py --archs resnet50 --batch-sizes 8 --output BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

# torch first: importing it after tensorflow segfaults (nothing below imports TF today).
import torch
import torchvision

# isort: split
import flax.linen as nn
import jax
import jax.numpy as jnp
from sgd_step import (
    LR,
    MOMENTUM,
    add_cpu_settings_argument,
    apply_cpu_settings,
    random_batch,
    sgd_train_step,
)

from resnet_jax import models
from resnet_jax.cpu import conv as cpu_conv
from resnet_jax.cpu import host_memory, xla_flags
from resnet_jax.models import Conv

IMPLS = ("torch", "jax-nn.Conv", "jax-Conv", "jax-Conv-ynn", "jax-Conv-cap16")
JAX_CONVS: dict[str, Callable[..., nn.Module]] = {
    "jax-nn.Conv": nn.Conv,
    "jax-Conv": Conv,
    "jax-Conv-ynn": Conv,
    "jax-Conv-cap16": Conv,
}
# jax-Conv-ynn: the library's model compiled with XLA's default, YNNPACK convolutions (what the
# eigen_convolutions CPU setting changes, see resnet_jax.cpu.xla_flags), for an A/B in one process.
CAPPED_GROUP_CONVOLUTIONS = 16  # jax-Conv-cap16: a cap of 16 grouped convolutions per layer


def _status_kb(key: str) -> int:
    """A `VmRSS`/`VmHWM` value (kB) from /proc/self/status, 0 where unavailable (non-Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> int:
    """Reset the RSS high-water mark (Linux clear_refs) and return the current RSS in kB."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


@dataclass
class Runner:
    """One implementation of one (arch, batch, mode, dtype) case: a step to time and its stats."""

    impl: str
    step: Callable[[], None]
    compile_s: float = 0.0
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    page_faults: list[int] = field(default_factory=list)
    peak_mb: float = 0.0
    note: str = ""
    # GPU only: reads the device memory high-water mark when the row is written.
    device_memory: Callable[[], str] | None = None

    def run(self, steps: int) -> None:
        """Time `steps` calls and record the phase's RSS growth above its starting RSS."""
        base = _reset_peak_rss()
        for _ in range(steps):
            t, c = time.perf_counter(), time.process_time()
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            self.step()
            self.times.append(time.perf_counter() - t)
            self.cpu_times.append(time.process_time() - c)
            self.page_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
        self.peak_mb = max(self.peak_mb, (_status_kb("VmHWM") - base) / 1024)


def _jax_runner(impl: str, arch: str, batch: int, size: int, mode: str, dtype: str) -> Runner:
    """Build, compile (timed) and wrap a jitted JAX train or inference step."""
    compute = jnp.bfloat16 if dtype == "bf16" else jnp.float32
    model = models.get_model(arch, conv=JAX_CONVS[impl], dtype=compute)
    variables = models.init_variables(model, jax.random.key(0), size)
    x, y = random_batch(batch, size)
    ynn = impl == "jax-Conv-ynn"
    options = xla_flags.YNN_DEFAULT_COMPILER_OPTIONS if ynn else None
    # Conv picks its formulation (for the convolution kernels it will run on) when traced.
    if ynn:
        tracing = xla_flags.assume_eigen_convolutions(False)
    elif impl == "jax-Conv-cap16":
        tracing = mock.patch.object(cpu_conv, "MAX_GROUP_CONVOLUTIONS", CAPPED_GROUP_CONVOLUTIONS)
    else:
        tracing = contextlib.nullcontext()
    t0 = time.perf_counter()
    if mode == "infer":
        fn = jax.jit(lambda v, x: model.apply(v, x, train=False), compiler_options=options)
        with tracing:
            compiled = fn.lower(variables, x).compile()
        state = {"v": variables}

        def step() -> None:
            compiled(state["v"], x).block_until_ready()

    else:
        train_step, tx = sgd_train_step(model)
        params, batch_stats = variables["params"], variables["batch_stats"]
        opt_state = tx.init(params)
        fn = jax.jit(train_step, donate_argnums=(0, 1, 2), compiler_options=options)
        with tracing:
            compiled = fn.lower(params, batch_stats, opt_state, x, y).compile()
        state = {"s": (params, batch_stats, opt_state)}

        def step() -> None:
            *new, loss = compiled(*state["s"], x, y)
            state["s"] = tuple(new)
            loss.block_until_ready()

    runner = Runner(impl, step, compile_s=time.perf_counter() - t0)
    mem = compiled.memory_analysis()
    if mem is not None:
        runner.note = f"XLA temp {mem.temp_size_in_bytes / 2**20:.0f} MB"
        if jax.default_backend() == "gpu":  # the step's whole device footprint, as torch's peak
            total = (
                mem.argument_size_in_bytes
                + mem.output_size_in_bytes
                - mem.alias_size_in_bytes
                + mem.temp_size_in_bytes
            )
            runner.note += f", args+outputs+temp {total / 2**20:.0f} MB"
    step()  # first execution (allocations) outside the timed rounds
    return runner


def _torch_runner(arch: str, batch: int, size: int, mode: str, dtype: str, device: str) -> Runner:
    """Wrap a torchvision train or inference step (on GPU: channels_last, cuDNN autotuning and,
    for bf16, autocast)."""
    model = getattr(torchvision.models, arch)().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.arange(batch, device=device) % 1000
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if mode == "infer":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), amp:
                model(x)
            sync()

    else:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with amp:
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            sync()

    t0 = time.perf_counter()
    step()
    runner = Runner("torch", step, compile_s=time.perf_counter() - t0, note="first step")
    if device == "cuda":  # the timed steps' peak (cuDNN's autotuning in the first step excluded)
        torch.cuda.reset_peak_memory_stats()
        runner.device_memory = lambda: (
            f"CUDA peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MB"
        )
    return runner


def bench_case(args: argparse.Namespace, arch: str, batch: int, mode: str, dtype: str) -> list:
    """Alternate all implementations for one case; return their finished runners."""
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    runners = []
    for impl in args.impls:
        if impl == "torch":
            runners.append(_torch_runner(arch, batch, args.image_size, mode, dtype, device))
        else:
            runners.append(_jax_runner(impl, arch, batch, args.image_size, mode, dtype))
    for _ in range(args.rounds):
        for runner in runners:
            runner.run(args.steps)
    return runners


def _row(arch: str, batch: int, mode: str, dtype: str, runner: Runner, torch_ms: float) -> str:
    """One markdown table row."""
    ms = statistics.median(runner.times) * 1e3
    cpu_ms = statistics.median(runner.cpu_times) * 1e3
    spread = f"{min(runner.times) * 1e3:.0f}-{max(runner.times) * 1e3:.0f}"
    ratio = f"{ms / torch_ms:.2f}" if torch_ms else "-"
    note = runner.note + (f", {runner.device_memory()}" if runner.device_memory else "")
    return (
        f"| {arch} | {batch} | {mode} | {dtype} | {runner.impl} | {ms:.0f} | {spread} | "
        f"{cpu_ms:.0f} | {batch / ms * 1e3:.1f} | {ratio} | {runner.compile_s:.1f} | "
        f"{statistics.median(runner.page_faults):.0f} | {runner.peak_mb:.0f} | {note} |"
    )


def _failed_row(arch: str, batch: int, mode: str, dtype: str, err: Exception) -> str:
    """A table row for a case that raised (the first line of the error in the note column)."""
    message = (str(err).splitlines() or [""])[0][:300].replace("|", "/")
    blanks = " - |" * 8  # median ms ... peak RSS MB
    note = f"{type(err).__name__}: {message}"
    return f"| {arch} | {batch} | {mode} | {dtype} | failed |{blanks} {note} |"


def _cpus() -> int:
    """CPUs this process may run on (respects taskset/cgroups affinity, like XLA:CPU does)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def environment() -> str:
    """Versions, devices and thread settings, for the report."""
    env = {
        k: os.environ[k]
        for k in os.environ
        if k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "OMP_NUM_THREADS", "GLIBC_TUNABLES")
        or k.startswith("MALLOC_")
    }
    return (
        f"python {platform.python_version()}, jax {jax.__version__} ({jax.default_backend()}: "
        f"{jax.devices()[0].device_kind}), torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads), {_cpus()} of {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}); XLA:CPU uses one intra-op thread per "
        f"core by default; freed host memory retained for reuse (retain_host_memory): "
        f"{'yes' if host_memory.retaining() else 'no'}; convolutions on Eigen, not YNNPACK "
        f"(eigen_convolutions): {'yes' if xla_flags.eigen_convolutions() else 'no'}; "
        f"fusion without copies (multi_output_fusion): "
        f"{'yes' if xla_flags.multi_output_fusion() else 'no'}; "
        f"env {env or '{}'}"
    )


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark, print the markdown report and optionally write it to --output."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--archs", default="resnet18,resnet50", help="comma-separated arch names")
    p.add_argument("--batch-sizes", default="8", help="comma-separated batch sizes")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--modes", default="train,infer", help="train and/or infer")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    p.add_argument(
        "--dtypes", default=None, help="fp32 and/or bf16 (default: fp32 on CPU, both on GPU)"
    )
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per case")
    p.add_argument("--steps", type=int, default=3, help="timed steps per implementation per round")
    p.add_argument("--output", type=Path, help="also write the report to this markdown file")
    add_cpu_settings_argument(p)
    args = p.parse_args(argv)
    apply_cpu_settings(args)  # before JAX starts

    archs = [models.check_arch(a) for a in args.archs.split(",")]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    modes = args.modes.split(",")
    args.impls = args.impls.split(",")
    gpu = jax.default_backend() == "gpu"
    dtypes = args.dtypes.split(",") if args.dtypes else (["fp32", "bf16"] if gpu else ["fp32"])
    for name, values, allowed in [
        ("--modes", modes, ("train", "infer")),
        ("--impls", args.impls, IMPLS),
        ("--dtypes", dtypes, ("fp32", "bf16")),
    ]:
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"{name}: unknown {bad}; choose from {', '.join(allowed)}")
    if gpu != torch.cuda.is_available():
        p.error("JAX and torch must both see a GPU (or both not) to compare like for like")
    if not gpu:
        torch.set_num_threads(_cpus())

    lines = [
        "| arch | batch | mode | dtype | impl | median ms | min-max ms | CPU ms | img/s "
        "| vs torch | compile/first s | page faults/step | peak RSS MB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    failed: list[str] = []
    for arch in archs:
        for batch in batches:
            for mode in modes:
                for dtype in dtypes:
                    try:
                        runners = bench_case(args, arch, batch, mode, dtype)
                    except Exception as err:  # e.g. out of memory: report it, run the rest
                        failed.append(f"{arch} batch {batch} {mode} {dtype}")
                        lines.append(_failed_row(arch, batch, mode, dtype, err))
                        print(lines[-1], flush=True)
                        continue
                    torch_ms = next(
                        (statistics.median(r.times) * 1e3 for r in runners if r.impl == "torch"),
                        0.0,
                    )
                    rows = [_row(arch, batch, mode, dtype, r, torch_ms) for r in runners]
                    del runners  # free this case's models before the next is built
                    for row in rows:
                        lines.append(row)
                        print(row, flush=True)
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv)
    report = "\n".join(
        [
            f"### {args.image_size}px, {args.rounds} rounds x {args.steps} steps",
            "",
            f"`{command}`",
            "",
            environment(),
            "",
            *lines,
            "",
        ]
    )
    print(report)
    if args.output:
        with args.output.open("a") as f:
            f.write(report + "\n")
    if failed:
        raise SystemExit(f"bench_models: {len(failed)} case(s) failed: {'; '.join(failed)}")
    return report


if __name__ == "__main__":
    main()
