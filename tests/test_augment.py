"""Training-time augmentation: reproducible from its seed, and each transform what it says."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.images.augment import Augmentation, GlobalRows, augment_batch, random_transforms, shift_maps
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


def test_rotation_and_shift_stay_within_their_ranges():
    still = Augmentation(shear=0.0, zoom=0.0, horizontal_flip=False)
    turned = random_transforms(np.random.default_rng(4), 2000, 64, dataclasses.replace(still, rotation=30.0))
    angle = np.degrees(np.arctan2(turned[:, 3], turned[:, 0]))
    assert angle.min() >= -30.0001 and angle.max() <= 30.0001 and angle.std() > 10
    np.testing.assert_allclose(turned[:, 0] ** 2 + turned[:, 3] ** 2, 1.0, atol=1e-5)  # a rotation, no scaling
    moved = random_transforms(np.random.default_rng(5), 2000, 64, dataclasses.replace(still, shift=0.1))
    np.testing.assert_allclose(moved[:, [0, 4]], 1.0)
    offsets = moved[:, [2, 5]]
    assert np.abs(offsets).max() <= 6.4 + 1e-4 and offsets.std(axis=0).min() > 2
    assert not np.allclose(offsets[:, 0], offsets[:, 1]), "the two axes are drawn independently"


def test_rotation_turns_about_the_centre_and_shift_moves_the_image():
    yy, xx = np.mgrid[:33, :33]
    blob = (255 * np.exp(-((xx - 16) ** 2 + (yy - 16) ** 2) / (2 * 5.0 ** 2))).astype(np.uint8)
    x = np.repeat(np.stack([blob] * 16)[..., None], 3, axis=-1)
    still = Augmentation(shear=0.0, zoom=0.0, horizontal_flip=False)
    turned = augment_batch(x, np.random.default_rng(1), dataclasses.replace(still, rotation=45.0))
    moved = augment_batch(x, np.random.default_rng(1), dataclasses.replace(still, shift=0.2))
    # A round blob at the centre turned about the centre is the same blob (up to resampling);
    # the same blob shifted, or turned about any other point, is not.
    assert np.abs(turned - x).mean() < 1
    assert np.abs(moved - x).mean() > 5


def test_feature_maps_shift_by_whole_cells_with_edges_repeated():
    from pipeline.training.kinds import block4_cells

    maps = np.arange(2 * 5 * 5 * 3, dtype=np.float32).reshape(2, 5, 5, 3)
    assert shift_maps(maps, np.random.default_rng(0), 0) is maps
    seen = set()
    for seed in range(40):
        out = shift_maps(maps, np.random.default_rng(seed), 2)
        assert out.shape == maps.shape
        for one, original in zip(out, maps):
            padded = np.pad(original, ((2, 2), (2, 2), (0, 0)), mode="edge")
            moves = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                     if np.array_equal(one, padded[2 + dy:7 + dy, 2 + dx:7 + dx])]
            assert moves, "every map is the original moved by at most 2 cells, edges repeated"
            seen.add(moves[0])
    assert len(seen) > 15, "the moves vary, over both axes"
    assert block4_cells(0.15, 224) == 2 and block4_cells(0.0, 224) == 0 and block4_cells(0.1, 150) == 1


def test_cached_finetuning_batches_mirror_and_shift_the_block4_maps():
    from pipeline.training.batches import batch_inputs
    from pipeline.training.settings import LoopSettings

    s = LoopSettings(kind="finetune", epochs=1, batch_size=8, learning_rate=1e-4, seed=0, precision="float32",
                     num_classes=2, image_size=64, cached_block4=True, block4_shape=(4, 4, 2), shift=0.25)
    rng = np.random.default_rng(0)
    plain, mirror = rng.normal(size=(2, 8, 4 * 4 * 2)).astype(np.float32)
    batch = {"label": np.zeros(8, np.int64), "block4": plain, "block4_flipped": mirror}
    x, _ = batch_inputs(batch, s, None)
    np.testing.assert_array_equal(x, plain.reshape(8, 4, 4, 2))  # evaluation: as stored
    x, _ = batch_inputs(batch, s, np.random.default_rng(3))
    moved = 0
    for i in range(8):
        candidates = [np.pad(src[i].reshape(4, 4, 2), ((1, 1), (1, 1), (0, 0)), mode="edge")[1 + dy:5 + dy, 1 + dx:5 + dx]
                      for src in (plain, mirror) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        matches = [k for k, c in enumerate(candidates) if np.array_equal(x[i], c)]
        assert matches, "each row is its map or its mirror's, moved by at most one cell (0.25 of 64 px)"
        moved += 4 not in matches and 13 not in matches
    assert moved >= 2


def test_a_workers_draws_are_its_rows_of_the_global_batchs_draws():
    """Augmentation follows an example's place in the global batch: one worker drawing all 8 rows
    and 2 or 4 workers drawing their 4 or 2 rows each give every row the same transform."""
    aug = Augmentation(rotation=20.0, shift=0.1)

    def draws(start: int, rows: int) -> np.ndarray:
        return random_transforms(GlobalRows(np.random.default_rng([5, 1, 3]), start, 8), rows, 32, aug)

    whole = draws(0, 8)
    for workers in (2, 4):
        rows = 8 // workers
        np.testing.assert_array_equal(np.concatenate([draws(r * rows, rows) for r in range(workers)]), whole)
    assert not np.array_equal(draws(0, 4), draws(4, 4))
    moves = GlobalRows(np.random.default_rng(0), 6, 8).integers(-1, 2, size=(2, 2))
    np.testing.assert_array_equal(moves, np.random.default_rng(0).integers(-1, 2, size=(8, 2))[6:])
    with pytest.raises(ValueError, match="outside a global batch of 8"):
        GlobalRows(np.random.default_rng(0), 6, 8).random(4)
