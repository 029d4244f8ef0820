"""Where a ResNet train step spends its time: XLA ops grouped by the layer and primitive they
implement, from a `jax.profiler` trace of one step; with `--memory`, also which values are live at
the peak of its memory (from the compiled schedule).

Example: python benchmarks/profile_step.py --arch resnet50 --batch-size 8 --image-size 224
         python benchmarks/profile_step.py --conv nn.Conv   # flax's convolution, for comparison
         python benchmarks/profile_step.py --compiler-option xla_cpu_use_xnnpack=true
         python benchmarks/profile_step.py --arch resnext50_32x4d --memory
         python benchmarks/profile_step.py --without-cpu-setting multi_output_fusion
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
from sgd_step import add_cpu_settings_argument, apply_cpu_settings, random_batch, sgd_train_step

from resnet_jax import models
from resnet_jax.cpu import xla_flags
from resnet_jax.models import Conv

CONVS = {"Conv": Conv, "nn.Conv": nn.Conv}
CONV_LAYER = re.compile(r"/(conv\d|downsample_conv)/")
BN_LAYER = re.compile(r"/(bn\d|downsample_bn)/")


def _compiler_option(text: str) -> tuple[str, str | bool]:
    """'name=value' -> (name, value), with 'true'/'false' as booleans."""
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("xla_"):
        raise argparse.ArgumentTypeError(f"expected xla_NAME=VALUE, got {text!r}")
    return name, {"true": True, "false": False}.get(value.lower(), value)


def compiled_train_step(args: argparse.Namespace):
    """A compiled SGD train step on random data, its arguments, and its optimised HLO text."""
    model = models.get_model(args.arch, conv=CONVS[args.conv])
    variables = models.init_variables(model, jax.random.key(0), args.image_size)
    x, y = random_batch(args.batch_size, args.image_size)
    step, tx = sgd_train_step(model)

    params = variables["params"]
    step_args = (params, variables["batch_stats"], tx.init(params), x, y)
    options = dict(args.compiler_option) or None
    compiled = jax.jit(step, compiler_options=options).lower(*step_args).compile()
    return compiled, step_args, compiled.as_text()


def category(op_name: str) -> str:
    """'forward|backward <layer kind> <primitive>' from an HLO instruction's op_name."""
    if not op_name:
        return "unattributed (e.g. XLA-inserted copies)"
    direction = "backward" if "transpose(" in op_name else "forward"
    primitive = op_name.rsplit("/", 1)[-1]
    if CONV_LAYER.search(op_name):
        kind = "conv"
    elif BN_LAYER.search(op_name):
        kind = "batchnorm"
    elif "relu" in op_name:
        kind = "relu"
    else:
        kind = "other"
    return f"{direction} {kind} {primitive}"


def profile(compiled, step_args, hlo: str) -> collections.Counter:
    """Milliseconds per category over one traced step."""
    op_names = {}
    for line in hlo.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*", line)
        if match:
            meta = re.search(r'op_name="([^"]*)"', line)
            op_names[match.group(1)] = meta.group(1) if meta else ""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            jax.block_until_ready(compiled(*step_args))
        (trace_file,) = Path(trace_dir).rglob("*.trace.json.gz")
        events = json.loads(gzip.decompress(trace_file.read_bytes()))["traceEvents"]
    return _op_milliseconds(events, op_names)


def _op_milliseconds(events: list[dict], op_names: dict[str, str]) -> collections.Counter:
    """Sum each traced op's time into its category.

    An op that XLA:CPU runs asynchronously (Eigen's convolutions) has a short launch event and
    a later "end: <op>" event on the same thread; its time is the span from launch to end.
    """
    spans = {}
    for event in sorted((e for e in events if e.get("ph") == "X"), key=lambda e: e["ts"]):
        name = event["name"]
        op = name.removeprefix("end: ")
        if op not in op_names:
            continue
        if name == op:
            spans[op] = [event["ts"], event["ts"] + event["dur"]]
        elif op in spans:
            spans[op][1] = event["ts"] + event["dur"]
    totals: collections.Counter = collections.Counter()
    for op, (start, end) in spans.items():
        totals[category(op_names[op])] += (end - start) / 1e3
    return totals


_HLO_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)")
_ALIASES = ("bitcast", "get-tuple-element")  # views of their operand: no buffer of their own
_NO_TEMPORARY = ("parameter", "constant", "tuple")
_ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4}


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape (tuples summed), e.g. 'f32[8,56,56,64]{3,2,1,0}'."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += count * _ELEMENT_BYTES.get(dtype, 8)
    return total


def peak_live_set(hlo: str) -> tuple[int, collections.Counter]:
    """The most bytes of values live at once in the scheduled entry computation of an optimised
    HLO module, and those values' bytes by category: each value lives from its instruction to its
    last use (through bitcasts and tuple elements). Values computed from forward results alone
    that XLA schedules early and keeps for the backward pass show up here as 'backward ...'."""
    entry = hlo[hlo.index("\nENTRY") :].split("\n}", 1)[0]
    owner, size, start, end, names = {}, {}, {}, {}, {}
    for i, line in enumerate(entry.splitlines()[1:]):
        match = _HLO_INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode, rest = match.groups()
        operands = [owner.get(o, o) for o in re.findall(r"%([\w.\-]+)", rest.split("kind=")[0])]
        for o in operands:
            end[o] = i
        if opcode in _ALIASES:
            owner[name] = operands[0]
        elif opcode not in _NO_TEMPORARY:
            meta = re.search(r'op_name="([^"]*)"', line)
            size[name], start[name] = _shape_bytes(shape), i
            names[name] = meta.group(1) if meta else ""
    change = collections.Counter()
    for name, i in start.items():
        change[i] += size[name]
        change[end.get(name, i) + 1] -= size[name]
    live, peak, peak_at = 0, 0, 0
    for i in sorted(change):
        live += change[i]
        if live > peak:
            peak, peak_at = live, i
    at_peak = collections.Counter()
    for name, i in start.items():
        if i <= peak_at <= end.get(name, i):
            at_peak[category(names[name])] += size[name]
    return peak, at_peak


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", type=models.check_arch, default="resnet50")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--conv", choices=sorted(CONVS), default="Conv")
    p.add_argument("--steps", type=int, default=5, help="timed steps before the traced one")
    p.add_argument(
        "--compiler-option",
        type=_compiler_option,
        action="append",
        default=[],
        help="XLA option for this jit only, e.g. xla_cpu_use_xnnpack=true (repeatable)",
    )
    p.add_argument("--top", type=int, default=20, help="categories to print")
    p.add_argument(
        "--memory", action="store_true", help="also what is live at the peak of the step's memory"
    )
    add_cpu_settings_argument(p)
    args = p.parse_args(argv)
    apply_cpu_settings(args)  # before JAX starts

    compiled, step_args, hlo = compiled_train_step(args)
    jax.block_until_ready(compiled(*step_args))  # warm-up
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*step_args))
        times.append(time.perf_counter() - start)
    totals = profile(compiled, step_args, hlo)
    print(
        f"{args.arch} batch {args.batch_size} {args.image_size}px conv={args.conv} "
        f"options={dict(args.compiler_option)}: step median {statistics.median(times):.3f} s, "
        f"min {min(times):.3f} s over {args.steps}; traced ops total {sum(totals.values()):.0f} ms"
        " (XLA:CPU runs independent ops concurrently, so the total can exceed the step's time)"
    )
    print(
        f"The most residual blocks one fusion holds operations of: "
        f"{xla_flags.most_blocks_per_fusion(hlo)} (fusion without copies, multi_output_fusion: "
        f"{'yes' if xla_flags.multi_output_fusion() else 'no'})"
    )
    print("| ms | category (direction, layer kind, primitive) |\n|---|---|")
    for name, ms in totals.most_common(args.top):
        print(f"| {ms:.0f} | {name} |")
    if args.memory:
        peak, at_peak = peak_live_set(hlo)
        print(f"\nLive at the step's memory peak: {peak / 2**20:.0f} MB (XLA's temporaries)")
        print("| MB | category (direction, layer kind, primitive) |\n|---|---|")
        for name, size in at_peak.most_common(args.top):
            print(f"| {size / 2**20:.0f} | {name} |")


if __name__ == "__main__":
    main()
