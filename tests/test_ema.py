"""Model EMA: the arithmetic by hand and against torch's `AveragedModel` with torchvision's
`ema_avg` (`use_buffers=True`), the reference's update/reset schedule, and the in-step hook."""

import functools

import jax
import numpy as np
import pytest
import torch

from resnet_jax import ema, models, optim, steps


def test_update_by_hand():
    state = ema.init({"w": np.array([1.0, 2.0], np.float32)}, {"m": np.array([0.0], np.float32)})
    for value in (3.0, 5.0, 7.0):
        state = ema.update(
            state, {"w": np.full(2, value, np.float32)}, {"m": np.array([value], np.float32)}, 0.9
        )
    # First update copies (n_averaged 0): 3; then 0.9*3 + 0.1*5 = 3.2; 0.9*3.2 + 0.1*7 = 3.58.
    np.testing.assert_allclose(state.params["w"], [3.58, 3.58], rtol=1e-6)
    np.testing.assert_allclose(state.batch_stats["m"], [3.58], rtol=1e-6)
    assert state.n_averaged == 3
    assert set(state.variables()) == {"params", "batch_stats"}


def test_update_matches_torch_averaged_model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    decay = 0.8

    def ema_avg(avg, param, num_averaged):  # torchvision reference's utils.ExponentialMovingAverage
        return decay * avg + (1 - decay) * param

    averaged = torch.optim.swa_utils.AveragedModel(net, avg_fn=ema_avg, use_buffers=True)

    def variables():
        sd = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
        params = {"w": sd["0.weight"], "b": sd["0.bias"], "s": sd["1.weight"], "t": sd["1.bias"]}
        return params, {"mean": sd["1.running_mean"], "var": sd["1.running_var"]}

    state = ema.init(*variables())
    for _ in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.randn(8, 3))  # moves the BatchNorm running statistics
        averaged.update_parameters(net)
        state = ema.update(state, *variables(), decay)
    want = {k: v.detach().numpy() for k, v in averaged.module.state_dict().items()}
    got_params, got_stats = state.params, state.batch_stats
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
    close(got_params["w"], want["0.weight"])
    close(got_params["t"], want["1.bias"])
    close(got_stats["mean"], want["1.running_mean"])
    close(got_stats["var"], want["1.running_var"])
    assert int(averaged.n_averaged) == int(state.n_averaged) == 4
    assert not np.allclose(got_params["w"], variables()[0]["w"])  # an average, not a copy


def test_adjusted_decay_as_the_reference():
    # torchvision's resnet50 v2 recipe: decay 0.99998, 8 GPUs x 128, ema steps 32, 600 epochs.
    alpha = (1 - 0.99998) * 1024 * 32 / 600
    assert ema.adjusted_decay(
        0.99998, global_batch_size=1024, ema_steps=32, epochs=600
    ) == pytest.approx(1 - alpha, rel=1e-12)
    assert ema.adjusted_decay(0.9, global_batch_size=256, ema_steps=1, epochs=1) == 0.0
    with pytest.raises(ValueError, match="model_ema_decay"):
        ema.adjusted_decay(1.5, global_batch_size=8, ema_steps=1, epochs=1)


def test_schedule_updates_every_n_batches_of_an_epoch_and_resets_in_warmup():
    """Against the reference loop: `if i % ema_steps == 0: update; if epoch < warmup: reset`."""
    schedule = ema.EmaSchedule(decay=0.5, steps_per_epoch=5, every_steps=2, warmup_epochs=1)
    state = ema.init({"w": np.zeros(1, np.float32)}, {})
    avg, n = 0.0, 0
    for step in range(15):
        value = float(step + 1)  # the model after batch `step`
        state = ema.scheduled_update(
            schedule, state, step, {"w": np.full(1, value, np.float32)}, {}
        )
        epoch, i = divmod(step, 5)
        if i % 2 == 0:
            avg = value if n == 0 else 0.5 * avg + 0.5 * value
            n = 0 if epoch < 1 else n + 1
        np.testing.assert_allclose(state.params["w"], [avg], rtol=1e-6, err_msg=f"step {step}")
        assert int(state.n_averaged) == n
    assert avg not in (15.0, 11.0)  # past warmup it averages


def test_train_step_updates_the_ema():
    model = models.ResNet(
        stage_sizes=(1, 1, 1, 1), block_cls=models.BasicBlock, num_classes=3, axis_name=None
    )
    variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    tx = optim.create_optimizer(schedule=0.1)
    state = steps.create_train_state(variables, tx, ema=True)
    schedule = ema.EmaSchedule(decay=0.75, steps_per_epoch=10, every_steps=1)
    step = jax.jit(steps.make_train_step(model, tx, axis_name=None, ema=schedule))
    rng = np.random.default_rng(0)
    history = []
    for _ in range(3):
        batch = {
            "image": rng.standard_normal((4, 32, 32, 3)).astype(np.float32),
            "label": rng.integers(0, 3, 4).astype(np.int32),
        }
        state, _ = step(state, batch)
        history.append(jax.device_get((state.params, state.batch_stats)))
    want = history[0]
    for later in history[1:]:
        want = jax.tree.map(lambda a, b: 0.75 * a + 0.25 * b, want, later)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
    jax.tree.map(close, (state.ema.params, state.ema.batch_stats), want)
    assert int(state.ema.n_averaged) == 3
    with pytest.raises(ValueError, match="ema=True"):
        plain = steps.create_train_state(variables, tx)
        steps.make_train_step(model, tx, axis_name=None, ema=schedule)(plain, batch)
