"""A fault-injection hook for reliability tests: kill the current process at a chosen point, once.

Set ``RIC_FAULT_KILL=<site>:<n>:<marker path>`` in the environment of a Ray cluster's
processes; the n-th call of ``maybe_kill(site)`` in a process then exits that process
abruptly (as a crashed or preempted node would), after creating the marker file so
that the restarted process is left alone. Unset (always, outside tests), it does nothing.
"""

from __future__ import annotations

import os
from collections import Counter

ENV = "RIC_FAULT_KILL"
_calls: Counter[str] = Counter()


def maybe_kill(site: str) -> None:
    """Exit this process if ``RIC_FAULT_KILL`` names ``site`` and this is its n-th call here."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, n, marker = spec.split(":", 2)
    if target != site:
        return
    _calls[site] += 1
    if _calls[site] == int(n) and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(f"{site} call {n} killed pid {os.getpid()}\n")
        os._exit(1)
