"""`resnet_jax.cpu_fusion`: importing resnet_jax stops XLA:CPU from copying each block's residual
additions into the fusions of all later blocks (each case in a fresh process: XLA reads its flags
once)."""

from helpers import checked_jaxlib, cpu_probe

from resnet_jax import cpu_fusion

BLOCKS = 6

# In a fresh process (optionally after JAX's first computation), after importing resnet_jax:
# XLA_FLAGS, what `in_effect` says, and the most blocks of a 6-block ResNet stage whose operations
# one fusion of the compiled train step holds (the copies make the last fusions hold all blocks).
PROBE = """
import json, os
import flax.linen as nn
import jax, jax.numpy as jnp
import resnet_jax
from resnet_jax import cpu_fusion, models

class Stage(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range({blocks}):
            layers = models.block_layers(train=True)
            x = models.Bottleneck(planes=4, **layers, name=f"block{{i}}")(x)
        return x

stage, x = Stage(), jnp.ones((2, 8, 8, 16))
variables = stage.init(jax.random.PRNGKey(0), x)

def loss(params, x):
    y, _ = stage.apply({{**variables, "params": params}}, x, mutable=["batch_stats"])
    return jnp.mean(y * y)

hlo = jax.jit(jax.value_and_grad(loss)).lower(variables["params"], x).compile().as_text()
blocks = cpu_fusion.most_blocks_per_fusion(hlo, block_name=r"block\\d+")
flags = os.environ.get("XLA_FLAGS", "")
print(json.dumps(dict(xla_flags=flags, in_effect=cpu_fusion.in_effect(), blocks_per_fusion=blocks)))
"""


def _probe(setting: str, xla_flags: str, jax_started_first: bool = False) -> dict:
    code = PROBE.format(blocks=BLOCKS)
    return cpu_probe(code, xla_flags, jax_started_first, **{cpu_fusion.ENV_VAR: setting})


@checked_jaxlib
def test_import_stops_copies_across_blocks_and_keeps_user_flags():
    # A backend option of the user's own: XLA accumulates repeated --xla_backend_extra_options.
    users = "--xla_force_host_platform_device_count=2 --xla_backend_extra_options=xla_cpu_unused"
    on = _probe("1", users)  # the default where no GPU/TPU plugin is installed
    assert on["xla_flags"].startswith(users) and cpu_fusion.FLAG in on["xla_flags"].split()
    assert on["in_effect"] is True
    assert on["blocks_per_fusion"] <= 3  # a block's end, the next block, the one after it

    off = _probe("0", users)
    assert off["xla_flags"].startswith(users) and cpu_fusion.OPTION not in off["xla_flags"]
    assert off["in_effect"] is False
    assert off["blocks_per_fusion"] == BLOCKS  # XLA's default: the chain reaches back to block 0


def test_users_own_option_is_left_alone():
    users = f"--xla_backend_extra_options=xla_cpu_unused,{cpu_fusion.OPTION}"
    result = _probe("1", users)
    assert result["xla_flags"].startswith(users)
    assert result["xla_flags"].count(cpu_fusion.OPTION) == 1
    assert result["in_effect"] is True


@checked_jaxlib
def test_option_set_too_late_is_not_in_effect():
    """Imported after JAX started: the option is in XLA_FLAGS, but XLA has read them already."""
    late = _probe("1", "", jax_started_first=True)
    assert cpu_fusion.FLAG in late["xla_flags"].split()
    assert late["in_effect"] is False
    assert late["blocks_per_fusion"] == BLOCKS
