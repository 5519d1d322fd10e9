"""The data set doctor, ``audit_data(cfg)``: over a feature folder (or a data root, extracted first
as run_all does), it finds exact and near duplicates and the leakage among them, likely wrong labels
and strays, and writes into ``<output-dir>`` ``settings.json`` first (the folder is this job's), the
tables, ``suspects.txt`` and ``report.html`` (``pipeline.audit.report``), and ``audit.json`` last
(counts, the leakage's effect on accuracy, timings). The same settings and feature folder reuse a
finished audit; other settings are refused, naming them, unless ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from typing import Any, Iterator

from pipeline.audit import duplicates, labels, leakage, neighbours, pooled, strays
from pipeline.audit.findings import Findings, summary_counts
from pipeline.audit.page import write_outputs
from pipeline.batch.extract import run_extraction
from pipeline.config import DATA_OPTIONS, AuditConfig, ExtractConfig
from pipeline.data import outputs, storage
from pipeline.data.reuse import job_settings, require_same
from pipeline.options import CONFIG_FILE, write_resolved
from pipeline.training.top import finished_features

log = logging.getLogger(__name__)

SETTINGS = "settings.json"
AUDIT_FILE = "audit.json"
LAYOUT = outputs.Layout("an audit", markers=(SETTINGS, AUDIT_FILE), files=(
    CONFIG_FILE, "report.html", "suspects.txt", "scores.parquet", "scores.csv", "pairs.parquet", "pairs.csv", "thumbs/*"))
# Neighbours searched per photo: near duplicates are found among them.
NEIGHBOURS = 10


def _prepare(directory: str, settings: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The finished audit to reuse (same settings), else None after recording ``settings``; holds the
    folder's lock for the rest of the job and refuses a folder holding what an audit does not write."""
    outputs.hold_lock(directory)
    outputs.prepare(directory, LAYOUT, overwrite)
    recorded = storage.join(directory, SETTINGS)
    if storage.exists(recorded):
        require_same(directory, "an audit", storage.read_json(recorded), settings)
        if storage.exists(storage.join(directory, AUDIT_FILE)):
            log.info(f"reusing the finished audit in {directory} (same settings and features; --overwrite redoes it)")
            return storage.read_json(storage.join(directory, AUDIT_FILE))
    storage.write_json(recorded, settings)
    return None


@contextlib.contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    timings[stage] = round(time.monotonic() - started, 2)


@outputs.holding_locks
def audit_data(cfg: AuditConfig) -> dict[str, Any]:
    """Audit a feature folder (see the module docstring); return what ``audit.json`` holds."""
    started = time.monotonic()
    features_dir = cfg.features_dir or run_extraction(
        ExtractConfig(**{name: getattr(cfg, name) for name in DATA_OPTIONS}))["output_dir"]
    manifest = finished_features(features_dir)
    output_dir = cfg.output_dir or os.path.join("outputs", storage.basename(manifest["data_dir"]), "audit")
    top_sha = hashlib.sha256(storage.read_bytes(cfg.top_model)).hexdigest() if cfg.top_model else None
    settings = job_settings(cfg, drop=DATA_OPTIONS + ("features_dir", "top_model"),
                            features=manifest["fingerprint"], top_model_sha256=top_sha)
    reused = _prepare(output_dir, settings, cfg.overwrite)
    if reused:
        return reused
    write_resolved(output_dir, "audit_data", cfg, output_dir=output_dir)
    timings: dict[str, float] = {}
    corpus, findings = examine(cfg, features_dir, manifest, timings)
    with _timed(timings, "report"):
        written = write_outputs(cfg, output_dir, corpus, findings)
    audit = {"kind": "audit", "features_dir": storage.absolute(features_dir), "data_dir": corpus.root,
             "output_dir": output_dir, **written, "counts": summary_counts(corpus, findings),
             "leakage_effect": findings.effect, "settings": settings, "timings_s": timings,
             "elapsed_s": round(time.monotonic() - started, 2),
             "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_json(storage.join(output_dir, AUDIT_FILE), audit)
    for name, value in audit["counts"].items():
        log.info(f"{name}: {value}")
    log.info(f"report: {written['report']}")
    return audit


def examine(cfg: AuditConfig, features_dir: str, manifest: dict[str, Any],
            timings: dict[str, float]) -> tuple[pooled.Corpus, Findings]:
    """Every check over the feature folder; ``timings`` gets each stage's seconds."""
    with _timed(timings, "pool"):
        corpus = pooled.read_corpus(features_dir, manifest)
    with _timed(timings, "hash"):
        digests = duplicates.content_hashes(corpus, cfg.max_pixels)
    with _timed(timings, "neighbours"):
        sims, ids = neighbours.nearest(corpus.features, NEIGHBOURS)
    with _timed(timings, "duplicates"):
        dups = duplicates.find_duplicates(corpus, digests, sims, ids, cfg.near_threshold)
    with _timed(timings, "cross_validation"):
        probs = labels.out_of_sample_probabilities(corpus, cfg.folds)
    with _timed(timings, "confident_learning"):
        found = labels.label_issues(corpus.labels, probs)
    with _timed(timings, "strays"):
        stray = strays.stray_scores(corpus)
    with _timed(timings, "leakage_effect"):
        leaked = leakage.leaked(corpus, dups)
        if cfg.top_model:
            held, source = leakage.top_model_probabilities(cfg.top_model, features_dir, corpus), "top model"
        else:
            held, source = probs, "cross-validation"
        effect = leakage.accuracy_effect(corpus, leaked, held, source)
    return corpus, Findings(digests=digests, sims=sims, ids=ids, dups=dups, probs=probs, labels=found,
                            strays=stray, leaked=leaked, effect=effect)
