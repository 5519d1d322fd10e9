"""Reliability matrix: bad inputs and faults; every case records rows in/out, duplicates, lost.

`python -m pytest tests/test_reliability.py` (or `python bench/reliability.py`) prints the table.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.batch.extract import run_extraction
from pipeline.config import ExtractConfig
from pipeline.data.discover import discover
from pipeline.data.shards import read_split
from pipeline.errors import DataError, OutputError
from tests.conftest import make_real_root, real_images
from tests.images import bad_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.timeout(600)


def tally(expected: set[str], got: list[str]) -> tuple[int, int, int, int]:
    """(rows in, rows out, duplicated, lost)."""
    return len(expected), len(got), len(got) - len(set(got)), len(expected - set(got))


def extracted_paths(out: str) -> list[str]:
    paths = []
    for split in ("train", "validation"):
        table = read_split(out, split, columns=["path"])
        paths += table.column("path").to_pylist() if table is not None else []
    return paths


def all_relpaths(root: str) -> set[str]:
    """Every file under ``root``, listed with os.walk (independently of the product's discovery)."""
    return {os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files}


def good_relpaths(root: str) -> set[str]:
    return {p for p in all_relpaths(root) if not os.path.basename(p).startswith("bad")}


def test_dirty_photo_collection(ray_cluster, tmp_path, record_case):
    """Every odd file decodes (good ones) or is a listed reject (bad ones); nothing else happens."""
    from PIL import Image

    from tests.images import half_split_image, jpeg_bytes, write

    root = tmp_path / "data"
    make_real_root(str(root), 2)
    odd = root / "train" / "cats"
    Image.new("RGBA", (30, 20), (0, 0, 255, 128)).save(odd / "alpha.png")
    Image.new("P", (30, 20), 3).save(odd / "palette.gif")
    Image.new("I;16", (30, 20), 40000).save(odd / "sixteen.png")
    Image.new("L", (30, 20), 90).save(odd / "gray.jpg")
    write(str(odd / "cmyk.jpg"), jpeg_bytes((0, 255, 255, 0), mode="CMYK"))
    exif = Image.Exif()
    exif[0x0112] = 6
    half_split_image().save(odd / "rotated.jpg", exif=exif)
    Image.new("RGB", (1, 1), (9, 9, 9)).save(odd / "one pixel 'quoted' ü.png")
    bad = {os.path.join("train", "dogs", n) for n in bad_files(str(root / "train" / "dogs"))}
    expected = all_relpaths(str(root)) - bad
    out = str(tmp_path / "out")
    manifest = run_extraction(ExtractConfig(data_dir=str(root), output_dir=out, weights="none", image_size=32,
                                            precision="float32", max_reject_fraction=0.5))
    got = extracted_paths(out)
    rejects = set(pq.read_table(os.path.join(out, "rejects.parquet")).column("path").to_pylist())
    record_case("dirty photo collection", f"{len(bad)} rejects", f"{len(rejects)} rejects", *tally(expected, got))
    assert rejects == bad and set(got) == expected and len(got) == len(set(got))
    assert manifest["num_rejects"] == len(bad)


@pytest.mark.parametrize("case, make, message", [
    ("missing folder", lambda p: p / "nope", "does not exist"),
    ("empty folder", lambda p: p, "must hold the split folders"),
    ("one class only", "one_class", "need at least two class folders"),
    ("split with no images", "empty_split", "holds no image files"),
    ("classes differ between splits", "mismatch", "class folders differ between splits"),
])
def test_bad_data_roots_fail_before_cluster_work(tmp_path, case, make, message, record_case):
    if callable(make):
        root = make(tmp_path)
    else:
        root = tmp_path
        layout = {"one_class": {"train": ["a"], "validation": ["a"]},
                  "empty_split": {"train": ["a", "b"], "validation": ["a", "b"]},
                  "mismatch": {"train": ["a", "b"], "validation": ["a", "c"]}}[make]
        for split, classes in layout.items():
            for cls in classes:
                os.makedirs(root / split / cls)
                if not (make == "empty_split" and split == "validation"):
                    shutil.copyfile(real_images("train", "cats", 1)[0], root / split / cls / "x.jpg")
    with pytest.raises(DataError, match=message):
        discover(str(root))
    # Refused before any work: nothing is written, so there are no rows to lose or duplicate.
    files = sum(len(names) for _, _, names in os.walk(root)) if os.path.isdir(root) else 0
    record_case(f"data root: {case}", "clear error", "clear error", files, None, None, None)


def test_thousands_of_files_in_one_folder(tmp_path, record_case):
    from tests.images import jpeg_bytes

    data = jpeg_bytes(size=(8, 8))
    for split in ("train", "validation"):
        for cls in ("a", "b"):
            os.makedirs(tmp_path / split / cls)
    for i in range(3000):
        (tmp_path / "train" / "a" / f"img{i:05d}.jpg").write_bytes(data)
    for path in ("train/b/x.jpg", "validation/a/x.jpg", "validation/b/x.jpg"):
        (tmp_path / path).write_bytes(data)
    index = discover(str(tmp_path))
    paths = index.split("train").column("relpath").to_pylist()
    record_case("3000 files in one folder", "all listed", f"{len(paths)} listed", 3001, len(paths),
                len(paths) - len(set(paths)), 3001 - len(set(paths)))
    assert len(set(paths)) == 3001


def _isolated(scenario: str, *args: str, env_extra: dict) -> dict:
    env = {**os.environ, **env_extra}
    proc = subprocess.run([sys.executable, "-m", "tests.isolated", scenario, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=480)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("fault, case, expected, observed", [
    ("extract:3", "inference actor killed (extraction)", "restart, all rows once", "killed+restarted"),
    # The write task dies after its block's shard files and before its ledger entry: Ray retries
    # it under the same part name, so the retry overwrites those files instead of adding rows.
    ("write:1", "writer killed between its files and its entry", "retry, all rows once", "killed+retried"),
], ids=["inference actor", "writer"])
def test_process_killed_mid_extraction(real_root, tmp_path, record_case, fault, case, expected, observed):
    marker = tmp_path / "killed"
    out = str(tmp_path / "out")
    _isolated("extract", real_root, out, env_extra={"RIC_FAULT_KILL": f"{fault}:{marker}"})
    got = extracted_paths(out)
    wanted = good_relpaths(real_root)
    record_case(case, expected, observed if marker.exists() else "not killed", *tally(wanted, got))
    assert marker.exists() and set(got) == wanted and len(got) == len(wanted)


def _small_model(path: str) -> str:
    from pipeline.nets import models
    from pipeline.nets.modelfile import save_classifier

    save_classifier(models.scratch_cnn(32, 2), path, {"kind": "scratch", "classes": ["cats", "dogs"], "image_size": 32})
    return path


def test_inference_actor_killed_mid_prediction(real_root, tmp_path, record_case):
    marker = tmp_path / "killed"
    out = str(tmp_path / "pred.csv")
    folder = os.path.join(real_root, "validation")
    _isolated("predict", _small_model(str(tmp_path / "m.keras")), folder, out,
              env_extra={"RIC_FAULT_KILL": f"predict:3:{marker}"})
    got = pacsv.read_csv(out).column("path").to_pylist()
    expected = good_relpaths(folder)
    record_case("inference actor killed (prediction)", "restart, all rows once",
                "killed+restarted" if marker.exists() else "not killed", *tally(expected, got))
    assert marker.exists() and set(got) == expected and len(got) == len(expected)


def _start_job(args: list[str], log, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def _wait_for(predicate, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert proc.poll() is None, "the job ended before the test could interrupt it"
        assert time.time() < deadline, "timed out waiting for the job"
        time.sleep(0.1)


def _stop(proc: subprocess.Popen, sig: int, log_path: str | None = None) -> int:
    os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        # A driver that outlives its signal (as when it was started with SIGINT ignored, see conftest.py)
        # puts its threads' stacks into the failure, so the failure says where it waited.
        tail = _stacks(proc, log_path)[-6000:] if log_path else "(no log)"
        raise AssertionError(f"the job outlived {signal.Signals(sig).name} by 120 s; its log ends:\n{tail}") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the driver left of its local cluster
        except ProcessLookupError:
            pass


def _stacks(proc: subprocess.Popen, log_path: str, seconds: float = 10) -> str:
    """The job's log once its driver printed every thread's stack (its SIGUSR1 handler, ``jobs._cli``)."""
    os.kill(proc.pid, signal.SIGUSR1)
    deadline = time.time() + seconds
    while "most recent call first" not in (text := open(log_path).read()) and time.time() < deadline:
        time.sleep(0.1)
    return text


def _committed(out: str) -> int:
    folder = os.path.join(out, "_ledger")
    return len(os.listdir(folder)) if os.path.isdir(folder) else 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_driver_interrupted_during_extraction_then_rerun(ray_cluster, real_root, tmp_path, sig, record_case):
    """A second run into the same output is refused while the first holds it; the interrupted
    first run leaves nothing that looks finished; the rerun redoes only the blocks not committed.

    The first run's only inference actor stalls at its 11th block (``RIC_FAULT_PAUSE``), so it
    is interrupted with exactly 10 blocks of 2 photos committed, not at a moment it may outrun.
    """
    out = str(tmp_path / "out")
    # A small image size: the test is about the ledger, not about VGG16's input.
    args = ["jobs.extract_features", "--data-dir", real_root, "--output-dir", out, "--precision", "float32",
            "--batch-size", "2", "--block-files", "2", "--image-size", "64"]
    with open(tmp_path / "log", "w") as log:
        proc = _start_job(args, log, {"RAY_ADDRESS": "local", "RIC_FAULT_PAUSE": "extract:11"})
        try:
            _wait_for(lambda: _committed(out) >= 10, proc)
            with pytest.raises(OutputError, match="being written by another run"):
                run_extraction(ExtractConfig(data_dir=real_root, output_dir=out, precision="float32", image_size=64))
            # A job that seems stuck can be asked where it waits: kill -USR1 prints its threads' stacks.
            assert "in run_extraction" in _stacks(proc, str(tmp_path / "log"))
        finally:
            code = _stop(proc, sig, str(tmp_path / "log"))
    assert code != 0 and not os.path.exists(os.path.join(out, "manifest.json")), \
        "an interrupted run must not leave a finished-looking output"
    manifest = run_extraction(ExtractConfig(data_dir=real_root, output_dir=out, precision="float32", batch_size=2,
                                             image_size=64))
    got = extracted_paths(out)
    expected = good_relpaths(real_root)
    record_case(f"driver {signal.Signals(sig).name} during extraction, rerun", "resumed: 20 of 40 redone",
                f"resumed: {manifest['processed']} of 40 redone", *tally(expected, got))
    assert set(got) == expected and len(got) == 40 and manifest["processed"] == 20


def test_driver_interrupted_during_prediction_then_rerun(ray_cluster, real_root, tmp_path, record_case):
    from pipeline.batch.predict import run_prediction
    from pipeline.config import PredictConfig

    model = _small_model(str(tmp_path / "m.keras"))
    out = str(tmp_path / "pred.parquet")
    args = ["jobs.predict", "--model", model, "--input", real_root, "--output", out, "--batch-size", "2",
            "--block-files", "2", "--precision", "float32"]
    with open(tmp_path / "log", "w") as log:
        # The only actor stalls at its 6th block: 5 blocks (10 photos) are committed when SIGINT comes.
        proc = _start_job(args, log, {"RAY_ADDRESS": "local", "RIC_FAULT_PAUSE": "predict:6"})
        try:
            _wait_for(lambda: _committed(str(tmp_path / "pred.partial")) >= 5, proc)
        finally:
            code = _stop(proc, signal.SIGINT, str(tmp_path / "log"))
    assert code != 0 and not os.path.exists(out)
    summary = run_prediction(PredictConfig(model=model, input=real_root, output=out, precision="float32"))
    got = pq.read_table(out).column("path").to_pylist()
    expected = good_relpaths(real_root)
    record_case("driver SIGINT during prediction, rerun", "resumed: 30 of 40 redone",
                f"resumed: {summary['processed']} of 40 redone", *tally(expected, got))
    assert set(got) == expected and len(got) == 40 and summary["processed"] == 30


def test_training_worker_killed_resumes(ray_cluster, real_root, tmp_path, record_case, monkeypatch):
    """Rank 1 dies in epoch 2. The restarted group must resume: its first epoch is 2 (the one after
    the checkpoint of epoch 1), started from the weights the first group started epoch 2 with,
    i.e. the checkpoint's. A group that started over would start epoch 1 from the initial weights.
    The fault and the trace of epoch starts are set in this process's environment only (the
    session's cluster was started without them): the job hands them to its workers."""
    import csv

    from pipeline.config import TrainTopConfig
    from pipeline.training.top import train_top

    features = run_extraction(ExtractConfig(data_dir=real_root, output_dir=str(tmp_path / "f"), weights="none",
                                            image_size=32, precision="float32"))
    marker, log = tmp_path / "killed", tmp_path / "epochs.jsonl"
    # Rank 1 dies after its first step of epoch 2.
    monkeypatch.setenv("RIC_FAULT_KILL", f"train_epoch2_rank1:1:{marker}")
    monkeypatch.setenv("RIC_FAULT_TRACE", str(log))
    train_top(TrainTopConfig(features_dir=features["output_dir"], output_dir=str(tmp_path / "run"), epochs=3,
                             batch_size=8, num_workers=2, precision="float32", max_failures=2))
    with open(tmp_path / "run" / "top" / "metrics.csv") as f:
        epochs = [int(r["epoch"]) for r in csv.DictReader(f)]
    record_case("training worker killed in epoch 2", "resume, epochs 1-3 once",
                "killed+resumed" if marker.exists() else "not killed", 3, len(epochs),
                len(epochs) - len(set(epochs)), 3 - len(set(epochs)))
    assert marker.exists() and epochs == [1, 2, 3]
    starts = [json.loads(line) for line in log.read_text().splitlines()]
    starts = [s for s in starts if s["site"] == "epoch_start"]
    for rank in (0, 1):
        mine = [s for s in starts if s["rank"] == rank]
        assert [s["epoch"] for s in mine] == [1, 2, 2, 3], f"rank {rank}: {[s['epoch'] for s in mine]}"
        first, before_kill, after_restart = mine[0]["weights"], mine[1]["weights"], mine[2]["weights"]
        assert after_restart == before_kill != first, "the restarted group must start from the checkpoint's weights"