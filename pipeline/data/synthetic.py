"""The built-in default data set: two classes of drawn stripes, generated deterministically.

It needs nothing downloaded and proves that an installation works end to end: every model learns it
within the few epochs ``run_all`` gives it (a first convolution tells horizontal from vertical stripes;
circles against squares left the small CNN at chance). Its accuracy says nothing about real photos.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from pipeline.data.storage import cache_dir

CLASSES = ("horizontal", "vertical")
COUNTS = {"train": 48, "validation": 16}
VERSION = "v2"
NOTE = ("built-in synthetic data set (drawn horizontal vs vertical stripes): it proves the installation works, "
        "not the accuracy of the method; pass --data-dir for real images")


@functools.cache
def note_builtin_data() -> None:
    """Say once per process (run_all and each of its stages would each say it) what the built-in set proves."""
    logging.getLogger(__name__).info("note: %s", NOTE)


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours far enough apart for the stripes to show."""
    while True:
        a, b = rng.integers(0, 256, size=(2, 3)).astype(np.float64)
        if np.abs(a - b).sum() >= 150:
            return a, b


def _draw(rng: np.random.Generator, orientation: str) -> Image.Image:
    w, h = (int(v) for v in rng.integers(96, 161, size=2))
    a, b = _colours(rng)
    period = int(rng.integers(8, 24))
    phase = int(rng.integers(0, period))
    across = np.arange(h)[:, None] if orientation == "horizontal" else np.arange(w)[None, :]
    on = np.broadcast_to((across + phase) % period < period // 2, (h, w))
    pixels = np.where(on[..., None], a, b) + rng.normal(0, 12, size=(h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


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
        for orientation in CLASSES:
            folder = os.path.join(tmp, split, orientation)
            os.makedirs(folder)
            for i in range(count):
                _draw(rng, orientation).save(os.path.join(folder, f"{orientation}.{i}.jpg"), quality=90)
    try:
        os.rename(tmp, root)
    except OSError:
        # Another process generated it first; both copies are identical.
        shutil.rmtree(tmp, ignore_errors=True)
    return root
