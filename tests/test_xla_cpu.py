"""`resnet_jax.xla_cpu`: importing resnet_jax sends XLA:CPU's convolutions (and nothing else) to
Eigen and keeps the user's XLA_FLAGS (each case in a fresh process: XLA reads its flags once)."""

import json
import os
import subprocess
import sys

import pytest

from resnet_jax import xla_cpu

# After importing resnet_jax: does XLA:CPU hand a 3x3 convolution and a matmul to YNNPACK?
PROBE = """
import json, os
import resnet_jax
import jax, jax.numpy as jnp
from jax import lax
from resnet_jax import xla_cpu

x, w = jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 32, 32))
dims = ("NHWC", "HWIO", "NHWC")
conv = jax.jit(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims))
dot = jax.jit(lambda x, w: x.reshape(-1, 32) @ w[0, 0])
ynn = lambda f: "ynn_fusion" in f.lower(x, w).compile().as_text()
result = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "in_effect": xla_cpu.eigen_convolutions()}
print(json.dumps(result | {"conv_ynn": ynn(conv), "dot_ynn": ynn(dot)}))
"""


def _probe(setting: str, xla_flags: str) -> dict:
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    env[xla_cpu.ENV_VAR] = setting
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


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
    users = f"--{xla_cpu.FLAG_NAME}="  # YNNPACK off entirely
    assert _probe("1", users) == {
        "xla_flags": users,
        "in_effect": False,
        "conv_ynn": False,
        "dot_ynn": False,
    }


@pytest.mark.parametrize("name", ["conv", "dot"])
def test_compiler_options_match_the_flag(name):
    """`COMPILER_OPTIONS` on one jit gives what `FLAG` gives a whole process."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    x, w = jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 32, 32))
    fns = {
        "conv": lambda x, w: lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        ),
        "dot": lambda x, w: x.reshape(-1, 32) @ w[0, 0],
    }
    hlo = (
        jax.jit(fns[name], compiler_options=xla_cpu.COMPILER_OPTIONS)
        .lower(x, w)
        .compile()
        .as_text()
    )
    assert ("ynn_fusion" in hlo) is (name == "dot")


def test_older_jaxlib_is_left_alone(monkeypatch):
    """XLA aborts on flags it does not know: no flag for a jaxlib older than the one checked."""
    monkeypatch.setenv(xla_cpu.ENV_VAR, "1")
    monkeypatch.setattr(xla_cpu, "jaxlib_version", lambda: (0, 9, 0))
    assert xla_cpu.wanted() is False
    monkeypatch.setattr(xla_cpu, "jaxlib_version", lambda: xla_cpu.MIN_JAXLIB)
    assert xla_cpu.wanted() is True
    monkeypatch.undo()
    assert len(xla_cpu.jaxlib_version()) == 3  # the installed version parses
