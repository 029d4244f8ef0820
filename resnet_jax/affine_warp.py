"""torchvision's tensor affine warp (`F.affine` / `F.rotate` on a uint8 tensor, scale 1) as
TensorFlow ops, for the auto-augment's geometric operations: the inverse matrix of
`_get_inverse_affine_matrix` in float64, the float32 sampling grid of `_gen_affine_grid`, and
`grid_sample`'s nearest or bilinear sampling (align_corners False) with torchvision's fill.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from resnet_jax.augment import import_tensorflow

tf = import_tensorflow()

AFFINE_INTERPOLATIONS = ("nearest", "bilinear")  # torchvision's tensor affine supports these two
Fill = float | Sequence[float] | None


def _fill_floats(fill: Fill, channels: int) -> tf.Tensor:
    """`fill` as float32 [channels] (None: 0); an error unless it has 1 or `channels` values."""
    values = [0.0] if fill is None else [fill] if isinstance(fill, (int, float)) else list(fill)
    if len(values) not in (1, channels):
        raise ValueError(f"fill needs 1 or {channels} values, got {len(values)}")
    return tf.broadcast_to(tf.constant(values, tf.float32), [channels])


def _fill_values(fill: Fill, channels: int) -> tf.Tensor:
    """`fill` as uint8 [channels] (None: 0), rounded half to even like torchvision's cast."""
    return tf.cast(tf.clip_by_value(tf.round(_fill_floats(fill, channels)), 0.0, 255.0), tf.uint8)


def inverse_affine_matrix(center, angle, translate, shear) -> list[tf.Tensor]:
    """torchvision's `_get_inverse_affine_matrix` (scale 1) in float64: output pixel -> input
    pixel, both relative to the image centre. Arguments are float64 scalars or floats."""
    rad = math.pi / 180.0
    rot, sx, sy = angle * rad, shear[0] * rad, shear[1] * rad
    cx, cy = center
    tx, ty = translate
    a = tf.cos(rot - sy) / tf.cos(sy)
    b = -tf.cos(rot - sy) * tf.tan(sx) / tf.cos(sy) - tf.sin(rot)
    c = tf.sin(rot - sy) / tf.cos(sy)
    d = -tf.sin(rot - sy) * tf.tan(sx) / tf.cos(sy) + tf.cos(rot)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = m0 * (-cx - tx) + m1 * (-cy - ty) + cx
    m5 = m3 * (-cx - tx) + m4 * (-cy - ty) + cy
    return [m0, m1, m2, m3, m4, m5]


def check_interpolation(interpolation: str) -> None:
    """An error naming the choices unless `interpolation` is one of `AFFINE_INTERPOLATIONS`."""
    if interpolation not in AFFINE_INTERPOLATIONS:
        raise ValueError(
            "the auto-augment's interpolation must be one of "
            f"{', '.join(AFFINE_INTERPOLATIONS)} (as torchvision's tensor transforms), "
            f"got {interpolation!r}"
        )


def affine(image: tf.Tensor, matrix: list[tf.Tensor], fill: Fill, interpolation: str) -> tf.Tensor:
    """Warp by an inverse affine `matrix`, as torchvision's tensor `affine`: the float32 grid
    of `_gen_affine_grid` and `grid_sample`'s unnormalisation (align_corners False), sampled
    `interpolation` "nearest" or "bilinear" (`_bilinear`); pixels sampled from outside the
    image are `fill`."""
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    theta = [tf.cast(tf.cast(m, tf.float64), tf.float32) for m in matrix]
    rx = [t / (0.5 * w) for t in theta[:3]]
    ry = [t / (0.5 * h) for t in theta[3:]]
    xs = (tf.range(w) - 0.5 * w + 0.5)[tf.newaxis, :]
    ys = (tf.range(h) - 0.5 * h + 0.5)[:, tf.newaxis]
    grid_x = xs * rx[0] + ys * rx[1] + rx[2]
    grid_y = xs * ry[0] + ys * ry[1] + ry[2]
    src_x = ((grid_x + 1.0) * w - 1.0) / 2.0
    src_y = ((grid_y + 1.0) * h - 1.0) / 2.0
    if interpolation == "bilinear":
        return _bilinear(image, src_x, src_y, fill)
    src_x, src_y = tf.cast(tf.round(src_x), tf.int32), tf.cast(tf.round(src_y), tf.int32)
    inside = (src_x >= 0) & (src_x < width) & (src_y >= 0) & (src_y < height)
    index = tf.stack(
        [tf.clip_by_value(src_y, 0, height - 1), tf.clip_by_value(src_x, 0, width - 1)], -1
    )
    warped = tf.gather_nd(image, index)
    return tf.where(inside[..., tf.newaxis], warped, _fill_values(fill, image.shape[-1]))


def _bilinear(image: tf.Tensor, src_x: tf.Tensor, src_y: tf.Tensor, fill: Fill) -> tf.Tensor:
    """`grid_sample` bilinear at float32 source coordinates [H, W] with zero padding; with a
    `fill`, torchvision's mask blend `image * coverage + (1 - coverage) * fill` (coverage: the
    weight of the neighbours inside the image); rounded half to even to uint8."""
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    values = tf.cast(image, tf.float32)
    x0, y0 = tf.floor(src_x), tf.floor(src_y)
    x1, y1 = x0 + 1.0, y0 + 1.0
    corners = [  # (x, y, weight) in grid_sample's order: nw, ne, sw, se
        (x0, y0, (x1 - src_x) * (y1 - src_y)),
        (x1, y0, (src_x - x0) * (y1 - src_y)),
        (x0, y1, (x1 - src_x) * (src_y - y0)),
        (x1, y1, (src_x - x0) * (src_y - y0)),
    ]
    total, coverage = tf.zeros_like(values), tf.zeros_like(src_x)
    for x, y, weight in corners:
        xi, yi = tf.cast(x, tf.int32), tf.cast(y, tf.int32)
        inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
        weight = tf.where(inside, weight, 0.0)
        index = tf.stack(
            [tf.clip_by_value(yi, 0, height - 1), tf.clip_by_value(xi, 0, width - 1)], -1
        )
        total += weight[..., tf.newaxis] * tf.gather_nd(values, index)
        coverage += weight
    if fill is not None:
        coverage = coverage[..., tf.newaxis]
        total = total * coverage + (1.0 - coverage) * _fill_floats(fill, image.shape[-1])
    return tf.cast(tf.clip_by_value(tf.round(total), 0.0, 255.0), tf.uint8)
