"""Transfer learning: freeze modes leave exactly the frozen weights and statistics untouched."""

import functools
import logging

import jax
import numpy as np
import optax
import pytest
import torch
import torchvision

from resnet_jax import models, optim, steps, transfer

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
        # Slow only: test_finetune_from_torchvision_file_on_flowers checks this freeze through
        # scripts/train.py (every leaf of layer4's params and statistics and of the head moved,
        # the rest bit-identical).
        pytest.param("stages", ["layer4", "fc"], {"layer4", "fc"}, marks=pytest.mark.slow),
        # Slow only: training everything is what every other training test does.
        pytest.param(
            "none",
            None,
            {"stem", "layer1", "layer2", "layer3", "layer4", "fc"},
            marks=pytest.mark.slow,
        ),
    ],
)
def test_freeze_modes_update_exactly_the_trainable_stages(
    freeze, trainable, trained, start_variables
):
    stages = transfer.trainable_stages(freeze, trainable)
    assert set(stages) == trained
    model = tiny(num_classes=5, frozen_bn=transfer.frozen_bn(stages))
    tx = optim.create_optimizer(
        schedule=0.1,
        param_labels=transfer.param_labels(start_variables["params"], stages),
        head_lr_multiplier=2.0,
    )
    state = steps.create_train_state(start_variables, tx)
    mask = transfer.trainable_mask(start_variables["params"], stages)
    step = jax.jit(steps.make_train_step(model, tx, axis_name=None, trainable=mask))
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


def _frozen_step(freeze: str, variables: dict):
    """(jitted train step, state, model) training only what `freeze` leaves trainable."""
    stages = transfer.trainable_stages(freeze, None)
    model = tiny(num_classes=5, frozen_bn=transfer.frozen_bn(stages))
    labels = transfer.param_labels(variables["params"], stages)
    tx = optim.create_optimizer(schedule=0.1, param_labels=labels)
    mask = transfer.trainable_mask(variables["params"], stages)
    step = jax.jit(steps.make_train_step(model, tx, axis_name=None, trainable=mask))
    return step, steps.create_train_state(variables, tx), model


def test_frozen_params_get_no_gradient_work(start_variables):
    """freeze=backbone differentiates only the head: the step costs about the forward pass
    (a third of a full step's FLOPs), and grad_norm is the head's gradient norm."""
    rng = np.random.default_rng(1)
    batch = {
        "image": rng.normal(size=(4, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 5, 4).astype(np.int32),
    }
    flops = {}
    for freeze in ("backbone", "none"):
        step, state, _ = _frozen_step(freeze, start_variables)
        flops[freeze] = step.lower(state, batch).cost_analysis()["flops"]
    assert flops["backbone"] < 0.4 * flops["none"], flops

    step, state, model = _frozen_step("backbone", start_variables)

    def loss(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": start_variables["batch_stats"]},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        return steps.cross_entropy_loss(logits, batch["label"], num_classes=5)

    head_grads = jax.jit(jax.grad(loss))(start_variables["params"])["fc"]
    _, metrics = step(state, batch)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(head_grads), rtol=1e-5)


def test_trainable_stages_errors():
    with pytest.raises(ValueError, match="needs --trainable"):
        transfer.trainable_stages("stages", None)
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['layer5'\]"):
        transfer.trainable_stages("stages", ["layer5", "fc"])
    with pytest.raises(ValueError, match="--freeze must be one of none, stages, backbone"):
        transfer.trainable_stages("all", None)
    with pytest.raises(ValueError, match="only applies to --freeze stages"):
        transfer.trainable_stages("backbone", ["fc"])


def test_head_append_trains_only_the_new_layer(start_variables):
    """--head append: the pretrained 5-class fc stays, frozen, under a new 3-class `head`; after
    3 SGD steps with BatchNorm in train mode, every parameter but the head's and every BatchNorm
    statistic are bit-identical, and every leaf of the head moved."""
    stages = transfer.trainable_stages("backbone", None, "append")
    assert stages == ("head",)
    model = tiny(num_classes=3, fc_classes=5, frozen_bn=transfer.frozen_bn(stages))
    fresh = models.init_variables(model, jax.random.key(2), 32)
    pretrained = jax.tree.map(np.asarray, start_variables)
    start = transfer.merge_pretrained(fresh, pretrained)
    np.testing.assert_array_equal(
        start["params"]["fc"]["kernel"], pretrained["params"]["fc"]["kernel"]
    )
    np.testing.assert_array_equal(
        start["params"]["head"]["kernel"], fresh["params"]["head"]["kernel"]
    )
    labels = transfer.param_labels(start["params"], stages)
    assert {top: jax.tree.leaves(sub)[0] for top, sub in labels.items()} == {
        top: "head" if top == "head" else "frozen" for top in start["params"]
    }
    tx = optim.create_optimizer(schedule=0.5, param_labels=labels)
    mask = transfer.trainable_mask(start["params"], stages)
    step = jax.jit(steps.make_train_step(model, tx, axis_name=None, trainable=mask))
    state = steps.create_train_state(start, tx)
    rng = np.random.default_rng(3)
    for _ in range(3):
        batch = {"image": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
                 "label": rng.integers(0, 3, 4).astype(np.int32)}  # fmt: skip
        state, metrics = step(state, batch)
        assert np.isfinite(metrics["loss"])
    after = {"params": dict(state.params), "batch_stats": state.batch_stats}
    head = after["params"].pop("head")
    before = {"params": dict(start["params"]), "batch_stats": start["batch_stats"]}
    before["params"].pop("head")
    for collection in ("params", "batch_stats"):
        same, changed = _changed_stages(before[collection], after[collection])
        assert not changed and same == set(_leaves_by_stage(before[collection])), collection
    _, changed = _changed_stages({"head": start["params"]["head"]}, {"head": head})
    assert changed == {"head"}


def test_head_append_errors():
    with pytest.raises(ValueError, match="use it with --freeze backbone, not --freeze none"):
        transfer.trainable_stages("none", None, "append")
    with pytest.raises(ValueError, match="--head must be one of replace, append"):
        transfer.trainable_stages("backbone", None, "stack")
    with pytest.raises(ValueError, match=r"weights have no classifier \(fc\); use --head replace"):
        transfer.check_head_trains({"params": {}}, 5, ("head",))
    transfer.check_head_trains({"params": {"fc": {"kernel": np.zeros((512, 10))}}}, 5, ("head",))


def test_a_registered_name_of_another_arch_is_refused_before_downloading():
    with pytest.raises(
        ValueError, match="holds resnet50 weights but --arch is resnet18; pass --arch resnet50"
    ):
        transfer.load_pretrained("resnet50.tv2_in1k", "resnet18")


def test_a_new_head_must_train(start_variables):
    ten = {"params": {"fc": {"kernel": np.zeros((512, 10))}}}
    headless = {"params": {}}
    for pretrained, why in ((ten, "head has 10 classes, the data set 5"), (headless, "no head")):
        with pytest.raises(ValueError, match=f"{why}, so fc is a new.*add fc to --trainable"):
            transfer.check_head_trains(pretrained, 5, ("layer4",))
        transfer.check_head_trains(pretrained, 5, ("layer4", "fc"))
    five = {"params": {"fc": {"kernel": np.zeros((512, 5))}}}
    transfer.check_head_trains(five, 5, ("layer4",))  # the pretrained head is kept: fine


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


def test_load_pretrained_reads_torchvision_files_in_any_case(tmp_path):
    path = tmp_path / "RESNET18.PTH"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), path)
    loaded = transfer.load_pretrained(path, "resnet18")
    assert loaded.variables["params"]["fc"]["kernel"].shape == (512, 3)
    assert loaded.preprocessing is None  # a torchvision file states none
    assert loaded.origin == str(path)
