"""scripts/predict.py and scripts/evaluate.py on a few synthetic images (JPEG and PNG, several
sizes and modes), and the `evaluation` functions behind evaluate.py.

Their main() runs in this process, except for predict.py with torchvision weights, which runs
as a process of its own to show that a fresh process reads torch weights and decodes images.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
import torch
import torchvision
from helpers import load_script, run_script
from PIL import Image
from test_inference import random_variables

from resnet_jax import data, evaluation, inference, model_dir, models, pretrained_registry
from resnet_jax.preprocessing import Preprocessing

sys.path.insert(0, str(Path(__file__).parent))
from hub_standin import HubStandIn, hub_env, resnet18_weights  # noqa: E402

PREDICT, EVALUATE = "predict.py", "evaluate.py"
PER_CLASS = 2
SIZE = 32


@pytest.fixture(scope="module")
def classes(synthetic_folders) -> list[str]:
    """The synthetic data set's class names, sorted (the order of the checkpoint's classes)."""
    return sorted(p.name for p in (synthetic_folders / "val").iterdir())


@pytest.fixture(scope="module")
def work(module_tmp, synthetic_folders, classes):
    """tmp/data/val/<class>/ with the first 2 synthetic val images of each class, and a random
    checkpoint for those classes."""
    root = module_tmp("cli")
    for name in classes:
        target = root / "data" / "val" / name
        target.mkdir(parents=True)
        for image in sorted((synthetic_folders / "val" / name).iterdir())[:PER_CLASS]:
            shutil.copy(image, target)
    variables = random_variables(models.get_model("resnet18", num_classes=len(classes)), seed=3)
    model_dir.save_model(
        root / "model",
        arch="resnet18",
        variables=variables,
        class_names=classes,
        metadata={"image_size": SIZE},
    )
    return root


def _images(work: Path) -> list[Path]:
    """The copied val images, sorted by path."""
    return sorted(p for p in (work / "data" / "val").rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def predictor(work):
    return inference.Predictor.from_checkpoint(work / "model", batch_size=4)


def test_predict_json_on_folders_with_gray_rgba_and_a_broken_file(
    work, predictor, tmp_path, capsys
):
    files = _images(work)
    rgb = np.asarray(Image.open(files[0]).convert("RGB"))
    (tmp_path / "nested" / "deeper").mkdir(parents=True)
    Image.fromarray(rgb).convert("L").save(tmp_path / "nested" / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "nested" / "deeper" / "rgba.PNG")
    (tmp_path / "nested" / "notes.txt").write_text("not an image: skipped by extension")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")

    inputs = [*files[:3], tmp_path / "nested", broken, files[3]]
    code = load_script(PREDICT).main(["--checkpoint", str(work / "model"), "--json", "--top-k",
                                      "3", "--batch-size", "4", *map(str, inputs)])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 1, err
    assert f"cannot decode image {broken}" in err
    assert "1 of 7 image(s) could not be read" in err
    records = json.loads(out)
    expected_paths = [
        *files[:3],
        tmp_path / "nested" / "gray.png",  # a folder's own files come before its subfolders'
        tmp_path / "nested" / "deeper" / "rgba.PNG",
        broken,
        files[3],
    ]
    assert [r["path"] for r in records] == [str(p) for p in expected_paths]
    assert "predictions" not in records[5] and str(broken) in records[5]["error"]

    good = [p for p in expected_paths if p != broken]
    want = predictor.top_k(good, k=3)
    got = [r["predictions"] for r in records if "predictions" in r]
    for ranked, expected in zip(got, want, strict=True):
        assert [p["class"] for p in ranked] == [name for name, _ in expected]
        np.testing.assert_allclose([p["probability"] for p in ranked], [p for _, p in expected],
                                   rtol=1e-4)  # fmt: skip
        assert ranked[0]["probability"] >= ranked[1]["probability"] >= ranked[2]["probability"]
    # The RGBA PNG is the first image with alpha dropped: same prediction as its RGB pixels.
    np.testing.assert_allclose(
        [p["probability"] for p in got[4]], [p for _, p in predictor.top_k(rgb, k=3)[0]], rtol=1e-4
    )


def test_resize_size_flag_reaches_predict_and_evaluate(work, classes, predictor, capsys):
    """--resize-size 32 (= the crop) gives the Predictor's numbers at that resize, which differ
    from the default resize (37 for 32)."""
    tight = inference.Predictor.from_checkpoint(work / "model", resize_size=SIZE, batch_size=4)
    files = _images(work)[:2]
    k = len(classes)
    code = load_script(PREDICT).main(["--checkpoint", str(work / "model"), "--resize-size",
                                      str(SIZE), "--top-k", str(k), "--json",
                                      *map(str, files)])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    got = [[p["probability"] for p in r["predictions"]] for r in json.loads(out)]
    want = [[p for _, p in row] for row in tight.top_k(files, k=k)]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert not np.allclose(got, [[p for _, p in row] for row in predictor.top_k(files, k=k)])

    code = load_script(EVALUATE).main(["--checkpoint", str(work / "model"), "--data-dir",
                                       str(work / "data"), "--resize-size", str(SIZE),
                                       "--batch-size", "8", "--json"])  # fmt: skip
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    metrics = json.loads(stdout)
    assert metrics["resize_size"] == SIZE and metrics["image_size"] == SIZE
    labels, probs = _expected(work, classes, tight)
    np.testing.assert_array_equal(metrics["confusion"], _confusion(labels, probs))
    loss = -np.mean(np.log(probs[np.arange(len(labels)), labels]))
    assert metrics["loss"] == pytest.approx(loss, rel=1e-4)


@pytest.mark.launches
def test_predict_torchvision_weights_gives_imagenet_classes(work, tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval()
    weights = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), weights)
    files = _images(work)[:2]
    proc = run_script(PREDICT, "--torchvision-weights", str(weights), "--arch", "resnet18",
                      "--image-size", str(SIZE), "--json", *map(str, files))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    names = inference.imagenet_class_names()
    batch = np.stack([data.preprocess_for_eval(data.load_image(p), SIZE) for p in files])
    with torch.no_grad():
        probs = torch.softmax(net(torch.from_numpy(batch).permute(0, 3, 1, 2)), 1).numpy()
    for record, row in zip(records, probs, strict=True):
        assert len(record["predictions"]) == 5
        assert record["predictions"][0]["class"] == names[int(row.argmax())]
        assert record["predictions"][0]["probability"] == pytest.approx(row.max(), abs=1e-5)


def _expected(
    work: Path, classes: list[str], predictor: inference.Predictor
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of the val images from the Predictor."""
    labels, paths = [], []
    for index, name in enumerate(classes):
        files = sorted((work / "data" / "val" / name).iterdir())
        labels += [index] * len(files)
        paths += files
    return np.asarray(labels), predictor.predict_proba(paths)


def _confusion(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    n = probs.shape[1]
    counts = np.zeros((n, n), np.int64)
    np.add.at(counts, (labels, probs.argmax(1)), 1)
    return counts


def test_evaluate_folder_json_table_and_confusion_png(work, classes, predictor, capsys):
    out = work / "eval"
    code = load_script(EVALUATE).main(["--checkpoint", str(work / "model"), "--data-dir",
                                       str(work / "data"), "--batch-size", "12", "--json",
                                       "--output-dir", str(out)])  # fmt: skip
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    metrics = json.loads(stdout)
    assert metrics == json.loads((out / "metrics.json").read_text())
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    total = PER_CLASS * len(classes)
    assert metrics["count"] == total and metrics["class_names"] == classes
    assert metrics["image_size"] == SIZE and metrics["resize_size"] == round(SIZE * 256 / 224)
    assert [row["images"] for row in metrics["per_class"]] == [PER_CLASS] * len(classes)
    assert sum(row["images"] for row in metrics["per_class"]) == total

    # The same numbers from the Predictor: the 8 images went in one batch of 12 over 4 devices,
    # its 4 padding rows masked out.
    labels, probs = _expected(work, classes, predictor)
    want = _confusion(labels, probs)
    np.testing.assert_array_equal(metrics["confusion"], want)
    assert metrics["top1"] == pytest.approx(np.trace(want) / total)
    top5 = np.mean([label in np.argsort(-p)[:5] for label, p in zip(labels, probs, strict=True)])
    assert metrics["top5"] == pytest.approx(top5)
    loss = -np.mean(np.log(probs[np.arange(total), labels]))
    assert metrics["loss"] == pytest.approx(loss, rel=1e-4)
    for row, correct in zip(metrics["per_class"], np.diag(want), strict=True):
        assert row["correct"] == correct and row["accuracy"] == pytest.approx(correct / PER_CLASS)


def test_evaluate_tfds_split_maps_classes_by_name(work, classes, predictor, capsys, tmp_path):
    """A real (tiny) TFDS dataset of the same images (their decoded pixels, stored as lossless
    PNG) whose classes come in reverse order: the labels are translated to the checkpoint's by
    name, giving the folder's confusion matrix."""
    examples = [(data.load_image(p), p.parent.name) for p in _images(work)]

    class ResnetJaxEvalSynthetic(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(encoding_format="png"),
                "label": tfds.features.ClassLabel(names=classes[::-1]),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, (image, name) in enumerate(examples):
                yield i, {"image": image, "label": name}

    name, tfds_dir = "resnet_jax_eval_synthetic", str(tmp_path)
    evaluate = load_script(EVALUATE)
    evaluate.main(["--checkpoint", str(work / "model"), "--dataset", name, "--split", "train",
                   "--tfds-data-dir", tfds_dir, "--batch-size", "4", "--json"])  # fmt: skip
    metrics = json.loads(capsys.readouterr().out)
    assert "(train)" in metrics["data"] and metrics["class_names"] == classes
    assert metrics["count"] == len(examples)
    want = _confusion(*_expected(work, classes, predictor))
    np.testing.assert_array_equal(metrics["confusion"], want)  # totalled over 2 batches of 4

    half = evaluation.open_eval_data(dataset=name, split="train[:50%]", tfds_data_dir=tfds_dir)
    assert half.num_eval == len(examples) // 2
    with pytest.raises(ValueError, match="split 'tset': Unknown split 'tset'"):
        evaluation.open_eval_data(dataset=name, split="tset", tfds_data_dir=tfds_dir)


def test_open_eval_data_folder_layouts(work, classes, tmp_path):
    """DIR/val wins; DIR/train alone gives training's held-out part; else DIR's class folders."""
    val = work / "data" / "val"
    plain = evaluation.open_eval_data(data_dir=val)
    assert plain.class_names == classes and plain.num_eval == PER_CLASS * len(classes)
    with_val = evaluation.open_eval_data(data_dir=work / "data")
    assert with_val.eval_split == plain.eval_split and "val" in with_val.origin

    shutil.copytree(val, tmp_path / "train")
    held = evaluation.open_eval_data(data_dir=tmp_path, val_fraction=0.5, seed=3)
    same = data.open_source(data_dir=tmp_path, val_fraction=0.5, seed=3)
    assert held.eval_split == same.eval_split and held.num_eval == len(classes)
    with pytest.raises(ValueError, match="exactly one of data_dir"):
        evaluation.open_eval_data()


def test_evaluate_checkpoint_batch_must_split_over_devices(work):
    loaded, source = (
        model_dir.load(work / "model"),
        evaluation.open_eval_data(data_dir=work / "data"),
    )
    with pytest.raises(ValueError, match="^batch_size 6 is not divisible by the number of dev"):
        evaluation.evaluate_checkpoint(loaded, source, batch_size=6)


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        (PREDICT, ["--checkpoint", "{work}/nowhere", "{work}/data"], "{work}/nowhere"),
        (PREDICT, ["--checkpoint", "{work}/model", "{work}/missing.jpg"], "missing.jpg"),
        (
            PREDICT,
            ["--checkpoint", "{work}/model", "--top-k", "{n}", "{work}/model"],
            "has no image files",
        ),
        (PREDICT, ["--checkpoint", "{work}/model", "--top-k", "{n1}", "{work}/data"], "[1, {n}]"),
        (PREDICT, ["--torchvision-weights", "{work}/w.pth", "{work}/data"], "needs --arch"),
        (
            PREDICT,
            [
                "--torchvision-weights",
                "{work}/w.pth",
                "--arch",
                "resnet18",
                "--which",
                "latest",
                "{work}/data",
            ],  # fmt: skip
            "--step and --which apply to --checkpoint",
        ),
        (
            PREDICT,
            ["--checkpoint", "{work}/model", "--step", "-1", "{work}/data"],
            "argument --step: must be a non-negative integer, got '-1'",
        ),
        (
            PREDICT,
            ["--checkpoint", "{work}/model", "--image-size", "0", "{work}/data"],
            "argument --image-size: must be a positive integer, got '0'",
        ),
        (
            PREDICT,
            ["--checkpoint", "{work}/model", "--resize-size", "31", "{work}/data"],
            "--resize-size 31 is smaller than the crop size 32 (--image-size)",
        ),
        (
            PREDICT,
            [
                "--torchvision-weights",
                "{work}/w.pth",
                "--arch",
                "resnet18",
                "--resize-size",
                "200",
                "{work}/data",
            ],  # fmt: skip
            "--resize-size 200 is smaller than the crop size 224 (--image-size)",
        ),
        (
            EVALUATE,
            ["--checkpoint", "{work}/model", "--data-dir", "{work}/data", "--batch-size", "0"],
            "argument --batch-size: must be a positive integer, got '0'",
        ),
        (
            EVALUATE,
            ["--checkpoint", "{work}/model", "--data-dir", "{work}/data", "--resize-size", "0"],
            "argument --resize-size: must be a positive integer, got '0'",
        ),
        (
            EVALUATE,
            [
                "--checkpoint",
                "{work}/model",
                "--data-dir",
                "{work}/data",
                "--image-size",
                "48",
                "--resize-size",
                "40",
            ],  # fmt: skip
            "--resize-size 40 is smaller than the crop size 48 (--image-size)",
        ),
        (EVALUATE, ["--checkpoint", "{work}/nowhere", "--data-dir", "{work}/data"], "nowhere"),
        (EVALUATE, ["--checkpoint", "{work}/model"], "records no training data"),
        (EVALUATE, ["--checkpoint", "{work}/model", "--data-dir", "{work}/odd"], "['cactus']"),
        (
            EVALUATE,
            ["--checkpoint", "{work}/model", "--data-dir", "{work}/data", "--batch-size", "6"],
            "--batch-size 6 is not divisible by the number of devices 4; use a positive "
            "multiple of 4",
        ),
        (
            EVALUATE,
            ["--checkpoint", "{work}/model", "--data-dir", "{work}/data", "--split", "test"],
            "--split applies to --dataset",
        ),
    ],
)
def test_errors_are_usage_errors_naming_the_problem(script, args, message, work, classes, capsys):
    """`{work}` in the arguments and message is the module's work directory, `{n}` the number of
    classes and `{n1}` one more."""
    odd = work / "odd" / "cactus"
    odd.mkdir(parents=True, exist_ok=True)
    shutil.copy(_images(work)[0], odd)
    fields = {"work": work, "n": len(classes), "n1": len(classes) + 1}
    module = load_script(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main([a.format(**fields) for a in args])
    assert exit_info.value.code == 2
    assert message.format(**fields) in capsys.readouterr().err


def test_evaluate_uses_the_stored_preprocessing_unless_overridden(work, capsys):
    stored = Preprocessing(SIZE, 1.0, "bicubic", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    loaded = model_dir.load(work / "model")
    path = model_dir.save_model(
        work / "stored", arch=loaded.arch, variables=loaded.variables,
        class_names=loaded.class_names, preprocessing=stored,
    )  # fmt: skip
    evaluate = load_script(EVALUATE)
    common = ["--checkpoint", str(path), "--data-dir", str(work / "data"), "--json"]
    assert evaluate.main(common) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["preprocessing"] == stored.to_json() and metrics["resize_size"] == SIZE
    source = evaluation.open_eval_data(data_dir=work / "data")
    want = evaluation.evaluate_checkpoint(model_dir.load(path), source, batch_size=8)
    assert metrics["loss"] == pytest.approx(want.loss, rel=1e-5)
    assert evaluate.main([*common, "--interpolation", "nearest", "--resize-size", "40"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["preprocessing"]["interpolation"] == "nearest" and metrics["resize_size"] == 40
    assert metrics["preprocessing"]["mean"] == [0.5, 0.5, 0.5]  # not overridden: stored


@pytest.fixture(scope="module")
def hub(module_tmp, classes):
    """The local Hub stand-in serving a random 1000-class resnet18 as the registry's
    resnet18.tv_in1k and a random one with a head for the synthetic classes (and a timm config
    stating its preprocessing) as org/four."""
    four_cfg = {"architecture": "resnet18", "pretrained_cfg": HUB_CFG}
    repos = {
        "timm/resnet18.tv_in1k": {"model.safetensors": resnet18_weights()},
        "org/four": {
            "model.safetensors": resnet18_weights(num_classes=len(classes), seed=1),
            "config.json": json.dumps(four_cfg).encode(),
        },
    }
    with HubStandIn(repos) as server:
        yield server.url, module_tmp("hf_home")


HUB_CFG = {"test_input_size": [3, 40, 40], "test_crop_pct": 1.0, "interpolation": "bicubic",
           "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}  # fmt: skip


@pytest.mark.launches
def test_pretrained_names_in_predict_evaluate_and_convert(hub, work, capsys, tmp_path):
    url, hf_home = hub
    env = hub_env(url, hf_home, JAX_PLATFORMS="cpu")
    image = _images(work)[0]
    proc = run_script(PREDICT, "--pretrained", "resnet18.tv_in1k", str(image), "--json",
                      "--top-k", "3", **env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = json.loads(proc.stdout)
    names = set(inference.imagenet_class_names())
    assert len(record["predictions"]) == 3
    assert all(p["class"] in names for p in record["predictions"])

    proc = run_script(EVALUATE, "--pretrained", "hf-hub:org/four", "--data-dir",
                      str(work / "data"), "--json", **env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout)
    assert metrics["checkpoint"] == "hf-hub:org/four" and metrics["count"] == len(_images(work))
    assert metrics["preprocessing"] == {"eval_size": 40, "crop_pct": 1.0,
        "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.25] * 3}  # fmt: skip

    out = tmp_path / "tv_in1k"
    proc = run_script("convert_weights.py", "to-flax", "--input", "resnet18.tv_in1k", "--output",
                      str(out), **env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    converted = model_dir.load(out)
    assert converted.arch == "resnet18" and converted.num_classes == 1000
    assert converted.class_names == inference.imagenet_class_names()
    assert converted.preprocessing == pretrained_registry.REGISTRY["resnet18.tv_in1k"].preprocessing

    evaluate = load_script(EVALUATE)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--pretrained", "resnet18.tv_in1kk", "--data-dir", str(work / "data")])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown pretrained weights 'resnet18.tv_in1kk'. Did you mean 'resnet18.tv_in1k'" in last
