"""Dropout that drops the same units of an example whatever the number of workers.

Keras' ``Dropout`` draws a mask of the replica's own batch from a seed generator every replica
advances alike: with two workers, the first rows of both halves of a global batch get the same
mask, and one worker's rows differ from two workers'. ``GlobalDropout`` draws the mask of the
whole global batch (``world`` times the worker's rows) from that same generator and keeps the
worker's rows: rank r holds the r-th slice of each global batch (``batches._held_batches``), so
an example's mask depends on its position in the global batch only. The rank and world are Ray
Train's, set by ``place`` (TensorFlow's replica id need not follow Ray's ranks). The layer has no
weights: the exported model is built with Keras' ``Dropout`` and takes the trained weights as
they are, so models still load in plain Keras.
"""

from __future__ import annotations

import keras
import tensorflow as tf


class GlobalDropout(keras.layers.Dropout):
    """``keras.layers.Dropout`` with its mask drawn for the global batch (module docstring)."""

    rank, world = 0, 1

    def call(self, inputs, training=False):
        if not training or self.rate == 0:
            return inputs
        rows = tf.shape(inputs)[0]
        shape = tf.concat([[rows * self.world], tf.shape(inputs)[1:]], axis=0)
        keep = keras.random.uniform(shape, seed=self.seed_generator) >= self.rate
        keep = keep[self.rank * rows:(self.rank + 1) * rows]
        return tf.where(keep, inputs / tf.cast(1.0 - self.rate, inputs.dtype), tf.zeros_like(inputs))


def place(model: keras.Model, rank: int, world: int) -> None:
    """Tell every ``GlobalDropout`` in ``model`` (at any depth) that this worker is ``rank`` of ``world``."""
    for layer in model.layers:
        if isinstance(layer, GlobalDropout):
            layer.rank, layer.world = rank, world
        elif isinstance(layer, keras.Model):
            place(layer, rank, world)
