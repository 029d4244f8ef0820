import json

import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import preprocessing


def test_normalize_images_by_hand():
    pixels = np.array([[0, 128, 255], [255, 0, 7]], np.uint8)
    mean, std = np.array(preprocessing.IMAGENET_MEAN), np.array(preprocessing.IMAGENET_STD)
    got = preprocessing.normalize_images(pixels)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, (pixels / 255.0 - mean) / std, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="expects uint8 images, got dtype float32"):
        preprocessing.normalize_images(pixels.astype(np.float32))


def test_eval_resize_size_defaults_to_256_over_224_and_checks_the_crop_fits():
    assert preprocessing.eval_resize_size(224) == 256
    assert preprocessing.eval_resize_size(32) == 37  # round(36.57)
    assert preprocessing.eval_resize_size(224, 232) == 232
    assert preprocessing.eval_resize_size(224, np.int64(224)) == 224
    for image_size, resize_size, match in [
        (32, 31, "resize_size 31 is smaller than image_size 32"),
        (32, 0, "resize_size must be a positive integer, got 0"),
        (32, 40.0, "resize_size must be a positive integer, got 40.0"),
        (0, None, "image_size must be a positive integer, got 0"),
        (True, None, "image_size must be a positive integer, got True"),
    ]:
        with pytest.raises(ValueError, match=match):
            preprocessing.eval_resize_size(image_size, resize_size)


def test_default_preprocessing_is_the_eval_resize_rule_and_round_trips_json():
    for size in (1, 16, 32, 224, 443, 815, 4096):  # 443, 815: floor(s / (s / r)) < r in floats
        prep = preprocessing.default_preprocessing(size)
        assert prep.resize_size == round(size * 256 / 224) == preprocessing.eval_resize_size(size)
        assert (prep.interpolation, prep.mean, prep.std) == (
            "bilinear", preprocessing.IMAGENET_MEAN, preprocessing.IMAGENET_STD)  # fmt: skip
        assert preprocessing.Preprocessing.from_json(json.loads(json.dumps(prep.to_json()))) == prep
    assert preprocessing.default_preprocessing(224).crop_pct == 0.875
    odd = preprocessing.Preprocessing(288, 1.0, "bicubic", mean=[0.5, 0.5, 0.5], std=(1, 2, 3))
    assert odd.mean == (0.5, 0.5, 0.5) and odd.std == (1.0, 2.0, 3.0)
    assert preprocessing.Preprocessing.from_json(odd.to_json()) == odd
    assert preprocessing.Preprocessing(224, 0.965, "bilinear").resize_size == 232  # timm's floor


def test_override_keeps_the_crop_fraction_unless_the_resize_is_given():
    prep = preprocessing.Preprocessing(224, 0.875, "bicubic", mean=(0.5, 0.5, 0.5))
    bigger = prep.override(eval_size=288)
    assert (bigger.crop_pct, bigger.resize_size, bigger.mean) == (0.875, 329, (0.5, 0.5, 0.5))
    tight = prep.override(resize_size=224, interpolation="nearest")
    assert (tight.eval_size, tight.resize_size, tight.interpolation) == (224, 224, "nearest")
    assert prep.override() == prep


def test_preprocessing_errors_name_the_field():
    good = preprocessing.default_preprocessing(32).to_json()
    for change, match in [
        ({"interpolation": "lanczos"}, "interpolation must be one of bilinear, bicubic, nearest"),
        ({"crop_pct": 0.0}, r"crop_pct must be a number in \(0, 1\], got 0.0"),
        ({"crop_pct": 1.2}, r"crop_pct must be a number in \(0, 1\]"),
        ({"crop_pct": "0.9"}, "crop_pct must be a number"),
        ({"eval_size": 0}, "eval_size must be a positive integer, got 0"),
        ({"mean": [0.5, 0.5]}, "mean must be three numbers"),
        ({"mean": [0.5, float("nan"), 0.5]}, "mean must be three finite numbers"),
        ({"std": [0.5, 0.0, 0.5]}, "std must be three positive numbers"),
        ({"extra": 1}, "preprocessing has unknown field.* extra"),
    ]:
        with pytest.raises(ValueError, match=match):
            preprocessing.Preprocessing.from_json({**good, **change})
    with pytest.raises(ValueError, match="preprocessing is missing field.* std"):
        preprocessing.Preprocessing.from_json({k: v for k, v in good.items() if k != "std"})
    with pytest.raises(ValueError, match="preprocessing must be a JSON object"):
        preprocessing.Preprocessing.from_json([1, 2])
    with pytest.raises(ValueError, match="resize_size 31 is smaller than image_size 32"):
        preprocessing.Preprocessing.with_resize(32, 31)
