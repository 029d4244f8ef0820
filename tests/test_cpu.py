"""`resnet_jax.cpu`: importing resnet_jax changes nothing process-wide; `configure()` sends
XLA:CPU's convolutions to Eigen, makes it fuse without copies across residual blocks and glibc keep
freed memory, keeps the user's XLA_FLAGS, and says when it comes too late. Each process-wide case
runs in a fresh process (XLA reads its flags once, malloc settings are per process)."""

import logging
import os

import pytest
from helpers import CHECKED_JAXLIB, checked_jaxlib, cpu_probe

from resnet_jax import cli_args, cpu
from resnet_jax.cpu import xla_flags

BLOCKS = 6
PAGES_PER_BLOCK = (256 << 20) // 4096
USER_FLAGS = "--xla_force_host_platform_device_count=2 --xla_backend_extra_options=xla_cpu_unused"

# Functions the probe process runs; {...} fields are filled per case (doubled braces: literal).
PROBE = """
import ctypes, importlib, json, os, pkgutil, resource, warnings
{prelude}
import flax.linen as nn, jax, jax.numpy as jnp
environ = dict(os.environ)
import resnet_jax
from resnet_jax import cpu, layers, models
from resnet_jax.cpu import host_memory, xla_flags
if {import_all}:
    for module in pkgutil.walk_packages(resnet_jax.__path__, "resnet_jax."):
        importlib.import_module(module.name)

def stage_blocks():
    # the most blocks of a 6-block ResNet stage one fusion of its compiled train step holds
    class Stage(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range({blocks}):
                parts = models.block_layers(train=True)
                x = models.Bottleneck(planes=4, **parts, name=f"block{{i}}")(x)
            return x

    stage, x = Stage(), jnp.ones((2, 8, 8, 16))
    variables = stage.init(jax.random.key(0), x)

    def loss(params, x):
        y, _ = stage.apply({{**variables, "params": params}}, x, mutable=["batch_stats"])
        return jnp.mean(y * y)

    step = jax.jit(jax.value_and_grad(loss)).lower(variables["params"], x).compile()
    step(variables["params"], x)
    return xla_flags.most_blocks_per_fusion(step.as_text(), block_name=r"block\\d+")

def ynnpack_kernels():
    # whether XLA:CPU hands a 3x3 convolution and a matmul to YNNPACK
    x, w = jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 32, 32))
    fns = dict(
        conv_ynn=lambda x, w: jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=layers.DIMENSION_NUMBERS
        ),
        dot_ynn=lambda x, w: x.reshape(-1, 32) @ w[0, 0],
    )
    return {{k: "ynn_fusion" in jax.jit(f).lower(x, w).compile().as_text() for k, f in fns.items()}}

def page_faults():
    # malloc, touch and free a 256 MiB block (as XLA:CPU does with a step's temporaries) 4 times:
    # the page faults of all but the first round
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]

    def touch():
        block = libc.malloc(256 << 20)
        ctypes.memset(block, 1, 256 << 20)
        libc.free(block)

    touch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        touch()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

result = {{}}
if {configure} is not None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result["applied"] = cpu.configure(**{configure})
    result["warnings"] = [str(w.message) for w in caught if w.category is RuntimeWarning]
if {measure}:
    result["blocks_per_fusion"] = stage_blocks()
    result["faults"] = page_faults()
result["environ_changed"] = sorted(
    k for k in {{*environ, *os.environ}} if environ.get(k) != os.environ.get(k)
)
result.update(
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    retaining=host_memory.retaining(),
    eigen=xla_flags.eigen_convolutions(),
    fusion=xla_flags.multi_output_fusion(),
    **ynnpack_kernels(),
)
print(json.dumps(result))
"""


def _probe(
    xla_flags_value: str,
    configure: dict | None = None,
    *,
    prelude: str = "",
    import_all: bool = False,
    measure: bool = False,
) -> dict:
    """Run PROBE in a fresh CPU-only process: `prelude`, then (with `import_all`) every
    resnet_jax module, then `cpu.configure(**configure)` unless None, then (with `measure`) a
    6-block stage's train step and malloc page faults; returns what it saw."""
    code = PROBE.format(
        prelude=prelude,
        import_all=import_all,
        blocks=BLOCKS,
        configure=configure,
        measure=measure,
    )
    return cpu_probe(code, xla_flags_value, timeout=300)


# Third-party packages set variables of their own when imported (jax: TPU_SKIP_MDS_QUERY,
# tensorflow: TF2_BEHAVIOR ...): imported before the probe's snapshot of the environment; torch
# and torchvision before tensorflow.
THIRD_PARTY = "import torch, torchvision, jax, flax, optax, orbax.checkpoint, tensorflow"


@pytest.mark.launches
def test_importing_every_module_and_training_changes_nothing():
    """Importing every resnet_jax module and running a train step of ResNet blocks leaves the
    environment, malloc and XLA:CPU as they were: YNNPACK convolutions, fusion with copies
    (the last fusions hold every block of the stage), every 256 MiB block mmapped afresh."""
    seen = _probe("", prelude=THIRD_PARTY, import_all=True, measure=True)
    assert seen["environ_changed"] == []
    assert seen["xla_flags"] == ""
    assert seen["retaining"] is False
    assert seen["faults"] >= 3 * PAGES_PER_BLOCK * 0.9
    assert seen["eigen"] is False and seen["fusion"] is False
    if CHECKED_JAXLIB:
        assert seen["conv_ynn"] is True and seen["dot_ynn"] is True
        assert seen["blocks_per_fusion"] == BLOCKS


@checked_jaxlib
@pytest.mark.launches
def test_configure_applies_the_cpu_settings_and_keeps_user_flags():
    """`configure()` before JAX's first computation (resnet_jax already imported): the flags are
    added after the user's own (XLA accumulates repeated backend options), convolutions run on
    Eigen and matmuls on YNNPACK, no fusion spans more than a block's end and the next two
    blocks, freed blocks are reused (almost no new pages)."""
    seen = _probe(USER_FLAGS, {}, measure=True)
    assert seen["applied"] == list(cpu.SETTINGS)
    assert seen["warnings"] == []
    assert seen["environ_changed"] == ["XLA_FLAGS"]
    expected_flags = [xla_flags.EIGEN_CONVOLUTIONS_FLAG, xla_flags.MULTI_OUTPUT_FUSION_FLAG]
    assert seen["xla_flags"] == " ".join([USER_FLAGS, *expected_flags])
    assert seen["eigen"] is True and seen["conv_ynn"] is False and seen["dot_ynn"] is True
    assert seen["fusion"] is True and seen["blocks_per_fusion"] <= 3
    assert seen["retaining"] is True and seen["faults"] < PAGES_PER_BLOCK // 10


@pytest.mark.launches
def test_users_own_xla_settings_win():
    """YNNPACK fusion types and the fusion option already in XLA_FLAGS are left as they are (here
    YNNPACK off entirely: convolutions on Eigen, and matmuls too)."""
    users = (
        f"--{xla_flags.YNN_FLAG_NAME}= "
        f"--xla_backend_extra_options=xla_cpu_unused,{xla_flags.MULTI_OUTPUT_FUSION_OPTION}"
    )
    seen = _probe(users, {"retain_host_memory": False})
    assert seen["applied"] == (["multi_output_fusion"] if CHECKED_JAXLIB else [])
    assert seen["xla_flags"] == users and seen["environ_changed"] == []
    assert seen["retaining"] is False
    assert seen["eigen"] is True and seen["conv_ynn"] is False and seen["dot_ynn"] is False
    assert seen["fusion"] is True


@checked_jaxlib
@pytest.mark.launches
def test_configure_after_jax_started_warns_and_is_not_believed():
    """After JAX's first computation the flags land in XLA_FLAGS but XLA has read them already:
    configure warns, and the probes (which `cpu.conv` asks when tracing) say neither is in
    effect."""
    started = "import jax; jax.numpy.ones(1).block_until_ready()"
    seen = _probe("", {"retain_host_memory": False}, prelude=started)
    assert seen["applied"] == ["eigen_convolutions", "multi_output_fusion"]
    (warning,) = seen["warnings"]
    assert "after JAX started its backends" in warning and "eigen_convolutions" in warning
    assert seen["xla_flags"].split() == [
        xla_flags.EIGEN_CONVOLUTIONS_FLAG,
        xla_flags.MULTI_OUTPUT_FUSION_FLAG,
    ]
    assert seen["eigen"] is False and seen["conv_ynn"] is True
    assert seen["fusion"] is False


def test_configure_applies_what_is_asked(monkeypatch):
    """Each setting has its switch; none of the XLA flags for a jaxlib older than the one checked
    (XLA aborts on flags it does not know). In this process only the environment changes."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_user_flag")
    monkeypatch.setattr(cpu, "jax_started", lambda: False)
    monkeypatch.setattr(xla_flags, "jaxlib_version", lambda: xla_flags.MIN_JAXLIB)
    off = {"eigen_convolutions": False, "multi_output_fusion": False, "retain_host_memory": False}
    assert cpu.configure(**off) == []
    assert cpu.configure(**{**off, "multi_output_fusion": True}) == ["multi_output_fusion"]
    flags = f"--xla_user_flag {xla_flags.MULTI_OUTPUT_FUSION_FLAG}"
    assert os.environ["XLA_FLAGS"] == flags
    monkeypatch.setattr(xla_flags, "jaxlib_version", lambda: (0, 9, 0))
    assert cpu.configure(retain_host_memory=False) == []
    assert os.environ["XLA_FLAGS"] == flags
    monkeypatch.undo()
    assert len(xla_flags.jaxlib_version()) == 3  # the installed version parses


@pytest.mark.parametrize(
    ("platforms", "plugins", "on_cpu"),
    [
        ("", (), True),
        ("", ("cuda",), False),
        ("cpu", ("cuda",), True),  # a GPU host told to compute on CPU
        ("cpu,cuda", (), True),
        ("cuda", (), False),
        ("tpu,cpu", (), False),
        (" CPU ", ("libtpu",), True),
    ],
)
def test_expected_from_platforms_then_plugins(monkeypatch, platforms, plugins, on_cpu):
    monkeypatch.setattr(cpu, "accelerator_plugins", lambda: plugins)
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert cpu.expected() is on_cpu
    monkeypatch.delenv("JAX_PLATFORMS")
    assert cpu.expected(platforms) is on_cpu  # jax_platforms passed explicitly


def test_installed_plugins_are_found():
    """This machine's jax has no GPU/TPU plugin (the test environment is CPU-only)."""
    cpu.accelerator_plugins.cache_clear()
    assert cpu.accelerator_plugins() == ()


@pytest.mark.parametrize("on_cpu", [True, False], ids=["cpu", "accelerator"])
def test_setup_platform_configures_and_logs_only_for_cpu(monkeypatch, caplog, on_cpu):
    calls = []
    monkeypatch.setattr(cpu, "expected", lambda: on_cpu)
    monkeypatch.setattr(cpu, "configure", lambda: calls.append(1) or ["eigen_convolutions"])
    log = logging.getLogger("test_setup_platform")
    with caplog.at_level(logging.INFO, logger=log.name):
        applied = cli_args.setup_platform(log)
    assert applied == (["eigen_convolutions"] if on_cpu else [])
    assert len(calls) == int(on_cpu)
    expected_lines = ["CPU settings: eigen_convolutions"] if on_cpu else []
    assert [r.getMessage() for r in caplog.records] == expected_lines


@checked_jaxlib
def test_compiler_options_match_the_flag():
    """Per jit, `COMPILER_OPTIONS` sends convolutions (not matmuls) to Eigen, and
    `YNN_DEFAULT_COMPILER_OPTIONS` gives XLA's default, whatever the process's flags."""
    import jax
    import jax.numpy as jnp

    x, w = jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 32, 32))

    def on_ynnpack(options: dict) -> list[bool]:
        fns = [
            lambda x, w: jax.lax.conv_general_dilated(
                x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            ),
            lambda x, w: x.reshape(-1, 32) @ w[0, 0],
        ]
        hlo = [jax.jit(f, compiler_options=options).lower(x, w).compile().as_text() for f in fns]
        return ["ynn_fusion" in text for text in hlo]

    assert on_ynnpack(xla_flags.COMPILER_OPTIONS) == [False, True]
    assert on_ynnpack(xla_flags.YNN_DEFAULT_COMPILER_OPTIONS) == [True, True]


def test_assumed_kernels_override_the_backend_while_tracing():
    backend_says = xla_flags.eigen_convolutions()
    with xla_flags.assume_eigen_convolutions(not backend_says):
        assert xla_flags.eigen_convolutions() is (not backend_says)
    assert xla_flags.eigen_convolutions() is backend_says
