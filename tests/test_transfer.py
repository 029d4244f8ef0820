"""Transfer learning: freeze modes leave exactly the frozen weights and statistics untouched."""

import functools
import json
import logging
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import torchvision

from resnet_jax import checkpoint, convert, models, train, transfer

ROOT = Path(__file__).resolve().parents[1]
tiny = functools.partial(models.ResNet, stage_sizes=(1, 1, 1, 1), block_cls=models.BasicBlock)


def _leaves_by_stage(tree: dict) -> dict[str, list[np.ndarray]]:
    grouped: dict[str, list[np.ndarray]] = {}
    for top, sub in sorted(tree.items()):
        grouped.setdefault(transfer.stage_of(top), []).extend(map(np.asarray, jax.tree.leaves(sub)))
    return grouped


def _changed_stages(before: dict, after: dict) -> tuple[set[str], set[str]]:
    """(stages where every leaf is bit-identical, stages where every leaf changed)."""
    same, changed = set(), set()
    old, new = _leaves_by_stage(before), _leaves_by_stage(after)
    for stage in old:
        equal = [np.array_equal(a, b) for a, b in zip(old[stage], new[stage], strict=True)]
        if all(equal):
            same.add(stage)
        elif not any(equal):
            changed.add(stage)
    return same, changed


@pytest.fixture(scope="module")
def start_variables():
    return models.init_variables(tiny(num_classes=5), jax.random.key(0), 32)


@pytest.mark.parametrize(
    ("freeze", "trainable", "trained"),
    [
        ("backbone", None, {"fc"}),
        ("stages", ["layer4", "fc"], {"layer4", "fc"}),
        ("none", None, {"stem", "layer1", "layer2", "layer3", "layer4", "fc"}),
    ],
)
def test_freeze_modes_update_exactly_the_trainable_stages(
    freeze, trainable, trained, start_variables
):
    stages = transfer.trainable_stages(freeze, trainable)
    assert set(stages) == trained
    model = tiny(num_classes=5, frozen_bn=transfer.frozen_bn(stages))
    tx = train.create_optimizer(
        schedule=0.1,
        param_labels=transfer.param_labels(start_variables["params"], stages),
        head_lr_multiplier=2.0,
    )
    state = train.create_train_state(start_variables, tx)
    step = jax.jit(train.make_train_step(model, tx, axis_name=None))
    rng = np.random.default_rng(0)
    for _ in range(2):
        batch = {
            "image": rng.normal(size=(4, 32, 32, 3)).astype(np.float32),
            "label": rng.integers(0, 5, 4).astype(np.int32),
        }
        state, _ = step(state, batch)
    all_stages = set(transfer.STAGES)
    same, changed = _changed_stages(start_variables["params"], state.params)
    assert changed == trained and same == all_stages - trained
    # BatchNorm statistics: frozen stages keep theirs exactly; the head has none.
    same, changed = _changed_stages(start_variables["batch_stats"], state.batch_stats)
    assert changed == trained - {"fc"} and same == all_stages - trained


def test_trainable_stages_errors():
    with pytest.raises(ValueError, match="needs --trainable"):
        transfer.trainable_stages("stages", None)
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['layer5'\]"):
        transfer.trainable_stages("stages", ["layer5", "fc"])
    with pytest.raises(ValueError, match="--freeze must be one of none, stages, backbone"):
        transfer.trainable_stages("all", None)
    with pytest.raises(ValueError, match="only applies to --freeze stages"):
        transfer.trainable_stages("backbone", ["fc"])


def test_merge_replaces_a_head_with_another_class_count(start_variables, caplog):
    ten = jax.tree.map(
        np.asarray, models.init_variables(tiny(num_classes=10), jax.random.key(1), 32)
    )
    with caplog.at_level(logging.INFO, logger="resnet_jax"):
        merged = transfer.merge_pretrained(start_variables, ten)
    assert "head has 10 classes, the data set 5" in caplog.text
    np.testing.assert_array_equal(
        merged["params"]["fc"]["kernel"], start_variables["params"]["fc"]["kernel"]
    )
    np.testing.assert_array_equal(
        merged["params"]["conv1"]["kernel"], ten["params"]["conv1"]["kernel"]
    )
    np.testing.assert_array_equal(
        merged["batch_stats"]["bn1"]["var"], ten["batch_stats"]["bn1"]["var"]
    )
    same = transfer.merge_pretrained(ten, ten)
    np.testing.assert_array_equal(same["params"]["fc"]["kernel"], ten["params"]["fc"]["kernel"])


def test_finetune_from_torchvision_file_on_flowers(tmp_path, flowers_dir):
    """The tutorial's flow: torchvision ImageNet-shaped weights -> new 5-class head -> train the
    last stage and the head; everything else must stay exactly as loaded."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    weights = tmp_path / "resnet18_imagenet.pth"
    torch.save(net.state_dict(), weights)
    workdir = tmp_path / "finetune"
    cmd = [
        sys.executable, str(ROOT / "scripts" / "train.py"), "--arch", "resnet18",
        "--pretrained", str(weights), "--freeze", "stages", "--trainable", "layer4,fc",
        "--data-dir", str(flowers_dir), "--image-size", "32", "--batch-size", "8",
        "--eval-batch-size", "64", "--epochs", "1", "--warmup-epochs", "0", "--max-steps", "2",
        "--lr", "0.5", "--workdir", str(workdir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "head has 1000 classes, the data set 5" in proc.stderr
    loaded = checkpoint.load(workdir, which="latest")
    assert loaded.num_classes == 5 and loaded.class_names[0] == "daisy"
    start = convert.from_torchvision(weights, "resnet18")
    start["params"].pop("fc")
    after = {k: dict(v) for k, v in loaded.variables.items()}
    fc = after["params"].pop("fc")
    assert fc["kernel"].shape == (512, 5)
    for collection in ("params", "batch_stats"):
        same, changed = _changed_stages(start[collection], after[collection])
        assert same == {"stem", "layer1", "layer2", "layer3"}, collection
        assert changed == {"layer4"}, collection

    # ... then evaluate and predict with the fine-tuned checkpoint through the CLIs.
    report = json.loads(_run_script("evaluate.py", "--checkpoint", str(workdir), "--data-dir",
                                    str(flowers_dir), "--batch-size", "64", "--json"))  # fmt: skip
    assert report["count"] == 736 and 0 <= report["top1"] <= 1
    assert sum(c["images"] for c in report["per_class"]) == 736
    photos = sorted((flowers_dir / "val" / "roses").glob("*.jpg"))[:3]
    predictions = json.loads(
        _run_script(
            "predict.py", "--checkpoint", str(workdir), "--top-k", "2", "--json", *map(str, photos)
        )
    )
    assert [p["path"] for p in predictions] == [str(p) for p in photos]
    for p in predictions:
        assert {c["class"] for c in p["predictions"]} <= set(loaded.class_names)
        assert p["predictions"][0]["probability"] >= p["predictions"][1]["probability"]


def _run_script(name: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout
