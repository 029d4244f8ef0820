"""TrivialAugmentWide / RandAugment / RandomErasing in TensorFlow against torchvision's."""

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode, RandAugment, TrivialAugmentWide
from torchvision.transforms import autoaugment as tv_autoaugment
from torchvision.transforms import functional as tv_functional

from resnet_jax import autoaugment, random_erasing

tf = autoaugment.tf

BILINEAR = "bilinear"
AFFINE_OPS = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
# Per op: magnitudes from both augmentation spaces' ranges, signed ones with both signs.
MAGNITUDES = {
    "Identity": [0.0],
    "ShearX": [0.3, -0.99, 0.033],
    "ShearY": [0.3, -0.5],
    "TranslateX": [5.7, -12.0, 32.0],
    "TranslateY": [3.2, -7.9],
    "Rotate": [30.0, -135.0, 4.5, 90.0],
    "Brightness": [0.33, -0.99, 0.9],
    "Color": [0.5, -0.66],
    "Contrast": [0.462, -0.3, 0.99],
    "Sharpness": [0.99, -0.9],
    "Posterize": [2.0, 5.0, 8.0, 0.0],
    "Solarize": [255.0, 127.5, 8.5, 0.0],
    "AutoContrast": [0.0],
    "Equalize": [0.0],
}


def _images() -> list[np.ndarray]:
    """A gradient with noise (32x40) and uniform noise (37x29), uint8 RGB."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:32, 0:40]
    gradient = np.stack([xs * 6, ys * 7, (xs + ys) * 3], -1) + rng.integers(-20, 21, (32, 40, 3))
    noise = rng.integers(0, 256, (37, 29, 3))
    return [np.clip(gradient, 0, 255).astype(np.uint8), noise.astype(np.uint8)]


def _torchvision_op(
    image: np.ndarray, op: str, magnitude: float, fill, interpolation: str = "nearest"
) -> np.ndarray:
    chw = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    out = tv_autoaugment._apply_op(chw, op, magnitude, InterpolationMode(interpolation), fill)
    return out.permute(1, 2, 0).numpy()


def _assert_matches(ours: np.ndarray, theirs: np.ndarray, op: str, interpolation: str) -> None:
    assert ours.shape == theirs.shape and ours.dtype == np.uint8
    if op not in AFFINE_OPS:
        np.testing.assert_array_equal(ours, theirs)
    elif interpolation == "nearest":  # the grid sums in float32: a tie may round the other way
        assert (ours == theirs).all(-1).mean() >= 0.99
    else:  # bilinear: the weights' float32 products round a .5 either way at a few pixels
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
        assert (ours == theirs).all(-1).mean() >= 0.95


@pytest.mark.parametrize("op", autoaugment.OPS)
@pytest.mark.parametrize("fill", [None, [128.0, 64.5, 32.0]])
@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_apply_op_matches_torchvision(op, fill, interpolation):
    for image in _images():
        for magnitude in MAGNITUDES[op]:
            ours = autoaugment.apply_op(tf.constant(image), op, magnitude, fill, interpolation)
            theirs = _torchvision_op(image, op, magnitude, fill, interpolation)
            _assert_matches(ours.numpy(), theirs, op, interpolation)


def test_bilinear_blends_neighbours_and_fill():
    """Stripes sheared along them stay stripes inside the image; across them bilinear sampling
    averages neighbours (nearest only copies them); a corner uncovered by a rotation takes the
    fill."""
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, ::2] = 200  # columns 0, 2, 4, 6 bright

    def shear(op: str, interpolation: str) -> np.ndarray:  # shifts of up to 0.2 * 7 pixels
        return autoaugment.apply_op(tf.constant(image), op, 0.2, None, interpolation).numpy()

    assert set(np.unique(shear("ShearY", "bilinear")[2:6])) == {0, 200}
    assert set(np.unique(shear("ShearX", "nearest"))) == {0, 200}
    blended = np.unique(shear("ShearX", "bilinear")[2:6, 2:6])
    assert ((blended > 0) & (blended < 200)).any()
    white = tf.constant(np.full((8, 8, 3), 255, np.uint8))
    rotated = autoaugment.apply_op(white, "Rotate", 45.0, [10.0, 20.0, 30.0], "bilinear").numpy()
    np.testing.assert_array_equal(rotated[0, 0], [10, 20, 30])
    np.testing.assert_array_equal(rotated[4, 4], [255, 255, 255])


def test_affine_fill_and_exactness():
    """Rotate by 45 degrees uncovers corners: they take the fill, per channel (0 without one);
    whole-pixel translations are exact."""
    image = _images()[0]
    rotated = autoaugment.apply_op(tf.constant(image), "Rotate", 45.0, [1.0, 2.0, 3.0]).numpy()
    np.testing.assert_array_equal(rotated[0, 0], [1, 2, 3])
    black = autoaugment.apply_op(tf.constant(image), "Rotate", 45.0).numpy()
    np.testing.assert_array_equal(black[0, 0], [0, 0, 0])
    shifted = autoaugment.apply_op(tf.constant(image), "TranslateX", -3.9).numpy()
    np.testing.assert_array_equal(shifted[:, :-3], image[:, 3:])  # int(-3.9) = -3: left by 3
    np.testing.assert_array_equal(shifted[:, -3:], 0)


def _torch_space(transform, num_bins: int, image: np.ndarray) -> dict:
    if isinstance(transform, TrivialAugmentWide):
        return transform._augmentation_space(num_bins)
    return transform._augmentation_space(num_bins, image.shape[:2])


@pytest.mark.parametrize("num_bins", [31, 10])
def test_magnitude_tables_match_torchvision(num_bins):
    image = _images()[1]
    pairs = [
        (TrivialAugmentWide(), autoaugment.TRIVIAL_AUGMENT_WIDE_SPACE),
        (RandAugment(), autoaugment.RAND_AUGMENT_SPACE),
    ]
    for transform, space in pairs:
        torch_space = _torch_space(transform, num_bins, image)
        assert list(torch_space) == list(space)
        for op, (magnitudes, signed) in torch_space.items():
            bins = range(num_bins) if magnitudes.ndim else [0]
            for negate in (0, 1):
                ours = [
                    float(autoaugment.op_magnitude(space, op, b, negate, num_bins, image.shape))
                    for b in bins
                ]
                expected = magnitudes.double().numpy() if magnitudes.ndim else np.zeros(1)
                expected = -expected if signed and negate else expected
                np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=0)


def test_trivial_augment_wide_is_torchvision_op_drawn_from_the_seed():
    """The result for a seed is torchvision's op at the drawn op, bin and sign; same seed, same
    result; inside tf.data it is the same function (bilinear, as the training preset)."""
    image = _images()[0]
    torch_space = TrivialAugmentWide()._augmentation_space(31)
    seeds = [tf.constant([s, 7], tf.int64) for s in range(40)]
    traced = tf.function(
        lambda seed: autoaugment.trivial_augment_wide(image, seed, interpolation=BILINEAR)
    )
    dataset = tf.data.Dataset.from_tensor_slices(tf.stack(seeds)).map(
        lambda seed: autoaugment.trivial_augment_wide(
            tf.constant(image), seed, interpolation=BILINEAR
        )
    )
    for seed, from_pipeline in zip(seeds, dataset.as_numpy_iterator(), strict=True):
        op_index, bin_index, negate = (
            int(v) for v in autoaugment.trivial_augment_wide_params(seed)
        )
        op = autoaugment.OPS[op_index]
        magnitudes, signed = torch_space[op]
        magnitude = float(magnitudes[bin_index]) if magnitudes.ndim else 0.0
        magnitude = -magnitude if signed and negate else magnitude
        expected = _torchvision_op(image, op, magnitude, None, BILINEAR)
        _assert_matches(from_pipeline, expected, op, BILINEAR)
        np.testing.assert_array_equal(traced(seed).numpy(), from_pipeline)
    np.testing.assert_array_equal(
        autoaugment.trivial_augment_wide(image, seeds[0], interpolation=BILINEAR), traced(seeds[0])
    )


def test_rand_augment_is_torchvision_ops_drawn_from_the_seed():
    image = _images()[1]
    fill = [10.0, 20.0, 30.0]
    torch_space = RandAugment()._augmentation_space(31, image.shape[:2])
    for s in range(30):
        seed = tf.constant([s, 3], tf.int64)
        ops, negates = autoaugment.rand_augment_params(seed, num_ops=3)
        expected = image
        for op_index, negate in zip(ops.numpy(), negates.numpy(), strict=True):
            op = list(torch_space)[op_index]
            magnitudes, signed = torch_space[op]
            magnitude = float(magnitudes[9]) if magnitudes.ndim else 0.0
            magnitude = -magnitude if signed and negate else magnitude
            expected = _torchvision_op(expected, op, magnitude, fill)
        ours = autoaugment.rand_augment(tf.constant(image), seed, num_ops=3, fill=fill).numpy()
        assert (ours == expected).all(-1).mean() >= 0.99


def test_draws_cover_the_augmentation_spaces():
    """Over 500 seeds every op, every magnitude bin and both signs are drawn, fairly evenly."""
    seeds = tf.stack([tf.constant([s, 11], tf.int64) for s in range(500)])
    draws = tf.function(tf.vectorized_map)(
        lambda seed: tf.stack(autoaugment.trivial_augment_wide_params(seed)), seeds
    ).numpy()
    op_counts = np.bincount(draws[:, 0], minlength=len(autoaugment.OPS))
    assert op_counts.min() > 10 and len(op_counts) == len(autoaugment.OPS)
    assert set(draws[:, 1]) == set(range(31))
    assert set(draws[:, 2]) == {0, 1}
    rand_ops, rand_signs = tf.function(tf.vectorized_map)(
        lambda seed: autoaugment.rand_augment_params(seed, 2), seeds
    )
    rand_counts = np.bincount(
        rand_ops.numpy().ravel(), minlength=len(autoaugment.RAND_AUGMENT_SPACE)
    )
    assert rand_counts.min() > 20 and len(rand_counts) == len(autoaugment.RAND_AUGMENT_SPACE)
    assert set(rand_signs.numpy().ravel()) == {0, 1}
    different_seeds = [
        autoaugment.trivial_augment_wide(_images()[0], seed).numpy() for seed in seeds[:8]
    ]
    assert len({a.tobytes() for a in different_seeds}) > 2


def test_invalid_arguments_raise_clear_errors():
    image = tf.constant(_images()[0])
    seed = tf.constant([1, 2], tf.int64)
    with pytest.raises(ValueError, match="unknown augmentation op 'Invert'"):
        autoaugment.apply_op(image, "Invert", 0.0)
    with pytest.raises(ValueError, match="uint8"):
        autoaugment.apply_op(tf.cast(image, tf.float32), "Equalize", 0.0)
    with pytest.raises(ValueError, match="num_magnitude_bins"):
        autoaugment.trivial_augment_wide(image, seed, num_magnitude_bins=1)
    with pytest.raises(ValueError, match="magnitude must be in"):
        autoaugment.rand_augment(image, seed, magnitude=31)
    with pytest.raises(ValueError, match="fill needs 1 or 3 values"):
        autoaugment.apply_op(image, "Rotate", 10.0, [1.0, 2.0])
    with pytest.raises(ValueError, match="interpolation must be one of nearest, bilinear"):
        autoaugment.apply_op(image, "Rotate", 10.0, None, "bicubic")
    with pytest.raises(ValueError, match="probability p"):
        random_erasing.random_erasing(tf.zeros([8, 8, 3]), seed, p=1.5)


def test_erase_matches_torchvision():
    image = np.random.default_rng(1).normal(size=(32, 40, 3)).astype(np.float32)
    chw = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    value = torch.tensor([0.5, -1.0, 2.0])[:, None, None]
    for top, left, height, width in [(3, 5, 10, 7), (0, 0, 32, 40), (31, 39, 1, 1), (4, 4, 0, 0)]:
        theirs = tv_functional.erase(chw, top, left, height, width, value).permute(1, 2, 0).numpy()
        ours = random_erasing.erase(image, top, left, height, width, [0.5, -1.0, 2.0]).numpy()
        np.testing.assert_array_equal(ours, theirs)


def test_random_erasing_boxes_follow_torchvision_distribution():
    """Boxes fit inside the image, with area in `scale` and aspect ratio in `ratio` (up to the
    rounding of the sides); p=0 never erases, p=1 always does; same seed, same result."""
    height, width = 48, 64
    image = tf.ones([height, width, 3])
    erasing = tf.function(random_erasing.random_erasing)
    params = tf.function(random_erasing.random_erasing_params)
    for s in range(200):
        seed = tf.constant([s, 5], tf.int64)
        top, left, h, w = (int(v) for v in params(seed, height, width))
        assert 0 < h < height and 0 < w < width
        assert 0 <= top <= height - h and 0 <= left <= width - w
        assert 0.02 * height * width * 0.6 <= h * w <= 0.33 * height * width * 1.4
        assert 0.3 * 0.5 <= h / w <= 3.3 * 2
        erased = erasing(image, seed, p=1.0).numpy()
        box = (erased == 0).all(-1)
        rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
        assert box.sum() == len(rows) * len(cols) > 0  # one filled rectangle
        assert rows[-1] - rows[0] + 1 == len(rows) < height
        assert 0.02 * 0.6 <= box.mean() <= 0.33 * 1.4
        np.testing.assert_array_equal(erasing(image, seed, p=0.0), image)
        np.testing.assert_array_equal(erasing(image, seed, p=1.0), erased)
    applied = [
        bool((erasing(image, tf.constant([s, 9], tf.int64)).numpy() == 0).any()) for s in range(200)
    ]
    assert 70 < sum(applied) < 130  # p = 0.5


def test_random_erasing_impossible_box_and_random_value():
    """A box that can never fit (scale 1) erases nothing, as torchvision returns the image;
    value="random" fills the box with standard normal noise."""
    image = tf.ones([16, 16, 3])
    seed = tf.constant([4, 2], tf.int64)
    kept = random_erasing.random_erasing(image, seed, p=1.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_array_equal(kept, image)
    noisy = random_erasing.random_erasing(image, seed, p=1.0, value="random").numpy()
    changed = noisy != 1.0
    assert changed.any() and abs(noisy[changed].std() - 1.0) < 0.5
