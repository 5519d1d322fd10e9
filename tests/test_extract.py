"""Feature extraction end to end on a real Ray cluster, real photos, real VGG16 weights."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import tarfile
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.extract_features import main as extract_main
from pipeline.batch.extract import run_extraction
from pipeline.config import ExtractConfig
from pipeline.data import locks, storage
from pipeline.data.shards import features_as_array, read_split
from pipeline.errors import ConfigError, DataError, OutputError, WeightsError
from pipeline.prechecks import preflight
from pipeline.images.decode import load_image
from pipeline.nets import weights
from tests.conftest import make_real_root, real_images
from tests.images import bad_files

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def torchvision_extraction(ray_cluster, real_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("features") / "real")
    cfg = ExtractConfig(data_dir=real_root, output_dir=out, precision="float32", batch_size=8)
    return cfg, run_extraction(cfg)


@pytest.fixture(scope="module")
def small_extraction(ray_cluster, real_root, tmp_path_factory):
    """The 40 real photos at 32 px with seeded random weights, in float32: quick, for checks that
    need no informative features."""
    out = str(tmp_path_factory.mktemp("small") / "features")
    return run_extraction(ExtractConfig(data_dir=real_root, output_dir=out, image_size=32, weights="none",
                                        precision="float32"))


def shards(output_dir: str, split: str) -> list[pa.Table]:
    """Each Parquet shard of one split, rows in their stored order, shards in name order."""
    return [pq.read_table(path) for path in sorted(storage.list_parquet(os.path.join(output_dir, split)))]


def test_one_row_per_file_with_folder_labels(torchvision_extraction, real_root):
    cfg, manifest = torchvision_extraction
    assert manifest["classes"] == ["cats", "dogs"]
    assert manifest["counts"] == {"train": {"cats": 10, "dogs": 10}, "validation": {"cats": 10, "dogs": 10}}
    assert manifest["num_rejects"] == 0 and manifest["weights"]["source"] == "torchvision"
    assert manifest["preprocessing"] == "torch" and manifest["feature_shape"] == [7, 7, 512]
    assert manifest["config"]["image_size"] == 224, "VGG16's own input size is the default"
    for split in ("train", "validation"):
        table = read_split(cfg.output_dir, split)
        paths = table.column("path").to_pylist()
        assert len(paths) == len(set(paths)) == 20
        expected = sorted(os.path.relpath(os.path.join(dp, f), real_root)
                          for dp, _, fs in os.walk(os.path.join(real_root, split)) for f in fs)
        assert sorted(paths) == expected
        for path, label, name in zip(paths, table.column("label").to_pylist(), table.column("class_name").to_pylist()):
            assert path.split(os.sep)[1] == name == ["cats", "dogs"][label]


def test_each_actor_records_its_busy_time(torchvision_extraction):
    _, manifest = torchvision_extraction
    actors = manifest["inference_actors"]
    assert sum(a["rows"] for a in actors) == 40
    for a in actors:
        assert 0 < a["busy_s"] <= a["active_s"] + 0.01 <= manifest["elapsed_s"] + 0.01
        assert abs(a["busy_fraction"] - a["busy_s"] / a["active_s"]) < 0.01  # both seconds are rounded


def test_a_call_split_over_two_written_blocks_counts_once():
    from pipeline.batch.inference import CommittingSink, Tally

    def block(rows, start, end, actor='{"node": "n", "pid": 1, "precision": "float32"}'):
        return Tally().count({"actor": np.array([actor] * rows, object), "decode_node": np.array(["d"] * rows, object),
                              "call_start": np.full(rows, start), "call_end": np.full(rows, end)})

    sink = CommittingSink("out", "run")
    sink.on_write_complete(types.SimpleNamespace(write_returns=[block(3, 10.0, 12.0), block(2, 10.0, 12.0),
                                                                block(4, 13.0, 14.0)]))
    merged = sink.tally.report("auto")
    assert merged["processed"] == 9
    (actor,) = merged["inference_actors"]
    assert (actor["busy_s"], actor["active_s"], actor["busy_fraction"]) == (3.0, 4.0, 0.75)


def test_features_match_the_same_model_in_process(torchvision_extraction, real_root):
    cfg, manifest = torchvision_extraction
    from pipeline.nets.models import feature_extractor

    source = weights.resolve_weights("torchvision")
    model = feature_extractor(cfg.image_size, weights.load_weight_arrays(source, cfg.image_size), "torch", "float32")
    table = read_split(cfg.output_dir, "validation")
    stored = features_as_array(table, manifest["feature_shape"])
    images = np.stack([load_image(os.path.join(real_root, p), cfg.image_size) for p in table.column("path").to_pylist()])
    direct = model.predict(images, batch_size=8, verbose=0)
    np.testing.assert_allclose(stored, direct, rtol=1e-4, atol=1e-4)
    assert stored.std() > 0.1, "real weights give informative features"


def test_feature_column_is_plain_arrow(torchvision_extraction):
    cfg, manifest = torchvision_extraction
    shard = storage.list_parquet(os.path.join(cfg.output_dir, "train"))[0]
    table = pq.read_table(shard)
    assert str(table.schema.field("features").type) == "fixed_size_list<element: float>[25088]"
    flat = table.column("features").combine_chunks().flatten().to_numpy()
    assert flat.reshape(len(table), *manifest["feature_shape"]).shape[1:] == (7, 7, 512)
    assert len(pq.read_table(os.path.join(cfg.output_dir, "rejects.parquet"))) == 0


def test_bfloat16_extraction_writes_float32_features_close_to_float32s(small_extraction, real_root, tmp_path):
    """VGG16 computes in bfloat16; the features are stored as float32 like any others, each row
    within a cosine of 0.99 of the float32 extraction's (bfloat16 keeps 8 bits of mantissa)."""
    bf16 = run_extraction(ExtractConfig(data_dir=real_root, output_dir=str(tmp_path / "bf16"), image_size=32,
                                        weights="none", precision="bfloat16"))
    assert bf16["precision"] == "bfloat16"
    dim = int(np.prod(bf16["feature_shape"]))
    for split in ("train", "validation"):
        for shard in storage.list_parquet(os.path.join(bf16["output_dir"], split)):
            stored = pq.read_schema(shard).field("features").type
            assert pa.types.is_fixed_size_list(stored) and (stored.value_type, stored.list_size) == (pa.float32(), dim)
        want, got = (features_as_array(read_split(m["output_dir"], split).sort_by("path"), [dim])
                     for m in (small_extraction, bf16))
        cosine = (want * got).sum(axis=1) / (np.linalg.norm(want, axis=1) * np.linalg.norm(got, axis=1))
        assert cosine.min() > 0.99, (split, cosine.min())
        assert not np.array_equal(want, got), "the bfloat16 run computed in float32"


def test_rows_are_stored_in_a_seeded_order_that_mixes_the_classes(small_extraction, real_root, tmp_path):
    """Listed class by class, rows are written in an order drawn from a fixed seed: a second run
    stores the same rows in the same order, and a reader streaming a shard meets both classes in
    its first batch of 8 rows (listing order would give it 8 cats)."""
    again = run_extraction(ExtractConfig(data_dir=real_root, output_dir=str(tmp_path / "again"), image_size=32,
                                         weights="none", precision="float32"))
    for split in ("train", "validation"):
        first, second = shards(small_extraction["output_dir"], split), shards(again["output_dir"], split)
        assert [t.column("path").to_pylist() for t in first] == [t.column("path").to_pylist() for t in second], split
        for table in first:
            assert set(table.column("class_name").to_pylist()[:8]) == {"cats", "dogs"}, (split, table.column("path"))


def test_finished_output_is_reused_and_overwrite_redoes_it(torchvision_extraction, capsys):
    cfg, manifest = torchvision_extraction
    again = run_extraction(cfg)
    assert "reusing finished extraction" in capsys.readouterr().out
    assert again["created_at"] == manifest["created_at"]
    redone = run_extraction(dataclasses.replace(cfg, overwrite=True))
    assert redone["processed"] == redone["num_images"] == 40 and redone["update"]["reused"] == 0
    assert redone["created_at"] != manifest["created_at"]
    assert sorted(read_split(cfg.output_dir, "train").column("path").to_pylist()) == sorted(
        read_split(cfg.output_dir, "train").column("path").unique().to_pylist())


def test_bad_files_are_listed_and_good_files_kept(ray_cluster, tmp_path):
    root = tmp_path / "data"
    make_real_root(str(root), 3)
    shutil.copyfile(real_images("train", "cats", 1)[0], root / "train" / "cats" / "UPPER CASE ü.JPG")
    expected = bad_files(str(root / "train" / "dogs"))
    out = str(tmp_path / "out")
    manifest = run_extraction(ExtractConfig(data_dir=str(root), output_dir=out, weights="none",
                                            precision="float32", max_reject_fraction=0.5, batch_size=4))
    rejects = pq.read_table(os.path.join(out, "rejects.parquet")).to_pylist()
    got = {os.path.basename(r["path"]): r["reason"] for r in rejects}
    assert got == expected
    assert all(r["split"] == "train" and r["error"] for r in rejects)
    assert manifest["counts"]["train"] == {"cats": 4, "dogs": 3}
    assert manifest["num_rejects"] == len(expected)
    paths = read_split(out, "train").column("path").to_pylist()
    assert os.path.join("train", "cats", "UPPER CASE ü.JPG") in paths and len(paths) == len(set(paths)) == 7


def test_too_many_rejects_fail_with_a_clear_message(ray_cluster, tmp_path):
    root = tmp_path / "data"
    for split in ("train", "validation"):
        for cls in ("a", "b"):
            os.makedirs(root / split / cls)
            shutil.copyfile(real_images("train", "cats", 1)[0], root / split / cls / "ok.jpg")
    bad_files(str(root / "train" / "a"))
    with pytest.raises(DataError, match="could not be decoded, more than --max-reject-fraction"):
        run_extraction(ExtractConfig(data_dir=str(root), output_dir=str(tmp_path / "o"), weights="none",
                                     precision="float32"))
    assert not os.path.exists(tmp_path / "o" / "manifest.json"), "a failed extraction must not look finished"


def test_kaggle_flat_layout(ray_cluster, tmp_path):
    root = tmp_path / "flat"
    os.makedirs(root)
    for cls in ("cats", "dogs"):
        for p in real_images("train", cls, 8):
            shutil.copyfile(p, root / os.path.basename(p))
    out = str(tmp_path / "out")
    manifest = run_extraction(ExtractConfig(data_dir=str(root), layout="kaggle", validation_fraction=0.3,
                                            output_dir=out, weights="none", precision="float32"))
    assert manifest["classes"] == ["cat", "dog"]
    assert sum(sum(c.values()) for c in manifest["counts"].values()) == 16
    train = set(read_split(out, "train").column("path").to_pylist())
    val = set(read_split(out, "validation").column("path").to_pylist())
    assert not train & val and len(train | val) == 16 and val
    import hashlib

    # README's rule, computed here: a file is in validation when the first 8 bytes of its path's
    # sha256, as a fraction of 2**64, fall below --validation-fraction.
    position = {p: int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "big") / 2**64 for p in train | val}
    assert val == {p for p, x in position.items() if x < 0.3}


def test_an_extraction_with_other_settings_is_refused_naming_them(ray_cluster, real_root, tmp_path):
    out = str(tmp_path / "out")

    def extract(**changes):
        return run_extraction(ExtractConfig(**{"data_dir": real_root, "output_dir": out, "weights": "none",
                                               "precision": "float32", "max_images_per_class": 2, "image_size": 32,
                                               **changes}))

    first = extract()
    assert first["settings"]["image_size"] == 32 and extract()["created_at"] == first["created_at"]
    with pytest.raises(OutputError, match=r"holds an extraction made with other settings.*image_size: 32 → 64"):
        extract(image_size=64)
    # Options that do not change a row (how the work is cut and run) are not settings.
    assert extract(batch_size=4, block_files=3)["created_at"] == first["created_at"]


def test_an_older_output_recording_the_retired_mirror_train_off_is_reused(ray_cluster, real_root, tmp_path):
    """Outputs of versions that had --mirror-train record mirror_train; off (every output without
    the option) it is the same extraction, on (features_flipped written too) it is refused."""
    out = tmp_path / "out"
    cfg = ExtractConfig(data_dir=real_root, output_dir=str(out), weights="none", precision="float32",
                        max_images_per_class=2, image_size=32)
    first = run_extraction(cfg)

    def record_mirror_train(value):
        for name in ("run.json", "manifest.json"):
            recorded = json.loads((out / name).read_text())
            recorded["settings"]["mirror_train"] = value
            (out / name).write_text(json.dumps(recorded))

    record_mirror_train(False)
    assert run_extraction(cfg)["created_at"] == first["created_at"]
    record_mirror_train(True)
    with pytest.raises(OutputError, match=r"other settings or inputs \(mirror_train: True → None\); pass --overwrite"):
        run_extraction(cfg)


def test_half_written_parts_of_a_killed_run_are_never_reused(ray_cluster, real_root, tmp_path):
    out = tmp_path / "out"
    cfg = ExtractConfig(data_dir=real_root, output_dir=str(out), weights="none", precision="float32",
                        max_images_per_class=2, image_size=32)
    run_extraction(cfg)
    # What a run killed mid-write leaves: shard files without a ledger entry, a temporary file,
    # and no manifest.
    shard = storage.list_parquet(str(out / "train"))[0]
    shutil.copyfile(shard, out / "train" / "part-killed-00007-0000.parquet")
    (out / "validation" / "part-killed-00008-0000.parquet.tmp-123").write_bytes(b"half-written")
    os.remove(out / "manifest.json")
    manifest = run_extraction(cfg)
    assert manifest["processed"] == 0 and manifest["update"]["reused"] == 8
    assert not any("killed" in n for s in ("train", "validation") for n in os.listdir(out / s))
    assert len(read_split(str(out), "train")) == 4


def test_a_folder_this_project_did_not_write_is_refused(ray_cluster, real_root, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds files that are not an extraction of this project"):
        run_extraction(ExtractConfig(data_dir=real_root, output_dir=str(tmp_path / "out"), weights="none",
                                     precision="float32"))


def test_another_run_holding_the_output_is_refused(ray_cluster, real_root, tmp_path):
    out = str(tmp_path / "out")
    with locks.output_lock(out):
        with pytest.raises(OutputError, match="being written by another run"):
            run_extraction(ExtractConfig(data_dir=real_root, output_dir=out, weights="none", precision="float32"))


def test_class_mismatch_is_a_clear_error(tmp_path):
    from pipeline.data.discover import discover

    for split, classes in (("train", ("cats", "dogs")), ("validation", ("cats", "horses"))):
        for cls in classes:
            os.makedirs(tmp_path / split / cls)
            shutil.copyfile(real_images("train", "cats", 1)[0], tmp_path / split / cls / "x.jpg")
    with pytest.raises(DataError, match=r"train has \[cats, dogs\] but validation has \[cats, horses\]"):
        discover(str(tmp_path))


def _fake_archive(path, member_bytes: bytes) -> None:
    import io

    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(weights.LPIPS_MEMBER)
        info.size = len(member_bytes)
        tar.addfile(info, io.BytesIO(member_bytes))


def test_weights_archive_with_wrong_sha256_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("RIC_CACHE_DIR", str(tmp_path))
    _fake_archive(tmp_path / weights.LPIPS_ARCHIVE, pickle.dumps({"VGG16_0": {}}))
    with pytest.raises(WeightsError, match="sha256 of .* is .*, expected a286e44c"):
        weights.fetch_lpips_archive(str(tmp_path))
    with pytest.raises(WeightsError, match="sha256"):
        weights.read_lpips_vgg16(str(tmp_path / weights.LPIPS_ARCHIVE))


@pytest.mark.slow
def test_weights_files_are_read_without_keras_in_both_formats(tmp_path):
    """Keras 3 ``.weights.h5`` and Keras 2 HDF5 (the format of Keras' ImageNet download) give the
    arrays Keras itself loads; a file of another network is refused by name."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    from pipeline.nets.models import scratch_cnn, vgg16_conv_base

    source = weights.resolve_weights("torchvision")
    model = vgg16_conv_base(64)
    model.load_weights(source.path)
    expected = model.get_weights()
    legacy = str(tmp_path / "legacy.h5")
    with h5py.File(legacy, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    for path in (source.path, legacy):
        arrays = weights.read_vgg16_weights(path)
        assert len(arrays) == len(expected) == 26
        for got, want in zip(arrays, expected):
            np.testing.assert_array_equal(got, want)

    other = str(tmp_path / "scratch.weights.h5")
    scratch_cnn(64, 2).save_weights(other)
    with pytest.raises(WeightsError, match="not a VGG16 conv-base weights file: it has no layer 'block1_conv1'"):
        weights.read_vgg16_weights(other)
    text = tmp_path / "notes.weights.h5"
    text.write_text("not hdf5")
    with pytest.raises(WeightsError, match="is not an HDF5 weights file"):
        weights.read_vgg16_weights(str(text))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError, match="refusing to unpickle .*system"):
        weights.safe_unpickle(pickle.dumps({"VGG16_0": {"Conv_0": _RunsCode()}}))
    assert not os.path.exists("pwned")
    arrays = weights.safe_unpickle(pickle.dumps({"k": np.arange(6, dtype=np.float32).reshape(2, 3)}))
    assert arrays["k"].shape == (2, 3)


@pytest.mark.parametrize("argv, message", [
    (["--image-size", "0"], "--image-size must be an integer of at least 32"),
    (["--weights", "imagenet21k"], "--weights must be one of torchvision, keras, none"),
    (["--precision", "fp8"], "--precision must be one of auto, float32, bfloat16, float16"),
    (["--layout", "coco"], "--layout must be one of splits, kaggle"),
    (["--batch-size", "-1"], "--batch-size must be a positive number"),
    (["--max-reject-fraction", "2"], "--max-reject-fraction must be in [0, 1]"),
    (["--data-dir", "/nonexistent/folder"], "--data-dir '/nonexistent/folder' cannot be used: it does not exist"),
])
def test_invalid_options_fail_before_any_work(argv, message, capsys):
    """Exit status 2 from argparse (values a config refuses) or from the preflight (locations)."""
    try:
        code = extract_main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_output_path_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(ConfigError, match="is an existing file"):
        preflight(ExtractConfig(output_dir=str(target)))


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        extract_main(["--help"])
    text = capsys.readouterr().out
    import dataclasses

    for f in dataclasses.fields(ExtractConfig):
        assert "--" + f.name.replace("_", "-") in text


@pytest.mark.slow
def test_caffe_preprocessing_in_built_in_layers_equals_bgr_minus_mean(tmp_path):
    """Caffe-style weights take BGR minus the ImageNet mean. The model does it with a built-in
    Normalization on RGB and the first kernel's input channels reversed; same features."""
    from pipeline.nets.models import CAFFE_MEAN_BGR, feature_extractor, vgg16_conv_base

    path = weights.resolve_weights("torchvision").path
    source = weights.resolve_weights(path)  # a weights file: caffe preprocessing by default
    assert source.preprocessing == "caffe"
    ours = feature_extractor(32, weights.load_weight_arrays(source, 32), "caffe", "float32")
    reference = vgg16_conv_base(32)
    reference.set_weights(weights.read_vgg16_weights(path))
    images = np.stack([load_image(p, 32) for p in real_images("train", "cats", 2)]).astype(np.float32)
    expected = reference.predict(images[..., ::-1] - np.array(CAFFE_MEAN_BGR, np.float32), verbose=0)
    np.testing.assert_allclose(ours.predict(images, verbose=0), expected, rtol=1e-4, atol=1e-4)
