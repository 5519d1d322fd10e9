"""The one preprocessing path: every odd file either decodes correctly or gets a reason."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.images.decode import DECODED_BY, DecodeError, decode_batch, decode_image, load_image
from tests.images import bad_files, half_split_image, jpeg_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZE = 32


def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def test_rgb_jpeg_is_resized_to_a_square():
    out = decode_image(jpeg_bytes((10, 200, 30), size=(640, 480)), SIZE)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - (10, 200, 30)).max() <= 6


def test_exif_rotated_jpeg_is_turned_upright():
    im = half_split_image()  # 80x40: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": viewers show red on top
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif, quality=95)
    out = decode_image(buf.getvalue(), SIZE).astype(int)
    top, bottom = out[: SIZE // 4].mean(axis=(0, 1)), out[-SIZE // 4:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60, "red half must be on top after EXIF orientation"
    assert bottom[2] > 200 and bottom[0] < 60


def test_png_alpha_is_composited_on_white():
    im = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    im.paste((0, 128, 0, 255), (0, 0, 10, 20))
    out = decode_image(png_bytes(im), 20).astype(int)
    assert (out[:, :8] == (0, 128, 0)).all()
    assert (out[:, 12:] == 255).all()


def test_grey_png_with_alpha_is_composited_like_its_rgba_form():
    rng = np.random.default_rng(5)
    grey, alpha = (Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8)) for _ in range(2))
    alpha.putpixel((0, 0), 0)
    la, rgba = Image.merge("LA", (grey, alpha)), Image.merge("RGBA", (grey, grey, grey, alpha))
    out = decode_image(png_bytes(la), 20)
    assert (out == decode_image(png_bytes(rgba), 20)).all()
    assert (decode_image(png_bytes(la), 40)[0, 0] == 255).all(), "a transparent pixel is white"


def test_palette_gif_with_transparency_and_animated_gif_first_frame():
    frames = [Image.new("P", (16, 16), i) for i in (1, 2)]
    for f in frames:
        f.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    out = decode_image(buf.getvalue(), 16)
    assert (out == (255, 0, 0)).all(), "first frame (red) expected"
    transparent = Image.new("P", (16, 16), 1)
    transparent.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    buf = io.BytesIO()
    transparent.save(buf, "GIF", transparency=1)
    assert (decode_image(buf.getvalue(), 16) == 255).all(), "transparent pixels become white"


def test_16_bit_png_is_scaled_not_clipped():
    arr = np.full((8, 8), 32768, np.uint16)
    out = decode_image(png_bytes(Image.fromarray(arr)), 8)
    assert np.abs(out.astype(int) - 128).max() <= 1


def test_grayscale_cmyk_and_one_pixel():
    gray = decode_image(jpeg_bytes(100, mode="L"), SIZE).astype(int)
    assert np.abs(gray - 100).max() <= 3 and gray.shape == (SIZE, SIZE, 3)
    cmyk = decode_image(jpeg_bytes((0, 255, 255, 0), mode="CMYK"), SIZE).astype(int)
    assert cmyk[..., 0].mean() > 200 and cmyk[..., 1:].mean() < 60, "CMYK cyan=0, magenta+yellow=full is red"
    tiny = decode_image(png_bytes(Image.new("RGB", (1, 1), (1, 2, 3))), SIZE)
    assert (tiny == (1, 2, 3)).all()


def test_decompression_bomb_is_rejected(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DecodeError) as err:
        decode_image(png_bytes(Image.new("RGB", (100, 100))), SIZE)
    assert err.value.reason == "too large"


def test_bad_files_get_reasons(tmp_path):
    expected = bad_files(str(tmp_path))
    for name, reason in expected.items():
        with pytest.raises(DecodeError) as err:
            load_image(os.path.join(tmp_path, name), SIZE)
        assert err.value.reason == reason, name
    with pytest.raises(DecodeError) as err:
        load_image(os.path.join(tmp_path, "folder.jpg"), SIZE)
    assert err.value.reason == "not a file"


def test_file_without_read_permission():
    """Root reads any file, so the read runs in a child process whose effective user is 'nobody'."""
    import tempfile

    folder = tempfile.mkdtemp(prefix="ric-perm-", dir="/tmp")
    try:
        os.chmod(folder, 0o755)
        path = os.path.join(folder, "secret.jpg")
        with open(path, "wb") as f:
            f.write(jpeg_bytes())
        os.chmod(path, 0)
        # A fresh interpreter, not a fork of this one (which runs Ray's and TensorFlow's threads).
        # Imports first: once it is 'nobody', the interpreter may not read all of its own modules.
        code = ("import os, sys\nimport pipeline.data.storage\nfrom pipeline.images.decode import DecodeError, load_image\n"
                "if os.geteuid() == 0:\n    os.seteuid(65534)\n"
                "try:\n    load_image(sys.argv[1], int(sys.argv[2]))\n    print('decoded')\n"
                "except DecodeError as exc:\n    print(exc.reason)\n")
        proc = subprocess.run([sys.executable, "-c", code, path, str(SIZE)], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        reason = proc.stdout.strip() or proc.stderr[-2000:]
        assert reason == "unreadable"
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def test_decode_batch_keeps_every_row(tmp_path):
    good = tmp_path / "good image ü.JPG"
    good.write_bytes(jpeg_bytes())
    bad_files(str(tmp_path))
    paths = [str(good)] + [str(tmp_path / n) for n in ("empty.jpg", "page.jpg")]
    out = decode_batch({"path": np.array(paths, dtype=object)}, SIZE)
    assert out["image"].shape == (3, SIZE, SIZE, 3)
    assert list(out["reason"]) == ["", "empty file", "not an image"]
    assert out["image"][0].mean() > 0


def pillow_reference(data: bytes, size: int) -> np.ndarray:
    """What the decoder did before its fast JPEG path: Pillow alone, draft, turn, bilinear resize."""
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (size, size))
        im = ImageOps.exif_transpose(im).convert("RGB")
        return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def quadrants(width: int, height: int) -> Image.Image:
    """Four differently coloured quadrants with a gradient: any flip or turn changes the pixels."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.zeros((height, width, 3), np.uint8)
    arr[..., 0] = np.where(x < width // 2, 230, 20)
    arr[..., 1] = np.where(y < height // 3, 220, 30)
    arr[..., 2] = (x * 255 // max(width - 1, 1)).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_fast_jpeg_path_turns_like_pillow_for_every_exif_orientation(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    quadrants(400, 260).save(buf, "JPEG", exif=exif, quality=95)
    ours = decode_image(buf.getvalue(), 48).astype(float)
    reference = pillow_reference(buf.getvalue(), 48).astype(float)
    assert (ours == reference).all(), f"orientation {orientation} turned differently from Pillow"


@pytest.mark.parametrize("size,subsampling,progressive", [((4000, 3000), 2, False), ((151, 900), 0, True),
                                                          ((150, 150), 1, False), ((40, 30), 2, False)])
def test_fast_jpeg_path_resizes_like_pillow(size, subsampling, progressive):
    buf = io.BytesIO()
    quadrants(*size).save(buf, "JPEG", quality=90, subsampling=subsampling, progressive=progressive)
    ours = decode_image(buf.getvalue(), 150).astype(float)
    assert ours.shape == (150, 150, 3)
    assert (ours == pillow_reference(buf.getvalue(), 150)).all()


def test_plain_jpegs_take_the_fast_path_and_the_rest_pillow():
    """The fast path must be the one that runs: pixels alone cannot tell, as it gives Pillow's."""
    before = DECODED_BY.copy()
    decode_image(jpeg_bytes(size=(640, 480)), SIZE)
    decode_image(jpeg_bytes(100, size=(640, 480), mode="L"), SIZE)
    decode_image(jpeg_bytes((0, 255, 255, 0), mode="CMYK"), SIZE)
    decode_image(jpeg_bytes(size=(640, 480)), SIZE, fast_jpeg=False)
    decode_image(png_bytes(Image.new("RGB", (40, 30))), SIZE)
    assert DECODED_BY - before == {"fast": 2, "pillow": 3}


def test_truncated_jpeg_is_still_rejected_mid_scan():
    whole = io.BytesIO()
    quadrants(640, 480).save(whole, "JPEG", quality=90)
    cut = whole.getvalue()[: len(whole.getvalue()) * 2 // 3]
    with pytest.raises(DecodeError) as err:
        decode_image(cut, 150)
    assert err.value.reason == "truncated", "a half-decoded photo must not pass as an image with grey pixels"


@pytest.mark.slow
def test_real_photos_keep_their_features(real_root):
    """The fast path moves pixels slightly; VGG16's features of real photos must not move (cosine >= 0.995)."""
    from pipeline.nets import weights
    from pipeline.nets.models import feature_extractor

    paths = sorted(os.path.join(d, f) for d, _, names in os.walk(real_root) for f in names)[:24]
    model = feature_extractor(150, weights.load_weight_arrays(weights.resolve_weights("torchvision"), 150),
                              "torch", "float32")
    datas = [open(p, "rb").read() for p in paths]
    ours = model.predict(np.stack([decode_image(d, 150) for d in datas]), verbose=0).reshape(len(datas), -1)
    before = model.predict(np.stack([pillow_reference(d, 150) for d in datas]), verbose=0).reshape(len(datas), -1)
    cosine = (ours * before).sum(axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(before, axis=1))
    assert cosine.min() >= 0.995, f"min cosine {cosine.min():.4f} over {len(datas)} real photos"
