"""Dropout that drops the same units of an example whatever the number of workers, and again after a
resume. Keras' ``Dropout`` draws each replica's mask from a generator all replicas advance alike (both
halves of a global batch get one mask) and no checkpoint keeps. ``GlobalDropout`` draws the global batch's
mask from the seed and the optimizer's step count and keeps this worker's slice (rank r holds the r-th:
``batches._held_batches``; ``place`` sets Ray Train's rank, which TensorFlow's replica id need not follow).
It has no weights, so the exported model uses Keras' ``Dropout`` and loads in plain Keras.
"""

from __future__ import annotations

import keras
import tensorflow as tf


class GlobalDropout(keras.layers.Dropout):
    """``keras.layers.Dropout`` with its mask drawn for the global batch (module docstring)."""

    # Set by ``place``; ``step`` returns the step counter (a function: a variable assigned to a
    # built Keras layer would be taken for new state of the layer, which Keras refuses).
    rank, world, seed, step = 0, 1, 0, None

    def call(self, inputs, training=False):
        if not training or self.rate == 0:
            return inputs
        rows = tf.shape(inputs)[0]
        shape = tf.concat([[rows * self.world], tf.shape(inputs)[1:]], axis=0)
        if self.step is None:  # not placed (a model built outside the training loop)
            noise = keras.random.uniform(shape, seed=self.seed_generator)
        else:
            seed = tf.stack([tf.constant(self.seed, tf.int64), keras.ops.cast(self.step(), "int64")])
            noise = tf.random.stateless_uniform(shape, seed=seed)
        keep = noise[self.rank * rows:(self.rank + 1) * rows] >= self.rate
        return tf.where(keep, inputs / tf.cast(1.0 - self.rate, inputs.dtype), tf.zeros_like(inputs))


def place(model: keras.Model, rank: int, world: int, seed: int, step) -> None:
    """Tell every ``GlobalDropout`` in ``model`` (at any depth) that this worker is ``rank`` of
    ``world`` and to draw from ``seed`` and the step counter ``step`` (the optimizer's iterations)."""
    for layer in model.layers:
        if isinstance(layer, GlobalDropout):
            layer.rank, layer.world, layer.seed, layer.step = rank, world, seed, lambda: step
        elif isinstance(layer, keras.Model):
            place(layer, rank, world, seed, step)
