"""The hold-or-stream rule counts what a training worker really takes (its measured footprint),
not the raw bytes of its data, and a worker's own memory is measured apart from the pages it shares."""

from __future__ import annotations

import glob
import json
import mmap
import os
import tempfile
import time

import numpy as np
import pytest

from pipeline.config import TrainTopConfig
from pipeline.data.reuse import differences, job_settings
from pipeline.training.jobs import loop_settings
from pipeline.training.memory import SAMPLE_S, PrivatePeak, private_bytes
from pipeline.training.batches import HELD_BYTES_FACTOR, HOLD_SHARE, fits_in_memory, held_bytes, worker_footprint
from pipeline.training.kinds import KINDS

RESULTS = os.path.join(os.path.dirname(__file__), "..", "bench", "results")
GIB = 2**30


@pytest.mark.parametrize("folder", ["top", "finetune", "scratch"])
def test_held_data_is_counted_by_the_measured_footprint_not_its_raw_bytes(folder):
    kind, memory, workers = KINDS[folder], 16 * GIB, 2
    # The older rule held data whenever every worker's copy fit in a quarter of the memory.
    assert not fits_in_memory(kind, 0.25 * memory / workers, workers, memory)
    # The largest data that may be held: the workers' fixed parts plus their copies fill the share.
    largest = (HOLD_SHARE * memory / workers - kind.worker_fixed_gib * GIB) / HELD_BYTES_FACTOR
    assert largest > 0
    assert fits_in_memory(kind, largest, workers, memory)
    assert not fits_in_memory(kind, largest * 1.01, workers, memory)
    # More workers on the same memory hold less.
    assert not fits_in_memory(kind, largest, workers + 1, memory)


def _measured_peaks():
    """(result file, job, private peak, data held) of every training job a memory bench measured."""
    for path in sorted(glob.glob(os.path.join(RESULTS, "*.json"))):
        with open(path) as f:
            result = json.load(f)
        for job in ("top", "finetune", "scratch"):
            figures = result.get(job)
            if isinstance(figures, dict) and "worker_peak_private_gib" in figures:
                for peak in figures["worker_peak_private_gib"]:
                    yield os.path.basename(path), job, peak, figures["held_gib_per_worker"]


def test_every_measured_worker_peak_is_within_its_kinds_footprint():
    measured = list(_measured_peaks())
    # Held and streamed workers of all three kinds (train_memory-1worker, train_memory-streamed, kaggle_scale-*).
    assert {(job, held > 0) for _, job, _, held in measured} == {(j, h) for j in ("top", "finetune", "scratch")
                                                               for h in (False, True)}
    for name, job, peak, held in measured:
        # The memory benches run fine-tuning in its default mode, on the block-4 cache (KINDS["finetune"]).
        assert peak * GIB <= worker_footprint(KINDS[job], held * GIB), (name, job, peak, held)


def test_data_that_does_not_fit_is_streamed_unless_the_user_says_otherwise(ray_cluster):
    # On this cluster (whatever its memory): a worker that would need more than all of it streams.
    kind = KINDS["top"]
    assert held_bytes(kind, 1e15, 1) == 0
    assert held_bytes(kind, 1, 1) == 1

    def held(hold_data: str, nbytes: float) -> int:
        return loop_settings(TrainTopConfig(hold_data=hold_data, batch_size=8), 2, 64, nbytes).held_bytes

    assert (held("auto", 1e15), held("auto", 1.0)) == (0, 1)
    assert (held("always", 1e15), held("never", 1.0)) == (int(1e15), 0)


def _resident_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_private_peak_sees_a_passing_allocation_and_not_shared_pages():
    size = 256 * 2**20
    with PrivatePeak() as peak:
        before = peak.peak()
        # Shared memory, as the object store's blocks are: resident, touched, but not private.
        with tempfile.NamedTemporaryFile(dir="/dev/shm") as f:
            f.truncate(size)
            shared = mmap.mmap(f.fileno(), size)
            resident = _resident_bytes()
            shared[:] = b"\1" * size
            assert _resident_bytes() - resident > 0.9 * size
            assert peak.peak() - before < 0.2 * size
            shared.close()
        # A private copy that is gone before the peak is next read: the sampler must have seen it.
        passing = np.ones(size // 8)
        time.sleep(10 * SAMPLE_S)
        del passing
        assert private_bytes() - before < 0.2 * size
        assert peak.peak() - before > 0.9 * size


def test_an_output_recorded_before_hold_data_existed_counts_as_made_with_auto():
    now = job_settings(TrainTopConfig(batch_size=8))
    older = {k: v for k, v in now.items() if k != "hold_data"}
    assert "hold_data" in now and differences(older, now) == []
    assert differences(older, job_settings(TrainTopConfig(batch_size=8, hold_data="never"))) == [
        "hold_data: 'auto' → 'never'"]
