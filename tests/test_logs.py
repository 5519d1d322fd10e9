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
    ScratchConfig,
    TrainTopConfig,
)
from pipeline.data.reuse import job_settings
from pipeline.options import build_parser
from pipeline.runall import RunAllConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TensorFlow's own load-time lines depend on the CPU and the build, so the script plants one
# line of that kind, and one that is not, on fd 2 inside the real import (a finder behind the
# quieting one, which wraps the loader it returns): the checks hold on any machine.
PLANTED_CHATTER = "I0000 00:00:00.000000 1 port.cc:153] oneDNN custom operations are on. (planted)"
PLANTED_OTHER = "a line the tensorflow import writes that is no load chatter (planted)"
IMPORT_TENSORFLOW = """
import importlib.abc, importlib.util, os, sys


class Plant(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            os.write(2, (sys.argv[2] + "\\n" + sys.argv[3] + "\\n").encode())
            run(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, Plant())
from pipeline import logs
logs.setup_driver(sys.argv[1] == "verbose")
os.write(2, b"before the import\\n")
import tensorflow as tf
tf.constant(1.0) + 1.0
print("imported", file=sys.stderr)
"""


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_tensorflow_load_lines_are_dropped_unless_verbose(mode):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", logs.VERBOSE_ENV)}
    proc = subprocess.run([sys.executable, "-c", IMPORT_TENSORFLOW, mode, PLANTED_CHATTER, PLANTED_OTHER], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert "before the import" in lines and "imported" in lines and PLANTED_OTHER in lines, proc.stderr
    chatter = [line for line in lines if logs.TF_LOAD_CHATTER.search(line)]
    if mode == "quiet":
        assert chatter == []
    else:
        assert PLANTED_CHATTER in chatter, proc.stderr


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
