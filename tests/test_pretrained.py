"""Named pretrained weights: the registry's facts, docs/pretrained.md's generated table, and the
real huggingface_hub download path against a local Hub stand-in (tests/hub_standin.py) serving
a random torchvision resnet18. Loads run in fresh processes because huggingface_hub reads
HF_ENDPOINT/HF_HOME/HF_HUB_OFFLINE when first imported; the first one computes logits under
JAX_ENABLE_X64 and compares them with torch's float64 logits for the same file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torchvision

from resnet_jax import models, pretrained, pretrained_registry
from resnet_jax.preprocessing import IMAGENET_MEAN, IMAGENET_STD

sys.path.insert(0, str(Path(__file__).parent))
from hub_standin import HubStandIn  # noqa: E402

pytestmark = pytest.mark.launches

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "pretrained.md"
HUB_CFG = {
    "input_size": [3, 128, 128],
    "test_input_size": [3, 160, 160],
    "crop_pct": 0.9,
    "interpolation": "bicubic",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "license": "apache-2.0",
}


def _config(arch: str) -> bytes:
    return json.dumps({"architecture": arch, "num_classes": 10, "pretrained_cfg": HUB_CFG}).encode()


@pytest.fixture(scope="module")
def hub(module_tmp):
    """The stand-in serving a random resnet18 (10 classes, BatchNorm statistics from two random
    batches) under several repos, its weights file, an input batch and torch's float64 logits."""
    tmp = module_tmp("hub")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(4, 3, 64, 64))
    weights = tmp / "model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, weights)
    data = weights.read_bytes()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = net.double().eval()(x).numpy()
    np.save(tmp / "x.npy", x.numpy())
    repos = {
        "org/resnet18-ok": {"model.safetensors": data, "config.json": _config("resnet18")},
        "timm/resnet18.tv_in1k": {"model.safetensors": data},
        "org/wrong-arch": {"model.safetensors": data, "config.json": _config("resnet34")},
        "org/corrupt": {
            "model.safetensors": data[: len(data) // 2],
            "config.json": _config("resnet18"),
        },
    }
    with HubStandIn(repos) as server:
        yield {"server": server, "tmp": tmp, "expected": expected, "x": tmp / "x.npy"}


def _run(hub, names: list[str], out_name: str, offline: bool = False, x64: bool = False) -> list:
    """Load `names` in a fresh process pointed at the stand-in, its cache in the test's tmp."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=hub["server"].url,
        HF_HOME=str(hub["tmp"] / "hf_home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        JAX_PLATFORMS="cpu",
    )
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    if x64:
        env["JAX_ENABLE_X64"] = "1"
    out = hub["tmp"] / out_name
    image = [f"--image={hub['x']}"] if x64 else []
    cmd = [sys.executable, str(Path(__file__).parent / "hub_standin.py"), str(out), *image, *names]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert not result["torch_imported"], "loading named weights imported torch"
    return {r["name"]: r for r in result["records"]}


ONLINE = [
    "hf-hub:org/resnet18-ok",
    "resnet18.tv_in1k",
    "hf-hub:org/missing",
    "hf-hub:org/wrong-arch",
    "hf-hub:org/corrupt",
    "hf-hub:org/resnet18-ok#5",
]


@pytest.fixture(scope="module")
def online(hub):
    return _run(hub, ONLINE, "online.json", x64=True)


@pytest.fixture(scope="module")
def offline(hub, online):
    before = len(hub["server"].requests)
    records = _run(hub, ["hf-hub:org/resnet18-ok", "resnet18.tv_in1k", "resnet34.tv_in1k"],
                   "offline.json", offline=True)  # fmt: skip
    return records, hub["server"].requests[before:]


def test_first_load_downloads_into_the_cache(hub, online):
    server = hub["server"]
    record = online["hf-hub:org/resnet18-ok"]
    commit = server.commit("org/resnet18-ok")
    assert record["arch"] == "resnet18" and record["num_classes"] == 10
    assert record["source"] == {"repo": "org/resnet18-ok", "revision": commit}
    # Preprocessing from the repo's pretrained_cfg: test-time size and crop win.
    assert record["preprocessing"] == [
        "160",
        "0.9",
        "bicubic",
        "(0.5, 0.5, 0.5)",
        "(0.25, 0.25, 0.25)",
    ]
    assert record["license"] == "apache-2.0"
    cached = hub["tmp"] / "hf_home" / "hub" / "models--org--resnet18-ok" / "snapshots" / commit
    assert (cached / "model.safetensors").read_bytes() == server.repos["org/resnet18-ok"][
        "model.safetensors"
    ]
    assert ("GET", "/org/resnet18-ok/resolve/main/model.safetensors") in server.requests


def test_other_head_width_drops_the_files_head(online):
    assert online["hf-hub:org/resnet18-ok"]["has_fc"]
    record = online["hf-hub:org/resnet18-ok#5"]
    assert record["num_classes"] == 5 and not record["has_fc"]


def test_logits_equal_torch_in_float64(hub, online):
    assert online["hf-hub:org/resnet18-ok"]["logits_dtype"] == "float64"
    assert online["hf-hub:org/resnet18-ok"]["leaf_dtypes"] == ["float64"]
    logits = np.load((hub["tmp"] / "online.json").with_suffix(".npy"))
    assert logits.shape == hub["expected"].shape == (2, 10)
    np.testing.assert_allclose(logits, hub["expected"], rtol=0, atol=1e-9)


def test_registry_name_downloads_its_timm_repo(hub, online):
    record = online["resnet18.tv_in1k"]
    assert record["source"]["repo"] == "timm/resnet18.tv_in1k"
    assert record["preprocessing"][:3] == ["224", "0.875", "bilinear"]
    assert record["license"] == "bsd-3-clause"
    # Registry entries carry their own preprocessing: no config.json is fetched.
    assert not any(
        "resnet18.tv_in1k/resolve/main/config.json" in p for _, p in hub["server"].requests
    )


def test_offline_loads_from_the_cache_without_requests(online, offline):
    records, requests = offline
    assert requests == []
    assert records["hf-hub:org/resnet18-ok"]["source"] == online["hf-hub:org/resnet18-ok"]["source"]
    assert records["resnet18.tv_in1k"]["arch"] == "resnet18"


def _assert_one_line(message: str, *parts: str) -> None:
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


def test_offline_with_nothing_cached_says_what_to_do(offline):
    message = offline[0]["resnet34.tv_in1k"]["error"]
    _assert_one_line(message, "'resnet34.tv_in1k'", "'timm/resnet34.tv_in1k'", "HF_HUB_OFFLINE")


def test_missing_repo(online):
    message = online["hf-hub:org/missing"]["error"]
    _assert_one_line(
        message, "'hf-hub:org/missing'", "'org/missing'", "no such repo", "check the name"
    )


def test_file_of_another_arch(online):
    message = online["hf-hub:org/wrong-arch"]["error"]
    _assert_one_line(
        message,
        "'org/wrong-arch'",
        "does not fit resnet34: it looks like a resnet18",
        "pass arch='resnet18'",
    )


def test_corrupt_download(online):
    message = online["hf-hub:org/corrupt"]["error"]
    _assert_one_line(message, "'org/corrupt'", "unreadable", "corrupt", "force_download=True")


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        (
            "resnet50.a1_inlk",
            ["unknown pretrained weights", "Did you mean 'resnet50.a1_in1k'", "hf-hub:"],
        ),
        ("my_weights.pth", ["'my_weights.pth'", "ARCH.TAG", "hf-hub:ORG/REPO"]),
        ("hf-hub:not a repo", ["not a Hub name"]),
    ],
)
def test_bad_names_fail_before_any_download(name, parts):
    assert not pretrained.is_registered_or_hub(name) or name.startswith("hf-hub:")
    with pytest.raises(pretrained.PretrainedError) as info:
        pretrained.load(name)
    assert isinstance(info.value, ValueError)
    _assert_one_line(str(info.value), *parts)


def test_registry_name_with_contradicting_arch():
    with pytest.raises(
        pretrained.PretrainedError, match="holds resnet50 weights, not arch='resnet18'"
    ):
        pretrained.load("resnet50.tv2_in1k", arch="resnet18")


def test_routing():
    assert pretrained.is_registered_or_hub("resnet50.a1_in1k")
    assert pretrained.is_registered_or_hub("hf-hub:timm/resnet50.a1_in1k")
    assert not pretrained.is_registered_or_hub("resnet50.pth")
    assert not pretrained.is_registered_or_hub("resnet50")


def test_registry_entries_are_plausible():
    registry = pretrained_registry.REGISTRY
    assert {e.arch for e in registry.values()} == set(models.ARCHS)
    assert {e.arch for e in registry.values() if e.tag == "tv_in1k"} == set(models.ARCHS)
    assert {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152"} <= {
        e.arch for e in registry.values() if e.tag == "a1_in1k"
    }
    for name, e in registry.items():
        p = e.preprocessing
        assert name == f"{e.arch}.{e.tag}" and e.repo == f"timm/{name}"
        assert 160 <= p.eval_size <= 320 and 0.8 <= p.crop_pct <= 1.0, name
        assert p.eval_size <= p.resize_size <= p.eval_size / 0.8, name
        assert p.interpolation in pretrained_registry.INTERPOLATIONS, name
        np.testing.assert_allclose(p.mean, IMAGENET_MEAN, atol=0.01, err_msg=name)
        np.testing.assert_allclose(p.std, IMAGENET_STD, atol=0.01, err_msg=name)
        assert 60 < e.top1 < 90, name
        assert e.license in ("bsd-3-clause", "apache-2.0"), name
    # torchvision's V2 transform: resize 232, crop 224.
    assert registry["resnet50.tv2_in1k"].preprocessing.resize_size == 232
    assert registry["resnet50.tv_in1k"].preprocessing.resize_size == 256


def test_docs_table_is_generated_from_the_registry():
    text = DOCS.read_text()
    assert pretrained_registry.replace_table(text) == text, (
        "docs/pretrained.md is stale: python -m resnet_jax.pretrained_registry docs/pretrained.md"
    )
    for name in pretrained_registry.REGISTRY:
        assert text.count(f"| `{name}` |") == 1, name
