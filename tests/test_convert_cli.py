"""scripts/convert_weights.py end to end: torchvision file -> Flax directory -> torch file."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
import torchvision
from helpers import load_script, run_script

from resnet_jax import checkpoint, inference, model_dir

SCRIPT = "convert_weights.py"
CLASS_NAMES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


@pytest.fixture(scope="module")
def weights(module_tmp) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 5-class resnet18 .pth whose float tensors are all random."""
    torch.manual_seed(0)
    state_dict = torchvision.models.resnet18(num_classes=5).state_dict()
    state_dict = {
        k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state_dict.items()
    }
    path = module_tmp("cli") / "resnet18_flowers.pth"
    torch.save(state_dict, path)
    return path, state_dict


@pytest.mark.launches
def test_round_trip_through_the_cli(tmp_path, weights, capsys):
    """to-flax in a process of its own, to-torch (and the error cases below) in this one."""
    pth, state_dict = weights
    names = tmp_path / "names.txt"
    names.write_text("\n".join(CLASS_NAMES) + "\n")
    flax_dir = tmp_path / "flax"
    proc = run_script(
        SCRIPT, "to-flax", "--arch", "resnet18", "--input", str(pth), "--output", str(flax_dir),
        "--class-names", str(names),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {flax_dir}: resnet18, 11,179,077 parameters, 5 classes" in proc.stdout
    loaded = model_dir.load(flax_dir)
    assert (loaded.arch, loaded.class_names) == ("resnet18", CLASS_NAMES)
    assert loaded.metadata["converted_from"] == str(pth)
    # predict.py / evaluate.py / Predictor read the eval size from the directory: torchvision's.
    assert loaded.metadata["image_size"] == 224
    assert inference.Predictor.from_checkpoint(flax_dir).image_size == 224

    out = tmp_path / "back.safetensors"
    to_torch = ["to-torch", "--input", str(flax_dir), "--output", str(out)]
    assert load_script(SCRIPT).main(to_torch) == 0
    report = capsys.readouterr().out
    assert f"wrote {out} from {flax_dir}: resnet18, 11,179,077 parameters, 5 classes" in report
    back = safetensors.torch.load_file(out)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        if value.is_floating_point():
            assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    torchvision.models.resnet18(num_classes=5).load_state_dict(back, strict=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-classes", "7"], "has 5 classes while num_classes=7 was requested"),
        (["--class-names", "{tmp}/three.txt"], "3 class_names for a model with 5 classes"),
        (["--class-names", "{tmp}/bad.json"], "bad.json: not valid JSON"),
        (["--arch", "resnet5O"], "Did you mean 'resnet50'"),
        (["--arch", "resnet34"], "looks like a resnet18 state_dict, not resnet34"),
        (["--image-size", "0"], "argument --image-size: must be a positive integer, got '0'"),
    ],
)
def test_bad_to_flax_arguments_are_usage_errors(tmp_path, weights, capsys, args, message):
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    (tmp_path / "bad.json").write_text("[not json")
    argv = ["to-flax", "--arch", "resnet18", "--input", str(weights[0])]
    argv += ["--output", str(tmp_path / "out")] + [a.format(tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        load_script(SCRIPT).main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_to_flax_records_the_image_size(tmp_path, weights, capsys):
    flax_dir = tmp_path / "flax"
    argv = ["to-flax", "--arch", "resnet18", "--input", str(weights[0]), "--output",
            str(flax_dir), "--image-size", "48"]  # fmt: skip
    assert load_script(SCRIPT).main(argv) == 0
    assert model_dir.load(flax_dir).metadata["image_size"] == 48
    predictor = inference.Predictor.from_checkpoint(flax_dir)
    assert (predictor.image_size, predictor.class_names) == (48, ["0", "1", "2", "3", "4"])


def test_to_flax_writes_float32_from_a_float16_file(tmp_path, weights):
    half = {k: v.half() if v.is_floating_point() else v for k, v in weights[1].items()}
    torch.save(half, tmp_path / "half.pth")
    flax_dir = tmp_path / "flax"
    argv = ["to-flax", "--arch", "resnet18", "--input", str(tmp_path / "half.pth"),
            "--output", str(flax_dir)]  # fmt: skip
    assert load_script(SCRIPT).main(argv) == 0
    variables = model_dir.load(flax_dir).variables
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {np.dtype(np.float32)}
    var = np.asarray(variables["batch_stats"]["bn1"]["var"])
    np.testing.assert_array_equal(var, half["bn1.running_var"].float().numpy())


def test_to_torch_from_a_workdir_picks_and_prints_the_step(tmp_path, weights, capsys):
    """Step 1 has the best val_accuracy, step 2 is the latest: the default exports the best,
    --which latest and --step choose otherwise, and the report names the step written."""
    from resnet_jax import convert

    variables = convert.from_torchvision(weights[0], "resnet18")
    workdir = tmp_path / "run"
    with checkpoint.TrainCheckpointer(workdir, async_save=False) as ckpt:
        for step, accuracy in ((1, 0.9), (2, 0.1)):
            fc = {**variables["params"]["fc"], "bias": np.full(5, float(step), np.float32)}
            state = {**variables, "params": {**variables["params"], "fc": fc}}
            ckpt.save(
                step, state, metadata={"arch": "resnet18"}, metrics={"val_accuracy": accuracy}
            )
    script = load_script(SCRIPT)
    for i, (flags, step) in enumerate([([], 1), (["--which", "latest"], 2), (["--step", "2"], 2)]):
        out = tmp_path / f"w{i}.pth"
        assert script.main(["to-torch", "--input", str(workdir), "--output", str(out), *flags]) == 0
        written = workdir / "checkpoints" / str(step)
        assert f"wrote {out} from {written} (step {step}): resnet18" in capsys.readouterr().out
        bias = torch.load(out, weights_only=True)["fc.bias"]
        assert torch.equal(bias, torch.full((5,), float(step))), flags
    with pytest.raises(SystemExit) as exit_info:
        script.main(
            [
                "to-torch",
                "--input",
                str(workdir),
                "--output",
                str(tmp_path / "w.pth"),
                "--step",
                "3",
            ]
        )
    assert exit_info.value.code == 2
    assert "no checkpoint for step 3" in capsys.readouterr().err


def test_class_names_files(tmp_path):
    script = load_script(SCRIPT)
    (tmp_path / "list.json").write_text(json.dumps(CLASS_NAMES))
    (tmp_path / "lines.txt").write_text("\n".join(CLASS_NAMES) + "\n\n")
    model_dir.write_class_names(tmp_path, CLASS_NAMES)
    for name in ("list.json", "lines.txt", model_dir.CLASS_NAMES_FILE):
        assert script.read_class_names(tmp_path / name) == CLASS_NAMES


def test_to_torch_refuses_to_overwrite(tmp_path, capsys):
    existing = tmp_path / "w.pth"
    existing.write_bytes(b"keep me")
    with pytest.raises(SystemExit) as exit_info:
        load_script(SCRIPT).main(["to-torch", "--input", str(tmp_path), "--output", str(existing)])
    assert exit_info.value.code == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me"
