"""The same model from any worker count, and from the same seed twice (issue 28): each training
job run through its own entry point with its defaults (augmentation, dropout, the weights' moving
average, shuffling), on small data (float32, so that the comparison is to float tolerance: under
bfloat16 the gradients' sums in another order round differently)."""

from __future__ import annotations

import csv
import os

import keras
import numpy as np
import pytest

from pipeline.batch.extract import run_extraction
from pipeline.config import ExtractConfig, FinetuneConfig, ScratchConfig, TrainTopConfig
from pipeline.training.finetune import finetune
from pipeline.training.scratch import train_scratch
from pipeline.training.top import train_top

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

SIZE = 64  # VGG16's block 4 at 4x4 cells: the default shift (0.15) moves it by one cell


@pytest.fixture(scope="module")
def cached(ray_cluster, real_root, tmp_path_factory):
    """The 40 real photos' features and block-4 outputs (real torchvision weights)."""
    out = str(tmp_path_factory.mktemp("workers") / "features")
    return run_extraction(ExtractConfig(data_dir=real_root, output_dir=out, image_size=SIZE, precision="float32",
                                        cache_block4=True))


def _weights(summary: dict) -> list[np.ndarray]:
    return keras.saving.load_model(summary["model"], compile=False).get_weights()


def _metrics(summary: dict) -> list[dict[str, str]]:
    with open(os.path.join(os.path.dirname(summary["model"]), "metrics.csv")) as f:
        return [{k: row[k] for k in ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "train_samples")}
                for row in csv.DictReader(f)]


def _train(features: dict, data_dir: str, top_model: str, out: str, workers: int) -> dict[str, dict]:
    """Fine-tuning (cached block-4 maps: mirror and shift augmentation, the top MLP's dropout) from
    ``top_model``, and the small CNN (held decoded images: shear, zoom, flip, rotation, shift and
    dropout), each with ``workers`` workers and its defaults but the sizes. Data held whatever the count: in
    the test cluster's 12 GiB the memory rule would stream four fine-tuning workers, and streamed shards
    take other steps."""
    common = dict(output_dir=out, epochs=2, batch_size=8, num_workers=workers, precision="float32",
                  hold_data="always")
    return {"finetune": finetune(FinetuneConfig(top_model=top_model, **common)),
            "scratch": train_scratch(ScratchConfig(data_dir=data_dir, image_size=48, **common))}


def test_one_two_and_four_workers_train_the_same_weights_and_a_seed_the_same_run(cached, real_root, tmp_path):
    top = train_top(TrainTopConfig(features_dir=cached["output_dir"], output_dir=str(tmp_path / "top"), epochs=2,
                                   batch_size=8, precision="float32"))
    runs = {w: _train(cached, real_root, top["model"], str(tmp_path / f"w{w}"), w) for w in (1, 2, 4)}
    for kind in ("finetune", "scratch"):
        one = _weights(runs[1][kind])
        for workers in (1, 2, 4):
            # Held data (decoded images too), so the global batches are the same whatever the count.
            assert runs[workers][kind]["held_bytes_per_worker"] > 0, (kind, workers)
            assert len(runs[workers][kind]["worker_peak_rss_bytes"]) == workers
        for workers in (2, 4):
            for a, b in zip(one, _weights(runs[workers][kind])):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"{kind}, {workers} workers")
    # The same command again (2 workers) gives identical weights and metrics.
    again = _train(cached, real_root, top["model"], str(tmp_path / "again"), 2)
    for kind in ("finetune", "scratch"):
        for a, b in zip(_weights(runs[2][kind]), _weights(again[kind])):
            np.testing.assert_array_equal(a, b, err_msg=kind)
        assert _metrics(runs[2][kind]) == _metrics(again[kind]) and runs[2][kind]["accuracy"] == again[kind]["accuracy"]
    # Not vacuous: another seed trains another model.
    other = train_scratch(ScratchConfig(data_dir=real_root, image_size=48, output_dir=str(tmp_path / "seed1"), epochs=2,
                                        batch_size=8, precision="float32", seed=1))
    assert max(np.abs(a - b).max() for a, b in zip(_weights(runs[1]["scratch"]), _weights(other))) > 1e-3
