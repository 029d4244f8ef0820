"""`resnet_jax.host_memory`: importing resnet_jax makes freed large blocks reusable without page
faults (each case in a fresh process: the malloc settings are process-wide)."""

import json
import os
import platform
import subprocess
import sys

import pytest

from resnet_jax import host_memory

# After importing resnet_jax: malloc, touch and free a 256 MiB block (as XLA:CPU does with a
# step's temporaries) several times; prints the page faults of all but the first round.
PROBE = """
import ctypes, json, resource
import resnet_jax
from resnet_jax import host_memory

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 256 << 20

def touch():
    block = libc.malloc(SIZE)
    ctypes.memset(block, 1, SIZE)
    libc.free(block)

touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    touch()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": host_memory.retaining(), "faults": faults}))
"""
PAGES_PER_BLOCK = (256 << 20) // 4096


def _probe(setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env[host_memory.ENV_VAR] = setting
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only"
)
def test_import_keeps_freed_blocks_for_reuse():
    kept = _probe("1")  # the default where no GPU/TPU plugin is installed (see below)
    assert kept == {"applied": True, "faults": kept["faults"]}
    assert kept["faults"] < PAGES_PER_BLOCK // 10  # reused: (almost) no new pages
    default_glibc = _probe("0")
    assert default_glibc["applied"] is False
    assert default_glibc["faults"] >= 3 * PAGES_PER_BLOCK * 0.9  # every block mmapped afresh
