"""Builders of hostile image files for the decoder: huge declared sizes in small files, foreign formats, cut data.

PNGs are written chunk by chunk with a streamed zlib, so a 9400x9400 16-bit image costs the test
a few hundred KB of memory and file, not the 170 MB its pixels would.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

# PNG colour types (ISO 15948, IHDR).
GREY, RGB, PALETTE, GREY_ALPHA, RGBA = 0, 2, 3, 4, 6
_CHANNELS = {GREY: 1, RGB: 3, PALETTE: 1, GREY_ALPHA: 2, RGBA: 4}


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body and CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def flat_png(width: int, height: int, color_type: int, bit_depth: int = 8, value: int = 0,
             extra: bytes = b"") -> bytes:
    """A PNG of ``width`` x ``height`` pixels all of sample ``value`` (every channel), compressed row by row.

    ``extra`` chunks (PLTE, tRNS, eXIf) go before the image data.
    """
    sample = value.to_bytes(bit_depth // 8, "big")
    row = b"\0" + sample * (width * _CHANNELS[color_type])  # filter type 0 (none)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + extra + png_chunk(b"IDAT", repeated_deflate(row, height))
            + png_chunk(b"IEND", b""))


def repeated_deflate(unit: bytes, count: int) -> bytes:
    """A zlib stream of ``unit * count``, compressing ``unit`` once (deflating 170 MB took seconds).

    A raw deflate block flushed with Z_FULL_FLUSH refers to nothing before it, so the same bytes
    repeated are a valid stream; a final empty block and the Adler-32 of the whole close it.
    """
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = packer.compress(unit) + packer.flush(zlib.Z_FULL_FLUSH)
    checksum = 1
    for _ in range(count):
        checksum = zlib.adler32(unit, checksum)
    return b"\x78\xda" + block * count + b"\x03\x00" + struct.pack(">I", checksum)


def palette_chunks(transparent_index: int | None = 0) -> bytes:
    """A 256-colour grey palette and, optionally, one fully transparent entry."""
    plte = png_chunk(b"PLTE", bytes(c for i in range(256) for c in (i, i, i)))
    if transparent_index is None:
        return plte
    return plte + png_chunk(b"tRNS", b"\xff" * transparent_index + b"\0")


def exif_chunk(orientation: int) -> bytes:
    """A PNG eXIf chunk carrying an EXIF orientation."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return png_chunk(b"eXIf", exif.tobytes())


def jpeg_with_declared_size(width: int, height: int, data_side: int = 16, mode: str = "RGB") -> bytes:
    """A JPEG whose frame header declares ``width`` x ``height`` but whose scan holds ``data_side`` pixels square."""
    noise = np.random.default_rng(0).integers(0, 256, (data_side, data_side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).convert(mode).save(buf, "JPEG", quality=90)
    out = bytearray(buf.getvalue())
    sof = out.find(b"\xff\xc0")  # baseline frame header: length(2) precision(1) height(2) width(2)
    struct.pack_into(">HH", out, sof + 5, height, width)
    return bytes(out)


# Minimal documents in formats that need an interpreter or are no images at all.
POSTSCRIPT = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
PDF = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\n"
       b"trailer<</Root 1 0 R>>\n%%EOF\n")
