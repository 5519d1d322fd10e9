"""Dropout by step and global position: a worker's mask is its rows of the global batch's mask,
drawn from the run's seed and the optimizer's step count (so a resumed run draws the masks an
uninterrupted one would)."""

from __future__ import annotations

import keras
import numpy as np

from pipeline.training.dropout import GlobalDropout, place

ROWS, UNITS = 8, 32


def _mask(rank: int, world: int, step: int, seed: int = 3) -> np.ndarray:
    inputs = keras.Input((UNITS,))
    layer = GlobalDropout(0.5)
    model = keras.Model(inputs, layer(inputs))
    # A Keras variable, as the optimizer's step count is, given to an already built layer.
    place(model, rank, world, seed, keras.Variable(step, dtype="int64", trainable=False))
    rows = ROWS // world
    return layer(np.ones((rows, UNITS), np.float32), training=True).numpy()


def test_a_workers_mask_is_its_rows_of_the_global_batchs_mask():
    whole = _mask(0, 1, step=5)
    assert set(np.unique(whole)) <= {0.0, 2.0} and 0.3 < (whole == 0).mean() < 0.7
    for world in (2, 4):
        np.testing.assert_array_equal(np.concatenate([_mask(r, world, step=5) for r in range(world)]), whole)


def test_the_mask_follows_the_seed_and_the_step_only():
    whole = _mask(0, 1, step=5)
    np.testing.assert_array_equal(_mask(0, 1, step=5), whole)
    assert not np.array_equal(_mask(0, 1, step=6), whole)
    assert not np.array_equal(_mask(0, 1, step=5, seed=4), whole)


def test_nested_layers_are_placed_and_inference_drops_nothing():
    inner_in = keras.Input((UNITS,))
    inner = keras.Model(inner_in, GlobalDropout(0.5, name="dropout")(inner_in), name="top")
    outer_in = keras.Input((UNITS,))
    outer = keras.Model(outer_in, inner(outer_in))
    place(outer, 1, 2, 7, keras.Variable(0, dtype="int64", trainable=False))
    layer = inner.get_layer("dropout")
    assert (layer.rank, layer.world, layer.seed) == (1, 2, 7)
    x = np.ones((4, UNITS), np.float32)
    np.testing.assert_array_equal(outer(x, training=False).numpy(), x)
