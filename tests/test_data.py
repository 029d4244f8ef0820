"""Input pipeline: sources, determinism, resumption, sharding, padding, bad files, the
file-list cache, TFDS shares and the offline failure."""

import dataclasses
import hashlib
import itertools
import json
import math
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from resnet_jax import augment, autoaugment, data, image_folders, steps, tfds_sources

tf = data.import_tensorflow()

FLOWER_CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
# Normalised values of pixel 0 and 255 per channel.
LOW = (0.0 - np.array(data.IMAGENET_MEAN)) / np.array(data.IMAGENET_STD)
HIGH = (1.0 - np.array(data.IMAGENET_MEAN)) / np.array(data.IMAGENET_STD)


def gradient(height: int, width: int, phase: int = 0) -> Image.Image:
    """A smooth RGB test image (decoders agree closely on it); `phase` varies its content."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack(
        [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y + 40 * phase) % 256],
        axis=-1,
    )
    return Image.fromarray(rgb.astype(np.uint8))


def make_folder(root: Path, counts: dict[str, int]) -> Path:
    """Writes train/<class>/<i>.jpg gradient JPEGs of varied sizes and returns `root`."""
    for c, (name, count) in enumerate(counts.items()):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(count):
            size = (40 + 4 * i, 56 - 2 * c) if i % 2 else (56, 36 + 3 * i)
            gradient(*size, phase=i + 3 * c).save(folder / f"{i:02d}.jpg", quality=95)
    return root


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
    """The first n batches of an iterator."""
    return list(itertools.islice(iterator, n))


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    """Bit-identical batch lists."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


@pytest.fixture(scope="module")
def flowers(flowers_dir):
    return data.open_source(data_dir=flowers_dir)


@pytest.fixture(scope="module")
def synthetic(synthetic_folders):
    return data.open_source(data_dir=synthetic_folders)


@pytest.fixture(scope="module")
def small(module_tmp) -> Path:
    """Three classes of 8, 7 and 6 small JPEGs, no val/ folder."""
    return make_folder(module_tmp("small"), {"cat": 8, "dog": 7, "emu": 6})


def test_flowers_source(flowers):
    assert flowers.class_names == FLOWER_CLASSES
    assert (flowers.num_train, flowers.num_eval) == (2934, 736)
    assert flowers.skipped == ()
    labels = np.asarray(flowers.train_split.labels)
    assert np.all(np.diff(labels) >= 0) and set(labels) == set(range(5))
    assert data.steps_per_epoch(flowers, 64) == 2934 // 64
    assert data.eval_steps(flowers, 64) == 12
    with pytest.raises(ValueError, match="global batch size 4000 exceeds the 2934"):
        data.steps_per_epoch(flowers, 4000)


def test_synthetic_source(synthetic):
    assert synthetic.class_names == ["blue", "green", "red", "yellow"]
    assert (synthetic.num_train, synthetic.num_eval) == (48, 16) and synthetic.skipped == ()
    assert np.bincount(synthetic.eval_split.labels).tolist() == [4, 4, 4, 4]


def test_train_batches_deterministic_and_resumable(synthetic):
    source = synthetic  # mixed formats, modes and sizes
    args = dict(batch_size=8, image_size=32, seed=3)
    first = take(data.train_batches(source, epoch=0, **args), 3)
    for batch in first:
        assert batch.keys() == {"image", "label"}
        assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
        assert np.all((batch["label"] >= 0) & (batch["label"] < 4))
        image = batch["image"]
        assert np.all(image >= LOW - 1e-5) and np.all(image <= HIGH + 1e-5)
        assert image.std() > 0.3  # coloured noise, not a constant
        # Resized crops are rounded to uint8 before normalising, as torchvision's PIL path does.
        pixels = (image * np.array(data.IMAGENET_STD) + np.array(data.IMAGENET_MEAN)) * 255
        np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)
    assert_same_batches(first, take(data.train_batches(source, epoch=0, **args), 3))
    other = take(data.train_batches(source, epoch=1, **args), 3)
    assert not np.array_equal(first[0]["image"], other[0]["image"])
    assert not all(
        np.array_equal(a["label"], b["label"]) for a, b in zip(first, other, strict=True)
    )
    resumed = take(data.train_batches(source, epoch=0, start_batch=2, **args), 1)
    assert_same_batches(resumed, first[2:3])
    one_thread = take(data.train_batches(source, epoch=0, num_workers=1, **args), 1)
    assert_same_batches(one_thread, first[:1])


def test_eval_covers_every_example_once(synthetic):
    source = synthetic
    size, batch, procs = 32, 3, 2
    per_process = [
        list(
            data.eval_batches(
                source, batch_size=batch, image_size=size, process_index=p, process_count=procs
            )
        )
        for p in range(procs)
    ]
    assert [len(b) for b in per_process] == [3, 3]  # ceil(16 / 6)
    merged = {
        k: np.concatenate([b[k] for bs in per_process for b in bs]) for k in per_process[0][0]
    }
    real = merged["mask"]
    assert merged["mask"].dtype == np.bool_ and real.sum() == 16 and (~real).sum() == 18 - 16
    np.testing.assert_array_equal(np.sort(merged["index"][real]), np.arange(16))
    assert np.all(merged["index"][~real] == -1) and np.all(merged["image"][~real] == 0)
    np.testing.assert_array_equal(
        merged["label"][real], np.asarray(source.eval_split.labels)[merged["index"][real]]
    )
    # A pipeline image equals the single-image helpers used for prediction.
    where = int(np.flatnonzero(merged["index"] == 13)[0])
    expected = data.preprocess_for_eval(data.load_image(source.eval_split.paths[13]), size)
    np.testing.assert_allclose(merged["image"][where], expected, atol=1e-6)


def test_resume_equals_tail_of_full_epoch(small):
    source = data.open_source(data_dir=small)
    args = dict(batch_size=3, image_size=16, seed=1, epoch=2)
    full = list(data.train_batches(source, **args))
    assert len(full) == data.steps_per_epoch(source, 3) == source.num_train // 3
    for start in (1, len(full) - 1, len(full)):
        assert_same_batches(
            list(data.train_batches(source, start_batch=start, **args)), full[start:]
        )


def test_unnormalized_train_batches_are_the_same_pixels_as_uint8(small):
    source = data.open_source(data_dir=small)
    args = dict(batch_size=4, image_size=32, seed=5, epoch=1)
    normalised = list(data.train_batches(source, **args))
    pixels = list(data.train_batches(source, normalize=False, **args))
    assert len(pixels) == len(normalised) > 1
    for raw, want in zip(pixels, normalised, strict=True):
        assert raw.keys() == want.keys()
        assert raw["image"].dtype == np.uint8 and raw["image"].shape == (4, 32, 32, 3)
        np.testing.assert_array_equal(raw["label"], want["label"])
        got = np.asarray(data.normalize_images(raw["image"]))
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want["image"], rtol=0, atol=1e-6)


def test_process_shards_partition_global_batches(small):
    source = data.open_source(data_dir=small)
    args = dict(image_size=16, seed=5, epoch=0)
    single = list(data.train_batches(source, batch_size=4, **args))
    shards = [
        list(data.train_batches(source, batch_size=2, process_index=p, process_count=2, **args))
        for p in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == len(single)
    seen = []
    for step, batch in enumerate(single):
        for key in batch:
            joined = np.concatenate([shards[0][step][key], shards[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key])
        seen.extend(image.tobytes() for image in batch["image"])
    assert len(set(seen)) == len(seen)  # no example twice in the epoch: shards are disjoint
    evals = [
        list(
            data.eval_batches(source, batch_size=2, image_size=16, process_index=p, process_count=3)
        )
        for p in range(3)
    ]
    assert len({len(e) for e in evals}) == 1
    indices = np.concatenate([b["index"][b["mask"]] for e in evals for b in e])
    np.testing.assert_array_equal(np.sort(indices), np.arange(source.num_eval))


def test_held_out_split_is_stratified_deterministic_and_disjoint(small):
    a = data.open_source(data_dir=small, val_fraction=0.25, seed=0)
    b = data.open_source(data_dir=small, val_fraction=0.25, seed=0)
    c = data.open_source(data_dir=small, val_fraction=0.25, seed=1)
    assert a.eval_split == b.eval_split and a.train_split == b.train_split
    assert a.eval_split != c.eval_split
    train, held = set(a.train_split.paths), set(a.eval_split.paths)
    assert not train & held
    assert train | held == {str(p) for p in (small / "train").rglob("*.jpg")}
    # round(n * 0.25) of each class: cat 8 -> 2, dog 7 -> 2, emu 6 -> 2 (1.5 rounds to even)
    assert np.bincount(a.eval_split.labels).tolist() == [2, 2, 2]
    assert (a.num_train, a.num_eval) == (15, 6)
    assert "(6 images held out: 25% of each class, rounded, seed 0)" in a.origin


def test_bad_and_unusual_files(tmp_path):
    good = tmp_path / "train" / "good"
    odd = tmp_path / "train" / "odd"
    good.mkdir(parents=True)
    odd.mkdir(parents=True)
    image = gradient(48, 64)
    for i in range(3):
        gradient(40, 50, phase=i).save(good / f"ok{i}.JPG")
    image.convert("L").save(odd / "gray.jpg", quality=95)
    image.convert("CMYK").save(odd / "cmyk.jpeg", quality=95)
    image.convert("RGBA").save(odd / "rgba.png")
    image.convert("P").save(odd / "palette.png")
    image.convert("P").save(odd / "palette.bmp")
    image.save(odd / "plain.gif")
    for name in ("plain.ppm", "plain.tif", "plain.TIFF", "plain.webp"):  # as ImageFolder reads
        image.save(odd / name)
    image.convert("L").save(odd / "gray.pgm")
    whole = (good / "ok0.JPG").read_bytes()
    (good / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (good / "empty.jpg").write_bytes(b"")
    (odd / "notes.jpg").write_text("not an image")
    (odd / "readme.txt").write_text("ignored: not an image extension")

    with pytest.warns(data.BadImageWarning) as record:
        source = data.open_source(data_dir=tmp_path, val_fraction=0.2)
    message = str(record[0].message)
    assert "skipped 3 unreadable image file(s) of 17" in message
    for name in ("truncated.jpg", "empty.jpg", "notes.jpg"):
        assert name in message
    assert "the file is empty" in message and "not a known image format" in message
    assert {Path(p).name for p, _ in source.skipped} == {"truncated.jpg", "empty.jpg", "notes.jpg"}
    assert source.num_train + source.num_eval == 14

    unusual = ["gray.jpg", "cmyk.jpeg", "rgba.png", "palette.png", "palette.bmp", "plain.gif"]
    for name in [*unusual, "plain.ppm", "gray.pgm", "plain.tif", "plain.TIFF", "plain.webp"]:
        decoded = data.load_image(odd / name)
        with Image.open(odd / name) as pil:
            reference = np.asarray(pil.convert("RGB"), dtype=np.int32)
        assert decoded.dtype == np.uint8 and decoded.shape == (48, 64, 3)
        assert np.abs(decoded.astype(np.int32) - reference).max() <= 6, name
    # Every kept file goes through both pipelines (fused JPEG crops, PIL for the rest).
    train = list(data.train_batches(source, batch_size=1, image_size=16, seed=0, epoch=0))
    assert len(train) == source.num_train
    assert all(np.isfinite(b["image"]).all() and b["image"].shape == (1, 16, 16, 3) for b in train)
    evals = list(data.eval_batches(source, batch_size=4, image_size=16))
    assert sum(int(b["mask"].sum()) for b in evals) == source.num_eval


def test_class_with_only_bad_files_is_an_error(tmp_path):
    make_folder(tmp_path, {"fine": 2})
    broken = tmp_path / "train" / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG garbage")
    with pytest.warns(data.BadImageWarning), pytest.raises(ValueError, match="broken has no read"):
        data.open_source(data_dir=tmp_path)


def test_open_class_folders_and_list_images(small, tmp_path):
    """A folder of class folders is a source with only an eval split, listed and vetted like
    training folders; `list_images` walks a folder, its own files before its subfolders'."""
    root = small / "train"
    source = data.open_class_folders(root)
    assert source.class_names == ["cat", "dog", "emu"] and source.num_train == 0
    assert source.num_eval == 21 and source.eval_split.labels == (0,) * 8 + (1,) * 7 + (2,) * 6
    assert source.eval_split.paths[:2] == (
        str(root / "cat" / "00.jpg"),
        str(root / "cat" / "01.jpg"),
    )
    assert source.origin == f"image folders {root}" and source.skipped == ()
    assert data.list_images(root / "cat") == [str(root / "cat" / f"{i:02d}.jpg") for i in range(8)]

    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/deep/x.PNG", "a/z.jpg", "a/notes.txt", "a/b.webp"):
        (tmp_path / name).write_bytes(b"")
    assert data.list_images(tmp_path) == [str(tmp_path / n) for n in ("a/b.webp", "a/z.jpg",
                                                                      "a/deep/x.PNG")]  # fmt: skip
    (tmp_path / "a" / "deep" / "x.PNG").write_bytes(b"\x89PNG garbage")
    gradient(20, 20).save(tmp_path / "a" / "deep" / "y.png")
    with pytest.warns(data.BadImageWarning, match="x.PNG"):
        vetted = data.open_class_folders(tmp_path / "a")
    assert vetted.class_names == ["deep"] and vetted.num_eval == 1
    assert [Path(p).name for p, _ in vetted.skipped] == ["x.PNG"]
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        data.open_class_folders(tmp_path / "missing")


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        data.open_source(data_dir=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="has no train/ folder"):
        data.open_source(data_dir=tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match=f"no class folders in {tmp_path / 'train'}"):
        data.open_source(data_dir=tmp_path)
    make_folder(tmp_path / "x", {"a": 2})
    (tmp_path / "x" / "train" / "hollow").mkdir()
    (tmp_path / "x" / "train" / "hollow" / "list.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"class folder {tmp_path / 'x/train/hollow'} has no im"):
        data.open_source(data_dir=tmp_path / "x")
    make_folder(tmp_path / "y", {"a": 2})
    (tmp_path / "y" / "val" / "zebra").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"class folders not in .*\['zebra'\]"):
        data.open_source(data_dir=tmp_path / "y")
    with pytest.raises(ValueError, match="val_fraction must be in"):
        data.open_source(data_dir=tmp_path / "x", val_fraction=1.0)


def test_load_image_errors_name_the_file(tmp_path):
    text = tmp_path / "fake.png"
    text.write_text("hello")
    with pytest.raises(ValueError, match=f"cannot decode image {text}"):
        data.load_image(text)
    with pytest.raises(FileNotFoundError, match="nowhere.jpg"):
        data.load_image(tmp_path / "nowhere.jpg")


def test_preprocess_for_eval_matches_pil_resize_and_center_crop():
    # 60 x 90 -> shorter side round(32 * 256 / 224) = 37, longer int(90 * 37 / 60) = 55,
    # crop rows round(2.5) = 2 (half to even) and columns round(11.5) = 12.
    image = np.asarray(gradient(60, 90, phase=1))
    out = data.preprocess_for_eval(image, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    resized = np.asarray(Image.fromarray(image).resize((55, 37), Image.BILINEAR), np.float32)
    expected = (resized[2:34, 12:44] / 255.0 - data.IMAGENET_MEAN) / data.IMAGENET_STD
    assert np.abs(out - expected).max() < 2.5 / 255 / min(data.IMAGENET_STD)
    with pytest.raises(ValueError, match="expected a uint8"):
        data.preprocess_for_eval(image.astype(np.float32), 32)


def _old_default_eval_transform(image: np.ndarray, size: int) -> np.ndarray:
    """The eval transform as it was before preprocessing was stored with the weights, written
    out: bilinear antialiased resize of the shorter side to round(size * 256 / 224), center crop,
    ImageNet mean/std (run eagerly, so float32 rounding may differ from the traced pipeline's)."""
    tf = data.import_tensorflow()
    height, width = image.shape[:2]
    resize = round(size * 256 / 224)
    new_h, new_w = (resize, width * resize // height) if height <= width else (
        height * resize // width, resize)  # fmt: skip
    resized = tf.image.resize(image, [new_h, new_w], method="bilinear", antialias=True)
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    crop = tf.cast(resized[top : top + size, left : left + size], tf.float32) / 255.0
    return ((crop - tf.constant(data.IMAGENET_MEAN)) / tf.constant(data.IMAGENET_STD)).numpy()


def test_default_preprocessing_is_the_old_eval_transform(small):
    image = np.asarray(gradient(61, 93, phase=2))
    for size in (16, 32, 37):
        want = _old_default_eval_transform(image, size)
        np.testing.assert_allclose(data.preprocess_for_eval(image, size), want, atol=1e-6)
    source = data.open_source(data_dir=small)
    by_size = list(data.eval_batches(source, batch_size=4, image_size=16))
    default = data.default_preprocessing(16)
    by_prep = list(data.eval_batches(source, batch_size=4, preprocessing=default))
    for a, b in zip(by_size, by_prep, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    for image, index in zip(by_size[0]["image"], by_size[0]["index"], strict=True):
        decoded = data.load_image(source.eval_split.paths[int(index)])
        np.testing.assert_allclose(image, _old_default_eval_transform(decoded, 16), atol=1e-6)


@pytest.mark.parametrize(
    ("interpolation", "pil_filter", "levels"),
    [("bicubic", Image.BICUBIC, 3.0), ("nearest", Image.NEAREST, 0.5)],
)
def test_preprocessing_sets_resize_crop_interpolation_and_statistics(
    small, interpolation, pil_filter, levels
):
    # crop_pct 1.0: 60 x 90 -> shorter side 32 = the crop, longer int(90 * 32 / 60) = 48, crop
    # rows 0 and columns 8; the other mean/std normalise. PIL resamples (uint8) as reference.
    mean, std = (0.5, 0.25, 0.75), (0.5, 0.25, 0.125)
    prep = data.Preprocessing(32, 1.0, interpolation, mean=mean, std=std)
    assert prep.resize_size == 32
    image = np.asarray(gradient(60, 90, phase=1))
    out = data.preprocess_for_eval(image, preprocessing=prep)
    resized = np.asarray(Image.fromarray(image).resize((48, 32), pil_filter), np.float32)
    expected = (resized[:, 8:40] / 255.0 - np.array(mean)) / np.array(std)
    assert np.abs(out - expected).max() <= levels / 255 / min(std)
    assert np.abs(out - data.preprocess_for_eval(image, 32)).max() > 0.1
    # The pipeline applies the same transform as the single-image helper.
    source = data.open_source(data_dir=small)
    small_prep = data.Preprocessing(16, 0.8, interpolation, mean=mean, std=std)
    batch = next(data.eval_batches(source, batch_size=2, preprocessing=small_prep))
    path = source.eval_split.paths[int(batch["index"][0])]
    want = data.preprocess_for_eval(data.load_image(path), preprocessing=small_prep)
    np.testing.assert_allclose(batch["image"][0], want, atol=1e-6)


def test_eval_preprocessing_arguments_are_checked(small):
    image = np.asarray(gradient(60, 90, phase=1))
    source = data.open_source(data_dir=small)
    prep = data.default_preprocessing(32)
    for kwargs, match in [
        ({}, "give image_size or preprocessing"),
        ({"image_size": 16, "preprocessing": prep}, "image_size 16 differs from preprocessing"),
        ({"image_size": 0}, "image_size must be a positive integer, got 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            data.preprocess_for_eval(image, **kwargs)
        with pytest.raises(ValueError, match=match):
            data.eval_batches(source, batch_size=2, **kwargs)


def test_argument_errors(small):
    source = data.open_source(data_dir=small)
    steps = data.steps_per_epoch(source, 4)
    cases = [
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(process_index=2, process_count=2), r"process_index must be in \[0, 2\)"),
        (dict(start_batch=steps + 1), f"start_batch must be in \\[0, {steps}\\]"),
        (dict(seed=-1), "seed must be a non-negative"),
    ]
    for override, match in cases:
        args = dict(batch_size=4, image_size=16, seed=0, epoch=0) | override
        with pytest.raises(ValueError, match=match):
            data.train_batches(source, **args)


def test_tfds_mock_tf_flowers(tmp_path, monkeypatch):
    # mock_data replaces the download, not the download host check
    monkeypatch.setattr(tfds_sources, "check_download_hosts", lambda *args: None)
    with tfds.testing.mock_data(num_examples=20):  # random PNGs; every split yields 20
        source = data.open_source(dataset="tf_flowers", tfds_data_dir=str(tmp_path))
        assert sorted(source.class_names) == FLOWER_CLASSES
        assert (source.num_train, source.num_eval) == (20, 20)
        assert (source.train_split.split, source.eval_split.split) == ("train[:80%]", "train[80%:]")
        args = dict(batch_size=4, image_size=16, seed=0, epoch=0)
        full = list(data.train_batches(source, **args))
        assert len(full) == 5
        for batch in full:
            assert batch["image"].shape == (4, 16, 16, 3) and batch["label"].dtype == np.int32
            assert np.all(batch["image"] >= LOW - 1e-5) and np.all(batch["image"] <= HIGH + 1e-5)
        assert_same_batches(list(data.train_batches(source, **args)), full)


def test_tfds_prepared_dataset_matches_folder_pipeline(small, tmp_path):
    """A real (tiny) TFDS dataset built offline from the `small` JPEGs: records, shuffled files,
    resumption and per-process shares work, and its eval images equal the image-folder
    pipeline's."""
    folder = data.open_source(data_dir=small, val_fraction=0.25)

    class ResnetJaxTinyPets(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=folder.class_names),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples(folder.train_split),
                "test": self._generate_examples(folder.eval_split),
            }

        def _generate_examples(self, split):
            for i, (path, label) in enumerate(zip(split.paths, split.labels, strict=True)):
                yield i, {"image": path, "label": label}

    source = data.open_source(dataset="resnet_jax_tiny_pets", tfds_data_dir=str(tmp_path))
    assert (source.num_train, source.num_eval) == (15, 6)
    assert source.class_names == folder.class_names and source.eval_split.split == "test"
    args = dict(batch_size=2, image_size=16, seed=4, epoch=1)
    full = list(data.train_batches(source, **args))
    assert len(full) == 7
    assert_same_batches(list(data.train_batches(source, **args)), full)
    assert_same_batches(list(data.train_batches(source, start_batch=5, **args)), full[5:])
    other = list(data.train_batches(source, **dict(args, epoch=2)))
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(full, other, strict=True))
    # Two processes: each reads its own contiguous share; training shares are equal (7 of 15
    # each, one dropped) and disjoint, eval shares (3 + 3) cover the split once.
    opened = [
        data.open_source(
            dataset="resnet_jax_tiny_pets",
            tfds_data_dir=str(tmp_path),
            process_index=p,
            process_count=2,
        )
        for p in range(2)
    ]
    train_records = [[r[0] for r in o.train_split.records().as_numpy_iterator()] for o in opened]
    assert [len(r) for r in train_records] == [7, 7]
    assert not set(train_records[0]) & set(train_records[1])
    assert [o.eval_split.share_offset for o in opened] == [0, 3]
    shards = [
        list(data.train_batches(o, process_index=p, process_count=2, **dict(args, batch_size=1)))
        for p, o in enumerate(opened)
    ]
    assert [len(b) for b in shards] == [len(full), len(full)]  # 15 // 2 global batches of 2
    seen = [im.tobytes() for b in shards for batch in b for im in batch["image"]]
    assert len(set(seen)) == len(seen)
    with pytest.raises(ValueError, match="opened for process 0 of 2, not 1 of 2"):
        data.train_batches(opened[0], process_index=1, process_count=2, **args)
    evals = [
        list(data.eval_batches(o, batch_size=2, image_size=16, process_index=p, process_count=2))
        for p, o in enumerate(opened)
    ]
    assert [len(e) for e in evals] == [2, 2]  # ceil(6 / 4) each, so collectives stay in step
    indices = np.concatenate([b["index"][b["mask"]] for e in evals for b in e])
    np.testing.assert_array_equal(np.sort(indices), np.arange(6))
    whole = list(data.eval_batches(source, batch_size=6, image_size=16))[0]
    for e in evals:
        for b in e:
            for image, index in zip(b["image"][b["mask"]], b["index"][b["mask"]], strict=True):
                np.testing.assert_array_equal(image, whole["image"][index])
    # TFDS shuffles records when preparing, so compare eval images as sets: bit-identical.
    images = {}
    for name, src in (("tfds", source), ("folder", folder)):
        batches = list(data.eval_batches(src, batch_size=4, image_size=16))
        assert len(batches) == 2 and sum(int(b["mask"].sum()) for b in batches) == 6
        images[name] = sorted(im.tobytes() for b in batches for im in b["image"][b["mask"]])
    assert images["tfds"] == images["folder"]


def test_tfds_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="'tf_flowerz' not found; did you mean .*tf_flowers"):
        data.open_source(dataset="tf_flowerz")

    def offline(self, *args, **kwargs):
        raise ConnectionError("no route to download.tensorflow.org")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    with monkeypatch.context() as patch:
        patch.setattr(tfds_sources, "check_download_hosts", lambda *args: None)
        with pytest.raises(RuntimeError, match="could not prepare TFDS dataset 'tf_flowers'.*netw"):
            data.open_source(dataset="tf_flowers", tfds_data_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="by hand.*tfds_manual_dir.*ILSVRC2012_img_train.tar"):
        data.open_source(dataset="imagenet2012", tfds_data_dir=str(tmp_path))


def closed_port() -> int:
    """A local TCP port nothing listens on (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tfds_download_without_network_fails_fast(monkeypatch, tmp_path):
    """No network: opening a TFDS dataset that needs downloading fails within seconds, naming
    the dataset and pointing to image folders, before TFDS starts its download retries."""
    unreachable = {f"http://127.0.0.1:{closed_port()}/flower_photos.tgz": None}
    monkeypatch.setattr(tfds.core.DatasetBuilder, "url_infos", property(lambda self: unreachable))

    def download(self, *args, **kwargs):
        raise AssertionError("download_and_prepare must not run without network")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download)
    start = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        data.open_source(dataset="tf_flowers", tfds_data_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert message.startswith("could not prepare TFDS dataset 'tf_flowers': no network")
    assert "--data-dir" in message and "127.0.0.1" in message

    with pytest.raises(
        RuntimeError, match="'x': no network connection to its download host nothing.invalid:443"
    ):
        data.check_download_hosts("x", ["https://nothing.invalid/a.tar"], timeout=2)
    with socket.socket() as server:  # a host that answers passes
        server.bind(("127.0.0.1", 0))
        server.listen()
        data.check_download_hosts("x", [f"http://127.0.0.1:{server.getsockname()[1]}/a"])


def copy_folders(source: Path, target: Path) -> Path:
    """A copy of a (session) folder tree that a test may change."""
    shutil.copytree(source, target)
    return target


def test_file_list_cache_is_written_then_reused(synthetic_folders, tmp_path, monkeypatch):
    root = copy_folders(synthetic_folders, tmp_path / "data")
    truncated = (root / "train" / "red" / "00_rgb.jpg").read_bytes()[:200]
    (root / "train" / "red" / "99_bad.jpg").write_bytes(truncated)
    cache = tmp_path / "run" / "files.json"
    with pytest.warns(data.BadImageWarning, match="99_bad.jpg"):
        fresh = data.open_source(data_dir=root, file_list_cache=cache)
    written = json.loads(cache.read_text())
    assert written["format"] == image_folders.CACHE_FORMAT and len(written["fingerprint"]) == 64
    assert written["splits"]["train"]["red"][0] == "train/red/00_rgb.jpg"
    assert written["skipped"] == [["train/red/99_bad.jpg", fresh.skipped[0][1]]]

    def no_decoding(paths):
        raise AssertionError(f"decoded {len(paths)} files despite the cache")

    monkeypatch.setattr(image_folders, "_decodes", no_decoding)
    with pytest.warns(data.BadImageWarning, match="99_bad.jpg"):
        cached = data.open_source(data_dir=root, file_list_cache=cache)
    assert cached == fresh  # same lists in the same order: resumed runs read the same batches
    args = dict(batch_size=4, image_size=16, seed=2, epoch=1)
    assert_same_batches(
        take(data.train_batches(cached, **args), 2), take(data.train_batches(fresh, **args), 2)
    )


def test_file_list_cache_is_rebuilt_when_the_folders_change(synthetic_folders, tmp_path):
    root = copy_folders(synthetic_folders, tmp_path / "data")
    cache = tmp_path / "files.json"
    before = data.open_source(data_dir=root, file_list_cache=cache)
    shutil.copy(root / "train" / "blue" / "00_rgb.jpg", root / "train" / "blue" / "50_new.jpg")
    after = data.open_source(data_dir=root, file_list_cache=cache)
    assert after.num_train == before.num_train + 1
    assert str(root / "train" / "blue" / "50_new.jpg") in after.train_split.paths
    assert "train/blue/50_new.jpg" in json.loads(cache.read_text())["splits"]["train"]["blue"]
    cache.write_text("{not json")  # an unreadable cache is rebuilt too
    assert data.open_source(data_dir=root, file_list_cache=cache) == after
    assert json.loads(cache.read_text())["splits"]["train"]["blue"][-1] == "train/blue/50_new.jpg"


def test_processes_vet_their_share_of_the_files(synthetic_folders, tmp_path, monkeypatch):
    """Two processes (threads here, joined by a stand-in allgather) each decode every second
    file, share the results and get the source one process gets; only process 0 writes the
    cache."""
    single = data.open_source(data_dir=synthetic_folders)
    decoded: dict[int, list[str]] = {0: [], 1: []}
    real_decodes = image_folders._decodes
    barrier, slots = threading.Barrier(2), {}

    def recording(paths):
        decoded[int(threading.current_thread().name)].extend(paths)
        return real_decodes(paths)

    def allgather(x):
        slots[int(threading.current_thread().name)] = np.asarray(x)
        barrier.wait(timeout=60)
        gathered = np.stack([slots[0], slots[1]])
        barrier.wait(timeout=60)
        return gathered

    monkeypatch.setattr(image_folders, "_decodes", recording)
    caches = [tmp_path / f"p{p}" / "files.json" for p in range(2)]
    results = {}

    def open_as(p: int) -> None:
        results[p] = data.open_source(
            data_dir=synthetic_folders,
            file_list_cache=caches[p],
            process_index=p,
            process_count=2,
            allgather=allgather,
        )

    threads = [threading.Thread(target=open_as, args=(p,), name=str(p)) for p in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results[0] == results[1] == single
    everything = [*single.train_split.paths, *single.eval_split.paths]
    assert sorted(decoded[0] + decoded[1]) == sorted(everything)
    assert not set(decoded[0]) & set(decoded[1]) and abs(len(decoded[0]) - len(decoded[1])) <= 1
    assert caches[0].is_file() and not caches[1].exists()


# --------------------------------------------------------------------------------------------
# Training augmentation: TrainAugment, random-erasing boxes, repeated augmentation


def test_default_augment_is_the_old_pipeline(small):
    """The default transform yields the batches the pipeline gave before TrainAugment existed."""
    small = data.open_source(data_dir=small)
    digest = hashlib.sha256()
    for batch in data.train_batches(
        small, batch_size=4, image_size=24, seed=5, epoch=1, normalize=False
    ):
        digest.update(batch["image"].tobytes())
        digest.update(batch["label"].tobytes())
    assert digest.hexdigest() == "6bb84623d616c4d3bacf4a0f5fcb5cb06f1322488ee37e20ae58fa634c9f4b90"
    explicit = augment.TrainAugment(crop_size=24)
    assert_same_batches(
        take(data.train_batches(small, batch_size=4, augment=explicit, seed=5, epoch=1), 2),
        take(data.train_batches(small, batch_size=4, image_size=24, seed=5, epoch=1), 2),
    )


def test_crop_min_scale_bounds_the_crop_area(tmp_path):
    """The random-resized crop covers [crop_min_scale, 1] of the image (torchvision's scale);
    at 1 it is the whole (square) image."""
    shape = tf.constant([300, 400, 3])

    def areas(min_scale: float) -> np.ndarray:
        seeds = [tf.constant([7, i], tf.int64) for i in range(300)]
        sizes = [augment._sample_crop(shape, seed, min_scale)[1] for seed in seeds]
        return np.array([int(s[0]) * int(s[1]) for s in sizes]) / (300 * 400)

    default, large = areas(augment.CROP_MIN_SCALE), areas(0.5)
    assert default.min() >= 0.08 - 0.01 and default.min() < 0.2
    assert large.min() >= 0.5 - 0.01 and large.max() <= 1.0 and np.median(large) > 0.55
    image = gradient(40, 40)
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        image.save(tmp_path / split / "a" / "0.png")
    source = data.open_source(data_dir=tmp_path)
    whole = augment.TrainAugment(20, crop_min_scale=1.0, hflip=0.0)
    (batch,) = take(
        data.train_batches(source, batch_size=1, augment=whole, seed=0, epoch=0, normalize=False), 1
    )
    resized = tf.image.resize(np.asarray(image), [20, 20], antialias=True)
    np.testing.assert_array_equal(batch["image"][0], np.round(resized.numpy()).astype(np.uint8))


def example_key(base: np.ndarray, index) -> tf.Tensor:
    """An example's augmentation key as `data.train_batches` derives it (the index as int64)."""
    return tf.random.experimental.stateless_fold_in(base, tf.constant(index, tf.int64), "philox")


@pytest.fixture(scope="module")
def numbered(module_tmp) -> data.DataSource:
    """300 training examples (over RASampler's 256) from 6 small JPEGs, label = example index."""
    root = module_tmp("numbered")
    files = []
    for i in range(6):
        gradient(20 + 2 * i, 24 - i, phase=i).save(root / f"{i}.jpg", quality=95)
        files.append(str(root / f"{i}.jpg"))
    split = data.FileSplit(tuple(files[i % 6] for i in range(300)), tuple(range(300)))
    return data.DataSource(["x"], 300, 0, split, data.FileSplit((), ()), origin="numbered")


def test_auto_augment_is_trivial_augment_wide_with_the_derived_key(numbered):
    args = dict(batch_size=6, seed=2, epoch=3, normalize=False)
    plain = take(data.train_batches(numbered, augment=augment.TrainAugment(16), **args), 2)
    wide = augment.TrainAugment(16, auto_augment="ta_wide")
    augmented = take(data.train_batches(numbered, augment=wide, **args), 2)
    base = data._derived_seed(2, 3, data._AUGMENT)
    changed = 0
    for before, after in zip(plain, augmented, strict=True):
        np.testing.assert_array_equal(before["label"], after["label"])
        for image, result, index in zip(
            before["image"], after["image"], before["label"], strict=True
        ):
            key = example_key(base, index)
            expected = autoaugment.trivial_augment_wide(
                image, augment.auto_augment_key(key), interpolation="bilinear"
            )
            np.testing.assert_array_equal(result, expected.numpy())
            changed += not np.array_equal(image, result)
    assert changed >= 6
    ra = augment.TrainAugment(16, auto_augment="ra", ra_magnitude=15)
    rand = take(data.train_batches(numbered, augment=ra, **args), 1)
    assert not np.array_equal(rand[0]["image"], plain[0]["image"])


def test_erase_boxes_follow_random_erasing(numbered):
    size = 32
    args = dict(batch_size=50, seed=1, epoch=0, normalize=False)
    always = augment.TrainAugment(size, random_erase=1.0)
    batches = take(data.train_batches(numbered, augment=always, **args), 4)
    boxes = np.concatenate([b["erase_box"] for b in batches])
    assert boxes.dtype == np.int32 and boxes.shape == (200, 4)
    top, left, height, width = boxes.T
    assert np.all((top >= 0) & (left >= 0) & (top + height <= size) & (left + width <= size))
    erased = height > 0
    assert erased.mean() > 0.9  # only boxes no attempt fitted are left out
    area = height[erased] * width[erased] / size**2
    assert area.min() > 0.015 and area.max() < 0.36 and np.median(area) > 0.1
    ratio = height[erased] / width[erased]
    assert ratio.min() > 0.25 and ratio.max() < 4.0
    assert ratio.min() < 0.6 and ratio.max() > 1.8
    base = data._derived_seed(1, 0, data._AUGMENT)
    for box, index in zip(
        boxes[:20], np.concatenate([b["label"] for b in batches])[:20], strict=True
    ):
        key = example_key(base, index)
        np.testing.assert_array_equal(box, augment.erase_box(key, size, 1.0).numpy())
        assert not np.any(augment.erase_box(key, size, 0.0).numpy())
    # The pixels are those of the plain pipeline: erasing happens in the train step.
    plain = take(data.train_batches(numbered, augment=augment.TrainAugment(size), **args), 1)
    np.testing.assert_array_equal(plain[0]["image"], batches[0]["image"])
    half = augment.TrainAugment(size, random_erase=0.3)
    rate = np.mean(
        [
            b["erase_box"][:, 2] > 0
            for b in take(data.train_batches(numbered, augment=half, **args), 4)
        ]
    )
    assert 0.15 < rate < 0.45


def test_model_input_erases_the_box_after_normalising():
    images = np.random.default_rng(0).integers(0, 256, (3, 10, 12, 3), dtype=np.uint8)
    boxes = np.array([[2, 3, 4, 5], [0, 0, 0, 0], [9, 11, 1, 1]], np.int32)
    out = np.asarray(steps._model_input(images, (data.IMAGENET_MEAN, data.IMAGENET_STD), boxes))
    normalised = np.asarray(data.normalize_images(images))
    inside = np.zeros(images.shape[:3], bool)
    inside[0, 2:6, 3:8] = True
    inside[2, 9, 11] = True
    assert np.all(out[inside] == 0)
    np.testing.assert_array_equal(out[~inside], normalised[~inside])
    floats = np.asarray(
        steps._model_input(normalised, (data.IMAGENET_MEAN, data.IMAGENET_STD), boxes)
    )
    np.testing.assert_array_equal(floats, out)


def rasampler(order: np.ndarray, reps: int, replicas: int, rank: int) -> list[int]:
    """torchvision's RASampler.__iter__ (references/classification/sampler.py) given the
    epoch's permutation `order`."""
    n = len(order)
    num_samples = math.ceil(n * reps / replicas)
    total = num_samples * replicas
    selected = math.floor(n // 256 * 256 / replicas)
    indices = [int(i) for i in order for _ in range(reps)]
    indices += indices[: total - len(indices)]
    return indices[rank:total:replicas][:selected]


@pytest.mark.parametrize("process_count", [2, 3, 4])
def test_repeated_augmentation_is_rasampler(numbered, process_count):
    batch, reps = 8, 3
    steps_ = data.steps_per_epoch(numbered, batch * process_count, ra_reps=reps)
    assert steps_ == 256 // (batch * process_count)
    order = data._file_order(300, 4, 1)
    per_process = []
    for p in range(process_count):
        batches = list(
            data.train_batches(
                numbered,
                batch_size=batch,
                image_size=8,
                seed=4,
                epoch=1,
                ra_reps=reps,
                process_index=p,
                process_count=process_count,
                normalize=False,
            )
        )
        assert len(batches) == steps_
        labels = np.concatenate([b["label"] for b in batches]).tolist()
        assert labels == rasampler(order, reps, process_count, p)[: steps_ * batch]
        per_process.append(batches)
    # Repeats of one image go to different processes and are augmented differently.
    first = {p: per_process[p][0] for p in range(process_count)}
    image = order[0]
    holders = [p for p in range(process_count) if image in first[p]["label"]]
    assert len(holders) == min(reps, process_count)
    crops = [first[p]["image"][list(first[p]["label"]).index(image)] for p in holders]
    assert not np.array_equal(crops[0], crops[1])
    counts = np.bincount(
        np.concatenate([b["label"] for bs in per_process for b in bs]), minlength=300
    )
    assert set(counts[order[: steps_ * batch * process_count // reps]].tolist()) == {reps}


def test_repeated_augmentation_spreads_over_devices(numbered):
    """Replicas are processes x devices: each device's slice of a batch is RASampler's rank."""
    order = data._file_order(300, 0, 0)
    batch = next(
        data.train_batches(
            numbered,
            batch_size=8,
            image_size=8,
            seed=0,
            epoch=0,
            ra_reps=2,
            devices_per_process=4,
            process_index=1,
            process_count=2,
            normalize=False,
        )
    )
    for device in range(4):
        rank = 4 + device
        assert (
            batch["label"][2 * device : 2 * device + 2].tolist() == rasampler(order, 2, 8, rank)[:2]
        )


def test_every_option_is_deterministic_and_resumable(numbered):
    full = augment.TrainAugment(
        20, interpolation="nearest", hflip=0.3, auto_augment="ta_wide", random_erase=0.5
    )
    args = dict(
        batch_size=4, augment=full, seed=7, epoch=2, ra_reps=2, process_index=1, process_count=2
    )
    epoch = list(data.train_batches(numbered, **args))
    assert len(epoch) == 256 // 8 and epoch[0].keys() == {"image", "label", "erase_box"}
    assert_same_batches(take(data.train_batches(numbered, **args), 3), epoch[:3])
    assert_same_batches(list(data.train_batches(numbered, start_batch=29, **args)), epoch[29:])
    ra = dataclasses.replace(full, auto_augment="ra")
    a = take(data.train_batches(numbered, **{**args, "augment": ra}), 2)
    assert_same_batches(
        a, list(data.train_batches(numbered, start_batch=0, **{**args, "augment": ra}))[:2]
    )


def test_augment_arguments_are_checked(numbered, small):
    small = data.open_source(data_dir=small)
    for kwargs, message in [
        (dict(auto_augment="aa"), "auto_augment must be one of none, ta_wide, ra"),
        (dict(interpolation="lanczos"), "interpolation must be one of"),
        (dict(random_erase=1.5), "random_erase must be a probability"),
        (dict(hflip=-0.1), "hflip must be a probability"),
        (dict(ra_magnitude=31), "ra_magnitude must be in"),
        (dict(crop_min_scale=0.0), "crop_min_scale must be in"),
        (dict(auto_augment="ta_wide", interpolation="bicubic"), "sample bilinear or nearest"),
    ]:
        with pytest.raises(ValueError, match=message):
            augment.TrainAugment(16, **kwargs)
    args = dict(batch_size=4, seed=0, epoch=0)
    with pytest.raises(ValueError, match="image_size 24 disagrees with augment.crop_size 16"):
        data.train_batches(small, augment=augment.TrainAugment(16), image_size=24, **args)
    with pytest.raises(ValueError, match="needs augment or image_size"):
        data.train_batches(small, **args)
    with pytest.raises(ValueError, match="repeated augmentation uses n // 256"):
        data.train_batches(small, image_size=8, ra_reps=2, **args)
    with pytest.raises(ValueError, match="devices_per_process 3 must divide batch_size 4"):
        data.train_batches(numbered, image_size=8, ra_reps=2, devices_per_process=3, **args)
