"""The driver's side of a Ray Train run: ``fit`` starts the training loop on the workers."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import ray
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

from pipeline import faults, logs
from pipeline.training.settings import LoopSettings


def fit(settings: LoopSettings, datasets: dict[str, Any], num_workers: int, use_gpu: bool, storage_path: str,
        name: str, max_failures: int):
    """Run ``train_loop_per_worker`` on ``num_workers`` Ray Train workers; returns the Ray Train Result.
    A run with an interrupted one's ``storage_path`` and ``name`` resumes from its latest checkpoint,
    as a failed worker group does up to ``max_failures`` times."""
    # Both load TensorFlow (seconds): a driver imports this module at start but trains later, if at all.
    from ray.train.tensorflow import TensorflowTrainer

    from pipeline.training.loop import train_loop_per_worker

    for ds in datasets.values():
        # An epoch's progress is its epoch line; every epoch's progress bars would bury it.
        ds.context.enable_progress_bars = False
    cpus = float(ray.cluster_resources().get("CPU", 1))
    # At most half a CPU each: whole ones starve the Ray Data tasks feeding a small machine's workers (a silent hang).
    per_worker_cpu = round(min(1.0, cpus / (2 * num_workers)), 3)
    # Tests' fault injection reaches the workers also on a cluster started before it was set.
    fault_env = faults.environment()
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(settings),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": per_worker_cpu}),
        run_config=RunConfig(
            name=name, storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_accuracy",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=max_failures),
            # Ray Train's per-report and per-checkpoint lines stay in its log files unless --verbose.
            logging_config=LoggingConfig(log_level="INFO" if logs.verbose() else "WARNING"),
            worker_runtime_env={"env_vars": fault_env} if fault_env else None,
        ),
        datasets=datasets,
        # Held data is small: every worker reads it whole and takes its own slices of each batch.
        dataset_config=DataConfig(datasets_to_split=[] if settings.hold_in_memory else "all"),
    )
    return trainer.fit()
