"""`resnet_jax.backend`: which backend JAX will use, asked before JAX starts, and the CPU-tuning
switches that depend on it (`host_memory`, `xla_cpu`, `cpu_fusion`)."""

import subprocess
import sys

import pytest

from resnet_jax import backend, cpu_fusion, host_memory, xla_cpu

CPU_TUNINGS = [host_memory, xla_cpu, cpu_fusion]  # what importing resnet_jax applies


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
def test_cpu_expected_from_platforms_then_plugins(monkeypatch, platforms, plugins, on_cpu):
    monkeypatch.setattr(backend, "accelerator_plugins", lambda: plugins)
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert backend.cpu_expected() is on_cpu
    monkeypatch.delenv("JAX_PLATFORMS")
    assert backend.cpu_expected(platforms) is on_cpu  # jax_platforms passed explicitly


def test_installed_plugins_are_found():
    """This machine's jax has no GPU/TPU plugin (the test environment is CPU-only)."""
    backend.accelerator_plugins.cache_clear()
    assert backend.accelerator_plugins() == ()


@pytest.mark.parametrize(
    ("value", "plugins", "wanted"),
    [
        (None, (), True),
        ("", (), True),
        (None, ("cuda",), False),  # a GPU/TPU backend: not by default
        ("1", ("cuda",), True),
        ("on", (), True),
        ("0", (), False),
        ("off", (), False),
        ("No", (), False),
    ],
)
@pytest.mark.parametrize("module", CPU_TUNINGS, ids=lambda m: m.__name__.split(".")[-1])
def test_cpu_tunings_wanted_by_environment_and_plugins(monkeypatch, module, value, plugins, wanted):
    """The CPU tunings applied at import share `backend.cpu_only_switch`."""
    if value is None:
        monkeypatch.delenv(module.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(module.ENV_VAR, value)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(backend, "accelerator_plugins", lambda: plugins)
    if module is not host_memory:  # the switch alone, whichever jaxlib is installed
        monkeypatch.setattr(xla_cpu, "jaxlib_version", lambda: xla_cpu.MIN_JAXLIB)
    assert module.wanted() is wanted


@pytest.mark.parametrize("module", [xla_cpu, cpu_fusion], ids=["xla_cpu", "cpu_fusion"])
def test_older_jaxlib_is_left_alone(monkeypatch, module):
    """XLA aborts on flags it does not know: no flag for a jaxlib older than the one checked."""
    monkeypatch.setenv(module.ENV_VAR, "1")
    monkeypatch.setattr(xla_cpu, "jaxlib_version", lambda: (0, 9, 0))
    assert module.wanted() is False
    monkeypatch.setattr(xla_cpu, "jaxlib_version", lambda: xla_cpu.MIN_JAXLIB)
    assert module.wanted() is True
    monkeypatch.undo()
    assert len(xla_cpu.jaxlib_version()) == 3  # the installed version parses


@pytest.mark.parametrize("module", CPU_TUNINGS, ids=lambda m: m.__name__.split(".")[-1])
def test_bad_environment_value_is_named(monkeypatch, module):
    monkeypatch.setenv(module.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match=f"{module.ENV_VAR}='maybe': expected 1 or 0"):
        module.wanted()


@pytest.mark.parametrize("late", [False, True], ids=["imported first", "imported late"])
def test_import_after_jax_started_warns(late):
    """The CPU settings need to precede JAX's backend: importing resnet_jax later says so."""
    code = "import jax; jax.numpy.ones(1).block_until_ready()\n" if late else "import jax\n"
    code += "import resnet_jax\nfrom resnet_jax import backend\nprint(backend.jax_started())"
    proc = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if late:
        assert proc.returncode != 0
        assert "imported after JAX started its backends" in proc.stderr
        for module in CPU_TUNINGS:  # each setting this process applies is named
            assert (f"{module.ENV_VAR}=0" in proc.stderr) is module.wanted()
    else:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["False"]
