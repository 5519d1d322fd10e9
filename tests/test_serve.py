"""Online prediction: ``python -m jobs.serve`` on loopback answers real HTTP requests exactly as
``jobs.predict`` answers the same files, refuses bad uploads with 400 and oversized ones with 413,
requests without its token with 401, decodes huge images without holding up small ones, and keeps
serving."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.batch.predict import run_prediction
from pipeline.config import PredictConfig
from pipeline.nets import models
from pipeline.nets.modelfile import save_classifier
from pipeline.serving.auth import TOKEN_ENV
from tests.conftest import real_images
from tests.image_bombs import RGB, flat_png
from tests.images import jpeg_bytes

pytestmark = pytest.mark.timeout(600)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 48
CLASSES = ["cats", "dogs"]
UPLOAD_LIMIT_MB = 1.0
MAX_IMAGES = 8
# Above the default (50), so that the 88-Mpx images below decode.
MAX_MEGAPIXELS = 89
TOKEN = "test-token-0123456789"


def post(url: str, data: bytes, content_type: str = "application/octet-stream",
         token: str | None = TOKEN) -> tuple[int, dict]:
    status, body, _ = post_with_headers(url, data, content_type, token)
    return status, body


def post_with_headers(url: str, data: bytes, content_type: str, token: str | None) -> tuple[int, dict, dict]:
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, body, answered = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        status, body, answered = exc.code, exc.read(), dict(exc.headers)
    try:
        return status, json.loads(body), answered
    except ValueError:  # Serve's proxy answers in plain text until the application is up
        return status, {"text": body.decode(errors="replace")}, answered


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    """A small untrained CNN saved as the training jobs save models, six real photos, and the
    serving job started on them in its own process, attached to the session's cluster."""
    import keras

    keras.utils.set_random_seed(5)
    folder = tmp_path_factory.mktemp("serve")
    model = str(folder / "model.keras")
    save_classifier(models.scratch_cnn(SIZE, 2), model, {"kind": "scratch", "classes": CLASSES, "image_size": SIZE})
    photos = folder / "photos"
    for cls in CLASSES:
        os.makedirs(photos / cls)
        for path in real_images("validation", cls, 3):
            shutil.copyfile(path, photos / cls / os.path.basename(path))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.serve", "--model", model, "--port", str(port),
                             "--max-upload-mb", str(UPLOAD_LIMIT_MB), "--max-images-per-request", str(MAX_IMAGES),
                             "--max-image-megapixels", str(MAX_MEGAPIXELS)], cwd=REPO, start_new_session=True,
                            env={**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
                                 TOKEN_ENV: TOKEN},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/predict"
    _wait_until_serving(url, proc, photos / "cats")
    yield url, model, str(photos)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]
    with pytest.raises(OSError):  # Ctrl-C took the application down with it
        post(url, b"x")


def _wait_until_serving(url: str, proc: subprocess.Popen, photos) -> None:
    photo = (photos / sorted(os.listdir(photos))[0]).read_bytes()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"jobs.serve exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            if post(url, photo)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    proc.kill()
    pytest.fail("jobs.serve did not answer within 240 s")


def test_answers_equal_batch_prediction_one_by_one_and_batched(server, tmp_path):
    url, model, photos = server
    table = pq.read_table(run_prediction(PredictConfig(model=model, input=photos, output=str(tmp_path / "p.parquet")))
                          ["output"]).to_pylist()
    assert len(table) == 6
    files = [os.path.join(photos, row["path"]) for row in table]
    # Sent all at once, so the replica batches them.
    with ThreadPoolExecutor(len(files)) as pool:
        single = list(pool.map(lambda path: post(url, open(path, "rb").read()), files))
    assert [status for status, _ in single] == [200] * len(files)
    status, batched = post(url, json.dumps({"images": [base64.b64encode(open(p, "rb").read()).decode()
                                                       for p in files]}).encode(), "application/json")
    assert status == 200
    for row, (_, answer), from_batch in zip(table, single, batched["predictions"]):
        for got in (answer, from_batch):
            assert set(got) == {"predicted_class", "confidence", "prob_cats", "prob_dogs"}
            assert got["predicted_class"] == row["predicted_class"], row["path"]
            np.testing.assert_allclose([got[k] for k in ("confidence", "prob_cats", "prob_dogs")],
                                       [row[k] for k in ("confidence", "prob_cats", "prob_dogs")], rtol=0, atol=1e-6)


def test_bad_uploads_are_refused_with_the_reason_and_the_server_keeps_serving(server):
    url, _, photos = server
    photo = open(os.path.join(photos, "dogs", sorted(os.listdir(os.path.join(photos, "dogs")))[0]), "rb").read()
    status, answer = post(url, b"<html>not an image</html>")
    assert (status, answer["error"]) == (400, "not an image")
    status, answer = post(url, jpeg_bytes(size=(300, 300))[:400])
    assert (status, answer["error"]) == (400, "truncated")
    status, answer = post(url, b"")
    assert (status, answer["error"]) == (400, "empty file")
    status, answer = post(url, os.urandom(int(UPLOAD_LIMIT_MB * 1024 * 1024) + 1))
    assert (status, answer["error"]) == (413, "too large")
    status, answer = post(url, b'{"images": "not a list of base64', "application/json")
    assert status == 400
    status, answer = post(url, json.dumps({"images": [base64.b64encode(b"junk").decode(),
                                                      base64.b64encode(photo).decode()]}).encode(), "application/json")
    assert status == 200 and answer["predictions"][0]["error"] == "not an image"
    assert answer["predictions"][1]["predicted_class"] in CLASSES
    assert post(url, photo)[0] == 200


def png_bytes(width: int, height: int) -> bytes:
    """A one-colour RGB PNG: a few hundred KB that decode to ``width`` x ``height`` pixels
    (written row by row, never held whole by the test)."""
    return flat_png(width, height, RGB, 8, 120)


def a_photo(photos: str) -> bytes:
    folder = os.path.join(photos, "cats")
    return open(os.path.join(folder, sorted(os.listdir(folder))[0]), "rb").read()


def test_hostile_bodies_are_refused_quickly_with_the_reason_and_the_server_keeps_serving(server):
    url, _, photos = server
    photo = a_photo(photos)
    # "too many images", not "bad base64" (which every entry is): counted before any is decoded.
    status, answer = post(url, json.dumps({"images": ["QUFB"] * 20_000}).encode(), "application/json")
    assert (status, answer["error"]) == (413, "too many images")
    assert f"20000 images; the limit is {MAX_IMAGES}" in answer["detail"]
    status, answer = post(url, b"[" * 100_000 + b"]" * 100_000, "application/json")
    assert (status, answer["error"], answer["detail"]) == (400, "invalid json", "nested too deeply")
    status, answer = post(url, png_bytes(9_440, 9_440), "image/png")  # 89.1 Mpx: under Pillow's limit, over ours
    assert (status, answer["error"]) == (400, "too large")
    assert f"limit of {MAX_MEGAPIXELS} Mpx (--max-image-megapixels)" in answer["detail"]
    status, answer = post(url, photo, "text/plain")
    assert (status, answer["error"]) == (415, "unsupported media type")
    status, answer = post(url, json.dumps({"images": [base64.b64encode(photo).decode()]}).encode(),
                          "Application/JSON; charset=utf-8")
    assert status == 200 and answer["predictions"][0]["predicted_class"] in CLASSES
    assert post(url, photo)[0] == 200


def test_a_request_without_the_token_gets_401_and_with_it_200(server):
    url, _, photos = server
    photo = a_photo(photos)
    for token in (None, "wrong-token", TOKEN[:-1]):
        status, answer, headers = post_with_headers(url, photo, "image/jpeg", token)
        assert (status, answer["error"]) == (401, "unauthorized")
        assert headers.get("www-authenticate", headers.get("WWW-Authenticate")) == "Bearer"
    assert post_with_headers(url, photo, "image/jpeg", TOKEN)[0] == 200


def test_normal_photos_are_answered_while_huge_images_decode(server):
    """Ordering, not time (latency under load is bench/serve_load.py --hostile's figure): with
    decoding on the event loop, no photo is answered before the huge uploads are done."""
    url, _, photos = server
    photo, huge = a_photo(photos), png_bytes(11_000, 8_000)  # 88 Mpx, seconds of decoding each
    answered_meanwhile = 0
    with ThreadPoolExecutor(2) as pool:
        heavy = [pool.submit(post, url, huge, "image/png") for _ in range(2)]
        while not any(f.done() for f in heavy):
            assert post(url, photo)[0] == 200
            answered_meanwhile += not any(f.done() for f in heavy)
        assert [f.result()[0] for f in heavy] == [200, 200]
    assert answered_meanwhile >= 2
