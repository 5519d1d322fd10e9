"""Job settings: run_all's options composed from its stages' (each declared once), and config
files: every run's resolved settings, read back with --config, are the same settings."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from pipeline.compose import Stage, compose, split_options
from pipeline.config import (
    AuditConfig,
    ExtractConfig,
    FinetuneConfig,
    PredictConfig,
    ScratchConfig,
    ServeConfig,
    TrainTopConfig,
)
from pipeline.errors import ConfigError, UserError
from pipeline.options import build_parser, field_help, parse_config, resolved, write_config
from pipeline.prechecks import preflight
from pipeline.runall import RunAllConfig, RunAllOptions, resolved_options


def fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def help_of(cls: type, option: str) -> str:
    """The --help text of ``option`` as printed (argparse wraps lines; spaces are normalised)."""
    text = " ".join(build_parser(cls, "").format_help().split())
    start = text.index(f" {option} ") + 1
    return text[start:]


@pytest.mark.parametrize("stage", RunAllConfig.STAGES, ids=lambda s: s.name)
def test_run_all_offers_every_option_of_each_stage_with_its_help(stage):
    ours = fields(RunAllConfig)
    for name, (f, _, _) in stage.options().items():
        offered = ours.get(f"{stage.prefix}_{name}") or ours.get(name)
        assert offered is not None, f"jobs.run_all has no option for {stage.name}'s {name}"
        assert f.metadata["help"] in offered.metadata["help"], name


def test_an_option_added_to_a_stage_is_offered_by_run_all_with_its_help():
    @dataclasses.dataclass
    class Top(TrainTopConfig):
        warmup_epochs: int = field_help(3, "epochs of linear learning-rate warm-up")
        epochs: int = field_help(7, "training epochs")

    stages = tuple(Stage(s.name, Top, s.prefix, s.given) if s.name == "train_top" else s for s in RunAllConfig.STAGES)
    composed = compose("Composed", RunAllOptions, stages)
    assert "--warmup-epochs WARMUP_EPOCHS epochs of linear learning-rate warm-up (default: 3)" in \
        help_of(composed, "--warmup-epochs")
    assert "train_top --epochs: training epochs; default 7" in help_of(composed, "--top-epochs")
    cfg = composed(warmup_epochs=5, top_epochs=2, data_dir=None)
    top = cfg.stage_config("train_top")
    assert (type(top), top.warmup_epochs, top.epochs) == (Top, 5, 2)


def test_options_the_stages_disagree_on_are_offered_per_stage_and_shared_ones_once():
    shared, prefixed = split_options(RunAllConfig.STAGES)
    assert {"seed", "data_dir", "num_workers", "precision", "max_image_megapixels", "cache_block4"} <= shared.keys()
    assert {"extract_batch_size", "top_batch_size", "finetune_batch_size", "scratch_batch_size", "extract_image_size",
            "scratch_image_size", "top_epochs", "finetune_epochs", "scratch_epochs", "top_learning_rate",
            "finetune_learning_rate", "scratch_learning_rate", "finetune_shift", "scratch_shift"} == prefixed.keys()
    assert "batch_size" not in fields(RunAllConfig) and "image_size" not in fields(RunAllConfig)


def test_run_all_hands_each_stage_its_own_options(tmp_path):
    cfg = RunAllConfig(data_dir=str(tmp_path), extract_image_size=64, scratch_image_size=96, rotation=15.0,
                       scratch_shift=0.05, finetune_shift=0.2, preprocessing="caffe", workers=3, block_files=16,
                       epochs=7, finetune_epochs=2, top_learning_rate=0.01, scratch_learning_rate=0.002,
                       dropout=0.3, ema_momentum=0.9, cache_block4=False, max_failures=0, num_workers=2,
                       extract_batch_size=8, top_batch_size=16, finetune_batch_size=4, scratch_batch_size=2, seed=5)
    extract, top, fine, scratch = (cfg.stage_config(s) for s in ("extract_features", "train_top", "finetune",
                                                                   "train_scratch"))
    assert (extract.image_size, extract.preprocessing, extract.workers, extract.block_files) == (64, "caffe", 3, 16)
    assert extract.cache_block4 is False and fine.cache_block4 is False
    assert [c.epochs for c in (top, fine, scratch)] == [7, 2, 7]
    assert [c.learning_rate for c in (top, fine, scratch)] == [0.01, None, 0.002]
    assert [c.batch_size for c in (extract, top, fine, scratch)] == [8, 16, 4, 2]
    assert (scratch.image_size, scratch.rotation, scratch.shift, fine.shift) == (96, 15.0, 0.05, 0.2)
    for c in (top, fine, scratch):
        assert (c.dropout, c.max_failures, c.num_workers, c.seed, c.ema_momentum) == (0.3, 0, 2, 5, 0.9)
    assert fine.data_dir == scratch.data_dir == extract.data_dir == str(tmp_path)
    # Cached fine-tuning reads the extraction's block-4 outputs, so it takes no data options.
    assert RunAllConfig(data_dir=str(tmp_path)).stage_config("finetune").data_dir is None


def test_without_epochs_each_job_keeps_its_default_and_the_builtin_data_gets_five(tmp_path):
    real = RunAllConfig(data_dir=str(tmp_path))
    assert [real.stage_config(s).epochs for s in ("train_top", "finetune", "train_scratch")] == [50, 10, 100]
    builtin = RunAllConfig(scratch_epochs=1)
    assert [builtin.stage_config(s).epochs for s in ("train_top", "finetune", "train_scratch")] == [5, 5, 1]


@pytest.mark.parametrize("option,value,message", [("top_epochs", 0, "--top-epochs must be a positive number"),
                                                  ("finetune_learning_rate", -1.0, "--finetune-learning-rate"),
                                                  ("extract_image_size", 16, "--extract-image-size"),
                                                  ("scratch_image_size", 31, "--scratch-image-size"),
                                                  ("scratch_batch_size", 0, "--scratch-batch-size must be a positive"),
                                                  ("rotation", 181.0, r"--rotation must be in \[0, 180\]"),
                                                  ("scratch_shift", 1.0, r"--scratch-shift must be in \[0, 1\)"),
                                                  ("ema_momentum", 1.0, r"--ema-momentum must be in \[0, 1\)"),
                                                  ("folds", 1, "--folds must be an integer of at least 2"),
                                                  ("skip", "top", "--skip must be one of finetune, scratch"),
                                                  ("preprocessing", "tf", "one of auto, torch, caffe")])
def test_invalid_run_all_options_name_the_option_as_run_all_spells_it(option, value, message):
    with pytest.raises(ConfigError, match=message):
        RunAllConfig(**{option: value})


def test_run_all_checks_the_small_cnns_batch_against_the_workers_too():
    with pytest.raises(ConfigError, match="--num-workers 4 does not divide --scratch-batch-size 18"):
        RunAllConfig(num_workers=4, scratch_batch_size=18)
    assert ScratchConfig().batch_size == 16 and ScratchConfig().epochs == 100


@pytest.mark.parametrize("cls,argv", [
    (ExtractConfig, ["--image-size", "64", "--no-cache-block4", "--precision", "float32", "--max-image-megapixels", "3"]),
    (TrainTopConfig, ["--epochs", "3", "--learning-rate", "0.01", "--dropout", "0.25", "--seed", "9"]),
    (FinetuneConfig, ["--no-cache-block4", "--shift", "0.2", "--max-images-per-class", "4"]),
    (ScratchConfig, ["--rotation", "5", "--batch-size", "8", "--validation-fraction", "0.3", "--layout", "kaggle"]),
    (AuditConfig, ["--folds", "3", "--near-threshold", "0.9", "--top-k", "5"]),
    (ServeConfig, ["--model", "m.keras", "--port", "8123", "--insecure"]),
    (RunAllConfig, ["--top-epochs", "2", "--scratch-batch-size", "4", "--no-cache-block4", "--audit", "--seed", "3"]),
])
def test_a_written_config_read_back_is_the_same_settings(cls, argv, tmp_path):
    cfg = parse_config(cls, argv, "")
    path = str(tmp_path / "config.yaml")
    write_config(path, "job", resolved(cfg))
    assert parse_config(cls, ["--config", path], "") == cfg
    assert resolved(cfg) != {name: f.default for name, f in fields(cls).items()}  # the file made it so, not defaults


def test_run_alls_resolved_settings_make_the_same_stages(tmp_path):
    cfg = RunAllConfig(top_epochs=2, scratch_batch_size=4, cache_block4=False)
    path = str(tmp_path / "config.yaml")
    write_config(path, "run_all", resolved_options(cfg, str(tmp_path / "run")))
    written = yaml.safe_load(open(path))
    assert (written["finetune_epochs"], written["scratch_epochs"], written["extract_image_size"]) == (5, 5, 224)
    again = parse_config(RunAllConfig, ["--config", path], "")
    for stage in RunAllConfig.STAGES:
        assert again.stage_config(stage.name) == cfg.stage_config(stage.name), stage.name


def test_options_on_the_command_line_win_over_the_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 4\nlearning-rate: 0.5\nseed: 2\n")
    cfg = parse_config(TrainTopConfig, ["--config", str(path), "--seed", "7"], "")
    assert (cfg.epochs, cfg.learning_rate, cfg.seed) == (4, 0.5, 7)


def test_a_config_file_supplies_a_required_option(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("model: m.keras\n")
    assert parse_config(ServeConfig, ["--config", str(path)], "").model == "m.keras"


@pytest.mark.parametrize("text,message", [("epoch: 3\n", "'epoch' is not an option of this job; the options are "),
                                          ("epochs: three\n", "epochs must be an int; got 'three'"),
                                          ("dropout: true\n", "dropout must be a float; got True"),
                                          ("- 1\n", "must hold a mapping"),
                                          ("dropout: null\n", "dropout must be a float; got None"),
                                          ("seed: null\n", "seed must be an int; got None"),
                                          ("epochs: 0\n", "--epochs must be a positive number")])
def test_a_bad_config_file_fails_before_any_work_naming_the_key(text, message, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exc:
        parse_config(TrainTopConfig, ["--config", str(path)], "")
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_missing_config_file_is_named():
    with pytest.raises(SystemExit):
        parse_config(PredictConfig, ["--config", "/nonexistent/run.yaml"], "")


def test_a_config_file_reads_yamls_exponent_floats_and_null_where_an_option_takes_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1e-4\nmlflow_uri: null\n")
    cfg = parse_config(TrainTopConfig, ["--config", str(path)], "")
    assert (cfg.learning_rate, cfg.mlflow_uri) == (1e-4, None)


def test_credentials_are_redacted_in_a_written_config_and_must_be_given_again(tmp_path, capsys):
    uri = "http://user:s3cret@127.0.0.1:5000"
    cfg = parse_config(TrainTopConfig, ["--mlflow-uri", uri], "")
    path = str(tmp_path / "config.yaml")
    write_config(path, "train_top", resolved(cfg))
    assert "s3cret" not in open(path).read()
    with pytest.raises(SystemExit):
        parse_config(TrainTopConfig, ["--config", path], "")
    assert "--mlflow-uri hold(s) a credential the file has redacted" in capsys.readouterr().err
    assert parse_config(TrainTopConfig, ["--config", path, "--mlflow-uri", uri], "") == cfg


def test_a_skipped_stage_is_not_checked_and_gets_no_block4_cache():
    cfg = RunAllConfig(num_workers=3, extract_batch_size=30, top_batch_size=30, finetune_batch_size=30, skip="scratch")
    assert cfg.stage_config("extract_features").cache_block4 is True
    with pytest.raises(ConfigError, match="--scratch-batch-size 16"):
        RunAllConfig(num_workers=3, top_batch_size=30, finetune_batch_size=30)
    assert RunAllConfig(skip="finetune").stage_config("extract_features").cache_block4 is False


@pytest.mark.parametrize("cls, names", [
    (ExtractConfig, ("data_dir", "exclude", "weights", "output_dir")),
    (TrainTopConfig, ("features_dir", "output_dir")),
    (FinetuneConfig, ("top_model",)),
    (ScratchConfig, ("data_dir", "exclude", "output_dir")),
    (AuditConfig, ("features_dir", "top_model", "exclude", "output_dir")),
    (PredictConfig, ("model",)),
    (RunAllConfig, ("data_dir", "exclude", "weights", "output_dir")),
], ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_configs_read_nothing_and_the_preflight_checks_every_location_they_name(cls, names, tmp_path):
    """A config checks values only (settings can be built anywhere, the files need not be there);
    the job's preflight refuses, naming the option, each location that cannot be used."""
    (tmp_path / "a-file").write_text("x")
    base = {"model": str(tmp_path / "a-file"), "input": str(tmp_path), "output": str(tmp_path / "o.csv")}
    base = {k: v for k, v in base.items() if k in fields(cls)}
    for name in names:
        bad = str(tmp_path / "a-file") if name == "output_dir" else str(tmp_path / "missing")
        extra = {"cache_block4": False} if cls is FinetuneConfig else {}
        cfg = cls(**{**base, **extra, name: bad})  # no error: nothing is read
        with pytest.raises(UserError, match=bad if name == "model" else f"--{name.replace('_', '-')} "):
            preflight(cfg)
