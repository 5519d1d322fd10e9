"""Shared fixtures: one real local Ray cluster per test session and small real data roots."""

from __future__ import annotations

import json
import os
import shutil
import signal

import numpy as np
import pytest
from PIL import Image

REAL_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cats_vs_dogs_small"))


def pytest_sessionstart(session) -> None:
    """POSIX shells start a background command with SIGINT ignored, and a child inherits that through
    exec: run in the background (nohup, a CI runner, ``bench/reliability.py``), the jobs the tests
    interrupt as Ctrl-C would ignored it and outlived the test. A handler set here is reset to the
    default in every job started from this process, as in a terminal."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster, started once for the whole session."""
    import ray

    from pipeline.batch.cluster import init_ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # The product's own start: its processes address this cluster, not the machine's latest
    # (tests start other clusters while this one runs). With the dashboard, Ray Train's
    # placement-group cleaner can ask the state API about it.
    # MLflow 3 refuses local file stores unless allowed; the tracking test logs to one from the workers.
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    # The memory Ray may hand out is fixed: by default it is a share of what is free when the cluster starts, and
    # a machine busy then (another run, a bench) made the hold-or-stream rule stream tests' tiny training data.
    init_ray(local=True, num_cpus=2, include_dashboard=True, env_vars={"MLFLOW_ALLOW_FILE_STORE": "true"},
             _memory=12 * 2**30)
    yield ray
    ray.shutdown()


def real_images(split: str, cls: str, count: int, start: int = 0) -> list[str]:
    """Paths of ``count`` real photos of one class from the shared data set."""
    if not os.path.isdir(REAL_DATA):
        # A missing data set must fail the run: skipped, most of the suite would pass without testing.
        pytest.fail(f"shared data set not found at {REAL_DATA}; the tests need ../shared/data/cats_vs_dogs_small")
    folder = os.path.join(REAL_DATA, split, cls)
    names = sorted(os.listdir(folder))[start:start + count]
    return [os.path.join(folder, n) for n in names]


def make_real_root(root: str, per_class: int) -> str:
    """A data root in the splits layout holding ``per_class`` real photos per class and split."""
    for split in ("train", "validation"):
        for cls in ("cats", "dogs"):
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            for path in real_images(split, cls, per_class):
                shutil.copyfile(path, os.path.join(root, split, cls, os.path.basename(path)))
    return root


@pytest.fixture(scope="session")
def real_root(tmp_path_factory) -> str:
    """40 real photos: 10 cats and 10 dogs in each of train and validation."""
    return make_real_root(str(tmp_path_factory.mktemp("real")), 10)


# Tests are "slow" when they need a Ray cluster (directly or through a fixture), start jobs or
# clusters of their own, or read the real VGG16 weights (a 528 MB archive on a first run).
# The rest is the fast tier: `pytest -m "not slow"`, well under a minute.
SLOW_FIXTURES = {"ray_cluster", "head_node", "s3_env"}
SLOW_MODULES = {"test_two_nodes", "test_setup", "test_reliability", "test_resume", "test_run_all"}


def pytest_collection_modifyitems(config, items):
    """Mark the slow tests (see SLOW_FIXTURES and SLOW_MODULES)."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.module.__name__.split(".")[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


RELIABILITY_ROWS: list[dict] = []


@pytest.fixture
def record_case():
    """Record one row of the reliability table printed at the end of the session (None: the case
    writes no rows, so rows out, duplicates and lost do not apply)."""
    def record(case: str, expected: str, observed: str, rows_in: int, rows_out: int | None, duplicates: int | None,
               lost: int | None):
        RELIABILITY_ROWS.append(dict(case=case, expected=expected, observed=observed, rows_in=rows_in,
                                     rows_out=rows_out, duplicates=duplicates, lost=lost))
    return record


def pytest_terminal_summary(terminalreporter):
    """Print the reliability matrix: case, expected, observed, rows in/out, duplicates, lost."""
    if not RELIABILITY_ROWS:
        return
    cols = ["case", "expected", "observed", "rows_in", "rows_out", "duplicates", "lost"]
    def cell(value) -> str:
        return "-" if value is None else str(value)

    widths = {c: max(len(c), *(len(cell(r[c])) for r in RELIABILITY_ROWS)) for c in cols}
    terminalreporter.write_sep("=", "reliability matrix")
    terminalreporter.write_line("  ".join(c.ljust(widths[c]) for c in cols))
    for r in RELIABILITY_ROWS:
        terminalreporter.write_line("  ".join(cell(r[c]).ljust(widths[c]) for c in cols))
    counted = [r for r in RELIABILITY_ROWS if r["lost"] is not None]
    lost = sum(r["lost"] for r in counted)
    dupes = sum(r["duplicates"] for r in counted)
    terminalreporter.write_line(f"{len(RELIABILITY_ROWS)} cases; {len(RELIABILITY_ROWS) - len(counted)} refused before "
                                f"any work (no rows to lose); over the {len(counted)} that write rows: {dupes} "
                                f"duplicated rows, {lost} lost rows")


def checkpoint_of_epoch(storage_dir: str, epoch: int):
    """The Ray Train checkpoint of ``epoch`` under a job's ``ray_train`` folder."""
    from ray.train import Checkpoint

    for folder, _, files in os.walk(storage_dir):
        if "state.json" in files:
            with open(os.path.join(folder, "state.json")) as f:
                if json.load(f)["epoch"] == epoch:
                    return Checkpoint.from_directory(folder)
    raise AssertionError(f"no checkpoint of epoch {epoch} under {storage_dir}")


def assert_curves_drawn(path: str) -> None:
    """A job's curves.png is the 1000x400 figure with both series drawn: many pixels of
    matplotlib's first two line colours (train blue, validation orange), not only a valid file."""
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1000, 400), (image.format, image.size)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    for colour in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(pixels - colour).sum(axis=1) < 30).sum() > 100, f"no series drawn in {colour}"
