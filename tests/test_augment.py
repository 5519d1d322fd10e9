"""Training-time augmentation: reproducible from its seed, and each transform what it says."""

from __future__ import annotations

import numpy as np

from pipeline.augment import Augmentation, augment_batch, random_transforms
from tests.images import half_split_image


def images(n: int = 4, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_the_same_seed_gives_the_same_batch_and_another_seed_another():
    x = images()
    one = augment_batch(x, np.random.default_rng([7, 2, 0, 5]))
    again = augment_batch(x, np.random.default_rng([7, 2, 0, 5]))
    other = augment_batch(x, np.random.default_rng([8, 2, 0, 5]))
    np.testing.assert_array_equal(one, again)
    assert not np.array_equal(one, other)


def test_flip_alone_mirrors_about_half_of_the_images():
    x = np.stack([np.asarray(half_split_image((32, 32)))] * 64)
    out = augment_batch(x, np.random.default_rng(1), Augmentation(shear=0.0, zoom=0.0))
    mirrored = [np.array_equal(o, x[0, :, ::-1].astype(np.float32)) for o in out]
    kept = [np.array_equal(o, x[0].astype(np.float32)) for o in out]
    assert all(m or k for m, k in zip(mirrored, kept)), "a flip-only transform moved pixels otherwise"
    assert 16 <= sum(mirrored) <= 48


def test_zoom_and_shear_stay_within_their_ranges():
    t = random_transforms(np.random.default_rng(3), 2000, 64, Augmentation(shear=0.2, zoom=0.2, horizontal_flip=False))
    zoom_x, shear_term, zoom_y = t[:, 0], t[:, 1], t[:, 4]
    assert zoom_x.min() >= 0.8 and zoom_x.max() <= 1.2 and zoom_y.min() >= 0.8 and zoom_y.max() <= 1.2
    shear = shear_term / zoom_x
    assert shear.min() >= -0.2 and shear.max() <= 0.2 and shear.std() > 0.05
    assert not np.allclose(zoom_x, zoom_y), "width and height zoom are drawn independently"
