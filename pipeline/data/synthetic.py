"""The built-in default data set: two classes of drawn shapes, generated deterministically.

It needs nothing downloaded and proves that an installation works end to end; its
accuracy says nothing about real photos.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.storage import cache_dir

CLASSES = ("circles", "squares")
COUNTS = {"train": 48, "validation": 16}
VERSION = "v1"
NOTE = ("built-in synthetic data set (drawn circles vs squares): it proves the installation works, "
        "not the accuracy of the method; pass --data-dir for real images")


@functools.cache
def note_builtin_data() -> None:
    """Say once per process (run_all and each of its stages would each say it) what the built-in set proves."""
    logging.getLogger(__name__).info("note: %s", NOTE)


def _draw(rng: np.random.Generator, shape: str) -> Image.Image:
    w, h = (int(v) for v in rng.integers(96, 220, size=2))
    background = tuple(int(v) for v in rng.integers(0, 256, size=3))
    noise = rng.normal(0, 18, size=(h, w, 3))
    pixels = np.clip(np.array(background, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    im = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(1, 4))):
        size = int(rng.integers(min(w, h) // 5, min(w, h) // 2))
        x = int(rng.integers(0, w - size))
        y = int(rng.integers(0, h - size))
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if shape == "circles":
            draw.ellipse([x, y, x + size, y + size], fill=fill)
        else:
            draw.rectangle([x, y, x + size, y + size], fill=fill)
    return im


def _root() -> str:
    return os.path.join(cache_dir(), f"synthetic-{VERSION}")


def is_synthetic(data_dir: str) -> bool:
    """Whether ``data_dir`` is the built-in synthetic data set."""
    return "://" not in data_dir and os.path.abspath(data_dir) == os.path.abspath(_root())


def default_data_dir() -> str:
    """The synthetic data root, generated on first use into the cache folder."""
    root = _root()
    if os.path.isdir(root):
        return root
    parent = os.path.dirname(root)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".synthetic-")
    rng = np.random.default_rng(20240601)
    for split, count in COUNTS.items():
        for shape in CLASSES:
            folder = os.path.join(tmp, split, shape)
            os.makedirs(folder)
            for i in range(count):
                _draw(rng, shape).save(os.path.join(folder, f"{shape[:-1]}.{i}.jpg"), quality=90)
    try:
        os.rename(tmp, root)
    except OSError:
        # Another process generated it first; both copies are identical.
        shutil.rmtree(tmp, ignore_errors=True)
    return root
