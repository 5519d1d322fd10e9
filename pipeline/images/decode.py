"""The one preprocessing path from an image file to a fixed-size RGB uint8 array, for extraction,
training, prediction and serving alike (the weights' normalisation lives inside the Keras models).

Plain RGB or greyscale JPEGs take a fast path with Pillow's very pixels at about twice its speed:
``simplejpeg`` (libjpeg-turbo) at the DCT scale Pillow's ``draft`` would pick, then
``pipeline.images.resample``. simplejpeg, not OpenCV: its strict mode raises on a truncated or
corrupt stream (the file falls back to Pillow) where OpenCV fills the photo with grey.

Files are hostile until decoded: only ``FORMATS`` are opened, a header declaring more than
``max_pixels`` pixels is rejected before any is decoded, a JPEG whose data ends early is "truncated"
on both paths, and no step makes a full-size float or 16-bit copy, so one decode adds at most
10 B x ``max_pixels`` + the file's bytes to its process: under 1 GiB at the default
(``tests/test_hostile_images.py``).
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image, ImageFile, ImageOps

from pipeline import names
from pipeline.data import storage
from pipeline.images.resample import resize_bilinear

# Truncated files must be rejected, never half-decoded into grey pixels.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# The only Pillow decoders a file may reach (JPEG's opens phones' MPO files too). EPS would hand
# the file to Ghostscript, an interpreter, and no other format is one a photo collection needs.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")
_JPEG_FORMATS = ("JPEG", "MPO")
# 50 megapixels admits a 48-Mpx phone photo (8000x6000) and refuses 9400x9400 (88 Mpx), which
# Pillow's own bomb limit (89.5 Mpx, Image.MAX_IMAGE_PIXELS) still lets through; it bounds what
# one decode holds (module docstring). Above Pillow's limit, Pillow refuses.
MAX_IMAGE_MEGAPIXELS = 50.0
PILLOW_LIMIT_MEGAPIXELS = 89.478485
# Images whose header declares more pixels are rejected before decoding (``--max-image-megapixels``).
MAX_PIXELS = round(MAX_IMAGE_MEGAPIXELS * 1_000_000)
# Pillow holds at most 9 bytes a pixel while decoding (a PNG palette with transparency: the palette image, its
# RGBA form, the white background), libwebp about 16 (canvas, previous frame, their bytes): a WebP may have half.
_PIXEL_WEIGHT = {"WEBP": 2}
# How many images each path ("fast" or "pillow") decoded in this process: shows that the fast path runs.
DECODED_BY: Counter[str] = Counter()
# 16-bit images are scaled to 8 bits this many pixels at a time (a 4 MiB int32 strip).
_STRIP_PIXELS = 1 << 20
_EXIF_ORIENTATION = 0x0112


class DecodeError(Exception):
    """A file that cannot become an image; ``reason`` is a short category for the rejects file."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def max_file_bytes(max_pixels: int) -> int:
    """The largest file that can hold an image of at most ``max_pixels`` pixels: 4 bytes a pixel
    (an uncompressed 32-bit BMP; every allowed format stores less) plus 1 MiB of metadata."""
    return 4 * max_pixels + 2**20


def read_bytes(path: str, max_pixels: int = MAX_PIXELS) -> bytes:
    """The raw bytes of a local path or a pyarrow filesystem URI (``s3://…``), given in the stored
    form of ``pipeline.names``; a file over ``max_file_bytes(max_pixels)`` is the reject "too
    large" and is never read into memory (a video or disk image under a photo's name)."""
    try:
        return storage.read_bytes(names.os_path(path), limit=max_file_bytes(max_pixels))
    except storage.FileTooLarge as exc:
        raise DecodeError("too large", f"a file of {exc.size} bytes; no image of at most {max_pixels / 1e6:g} Mpx "
                                       f"(--max-image-megapixels) takes more than {exc.limit}") from exc
    except (IsADirectoryError, storage.NotARegularFile) as exc:
        raise DecodeError("not a file", exc.strerror or type(exc).__name__) from exc
    except FileNotFoundError as exc:
        raise DecodeError("missing", f"{exc.strerror or exc} (a broken symlink or a file removed during the run)") from exc
    except OSError as exc:
        # The OS error's text names the path in the OS's form, which need not be UTF-8.
        raise DecodeError("unreadable", f"{type(exc).__name__}: {exc.strerror or exc.errno}") from exc


def _sixteen_to_eight(im: Image.Image) -> Image.Image:
    """A 16-bit greyscale image (PNG's only 16-bit mode in Pillow) as "L", v becoming round(v * 255 / 65535):
    Pillow's convert clips at 255 (a white image); here integers, a strip at a time, the only full-size copy 8-bit."""
    width, height = im.size
    out = np.empty((height, width), np.uint8)
    rows = max(1, _STRIP_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        strip = np.asarray(im.crop((0, top, width, min(top + rows, height))), dtype=np.int32)
        out[top:top + rows] = (strip + 128) // 257  # 65535 / 255 = 257; integer v never lies on a tie
    return Image.fromarray(out)


def _flattened(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit "L" or "RGB": 16-bit scaled, palettes expanded, alpha composited on white. Greyscale stays
    one byte a pixel (RGB takes four) until resized: resizing is per channel, so the pixels are the same."""
    if im.mode.startswith("I;16"):
        return _sixteen_to_eight(im)
    if im.mode == "1":
        return im.convert("L")
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode in ("LA", "RGBA"):
        background = Image.new(im.mode[:-1], im.size, "white")
        background.paste(im, mask=im)  # the mask is the image's alpha band: no copy of it
        return background
    return im if im.mode in ("L", "RGB") else im.convert("RGB")


# How ``ImageOps.exif_transpose`` turns a photo of each EXIF orientation (2-8), as numpy views.
_TURNS = {
    2: lambda p: p[:, ::-1],
    3: lambda p: p[::-1, ::-1],
    4: lambda p: p[::-1],
    5: lambda p: p.transpose(1, 0, 2),
    6: lambda p: np.rot90(p, -1),
    7: lambda p: p[::-1, ::-1].transpose(1, 0, 2),
    8: lambda p: np.rot90(p, 1),
}


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
    pixels = _strict_jpeg(data, im, "RGB", height, width)
    if pixels is None or pixels.shape[:2] != (height, width):
        return None
    turn = _TURNS.get(im.getexif().get(_EXIF_ORIENTATION, 1))
    return resize_bilinear(turn(pixels) if turn else pixels, (image_size, image_size))


def _strict_jpeg(data: bytes, im: Image.Image, colorspace: str, height: int, width: int) -> np.ndarray | None:
    """simplejpeg's strict decode at the smallest DCT scale of at least ``width`` x ``height``: "truncated" when
    libjpeg-turbo says the data ends before its pixels do; None for any other complaint (corrupt or unusual:
    Pillow decides, as it always has)."""
    try:
        return simplejpeg.decode_jpeg(data, colorspace, min_height=height, min_width=width)
    except ValueError as exc:
        if "premature end" in str(exc).lower():
            raise DecodeError("truncated", f"the data ends before the {im.size[0]}x{im.size[1]} pixels its header "
                                           f"declares (libjpeg-turbo: {exc})") from exc
        return None


def _pillow_decode(im: Image.Image, image_size: int) -> np.ndarray:
    """Every other file: Pillow decodes (at a reduced DCT scale for JPEGs), turns and resizes."""
    im.draft("RGB", (image_size, image_size))
    # In place: no full-size copy when there is nothing to turn, and the turned one replaces the original.
    ImageOps.exif_transpose(im, in_place=True)
    flat = _flattened(im)
    if flat.size != (image_size, image_size):
        flat = flat.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(flat.convert("RGB"), dtype=np.uint8)


def _check_size(im: Image.Image, max_pixels: int) -> None:
    """Reject an image whose header declares more than ``max_pixels`` pixels, before any is decoded."""
    width, height = im.size
    weight = _PIXEL_WEIGHT.get(im.format, 1)
    if width * height * weight > max_pixels:
        limit = f"{max_pixels / weight / 1e6:g} Mpx" + (f" for {im.format}" if weight > 1 else "")
        raise DecodeError("too large", f"{width}x{height} pixels ({width * height / 1e6:.1f} Mpx) is over the "
                                       f"limit of {limit} (--max-image-megapixels)")


def _unidentified(data: bytes) -> DecodeError:
    """The reject of a file none of ``FORMATS`` opens: which other format it is, if Pillow or PDF knows it.
    Only the formats' signature checks run, never their plugins, on 16 bytes as ``Image.open`` gives them
    (some fail on fewer)."""
    Image.init()
    prefix = data[:16]
    known = [name for name, (_, accept) in Image.OPEN.items()
             if name not in FORMATS and accept and len(prefix) == 16 and accept(prefix)]
    known += ["PDF"] if prefix.startswith(b"%PDF") else []
    if known:
        return DecodeError("unsupported format", f"{known[0]} (only {', '.join(FORMATS)} files are decoded)")
    return DecodeError("not an image", "Pillow cannot identify the file format")


def decode_image(data: bytes, image_size: int, fast_jpeg: bool = True, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Image bytes as an ``(image_size, image_size, 3)`` uint8 RGB array, EXIF-oriented, alpha composited on
    white, 16-bit scaled, an animation's first frame, resized to a square as ``flow_from_directory`` does;
    ``fast_jpeg=False`` decodes JPEGs with Pillow alone (for benchmarks and checks)."""
    if not data:
        raise DecodeError("empty file", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as im:
                _check_size(im, max_pixels)
                fast = _fast_jpeg(data, im, image_size) if fast_jpeg else None
                if fast is not None:
                    DECODED_BY["fast"] += 1
                    return fast
                if im.format in _JPEG_FORMATS:
                    # Pillow decodes a JPEG whose data stops early into grey pixels (libjpeg only warns, and Pillow
                    # discards its warnings): the strict decode at 1/8 scale (DC coefficients only) costs the
                    # entropy decoding alone.
                    _strict_jpeg(data, im, "CMYK" if im.mode == "CMYK" else "RGB", 1, 1)
                pixels = _pillow_decode(im, image_size)
                DECODED_BY["pillow"] += 1
                return pixels
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError("too large", str(exc)) from exc
    except Image.UnidentifiedImageError as exc:
        raise _unidentified(data) from exc
    except DecodeError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        message = str(exc) or type(exc).__name__
        reason = "truncated" if "truncated" in message.lower() else "corrupt"
        raise DecodeError(reason, message) from exc


def load_image(path: str, image_size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read and decode one file (see ``decode_image``)."""
    return decode_image(read_bytes(path, max_pixels), image_size, max_pixels=max_pixels)


def rejection(exc: Exception) -> tuple[str, str]:
    """The (reason, detail) recorded for a file whose decoding raised ``exc``."""
    if isinstance(exc, DecodeError):
        return exc.reason, exc.detail
    return "corrupt", f"{type(exc).__name__}: {exc}"


def decode_batch(batch: dict[str, Any], image_size: int, max_pixels: int = MAX_PIXELS) -> dict[str, Any]:
    """Ray Data batch function: every ``path`` of a batch gains ``image`` (zeros when the file failed), ``reason``
    and ``error`` (empty when it decoded). One bad file never raises: failed rows stay in the stream so that the
    sink records every reject and can count that no row was lost."""
    paths = batch["path"]
    n = len(paths)
    images = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    reasons = np.full(n, "", dtype=object)
    errors = np.full(n, "", dtype=object)
    for i, path in enumerate(paths):
        try:
            images[i] = load_image(str(path), image_size, max_pixels)
        except Exception as exc:  # noqa: BLE001 - one odd file must never fail the whole job
            reasons[i], errors[i] = rejection(exc)
    return {**batch, "image": images, "reason": reasons, "error": errors}
