"""MixUp / CutMix against torchvision's `transforms.v2`, the soft-target loss against torch's
`CrossEntropyLoss(label_smoothing)`, and the mixed global batch's independence of the device
count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P
from torchvision.transforms import v2

from resnet_jax import mixing, parallel, steps

K = 5


def _images_labels(seed: int, n: int = 8, h: int = 12, w: int = 20):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, h, w, 3)).astype(np.float32)
    return images, rng.integers(0, K, n).astype(np.int32)


def _torch_apply(transform, images, labels):
    out, targets = transform(
        torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(labels).long()
    )
    return out.permute(0, 2, 3, 1).numpy(), targets.numpy()


def test_mixup_matches_torchvision():
    images, labels = _images_labels(0)
    lam = 0.3
    transform = v2.MixUp(alpha=1.0, num_classes=K)
    transform.make_params = lambda flat_inputs: {"lam": lam}
    want_images, want_targets = _torch_apply(transform, images, labels)
    targets = jax.nn.one_hot(labels, K)
    got_images = mixing.mix(images, mixing.roll_batch(images), lam)
    got_targets = mixing.mix(targets, mixing.roll_batch(targets), lam)
    np.testing.assert_allclose(got_images, want_images, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_targets, want_targets, rtol=1e-6, atol=1e-7)
    assert np.abs(want_images - images).max() > 0.1  # the batch really was mixed


@pytest.mark.parametrize("seed", range(40))
def test_cutmix_box_and_lambda_match_torchvision(seed):
    """Same lam and centre as torchvision's draws: same clipped box, same adjusted lam, same
    images and targets (a 12 x 20 image, so swapped axes would show)."""
    images, labels = _images_labels(seed)
    h, w = images.shape[1:3]
    transform = v2.CutMix(alpha=1.0, num_classes=K)
    torch.manual_seed(seed)
    params = transform.make_params([torch.zeros(1, 3, h, w)])
    torch.manual_seed(seed)  # the same draws again, in make_params' order
    lam = float(transform._dist.sample(()))
    center_x, center_y = int(torch.randint(w, (1,))), int(torch.randint(h, (1,)))

    box, lam_adjusted = mixing.cutmix_box(np.float32(lam), center_y, center_x, h, w)
    x1, y1, x2, y2 = params["box"]
    np.testing.assert_array_equal(box, [y1, y2, x1, x2])
    np.testing.assert_allclose(lam_adjusted, params["lam_adjusted"], rtol=1e-6)

    transform.make_params = lambda flat_inputs: params
    want_images, want_targets = _torch_apply(transform, images, labels)
    got_images = mixing.paste_box(images, mixing.roll_batch(images), box)
    targets = jax.nn.one_hot(labels, K)
    got_targets = mixing.mix(targets, mixing.roll_batch(targets), lam_adjusted)
    np.testing.assert_array_equal(got_images, want_images)
    np.testing.assert_allclose(got_targets, want_targets, rtol=1e-6, atol=1e-7)


def test_box_is_clipped_at_the_border():
    box, lam = mixing.cutmix_box(jnp.float32(0.0), 0, 19, 12, 20)  # lam 0: half-sides 6 and 10
    np.testing.assert_array_equal(box, [0, 6, 9, 20])
    np.testing.assert_allclose(lam, 1 - 6 * 11 / 240, rtol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_target_loss_matches_torch_cross_entropy(smoothing):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((6, K)) * 3
    lam = 0.35
    targets = np.eye(K)[rng.integers(0, K, 6)]
    soft = lam * targets + (1 - lam) * np.roll(targets, 1, axis=0)
    want = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)(
        torch.from_numpy(logits), torch.from_numpy(soft)
    )
    got = steps.cross_entropy_loss(
        logits.astype(np.float32), soft.astype(np.float32), num_classes=K, label_smoothing=smoothing
    )
    np.testing.assert_allclose(got, want.item(), rtol=1e-6)
    # Smoothing then mixing equals mixing then smoothing (the targets' rows sum to 1).
    smoothed = (1 - smoothing) * targets + smoothing / K
    mixed_smoothed = lam * smoothed + (1 - lam) * np.roll(smoothed, 1, axis=0)
    by_hand = -(mixed_smoothed * torch.log_softmax(torch.from_numpy(logits), 1).numpy()).sum(1)
    np.testing.assert_allclose(got, by_hand.mean(), rtol=1e-6)


def _mix(m, images, labels, step=3):
    return mixing.mix_batch(m, mixing.step_key(m, step), images, labels, num_classes=K)


def test_mix_batch_draws_one_transform_per_batch():
    images, labels = _images_labels(2)
    targets = np.eye(K)[labels]
    rolled = np.roll(images, 1, axis=0)
    seen = set()
    for step in range(12):
        got, soft = _mix(mixing.Mixing(mixup_alpha=0.2, cutmix_alpha=1.0), images, labels, step)
        got, soft = np.asarray(got), np.asarray(soft)
        np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-6)
        i = np.nonzero(labels != np.roll(labels, 1))[0][0]
        lam = soft[i, labels[i]]  # lam on the own label where the partner's label differs
        changed = ~np.isclose(got, images).all(-1)
        if changed.all() and not np.array_equal(got, rolled):  # MixUp: every pixel blends
            seen.add("mixup")
            np.testing.assert_allclose(got, lam * images + (1 - lam) * rolled, atol=1e-5)
        else:  # CutMix: one rectangle from the rolled batch, the same for every example
            seen.add("cutmix")
            rows, cols = np.nonzero(changed.any(0))
            inside = np.zeros(changed.shape[1:], bool)
            if rows.size:
                inside[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
            np.testing.assert_array_equal(got, np.where(inside[None, ..., None], rolled, images))
            lam_adjusted = 1 - inside.sum() / inside.size
            want = lam_adjusted * targets + (1 - lam_adjusted) * np.roll(targets, 1, axis=0)
            np.testing.assert_allclose(soft, want, atol=1e-6)
    assert seen == {"mixup", "cutmix"}


def test_mixed_batch_does_not_depend_on_the_device_count():
    images, labels = _images_labels(3, n=8)
    mesh = parallel.make_mesh()
    assert mesh.size == 4

    def on_4_devices(fn, *args):
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("batch"), out_specs=P("batch")))(
            *args
        )

    for seed in range(4):  # both transforms among them
        m = mixing.Mixing(mixup_alpha=0.5, cutmix_alpha=1.0, seed=seed)
        key = mixing.step_key(m, 5, 1)
        single = jax.jit(lambda x, y, m=m, key=key: mixing.mix_batch(m, key, x, y, num_classes=K))(
            images, labels
        )
        got = on_4_devices(
            lambda x, y, m=m, key=key: mixing.mix_batch(
                m, key, x, y, num_classes=K, axis_name="batch"
            ),
            images,
            labels,
        )
        np.testing.assert_array_equal(got[0], single[0])
        np.testing.assert_array_equal(got[1], single[1])
    # The first example of a shard is mixed with the previous shard's last one.
    got = on_4_devices(lambda x: mixing.roll_batch(x, "batch"), images)
    np.testing.assert_array_equal(got, np.roll(images, 1, axis=0))


def test_mixing_argument_errors():
    with pytest.raises(ValueError, match="mixup_alpha > 0 or cutmix_alpha > 0"):
        mixing.Mixing()
    with pytest.raises(ValueError, match=">= 0, got -1"):
        mixing.Mixing(mixup_alpha=-1)
