"""The hold-or-stream rule counts what a training worker really takes (its measured footprint),
not the raw bytes of its data."""

from __future__ import annotations

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


def test_data_that_does_not_fit_is_streamed(ray_cluster):
    # On this cluster (whatever its memory): a worker that would need more than all of it streams.
    assert held_bytes(1e15, 1) == 0
    assert held_bytes(1, 1) == 1
