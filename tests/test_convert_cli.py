"""scripts/convert_weights.py end to end: torchvision file -> Flax directory -> torch file."""

import torch  # noqa: I001  (torch before anything that could pull in TensorFlow)
import torchvision

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch

from resnet_jax import checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "convert_weights.py"
CLASS_NAMES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 5-class resnet18 .pth whose float tensors are all random."""
    torch.manual_seed(0)
    state_dict = torchvision.models.resnet18(num_classes=5).state_dict()
    state_dict = {
        k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state_dict.items()
    }
    path = tmp_path_factory.mktemp("cli") / "resnet18_flowers.pth"
    torch.save(state_dict, path)
    return path, state_dict


def test_round_trip_through_the_cli(tmp_path, weights):
    pth, state_dict = weights
    names = tmp_path / "names.txt"
    names.write_text("\n".join(CLASS_NAMES) + "\n")
    model_dir = tmp_path / "flax"
    proc = _run(
        "to-flax", "--arch", "resnet18", "--input", str(pth), "--output", str(model_dir),
        "--class-names", str(names),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {model_dir}: resnet18, 11,179,077 parameters, 5 classes" in proc.stdout
    loaded = checkpoint.load(model_dir)
    assert (loaded.arch, loaded.class_names) == ("resnet18", CLASS_NAMES)
    assert loaded.metadata["converted_from"] == str(pth)

    out = tmp_path / "back.safetensors"
    proc = _run("to-torch", "--input", str(model_dir), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}: resnet18, 11,179,077 parameters, 5 classes" in proc.stdout
    back = safetensors.torch.load_file(out)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        if value.is_floating_point():
            assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    torchvision.models.resnet18(num_classes=5).load_state_dict(back, strict=True)


def test_wrong_arch_is_a_clear_error(tmp_path, weights):
    proc = _run(
        "to-flax", "--arch", "resnet34", "--input", str(weights[0]), "--output", str(tmp_path / "x")
    )
    assert proc.returncode == 2
    assert "looks like a resnet18 state_dict, not resnet34" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


def _script():
    spec = importlib.util.spec_from_file_location("convert_weights_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-classes", "7"], "has 5 classes while num_classes=7 was requested"),
        (["--class-names", "{tmp}/three.txt"], "3 class_names for a model with 5 classes"),
        (["--class-names", "{tmp}/bad.json"], "bad.json: not valid JSON"),
        (["--arch", "resnet5O"], "Did you mean 'resnet50'"),
    ],
)
def test_bad_to_flax_arguments_are_usage_errors(tmp_path, weights, capsys, args, message):
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    (tmp_path / "bad.json").write_text("[not json")
    argv = ["to-flax", "--arch", "resnet18", "--input", str(weights[0])]
    argv += ["--output", str(tmp_path / "out")] + [a.format(tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        _script().main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_class_names_files(tmp_path):
    script = _script()
    (tmp_path / "list.json").write_text(json.dumps(CLASS_NAMES))
    (tmp_path / "lines.txt").write_text("\n".join(CLASS_NAMES) + "\n\n")
    checkpoint.write_class_names(tmp_path, CLASS_NAMES)
    for name in ("list.json", "lines.txt", checkpoint.CLASS_NAMES_FILE):
        assert script.read_class_names(tmp_path / name) == CLASS_NAMES


def test_to_torch_refuses_to_overwrite(tmp_path, capsys):
    existing = tmp_path / "w.pth"
    existing.write_bytes(b"keep me")
    with pytest.raises(SystemExit) as exit_info:
        _script().main(["to-torch", "--input", str(tmp_path), "--output", str(existing)])
    assert exit_info.value.code == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me"
