"""Train a ResNet: `python scripts/train.py --arch resnet50 [--data-dir DIR | --dataset NAME]`.

Rerunning the same command resumes from the last checkpoint in --workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing

from resnet_jax import checkpoint, cli_args, parallel, trainer

log = logging.getLogger("resnet_jax")


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field (`--image-size` for `image_size`) with the field's help,
    plus the multi-process flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    hints = typing.get_type_hints(trainer.TrainConfig)
    for field in dataclasses.fields(trainer.TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        # None means "not set": the help text says what happens then.
        shown = "" if field.default is None else f" (default: {field.default})"
        text = field.metadata["help"] + shown
        if hints[field.name] is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=field.default, help=text
            )
            continue
        kind = next(t for t in typing.get_args(hints[field.name]) or (hints[field.name],))
        parser.add_argument(flag, type=kind, default=field.default, help=text)
    group = parser.add_argument_group("multi-process (jax.distributed)")
    group.add_argument("--coordinator-address", help="host:port of process 0")
    group.add_argument("--num-processes", type=int)
    group.add_argument("--process-id", type=int)
    group.add_argument(
        "--distributed-auto", action="store_true", help="auto-detect (TPU pod slice, SLURM)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    # Our progress at INFO; libraries (orbax, absl, TF) only from WARNING up.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", force=True)
    log.setLevel(logging.INFO)
    cli_args.setup_platform(log)
    try:
        parallel.initialize(
            args.pop("coordinator_address"),
            args.pop("num_processes"),
            args.pop("process_id"),
            auto=args.pop("distributed_auto"),
        )
    except ValueError as err:
        parser.error(str(err))
    try:
        final = trainer.fit(trainer.TrainConfig(**args))
    except trainer.ConfigError as err:
        parser.error(str(err))
    # Disk full, permissions, a diverging run: say so in one line (the messages say what to do).
    except (checkpoint.CheckpointWriteError, trainer.NonFiniteError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    print(f"done: {trainer.describe(final)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
