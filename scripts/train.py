"""Train a ResNet: `python scripts/train.py --arch resnet50 [--data-dir DIR | --dataset NAME]`.

Rerunning the same command resumes from the last checkpoint in --workdir. `--recipe tv1|tv2|small`
presets the training options (resnet_jax/recipes.py); flags given explicitly override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing

from resnet_jax import checkpoint, cli_args, parallel, recipes, trainer

log = logging.getLogger("resnet_jax")


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """One flag per TrainConfig field (`--image-size` for `image_size`) with the field's help,
    plus the multi-process flags. `suppress_defaults`: flags not given are left out of the
    parsed namespace (so the options given explicitly can override a --recipe)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    hints = typing.get_type_hints(trainer.TrainConfig)
    for field in dataclasses.fields(trainer.TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        # None means "not set": the help text says what happens then.
        shown = "" if field.default is None else f" (default: {field.default})"
        text = field.metadata["help"] + shown
        default = argparse.SUPPRESS if suppress_defaults else field.default
        if hints[field.name] is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=text
            )
            continue
        kind = field.metadata.get("parse") or next(
            t for t in typing.get_args(hints[field.name]) or (hints[field.name],)
        )
        parser.add_argument(flag, type=kind, default=default, help=text)
    group = parser.add_argument_group("multi-process (jax.distributed)")
    group.add_argument("--coordinator-address", help="host:port of process 0")
    group.add_argument("--num-processes", type=int)
    group.add_argument("--process-id", type=int)
    group.add_argument(
        "--distributed-auto", action="store_true", help="auto-detect (TPU pod slice, SLURM)"
    )
    return parser


def explicit_options(argv: list[str] | None) -> dict:
    """The TrainConfig options given on the command line `argv` (field name -> value)."""
    fields = {f.name for f in dataclasses.fields(trainer.TrainConfig)}
    given = vars(build_parser(suppress_defaults=True).parse_args(argv))
    return {name: value for name, value in given.items() if name in fields}


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
        final = trainer.fit(recipes.config(explicit_options(argv)))
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
