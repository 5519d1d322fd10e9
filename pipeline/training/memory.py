"""A training worker's own memory: the peak of its private resident pages, sampled while it trains.

The kernel's peak resident set (``ru_maxrss``, VmHWM) also counts pages a worker shares: the object
store's (Ray Data's blocks, which workers read zero-copy from shared memory) and the shared
libraries'. A node holds those once however many workers map them, and the object store has its own
budget beside the ``memory`` Ray hands out; so the hold-or-stream rule budgets each worker's private
(anonymous) pages, for which Linux keeps no peak: ``PrivatePeak`` samples them.
"""

from __future__ import annotations

import resource
import threading

# Often enough to see a batch's copies (a step takes tens of milliseconds or more), rare enough to cost nothing.
SAMPLE_S = 0.02


def private_bytes() -> int:
    """This process's private resident memory now (RssAnon in /proc/self/status), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024  # the kernel writes kB
    raise RuntimeError("/proc/self/status has no RssAnon line: private memory is measured on Linux only")


def resident_peak_bytes() -> int:
    """This process's peak resident memory so far (shared pages included), in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux counts kB


class PrivatePeak:
    """The peak of ``private_bytes()`` while the context is open, sampled every ``SAMPLE_S`` by a thread."""

    def __init__(self) -> None:
        self._peak = private_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="private-memory-peak", daemon=True)

    def __enter__(self) -> "PrivatePeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._peak = max(self._peak, private_bytes())

    def peak(self) -> int:
        """The peak so far, counting this moment."""
        self._peak = max(self._peak, private_bytes())
        return self._peak
