"""The synthetic image folders are learnable: a few training steps of a tiny ResNet on them lift
validation accuracy far above chance (what tests that train on them rely on)."""

import jax
import numpy as np
import optax

from resnet_jax import data, models, steps

SIZE = 32


def test_few_steps_on_synthetic_folders_beat_chance(synthetic_folders):
    source = data.open_source(data_dir=synthetic_folders)
    num_classes = len(source.class_names)
    model = models.ResNet(
        stage_sizes=[1, 1, 1, 1], block_cls=models.BasicBlock, num_classes=num_classes
    )
    variables = models.init_variables(model, jax.random.key(0), image_size=SIZE)
    tx = optax.adam(3e-3)
    state = steps.create_train_state(variables, tx)
    train_step = jax.jit(steps.make_train_step(model, tx, axis_name=None))
    batches = [
        batch
        for epoch in range(3)
        for batch in data.train_batches(
            source, batch_size=16, image_size=SIZE, seed=0, epoch=epoch, normalize=False
        )
    ]
    assert len(batches) == 9  # 3 epochs of 48 // 16
    for batch in batches:
        state, metrics = train_step(state, batch)
    assert np.isfinite(float(metrics["loss"]))

    @jax.jit
    def predict(params, batch_stats, images):
        return model.apply({"params": params, "batch_stats": batch_stats}, images).argmax(-1)

    (evaluation,) = data.eval_batches(source, batch_size=source.num_eval, image_size=SIZE)
    predicted = np.asarray(predict(state.params, state.batch_stats, evaluation["image"]))
    accuracy = np.mean(predicted == evaluation["label"])
    assert accuracy >= 0.75, f"validation accuracy {accuracy:.2f} (chance 0.25)"
