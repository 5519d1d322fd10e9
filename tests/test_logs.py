"""What jobs print: TensorFlow's load-time lines dropped unless --verbose, the choice carried to
every worker through the runtime environment, and --verbose offered by every job without being
a setting (the main job's line count is checked in test_run_all)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline import logs
from pipeline.config import (
    ExtractConfig,
    FinetuneConfig,
    PredictConfig,
    RunAllConfig,
    ScratchConfig,
    TrainTopConfig,
    build_parser,
)
from pipeline.data.reuse import job_settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPORT_TENSORFLOW = """
import sys
from pipeline import logs
logs.setup_driver(sys.argv[1] == "verbose")
import os
os.write(2, b"before the import\\n")
import tensorflow as tf
tf.constant(1.0) + 1.0
print("imported", file=sys.stderr)
"""


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_tensorflow_load_lines_are_dropped_unless_verbose(mode):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", logs.VERBOSE_ENV)}
    proc = subprocess.run([sys.executable, "-c", IMPORT_TENSORFLOW, mode], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "before the import" in proc.stderr and "imported" in proc.stderr
    chatter = [line for line in proc.stderr.splitlines() if logs.TF_LOAD_CHATTER.search(line)]
    if mode == "quiet":
        assert chatter == []
    else:
        # TensorFlow 2.21 on this CPU announces oneDNN at load; --verbose must let it through.
        assert any("oneDNN" in line for line in chatter), proc.stderr


def test_the_choice_reaches_every_worker_through_the_runtime_environment():
    quiet, verbose = logs.worker_env(False), logs.worker_env(True)
    assert quiet["env_vars"][logs.VERBOSE_ENV] == "0" and quiet["env_vars"]["TF_CPP_MIN_LOG_LEVEL"] == "2"
    assert verbose["env_vars"] == {logs.VERBOSE_ENV: "1"}
    for env in (quiet, verbose):
        module, function = env["worker_process_setup_hook"].rsplit(".", 1)
        assert getattr(__import__(module, fromlist=[function]), function) is logs.setup_worker


@pytest.mark.parametrize("config", [ExtractConfig, TrainTopConfig, FinetuneConfig, ScratchConfig, RunAllConfig])
def test_every_job_offers_verbose_and_it_is_not_a_setting(config):
    cfg = config(verbose=True)
    assert cfg.verbose and "verbose" not in job_settings(cfg)
    assert "--verbose" in build_parser(config, "").format_help()


def test_prediction_offers_verbose():
    assert "--verbose" in build_parser(PredictConfig, "").format_help()
