"""What a job prints: the project's messages through Python logging (one line per event), Ray Data's progress bars,
one line per training epoch; unless ``--verbose``, the libraries' start-up and bookkeeping chatter silenced in every
Ray process on every node: each learns the choice from the job's runtime environment (``worker_env``) and runs
``setup_worker`` at start (Ray's ``worker_process_setup_hook``), so nodes that join later too.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
import warnings
from typing import Any

from pipeline.redact import redact

VERBOSE_ENV = "IMAGE_CLASSIFIER_VERBOSE"
# TensorFlow's C++ side writes these to fd 2 while its libraries load, before absl's logging is
# initialised, so TF_CPP_MIN_LOG_LEVEL does not reach them (checked on TensorFlow 2.21).
TF_LOAD_CHATTER = re.compile(r"All log messages before absl::InitializeLog\(\)|oneDNN custom operations are on|"
                             r"cpu_feature_guard|This TensorFlow binary is optimized|rebuild TensorFlow with")
# Ray Data's per-dataset "execution finished" lines and its hints about progress-bar modes, in
# the driver and in the processes that run datasets for Ray Train.
RAY_DATA_CHATTER = {"ray.data._internal.execution.streaming_executor": logging.WARNING,
                    "ray.data._internal.progress": logging.ERROR}
# Ray Serve's start-up narration in the driver (the serving job says where it serves itself).
DRIVER_CHATTER = {"ray.serve": logging.WARNING}
log = logging.getLogger("pipeline")


def verbose() -> bool:
    """Whether this process belongs to a job run with ``--verbose``."""
    return os.environ.get(VERBOSE_ENV) == "1"


def worker_env(is_verbose: bool) -> dict[str, Any]:
    """The runtime-environment entries that carry the choice to every worker of the job."""
    env = {VERBOSE_ENV: "1" if is_verbose else "0"}
    if not is_verbose:
        env["TF_CPP_MIN_LOG_LEVEL"] = "2"  # TensorFlow's C++ info and warning lines after start-up
    return {"env_vars": env, "worker_process_setup_hook": "pipeline.logs.setup_worker"}


def setup_driver(is_verbose: bool) -> None:
    """Configure this (the job's driver) process: the project's messages as plain lines on
    stdout, and, unless verbose, TensorFlow's and Ray Data's chatter off."""
    os.environ[VERBOSE_ENV] = "1" if is_verbose else "0"
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    handler.addFilter(RedactFilter())
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if is_verbose else logging.INFO)
    log.propagate = False
    if not is_verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        quiet_tensorflow_import()
        # Ray Data's per-dataset execution plans and issue reports off; its progress bars stay. Deferred: Ray Data
        # takes about a second to load, and every Ray worker imports this module for its setup hook.
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.print_on_execution_start = False
        ctx.issue_detectors_config.detectors = []
        quiet_loggers({**RAY_DATA_CHATTER, **DRIVER_CHATTER})


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a message comes (redirected, or captured by a test)."""

    stream = property(lambda self: sys.stdout, lambda self, _value: None)


class RedactFilter(logging.Filter):
    """Redacts credentials in URIs (``pipeline.redact``) from every record a handler writes:
    a location or tracking URI in any message never shows its password."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102 - see class docstring
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True  # a malformed record: logging's own handling reports it
        record.msg, record.args = redact(message), None
        return True


def install_redaction(handlers: list[logging.Handler]) -> None:
    """Add one RedactFilter to each of ``handlers`` that lacks one."""
    for handler in handlers:
        if not any(isinstance(f, RedactFilter) for f in handler.filters):
            handler.addFilter(RedactFilter())


def setup_worker() -> None:
    """Ray's per-worker setup hook: the project's logger at INFO (epoch lines reach the driver
    through Ray's log forwarding) and, unless verbose, TensorFlow's start-up lines filtered."""
    log.setLevel(logging.DEBUG if verbose() else logging.INFO)
    # The project's records propagate to the root handlers Ray set up in this worker.
    install_redaction(logging.getLogger().handlers)
    if not verbose():
        quiet_tensorflow_import()
        quiet_loggers(RAY_DATA_CHATTER)
        # Ray Train's own processes warn of deprecated Ray Data options they pass themselves.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")


def quiet_loggers(levels: dict[str, int]) -> None:
    """Set each named logger's level (Ray Data's dictConfig, run when ``ray.data`` is imported, leaves levels set
    on other loggers alone)."""
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def quiet_ray_train_worker() -> None:
    """Inside a Ray Train worker (after Ray Train configured its logging): unless verbose, only
    warnings from other loggers, so its per-report INFO lines stay in the log files."""
    if not verbose():
        logging.getLogger().setLevel(logging.WARNING)


def quiet_tensorflow_import() -> None:
    """Make this process's first ``import tensorflow`` drop TensorFlow's load-time lines from
    fd 2 (other output of the import passes through) and set its Python logger to errors."""
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietTensorflow) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietTensorflow())


class _QuietTensorflow(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` as usual, then runs its import with fd 2 captured and filtered."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _FilteredLoader(spec.loader)
        return spec


class _FilteredLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        with tempfile.TemporaryFile() as captured:
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(captured.fileno(), 2)
            try:
                self.loader.exec_module(module)
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                captured.seek(0)
                kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                        if not TF_LOAD_CHATTER.search(line)]
                sys.stderr.write("".join(kept))
        logging.getLogger("tensorflow").setLevel(logging.ERROR)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)
