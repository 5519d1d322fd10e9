"""Fault-injection hooks for reliability tests: kill or stall the current process at a chosen point, and trace
what processes did around it. Unset (always, outside tests), the variables below do nothing.

``RIC_FAULT_KILL=<site>:<n>:<marker path>``: the n-th call of ``maybe_fail(site)`` in a process exits it abruptly
(as a crashed or preempted node would), after creating the marker file so that the restarted process is left alone.
``RIC_FAULT_PAUSE=<site>:<n>``: that call blocks for good, so a test interrupts a job at a known point (after
exactly n-1 blocks of a one-actor pool) instead of racing it.
``RIC_FAULT_TRACE=<path>``: every ``trace(site, details)`` appends one JSON line there, so a test sees what each
process did around a fault (a restarted training worker: the epoch and the weights it starts from).

Ray Train's workers do not inherit a driver's environment on a cluster already running, so ``fit`` hands them
these variables (``environment()``).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Any, Callable

ENV = "RIC_FAULT_KILL"
PAUSE_ENV = "RIC_FAULT_PAUSE"
TRACE_ENV = "RIC_FAULT_TRACE"
_calls: Counter[str] = Counter()


def environment() -> dict[str, str]:
    """The fault-injection variables set in this process's environment, to hand to processes that do not inherit it."""
    return {name: os.environ[name] for name in (ENV, PAUSE_ENV, TRACE_ENV) if os.environ.get(name)}


def trace(site: str, details: Callable[[], dict[str, Any]]) -> None:
    """With ``RIC_FAULT_TRACE``, append ``{"site": site, **details()}`` to its file as one JSON
    line; ``details`` is called only then, so a costly one costs nothing outside tests."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps({"site": site, **details()}) + "\n")


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
