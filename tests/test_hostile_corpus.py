"""Issue 25's corpus end to end: the extraction job over a root holding every hostile case among
good photos exits 0, every good photo is a row exactly once under its own class, every other
file is a reject with its reason, and the links it must not follow are named in its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pyarrow.parquet as pq
import pytest

from pipeline.data.shards import read_split
from tests.conftest import real_images
from tests.hostile import build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def test_extraction_over_a_hostile_corpus(ray_cluster, tmp_path):
    photos = {(split, cls): real_images(split, cls, 3) for split in ("train", "validation") for cls in ("cats", "dogs")}
    expected = build(str(tmp_path / "data"), str(tmp_path / "outside"), photos)
    out = str(tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.extract_features", "--data-dir", str(tmp_path / "data"), "--output-dir", out,
         "--weights", "none", "--image-size", "32", "--precision", "float32", "--max-reject-fraction", "0.9"],
        cwd=REPO, capture_output=True, text=True, timeout=400,
        env={**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]

    rows = []
    for split in ("train", "validation"):
        rows += read_split(out, split, columns=["path", "class_name"]).to_pylist()
    counts = Counter(r["path"] for r in rows)
    assert {p for p, n in counts.items() if n > 1} == set(), "a file became more than one row"
    assert {r["path"]: r["class_name"] for r in rows} == expected.rows

    rejects = pq.read_table(os.path.join(out, "rejects.parquet")).to_pylist()
    assert {r["path"]: r["reason"] for r in rejects if r["reason"] not in expected.rejects[r["path"]]} == {}
    assert {r["path"] for r in rejects} == set(expected.rejects)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["ignored_by_extension"] == expected.ignored
    assert "ignored 4 files whose names are not image names" in output
    for link in expected.skipped_links:
        assert link in output, f"the skipped link {link} is not named in the job's output"
