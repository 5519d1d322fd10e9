"""The hold-or-stream rule counts what a training worker really takes (its measured footprint),
not the raw bytes of its data, and a worker's own memory is measured apart from the pages it shares."""

from __future__ import annotations

import mmap
import tempfile
import time

import numpy as np

from pipeline.config import TrainTopConfig
from pipeline.data.reuse import differences, job_settings
from pipeline.training.jobs import loop_settings
from pipeline.training.memory import SAMPLE_S, PrivatePeak, private_bytes
from pipeline.training.batches import HELD_BYTES_FACTOR, HOLD_SHARE, WORKER_BASE_BYTES, fits_in_memory, held_bytes


def test_held_data_is_counted_by_the_measured_footprint_not_its_raw_bytes():
    memory, workers = 16 * 2**30, 2
    # The older rule held data whenever every worker's copy fit in a quarter of the memory.
    assert not fits_in_memory(0.25 * memory / workers, workers, memory)
    # The largest data that may be held: the workers' bases plus their copies fill the share.
    largest = (HOLD_SHARE * memory / workers - WORKER_BASE_BYTES) / HELD_BYTES_FACTOR
    assert largest > 0
    assert fits_in_memory(largest, workers, memory)
    assert not fits_in_memory(largest * 1.01, workers, memory)
    # More workers on the same memory hold less.
    assert not fits_in_memory(largest, workers + 1, memory)


def test_data_that_does_not_fit_is_streamed_unless_the_user_says_otherwise(ray_cluster):
    # On this cluster (whatever its memory): a worker that would need more than all of it streams.
    assert held_bytes(1e15, 1) == 0
    assert held_bytes(1, 1) == 1

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
