"""Fault-injection hooks for reliability tests: kill or stall the current process at a chosen point.

``RIC_FAULT_KILL=<site>:<n>:<marker path>`` in the environment of a Ray cluster's processes:
the n-th call of ``maybe_fail(site)`` in a process exits that process abruptly (as a crashed
or preempted node would), after creating the marker file so that the restarted process is
left alone.

``RIC_FAULT_PAUSE=<site>:<n>``: the n-th call of ``maybe_fail(site)`` in a process blocks for
good, so a test can interrupt a job at a known point (after exactly n-1 blocks of a one-actor
pool) instead of racing it.

Unset (always, outside tests), both do nothing.
"""

from __future__ import annotations

import os
import time
from collections import Counter

ENV = "RIC_FAULT_KILL"
PAUSE_ENV = "RIC_FAULT_PAUSE"
_calls: Counter[str] = Counter()


def maybe_fail(site: str) -> None:
    """Exit or stall this process if ``RIC_FAULT_KILL`` or ``RIC_FAULT_PAUSE`` names ``site`` and
    this is its n-th call here."""
    kill, pause = os.environ.get(ENV), os.environ.get(PAUSE_ENV)
    if not kill and not pause:
        return
    _calls[site] += 1
    if kill:
        target, n, marker = kill.split(":", 2)
        if target == site and _calls[site] == int(n) and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(f"{site} call {n} killed pid {os.getpid()}\n")
            os._exit(1)
    if pause:
        target, n = pause.split(":", 1)
        if target == site and _calls[site] == int(n):
            while True:
                time.sleep(3600)
