"""Ray Train on a real local cluster: distributed correctness, checkpoints, resumption, the jobs."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.batch.extract import run_extraction
from pipeline.config import ExtractConfig, FinetuneConfig, TrainTopConfig
from pipeline.errors import ConfigError, OutputError, UserError
from pipeline.nets import models
from pipeline.training.checkpoints import TRAINED_FILE, load_checkpoint_weights, read_checkpoint_state
from pipeline.training.fit import fit
from pipeline.training.settings import LoopSettings
from tests.conftest import assert_curves_drawn, checkpoint_of_epoch

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def small_features(ray_cluster, real_root, tmp_path_factory):
    """Features of the 40 real photos at 32 px with random weights: (1, 1, 512) per image, fast to train on."""
    out = str(tmp_path_factory.mktemp("feat32") / "features")
    return run_extraction(ExtractConfig(data_dir=real_root, output_dir=out, image_size=32, weights="none",
                                        precision="float32"))


def _datasets(features_dir: str, columns=("label", "features")):
    import ray

    return {split: ray.data.read_parquet(os.path.join(features_dir, split)).select_columns(list(columns))
            for split in ("train", "validation")}


def _top_weights(checkpoint, shape):
    model = models.top_classifier(shape, 2, "float32", dropout=0.0)
    load_checkpoint_weights(checkpoint, model)
    return model.get_weights()


def _plausible_worker_rss(peak: int) -> bool:
    """A training worker's peak resident bytes: above what TensorFlow and Keras alone take once
    imported (a few hundred MiB), below the machine's memory."""
    return 100 * 2**20 < peak < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_two_workers_give_the_weights_of_one(small_features, tmp_path):
    """Full-batch steps: 20 rows, global batch 20. One worker computes the mean gradient over all
    20; two workers each compute 10 and all-reduce. With the loss scaled by the global batch the
    two runs take identical steps (the order of rows inside one batch does not change its mean).
    The weights' moving average, kept by the optimizer on every replica, is what the checkpoint
    holds as the model's weights, the trained weights beside it, equal with 1 and 2 workers too."""
    shape = tuple(small_features["feature_shape"])
    settings = LoopSettings(kind="top", epochs=3, batch_size=20, learning_rate=1e-3, seed=7, precision="float32",
                            num_classes=2, feature_shape=shape, dropout=0.0, shuffle=False, ema_momentum=0.5)
    weights, trained = [], []
    for workers in (1, 2):
        result = fit(settings, _datasets(small_features["output_dir"]), workers, False, str(tmp_path), f"w{workers}", 0)
        assert result.error is None
        history = read_checkpoint_state(result.checkpoint)["history"]
        assert [h["epoch"] for h in history] == [1, 2, 3] and all(h["train_samples"] == 20 for h in history)
        weights.append(_top_weights(result.checkpoint, shape))
        model = models.top_classifier(shape, 2, "float32", dropout=0.0)
        with result.checkpoint.as_directory() as d, np.load(os.path.join(d, TRAINED_FILE)) as saved:
            trained.append([saved[v.path] for v in model.trainable_variables])
    assert max(np.abs(a - b).max() for a, b in zip(trained[0], weights[0])) > 1e-5, "the average is not the weights"
    for one, two in zip(*trained):
        np.testing.assert_allclose(one, two, rtol=1e-5, atol=1e-6)
    import keras

    from pipeline.training.loop import build_model

    keras.utils.set_random_seed(settings.seed)  # the weights every worker starts from
    initial, _ = build_model(settings)
    moved = max(np.abs(a - b).max() for a, b in zip(weights[0], initial.get_weights()))
    assert moved > 1e-4, "training must have changed the weights"
    for one, two in zip(*weights):
        np.testing.assert_allclose(one, two, rtol=1e-5, atol=1e-6)


def test_three_workers_on_held_data_take_the_steps_of_one(small_features, tmp_path):
    """The path the product uses for features: data held in memory and shuffled every epoch. Each
    global batch of 6 is drawn in one seeded order and cut into per-worker slices, so 3 workers
    take exactly one worker's steps, three of them per epoch (not one full batch whose row order
    cannot matter), and evaluate every validation row once although 20 rows do not split evenly
    in three (their evaluation steps must agree to the end: a worker with fewer rows adds an
    empty batch)."""
    shape = tuple(small_features["feature_shape"])
    settings = LoopSettings(kind="top", epochs=2, batch_size=6, learning_rate=1e-3, seed=3, precision="float32",
                            num_classes=2, feature_shape=shape, dropout=0.0, hold_in_memory=True)
    weights = {}
    for workers in (1, 3):
        result = fit(settings, _datasets(small_features["output_dir"], ("path", "label", "features")), workers, False,
                     str(tmp_path), f"held{workers}", 0)
        assert result.error is None
        history = read_checkpoint_state(result.checkpoint)["history"]
        assert [(h["train_samples"], h["val_samples"]) for h in history] == [(18, 20), (18, 20)], workers
        # Rank 0's report carries every rank's peak memory: each slot filled by its own worker.
        assert all(len(h["worker_peak_rss_bytes"]) == workers and all(map(_plausible_worker_rss, h["worker_peak_rss_bytes"]))
                   for h in history), [h["worker_peak_rss_bytes"] for h in history]
        weights[workers] = _top_weights(result.checkpoint, shape)
    for one, three in zip(weights[1], weights[3]):
        np.testing.assert_allclose(one, three, rtol=1e-5, atol=1e-6)


def test_stopped_run_resumes_from_its_latest_checkpoint(small_features, tmp_path):
    shape = tuple(small_features["feature_shape"])

    def settings(epochs, lr):
        return LoopSettings(kind="top", epochs=epochs, batch_size=8, learning_rate=lr, seed=1, precision="float32",
                            num_classes=2, feature_shape=shape)

    first = fit(settings(2, 1e-3), _datasets(small_features["output_dir"]), 1, False, str(tmp_path), "run", 0)
    h1 = read_checkpoint_state(first.checkpoint)["history"]
    # Same run name and storage: resumes at epoch 3. The learning rate differs, so a run that
    # started over instead would have a different history for epochs 1-2.
    second = fit(settings(3, 5e-2), _datasets(small_features["output_dir"]), 1, False, str(tmp_path), "run", 0)
    h2 = read_checkpoint_state(second.checkpoint)["history"]
    assert [h["epoch"] for h in h2] == [1, 2, 3]
    assert h2[:2] == h1


def test_train_top_job_writes_model_metrics_evaluation_and_curves(small_features, tmp_path):
    from pipeline.nets.modelfile import read_metadata
    from pipeline.training.top import train_top

    out = str(tmp_path / "run")
    summary = train_top(TrainTopConfig(features_dir=small_features["output_dir"], output_dir=out, epochs=2,
                                       batch_size=8, precision="float32"))
    job, shape = os.path.join(out, "top"), tuple(small_features["feature_shape"])
    meta = read_metadata(os.path.join(job, "model.keras"))
    assert meta["kind"] == "top" and meta["classes"] == ["cats", "dogs"] and meta["image_size"] == 32
    assert meta["preprocessing"] == "torch" and meta["weights"]["source"] == "none"
    with open(os.path.join(job, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= rows[0].keys()
    # The wall time holds start-up, export and the final evaluation besides the epochs.
    assert summary["wall_s"] > summary["seconds"] > 0 and "job_started" not in read_metadata(os.path.join(out, "top", "model.keras"))
    assert len(summary["worker_peak_rss_bytes"]) == 1 and _plausible_worker_rss(summary["worker_peak_rss_bytes"][0])
    # Memory before reading data, and the data each worker held: every feature row of both splits.
    assert len(summary["worker_base_rss_bytes"]) == 1
    assert 0 < summary["worker_base_rss_bytes"][0] <= summary["worker_peak_rss_bytes"][0]
    # Private memory (what the rule budgets) is a part of the resident memory, and grows from its base too.
    private, private_base = summary["worker_peak_private_bytes"], summary["worker_base_private_bytes"]
    assert len(private) == len(private_base) == 1
    assert 0 < private_base[0] <= private[0] <= summary["worker_peak_rss_bytes"][0]
    rows = sum(sum(small_features["counts"][split].values()) for split in ("train", "validation"))
    assert summary["held_bytes_per_worker"] == rows * int(np.prod(small_features["feature_shape"])) * 4
    with open(os.path.join(job, "evaluation.json")) as f:
        evaluation = json.load(f)
    # The exported model is the best epoch's: its accuracy, recomputed here from that checkpoint's
    # weights and the stored validation features, is what the evaluation reports.
    head = models.top_classifier(shape, 2, "float32")
    load_checkpoint_weights(checkpoint_of_epoch(os.path.join(job, "ray_train"), summary["best_epoch"]), head)
    table = pq.read_table(os.path.join(small_features["output_dir"], "validation"), columns=["label", "features"])
    features = np.stack(table.column("features").to_numpy(zero_copy_only=False)).reshape((-1, *shape))
    expected = float(((head.predict(features, verbose=0)[:, 0] > 0.5) == table.column("label").to_numpy()).mean())
    assert evaluation["num_samples"] == 20 and evaluation["accuracy"] == pytest.approx(expected)
    assert summary["accuracy"] == evaluation["accuracy"]
    assert evaluation["confusion_matrix"]["classes"] == ["cats", "dogs"]
    assert np.array(evaluation["confusion_matrix"]["rows_true_cols_predicted"]).sum() == 20
    assert 0 <= evaluation["roc_auc"] <= 1 and set(evaluation["per_class"]) == {"cats", "dogs"}
    assert_curves_drawn(os.path.join(job, "curves.png"))
    # The saved model is image → class: 32x32 RGB in, one sigmoid unit out.
    from pipeline.nets.modelfile import load_classifier

    model, _ = load_classifier(os.path.join(job, "model.keras"))
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 1)
    # The full settings and the input's fingerprint are recorded with the model and the summary.
    assert meta["settings"] == summary["settings"]
    assert summary["settings"]["epochs"] == 2 and summary["settings"]["batch_size"] == 8
    assert summary["settings"]["learning_rate"] == 1e-3 and summary["settings"]["dropout"] == 0.5
    assert summary["settings"]["features"] == small_features["fingerprint"]


def test_train_top_reads_an_older_extraction_with_mirror_features(small_features, tmp_path):
    """Versions with --mirror-train wrote features_flipped into the train shards (and flipped_split
    into the manifest): the top trains on such a folder, reading and holding the features alone."""
    import shutil

    import pyarrow.parquet as pq

    from pipeline.data import storage
    from pipeline.training.top import train_top

    older = tmp_path / "older"
    shutil.copytree(small_features["output_dir"], older)
    for shard in storage.list_parquet(str(older / "train")):
        table = pq.read_table(shard)
        pq.write_table(table.append_column("features_flipped", table.column("features")), shard)
    manifest = json.loads((older / "manifest.json").read_text())
    (older / "manifest.json").write_text(json.dumps({**manifest, "flipped_split": "train"}))
    summary = train_top(TrainTopConfig(features_dir=str(older), output_dir=str(tmp_path / "run"), epochs=1,
                                       batch_size=8, precision="float32"))
    assert summary["epochs"] == 1
    rows = sum(sum(small_features["counts"][split].values()) for split in ("train", "validation"))
    assert summary["held_bytes_per_worker"] == rows * int(np.prod(small_features["feature_shape"])) * 4


def test_one_reuse_rule_for_training_jobs(small_features, tmp_path, capsys):
    """Same settings: the finished model is reused. Other settings: refused, naming what differs."""
    from pipeline.training.top import train_top

    def run(**changes):
        options = {"epochs": 1, "batch_size": 8, "precision": "float32", **changes}
        return train_top(TrainTopConfig(features_dir=small_features["output_dir"], output_dir=str(tmp_path), **options))

    first = run()
    assert run() == first and "reusing finished top model" in capsys.readouterr().out
    with pytest.raises(OutputError, match=r"holds a top run made with other settings.*epochs: 1 → 2.*--overwrite"):
        run(epochs=2)
    with pytest.raises(OutputError, match=r"learning_rate: 0\.001 → 0\.01"):
        run(learning_rate=0.01)
    assert run(epochs=2, overwrite=True)["epochs"] == 2


def test_worker_counts_that_do_not_divide_the_batch_are_refused_naming_valid_ones():
    with pytest.raises(ConfigError, match=r"--num-workers 3 does not divide --batch-size 32 .* use --num-workers 2 or 4, "
                                          r"or --batch-size 30 or 33"):
        TrainTopConfig(num_workers=3, batch_size=32)
    assert TrainTopConfig(num_workers=4, batch_size=32).num_workers == 4


def test_finetune_refuses_to_start_without_a_top_model(tmp_path):
    from pipeline.training.finetune import finetune

    with pytest.raises(UserError, match="python -m jobs.train_top"):
        finetune(FinetuneConfig(output_dir=str(tmp_path)))


def test_finetune_refuses_a_top_model_of_the_wrong_kind(tmp_path):
    from pipeline.nets.modelfile import save_classifier
    from pipeline.training.finetune import finetune

    path = str(tmp_path / "scratch.keras")
    save_classifier(models.scratch_cnn(32, 2), path, {"kind": "scratch", "classes": ["a", "b"], "image_size": 32})
    with pytest.raises(UserError, match="is a scratch model; fine-tuning starts from a train_top model"):
        finetune(FinetuneConfig(top_model=path, output_dir=str(tmp_path / "out")))


def test_a_failed_job_marks_its_mlflow_run_failed_and_its_rerun_continues_that_run(small_features, tmp_path,
                                                                                   monkeypatch):
    """A worker killed in epoch 2 with no restarts left: the job fails and its run is FAILED, not left
    RUNNING. The same command again resumes from epoch 1's checkpoint and logs into that same run: one
    run, FINISHED, with the parameters, each epoch's metrics once (two workers, logged by rank 0), the
    final evaluation, the curves and the model, read back with MLflow's client from a local file store."""
    from mlflow import MlflowClient

    from pipeline.training.jobs import TrainingError
    from pipeline.training.top import train_top

    uri = (tmp_path / "mlruns").as_uri()
    cfg = TrainTopConfig(features_dir=small_features["output_dir"], output_dir=str(tmp_path / "run"), epochs=3,
                         batch_size=8, num_workers=2, precision="float32", max_failures=0, mlflow_uri=uri,
                         mlflow_experiment="cats")
    marker = tmp_path / "killed"
    monkeypatch.setenv("RIC_FAULT_KILL", f"train_epoch2_rank1:1:{marker}")
    with pytest.raises(TrainingError, match="training failed after 0 restart"):
        train_top(cfg)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cats").experiment_id
    [failed] = client.search_runs([experiment])
    assert marker.exists() and failed.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(failed.info.run_id, "val_accuracy")] == [1]

    monkeypatch.delenv("RIC_FAULT_KILL")
    summary = train_top(cfg)
    [run] = client.search_runs([experiment])
    assert run.info.run_id == failed.info.run_id and run.info.status == "FINISHED" and run.info.run_name == "top"
    assert run.data.params["epochs"] == "3" and run.data.params["batch_size"] == "8"
    assert run.data.params["features"] == small_features["fingerprint"]
    with open(tmp_path / "run" / "top" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for key in ("loss", "val_loss", "val_accuracy"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in history] == [(int(r["epoch"]), pytest.approx(float(r[key]))) for r in rows]
    assert run.data.metrics["final_accuracy"] == pytest.approx(summary["accuracy"])
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"curves.png", "evaluation.json", "metrics.csv", "model"} <= logged
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.keras"]


def test_a_training_split_smaller_than_one_batch_is_refused_before_training(small_features, tmp_path):
    """One row short of a batch: every epoch would drop its only (partial) batch and take no step."""
    from pipeline.errors import DataError
    from pipeline.training.top import train_top

    rows = sum(small_features["counts"]["train"].values())
    job = tmp_path / "run" / "top"
    with pytest.raises(DataError, match=rf"the training split has {rows} images, fewer than one batch of {rows + 1}: "
                                        rf"pass --batch-size {rows} or less"):
        train_top(TrainTopConfig(features_dir=small_features["output_dir"], output_dir=str(tmp_path / "run"), epochs=1,
                                 batch_size=rows + 1, precision="float32"))
    assert not (job / "model.keras").exists() and not (job / "ray_train").exists(), "nothing may have been trained"


def test_the_best_and_the_last_checkpoints_are_kept(ray_cluster, tmp_path):
    """Validation labels are the inverse of the rule the training labels follow, so validation
    accuracy falls as training learns: the best epoch comes before the last one. The run's
    storage must hold exactly those two checkpoints (the best to export, the last to resume)."""
    import glob

    import pyarrow as pa
    import ray

    rng = np.random.default_rng(0)

    def rows(n: int, inverted: bool):
        x = rng.normal(size=(n, 8)).astype(np.float32)
        labels = ((x[:, 0] > 0) != inverted).astype(np.int32)
        return ray.data.from_arrow(pa.table({"label": labels, "features": pa.FixedSizeListArray.from_arrays(
            pa.array(x.reshape(-1)), 8)}))

    settings = LoopSettings(kind="top", epochs=4, batch_size=16, learning_rate=1e-3, seed=0, precision="float32",
                            num_classes=2, feature_shape=(8,), dropout=0.0)
    result = fit(settings, {"train": rows(64, False), "validation": rows(200, True)}, 1, False, str(tmp_path), "run", 0)
    assert result.error is None
    accuracy = {h["epoch"]: h["val_accuracy"] for h in read_checkpoint_state(result.checkpoint)["history"]}
    best, last = max(accuracy.values()), max(accuracy)
    assert sorted(accuracy) == [1, 2, 3, 4] and accuracy[last] < best, f"an earlier epoch must be the best: {accuracy}"
    kept = []
    for folder in glob.glob(os.path.join(tmp_path, "run", "checkpoint_*")):
        if os.path.isdir(folder):
            with open(os.path.join(folder, "state.json")) as f:
                kept.append(json.load(f)["history"][-1]["epoch"])
    assert len(kept) == 2 and last in kept, f"checkpoints of epochs {sorted(kept)} kept; accuracy by epoch {accuracy}"
    assert accuracy[min(kept)] == best, f"checkpoints of epochs {sorted(kept)} kept; accuracy by epoch {accuracy}"


# Run as a job process in which MLflow cannot be imported. ``sys.modules[name] = None`` is how
# Python marks a module as unavailable: ``importlib.util.find_spec`` answers None and ``import``
# raises ImportError, as without the extra. ``ray.init`` is replaced by a sentinel that stops
# the process, so a check made after Ray started shows as exit code 3.
WITHOUT_MLFLOW = """
import sys
sys.modules["mlflow"] = None
import ray


def started(*args, **kwargs):
    print("ray.init called", flush=True)
    raise SystemExit(3)


ray.init = started
from jobs import train_top
sys.exit(train_top.main(sys.argv[1:]))
"""


def test_mlflow_uri_without_mlflow_installed_fails_before_ray_starts(tmp_path):
    import subprocess
    import sys

    from pipeline.data import storage

    features, out = tmp_path / "features", tmp_path / "out"
    storage.write_json(str(features / "manifest.json"), {"fingerprint": "f", "data_dir": str(tmp_path)})
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", WITHOUT_MLFLOW, "--features-dir", str(features), "--output-dir",
                           str(out), "--mlflow-uri", (tmp_path / "mlruns").as_uri()], cwd=repo, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": "local"})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert 'error: MLflow tracking needs the mlflow extra: pip install -e ".[mlflow]"' in proc.stderr, proc.stderr[-2000:]
    assert "ray.init called" not in proc.stdout and not out.exists()


def test_a_split_is_read_one_block_per_shard_each_epoch(ray_cluster, tmp_path):
    """Streamed training reads each shard as one block (Ray 2.60's second Parquet reader packs small shards
    into one block and starts footer-reading actors on every pass)."""
    import pyarrow as pa

    from pipeline.training.batches import read_shards

    for shard in range(5):
        pq.write_table(pa.table({"path": [f"{shard}/{i}.jpg" for i in range(4)], "label": [i % 2 for i in range(4)],
                                 "features": [[float(shard)] * 3] * 4}), str(tmp_path / f"part-{shard}.parquet"))
    ds = read_shards(str(tmp_path), ["path", "label"])
    for _ in range(2):  # a streamed worker's epochs each execute the read again
        blocks = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
        assert sorted(b.num_rows for b in blocks) == [4] * 5
        assert blocks[0].column_names == ["path", "label"]


def test_train_top_streams_its_shards_with_two_workers_when_told(small_features, tmp_path):
    from pipeline.training.top import train_top

    out = str(tmp_path / "run")
    summary = train_top(TrainTopConfig(features_dir=small_features["output_dir"], output_dir=out, epochs=2,
                                       batch_size=8, num_workers=2, hold_data="never", precision="float32"))
    assert summary["held_bytes_per_worker"] == 0 and summary["epochs"] == 2
    assert len(summary["worker_peak_private_bytes"]) == 2
    with open(os.path.join(out, "top", "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    train_rows = sum(small_features["counts"]["train"].values())
    # Each worker streams its own part of the shards, in steps of 4 rows until one of them runs out.
    assert all(train_rows - 2 * 8 < int(r["train_samples"]) <= train_rows for r in rows), rows
    with open(os.path.join(out, "top", "evaluation.json")) as f:
        assert json.load(f)["num_samples"] == 20
