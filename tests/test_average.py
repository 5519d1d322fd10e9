"""The weights' moving average (evaluation, checkpoints and exports use it) and the top MLP's
inputs: in process, no Ray."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.training.batches import batch_inputs
from pipeline.training.checkpoints import averaged_weights, restore_checkpoint, save_checkpoint
from pipeline.training.loop import build_model
from pipeline.training.settings import LoopSettings, ema_momentum


@pytest.mark.parametrize("requested, steps, expected", [
    (0.995, 3150, 0.995),   # the top MLP on 2000 photos: 50 epochs of 63 steps
    (0.995, 620, 0.983871),  # 10 epochs: spans at most 62 steps, a tenth of the run
    (0.995, 5, 0.0),         # the built-in data's few steps: no average
    (0.0, 10_000, 0.0),      # turned off
])
def test_the_average_spans_at_most_a_tenth_of_the_run(requested, steps, expected):
    assert ema_momentum(requested, steps) == expected


def _trained_top(momentum: float, steps: int = 5):
    import keras

    settings = LoopSettings(kind="top", epochs=1, batch_size=4, learning_rate=0.05, seed=0, precision="float32",
                            num_classes=2, feature_shape=(1, 1, 8), dropout=0.0, ema_momentum=momentum)
    keras.utils.set_random_seed(0)
    model, optimizer = build_model(settings)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        grads = [rng.normal(size=v.shape).astype(np.float32) for v in model.trainable_variables]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return settings, model, optimizer


def test_evaluation_sees_the_average_and_training_goes_on_from_its_own_weights(tmp_path):
    settings, model, optimizer = _trained_top(0.5)
    trained = [np.array(v) for v in model.trainable_variables]
    averages = [np.array(a) for a in optimizer._model_variables_moving_average]
    assert max(np.abs(t - a).max() for t, a in zip(trained, averages)) > 1e-3
    with averaged_weights(model, optimizer) as kept:
        for v, a in zip(model.trainable_variables, averages):
            np.testing.assert_array_equal(np.array(v), a)
        save_checkpoint(str(tmp_path), model, optimizer, {"epoch": 1, "history": []}, kept)
    for v, t in zip(model.trainable_variables, trained):
        np.testing.assert_array_equal(np.array(v), t)

    # The checkpoint's model weights are the average (what an export loads); a resumed run gets
    # back the trained weights and the average, and so takes the uninterrupted run's next step.
    import keras
    from ray.train import Checkpoint

    from pipeline.training.checkpoints import load_checkpoint_weights

    exported, _ = build_model(settings)
    load_checkpoint_weights(Checkpoint.from_directory(str(tmp_path)), exported)
    for v, a in zip(exported.trainable_variables, averages):
        np.testing.assert_array_equal(np.array(v), a)
    keras.utils.set_random_seed(1)
    resumed, resumed_optimizer = build_model(settings)
    restore_checkpoint(str(tmp_path), resumed, resumed_optimizer)
    for v, t in zip(resumed.trainable_variables, trained):
        np.testing.assert_array_equal(np.array(v), t)
    for a, b in zip(resumed_optimizer._model_variables_moving_average, averages):
        np.testing.assert_array_equal(np.array(a), b)


def test_without_an_average_nothing_is_swapped(tmp_path):
    _, model, optimizer = _trained_top(0.0)
    before = [np.array(v) for v in model.trainable_variables]
    with averaged_weights(model, optimizer) as kept:
        assert kept is None
        for v, b in zip(model.trainable_variables, before):
            np.testing.assert_array_equal(np.array(v), b)


def test_the_top_trains_on_the_features_as_they_are_even_beside_an_older_mirror_column():
    """Extractions of older versions could hold the mirror images' features (features_flipped):
    the top never draws them, with or without an augmentation seed."""
    settings = LoopSettings(kind="top", epochs=1, batch_size=64, learning_rate=1e-3, seed=0, precision="float32",
                            num_classes=2, feature_shape=(1, 1, 2), augment=True)
    n = 64
    batch = {"label": np.zeros(n, np.int32), "features": np.zeros((n, 2), np.float32),
             "features_flipped": np.ones((n, 2), np.float32)}
    for rng in (np.random.default_rng([0, 1, 0, 0]), None):
        x, _ = batch_inputs(batch, settings, rng)
        assert x.shape == (n, 1, 1, 2) and not x.any()
