"""Training input throughput: `resnet_jax.data.train_batches` (tf.data) vs a torchvision DataLoader.

Both decode the flower JPEGs, random-resized-crop to 224, flip, scale to [0, 1], normalise with
ImageNet mean/std and batch 64, with the same number of workers (threads for tf.data, processes for
the DataLoader). `--auto-augment ta_wide|ra` adds TrivialAugmentWide / RandAugment after the flip
on both sides (torchvision's ClassificationPresetTrain order) and `--random-erase P` torchvision's
RandomErasing(P) after normalising: the DataLoader erases in its workers, the tf.data pipeline only
draws the boxes (batch["erase_box"]; the train step erases them on the devices). With `--uint8`
both stop before scaling and normalising and yield the uint8 pixels, as `scripts/train.py` feeds its
steps (they normalise on the devices). Runs alternate between the two; each run starts a fresh
pipeline, discards its first batch (start-up) and times the next `--batches`.
Prints a markdown table of medians.

    python benchmarks/bench_input.py [--data-dir ../shared/data/flower_photos] [--workers 2]
        [--auto-augment ta_wide --random-erase 0.1]

(`--data-dir` defaults to $RESNET_JAX_FLOWERS, else ../shared/data/flower_photos.)
"""

import argparse
import itertools
import os
import shlex
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from resnet_jax import augment, data

# The flower photos: RESNET_JAX_FLOWERS, else ../shared/data/flower_photos beside the repo.
DEFAULT_DATA = Path(
    os.environ.get(
        "RESNET_JAX_FLOWERS",
        Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flower_photos",
    )
)


def images_per_second(batches: Iterable, count: int, batch_size: int) -> float:
    """Throughput over `count` batches after the first (which pays for start-up)."""
    iterator = iter(batches)
    next(iterator)
    start = time.perf_counter()
    for _ in itertools.islice(iterator, count):
        pass
    return count * batch_size / (time.perf_counter() - start)


def run_tf(source: data.DataSource, args: argparse.Namespace, epoch: int) -> float:
    """One timed run of the tf.data training pipeline."""
    batches = data.train_batches(
        source,
        batch_size=args.batch_size,
        augment=augment.TrainAugment(
            args.image_size, auto_augment=args.auto_augment, random_erase=args.random_erase
        ),
        seed=0,
        epoch=epoch,
        num_workers=args.workers,
        normalize=not args.uint8,
    )
    return images_per_second(batches, args.batches, args.batch_size)


def run_torch(folder: datasets.ImageFolder, args: argparse.Namespace, epoch: int) -> float:
    """One timed run of the equivalent torchvision DataLoader."""
    torch.manual_seed(epoch)
    loader = DataLoader(
        folder,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
    )
    return images_per_second(loader, args.batches, args.batch_size)


def torch_transform(args: argparse.Namespace) -> transforms.Compose:
    """torchvision's ClassificationPresetTrain for the benchmark's options."""
    bilinear = transforms.InterpolationMode.BILINEAR  # the preset's default, as TrainAugment's
    steps = [transforms.RandomResizedCrop(args.image_size), transforms.RandomHorizontalFlip()]
    if args.auto_augment == "ta_wide":
        steps.append(transforms.TrivialAugmentWide(interpolation=bilinear))
    elif args.auto_augment == "ra":
        steps.append(transforms.RandAugment(interpolation=bilinear))
    if args.uint8:
        steps.append(transforms.PILToTensor())
    else:
        steps += [
            transforms.ToTensor(),
            transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD),
        ]
    if args.random_erase > 0:
        steps.append(transforms.RandomErasing(args.random_erase))
    return transforms.Compose(steps)


def main() -> None:
    """Alternates tf.data and torchvision runs and prints the medians as a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each pipeline")
    parser.add_argument(
        "--uint8", action="store_true", help="uint8 pixels out, no normalisation (as training)"
    )
    parser.add_argument("--auto-augment", choices=augment.AUTO_AUGMENTS, default="none")
    parser.add_argument("--random-erase", type=float, default=0.0, help="erasing probability")
    args = parser.parse_args()

    start = time.perf_counter()
    source = data.open_source(data_dir=args.data_dir)
    open_s = time.perf_counter() - start
    folder = datasets.ImageFolder(str(args.data_dir / "train"), transform=torch_transform(args))
    results: dict[str, list[float]] = {
        "tf.data (resnet_jax.data)": [],
        "torchvision DataLoader": [],
    }
    for epoch in range(args.rounds):
        results["tf.data (resnet_jax.data)"].append(run_tf(source, args, epoch))
        results["torchvision DataLoader"].append(run_torch(folder, args, epoch))

    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    print(f"`{command}`\n")
    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; "
        f"batch {args.batch_size}, {args.image_size} px, "
        f"{'uint8' if args.uint8 else 'normalised float32'} output, {args.workers} workers, "
        f"auto-augment {args.auto_augment}, random erase {args.random_erase}, "
        f"{args.batches} timed batches x {args.rounds} alternating runs; "
        f"open_source (file scan + vetting {source.num_train + source.num_eval} files) took "
        f"{open_s:.1f} s\n"
    )
    print("| pipeline | images/s (median) | runs |")
    print("|---|---|---|")
    for name, rates in results.items():
        runs = ", ".join(f"{r:.0f}" for r in rates)
        print(f"| {name} | {statistics.median(rates):.0f} | {runs} |")


if __name__ == "__main__":
    main()
