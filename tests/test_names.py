"""Any file name a filesystem allows is listed once, stored as UTF-8, and opens the same file again."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import names
from pipeline.batch.predict import list_inputs
from pipeline.data import storage
from pipeline.data.discover import discover
from pipeline.images.decode import decode_batch
from tests.hostile import ODD_NAMES
from tests.images import jpeg_bytes, write

# A root whose own name holds what the escape rule rewrites: a literal backslash before "xe9".
ODD_ROOT = b"ro\\xe9ot"
NAME_BYTES = st.binary(min_size=1, max_size=255).filter(lambda b: b"/" not in b and b"\0" not in b
                                                        and not b.startswith(b"."))


def _odd_root(base: str) -> tuple[str, dict[str, bytes]]:
    """A splits-layout root with every odd name in train/cats; returns (root, stored relpath -> bytes)."""
    root = os.fsdecode(os.path.join(os.fsencode(base), ODD_ROOT))
    content = {}
    for i, (disk, stored) in enumerate(ODD_NAMES):
        data = jpeg_bytes(color=(10 * i, 100, 200))
        write(os.fsdecode(os.path.join(os.fsencode(root), b"train/cats", disk)), data)
        content[f"train/cats/{stored}"] = data
    for split, cls in (("train", "dogs"), ("validation", "cats"), ("validation", "dogs")):
        data = jpeg_bytes(color=(1, 2, len(content)))
        write(os.path.join(root, split, cls, "plain.jpg"), data)
        content[f"{split}/{cls}/plain.jpg"] = data
    return root, content


def test_odd_names_are_listed_once_stored_and_opened_again(tmp_path):
    root, content = _odd_root(str(tmp_path))
    index = discover(root)
    relpaths = index.files.column("relpath").to_pylist()
    assert sorted(relpaths) == sorted(content), "each odd name listed once, in its literal stored form"
    pq.write_table(index.files, str(tmp_path / "files.parquet"))
    assert pq.read_table(str(tmp_path / "files.parquet")).column("relpath").to_pylist() == relpaths
    for rel in relpaths:
        with open(names.os_path(index.path(rel)), "rb") as f:
            assert f.read() == content[rel], rel
    nfc, nfd = (f"train/cats/{stored}" for _, stored in ODD_NAMES[-2:])
    assert nfc != nfd and {nfc, nfd} <= set(relpaths), "NFC and NFD spellings stay two files"


def test_odd_names_decode_through_the_products_path(tmp_path):
    root, content = _odd_root(str(tmp_path))
    index = discover(root)
    relpaths = index.files.column("relpath").to_pylist()
    # As pipeline.batch.inference builds a decode task's paths: the stored root joined with each relpath.
    paths = np.array([storage.join(names.escape(root), r) for r in relpaths], dtype=object)
    out = decode_batch({"path": paths}, 16)
    assert list(out["reason"]) == [""] * len(relpaths), list(zip(relpaths, out["error"]))
    assert all(img.any() for img in out["image"])


def test_a_glob_over_odd_names_lists_each_once(tmp_path):
    root, content = _odd_root(str(tmp_path))
    os.symlink("..", os.path.join(root, "train", "cats", "loop"))
    found_root, files = list_inputs(os.path.join(root, "train", "**", "*.jpg"))
    expected = sorted(r[len("train/"):] for r in content if r.startswith("train/"))
    assert sorted(files.column("relpath").to_pylist()) == expected
    found_root, files = list_inputs(os.path.join(root, "*", "[!d]*", "plain.jpg"))
    assert files.column("relpath").to_pylist() == ["validation/cats/plain.jpg"]
    found_root, files = list_inputs(os.path.join(root, "train", "cats", "**"))
    assert "new\nline.jpg" in files.column("relpath").to_pylist(), "** spans a name with a newline"


def test_a_class_folder_named_in_latin1_is_a_class(tmp_path):
    for split in ("train", "validation"):
        for cls in (b"caf\xe9", b"dogs"):
            write(os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), split.encode(), cls, b"a.jpg")), jpeg_bytes())
    index = discover(str(tmp_path))
    assert index.classes == ["caf\\xe9", "dogs"]
    for rel in index.files.column("relpath").to_pylist():
        assert os.path.isfile(names.os_path(index.path(rel))), rel


@settings(max_examples=300, deadline=None)
@given(NAME_BYTES)
def test_escape_round_trips_any_name(name):
    stored = names.escape(name)
    stored.encode("utf-8")  # valid UTF-8, or this raises
    assert names.unescape(stored) == name
    assert names.escape(os.fsdecode(name)) == stored, "the OS string and the bytes escape alike"
    assert os.fsencode(names.os_path(stored)) == name


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(NAME_BYTES, min_size=1, max_size=8, unique=True))
def test_a_folder_of_random_names_lists_each_file_once(found):
    with tempfile.TemporaryDirectory() as base:
        root = os.path.join(base, "r")
        os.mkdir(root)
        for i, name in enumerate(found):
            with open(os.path.join(os.fsencode(root), name), "wb") as f:
                f.write(str(i).encode())
        listed = [rel for rel, _ in storage.walk_files(root)]
        assert len(listed) == len(set(listed)) == len(found)
        opened = set()
        for rel in listed:
            with open(names.os_path(storage.join(names.escape(root), rel)), "rb") as f:
                opened.add(int(f.read()))
        assert opened == set(range(len(found)))
        table = pa.table({"relpath": listed})
        assert table.column("relpath").to_pylist() == listed


@pytest.mark.parametrize("stored, raw", [("a\\qb", b"a\\qb"), ("tail\\", b"tail\\"), ("\\x4", b"\\x4")])
def test_a_backslash_that_starts_no_escape_is_kept(stored, raw):
    assert names.unescape(stored) == raw
