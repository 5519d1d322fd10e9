"""Optional MLflow tracking of the training jobs (the ``mlflow`` extra: ``pip install -e ".[mlflow]"``).

Each training job is one MLflow run (docs/jobs.md#mlflow): the driver logs settings, results and
files, rank 0 alone each epoch's metrics (other ranks' are the same); a resumed job logs into the run
it started (recorded in ``<job dir>/mlflow_run.json``).

A password in the URI (``http://user:pw@host``) is used to connect but redacted everywhere it is
shown or stored (``pipeline.redact``); the record keeps the redacted URI, so a rerun with a changed
password goes on logging into the same run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
from typing import Any, Iterator

from pipeline.data import storage
from pipeline.errors import ConfigError, TrackingError
from pipeline.redact import redact, redact_values

RUN_FILE = "mlflow_run.json"
EXTRA_HINT = 'MLflow tracking needs the mlflow extra: pip install -e ".[mlflow]"'
log = logging.getLogger(__name__)


def tracking_uri(option: str | None) -> str | None:
    """The tracking store named by ``--mlflow-uri``, else by ``MLFLOW_TRACKING_URI``; None: tracking off."""
    return option or os.environ.get("MLFLOW_TRACKING_URI") or None


def check_available(option: str | None) -> None:
    """ConfigError, before any work, when tracking is asked for and MLflow is not installed."""
    if tracking_uri(option) is None:
        return
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(EXTRA_HINT)


def _client(uri: str):
    from mlflow import MlflowClient  # deferred: the optional mlflow extra, imported only when tracking is on

    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def _store_errors(uri: str) -> Iterator[None]:
    """MLflow's errors as one TrackingError with the URI's credentials redacted (MLflow repeats
    the URI, password included, in its own messages)."""
    from mlflow.exceptions import MlflowException  # deferred: the optional mlflow extra (see _client)

    try:
        yield
    except MlflowException as exc:
        raise TrackingError(f"the MLflow tracking store {redact(uri)} failed: {redact(str(exc))}") from None


def start_run(option: str | None, experiment: str, directory: str, kind: str,
              settings: dict[str, Any]) -> dict[str, str] | None:
    """Open (or, for a resumed job, reopen) the job's MLflow run and log its settings; returns
    ``{"uri", "run_id"}`` for the workers and ``finish_run``, or None when tracking is off."""
    uri = tracking_uri(option)
    if uri is None:
        return None
    client = _client(uri)
    recorded = storage.join(directory, RUN_FILE)
    previous = storage.read_json(recorded) if storage.exists(recorded) else {}
    with _store_errors(uri):
        if previous.get("uri") == redact(uri):
            client.update_run(previous["run_id"], status="RUNNING")
            return {"uri": uri, "run_id": previous["run_id"]}
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        run = client.create_run(experiment_id, run_name=kind, tags={"job": kind, "output": redact(directory)})
        from mlflow.entities import Param  # deferred: the optional mlflow extra (see _client)

        params = [Param(key, str(value)[:6000]) for key, value in sorted(_flatten(redact_values(settings)).items())]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            client.log_batch(run.info.run_id, params=params[start:start + 100])
    # Only the workers' handle holds the real URI; the record, like everything shown, is redacted.
    storage.write_json(recorded, {"uri": redact(uri), "run_id": run.info.run_id})
    log.info("MLflow run %s in experiment %r at %s", run.info.run_id, experiment, redact(uri))
    return {"uri": uri, "run_id": run.info.run_id}


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def log_epoch(handle: dict[str, str] | None, row: dict[str, Any]) -> None:
    """Rank 0's per-epoch metrics, at step = epoch; a failing store costs a warning, never the run."""
    if handle is None:
        return
    from mlflow.entities import Metric  # deferred: the optional mlflow extra (see _client)

    now = int(time.time() * 1000)
    metrics = [Metric(key, float(row[key]), now, int(row["epoch"]))
               for key in ("loss", "accuracy", "val_loss", "val_accuracy", "seconds") if key in row]
    try:
        _client(handle["uri"]).log_batch(handle["run_id"], metrics=metrics)
    except Exception as exc:  # noqa: BLE001 - tracking is a side channel
        log.warning("could not log epoch %s to MLflow (%s): %s", row.get("epoch"), redact(handle["uri"]),
                    redact(str(exc)))


def finish_run(handle: dict[str, str] | None, evaluation: dict[str, Any], files: list[str]) -> None:
    """The final evaluation's figures and the job's result files, then the run marked finished."""
    if handle is None:
        return
    with _store_errors(handle["uri"]):
        _log_results(_client(handle["uri"]), handle["run_id"], evaluation, files)


def _log_results(client, run_id: str, evaluation: dict[str, Any], files: list[str]) -> None:
    """Log the final figures and result files into the run, then mark it finished."""
    figures = {f"final_{key}": float(value) for key, value in evaluation.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    for key, value in figures.items():
        client.log_metric(run_id, key, value)
    for path in files:
        # MLflow names an artifact after its local file, so a download keeps the file's own name.
        with storage.local_copy(path, name=storage.basename(path)) as local:
            client.log_artifact(run_id, local, artifact_path="model" if path.endswith(".keras") else None)
    client.set_terminated(run_id, status="FINISHED")


def fail_run(handle: dict[str, str] | None) -> None:
    """Mark the run failed (a job that ended in an error)."""
    if handle is not None:
        with _store_errors(handle["uri"]):
            _client(handle["uri"]).set_terminated(handle["run_id"], status="FAILED")
