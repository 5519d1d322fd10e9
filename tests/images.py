"""Builders for the odd image files that real photo collections contain."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


def jpeg_bytes(color=(200, 30, 30), size=(64, 48), mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "JPEG", **save)
    return buf.getvalue()


def write(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def bad_files(folder: str) -> dict[str, str]:
    """Write one file of each undecodable kind into ``folder``; returns name → expected reason."""
    write(os.path.join(folder, "empty.jpg"), b"")
    write(os.path.join(folder, "truncated.jpg"), jpeg_bytes(size=(300, 300))[:400])
    write(os.path.join(folder, "page.jpg"), b"<html><body>not an image</body></html>")
    os.symlink(os.path.join(folder, "does-not-exist.jpg"), os.path.join(folder, "broken link.jpg"))
    os.makedirs(os.path.join(folder, "folder.jpg"))
    return {"empty.jpg": "empty file", "truncated.jpg": "truncated", "page.jpg": "not an image",
            "broken link.jpg": "missing"}


def half_split_image(size=(80, 40)) -> Image.Image:
    """Left half red, right half blue: orientation is visible in the pixels."""
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:, : size[0] // 2] = (255, 0, 0)
    arr[:, size[0] // 2:] = (0, 0, 255)
    return Image.fromarray(arr, "RGB")
