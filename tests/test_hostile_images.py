"""Hostile images: every one is a decoded picture or a reject with its reason, in bounded memory.

Peak memory is read from the kernel (``VmHWM``, reset per case through ``/proc/self/clear_refs``)
in a fresh process: ``ru_maxrss`` would report the larger pytest process that started it, as
Linux keeps a process's peak across ``exec``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.config import ExtractConfig, FinetuneConfig, PredictConfig, ScratchConfig
from pipeline.errors import ConfigError
from pipeline.images import decode
from pipeline.images.decode import MAX_PIXELS, DecodeError, decode_image, load_image, max_file_bytes
from pipeline.runall import RunAllConfig
from tests.image_bombs import (
    GREY,
    GREY_ALPHA,
    PALETTE,
    PDF,
    POSTSCRIPT,
    RGB,
    RGBA,
    flat_png,
    jpeg_with_declared_size,
    palette_chunks,
    png_chunk,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEAR_CAP = 7071  # 7071 x 7071 = 49.998 Mpx, just under the default cap of 50 Mpx
# The bound pipeline/images/decode.py states for what one decode adds to its process: at most 10 bytes
# per allowed pixel, plus the file's bytes (and a little slack for the allocator).
SLACK = 16 * 2**20
BYTES_PER_PIXEL = 10


@pytest.mark.parametrize("fast", [True, False])
def test_sixteen_bit_png_over_the_cap_is_too_large(fast):
    data = flat_png(9400, 9400, GREY, 16, 1000)  # a few hundred KB, 88 Mpx: under Pillow's bomb limit
    assert len(data) < 1_000_000
    with pytest.raises(DecodeError) as err:
        decode_image(data, 224, fast, max_pixels=MAX_PIXELS)
    assert err.value.reason == "too large" and "9400x9400" in err.value.detail


def test_the_cap_is_an_option():
    data = flat_png(300, 200, RGB, 8, 90)
    assert (decode_image(data, 32, max_pixels=60_000) == 90).all()
    with pytest.raises(DecodeError) as err:
        decode_image(data, 32, max_pixels=59_999)
    assert err.value.reason == "too large"


def test_sixteen_bit_png_under_the_cap_is_scaled_to_eight_bits():
    values = np.random.default_rng(3).integers(0, 65536, (64, 64), dtype=np.uint16)
    values[0, :4] = (0, 128, 129, 65535)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "PNG")
    out = decode_image(buf.getvalue(), 64)  # 64 px: no resize, so every pixel is checked
    reference = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)  # no ties occur
    assert (out == reference[..., None]).all()
    assert list(out[0, :4, 0]) == [0, 0, 1, 255]


def test_sixteen_bit_png_decodes_like_its_eight_bit_form():
    grey = np.random.default_rng(4).integers(0, 256, (300, 410), dtype=np.uint8)
    sixteen, eight = io.BytesIO(), io.BytesIO()
    Image.fromarray(grey.astype(np.uint16) * 257).save(sixteen, "PNG")
    Image.fromarray(grey).save(eight, "PNG")
    assert (decode_image(sixteen.getvalue(), 150) == decode_image(eight.getvalue(), 150)).all()


def test_rgb_png_near_the_cap_decodes():
    out = decode_image(flat_png(NEAR_CAP, NEAR_CAP, RGB, 8, 90), 32)
    assert out.shape == (32, 32, 3) and (out == 90).all()
    with pytest.raises(DecodeError) as err:
        decode_image(flat_png(NEAR_CAP + 1, NEAR_CAP, RGB, 8, 90), 32)
    assert err.value.reason == "too large"


@pytest.mark.parametrize("name,data,found", [("poster.jpg", POSTSCRIPT, "EPS"), ("poster.png", POSTSCRIPT, "EPS"),
                                             ("invoice.jpg", PDF, "PDF")], ids=["eps.jpg", "eps.png", "pdf.jpg"])
def test_documents_under_image_names_are_unsupported(tmp_path, name, data, found):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DecodeError) as err:
        load_image(str(path), 32)
    assert err.value.reason == "unsupported format" and err.value.detail.startswith(found)


def test_postscript_never_reaches_its_plugin_or_a_program():
    """No EPS decoder among the formats Pillow may use, and no process started (the audit hook sees every one)."""
    assert "EPS" not in decode.FORMATS
    code = ("import sys\nstarted = []\nsys.addaudithook(lambda event, args: started.append(event) "
            "if event in ('subprocess.Popen', 'os.system', 'os.exec', 'os.posix_spawn') else None)\n"
            "from pipeline.images.decode import DecodeError, decode_image\n"
            "try:\n    decode_image(sys.stdin.buffer.read(), 32)\nexcept DecodeError as exc:\n    print(exc.reason)\n"
            "print(started)\n")
    out = subprocess.run([sys.executable, "-c", code], input=POSTSCRIPT, cwd=REPO, capture_output=True, timeout=120)
    assert out.stdout.decode().split("\n")[:2] == ["unsupported format", "[]"], out.stderr.decode()[-2000:]


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_whose_data_stops_early_is_truncated_on_both_paths(fast, mode):
    """A 16x16 picture under a 4000x3000 header (under the cap): a grey picture before, a reject now."""
    data = jpeg_with_declared_size(4000, 3000, mode=mode)
    with pytest.raises(DecodeError) as err:
        decode_image(data, 224, fast)
    assert err.value.reason == "truncated" and "4000x3000" in err.value.detail


@pytest.mark.parametrize("data,reason", [(b"", "empty file"), (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not an image"),
                                         (b"BM" + b"\0" * 60, "corrupt"), (b"II*\0" + b"\0" * 40, "unsupported format"),
                                         (bytes(range(64)), "not an image")],
                         ids=["zero bytes", "PNG signature only", "BMP of zeros", "TIFF", "no signature"])
def test_odd_bytes_are_rejects(data, reason):
    with pytest.raises(DecodeError) as err:
        decode_image(data, 32)
    assert err.value.reason == reason


def test_animated_gif_at_the_cap_gives_its_first_frame():
    frames = [Image.new("P", (NEAR_CAP, NEAR_CAP), i) for i in (1, 2)]
    for f in frames:
        f.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10] + [0] * (253 * 3))
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert (decode_image(buf.getvalue(), 32) == (200, 10, 10)).all()


def worst_cases(folder) -> dict[str, str]:
    """The files that take the most memory to decode under the default cap, and those it rejects."""
    cases = {
        "16-bit 9400x9400 PNG": flat_png(9400, 9400, GREY, 16, 1000),
        "16-bit PNG at the cap": flat_png(NEAR_CAP, NEAR_CAP, GREY, 16, 1000),
        "grey+alpha PNG at the cap": flat_png(NEAR_CAP, NEAR_CAP, GREY_ALPHA, 8, 90),
        "palette PNG with transparency at the cap": flat_png(NEAR_CAP, NEAR_CAP, PALETTE, 8, 3, palette_chunks(0)),
        "JPEG with a 7000x7000 header": jpeg_with_declared_size(7000, 7000),
    }
    buf = io.BytesIO()
    Image.new("RGBA", (NEAR_CAP, NEAR_CAP // 2), (1, 2, 3, 4)).save(buf, "WEBP", lossless=True, method=0)
    cases["WebP at its cap"] = buf.getvalue()
    buf = io.BytesIO()
    Image.new("RGB", (NEAR_CAP, NEAR_CAP), (1, 2, 3)).save(buf, "BMP")  # uncompressed: 150 MB of file
    cases["BMP at the cap"] = buf.getvalue()
    paths = {}
    for name, data in cases.items():
        paths[name] = os.path.join(folder, f"{len(paths)}.img")
        with open(paths[name], "wb") as f:
            f.write(data)
    # A 4 GiB file under a photo's name (a video, a disk image): sparse, so it costs no disk.
    paths["4 GiB file named .jpg"] = os.path.join(folder, "video.jpg")
    with open(paths["4 GiB file named .jpg"], "wb") as f:
        f.truncate(4 * 2**30)
    return paths


MEASURE = """
import json, sys, time
from pipeline.images.decode import DecodeError, load_image
def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
load_image(sys.argv[1], 224)  # libraries loaded and numba compiled before the first measurement
found = {}
for name, path in json.loads(sys.argv[2]).items():
    open("/proc/self/clear_refs", "w").write("5")  # the peak restarts from the present size
    before = status("VmRSS")
    started = time.time()
    try:
        load_image(path, 224)
        outcome = "decoded"
    except DecodeError as exc:
        outcome = exc.reason
    found[name] = [outcome, status("VmHWM"), time.time() - started, before]
print(json.dumps(found))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak from /proc")
def test_worst_cases_stay_under_the_stated_memory_bound(tmp_path):
    warm = tmp_path / "warm.png"
    warm.write_bytes(flat_png(300, 200, RGB, 8, 90))
    paths = worst_cases(str(tmp_path))
    out = subprocess.run([sys.executable, "-c", MEASURE, str(warm), json.dumps(paths)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout)
    summary = {name: f"{outcome}, {peak / 2**20:.0f} MiB (+{(peak - before) / 2**20:.0f}), {seconds:.1f} s"
               for name, (outcome, peak, seconds, before) in found.items()}
    assert {name: outcome for name, (outcome, *_) in found.items()} == {
        **{name: "decoded" for name in paths}, "16-bit 9400x9400 PNG": "too large",
        "JPEG with a 7000x7000 header": "truncated", "4 GiB file named .jpg": "too large"}, summary
    # The file's own bytes are held during its decode too (at most max_file_bytes: larger ones are never read).
    held = {name: min(os.path.getsize(path), max_file_bytes(MAX_PIXELS)) for name, path in paths.items()}
    # What one decode adds to its process, which itself holds what the libraries take (130 MiB
    # in a fresh one here, more where other tests ran first in the parent: it inherits nothing,
    # but the allocator keeps what earlier cases freed).
    assert all(peak - before <= BYTES_PER_PIXEL * MAX_PIXELS + held[name] + SLACK and peak <= 2**30
               for name, (_, peak, _, before) in found.items()), summary


SMALL_CAP = 4_000_000
# Sides under and over the cap alike: most random pairs of 16-bit sides are over it.
SIDE = st.one_of(st.integers(min_value=0, max_value=2_100), st.integers(min_value=0, max_value=65_535))


def small_file(fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (16, 16), 120).save(buf, fmt)
    return buf.getvalue()


def patched(data: bytes, offset: int, fields: bytes) -> bytes:
    return data[:offset] + fields + data[offset + len(fields):]


@st.composite
def garbled_images(draw) -> bytes:
    """Random bytes, or a small real PNG, JPEG, GIF, BMP or WebP whose size fields say anything."""
    width, height = draw(SIDE), draw(SIDE)
    kind = draw(st.sampled_from(["bytes", "png", "jpeg", "gif", "bmp", "webp"]))
    if kind == "bytes":
        return draw(st.binary(max_size=600))
    if kind == "png":  # IHDR's fields, the CRC made right so that only the values are hostile
        fields = struct.pack(">IIBB", width, height, draw(st.sampled_from([1, 2, 4, 8, 16])),
                             draw(st.sampled_from([GREY, RGB, PALETTE, GREY_ALPHA, RGBA])))
        return flat_png(1, 1, RGB)[:8] + png_chunk(b"IHDR", fields + b"\0\0\0") + draw(st.binary(max_size=200))
    if kind == "jpeg":
        data = small_file("JPEG", draw(st.sampled_from(["RGB", "L", "CMYK"])))
        return patched(data, data.find(b"\xff\xc0") + 5, struct.pack(">HH", height, width))
    if kind == "gif":
        return patched(small_file("GIF", "P"), 6, struct.pack("<HH", width, height))
    if kind == "bmp":
        return patched(small_file("BMP"), 18, struct.pack("<ii", width, draw(st.sampled_from([height, -height]))))
    data = small_file("WEBP")  # lossy VP8: 14-bit sizes at offset 26
    return patched(data, 26, struct.pack("<HH", width & 0x3FFF, height & 0x3FFF))


def rss_peak() -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) * 1024


def rss_now() -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) * 1024


@functools.cache
def warm_decoders() -> None:
    """Decode one small file of each format first: the resampler's first call compiles (numba)
    and libraries load, which is the process's cost, not the input's."""
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "WEBP"):
        for mode in ("RGB", "L"):
            decode_image(small_file(fmt, mode), 32)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak from /proc")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbled_images())
def test_garbled_headers_are_a_picture_or_a_reject_in_bounded_memory(data):
    warm_decoders()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak restarts from the present size
    before = rss_now()
    try:
        out = decode_image(data, 32, max_pixels=SMALL_CAP)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    except DecodeError as exc:
        assert exc.reason in {"empty file", "too large", "truncated", "corrupt", "not an image", "unsupported format"}
    # 64 MiB of slack: this runs in the test process, where the session's Ray threads allocate too.
    assert rss_peak() - before <= BYTES_PER_PIXEL * SMALL_CAP + 64 * 2**20


@pytest.mark.timeout(30)
def test_a_fifo_or_a_device_under_a_photo_name_is_not_a_file(tmp_path):
    os.mkfifo(tmp_path / "fifo.jpg")  # no writer: a blocking open would wait for ever
    os.symlink("/dev/zero", tmp_path / "zeros.jpg")  # endless
    for name in ("fifo.jpg", "zeros.jpg"):
        with pytest.raises(DecodeError) as exc:
            load_image(str(tmp_path / name), 32)
        assert exc.value.reason == "not a file"


@pytest.mark.parametrize("value", [0, -1, 90])
def test_the_cap_option_is_range_checked_before_any_work(value):
    with pytest.raises(ConfigError, match=r"--max-image-megapixels must be in \(0, 89.478485\]"):
        ExtractConfig(max_image_megapixels=value)


def test_every_decoding_job_offers_the_cap():
    for cls in (ExtractConfig, ScratchConfig, FinetuneConfig, PredictConfig, RunAllConfig):
        assert "max_image_megapixels" in {f.name for f in dataclasses.fields(cls)}, cls.__name__
    assert ExtractConfig(max_image_megapixels=12.5).max_pixels == 12_500_000
    assert ExtractConfig().max_pixels == MAX_PIXELS
