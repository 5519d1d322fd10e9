"""Every input and output as a URI: discovery, inputs, outputs and locks on a real S3 server
(moto on loopback), compared with the same trees on local disk; and a store that refuses the credentials,
reported by a job before any work. No Ray cluster needed."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import threading
import time

import pytest
import ray

from pipeline.config import ExtractConfig, PredictConfig
from pipeline.data import locks, storage
from pipeline.data.discover import discover
from pipeline.errors import ConfigError, DataError, OutputError
from pipeline.prechecks import preflight
from pipeline.nets.precision import precision_for
from tests.clusters import s3_client, s3_server, upload_tree
from tests.conftest import make_real_root, real_images

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 server with bucket ``data`` holding a real-photo root (splits layout) and a Kaggle-style flat folder."""
    local = make_real_root(str(tmp_path_factory.mktemp("root")), 2)
    flat = tmp_path_factory.mktemp("flat")
    for i, path in enumerate(real_images("train", "cats", 3) + real_images("train", "dogs", 3)):
        shutil.copyfile(path, flat / f"{'cat' if i < 3 else 'dog'}.{i}.jpg")
    with s3_server(("data",)) as aws:
        saved = {k: os.environ.get(k) for k in aws}
        os.environ.update(aws)
        try:
            upload_tree(aws, local, "data", "photos")
            upload_tree(aws, str(flat), "data", "flat")
            s3_client(aws).put_object(Bucket="data", Key="photos/.hidden/x.jpg", Body=b"hidden")
            yield {"local": local, "flat": str(flat), "aws": aws}
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _summary(index):
    return index.classes, index.files.select(["relpath", "split", "label", "class_name"]).to_pylist()


def test_discovery_on_s3_equals_discovery_on_disk(s3):
    remote = discover("s3://data/photos")
    assert _summary(remote) == _summary(discover(s3["local"]))
    rows = remote.rows()
    assert rows and all(r["path"] == f"s3://data/photos/{r['relpath']}" for r in rows)
    assert all(r["stamp"].split(":")[0] == str(os.path.getsize(os.path.join(s3["local"], r["relpath"]))) for r in rows)
    kaggle = discover("s3://data/flat", layout="kaggle", validation_fraction=0.5)
    assert _summary(kaggle) == _summary(discover(s3["flat"], layout="kaggle", validation_fraction=0.5))


@pytest.mark.parametrize("uri, message", [
    ("s3://no-such-bucket/photos", "its bucket 'no-such-bucket' does not exist"),
    ("s3://data/nothing-here", "it does not exist"),
    ("s3://data/photos/train/cats/cat.1.jpg", "it is a file, not a folder"),
])
def test_unusable_data_uris_are_named_before_any_work(s3, uri, message):
    with pytest.raises(ConfigError, match=f"--data-dir '{uri}' cannot be used: {message}"):
        preflight(ExtractConfig(data_dir=uri))
    with pytest.raises(DataError, match=message):
        discover(uri)


def test_outputs_on_a_missing_bucket_are_refused_before_any_work(s3):
    with pytest.raises(ConfigError, match="--output-dir 's3://nope/x' cannot be written: its bucket 'nope' does not exist"):
        preflight(ExtractConfig(data_dir="s3://data/photos", output_dir="s3://nope/x"))


# What an S3 store answers credentials it refuses (a wrong key, a key without access to the bucket).
ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                 b'<Message>Access Denied</Message><RequestId>0</RequestId></Error>')


class _Refusing(http.server.BaseHTTPRequestHandler):
    """Answers every request 403 AccessDenied, as S3 does, and records what it was asked."""

    def _deny(self):
        self.server.requests.append((self.command, self.path))
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(ACCESS_DENIED)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(ACCESS_DENIED)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _deny

    def log_message(self, *args):
        pass  # the test reads the requests from server.requests, not from stderr


@pytest.fixture
def refusing_store(monkeypatch):
    """An S3 endpoint on loopback that refuses every request; the AWS_* environment points at it, with a key
    pair the test can look for in the job's output. Ray, were the job to reach it, is at a closed port, so a
    job that got past its preflight fails on Ray instead of starting a cluster in this process."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    env = {"AWS_ACCESS_KEY_ID": "AKIAREFUSEDKEY0001", "AWS_SECRET_ACCESS_KEY": "refused/Secret+Key0001",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_address[1]}",
           "RAY_ADDRESS": closed}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    yield server, env
    server.shutdown()
    thread.join()
    server.server_close()


@pytest.mark.parametrize("option", ["--data-dir", "--output-dir"])
def test_a_store_that_refuses_the_credentials_is_reported_before_any_work(refusing_store, tmp_path, option, capsys):
    """The extraction job, started as a user starts it, exits 2 naming the URI and the refusal, without the
    credentials, and Ray is never started; the store was asked (the refusal is the store's, not a guess)."""
    from jobs import extract_features

    server, env = refusing_store
    uri = "s3://photos/cats_and_dogs" if option == "--data-dir" else "s3://photos/features"
    # The other location is local and usable: the refused one alone stops the job.
    other = ["--output-dir", str(tmp_path / "features")] if option == "--data-dir" else \
        ["--data-dir", make_real_root(str(tmp_path / "root"), 1)]
    was_running = ray.is_initialized()
    assert extract_features.main([option, uri, *other, "--weights", "none"]) == 2
    assert ray.is_initialized() == was_running, "the refusal came after Ray started"
    err = capsys.readouterr().err
    assert f"error: {option} '{uri}' cannot be " in err and "ACCESS_DENIED" in err, err
    assert "credentials" in err, err  # says what to check
    assert env["AWS_ACCESS_KEY_ID"] not in err and env["AWS_SECRET_ACCESS_KEY"] not in err, err
    assert server.requests, "the store was never asked"
    assert not (tmp_path / "features").exists()


def test_prediction_globs_on_s3_match_like_local_globs(s3):
    from pipeline.batch.predict import list_inputs

    for pattern in ("**/*.jpg", "train/*/cat.*.jpg", "validation/dogs/dog.100?.jpg"):
        root, remote = list_inputs(f"s3://data/photos/{pattern}")
        local_root, local = list_inputs(os.path.join(s3["local"], pattern))
        # Paths are relative to the part of the pattern before its first wildcard.
        assert root == "s3://data/photos" + local_root[len(s3["local"]):], pattern
        remote, local = remote.column("relpath").to_pylist(), local.column("relpath").to_pylist()
        assert remote and remote == local, pattern


def test_files_written_and_read_back_through_uris(s3):
    storage.write_json("s3://data/out/a/b.json", {"x": 1})
    assert json.loads(s3_client(s3["aws"]).get_object(Bucket="data", Key="out/a/b.json")["Body"].read()) == {"x": 1}
    assert storage.read_json("s3://data/out/a/b.json") == {"x": 1}
    with storage.local_copy("s3://data/out/a/b.json", ".json") as path:
        assert json.load(open(path)) == {"x": 1}
    assert not os.path.exists(path), "a downloaded copy is removed after use"


def test_tracking_logs_result_files_on_s3_under_their_own_names(s3):
    from pipeline.training import tracking

    class Client:
        """Records what MLflow's client would be given, reading each file while it exists."""

        def __init__(self):
            self.logged = []

        def log_metric(self, run_id, key, value):
            self.logged.append((key, value))

        def log_artifact(self, run_id, local, artifact_path=None):
            self.logged.append((os.path.basename(local), artifact_path, open(local, "rb").read()))

        def set_terminated(self, run_id, status):
            self.logged.append(status)

    storage.write_text("s3://data/out/run/evaluation.json", "{}")
    storage.write_text("s3://data/out/run/model.keras", "model")
    client = Client()
    tracking._log_results(client, "run", {"accuracy": 0.5, "per_class": {}},
                          ["s3://data/out/run/evaluation.json", "s3://data/out/run/model.keras"])
    assert client.logged == [("final_accuracy", 0.5), ("evaluation.json", None, b"{}"),
                             ("model.keras", "model", b"model"), "FINISHED"]


def test_a_live_lease_refuses_a_second_run_and_a_lapsed_one_is_taken_over(s3, monkeypatch):
    with locks.output_lock("s3://data/runs/1"):
        holder = storage.read_json("s3://data/runs/1.lock")
        with pytest.raises(OutputError, match="being written by another run .* last heartbeat"):
            with locks.output_lock("s3://data/runs/1"):
                pass
    assert not storage.exists("s3://data/runs/1.lock"), "released at the end"
    # A run that died leaves its lock; once its heartbeat is older than the lease, it is stale.
    storage.write_json("s3://data/runs/1.lock", {**holder, "heartbeat": time.time() - locks.LOCK_LEASE_S - 1})
    with locks.output_lock("s3://data/runs/1"):
        assert storage.read_json("s3://data/runs/1.lock")["owner"] != holder["owner"]


def test_a_lease_is_renewed_while_its_run_lasts(s3, monkeypatch):
    monkeypatch.setattr(locks, "LOCK_HEARTBEAT_S", 0.2)
    with locks.output_lock("s3://data/runs/2"):
        first = storage.read_json("s3://data/runs/2.lock")["heartbeat"]
        # Polled, not slept: a busy machine may take longer than a few heartbeats to renew.
        deadline = time.monotonic() + 60
        while storage.read_json("s3://data/runs/2.lock")["heartbeat"] <= first:
            assert time.monotonic() < deadline, "the lease was not renewed within 60 s"
            time.sleep(0.1)


def test_a_model_file_on_s3_is_read_like_a_local_one(s3, tmp_path):
    from pipeline.nets.modelfile import ModelFileError, read_metadata

    s3_client(s3["aws"]).put_object(Bucket="data", Key="models/not-a-model.keras", Body=b"plain text")
    with pytest.raises(ModelFileError, match="not a .keras model file"):
        read_metadata("s3://data/models/not-a-model.keras")
    with pytest.raises(ModelFileError, match="model file 's3://data/models/missing.keras' cannot be used: it does not exist"):
        preflight(PredictConfig(model="s3://data/models/missing.keras", input="s3://data/photos", output="s3://data/p"))


@pytest.mark.parametrize("capability, training, expected", [
    ((9, 0), False, "bfloat16"), ((8, 0), False, "bfloat16"), ((7, 5), False, "float16"),
    ((7, 0), False, "float16"), ((7, 5), True, "float32"), ((6, 1), False, "float32"),
])
def test_auto_precision_follows_the_gpu(capability, training, expected):
    assert precision_for("auto", capability, allow_float16=not training) == expected
    assert precision_for("float32", capability) == "float32"


def test_a_local_lock_held_by_a_live_run_refuses_and_a_killed_runs_lock_is_taken(tmp_path):
    """A run SIGKILLed while holding its output leaves the lock file behind; the next run takes it
    at once (the kernel dropped the flock with the process), while a live holder is refused."""
    import signal
    import subprocess
    import sys

    from pipeline.errors import OutputError

    out = str(tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pipeline.data import locks\n"
                               "held = locks.output_lock(sys.argv[1])\nheld.__enter__()\nprint('held', flush=True)\ntime.sleep(120)",
                               out], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match="being written by another run"):
            with locks.output_lock(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert os.path.exists(out + ".lock"), "the killed run's lock file stays on disk"
    with locks.output_lock(out):
        pass
