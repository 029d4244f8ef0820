"""Training-loop overhead: scripts/train.py's loop end to end against the bare compiled step.

The loop (`trainer.prepare` + `train_loop.Loop`, as scripts/train.py runs it: JPEG decoding and
augmentation in tf.data, batches placed on the devices two ahead, metrics fetched at log
points) trains `--steps` steps on JPEGs written to a temporary directory (or `--data-dir`);
its images/s are taken over the log intervals after the first (which holds compilation and the
pipeline's start). The bare step is the same compiled step on the same devices, fed one
constant device batch in a tight loop. The difference, in % of the bare step's time, is what
the loop costs on top of the computation.

CPU (4 host devices, about 1-2 minutes):
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/bench_train.py
GPU: the same command without XLA_FLAGS (raise --batch-size and --image-size).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from resnet_jax import cli_args, parallel, trainer

log = logging.getLogger("resnet_jax")


def write_jpegs(root: Path, train_images: int, size: int, classes: int = 4) -> Path:
    """`root/train/<class>/*.jpg` (`train_images` in all) and 2 val images per class: noisy
    colour fields of `size` x `size * 5 // 4` pixels."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", -(-train_images // classes)), ("val", 2)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size * 5 // 4, 3), dtype=np.uint8)
                pixels[..., c % 3] //= 2
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def loop_images_per_sec(run: trainer.Run) -> tuple[float, trainer.Loop]:
    """Train one epoch with the loop; images/s over the log intervals after the first."""
    loop = trainer.Loop(run)
    try:
        loop.run_epoch()
    finally:
        loop.close()
    records = [json.loads(line) for line in (Path(run.config.workdir) / "metrics.jsonl").open()]
    marks = [r["step"] for r in records if "images_per_sec" in r]
    speeds = [r["images_per_sec"] for r in records if "images_per_sec" in r]
    if len(marks) < 2:
        raise SystemExit("bench_train: too few log points; raise --steps or lower --log-every")
    images = [(b - a) * run.config.batch_size for a, b in zip(marks, marks[1:], strict=False)]
    seconds = sum(n / s for n, s in zip(images, speeds[1:], strict=True))
    return sum(images) / seconds, loop


def bare_images_per_sec(run: trainer.Run, state, steps: int) -> float:
    """The compiled train step alone on one constant uint8 device batch."""
    cfg = run.config
    per_process = cfg.batch_size // jax.process_count()
    host = {
        "image": np.zeros((per_process, cfg.image_size, cfg.image_size, 3), np.uint8),
        "label": np.zeros(per_process, np.int32),
    }
    batch = parallel.prepare_batch(host, run.mesh, cfg.parallel)
    for _ in range(2):  # warm-up (compiled already by the loop)
        state, metrics = run.train_step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = run.train_step(state, batch)
    jax.block_until_ready((state, metrics))
    return steps * cfg.batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="global")
    parser.add_argument("--steps", type=int, default=40, help="loop steps (one epoch)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--parallel", default="shard_map", choices=parallel.PARALLEL_KINDS)
    parser.add_argument("--sync-bn", action="store_true")
    parser.add_argument("--data-dir", help="image folders to read instead of synthetic JPEGs")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s")
    cli_args.setup_platform(log)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        data_dir = args.data_dir or write_jpegs(
            Path(tmp) / "data", args.steps * args.batch_size, args.image_size
        )
        config = trainer.TrainConfig(
            arch=args.arch, data_dir=str(data_dir), image_size=args.image_size,
            batch_size=args.batch_size, epochs=1, max_steps=args.steps,
            log_every=args.log_every, parallel=args.parallel, sync_bn=args.sync_bn,
            workdir=str(Path(tmp) / "run"),
        )  # fmt: skip
        run = trainer.prepare(config)
        loop_speed, loop = loop_images_per_sec(run)
        bare_speed = bare_images_per_sec(run, loop.state, args.steps)
    result = {
        "loop_images_per_sec": loop_speed,
        "bare_step_images_per_sec": bare_speed,
        "loop_overhead_percent": 100.0 * (bare_speed / loop_speed - 1.0),
    }
    print(
        f"{args.arch} {args.image_size}px batch {args.batch_size} on {run.mesh.size} "
        f"{jax.default_backend()} device(s): loop {loop_speed:.1f} images/s, bare step "
        f"{bare_speed:.1f} images/s, loop overhead {result['loop_overhead_percent']:.1f}%"
    )
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
