"""Outputs never delete what the product did not write: --overwrite aimed at a user's folder, ledger
entries naming paths outside the output, and a second run into a held training output are refused.

The job entry points refuse before Ray starts, so this is the fast tier (the S3 case excepted)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from jobs import extract_features, finetune, predict, run_all, train_scratch, train_top
from pipeline.batch.extract import OUTPUT_LAYOUT
from pipeline.config import FinetuneConfig, ScratchConfig, TrainTopConfig
from pipeline.data import ledger, locks, outputs, storage
from pipeline.errors import OutputError
from pipeline.runall import run_all as run_all_job
from pipeline.runall import RunAllConfig
from pipeline.training.jobs import JOB_LAYOUT
from pipeline.training.finetune import finetune as finetune_job
from pipeline.training.scratch import train_scratch as train_scratch_job
from pipeline.training.top import train_top as train_top_job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jpeg(path, shade: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 0, 0)).save(path, format="JPEG")


def user_folder(path) -> str:
    """A user's own folder: photos in class folders, notes and a hidden file."""
    for split in ("train", "validation"):
        for i, cls in enumerate(("cats", "dogs")):
            for n in range(2):
                _jpeg(os.path.join(path, split, cls, f"{cls}.{n}.jpg"), 40 * i + n)
    with open(os.path.join(path, "notes.txt"), "w") as f:
        f.write("my notes")
    with open(os.path.join(path, ".hidden"), "w") as f:
        f.write("mine too")
    return str(path)


def snapshot(root) -> dict[str, tuple[int, str]]:
    """Every file under ``root`` (hidden ones too): size and sha256."""
    found = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                found[os.path.relpath(full, root)] = (os.path.getsize(full), hashlib.sha256(f.read()).hexdigest())
    return found


def model_file(path, **meta) -> str:
    """A file that reads as a classifier (its metadata is all ``PredictConfig`` checks), with ``meta`` added."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        metadata = {"kind": "top", "classes": ["cats", "dogs"], "image_size": 32, **meta}
        z.writestr("classifier.json", json.dumps(metadata))
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return str(path)


def _refused(main, argv, capsys) -> str:
    was_running = ray.is_initialized()
    assert main(argv) == 2
    assert ray.is_initialized() == was_running, "the refusal came after Ray started"
    return capsys.readouterr().err


@pytest.mark.parametrize("job", ["extract_features", "predict", "run_all", "train_top", "finetune", "train_scratch"])
def test_overwrite_aimed_at_a_users_folder_deletes_nothing(job, tmp_path, capsys):
    parent = tmp_path / "mine"
    # The training jobs write <output-dir>/<job>/: the user's folder sits where that would be.
    sub = {"train_top": "top", "finetune": "finetune", "train_scratch": "scratch"}.get(job)
    folder = user_folder(parent / sub if sub else parent)
    before = snapshot(parent)
    out = str(parent)
    argv = {
        "extract_features": (extract_features.main, ["--output-dir", out, "--weights", "none", "--overwrite"]),
        "predict": (predict.main, ["--model", model_file(tmp_path / "m.keras"), "--input", folder, "--output", out,
                                   "--overwrite"]),
        "run_all": (run_all.main, ["--output-dir", out, "--overwrite"]),
        "train_top": (train_top.main, ["--output-dir", out, "--overwrite"]),
        "finetune": (finetune.main, ["--output-dir", out, "--overwrite"]),
        "train_scratch": (train_scratch.main, ["--output-dir", out, "--overwrite"]),
    }[job]
    err = _refused(*argv, capsys)
    assert "holds files that are not" in err and "notes.txt" in err and "nothing was deleted" in err
    assert "more (" in err  # a few names, then the count
    assert snapshot(parent) == before


def test_the_refusal_comes_before_ray_starts(tmp_path):
    """A job process that would have to reach Ray (at a closed port) before refusing fails on
    Ray instead; the refusal therefore names the user's files, and nothing is deleted."""
    folder = user_folder(tmp_path / "mine")
    before = snapshot(tmp_path / "mine")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    proc = subprocess.run([sys.executable, "-m", "jobs.extract_features", "--data-dir", folder, "--output-dir", folder,
                           "--weights", "none", "--overwrite"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_ADDRESS": closed})
    assert proc.returncode == 2 and "holds files that are not" in proc.stderr, proc.stderr[-2000:]
    assert snapshot(tmp_path / "mine") == before


def test_a_previous_output_with_a_stray_user_file_is_refused(tmp_path, capsys):
    out = tmp_path / "features"
    storage.write_json(str(out / "run.json"), {"settings": {}})
    storage.write_parquet(str(out / "train" / "part-x-00000-0000.parquet"), pa.table({"path": ["a.jpg"]}))
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    err = _refused(extract_features.main, ["--output-dir", str(out), "--weights", "none", "--overwrite"], capsys)
    assert "holds files that are not an extraction of this project: notes.txt;" in err
    assert snapshot(out) == before


def test_files_named_like_an_output_but_without_its_record_are_refused(tmp_path):
    out = tmp_path / "features"
    os.makedirs(out / "train")
    (out / "train" / "part-1.parquet").write_bytes(b"x")
    with pytest.raises(OutputError, match="none of manifest.json, run.json"):
        outputs.prepare(str(out), OUTPUT_LAYOUT, overwrite=True)
    assert (out / "train" / "part-1.parquet").exists()


def test_a_previous_output_is_replaced_with_overwrite(tmp_path):
    out = tmp_path / "features"
    os.makedirs(out / "block4" / "train")
    for name in ("manifest.json", "run.json", "ledger.parquet", "rejects.parquet", "train/part-a.parquet",
                 "block4/train/part-a.parquet", "validation/part-b.parquet.tmp-12-34", "_ledger/part-c.parquet"):
        storage.write_bytes(str(out / name), b"x")
    assert outputs.check(str(out), OUTPUT_LAYOUT)
    outputs.prepare(str(out), OUTPUT_LAYOUT, overwrite=True)
    assert not out.exists()
    assert not outputs.check(str(out), OUTPUT_LAYOUT)  # missing: fine


@pytest.mark.parametrize("link", ["ray_train/elsewhere", "ray_train/run/checkpoint_000000/file.pkl"])
def test_a_link_inside_an_earlier_output_is_refused_and_nothing_behind_it_deleted(tmp_path, link):
    """Every pattern of a training folder would admit what lies behind a link under ray_train/."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    out = tmp_path / "top"
    storage.write_bytes(str(out / "settings.json"), b"{}")
    storage.write_bytes(str(out / "ray_train" / "run" / "state.pkl"), b"x")
    target = precious if link.endswith("elsewhere") else precious / "keep.txt"
    os.makedirs(os.path.dirname(out / link), exist_ok=True)
    os.symlink(target, out / link)
    with pytest.raises(OutputError, match=f"{link}"):
        outputs.prepare(str(out), JOB_LAYOUT, overwrite=True)
    assert (precious / "keep.txt").read_text() == "mine" and os.path.islink(out / link)


def test_a_name_that_is_not_utf8_in_an_output_is_named_not_a_crash(tmp_path):
    out = tmp_path / "features"
    storage.write_bytes(str(out / "manifest.json"), b"{}")
    with open(os.path.join(str(out).encode(), b"caf\xe9.txt"), "wb") as f:
        f.write(b"mine")
    with pytest.raises(OutputError, match=r"caf\\xe9.txt"):
        outputs.prepare(str(out), OUTPUT_LAYOUT, overwrite=True)


def test_a_run_all_folder_is_judged_stage_by_stage(tmp_path):
    from pipeline.runall import LAYOUT

    out = tmp_path / "run"
    for name in ("report.md", "features/manifest.json", "features/train/part-a.parquet", "top/settings.json",
                 "top/ray_train/run/checkpoint_000000/state.pkl", "top/saved_model/saved_model.pb", "scratch.lock"):
        storage.write_bytes(str(out / name), b"x")
    assert outputs.check(str(out), LAYOUT)
    storage.write_bytes(str(out / "scratch" / "model.keras"), b"someone's")  # a stage folder without its record
    with pytest.raises(OutputError, match=r"not a run_all output of this project: scratch/model.keras;"):
        outputs.check(str(out), LAYOUT)


def test_a_single_file_output_is_replaced_only_when_a_prediction_wrote_it(tmp_path, capsys):
    target = tmp_path / "results.csv"
    target.write_text("the user's own table")
    argv = ["--model", model_file(tmp_path / "m.keras"), "--input", user_folder(tmp_path / "photos"),
            "--output", str(target), "--overwrite"]
    err = _refused(predict.main, argv, capsys)
    assert "results.csv exist(s) but no results.summary.json" in err
    assert target.read_text() == "the user's own table"


def test_files_beside_a_single_file_output_are_not_replaced_unless_a_prediction_wrote_them(tmp_path, capsys):
    """results.csv is new, but results.rejects.parquet (which a prediction would write too) is the user's."""
    side = tmp_path / "results.rejects.parquet"
    side.write_text("the user's own file")
    argv = ["--model", model_file(tmp_path / "m.keras"), "--input", user_folder(tmp_path / "photos"),
            "--output", str(tmp_path / "results.csv")]
    assert "results.rejects.parquet exist(s) beside" in _refused(predict.main, argv, capsys)
    err = _refused(predict.main, argv + ["--overwrite"], capsys)
    assert "results.rejects.parquet exist(s) but no results.summary.json" in err
    assert side.read_text() == "the user's own file"


def _plant_entry(out: str, part: str, replaces: str = "") -> None:
    table = pa.table({"relpath": ["a.jpg"], "split": ["train"], "stamp": ["1:1"], "part": [part], "reason": [""],
                      "error": [""]}, schema=ledger.SCHEMA.with_metadata({ledger.REPLACES: replaces}))
    os.makedirs(os.path.join(out, ledger.LEDGER_DIR), exist_ok=True)
    pq.write_table(table, os.path.join(out, ledger.LEDGER_DIR, "part-x-00000-0000.parquet"))


@pytest.mark.parametrize("how", ["replaces", "absolute", "part column"])
def test_a_ledger_entry_naming_a_path_outside_deletes_nothing(how, tmp_path):
    precious = tmp_path / "elsewhere" / "precious.parquet"
    precious.parent.mkdir()
    precious.write_bytes(b"precious")
    out = str(tmp_path / "a" / "out")
    bad = {"replaces": "../../elsewhere/precious", "absolute": str(precious)[:-len(".parquet")],
           "part column": "../../elsewhere/precious"}[how]
    if how == "part column":
        _plant_entry(out, bad)
    else:
        _plant_entry(out, "part-x-00000-0000", replaces=bad)
    listing = pa.table({"relpath": ["b.jpg"], "split": ["train"], "stamp": ["2:2"]})
    with pytest.raises(OutputError, match=f"the ledger entry .*part-x-00000-0000.parquet names part '{bad}'"):
        ledger.refresh(out, listing, ["train"], "checking", lambda todo, run_id: None)
    assert precious.read_bytes() == b"precious"


@pytest.mark.parametrize("location", ["s3://data/out/../x", "s3://other/out/x", "s3://data/outer/x", "/tmp/x",
                                      "s3://data/out"])
def test_recorded_paths_outside_the_output_are_refused(location):
    with pytest.raises(OutputError, match="not under the output"):
        outputs.require_inside("s3://data/out", location, "an entry")


def test_recorded_paths_inside_the_output_are_kept(tmp_path):
    assert outputs.require_inside("s3://data/out/", "s3://data/out/_ledger/part-1.parquet", "e") == \
        "s3://data/out/_ledger/part-1.parquet"
    assert outputs.require_inside("out", "out/a/../b", "e") == os.path.abspath("out/b")
    with pytest.raises(OutputError):
        outputs.require_inside("out", "out/../elsewhere", "e")


def finetune_config(tmp_path, output_dir: str) -> FinetuneConfig:
    """Fine-tuning (on the block-4 cache, the default) with what it reads before it takes its lock: a top model
    file naming its feature folder, and that folder's manifest recording the cache."""
    features = tmp_path / "features_with_block4"
    block4 = {"dir": "block4", "shape": [2, 2, 512]}
    storage.write_json(str(features / "manifest.json"), {"fingerprint": "f", "data_dir": str(tmp_path), "block4": block4,
                                                         "layout": "splits", "config": {"validation_fraction": 0.2}})
    return FinetuneConfig(top_model=model_file(tmp_path / "top.keras", features_dir=str(features)),
                          output_dir=output_dir)


def test_a_training_job_refuses_an_output_another_run_holds(tmp_path):
    features = tmp_path / "features"
    storage.write_json(str(features / "manifest.json"), {"fingerprint": "f", "data_dir": str(tmp_path)})
    out = str(tmp_path / "out")
    cfg = TrainTopConfig(features_dir=str(features), output_dir=out)
    with locks.output_lock(os.path.join(out, "top")):
        with pytest.raises(OutputError, match="is being written by another run"):
            train_top_job(cfg)
    root = user_folder(tmp_path / "photos")
    with locks.output_lock(os.path.join(out, "scratch")):
        with pytest.raises(OutputError, match="is being written by another run"):
            train_scratch_job(ScratchConfig(data_dir=root, output_dir=out))
    with locks.output_lock(os.path.join(out, "finetune")):
        with pytest.raises(OutputError, match="is being written by another run"):
            finetune_job(finetune_config(tmp_path, out))
    assert not any(os.path.exists(os.path.join(out, job, "settings.json")) for job in ("top", "scratch", "finetune"))


# A concurrent run: another process holds the output's lock until its stdin closes.
HOLD_LOCK = ("import sys\nfrom pipeline.data import locks\nwith locks.output_lock(sys.argv[1]):\n"
             "    print('held', flush=True)\n    sys.stdin.read()\n")


@pytest.mark.parametrize("job", ["top", "finetune"])
def test_a_training_job_refuses_an_output_another_process_holds_naming_it(tmp_path, job):
    features = tmp_path / "features"
    storage.write_json(str(features / "manifest.json"), {"fingerprint": "f", "data_dir": str(tmp_path)})
    out = str(tmp_path / "out")
    held = os.path.join(out, job)
    start = {"top": lambda: train_top_job(TrainTopConfig(features_dir=str(features), output_dir=out)),
             "finetune": lambda: finetune_job(finetune_config(tmp_path, out))}[job]
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, held], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=rf"^{re.escape(held)} is being written by another run \(pid {holder.pid} "):
            start()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert holder.returncode == 0 and not os.path.exists(os.path.join(held, "settings.json"))


def test_the_lock_is_released_when_a_training_job_ends(tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(os.path.join(out, "top"))
    (tmp_path / "out" / "top" / "notes.txt").write_text("mine")
    features = tmp_path / "features"
    storage.write_json(str(features / "manifest.json"), {"fingerprint": "f", "data_dir": str(tmp_path)})
    with pytest.raises(OutputError, match="notes.txt"):
        train_top_job(TrainTopConfig(features_dir=str(features), output_dir=out))
    with locks.output_lock(os.path.join(out, "top")):  # free again: no "being written by another run"
        pass


def test_a_second_run_all_into_a_held_output_is_refused(tmp_path):
    out = str(tmp_path / "run")
    cfg = RunAllConfig(data_dir=user_folder(tmp_path / "photos"), output_dir=out)
    with locks.output_lock(out):
        with pytest.raises(OutputError, match="is being written by another run"):
            run_all_job(cfg)
    assert not os.path.exists(out)


@pytest.mark.slow
def test_user_files_on_s3_are_refused_and_a_previous_output_replaced(tmp_path, monkeypatch):
    from tests.clusters import s3_client, s3_server

    with s3_server(("out",)) as aws:
        for key, value in aws.items():
            monkeypatch.setenv(key, value)
        client = s3_client(aws)
        for key in ("photos/train/cats/a.jpg", "photos/notes.txt", "old/run.json", "old/train/part-a.parquet"):
            client.put_object(Bucket="out", Key=key, Body=b"x")
        with pytest.raises(OutputError, match="holds files that are not an extraction.*notes.txt"):
            outputs.prepare("s3://out/photos", OUTPUT_LAYOUT, overwrite=True)
        outputs.prepare("s3://out/old", OUTPUT_LAYOUT, overwrite=True)
        keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="out").get("Contents", []))
        assert keys == ["photos/notes.txt", "photos/train/cats/a.jpg"]


def test_training_layout_names_what_training_writes():
    assert JOB_LAYOUT.allows_file("ray_train/run/checkpoint_000001/checkpoint.pkl")
    assert not JOB_LAYOUT.allows_file("holiday.jpg")
