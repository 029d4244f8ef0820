"""`--recipe` presets (`resnet_jax.recipes`) against torchvision's published values, explicit
flags overriding them, and the validation of every torchvision-reference option."""

import jax
import pytest
from helpers import load_script

from resnet_jax import recipes
from resnet_jax.train_config import RECIPE_OPTIONS, ConfigError, TrainConfig

# torchvision references/classification: the ResNet50 IMAGENET1K_V2 command (README recipe link /
# PyTorch blog "How to Train State-Of-The-Art Models..."), `torchrun --nproc_per_node=8
# train.py --model resnet50 --batch-size 128 --lr 0.5 --lr-scheduler cosineannealinglr
# --lr-warmup-epochs 5 --lr-warmup-method linear --auto-augment ta_wide --epochs 600
# --random-erase 0.1 --weight-decay 0.00002 --norm-weight-decay 0.0 --label-smoothing 0.1
# --mixup-alpha 0.2 --cutmix-alpha 1.0 --train-crop-size 176 --model-ema --val-resize-size 232
# --ra-sampler --ra-reps 4`, the rest train.py's argparse defaults.
TV2 = {
    "batch_size": 1024,  # --batch-size 128 per GPU x 8 GPUs
    "lr": 0.125,  # --lr 0.5 at batch 1024 = 0.125 per 256 images (ours is scaled by batch/256)
    "epochs": 600,  # --epochs 600
    "warmup_epochs": 5.0,  # --lr-warmup-epochs 5
    "lr_warmup_method": "linear",  # --lr-warmup-method linear
    "lr_warmup_decay": 0.01,  # train.py default --lr-warmup-decay 0.01
    "lr_min": 0.0,  # train.py default --lr-min 0.0
    "auto_augment": "ta_wide",  # --auto-augment ta_wide
    "ra_magnitude": 9,  # train.py default --ra-magnitude 9 (unused with ta_wide)
    "random_erase": 0.1,  # --random-erase 0.1
    "weight_decay": 2e-5,  # --weight-decay 0.00002
    "norm_weight_decay": 0.0,  # --norm-weight-decay 0.0
    "bias_weight_decay": None,  # train.py default None
    "label_smoothing": 0.1,  # --label-smoothing 0.1
    "mixup_alpha": 0.2,  # --mixup-alpha 0.2
    "cutmix_alpha": 1.0,  # --cutmix-alpha 1.0
    "train_crop_size": 176,  # --train-crop-size 176
    "val_resize_size": 232,  # --val-resize-size 232
    "val_crop_size": 224,  # train.py default --val-crop-size 224
    "image_size": 224,
    "interpolation": "bilinear",  # train.py default --interpolation bilinear
    "model_ema": True,  # --model-ema
    "model_ema_steps": 32,  # train.py default --model-ema-steps 32
    "model_ema_decay": 0.99998,  # train.py default --model-ema-decay 0.99998
    "ra_reps": 4,  # --ra-sampler --ra-reps 4
    "clip_grad_norm": None,  # train.py default None
    "accum_steps": 1,
    "optimizer": "sgd",  # train.py default --opt sgd: torch.optim.SGD, momentum 0.9 ...
    "nesterov": False,  # ... without Nesterov
    "crop_min_scale": 0.08,  # presets.py: RandomResizedCrop(crop_size, interpolation=...)
    "zero_init_residual": False,  # train.py: torchvision.models.get_model(name, weights=...)
}
# README defaults table (8x V100): --batch_size 32, --epochs 90, --lr 0.1, --momentum 0.9,
# --weight-decay 1e-4 (--lr-step-size 30 --lr-gamma 0.1: our schedule is a cosine instead).
TV1 = {
    "batch_size": 256, "lr": 0.1, "epochs": 90, "warmup_epochs": 0.0, "weight_decay": 1e-4,
    "norm_weight_decay": None, "bias_weight_decay": None, "label_smoothing": 0.0,
    "auto_augment": "none", "random_erase": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0,
    "train_crop_size": 224, "val_resize_size": 256, "val_crop_size": 224, "model_ema": False,
    "ra_reps": 1, "clip_grad_norm": None, "optimizer": "sgd", "nesterov": False,
}  # fmt: skip


@pytest.mark.parametrize(("name", "want"), [("tv2", TV2), ("tv1", TV1)])
def test_presets_are_torchvisions_published_values(name, want):
    cfg = recipes.config({"recipe": name})
    got = {key: getattr(cfg, key) for key in want}
    assert got == pytest.approx(want)
    assert cfg.recipe == name
    cfg.validate(1)
    # Every reference option is set by the torchvision presets (none left to our defaults).
    assert set(RECIPE_OPTIONS) <= set(recipes.RECIPES[name])


def test_explicit_flags_override_a_preset_and_defaults_do_not():
    train = load_script("train.py")
    argv = ["--recipe", "tv2", "--epochs", "3", "--no-model-ema", "--bias-weight-decay", "none",
            "--norm-weight-decay", "none", "--batch-size", "64"]  # fmt: skip
    given = train.explicit_options(argv)
    assert set(given) == {"recipe", "epochs", "model_ema", "bias_weight_decay",
                          "norm_weight_decay", "batch_size"}  # fmt: skip
    cfg = recipes.config(given)
    assert (cfg.epochs, cfg.model_ema, cfg.batch_size) == (3, False, 64)
    assert (cfg.norm_weight_decay, cfg.bias_weight_decay) == (None, None)
    assert (cfg.lr, cfg.auto_augment, cfg.train_crop_size) == (0.125, "ta_wide", 176)  # preset
    assert "recipe=tv2" in recipes.summary(cfg) and "epochs=3" in recipes.summary(cfg)
    assert recipes.config({}) == TrainConfig()  # no recipe: the plain defaults
    with pytest.raises(ConfigError, match="--recipe must be one of tv1, tv2, small"):
        recipes.config({"recipe": "tv3"})


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("auto_augment", "autoaug", "--auto-augment must be one of none, ta_wide, ra"),
        ("interpolation", "nearest", "--interpolation must be one of bilinear, bicubic"),
        ("lr_warmup_method", "cosine", "--lr-warmup-method must be one of linear, constant"),
        ("ra_magnitude", 31, "--ra-magnitude must be in \\[0, 30\\]"),
        ("random_erase", 1.5, "--random-erase must be in \\[0, 1\\]"),
        ("random_erase", -0.1, "--random-erase must be in \\[0, 1\\]"),
        ("crop_min_scale", 0.0, "--crop-min-scale must be in \\(0, 1\\]"),
        ("crop_min_scale", 1.5, "--crop-min-scale must be in \\(0, 1\\]"),
        ("train_crop_size", 16, "--train-crop-size must be >= 32"),
        ("val_resize_size", 0, "--val-resize-size must be >= 32"),
        ("val_crop_size", 8, "--val-crop-size must be >= 32"),
        ("ra_reps", 0, "--ra-reps must be >= 1"),
        ("model_ema_steps", 0, "--model-ema-steps must be >= 1"),
        ("accum_steps", 0, "--accum-steps must be >= 1"),
        ("mixup_alpha", -1.0, "--mixup-alpha must be >= 0"),
        ("cutmix_alpha", -1.0, "--cutmix-alpha must be >= 0"),
        ("lr_min", -1e-3, "--lr-min must be >= 0"),
        ("norm_weight_decay", -1.0, "--norm-weight-decay must be >= 0"),
        ("bias_weight_decay", -1.0, "--bias-weight-decay must be >= 0"),
        ("model_ema_decay", 1.5, "--model-ema-decay must be in \\[0, 1\\]"),
        ("lr_warmup_decay", -0.5, "--lr-warmup-decay must be in \\[0, 1\\]"),
        ("clip_grad_norm", 0.0, "--clip-grad-norm must be > 0"),
        ("recipe", "tv9", "--recipe must be one of"),
    ],
)
def test_every_option_is_validated_with_a_clear_error(option, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{option: value}).validate(1)


def test_bicubic_needs_no_auto_augment():
    """The auto-augment's geometric ops sample as the training crop's --interpolation, bilinear
    or nearest only (torchvision's tensor transforms)."""
    with pytest.raises(ConfigError, match="--interpolation bicubic with --auto-augment ta_wide"):
        TrainConfig(interpolation="bicubic", auto_augment="ta_wide").validate(1)
    TrainConfig(interpolation="bicubic").validate(1)
    TrainConfig(interpolation="bilinear", auto_augment="ra").validate(1)


def test_val_crop_cannot_exceed_the_resize():
    with pytest.raises(ConfigError, match="--val-resize-size 200 must be >= --val-crop-size 224"):
        TrainConfig(val_resize_size=200, val_crop_size=224).validate(1)


def test_module_prints_a_presets_resolved_options(capsys):
    assert recipes.main(["small"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "recipe=small" and "auto_augment=ta_wide" in lines
    assert recipes.main(["tv3"]) == 2
    assert "usage: python -m resnet_jax.recipes {tv1,tv2,small}" in capsys.readouterr().err


@pytest.mark.parametrize("zero", [False, True])
def test_zero_init_residual_reaches_the_model(zero):
    """--zero-init-residual zeroes every block's last BatchNorm scale, and only those."""
    from resnet_jax import models, trainer

    cfg = TrainConfig(arch="resnet18", zero_init_residual=zero)
    model = trainer._build_model(cfg, 5, ("stem", *models.STAGE_NAMES, "fc"), None)
    params = models.init_variables(model, jax.random.key(0), 32)["params"]
    blocks = [params[name] for name in params if name.startswith("layer")]
    assert len(blocks) == 8
    for block in blocks:
        assert (block["bn2"]["scale"] == 0).all() == zero
        assert (block["bn1"]["scale"] == 1).all()
