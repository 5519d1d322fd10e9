"""One rule for every job's output folder: the same settings and inputs reuse a finished result
(or resume an unfinished one); anything else is refused with a message that names what differs.

"Settings" are every option that changes what a job computes (not ``NOT_SETTINGS``), plus
fingerprints of its inputs (the files under a data root, a feature folder's manifest, a model
file's bytes), kept with credentials redacted (``pipeline.redact``) as they are recorded, so a
location whose password alone changed is the same setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from pipeline.errors import OutputError
from pipeline.redact import redact_values

# Options that say where results (and their tracking) go, how failures are retried or what is
# printed, not what is computed; and --exclude, whose effect is in the inputs' fingerprint (the
# files it lists are not among the listed files), so the same list in another file is the same.
NOT_SETTINGS = frozenset({"output_dir", "overwrite", "max_failures", "gpu_wait_s", "verbose", "mlflow_uri",
                          "mlflow_experiment", "exclude"})
# Options this project no longer has, with the value every output made without them computed:
# recorded with that value, an option is the same as its absence (recorded otherwise, it differs).
RETIRED = {"mirror_train": False}
# Options added since outputs were first recorded, with the value every output made before them computed
# with: an output that does not record one was made with that value.
ADDED = {"hold_data": "auto"}


def job_settings(cfg: Any, drop: tuple[str, ...] = (), **inputs: Any) -> dict[str, Any]:
    """The settings of a job config, JSON-normalised and redacted: its options (less ``NOT_SETTINGS``
    and ``drop``, typically input paths whose fingerprint is given instead) plus ``inputs``."""
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_SETTINGS and k not in drop}
    return redact_values(json.loads(json.dumps({**options, **inputs}, sort_keys=True)))


def fingerprint(settings: dict[str, Any]) -> str:
    """A short stable hash of settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def differences(recorded: dict[str, Any] | None, settings: dict[str, Any]) -> list[str]:
    """``name: recorded → now`` for every setting that differs (all of them when none were recorded)."""
    if recorded is None:
        return ["settings: not recorded (made by an older version of this project)"]
    recorded = redact_values(recorded)  # recorded before redaction existed: compare like with like
    recorded = {k: v for k, v in recorded.items() if k not in RETIRED or RETIRED[k] != v}
    recorded = {**{k: v for k, v in ADDED.items() if k in settings}, **recorded}
    return [f"{key}: {recorded.get(key)!r} → {settings.get(key)!r}"
            for key in sorted(set(recorded) | set(settings)) if recorded.get(key) != settings.get(key)]


def require_same(location: str, what: str, recorded: dict[str, Any] | None, settings: dict[str, Any]) -> None:
    """Raise OutputError naming each difference when ``location``'s ``recorded`` settings are not ``settings``."""
    diff = differences(recorded, settings)
    if diff:
        raise OutputError(f"{location} holds {what} made with other settings or inputs ({'; '.join(diff)}); "
                          f"pass --overwrite to replace it, or choose another output folder")
