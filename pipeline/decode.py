"""The one preprocessing path from an image file to a fixed-size RGB uint8 array.

Extraction, training, prediction and serving all call ``load_image``/``decode_batch``;
the weight-specific normalisation (torch or caffe style) lives inside the Keras models,
so the arrays produced here are plain 0..255 RGB pixels.

JPEGs take a fast path that gives the same pixels as Pillow, about twice as fast
(``bench/decode_throughput.py``): libjpeg-turbo through ``simplejpeg`` decodes at the DCT
scale Pillow's ``draft`` would pick (Pillow bundles libjpeg-turbo too, so the pixels are
identical), and ``pipeline.resample`` resizes exactly as Pillow does, three times faster.
``simplejpeg`` (a 0.4 MB wheel for Linux x86-64 and aarch64, kept current with
libjpeg-turbo) was chosen over OpenCV because its strict mode raises on a truncated or
corrupt stream: such files fall back to Pillow and are accepted or rejected exactly as
before, where OpenCV fills a truncated photo with grey and says nothing. Faster resizes
(OpenCV's linear or area) were measured and refused: they moved VGG16's features of some
real photos to a cosine of 0.93-0.99. Everything that is not a plain RGB or greyscale
JPEG (PNG, WebP, GIF, BMP, CMYK, 16-bit, alpha) goes through Pillow as before.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image, ImageFile, ImageOps

from pipeline.resample import resize_bilinear

# Truncated files must be rejected, never half-decoded into grey pixels.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_EXIF_ORIENTATION = 0x0112


class DecodeError(Exception):
    """A file that cannot become an image; ``reason`` is a short category for the rejects file."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def read_bytes(path: str) -> bytes:
    """The raw bytes of a local path or a pyarrow filesystem URI (``s3://…``)."""
    from pipeline import storage

    try:
        return storage.read_bytes(path)
    except IsADirectoryError as exc:
        raise DecodeError("not a file", str(exc)) from exc
    except FileNotFoundError as exc:
        raise DecodeError("missing", f"{exc.strerror or exc} (a broken symlink or a file removed during the run)") from exc
    except PermissionError as exc:
        raise DecodeError("unreadable", str(exc)) from exc
    except OSError as exc:
        raise DecodeError("unreadable", str(exc)) from exc


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in _SIXTEEN_BIT_MODES:
        # Pillow's convert("RGB") clips 16-bit values at 255 (a white image); scale instead.
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 or im.mode != "I" else 255.0
        im = Image.fromarray(np.clip(arr * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


# How ``ImageOps.exif_transpose`` turns a photo of each EXIF orientation, as numpy views.
_TURNS = {
    2: lambda p: p[:, ::-1],
    3: lambda p: p[::-1, ::-1],
    4: lambda p: p[::-1],
    5: lambda p: p.transpose(1, 0, 2),
    6: lambda p: np.rot90(p, -1),
    7: lambda p: p[::-1, ::-1].transpose(1, 0, 2),
    8: lambda p: np.rot90(p, 1),
}


def _oriented(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """A view of ``pixels`` as ``ImageOps.exif_transpose`` would turn them (EXIF orientations 1-8)."""
    turn = _TURNS.get(orientation)
    return turn(pixels) if turn else pixels


def _draft_scale(im: Image.Image, image_size: int) -> int:
    """The DCT scale (1, 2, 4 or 8) that Pillow's ``JpegImageFile.draft`` picks for this target."""
    most = min(im.size[0] // image_size, im.size[1] // image_size)
    return next(s for s in (8, 4, 2, 1) if most >= s or s == 1)


def _fast_jpeg(data: bytes, im: Image.Image, image_size: int) -> np.ndarray | None:
    """The fast path for a plain RGB or greyscale JPEG; None hands the file to Pillow."""
    if im.format != "JPEG" or im.mode not in ("RGB", "L"):
        return None
    scale = _draft_scale(im, image_size)
    width, height = (-(-side // scale) for side in im.size)
    try:
        pixels = simplejpeg.decode_jpeg(data, "RGB", min_height=height, min_width=width)
    except ValueError:
        return None  # truncated, corrupt or unusual: Pillow decides, as it always has
    if pixels.shape[:2] != (height, width):
        return None
    turned = _oriented(pixels, im.getexif().get(_EXIF_ORIENTATION, 1))
    return resize_bilinear(turned, (image_size, image_size))


def _pillow_decode(im: Image.Image, image_size: int) -> np.ndarray:
    """Every other file: Pillow decodes (at a reduced DCT scale for JPEGs), turns and resizes."""
    im.draft("RGB", (image_size, image_size))
    im = ImageOps.exif_transpose(im)
    im.load()
    rgb = _to_rgb(im)
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def decode_image(data: bytes, image_size: int, fast_jpeg: bool = True) -> np.ndarray:
    """Decode image bytes to an ``(image_size, image_size, 3)`` uint8 RGB array.

    EXIF orientation is applied, any mode becomes RGB (alpha composited on white,
    16-bit scaled, first frame of an animation), and the image is resized to a
    square like ``flow_from_directory`` does. JPEGs are decoded at a reduced DCT
    scale when the target is much smaller (``Image.draft``), which is several
    times cheaper and still leaves at least ``image_size`` pixels per side. JPEGs take
    the fast path of the module docstring unless ``fast_jpeg`` is False (Pillow alone, the
    decoder before it: for benchmarks and checks).
    """
    if not data:
        raise DecodeError("empty file", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fast = _fast_jpeg(data, im, image_size) if fast_jpeg else None
                return fast if fast is not None else _pillow_decode(im, image_size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError("too large", str(exc)) from exc
    except Image.UnidentifiedImageError as exc:
        raise DecodeError("not an image", "Pillow cannot identify the file format") from exc
    except DecodeError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        message = str(exc) or type(exc).__name__
        reason = "truncated" if "truncated" in message.lower() else "corrupt"
        raise DecodeError(reason, message) from exc


def load_image(path: str, image_size: int) -> np.ndarray:
    """Read and decode one file (see ``decode_image``)."""
    return decode_image(read_bytes(path), image_size)


def rejection(exc: Exception) -> tuple[str, str]:
    """The (reason, detail) recorded for a file whose decoding raised ``exc``."""
    if isinstance(exc, DecodeError):
        return exc.reason, exc.detail
    return "corrupt", f"{type(exc).__name__}: {exc}"


def decode_batch(batch: dict[str, Any], image_size: int) -> dict[str, Any]:
    """Ray Data batch function: decode every ``path`` of a batch, never raising for one bad file.

    Each row keeps its other columns and gains ``image`` (uint8, zeros when the file
    failed), ``reason`` and ``error`` (empty strings when it decoded). Keeping failed
    rows in the stream, instead of dropping them, is what lets the sink record every
    reject and count that no row was lost.
    """
    paths = batch["path"]
    n = len(paths)
    images = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    reasons = np.full(n, "", dtype=object)
    errors = np.full(n, "", dtype=object)
    for i, path in enumerate(paths):
        try:
            images[i] = load_image(str(path), image_size)
        except Exception as exc:  # noqa: BLE001 - one odd file must never fail the whole job
            reasons[i], errors[i] = rejection(exc)
    out = dict(batch)
    out["image"] = images
    out["reason"] = reasons
    out["error"] = errors
    return out
