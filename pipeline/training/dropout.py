"""Dropout that drops the same units of an example whatever the number of workers, and again
after a resume.

Keras' ``Dropout`` draws a mask of the replica's own batch from a seed generator every replica
advances alike: with two workers, the first rows of both halves of a global batch get the same
mask, one worker's rows differ from two workers', and a resumed run (the generator's state is
not in the checkpoint) starts its masks over. ``GlobalDropout`` draws the mask of the whole
global batch (``world`` times the worker's rows) from the run's seed and the optimizer's step
count (checkpointed with the optimizer) and keeps the worker's rows: rank r holds the r-th slice
of each global batch (``batches._held_batches``), so an example's mask depends on the step and
its position in the global batch only. Rank, world, seed and step counter are set by ``place``
(Ray Train's rank: TensorFlow's replica id need not follow it). The layer has no weights: the
exported model is built with Keras' ``Dropout`` and takes the trained weights as they are, so
models still load in plain Keras.
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
