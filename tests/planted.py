"""Corpora with planted problems for the data set doctor: edited copies of real photos, flipped
labels and strays of neither class (tests/test_audit.py, bench/audit_quality.py, bench/audit_calibration.py)."""

from __future__ import annotations

import os
import shutil

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

EDITS = ("jpeg", "resize", "crop", "brightness")


def edited(im: Image.Image, edit: str, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """``im`` with one light edit, and the JPEG quality to save it at: re-encoded at a low quality,
    resized to 50-70 %, cropped to 90 % at a random offset, or brightened or darkened by 10-15 %."""
    im = im.convert("RGB")
    if edit == "jpeg":
        return im, int(rng.integers(30, 50))
    if edit == "resize":
        scale = rng.uniform(0.5, 0.7)
        return im.resize((max(8, round(im.width * scale)), max(8, round(im.height * scale))), Image.BILINEAR), 90
    if edit == "crop":
        w, h = round(im.width * 0.9), round(im.height * 0.9)
        x, y = int(rng.integers(0, im.width - w + 1)), int(rng.integers(0, im.height - h + 1))
        return im.crop((x, y, x + w, y + h)), 90
    if edit == "brightness":
        factor = rng.choice([-1, 1]) * rng.uniform(0.10, 0.15) + 1
        return ImageEnhance.Brightness(im).enhance(factor), 90
    raise ValueError(f"unknown edit {edit!r}")


def write_copy(src: str, dst: str, edit: str, rng: np.random.Generator) -> str:
    """Save an edited copy of the photo ``src`` as the JPEG ``dst``."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with Image.open(src) as im:
        copy, quality = edited(im, edit, rng)
    copy.save(dst, "JPEG", quality=quality)
    return dst


def stray(rng: np.random.Generator) -> Image.Image:
    """An image of neither class: shapes, lines and blur over a colour gradient with noise, each drawn differently."""
    w, h = (int(v) for v in rng.integers(160, 400, size=2))
    top, bottom = rng.integers(0, 256, size=(2, 3))
    ramp = np.linspace(0, 1, h)[:, None, None]
    pixels = top * (1 - ramp) + bottom * ramp + rng.normal(0, rng.uniform(2, 40), size=(h, w, 3))
    im = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 12))):
        box = sorted(rng.integers(0, w, size=2).tolist()) + sorted(rng.integers(0, h, size=2).tolist())
        x0, x1, y0, y1 = box
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        kind = rng.integers(0, 4)
        if kind == 0:
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif kind == 2:
            draw.line([x0, y0, x1, y1], fill=fill, width=int(rng.integers(1, 12)))
        else:
            draw.polygon([tuple(int(v) for v in (rng.integers(0, w), rng.integers(0, h))) for _ in range(3)], fill=fill)
    return im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 2))))


def write_strays(folder: str, count: int, rng: np.random.Generator, prefix: str = "stray") -> list[str]:
    """``count`` strays saved as JPEGs in ``folder``; their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"{prefix}.{i}.jpg")
        stray(rng).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def flip(root: str, relpath: str, classes: tuple[str, str]) -> str:
    """Move ``<root>/<split>/<class>/<name>`` into the other class's folder of its split; its new relpath."""
    split, cls, name = relpath.split("/")
    other = classes[1 - classes.index(cls)]
    new = f"{split}/{other}/{name}"
    os.makedirs(os.path.join(root, split, other), exist_ok=True)
    shutil.move(os.path.join(root, relpath), os.path.join(root, new))
    return new
