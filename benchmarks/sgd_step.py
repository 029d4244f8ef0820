"""The plain SGD-momentum ResNet train step that `bench_models.py` times and `profile_step.py`
profiles: forward in training mode, cross-entropy, backward, optax update (no weight decay); and
the CPU settings both apply first (`--without-cpu-setting` leaves one out)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from resnet_jax import cli_args, cpu

LR, MOMENTUM = 0.1, 0.9


def random_batch(batch: int, size: int) -> tuple[jax.Array, jax.Array]:
    """Normal NHWC float32 images and ImageNet-range integer labels."""
    x = jax.random.normal(jax.random.key(1), (batch, size, size, 3), jnp.float32)
    return x, jnp.arange(batch) % 1000


def sgd_train_step(model: nn.Module) -> tuple[Callable, optax.GradientTransformation]:
    """`step(params, batch_stats, opt_state, x, y) -> (params, batch_stats, opt_state, loss)`
    and its optimizer (for `tx.init(params)`); the loss is taken in float32 whatever the
    compute dtype."""
    tx = optax.sgd(LR, momentum=MOMENTUM)

    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(params):
            logits, new = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
            return loss.mean(), new["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return step, tx


def add_cpu_settings_argument(parser: argparse.ArgumentParser) -> None:
    """`--without-cpu-setting NAME` (repeatable): a `resnet_jax.cpu` setting to leave out."""
    parser.add_argument(
        "--without-cpu-setting",
        action="append",
        default=[],
        choices=cpu.SETTINGS,
        help="on CPU, leave out this setting of resnet_jax.cpu.configure (repeatable)",
    )


def apply_cpu_settings(args: argparse.Namespace) -> list[str]:
    """On CPU, the library's CPU settings but `--without-cpu-setting`'s, before JAX starts."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log = logging.getLogger("benchmarks")
    log.setLevel(logging.INFO)
    return cli_args.setup_platform(log, **dict.fromkeys(args.without_cpu_setting, False))
