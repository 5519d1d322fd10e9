"""Online prediction: ``python -m jobs.serve`` on loopback answers real HTTP requests exactly as
``jobs.predict`` answers the same files, refuses bad uploads with 400 and oversized ones with 413,
and keeps serving."""

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

from pipeline import models
from pipeline.config import PredictConfig
from pipeline.modelfile import save_classifier
from pipeline.predict import run_prediction
from tests.conftest import real_images
from tests.images import jpeg_bytes

pytestmark = pytest.mark.timeout(600)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 48
CLASSES = ["cats", "dogs"]
UPLOAD_LIMIT_MB = 0.25


def post(url: str, data: bytes, content_type: str = "application/octet-stream") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    try:
        return status, json.loads(body)
    except ValueError:  # Serve's proxy answers in plain text until the application is up
        return status, {"text": body.decode(errors="replace")}


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
                             "--max-upload-mb", str(UPLOAD_LIMIT_MB)], cwd=REPO, start_new_session=True,
                            env={**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address},
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
