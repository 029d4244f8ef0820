"""Predictor: probabilities, top-k, padded batching, image kinds, loading paths and errors."""

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from resnet_jax import checkpoint, convert, data, inference, model_dir, models
from resnet_jax.preprocessing import Preprocessing, default_preprocessing

ARCH = "resnet18"
CLASSES = ["cat", "dog", "fish"]
SIZE = 32


def random_variables(model: models.ResNet, seed: int = 0) -> dict:
    """Random variables without compiling an init; BN statistics away from 0/1 so every layer
    matters and outputs differ clearly between images."""
    shapes = models.variable_shapes(model)
    rng = np.random.default_rng(seed)

    def sample(path, s):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape)
        if name in ("scale", "var"):
            return rng.uniform(0.8, 1.2, s.shape)
        return rng.normal(0, 0.1, s.shape)

    tree = jax.tree_util.tree_map_with_path(lambda p, s: sample(p, s).astype(s.dtype), shapes)
    return {"params": tree["params"], "batch_stats": tree["batch_stats"]}


@pytest.fixture(scope="module")
def saved_model(module_tmp):
    """A save_model directory: random 3-class resnet18 trained (nominally) at 32 px."""
    path = module_tmp("inference") / "model"
    variables = random_variables(models.get_model(ARCH, num_classes=len(CLASSES)))
    model_dir.save_model(
        path, arch=ARCH, variables=variables, class_names=CLASSES, metadata={"image_size": SIZE}
    )
    return path


@pytest.fixture(scope="module")
def predictor(saved_model):
    return inference.Predictor.from_checkpoint(saved_model, batch_size=4)


@pytest.fixture(scope="module")
def images():
    """Seven random RGB images of different sizes (so resizing and cropping differ)."""
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (40 + 3 * i, 50 - 2 * i, 3), dtype=np.uint8) for i in range(7)]


def test_probabilities_top_k_and_padded_batches(predictor, images):
    probs = predictor.predict_proba(images)
    assert probs.shape == (7, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert np.all(probs >= 0)
    assert len({tuple(np.round(p, 5)) for p in probs}) == 7  # the images are told apart

    # 7 images in batches of 4: the padded last batch equals predicting one image at a time.
    one_by_one = np.concatenate([predictor.predict_proba(image) for image in images])
    np.testing.assert_allclose(probs, one_by_one, rtol=1e-5, atol=1e-6)
    # ... and equals the model applied directly to the preprocessed inputs.
    batch = np.stack([data.preprocess_for_eval(image, SIZE) for image in images])
    apply = jax.jit(functools.partial(predictor.model.apply, train=False))
    logits = apply(predictor.variables, batch)
    np.testing.assert_allclose(probs, jax.nn.softmax(logits), atol=2e-5)
    stacked = predictor.predict_proba(np.stack([images[0]] * 2))
    np.testing.assert_allclose(stacked, [probs[0], probs[0]], rtol=1e-5, atol=1e-6)

    top = predictor.top_k(images, k=2)
    assert len(top) == 7
    for row, ranked in zip(probs, top, strict=True):
        order = np.argsort(-row)
        assert [name for name, _ in ranked] == [CLASSES[order[0]], CLASSES[order[1]]]
        assert ranked[0][1] >= ranked[1][1]
        assert ranked[0][1] == pytest.approx(float(row[order[0]]))
    assert predictor.predict_proba([]).shape == (0, 3)


def test_gray_rgba_png_and_jpeg_inputs(predictor, images, tmp_path):
    rgb = images[2]
    gray = rgb[..., 0]
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(gray).save(tmp_path / "gray.jpg", quality=95)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)

    want_rgb = predictor.predict_proba(rgb)[0]
    want_gray = predictor.predict_proba(np.repeat(gray[..., None], 3, axis=-1))[0]
    files = ["rgb.png", "rgba.png", "gray.png", "gray.jpg", "cmyk.jpg"]
    got = predictor.predict_proba([tmp_path / name for name in files])
    np.testing.assert_allclose(got[0], want_rgb, rtol=1e-5)  # PNG is lossless
    np.testing.assert_allclose(got[1], want_rgb, rtol=1e-5)  # alpha dropped
    np.testing.assert_allclose(got[2], want_gray, rtol=1e-5)
    np.testing.assert_allclose(got[3], want_gray, atol=0.05)  # JPEG is lossy
    np.testing.assert_allclose(got[4].sum(), 1.0, atol=1e-6)
    # Arrays of every layout give what the equivalent RGB array gives.
    arrays = [gray, gray[..., None], rgba, np.stack([rgb]), Image.fromarray(rgba)]
    got = np.concatenate([predictor.predict_proba(a) for a in arrays])
    np.testing.assert_allclose(got, [want_gray] * 2 + [want_rgb] * 3, rtol=1e-5)
    palette = Image.fromarray(rgb).convert("P")  # PIL images of any mode are converted to RGB
    np.testing.assert_allclose(
        predictor.predict_proba([palette])[0],
        predictor.predict_proba(np.asarray(palette.convert("RGB")))[0],
        rtol=1e-5,
    )


def test_loads_workdir_step_dir_and_overrides(saved_model, predictor, images, tmp_path):
    loaded = model_dir.load(saved_model)
    with checkpoint.TrainCheckpointer(tmp_path / "run", async_save=False) as ckpt:
        ckpt.save(
            3, loaded.variables, metadata={"arch": ARCH, "class_names": CLASSES, "image_size": SIZE}
        )
    want = predictor.predict_proba(images[:2])
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "3"):
        other = inference.Predictor.from_checkpoint(path, batch_size=4)
        assert other.class_names == CLASSES and other.image_size == SIZE
        # Other batch sizes tile the matmuls differently: float32 round-off, not a mismatch.
        np.testing.assert_allclose(other.predict_proba(images[:2]), want, rtol=1e-4, atol=1e-6)
    bigger = inference.Predictor.from_checkpoint(saved_model, image_size=48, batch_size=2)
    assert bigger.image_size == 48 and bigger.preprocess(images[0]).shape == (48, 48, 3)
    assert not np.allclose(bigger.predict_proba(images[:1]), want[:1])

    # Built directly, from a hand-made (unhashable: list-valued) ResNet equal to resnet18.
    model = models.ResNet(stage_sizes=[2, 2, 2, 2], block_cls=models.BasicBlock, num_classes=3)
    direct = inference.Predictor(model, loaded.variables, ["a", "b", "c"], SIZE, batch_size=2)
    np.testing.assert_allclose(direct.predict_proba(images[:2]), want, rtol=1e-4, atol=1e-6)
    assert direct.top_k(images[0], k=3)[0][0][0] == ["a", "b", "c"][int(want[0].argmax())]


def test_stored_preprocessing_and_overrides_reach_preprocess(
    saved_model, predictor, images, tmp_path
):
    loaded = model_dir.load(saved_model)
    tight = inference.Predictor.from_loaded(loaded, resize_size=SIZE, batch_size=4)
    assert tight.image_size == SIZE and tight.resize_size == SIZE
    assert predictor.preprocessing == default_preprocessing(SIZE)  # none stored: training's
    assert predictor.resize_size == round(SIZE * 256 / 224)
    want = data.preprocess_for_eval(images[0], preprocessing=Preprocessing.with_resize(SIZE, SIZE))
    np.testing.assert_array_equal(tight.preprocess(images[0]), want)
    assert np.abs(want - predictor.preprocess(images[0])).max() > 0.1
    assert not np.allclose(tight.predict_proba(images[:2]), predictor.predict_proba(images[:2]))
    same = inference.Predictor.from_checkpoint(saved_model, resize_size=SIZE, batch_size=4)
    np.testing.assert_array_equal(same.preprocess(images[1]), tight.preprocess(images[1]))
    with pytest.raises(ValueError, match=f"resize_size {SIZE - 1} is smaller than image_size"):
        inference.Predictor.from_checkpoint(saved_model, resize_size=SIZE - 1)
    with pytest.raises(ValueError, match="image_size 16 differs from preprocessing.eval_size 32"):
        inference.Predictor(
            loaded.model(), loaded.variables, CLASSES, 16, preprocessing=predictor.preprocessing
        )
    with pytest.raises(ValueError, match="give preprocessing or image_size"):
        inference.Predictor.from_loaded(loaded, preprocessing=tight.preprocessing, image_size=8)

    # A directory saved with its own preprocessing is predicted with it, overrides on top.
    stored = Preprocessing(SIZE, 1.0, "bicubic", mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    path = model_dir.save_model(
        tmp_path / "stored", arch=ARCH, variables=loaded.variables, class_names=CLASSES,
        preprocessing=stored,
    )  # fmt: skip
    own = inference.Predictor.from_checkpoint(path, batch_size=4)
    assert own.preprocessing == stored and own.resize_size == SIZE
    np.testing.assert_array_equal(
        own.preprocess(images[2]), data.preprocess_for_eval(images[2], preprocessing=stored)
    )
    nearest = inference.Predictor.from_checkpoint(path, interpolation="nearest", batch_size=4)
    assert nearest.preprocessing == dataclasses.replace(stored, interpolation="nearest")
    assert np.abs(nearest.preprocess(images[2]) - own.preprocess(images[2])).max() > 0.1


def test_errors_are_clear(saved_model, predictor, images, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        inference.Predictor.from_checkpoint(tmp_path / "nowhere")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="cannot decode image .*bad.jpg"):
        predictor.predict_proba([images[0], bad])
    with pytest.raises(ValueError, match="uint8"):
        predictor.predict_proba(images[0].astype(np.float32))
    with pytest.raises(ValueError, match=r"shape \(8, 8, 2\)"):
        predictor.predict_proba(np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match="k=4 exceeds the model's 3 classes"):
        predictor.top_k(images[0], k=4)
    loaded = model_dir.load(saved_model)
    with pytest.raises(ValueError, match="one name per class: the model has 3 classes, got 2"):
        inference.Predictor(loaded.model(), loaded.variables, ["a", "b"], SIZE)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        inference.Predictor(loaded.model(), loaded.variables, CLASSES, SIZE, batch_size=0)
    with pytest.raises(
        ValueError,
        match=r"Predictor: variables do not match the model:\n  missing 1 leaf: "
        r"\['params'\]\['fc'\]\['bias'\]$",
    ):
        params = {k: v for k, v in loaded.variables["params"].items() if k != "fc"}
        params["fc"] = {"kernel": loaded.variables["params"]["fc"]["kernel"]}
        inference.Predictor(loaded.model(), {**loaded.variables, "params": params}, CLASSES, SIZE)
    no_size = tmp_path / "no_size"
    model_dir.save_model(no_size, arch=ARCH, variables=loaded.variables, class_names=CLASSES)
    with pytest.raises(ValueError, match="no_size: checkpoint metadata has no image_size or prep"):
        inference.Predictor.from_checkpoint(no_size)
    with pytest.raises(ValueError, match="pass class_names"):
        inference.Predictor.from_torchvision(convert.to_torchvision(loaded.variables, ARCH), ARCH)


def test_half_precision_torchvision_weights_become_float32(saved_model):
    loaded = model_dir.load(saved_model)
    half = {
        k: v.half() if v.is_floating_point() else v
        for k, v in convert.to_torchvision(loaded.variables, ARCH).items()
    }
    predictor = inference.Predictor.from_torchvision(
        half, ARCH, image_size=SIZE, class_names=CLASSES
    )
    assert {a.dtype for a in jax.tree.leaves(predictor.variables)} == {np.dtype(np.float32)}
    want = jax.tree.map(
        lambda a: np.asarray(a).astype(np.float16).astype(np.float32), loaded.variables
    )
    for got, expected in zip(
        jax.tree.leaves(predictor.variables), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_array_equal(got, expected)


def test_imagenet_class_names_and_torchvision_weights(tmp_path, images):
    names = inference.imagenet_class_names()
    assert names == torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    assert json.loads(inference.IMAGENET_CLASSES_FILE.read_text()) == names

    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval()
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    predictor = inference.Predictor.from_torchvision(path, ARCH, image_size=SIZE, batch_size=2)
    assert predictor.class_names == names
    probs = predictor.predict_proba(images[:3])
    batch = np.stack([data.preprocess_for_eval(image, SIZE) for image in images[:3]])
    with torch.no_grad():
        want = torch.softmax(net(torch.from_numpy(batch).permute(0, 3, 1, 2)), dim=1).numpy()
    np.testing.assert_allclose(probs, want, atol=1e-5)
    top = predictor.top_k(images[:3], k=5)
    assert [[name for name, _ in row] for row in top] == [
        [names[i] for i in np.argsort(-row, kind="stable")[:5]] for row in probs
    ]
