"""The main job on the built-in default data: every stage, the report, and prediction with each trained model."""

from __future__ import annotations

import os

import pytest

from pipeline.config import PredictConfig, RunAllConfig
from pipeline.predict import run_prediction
from pipeline.runall import run_all
from pipeline.synthetic import CLASSES, default_data_dir

pytestmark = pytest.mark.timeout(900)


def test_run_all_on_the_builtin_data_then_predict_with_each_model(ray_cluster, tmp_path):
    out = str(tmp_path / "run")
    report = run_all(RunAllConfig(output_dir=out, epochs=1, max_images_per_class=8))
    text = open(report).read()
    assert "proves the installation works" in text
    for stage in ("extract_features", "train_top", "finetune", "train_scratch"):
        assert f"| {stage} |" in text
    assert "0.90–0.91" in text and "0.94" in text and "0.79–0.81" in text
    validation = os.path.join(default_data_dir(), "validation")
    for kind in ("top", "finetune", "scratch"):
        for name in ("model.keras", "metrics.csv", "evaluation.json", "curves.png"):
            assert os.path.exists(os.path.join(out, kind, name)), (kind, name)
        summary = run_prediction(PredictConfig(model=os.path.join(out, kind, "model.keras"), input=validation,
                                               output=str(tmp_path / f"{kind}.csv"), precision="float32"))
        assert summary["num_images"] == 2 * 16 and summary["num_rejects"] == 0
        assert summary["evaluation"]["confusion_matrix"]["classes"] == list(CLASSES)
