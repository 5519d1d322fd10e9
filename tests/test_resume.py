"""Resumable and incremental runs: a driver killed with SIGKILL loses only the blocks in flight,
a rerun over a changed data root redoes only what changed, and either way the finished output
holds exactly the rows of a clean run. Locally and on an ``s3://`` output (moto).

The interruptions are deterministic: ``RIC_FAULT_PAUSE`` stalls the only inference actor at a
chosen block, the test waits until the blocks before it are committed, then kills the driver.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.batch.extract import run_extraction
from pipeline.config import ExtractConfig, PredictConfig
from tests.clusters import s3_keys, s3_server
from tests.conftest import make_real_root, real_images

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.timeout(900)
PER_CLASS = 5  # 20 photos: 10 blocks of 2
BLOCK = 2
PAUSE_AT = 8  # the 8th block stalls: 7 blocks (14 photos, 70%) are committed when the driver dies
OPTIONS = {"weights": "none", "image_size": 32, "precision": "float32", "batch_size": BLOCK, "block_files": BLOCK}
CLI_OPTIONS = ["--weights", "none", "--image-size", "32", "--precision", "float32", "--batch-size", str(BLOCK),
               "--block-files", str(BLOCK)]


def rows_of(output: str, filesystem=None) -> dict[tuple[str, str], np.ndarray]:
    """``{(split, path): features}`` of a feature folder, read with pyarrow alone."""
    rows = {}
    for split in ("train", "validation"):
        table = pq.read_table(f"{output}/{split}", filesystem=filesystem)
        for path, features in zip(table.column("path").to_pylist(), table.column("features").to_numpy(zero_copy_only=False)):
            assert (split, path) not in rows, f"{path} twice"
            rows[(split, path)] = np.asarray(features)
    return rows


def assert_same_rows(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, features in want.items():
        np.testing.assert_allclose(got[key], features, rtol=1e-4, atol=1e-5, err_msg=str(key))


def listed(root: str) -> set[tuple[str, str]]:
    """(split, path) of every file under a splits-layout root, with os.walk (not the product's listing)."""
    return {(os.path.relpath(d, root).split(os.sep)[0], os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"))
            for d, _, files in os.walk(root) for f in files}


@pytest.fixture
def root(tmp_path) -> str:
    return make_real_root(str(tmp_path / "data"), PER_CLASS)


def clean_rows(root: str, tmp_path) -> dict:
    """The rows of an uninterrupted extraction from scratch of ``root``, in a folder of their own."""
    out = str(tmp_path / f"clean-{time.time_ns()}")
    run_extraction(ExtractConfig(data_dir=root, output_dir=out, **OPTIONS))
    return rows_of(out)


def start_paused(args: list[str], env: dict, log, pause_at: int = PAUSE_AT) -> subprocess.Popen:
    """A job on a Ray cluster of its own whose inference actor stalls at block ``pause_at``."""
    env = {**os.environ, **env, "RAY_ADDRESS": "local", "RIC_FAULT_PAUSE": f"extract:{pause_at}"}
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_when(committed, proc: subprocess.Popen, want: int, seconds: float = 400) -> None:
    """Wait until ``committed()`` reaches ``want`` ledger entries, then SIGKILL the job's process group."""
    deadline = time.time() + seconds
    try:
        while committed() < want:
            assert proc.poll() is None, "the job ended before the test could kill it"
            assert time.time() < deadline, f"only {committed()} of {want} blocks committed in {seconds}s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    # Counted once the job is dead, nothing can commit any more: the stalled actor must have
    # held back every block after ``want`` (no waiting to see whether one comes).
    assert committed() == want


def local_entries(out: str, rewrites: bool = True) -> int:
    """Committed blocks (ledger entries) of a local output; without the rewrites of stale parts."""
    folder = os.path.join(out, "_ledger")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return len([n for n in names if n.endswith(".parquet") and (rewrites or "-rewrite-" not in n)])


def test_sigkilled_extraction_resumes_and_matches_a_clean_run(ray_cluster, root, tmp_path):
    out = str(tmp_path / "out")
    with open(tmp_path / "log", "w") as log:
        proc = start_paused(["jobs.extract_features", "--data-dir", root, "--output-dir", out, *CLI_OPTIONS], {}, log)
        kill_when(lambda: local_entries(out), proc, PAUSE_AT - 1)
    assert not os.path.exists(os.path.join(out, "manifest.json")), "a killed run must not look finished"
    from pipeline.config import TrainTopConfig
    from pipeline.errors import DataError
    from pipeline.training.top import train_top

    with pytest.raises(DataError, match="is not a finished extraction"):
        train_top(TrainTopConfig(features_dir=out, output_dir=str(tmp_path / "run"), epochs=1))
    manifest = run_extraction(ExtractConfig(data_dir=root, output_dir=out, **OPTIONS))
    total = 4 * PER_CLASS
    done = (PAUSE_AT - 1) * BLOCK
    # The rerun redid nothing that was committed: it processed exactly the photos left.
    assert manifest["processed"] == total - done < total
    assert manifest["update"]["reused"] == done and manifest["num_images"] == total
    assert_same_rows(rows_of(out), clean_rows(root, tmp_path))
    assert {(s, p) for s, p in rows_of(out)} == listed(root)
    assert not os.path.exists(os.path.join(out, "_ledger")), "entries are folded into ledger.parquet"


def change_root(root: str) -> dict[str, int]:
    """Add two photos, remove one and replace the contents of another; the expected counts."""
    os.remove(os.path.join(root, "train", "cats", sorted(os.listdir(os.path.join(root, "train", "cats")))[0]))
    for i, src in enumerate(real_images("train", "dogs", 2, start=40)):
        shutil.copyfile(src, os.path.join(root, "train", "dogs", f"added-{i}.jpg"))
    target = os.path.join(root, "validation", "dogs", sorted(os.listdir(os.path.join(root, "validation", "dogs")))[0])
    shutil.copyfile(real_images("validation", "dogs", 1, start=40)[0], target)
    return {"added": 2, "changed": 1, "removed": 1, "reused": 4 * PER_CLASS - 2}


def test_rerun_over_a_changed_root_redoes_only_the_changes(ray_cluster, root, tmp_path, capsys):
    out = str(tmp_path / "out")
    first = run_extraction(ExtractConfig(data_dir=root, output_dir=out, **OPTIONS))
    unchanged = run_extraction(ExtractConfig(data_dir=root, output_dir=out, **OPTIONS))
    assert unchanged["created_at"] == first["created_at"] and "reusing finished extraction" in capsys.readouterr().out
    expected = change_root(root)
    manifest = run_extraction(ExtractConfig(data_dir=root, output_dir=out, **OPTIONS))
    assert manifest["update"] == expected and manifest["processed"] == 3
    assert manifest["num_images"] == 4 * PER_CLASS + 1
    assert_same_rows(rows_of(out), clean_rows(root, tmp_path))
    # No part of the old rows is left behind: every shard file belongs to a part the ledger lists.
    ledger = pq.read_table(os.path.join(out, "ledger.parquet"))
    parts = set(ledger.column("part").to_pylist())
    files = {os.path.splitext(n)[0] for s in ("train", "validation") for n in os.listdir(os.path.join(out, s))}
    assert files <= parts and len(ledger) == 4 * PER_CLASS + 1
    assert run_extraction(ExtractConfig(data_dir=root, output_dir=out, **OPTIONS))["created_at"] == manifest["created_at"]


def test_interrupted_update_leaves_an_unfinished_output_that_a_rerun_completes(ray_cluster, root, tmp_path):
    out = str(tmp_path / "out")
    run_extraction(ExtractConfig(data_dir=root, output_dir=out, **OPTIONS))
    change_root(root)
    for i in range(6):
        shutil.copyfile(real_images("validation", "cats", 1, start=50 + i)[0],
                        os.path.join(root, "validation", "cats", f"later-{i}.jpg"))
    # 9 photos to do (2 added, 1 changed, 6 later) in 5 blocks: blocks 1-3 commit, block 4 stalls.
    with open(tmp_path / "log", "w") as log:
        proc = start_paused(["jobs.extract_features", "--data-dir", root, "--output-dir", out, *CLI_OPTIONS], {}, log,
                            pause_at=4)
        kill_when(lambda: local_entries(out, rewrites=False), proc, 3)
    assert not os.path.exists(os.path.join(out, "manifest.json")), "an output being updated is not finished"
    manifest = run_extraction(ExtractConfig(data_dir=root, output_dir=out, **OPTIONS))
    assert manifest["processed"] == 9 - 3 * BLOCK
    assert_same_rows(rows_of(out), clean_rows(root, tmp_path))


def test_prediction_folder_output_is_updated_in_place(ray_cluster, root, tmp_path):
    from pipeline.batch.predict import run_prediction
    from pipeline.nets import models
    from pipeline.nets.modelfile import save_classifier

    model = str(tmp_path / "m.keras")
    save_classifier(models.scratch_cnn(32, 2), model, {"kind": "scratch", "classes": ["cats", "dogs"], "image_size": 32})
    folder, out = os.path.join(root, "train"), str(tmp_path / "pred")
    cfg = PredictConfig(model=model, input=folder, output=out, precision="float32", batch_size=2, block_files=2)
    first = run_prediction(cfg)
    assert first["processed"] == 2 * PER_CLASS
    change_root(root)
    second = run_prediction(cfg)
    assert second["update"] == {"added": 2, "changed": 0, "removed": 1, "reused": 2 * PER_CLASS - 1}
    assert second["processed"] == 2
    table = pq.read_table(os.path.join(out, "predictions"))
    expected = {p.split("/", 1)[1] for s, p in listed(root) if s == "train"}
    assert sorted(table.column("path").to_pylist()) == sorted(expected)
    fresh = run_prediction(PredictConfig(model=model, input=folder, output=str(tmp_path / "fresh.parquet"),
                                         precision="float32"))
    want = pq.read_table(str(tmp_path / "fresh.parquet"))
    assert fresh["num_images"] == second["num_images"] == len(expected)
    got = table.sort_by("path")
    np.testing.assert_allclose(got.column("prob_cats").to_numpy(), want.column("prob_cats").to_numpy(), rtol=1e-4,
                               atol=1e-5)


def test_a_prediction_update_over_an_output_that_holds_a_row_twice_fails_unfinished(ray_cluster, root, tmp_path):
    """Prediction's audit runs in the job too: a row repeated in a committed part fails the update
    naming the duplicate, and no summary marks the output finished."""
    import pyarrow as pa

    from pipeline.batch.predict import run_prediction
    from pipeline.nets import models
    from pipeline.nets.modelfile import save_classifier

    model = str(tmp_path / "m.keras")
    save_classifier(models.scratch_cnn(32, 2), model, {"kind": "scratch", "classes": ["cats", "dogs"], "image_size": 32})
    folder, out = os.path.join(root, "train"), str(tmp_path / "pred")
    cfg = PredictConfig(model=model, input=folder, output=out, precision="float32", batch_size=2, block_files=2)
    run_prediction(cfg)
    parts = os.path.join(out, "predictions")
    part = os.path.join(parts, sorted(n for n in os.listdir(parts) if n.endswith(".parquet"))[0])
    table = pq.read_table(part)
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), part)
    shutil.copyfile(real_images("train", "dogs", 1, start=40)[0], os.path.join(folder, "dogs", "new.jpg"))
    with pytest.raises(RuntimeError, match=r"is inconsistent: .*\(1 duplicated\)"):
        run_prediction(cfg)
    assert not os.path.exists(os.path.join(out, "summary.json"))


@pytest.fixture
def s3():
    with s3_server(("runs",)) as aws:
        yield aws


def _s3_fs(aws: dict):
    from pyarrow import fs

    return fs.S3FileSystem(access_key=aws["AWS_ACCESS_KEY_ID"], secret_key=aws["AWS_SECRET_ACCESS_KEY"],
                           region="us-east-1", scheme="http", endpoint_override=aws["AWS_ENDPOINT_URL"].split("://")[1])


def _job(args: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env={**os.environ, **env, "RAY_ADDRESS": "local"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_s3_output_resumes_after_sigkill_and_updates_incrementally(ray_cluster, root, tmp_path, s3):
    out = "s3://runs/features"
    args = ["jobs.extract_features", "--data-dir", root, "--output-dir", out, *CLI_OPTIONS]
    with open(tmp_path / "log", "w") as log:
        proc = start_paused(args, s3, log)
        kill_when(lambda: len([k for k in s3_keys(s3, "runs", "features/_ledger") if k.endswith(".parquet")]), proc,
                  PAUSE_AT - 1)
    assert "manifest.json" not in s3_keys(s3, "runs", "features")
    # The killed run's lease names a process that is gone: the rerun takes it over at once.
    _job(args, s3)
    manifest = json.loads(_s3_fs(s3).open_input_stream("runs/features/manifest.json").read())
    assert manifest["processed"] == 4 * PER_CLASS - (PAUSE_AT - 1) * BLOCK
    assert_same_rows(rows_of("runs/features", _s3_fs(s3)), clean_rows(root, tmp_path))
    expected = change_root(root)
    _job(args, s3)
    manifest = json.loads(_s3_fs(s3).open_input_stream("runs/features/manifest.json").read())
    assert manifest["update"] == expected and manifest["processed"] == 3
    assert_same_rows(rows_of("runs/features", _s3_fs(s3)), clean_rows(root, tmp_path))


def _plant_twin(out: str, defect: str) -> None:
    """Make a finished output hold one committed file twice, as a faulty writer or ledger would."""
    import pyarrow as pa

    train = os.path.join(out, "train")
    part = sorted(n for n in os.listdir(train) if n.endswith(".parquet"))[0]
    if defect == "a row twice in a shard":
        table = pq.read_table(os.path.join(train, part))
        pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), os.path.join(train, part))
        return
    # "a ledger entry twice": the part's files committed again under another part name. Its data is not
    # copied, so the shards hold each file once and only the ledger's own check can name the duplicates.
    import pyarrow.compute as pc

    from pipeline.data import ledger

    folded = pq.read_table(os.path.join(out, "ledger.parquet"))
    rows = folded.filter(pc.equal(folded.column("part"), part[:-len(".parquet")])).to_pydict()
    ledger.write_entry(out, part[:-len(".parquet")].replace("-00", "-99", 1), rows)


@pytest.mark.parametrize("defect", ["a row twice in a shard", "a ledger entry twice"])
def test_the_job_refuses_to_finish_an_output_that_holds_a_file_twice(ray_cluster, root, tmp_path, defect):
    """The audit runs in the job, not only in its tests: an update of an output holding one file
    twice fails naming the duplicate, and the output stays unfinished (no manifest)."""
    out = str(tmp_path / "out")
    run_extraction(ExtractConfig(data_dir=root, output_dir=out, **OPTIONS))
    _plant_twin(out, defect)
    shutil.copyfile(real_images("train", "dogs", 1, start=40)[0], os.path.join(root, "train", "dogs", "new.jpg"))
    with pytest.raises(RuntimeError, match=r"is inconsistent: .*[1-9]\d* duplicated"):
        run_extraction(ExtractConfig(data_dir=root, output_dir=out, **OPTIONS))
    assert not os.path.exists(os.path.join(out, "manifest.json"))


def test_the_audit_refuses_duplicated_and_missing_rows(tmp_path):
    """What an output must pass before it is marked finished, driven to fail."""
    import pyarrow as pa

    from pipeline.data import ledger

    live = pa.table({"relpath": ["a.jpg", "b.jpg", "c.jpg"], "split": ["train"] * 3, "stamp": ["1:1"] * 3,
                     "part": ["p1", "p1", "p2"], "reason": ["", "", "corrupt"], "error": ["", "", "bad"]},
                    schema=ledger.SCHEMA)
    shard = tmp_path / "train"
    shard.mkdir()
    pq.write_table(pa.table({"path": ["a.jpg", "b.jpg"]}), shard / "p1.parquet")
    ledger.check_shards(str(tmp_path), live, {"train": "train"})  # consistent: passes
    pq.write_table(pa.table({"path": ["b.jpg"]}), shard / "p2.parquet")  # b twice
    with pytest.raises(RuntimeError, match=r"3 rows \(1 duplicated\) for 2 decoded files"):
        ledger.check_shards(str(tmp_path), live, {"train": "train"})
    (shard / "p2.parquet").unlink()
    (shard / "p1.parquet").unlink()
    pq.write_table(pa.table({"path": ["a.jpg"]}), shard / "p1.parquet")  # b missing
    with pytest.raises(RuntimeError, match=r"1 rows \(0 duplicated\) for 2 decoded files"):
        ledger.check_shards(str(tmp_path), live, {"train": "train"})
    assert len(ledger.rejects(live)) == 1


def test_a_ledger_with_a_file_twice_or_missing_is_not_finished(tmp_path):
    import pyarrow as pa

    from pipeline.data import ledger

    listing = pa.table({"relpath": ["a.jpg", "b.jpg"], "split": ["train"] * 2, "stamp": ["1:1"] * 2})
    out = str(tmp_path / "out")
    ledger.write_entry(out, "part-x-00000-0000", {"relpath": ["a.jpg", "a.jpg"], "split": ["train"] * 2,
                                                  "stamp": ["1:1"] * 2, "reason": ["", ""], "error": ["", ""]})
    with pytest.raises(RuntimeError, match="1 duplicated, 1 missing and 0 unlisted files"):
        ledger.refresh(out, listing, ["train"], "checking", lambda todo, run_id: None)  # b is never written

