"""The block-4 cache: extraction writes VGG16's block-4 outputs (and of mirrored training images),
and fine-tuning trains block 5 + top on them, then exports a full image → class model."""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.batch.extract import run_extraction
from pipeline.config import ExtractConfig, FinetuneConfig, TrainTopConfig
from pipeline.data import storage
from pipeline.data.shards import features_as_array, read_split
from pipeline.errors import ConfigError
from pipeline.images.decode import load_image
from pipeline.nets import models, vgg16, weights
from tests.conftest import assert_curves_drawn, checkpoint_of_epoch, real_images

pytestmark = pytest.mark.timeout(900)

SIZE = 64  # block 4: 4x4x512, features: 2x2x512; real torchvision weights


@pytest.fixture(scope="module")
def plain_then_cached(ray_cluster, real_root, tmp_path_factory):
    """An extraction without the cache, then the same one asked for the cache (an upgrade in place)."""
    out = str(tmp_path_factory.mktemp("b4") / "features")
    cfg = dict(data_dir=real_root, output_dir=out, image_size=SIZE, precision="float32", batch_size=8)
    plain = run_extraction(ExtractConfig(**cfg))
    cached = run_extraction(ExtractConfig(**cfg, cache_block4=True))
    return plain, cached


def _block4(manifest, split, columns=None):
    return read_split(storage.join(manifest["output_dir"], manifest["block4"]["dir"]), split, columns)


def test_cache_is_added_in_place_and_then_reused(plain_then_cached, capsys):
    plain, cached = plain_then_cached
    assert plain["block4"] is None
    # The cache runs the mirror images for block4_flipped; their features are not kept.
    for manifest in (plain, cached):
        assert "features_flipped" not in read_split(manifest["output_dir"], "train").column_names
    assert cached["block4"]["shape"] == list(vgg16.block4_shape(SIZE)) == [4, 4, 512]
    assert cached["fingerprint"] == plain["fingerprint"] and cached["counts"] == plain["counts"]
    again = run_extraction(ExtractConfig(**{k: cached["config"][k] for k in
                                            ("data_dir", "output_dir", "image_size", "precision", "batch_size")}))
    assert again["created_at"] == cached["created_at"], "a finished cache is reused, also by a run that needs none"
    assert "reusing finished extraction" in capsys.readouterr().out


def test_cache_rows_match_the_features_and_only_training_rows_are_mirrored(plain_then_cached):
    _, manifest = plain_then_cached
    for split in ("train", "validation"):
        features = read_split(manifest["output_dir"], split, ["path", "label"])
        block4 = _block4(manifest, split)
        assert sorted(block4.column("path").to_pylist()) == sorted(features.column("path").to_pylist())
        assert block4.num_rows == len(set(block4.column("path").to_pylist())) == 20
        assert ("block4_flipped" in block4.column_names) == (split == "train")
    shard = storage.list_parquet(os.path.join(manifest["output_dir"], "block4", "train"))[0]
    assert str(pq.read_table(shard).schema.field("block4").type) == "fixed_size_list<element: halffloat>[8192]"


def test_an_older_float32_cache_is_updated_in_float32(plain_then_cached, real_root, tmp_path):
    """A cache written before float16 was the default keeps its dtype when its data root changes,
    so the folder's parts stay one schema."""
    _, cached = plain_then_cached
    root, out = str(tmp_path / "root"), str(tmp_path / "features")
    shutil.copytree(real_root, root)
    shutil.copytree(cached["output_dir"], out)
    parts = glob.glob(os.path.join(out, "block4", "*", "*.parquet"))
    for part in parts:  # as the older code wrote them: float32, and no dtype recorded
        table = pq.read_table(part)
        pq.write_table(table.cast(pa.schema([f.with_type(pa.list_(pa.float32(), f.type.list_size))
                                             if f.name.startswith("block4") else f for f in table.schema])), part)
    for name in ("run.json", "manifest.json"):
        with open(os.path.join(out, name)) as f:
            record = json.load(f)
        record.pop("block4_dtype", None)
        (record.get("block4") or {}).pop("dtype", None)
        with open(os.path.join(out, name), "w") as f:
            json.dump(record, f)
    shutil.copyfile(real_images("train", "cats", 1, start=10)[0], os.path.join(root, "train", "cats", "added.jpg"))
    again = run_extraction(ExtractConfig(data_dir=root, output_dir=out, image_size=SIZE, precision="float32",
                                         batch_size=8, cache_block4=True))
    assert again["update"]["added"] == 1 and again["block4"]["dtype"] == "float32"
    parts = glob.glob(os.path.join(out, "block4", "*", "*.parquet"))
    assert len(parts) > len(glob.glob(os.path.join(cached["output_dir"], "block4", "*", "*.parquet")))
    assert {str(pq.read_schema(p).field("block4").type) for p in parts} == {"fixed_size_list<element: float>[8192]"}


def test_cached_outputs_equal_the_network_on_the_images(plain_then_cached, real_root):
    """Block 4 of each image and of its mirror image, as Keras computes them in process, and
    block 5 of the cached block 4 gives the stored bottleneck features."""
    _, manifest = plain_then_cached
    arrays = weights.load_weight_arrays(weights.resolve_weights("torchvision"), SIZE)
    network = models.block4_and_features(SIZE, arrays, "torch", "float32")
    table = _block4(manifest, "train")
    shape = manifest["block4"]["shape"]
    images = np.stack([load_image(os.path.join(real_root, p), SIZE) for p in table.column("path").to_pylist()])
    stored = features_as_array(table.select(["block4"]).rename_columns(["features"]), shape)
    mirrored = features_as_array(table.select(["block4_flipped"]).rename_columns(["features"]), shape)
    # Stored in float16: its rounding (at most 2^-11 of a value) and float32's noise.
    np.testing.assert_allclose(stored, network.predict(images, verbose=0)[0], rtol=6e-4, atol=1e-4)
    np.testing.assert_allclose(mirrored, network.predict(images[:, :, ::-1], verbose=0)[0], rtol=6e-4, atol=1e-4)
    assert np.abs(stored - mirrored).max() > 0.1, "the mirror image's block 4 is not the image's"

    top = models.block5_classifier(shape, 2)
    top.get_layer("vgg16_block5").set_weights(arrays[-6:])
    block5 = top.get_layer("vgg16_block5")
    features = read_split(manifest["output_dir"], "train", ["path", "features"])
    by_path = dict(zip(features.column("path").to_pylist(), features_as_array(features, manifest["feature_shape"])))
    expected = np.stack([by_path[p] for p in table.column("path").to_pylist()])
    # Block 5 of the float16 maps: their rounding carried through three convolutions (the
    # features are up to about 20; wrong weights or rows would be off by whole units).
    np.testing.assert_allclose(block5.predict(stored, verbose=0), expected, rtol=1e-3, atol=1e-2)


def test_finetune_on_the_cache_exports_the_model_it_trained(plain_then_cached, real_root, tmp_path):
    from pipeline.nets.modelfile import load_classifier, read_metadata
    from pipeline.training.checkpoints import load_checkpoint_weights
    from pipeline.training.finetune import finetune
    from pipeline.training.top import train_top

    _, manifest = plain_then_cached
    out = str(tmp_path / "run")
    train_top(TrainTopConfig(features_dir=manifest["output_dir"], output_dir=out, epochs=2, batch_size=8,
                             precision="float32"))
    # The cache is fine-tuning's default.
    summary = finetune(FinetuneConfig(output_dir=out, epochs=2, batch_size=8, num_workers=2,
                                      precision="float32", learning_rate=1e-3))
    job = os.path.join(out, "finetune")
    assert summary["cached_block4"] is True and summary["epochs"] == 2
    assert summary["model"] == os.path.join(job, "model.keras")
    assert_curves_drawn(os.path.join(job, "curves.png"))
    meta = read_metadata(summary["model"])
    assert meta["kind"] == "finetune" and meta["cached_block4"] and meta["image_size"] == SIZE
    assert meta["features_dir"] == os.path.abspath(manifest["output_dir"])

    # The exported image model must compute what the trained block-5 model (best epoch) computes on the cache.
    model, _ = load_classifier(summary["model"])
    trained = models.block5_classifier(manifest["block4"]["shape"], 2)
    load_checkpoint_weights(checkpoint_of_epoch(os.path.join(job, "ray_train"), summary["best_epoch"]), trained)
    initial = weights.load_weight_arrays(weights.resolve_weights("torchvision"), SIZE)[-6:]
    # Any change: weights no step touched are bitwise the initial ones. The size depends on the data
    # (here the best epoch is often the first, whose two steps see a top model already near zero loss).
    assert max(np.abs(a - b).max() for a, b in zip(models.block5_weights(trained), initial)) > 0, \
        "fine-tuning must have changed block 5"
    table = _block4(manifest, "validation")
    images = np.stack([load_image(os.path.join(real_root, p), SIZE) for p in table.column("path").to_pylist()])
    cached = features_as_array(table.select(["block4"]).rename_columns(["features"]), manifest["block4"]["shape"])
    on_images = model.predict(images, verbose=0)
    # The cache holds float16 block-4 maps; the image model computes them in float32.
    np.testing.assert_allclose(on_images, trained.predict(cached, verbose=0), rtol=0, atol=1e-3)
    labels = table.column("label").to_numpy()
    assert summary["accuracy"] == pytest.approx(float(((on_images[:, 0] > 0.5) == labels).mean()))

    # --no-cache-block4 streams the top model's photos through all of VGG16, into its own folder.
    streamed = finetune(FinetuneConfig(output_dir=out, cache_block4=False, epochs=1, batch_size=8,
                                       precision="float32", learning_rate=1e-3))
    assert streamed["cached_block4"] is False and streamed["epochs"] == 1
    assert streamed["model"] == os.path.join(out, "finetune_streamed", "model.keras")
    streamed_meta = read_metadata(streamed["model"])
    assert streamed_meta["data_dir"] == os.path.abspath(real_root) and not streamed_meta["cached_block4"]


def test_cached_finetuning_refuses_other_images(real_root):
    with pytest.raises(ConfigError, match="add --no-cache-block4"):
        FinetuneConfig(data_dir=real_root)
    assert FinetuneConfig(data_dir=real_root, cache_block4=False).data_dir == real_root
