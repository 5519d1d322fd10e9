"""Local listing: link loops end, links out of the root are followed, one file is one row; a job lists in a task."""

from __future__ import annotations

import itertools
import logging
import os
import types

import pyarrow as pa
import pytest
import ray

from pipeline.batch.listing import discover_on_this_node
from pipeline.data import storage
from pipeline.data.discover import discover
from pipeline.errors import DataError
from tests.images import jpeg_bytes, write

pytestmark = pytest.mark.timeout(30)


def _tree(root: str, per_class: int = 3) -> dict[str, str]:
    """A splits-layout root of small photos; returns relpath -> class."""
    files = {}
    for split in ("train", "validation"):
        for cls in ("cats", "dogs"):
            for i in range(per_class):
                rel = f"{split}/{cls}/{cls}.{i}.jpg"
                write(os.path.join(root, rel), jpeg_bytes(color=(i, len(files), 9)))
                files[rel] = cls
    return files


def _listed(root: str) -> dict[str, str]:
    rows = discover(root).files.select(["relpath", "class_name"]).to_pylist()
    relpaths = [r["relpath"] for r in rows]
    assert len(relpaths) == len(set(relpaths)), "a file listed twice"
    return {r["relpath"]: r["class_name"] for r in rows}


def test_link_loops_are_not_followed_and_are_logged(tmp_path, caplog):
    root = str(tmp_path / "root")
    expected = _tree(root, per_class=20)
    os.symlink("..", os.path.join(root, "train", "dogs", "loop"))
    os.symlink("../..", os.path.join(root, "validation", "cats", "again"))
    with caplog.at_level(logging.WARNING, logger="pipeline.data.localtree"):
        assert _listed(root) == expected
    for link in ("train/dogs/loop", "validation/cats/again"):
        assert sum(link in r.getMessage() for r in caplog.records) == 1, caplog.text


def test_a_link_to_an_ancestor_of_the_root_is_not_followed(tmp_path, caplog):
    root = str(tmp_path / "root")
    expected = _tree(root)
    os.symlink(str(tmp_path), os.path.join(root, "train", "cats", "up"))
    os.symlink("/", os.path.join(root, "train", "dogs", "slash"))
    with caplog.at_level(logging.WARNING, logger="pipeline.data.localtree"):
        assert _listed(root) == expected
    assert "train/cats/up" in caplog.text and "train/dogs/slash" in caplog.text


def test_a_link_to_a_folder_outside_the_root_is_followed_once(tmp_path):
    root = str(tmp_path / "root")
    expected = _tree(root)
    for name in ("x.jpg", "y.jpg"):
        write(str(tmp_path / "outside" / "more" / name), jpeg_bytes())
    os.symlink(str(tmp_path / "outside" / "more"), os.path.join(root, "validation", "dogs", "linked"))
    # A second link to the same folder, and a link inside it back to the outside tree's top.
    os.symlink(str(tmp_path / "outside" / "more"), os.path.join(root, "validation", "dogs", "linked2"))
    os.symlink("..", str(tmp_path / "outside" / "more" / "top"))
    expected.update({"validation/dogs/linked/x.jpg": "dogs", "validation/dogs/linked/y.jpg": "dogs"})
    assert _listed(root) == expected


def test_two_folders_outside_the_root_linking_to_each_other_are_each_walked_once(tmp_path, caplog):
    """A loop no ancestor check sees (a -> b -> a, neither above the other) ends at the folder
    already walked, logged once, not at the kernel's limit of links in a path."""
    root = str(tmp_path / "root")
    expected = _tree(root)
    a, b = tmp_path / "outside" / "a", tmp_path / "outside" / "b"
    write(str(a / "a.jpg"), jpeg_bytes(color=(1, 2, 3)))
    write(str(b / "b.jpg"), jpeg_bytes(color=(3, 2, 1)))
    os.symlink(str(b), str(a / "to-b"))
    os.symlink(str(a), str(b / "to-a"))
    os.symlink(str(a), os.path.join(root, "train", "cats", "a"))
    expected.update({"train/cats/a/a.jpg": "cats", "train/cats/a/to-b/b.jpg": "cats"})
    with caplog.at_level(logging.WARNING, logger="pipeline.data.localtree"):
        assert _listed(root) == expected
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "train/cats/a/to-b/to-a" in warnings[0] and "already listed" in warnings[0], warnings


def test_two_class_folders_linking_to_one_outside_folder_are_not_both_listed(tmp_path, caplog):
    """One folder of photos cannot be both classes: the first class folder (sorted) lists it, the
    other is reported, and a class left empty is a clear error, not each photo under two labels."""
    root = str(tmp_path / "root")
    _tree(root)
    write(str(tmp_path / "outside" / "x.jpg"), jpeg_bytes())
    for cls in ("cats", "dogs"):
        folder = os.path.join(root, "train", cls)
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)
        os.symlink(str(tmp_path / "outside"), folder)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.localtree"):
        with pytest.raises(DataError, match="split 'train' has no images for class\\(es\\) dogs"):
            discover(root)
    assert "train/dogs is a folder already listed" in caplog.text, caplog.text


def test_one_file_by_two_paths_is_one_row(tmp_path):
    root = str(tmp_path / "root")
    expected = _tree(root)
    os.link(os.path.join(root, "train/cats/cats.0.jpg"), os.path.join(root, "train/cats/zz-hard.jpg"))
    os.link(os.path.join(root, "train/cats/cats.1.jpg"), os.path.join(root, "validation/dogs/hard-from-cats.jpg"))
    os.symlink("../cats/cats.2.jpg", os.path.join(root, "train/dogs/alias.jpg"))
    write(str(tmp_path / "outside.jpg"), jpeg_bytes())
    os.symlink(str(tmp_path / "outside.jpg"), os.path.join(root, "train/dogs/out-a.jpg"))
    os.symlink(str(tmp_path / "outside.jpg"), os.path.join(root, "train/dogs/out-b.jpg"))
    expected["train/dogs/out-a.jpg"] = "dogs"
    assert _listed(root) == expected


def test_a_broken_link_is_still_listed_as_missing(tmp_path):
    root = str(tmp_path / "root")
    _tree(root)
    os.symlink("nowhere.jpg", os.path.join(root, "train/cats/broken.jpg"))
    stamps = dict(storage.walk_files(os.path.join(root, "train", "cats")))
    assert stamps["broken.jpg"] == "missing"
    assert stamps["cats.0.jpg"] == f"{os.path.getsize(os.path.join(root, 'train/cats/cats.0.jpg'))}:" \
                                   f"{os.stat(os.path.join(root, 'train/cats/cats.0.jpg')).st_mtime_ns}"


def test_listing_is_sorted_and_skips_hidden_names(tmp_path):
    root = str(tmp_path / "root")
    for rel in ("b/2.jpg", "b/1.jpg", "a.jpg", ".hidden.jpg", ".git/x.jpg", "c/.d/y.jpg"):
        write(os.path.join(root, rel), b"x")
    assert [rel for rel, _ in storage.walk_files(root)] == ["a.jpg", "b/1.jpg", "b/2.jpg"]


def test_a_class_folder_that_links_inside_the_root_is_not_listed_twice(tmp_path, caplog):
    root = str(tmp_path / "root")
    files = _tree(root)
    for rel in [r for r in files if r.startswith("validation/cats/")]:
        os.remove(os.path.join(root, rel))
        del files[rel]
    os.rmdir(os.path.join(root, "validation", "cats"))
    os.symlink(os.path.join("..", "train", "cats"), os.path.join(root, "validation", "cats"))
    with caplog.at_level(logging.WARNING):
        with pytest.raises(DataError, match="no images for class"):
            discover(root)  # the validation cats are the training cats: nothing of its own
    assert "validation/cats is a link inside the data root" in caplog.text


def test_a_data_root_given_as_a_link_is_listed(tmp_path):
    files = _tree(str(tmp_path / "real"))
    os.symlink(tmp_path / "real", tmp_path / "link")
    assert _listed(str(tmp_path / "link")) == files
    assert [rel for rel, _ in storage.walk_files(str(tmp_path / "link" / "train"))] == sorted(
        rel[len("train/"):] for rel in files if rel.startswith("train/"))


def test_a_thousand_nested_folders_are_listed(tmp_path):
    chain = [str(tmp_path)]
    for _ in range(1500):  # os.makedirs (and Python 3.11's shutil.rmtree) recurse once per level
        chain.append(os.path.join(chain[-1], "d"))
        os.mkdir(chain[-1])
    write(os.path.join(chain[-1], "x.jpg"), b"x")
    try:
        assert [rel for rel, _ in storage.walk_files(str(tmp_path))] == ["d/" * 1500 + "x.jpg"]
    finally:
        os.remove(os.path.join(chain[-1], "x.jpg"))
        for folder in reversed(chain[1:]):
            os.rmdir(folder)


@pytest.mark.parametrize("layout", ["splits", "kaggle"])
def test_files_that_are_not_image_names_are_counted_by_extension(tmp_path, layout):
    root = str(tmp_path / "root")
    if layout == "splits":
        _tree(root, per_class=1)
        folder = os.path.join(root, "train", "cats")
    else:
        for name in ("cat.1.jpg", "dog.1.jpg", "cat.2.jpg", "dog.2.jpg", "cat.3.jpg", "dog.3.jpg"):
            write(os.path.join(root, name), jpeg_bytes())
        folder = root
    for name in ("IMG_1.HEIC", "IMG_2.heic", "notes.txt", "Makefile", "sub/scan.tiff"):
        write(os.path.join(folder, name), b"x")
    index = discover(root, layout, validation_fraction=0.5)
    assert index.ignored == {"": 1, ".heic": 2, ".tiff": 1, ".txt": 1}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_extraction_over_odd_names_and_loops_makes_each_photo_one_row(ray_cluster, tmp_path):
    from pipeline.batch.extract import run_extraction
    from pipeline.config import ExtractConfig
    from pipeline.data.shards import read_split
    from tests.hostile import ODD_NAMES

    root = str(tmp_path / "ro\\xe9ot")  # the root's own name holds a backslash the stored paths keep
    expected = _tree(root, per_class=2)
    for i, (disk, stored) in enumerate(ODD_NAMES):
        write(os.fsdecode(os.path.join(os.fsencode(root), b"train/cats", disk)), jpeg_bytes(color=(i, 7, 7)))
        expected[f"train/cats/{stored}"] = "cats"
    os.symlink("..", os.path.join(root, "train", "dogs", "loop"))
    os.symlink("../..", os.path.join(root, "validation", "dogs", "again"))
    os.link(os.path.join(root, "train/cats/cats.0.jpg"), os.path.join(root, "train/cats/zz-hard.jpg"))
    write(str(tmp_path / "outside" / "more" / "x.jpg"), jpeg_bytes())
    os.symlink(str(tmp_path / "outside" / "more"), os.path.join(root, "validation", "dogs", "linked"))
    expected["validation/dogs/linked/x.jpg"] = "dogs"
    out = str(tmp_path / "out")
    manifest = run_extraction(ExtractConfig(data_dir=root, output_dir=out, weights="none", image_size=32,
                                            precision="float32"))
    assert manifest["num_rejects"] == 0
    got = {}
    for split in ("train", "validation"):
        table = read_split(out, split)
        for path, cls in zip(table.column("path").to_pylist(), table.column("class_name").to_pylist()):
            assert path not in got, f"{path!r} is two rows"
            got[path] = cls
    assert got == expected


def _mapping_of(address: int) -> str:
    """The line of /proc/self/maps whose range holds ``address``."""
    with open("/proc/self/maps") as f:
        for line in f:
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            if low <= address < high:
                return line
    raise AssertionError(f"{address:#x} is in no mapping of this process")


@pytest.mark.timeout(120)
def test_the_driver_reads_the_listing_in_the_object_store_where_the_decode_tasks_take_it(ray_cluster, tmp_path):
    root = str(tmp_path / "root")
    for split, cls, i in itertools.product(("train", "validation"), ("cats", "dogs"), range(1000)):
        write(os.path.join(root, split, cls, f"{cls[:-1]}.{i}.jpg"), b"")  # listing reads names, not pixels
    options = types.SimpleNamespace(layout="splits", validation_fraction=0.2, max_images_per_class=None, exclude=None)
    index, ref = discover_on_this_node(root, options)
    assert index.files.equals(discover(root).files) and index.classes == ["cats", "dogs"]
    # One copy: the driver's table is the object store's (shared memory, as the decode tasks map it), not its own.
    paths = index.files.column("relpath").chunk(0).buffers()[2]
    assert "/dev/shm/plasma" in _mapping_of(paths.address)
    assert ray.get(ref).column("relpath").chunk(0).buffers()[2].address == paths.address


@pytest.mark.timeout(120)
def test_an_error_of_the_listing_task_is_the_data_error_itself(ray_cluster, tmp_path):
    root = str(tmp_path / "root")
    write(os.path.join(root, "train", "cats", "a.jpg"), b"")
    options = types.SimpleNamespace(layout="splits", validation_fraction=0.2, max_images_per_class=None, exclude=None)
    with pytest.raises(DataError) as raised:
        discover_on_this_node(root, options)
    assert type(raised.value) is DataError and "missing: validation" in str(raised.value), raised.value


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_first_extraction_puts_its_listing_in_the_object_store_once(ray_cluster, tmp_path, monkeypatch):
    """The listing task's object is the decode tasks' source on a first run (no ``ray.put`` of it by the
    driver); an update puts only its files to do."""
    from pipeline.batch.extract import run_extraction
    from pipeline.config import ExtractConfig

    root, out = str(tmp_path / "root"), str(tmp_path / "out")
    files = _tree(root, per_class=3)
    put_tables, put = [], ray.put

    def recording_put(value, *args, **kwargs):
        if isinstance(value, pa.Table):
            put_tables.append(value.num_rows)
        return put(value, *args, **kwargs)

    monkeypatch.setattr(ray, "put", recording_put)
    cfg = ExtractConfig(data_dir=root, output_dir=out, weights="none", image_size=32, precision="float32")
    assert run_extraction(cfg)["num_images"] == len(files)
    assert len(files) not in put_tables, put_tables
    write(os.path.join(root, "train", "cats", "cats.new.jpg"), jpeg_bytes(color=(9, 9, 9)))
    assert run_extraction(cfg)["num_images"] == len(files) + 1
    assert put_tables[-1:] == [1], put_tables  # the update's one new file, put for its decode task
