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
