"""The main job: extraction → top MLP → fine-tuning → small CNN, then ``report.md``."""

from __future__ import annotations

import dataclasses
import logging
import shlex
import sys
from typing import Any

from pipeline.audit import doctor
from pipeline.batch.extract import OUTPUT_LAYOUT, run_extraction
from pipeline.compose import Composed, Stage, compose
from pipeline.config import (
    LISTING_OPTIONS,
    SKIPPABLE,
    AuditConfig,
    ExtractConfig,
    FinetuneConfig,
    ScratchConfig,
    TrainTopConfig,
)
from pipeline.data import locks, outputs, storage
from pipeline.data.discover import resolve_data
from pipeline.data.synthetic import NOTE
from pipeline.nets.modelfile import MODEL_FILE
from pipeline.options import CONFIG_FILE, check_choice, check_positive, field_help, resolved, write_config
from pipeline.redact import redact
from pipeline.training.finetune import finetune
from pipeline.training.jobs import JOB_FOLDERS, JOB_LAYOUT
from pipeline.training.report import write_report
from pipeline.training.scratch import train_scratch
from pipeline.training.top import train_top

log = logging.getLogger(__name__)

# The built-in data set only proves the installation: a few epochs show every stage working in
# minutes; real data gets each job's own default unless an option says otherwise.
SYNTHETIC_EPOCHS = 5
TRAINING_STAGES = ("train_top", "finetune", "train_scratch")


@dataclasses.dataclass(kw_only=True)
class RunAllOptions(Composed):
    """What ``jobs.run_all`` adds to its stages' options, and how it hands each stage its own."""

    output_dir: str | None = field_help(None, "run folder: report.md and one folder per stage (default "
                                              "outputs/<data folder name>)", location="output")
    epochs: int | None = field_help(None, "epochs of every training job whose own --<job>-epochs is not given "
                                          f"(default: each job's own; {SYNTHETIC_EPOCHS} on the built-in data)")
    skip: str = field_help("", "comma-separated stages to skip", SKIPPABLE)
    audit: bool = field_help(False, "run jobs.audit_data on the features between extraction and training: "
                                    "<output-dir>/audit/report.html beside report.md; it excludes nothing "
                                    "(pass its suspects.txt, once checked, as --exclude)")

    def __post_init__(self) -> None:
        check_positive("epochs", self.epochs, allow_none=True)
        for stage in self.skipped():
            check_choice("skip", stage, SKIPPABLE)
        for stage in self.STAGES:
            if stage.name.removeprefix("train_") not in self.skipped():
                self.stage_config(stage.name)  # each stage's own checks, before any work

    def skipped(self) -> set[str]:
        """The stages named in ``--skip``."""
        return {s.strip() for s in self.skip.split(",") if s.strip()}

    def stage_config(self, name: str, **inputs: object) -> object:
        """Stage ``name``'s config: its options from these settings, ``inputs`` (what the run makes
        or resolves: folders, the top model, the data root) on top."""
        options = self.stage_options(name)
        if name == "extract_features":
            # Written when fine-tuning will read it.
            options["cache_block4"] = self.cache_block4 and "finetune" not in self.skipped()
        if name == "finetune" and self.cache_block4:
            # Cached fine-tuning reads the extraction's block-4 outputs, not the images.
            options = {k: v for k, v in options.items() if k not in LISTING_OPTIONS}
            inputs = {k: v for k, v in inputs.items() if k not in LISTING_OPTIONS}
        if name in TRAINING_STAGES and "epochs" not in options:
            epochs = self.epochs or (SYNTHETIC_EPOCHS if self.data_dir is None else None)
            options.update({"epochs": epochs} if epochs else {})
        return self.build(name, {**options, **inputs})


RunAllConfig = compose("RunAllConfig", RunAllOptions, (
    Stage("extract_features", ExtractConfig, "extract", given=("output_dir", "cache_block4")),
    Stage("audit_data", AuditConfig, "audit", given=("output_dir", "features_dir", "top_model", *LISTING_OPTIONS)),
    Stage("train_top", TrainTopConfig, "top", given=("output_dir", "features_dir")),
    Stage("finetune", FinetuneConfig, "finetune", given=("output_dir", "top_model")),
    Stage("train_scratch", ScratchConfig, "scratch", given=("output_dir",)),
))
RunAllConfig.__doc__ = ("Settings of ``jobs.run_all``: extraction → (audit) → train_top → finetune → train_scratch "
                        "→ report.md; every option of its stages, each declared once (``pipeline.compose``).")

REPORT = "report.md"
STAGE_FOLDERS = {"features": OUTPUT_LAYOUT, "audit": doctor.LAYOUT, **{kind: JOB_LAYOUT for kind in JOB_FOLDERS}}
# The output folder: report.md, each stage's folder (judged by that stage's layout) and the locks
# the stages hold beside their folders; a report or a recognised stage folder marks it as ours.
LAYOUT = outputs.Layout("a run_all output", markers=(REPORT,), files=(CONFIG_FILE, *(f"{f}.lock" for f in STAGE_FOLDERS)),
                        folders=STAGE_FOLDERS)


def report_command(argv: list[str]) -> str:
    """The command line the report shows, credentials in URIs redacted (``--mlflow-uri``...)."""
    return redact(" ".join(["python -m jobs.run_all", *map(shlex.quote, argv)]))


def resolved_options(cfg: RunAllConfig, output_dir: str) -> dict[str, Any]:
    """``cfg`` as the run resolves it: the output folder, and each stage's own value of every
    per-stage option left unset (``--epochs`` and the built-in data's epochs folded in)."""
    built = {stage.name: cfg.stage_config(stage.name) for stage in cfg.STAGES}
    unset = {key: getattr(built[stage.name], name) for key, (stage, name) in cfg.PREFIXED.items()
             if getattr(cfg, key) is None}
    return resolved(cfg, output_dir=output_dir, epochs=None, **unset)


def run_all(cfg: RunAllConfig) -> str:
    """Run every stage into ``<output-dir>`` and return the path of ``report.md``. Holds that folder's lock throughout
    (the stages lock their own folders inside it) and refuses one holding what no stage writes (``LAYOUT``); with
    ``--overwrite`` each stage replaces only its own folder. Writes ``config.yaml``, which ``--config`` reads back."""
    data_dir, _, output_dir, _ = resolve_data(cfg, listed=False)
    with locks.output_lock(output_dir):
        outputs.check(output_dir, LAYOUT)
        write_config(storage.join(output_dir, CONFIG_FILE), "run_all", resolved_options(cfg, output_dir))
        return _run_stages(cfg, data_dir, output_dir)


def _run_stages(cfg: RunAllConfig, data_dir: str, output_dir: str) -> str:
    """Extraction, the audit when asked, the training stages not skipped, then the report; returns the report's path."""
    stages: list[dict[str, Any]] = []
    features = storage.join(output_dir, "features")
    manifest = run_extraction(cfg.stage_config("extract_features", output_dir=features, data_dir=data_dir))
    stages.append({"stage": "extract_features", "seconds": manifest["elapsed_s"],
                   "images_per_s": manifest["images_per_s"]})
    if cfg.audit:
        # The doctor reads the extraction's features; it excludes nothing.
        audit = doctor.audit_data(cfg.stage_config("audit_data", output_dir=storage.join(output_dir, "audit"),
                                                   features_dir=manifest["output_dir"]))
        stages.append({"stage": f"audit_data: [report]({storage.relative(audit['report'], output_dir)})",
                       "seconds": audit["elapsed_s"]})

    def stage(name: str, fn, **inputs: Any) -> None:
        summary = fn(cfg.stage_config(name, output_dir=output_dir, **inputs))
        stages.append({"stage": name, **summary, "curves": storage.relative(summary["curves"], output_dir)})

    stage("train_top", train_top, features_dir=manifest["output_dir"])
    if "finetune" not in cfg.skipped():
        stage("finetune", finetune, top_model=storage.join(output_dir, "top", MODEL_FILE), data_dir=data_dir)
    if "scratch" not in cfg.skipped():
        stage("train_scratch", train_scratch, data_dir=data_dir)
    report = storage.join(output_dir, REPORT)
    write_report(report, stages, NOTE if cfg.data_dir is None else None, report_command(sys.argv[1:]))
    log.info(f"report: {report}")
    return report
