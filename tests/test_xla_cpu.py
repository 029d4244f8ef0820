"""`resnet_jax.xla_cpu`: importing resnet_jax sends XLA:CPU's convolutions (and nothing else) to
Eigen and keeps the user's XLA_FLAGS (each case in a fresh process: XLA reads its flags once)."""

import functools
from pathlib import Path

from helpers import checked_jaxlib, cpu_probe

from resnet_jax import cpu_fusion, xla_cpu

TESTS_DIR = Path(__file__).resolve().parent


def ynnpack_kernels(compiler_options: dict | None = None) -> dict[str, bool]:
    """Whether XLA:CPU hands a 3x3 convolution and a matmul to YNNPACK in this process."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    x, w = jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 32, 32))
    dims = ("NHWC", "HWIO", "NHWC")
    fns = {
        "conv_ynn": lambda x, w: lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=dims
        ),
        "dot_ynn": lambda x, w: x.reshape(-1, 32) @ w[0, 0],
    }
    jit = functools.partial(jax.jit, compiler_options=compiler_options)
    return {k: "ynn_fusion" in jit(f).lower(x, w).compile().as_text() for k, f in fns.items()}


# In a fresh process (optionally after JAX's first computation), after importing resnet_jax:
# XLA_FLAGS, what resnet_jax believes, and the kernels XLA:CPU really picks.
PROBE = """
import json, os, sys
import resnet_jax
from resnet_jax import xla_cpu
sys.path.insert(0, {tests_dir!r})
from test_xla_cpu import ynnpack_kernels
flags = os.environ.get("XLA_FLAGS", "")
result = dict(xla_flags=flags, in_effect=xla_cpu.eigen_convolutions(), **ynnpack_kernels())
print(json.dumps(result))
"""


def _probe(setting: str, xla_flags: str, jax_started_first: bool = False) -> dict:
    code = PROBE.format(tests_dir=str(TESTS_DIR))
    # cpu_fusion's flag is not the subject here (tests/test_cpu_fusion.py)
    env = {xla_cpu.ENV_VAR: setting, cpu_fusion.ENV_VAR: "0"}
    return cpu_probe(code, xla_flags, jax_started_first, timeout=120, **env)


@checked_jaxlib
def test_import_sends_convolutions_to_eigen_and_keeps_user_flags():
    devices = "--xla_force_host_platform_device_count=2"
    on = _probe("1", devices)  # the default where no GPU/TPU plugin is installed
    assert on == {
        "xla_flags": f"{devices} {xla_cpu.FLAG}",
        "in_effect": True,
        "conv_ynn": False,
        "dot_ynn": True,  # matmuls stay with YNNPACK
    }
    off = _probe("0", devices)
    assert off == {"xla_flags": devices, "in_effect": False, "conv_ynn": True, "dot_ynn": True}


def test_users_own_ynn_setting_wins():
    users = f"--{xla_cpu.FLAG_NAME}="  # YNNPACK off entirely: convolutions on Eigen too
    assert _probe("1", users) == {
        "xla_flags": users,
        "in_effect": True,
        "conv_ynn": False,
        "dot_ynn": False,
    }


@checked_jaxlib
def test_flag_set_too_late_is_not_believed():
    """Imported after JAX started: the flag is in XLA_FLAGS but XLA has read them already, so
    convolutions stay on YNNPACK and conv.Conv must trace for YNNPACK."""
    late = _probe("1", "", jax_started_first=True)
    assert late == {
        "xla_flags": xla_cpu.FLAG,
        "in_effect": False,
        "conv_ynn": True,
        "dot_ynn": True,
    }


@checked_jaxlib
def test_compiler_options_match_the_flag():
    """Per jit, `COMPILER_OPTIONS` gives what `FLAG` gives a whole process, and
    `YNN_DEFAULT_COMPILER_OPTIONS` what XLA does without it."""
    assert ynnpack_kernels(xla_cpu.COMPILER_OPTIONS) == {"conv_ynn": False, "dot_ynn": True}
    assert ynnpack_kernels(xla_cpu.YNN_DEFAULT_COMPILER_OPTIONS) == {
        "conv_ynn": True,
        "dot_ynn": True,
    }


def test_assumed_kernels_override_the_flags_while_tracing():
    flag_says = xla_cpu.eigen_convolutions()
    with xla_cpu.assume_eigen_convolutions(not flag_says):
        assert xla_cpu.eigen_convolutions() is (not flag_says)
    assert xla_cpu.eigen_convolutions() is flag_says
