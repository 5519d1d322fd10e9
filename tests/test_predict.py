"""Batch prediction end to end: every model kind, odd folders and files, every output form."""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from jobs.predict import main as predict_main
from pipeline.batch import predict as batch_predict
from pipeline.batch.predict import run_prediction
from pipeline.config import PredictConfig
from pipeline.prechecks import preflight
from pipeline.data import storage
from pipeline.errors import DataError, OutputError
from pipeline.images.decode import load_image
from pipeline.nets import models, vgg16
from pipeline.nets.modelfile import load_classifier, save_classifier
from tests.conftest import real_images
from tests.images import bad_files

pytestmark = pytest.mark.timeout(600)
SIZE = 48
CLASSES = ["cats", "dogs"]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """One small untrained model of each kind, saved the way the training jobs save them."""
    import keras

    keras.utils.set_random_seed(3)
    folder = tmp_path_factory.mktemp("models")
    shape = vgg16.feature_shape(SIZE)
    built = {
        "top": models.image_classifier(models.feature_extractor(SIZE, None, "torch"),
                                       models.top_classifier(shape, 2), name="vgg16_bottleneck_classifier"),
        "finetune": models.image_classifier(models.feature_extractor(SIZE, None, "caffe"),
                                            models.top_classifier(shape, 2), name="vgg16_finetuned"),
        "scratch": models.scratch_cnn(SIZE, 2),
    }
    paths = {}
    for kind, model in built.items():
        paths[kind] = str(folder / f"{kind}.keras")
        save_classifier(model, paths[kind], {"kind": kind, "classes": CLASSES, "image_size": SIZE})
    return paths


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Class-named folders, nested, with odd names and bad files."""
    root = tmp_path_factory.mktemp("photos")
    for cls in CLASSES:
        for i, src in enumerate(real_images("validation", cls, 4)):
            sub = root / cls / ("nested/deeper" if i == 0 else "")
            os.makedirs(sub, exist_ok=True)
            name = {1: "UPPER.JPG", 2: "with space ñandú.jpg"}.get(i, os.path.basename(src))
            shutil.copyfile(src, sub / name)
    bad = bad_files(str(root / "dogs"))
    os.makedirs(root / "cats" / "empty folder")
    return str(root), {os.path.join("dogs", n) for n in bad}


@pytest.mark.parametrize("kind", ["top", "finetune", "scratch"])
def test_predictions_equal_in_process_predict(ray_cluster, model_files, photo_folder, tmp_path, kind):
    root, bad = photo_folder
    out = str(tmp_path / "pred.parquet")
    summary = run_prediction(PredictConfig(model=model_files[kind], input=root, output=out, precision="float32",
                                           batch_size=3))
    table = pq.read_table(out)
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 8 == summary["num_images"]
    assert table.schema.names == ["path", "predicted_class", "confidence", "prob_cats", "prob_dogs"]
    model, _ = load_classifier(model_files[kind])
    images = np.stack([load_image(os.path.join(root, p), SIZE) for p in paths])
    expected = models.probabilities(model.predict(images, verbose=0), 2)
    got = np.stack([table.column("prob_cats").to_numpy(), table.column("prob_dogs").to_numpy()], axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert table.column("predicted_class").to_pylist() == [CLASSES[i] for i in expected.argmax(axis=1)]
    np.testing.assert_allclose(table.column("confidence").to_numpy(), expected.max(axis=1), rtol=1e-5)
    rejects = pq.read_table(str(tmp_path / "pred.rejects.parquet"))
    assert set(rejects.column("path").to_pylist()) == bad


def test_every_file_exactly_once_with_odd_names_and_accuracy(ray_cluster, model_files, photo_folder, tmp_path, capsys):
    root, bad = photo_folder
    out = str(tmp_path / "pred.csv")
    assert predict_main(["--model", model_files["scratch"], "--input", root, "--output", out]) == 0
    text = capsys.readouterr().out
    table = pacsv.read_csv(out)
    paths = table.column("path").to_pylist()
    # The printed accuracy and confusion matrix, recomputed from the written rows and their folders.
    truth = [p.split(os.sep)[0] for p in paths]
    predicted = table.column("predicted_class").to_pylist()
    accuracy = sum(t == p for t, p in zip(truth, predicted)) / len(paths)
    assert f"accuracy {accuracy:.4f} on {len(paths)} images in class folders" in text
    matrix = [[sum(t == a and p == b for t, p in zip(truth, predicted)) for b in CLASSES] for a in CLASSES]
    rows = [line.split() for line in text.splitlines()
            if line.split()[:1] in (["cats"], ["dogs"]) and all(v.isdigit() for v in line.split()[1:])]
    assert [[int(v) for v in r[1:]] for r in rows] == matrix
    assert re.search(r"predicted 8 images \(\d+ rejected\) .* [\d.]+ images/s", text)
    assert os.path.join("cats", "nested", "deeper", os.path.basename(real_images("validation", "cats", 1)[0])) in paths
    assert os.path.join("dogs", "with space ñandú.jpg") in paths and os.path.join("cats", "UPPER.JPG") in paths
    assert len(paths) == len(set(paths)) == 8 and not set(paths) & bad


def test_folder_output_holds_parquet_shards(ray_cluster, model_files, photo_folder, tmp_path):
    root, _ = photo_folder
    out = str(tmp_path / "shards")
    summary = run_prediction(PredictConfig(model=model_files["top"], input=os.path.join(root, "**", "*.jpg"),
                                           output=out, precision="float32"))
    table = pq.read_table(os.path.join(out, "predictions"))
    # The glob is case-sensitive like the shell's: the UPPER.JPG files are not matched, the bad .jpg files are.
    assert len(table) == summary["num_images"] == 6 and summary["num_rejects"] == 4
    assert os.path.exists(os.path.join(out, "rejects.parquet")) and os.path.exists(os.path.join(out, "summary.json"))
    assert not os.path.exists(out + ".partial")


def test_empty_folder_is_a_clear_error(ray_cluster, model_files, tmp_path, capsys):
    os.makedirs(tmp_path / "nothing" / "here")
    assert predict_main(["--model", model_files["top"], "--input", str(tmp_path / "nothing"),
                         "--output", str(tmp_path / "o.csv")]) == 2
    assert "no image files" in capsys.readouterr().err


def test_model_without_metadata_is_refused_before_any_work(tmp_path, capsys):
    plain = str(tmp_path / "plain.keras")
    models.scratch_cnn(SIZE, 2).save(plain)
    assert predict_main(["--model", plain, "--input", str(tmp_path), "--output", str(tmp_path / "o.csv")]) == 2
    assert "without classifier metadata" in capsys.readouterr().err
    (tmp_path / "fake.keras").write_text("not a zip")
    assert predict_main(["--model", str(tmp_path / "fake.keras"), "--input", str(tmp_path),
                         "--output", str(tmp_path / "o.csv")]) == 2
    assert "not a .keras model file" in capsys.readouterr().err


class _CountedFile:
    """A file that records the size of every read."""

    def __init__(self, f, reads: list[int]):
        self.f, self.reads = f, reads

    def read(self, n: int = -1) -> bytes:
        data = self.f.read() if n is None or n < 0 else self.f.read(n)
        self.reads.append(len(data))
        return data

    def __getattr__(self, name: str):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


class _CountedFilesystem:
    """A filesystem whose opened files count their reads in ``opened`` (one list per file)."""

    def __init__(self, filesystem, opened: list[list[int]]):
        self.filesystem, self.opened = filesystem, opened

    def open_input_file(self, path: str) -> _CountedFile:
        self.opened.append([])
        return _CountedFile(self.filesystem.open_input_file(path), self.opened[-1])

    def __getattr__(self, name: str):
        return getattr(self.filesystem, name)


def test_the_check_reads_only_the_metadata_and_the_job_reads_the_model_once(tmp_path, monkeypatch):
    """A model file (often remote, tens of MB) is read whole once per job: its check reads the
    archive's directory and metadata, and the job's metadata, hash and actors' copy share one read."""
    model = str(tmp_path / "model.keras")
    with zipfile.ZipFile(model, "w") as z:
        z.writestr("model.weights.h5", os.urandom(2_000_000))
        z.writestr("classifier.json", json.dumps({"kind": "top", "classes": CLASSES, "image_size": SIZE}))
    os.makedirs(tmp_path / "photos")
    shutil.copyfile(real_images("validation", "cats", 1)[0], tmp_path / "photos" / "cat.jpg")
    opened: list[list[int]] = []
    split_uri = storage.split_uri
    monkeypatch.setattr(storage, "split_uri", lambda uri: (
        (_CountedFilesystem(split_uri(uri)[0], opened), split_uri(uri)[1]) if uri == model else split_uri(uri)))
    cfg = PredictConfig(model=model, input=str(tmp_path / "photos"), output=str(tmp_path / "out"))
    assert not opened  # settings alone read nothing
    preflight(cfg)
    assert len(opened) == 1 and 0 < sum(opened[0]) < 100_000, opened

    class Stop(Exception):
        pass

    def stop(_files):
        raise Stop  # the model has been read by now; what follows needs a cluster

    monkeypatch.setattr(batch_predict, "fingerprint_files", stop)
    opened.clear()
    with pytest.raises(Stop):
        run_prediction(cfg)
    assert [sum(reads) for reads in opened] == [os.path.getsize(model)]


def test_existing_output_needs_overwrite(model_files, tmp_path):
    (tmp_path / "o.csv").write_text("x")
    with pytest.raises(OutputError, match="--overwrite"):
        preflight(PredictConfig(model=model_files["top"], input=str(tmp_path), output=str(tmp_path / "o.csv")))


def test_no_match_for_a_glob(ray_cluster, model_files, tmp_path):
    with pytest.raises(DataError, match="no image files match"):
        run_prediction(PredictConfig(model=model_files["top"], input=str(tmp_path / "*.png"),
                                     output=str(tmp_path / "o.csv")))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_a_model_file_with_code_in_it_is_refused(tmp_path, precision):
    """Safe mode: a Lambda layer carries Python bytecode, which loading would run; it is refused
    on every loading path (float32, and the bf16 rebuild) before any prediction."""
    import keras

    from pipeline.nets.modelfile import save_classifier

    inputs = keras.Input((SIZE, SIZE, 3))
    outputs = keras.layers.Dense(2, activation="softmax")(
        keras.layers.Lambda(lambda x: keras.ops.mean(x, axis=(1, 2)))(inputs))
    path = str(tmp_path / "lambda.keras")
    save_classifier(keras.Model(inputs, outputs), path, {"kind": "scratch", "classes": CLASSES, "image_size": SIZE})
    with pytest.raises(ValueError, match="(?i)lambda|safe_mode|unsafe"):
        load_classifier(path, precision)


def test_bfloat16_loading_computes_in_bfloat16_and_agrees_with_float32(tmp_path):
    """The bf16 rebuild changes the compute policy of every layer but the pinned float32 ones, keeps the
    weights, and its probabilities stay within bf16's precision of float32's."""
    import keras

    from pipeline.nets.modelfile import save_classifier
    from pipeline.nets.models import scratch_cnn

    path = str(tmp_path / "scratch.keras")
    save_classifier(scratch_cnn(SIZE, 2), path, {"kind": "scratch", "classes": CLASSES, "image_size": SIZE})
    f32, _ = load_classifier(path, "float32")
    bf16, _ = load_classifier(path, "bfloat16")
    policies = {layer.name: layer.dtype_policy.name for layer in bf16._flatten_layers()
                if layer.weights and not isinstance(layer, keras.Model)}
    assert policies.pop("predictions") == "float32"
    assert policies and set(policies.values()) == {"mixed_bfloat16"}, policies
    for a, b in zip(f32.get_weights(), bf16.get_weights()):
        np.testing.assert_array_equal(a, b)
    images = np.random.default_rng(0).uniform(0, 255, (8, SIZE, SIZE, 3)).astype(np.float32)
    p32, p16 = f32.predict(images, verbose=0), bf16.predict(images, verbose=0)
    assert p16.dtype == np.float32 and not np.array_equal(p32, p16), "bf16 must actually compute in bf16"
    np.testing.assert_allclose(p16, p32, atol=0.03)
