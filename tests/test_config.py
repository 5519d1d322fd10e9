"""Job settings: run_all offers every option of its stages and hands each stage its own."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.config import (
    IMAGE_STAGE_OPTIONS,
    PER_STAGE_OPTIONS,
    ExtractConfig,
    FinetuneConfig,
    RunAllConfig,
    ScratchConfig,
    TrainTopConfig,
)
from pipeline.errors import ConfigError
from pipeline.runall import stage_options

STAGES = {"extract_features": (ExtractConfig, None), "train_top": (TrainTopConfig, "top"),
          "finetune": (FinetuneConfig, "finetune"), "train_scratch": (ScratchConfig, "scratch")}
# Inputs run_all makes itself: each stage's output sits in the run folder, and the top MLP and
# fine-tuning read what the stage before them wrote.
SET_BY_RUN_ALL = {"features_dir", "top_model"}


def names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


@pytest.mark.parametrize("stage", STAGES)
def test_run_all_offers_every_option_of_each_stage(stage):
    cls, prefix = STAGES[stage]
    ours = names(RunAllConfig)
    missing = [n for n in names(cls) - SET_BY_RUN_ALL
               if not (n in ours or (prefix and n in PER_STAGE_OPTIONS + IMAGE_STAGE_OPTIONS and f"{prefix}_{n}" in ours))]
    assert not missing, f"jobs.run_all has no option for {stage}'s {missing}"


def test_run_all_hands_each_stage_its_own_options(tmp_path):
    cfg = RunAllConfig(data_dir=str(tmp_path), image_size=64, scratch_image_size=96, rotation=15.0, scratch_shift=0.05, finetune_shift=0.2, preprocessing="caffe", workers=3, block_files=16,
                       epochs=7, finetune_epochs=2, top_learning_rate=0.01, scratch_learning_rate=0.002,
                       dropout=0.3, ema_momentum=0.9, cache_block4=False, max_failures=0, num_workers=2, batch_size=16,
                       scratch_batch_size=8, seed=5)
    options = stage_options(cfg, str(tmp_path), str(tmp_path / "run"), synthetic=False)
    extract = options["extract_features"]
    assert (extract["image_size"], extract["preprocessing"], extract["workers"], extract["block_files"]) == (64, "caffe", 3, 16)
    assert extract["cache_block4"] is False
    assert [options[s]["epochs"] for s in ("train_top", "finetune", "train_scratch")] == [7, 2, 7]
    assert [options[s]["learning_rate"] for s in ("train_top", "finetune", "train_scratch")] == [0.01, None, 0.002]
    assert (options["train_scratch"]["image_size"], options["train_scratch"]["rotation"],
            options["train_scratch"]["shift"]) == (96, 15.0, 0.05)
    assert options["finetune"]["shift"] == 0.2
    for stage in ("train_top", "finetune", "train_scratch"):
        assert (options[stage]["dropout"], options[stage]["max_failures"], options[stage]["num_workers"],
                options[stage]["seed"], options[stage]["ema_momentum"]) == (0.3, 0, 2, 5, 0.9)
    assert [options[s]["batch_size"] for s in ("extract_features", "train_top", "finetune", "train_scratch")] == [16, 16, 16, 8]
    # Every stage's config accepts what it is handed (the inputs run_all adds are the only others).
    ExtractConfig(**extract)
    ScratchConfig(**options["train_scratch"])
    TrainTopConfig(features_dir=str(tmp_path), **options["train_top"])


def test_without_epochs_each_job_keeps_its_default_and_the_builtin_data_gets_five(tmp_path):
    real = stage_options(RunAllConfig(data_dir=str(tmp_path)), str(tmp_path), str(tmp_path / "run"), synthetic=False)
    assert all("epochs" not in real[s] for s in ("train_top", "finetune", "train_scratch"))
    builtin = stage_options(RunAllConfig(scratch_epochs=1), str(tmp_path), str(tmp_path / "run"), synthetic=True)
    assert [builtin[s]["epochs"] for s in ("train_top", "finetune", "train_scratch")] == [5, 5, 1]


@pytest.mark.parametrize("option,value,message", [("top_epochs", 0, "--top-epochs must be a positive number"),
                                                  ("finetune_learning_rate", -1.0, "--finetune-learning-rate"),
                                                  ("image_size", 16, "--image-size"),
                                                  ("scratch_image_size", 31, "--scratch-image-size"),
                                                  ("scratch_batch_size", 0, "--scratch-batch-size must be a positive"),
                                                  ("rotation", 181.0, r"--rotation must be in \[0, 180\]"),
                                                  ("scratch_shift", 1.0, r"--scratch-shift must be in \[0, 1\)"),
                                                  ("ema_momentum", 1.0, r"--ema-momentum must be in \[0, 1\)"),
                                                  ("preprocessing", "tf", "one of auto, torch, caffe")])
def test_invalid_run_all_options_name_the_option(option, value, message):
    with pytest.raises(ConfigError, match=message):
        RunAllConfig(**{option: value})


def test_run_all_checks_the_small_cnns_batch_against_the_workers_too():
    with pytest.raises(ConfigError, match="--num-workers 4 does not divide --scratch-batch-size 18"):
        RunAllConfig(num_workers=4, batch_size=32, scratch_batch_size=18)
    assert ScratchConfig().batch_size == 16 and ScratchConfig().epochs == 100
