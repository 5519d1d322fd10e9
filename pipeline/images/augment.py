"""Training-time augmentation: the reference article's random shear, zoom and horizontal flip, optionally
rotation and shifts (``ImageDataGenerator``'s ``rotation_range``, ``width_shift_range``/``height_shift_range``),
warped by one batched TensorFlow projective transform with nearest-edge fill, as ``ImageDataGenerator`` does.

Every draw is a function of (seed, epoch, step, position in the global batch) (``GlobalRows``): a run is
reproducible from ``--seed``, every epoch sees new variants, and 1, 2 or 4 workers augment every example alike
(``tests/test_augment.py``). Keras' ``RandomFlip``/``RandomZoom``/``RandomShear`` layers draw inside the model
from a per-layer seed generator whose state moves with every call on every replica, so a variant would depend
on the number of workers and on where a resumed run restarted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the random transforms: ``shear`` a shear factor, ``zoom`` ±fraction, ``rotation``
    ±degrees, ``shift`` ±fraction of the image's side (each axis drawn on its own)."""

    shear: float = 0.2
    zoom: float = 0.2
    horizontal_flip: bool = True
    rotation: float = 0.0
    shift: float = 0.0


class GlobalRows:
    """A generator's draws made for all ``total`` rows of a global batch, of which this worker gets rows
    ``start`` to ``start + n`` (``size``'s first axis is ``n``): an example's draw follows its position in
    the global batch, not how many workers share it (drawing is cheap; only this worker's images are warped)."""

    def __init__(self, rng: np.random.Generator, start: int, total: int):
        self.rng, self.start, self.total = rng, start, total

    def _rows(self, draw, size, **kw) -> np.ndarray:
        n, *rest = size if isinstance(size, tuple) else (size,)
        if self.start + n > self.total:
            raise ValueError(f"rows {self.start}..{self.start + n} are outside a global batch of {self.total}")
        return draw(size=(self.total, *rest), **kw)[self.start:self.start + n]

    def uniform(self, low: float = 0.0, high: float = 1.0, size=None) -> np.ndarray:
        return self._rows(self.rng.uniform, size, low=low, high=high)

    def random(self, size=None) -> np.ndarray:
        return self._rows(self.rng.random, size)

    def integers(self, low: int, high: int | None = None, size=None) -> np.ndarray:
        return self._rows(self.rng.integers, size, low=low, high=high)


def random_transforms(rng: np.random.Generator, n: int, size: int, aug: Augmentation) -> np.ndarray:
    """``(n, 8)`` projective transforms mapping output pixels to input pixels."""
    zoom = rng.uniform(1 - aug.zoom, 1 + aug.zoom, size=(n, 2))
    shear = rng.uniform(-aug.shear, aug.shear, size=n)
    flip = rng.random(n) < 0.5 if aug.horizontal_flip else np.zeros(n, bool)
    # Drawn only when asked for, so the article's transforms keep their random stream.
    angle = np.deg2rad(rng.uniform(-aug.rotation, aug.rotation, size=n)) if aug.rotation else np.zeros(n)
    shift = rng.uniform(-aug.shift, aug.shift, size=(n, 2)) * size if aug.shift else np.zeros((n, 2))
    c = (size - 1) / 2.0
    center = np.array([[1, 0, c], [0, 1, c], [0, 0, 1]])
    uncenter = np.array([[1, 0, -c], [0, 1, -c], [0, 0, 1]])
    out = np.zeros((n, 8), np.float32)
    for i in range(n):
        sx = -zoom[i, 0] if flip[i] else zoom[i, 0]
        # output→input: x_in = sx*(x - c) + shear*sx*(y - c) + c; y_in = zy*(y - c) + c
        m = np.array([[sx, shear[i] * zoom[i, 0], 0.0], [0.0, zoom[i, 1], 0.0], [0.0, 0.0, 1.0]])
        cos, sin = np.cos(angle[i]), np.sin(angle[i])
        rotate_shift = np.array([[cos, -sin, shift[i, 0]], [sin, cos, shift[i, 1]], [0.0, 0.0, 1.0]])
        t = center @ rotate_shift @ m @ uncenter
        out[i] = [t[0, 0], t[0, 1], t[0, 2], t[1, 0], t[1, 1], t[1, 2], 0.0, 0.0]
    return out


def augment_batch(images: np.ndarray, rng: np.random.Generator, aug: Augmentation = Augmentation()) -> np.ndarray:
    """Randomly sheared, zoomed and flipped copies of ``images`` (uint8 NHWC) as float32 0..255."""
    import tensorflow as tf  # deferred: seconds to load, and only the training workers augment

    n, h, w, _ = images.shape
    transforms = random_transforms(rng, n, h, aug)
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.convert_to_tensor(images, tf.float32), transforms=tf.convert_to_tensor(transforms),
        output_shape=tf.constant([h, w], tf.int32), fill_value=tf.constant(0.0),
        interpolation="BILINEAR", fill_mode="NEAREST",
    )
    return warped.numpy()


def shift_maps(maps: np.ndarray, rng: np.random.Generator, cells: int) -> np.ndarray:
    """Feature maps ``(n, h, w, c)`` each moved by a random whole number of cells within ±``cells`` per axis, edges
    repeated: shifting an image, for a feature map (a VGG16 block-4 cell is 16 pixels), so that cached
    fine-tuning gets shift augmentation without re-running blocks 1-4."""
    if cells <= 0:
        return maps
    n, h, w, _ = maps.shape
    moves = rng.integers(-cells, cells + 1, size=(n, 2))
    padded = np.pad(maps, ((0, 0), (cells, cells), (cells, cells), (0, 0)), mode="edge")
    out = np.empty_like(maps)
    for i, (dy, dx) in enumerate(moves):
        out[i] = padded[i, cells + dy:cells + dy + h, cells + dx:cells + dx + w]
    return out
