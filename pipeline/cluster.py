"""Connecting to Ray and sizing work from what the cluster really has."""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray


def init_ray() -> None:
    """Attach to a running cluster (``RAY_ADDRESS`` or a local ``ray start``), else start one in-process."""
    if ray.is_initialized():
        return
    # ray.init() with no address already prefers RAY_ADDRESS, then a cluster started
    # with `ray start` on this machine, and only then starts a new local one.
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True, configure_logging=False)


@dataclass(frozen=True)
class InferencePlan:
    """How many inference actors to run and what each one holds."""

    actors: int
    num_cpus: float
    num_gpus: float
    decode_cpus: float

    @property
    def uses_gpus(self) -> bool:
        return self.num_gpus > 0


def inference_plan(cpu_workers: int) -> InferencePlan:
    """One actor per GPU when the cluster has GPUs; else ``cpu_workers`` fractional-CPU actors.

    Actors that each reserve a whole CPU leave nothing for the decode tasks on a
    small machine and the pipeline stalls without a word, so CPU actors reserve a
    fraction: the TensorFlow runtime uses every core of its node anyway.
    """
    resources = ray.cluster_resources()
    cpus = float(resources.get("CPU", 1))
    gpus = int(resources.get("GPU", 0))
    decode_cpus = 0.5 if cpus <= 4 else 1.0
    actors = gpus if gpus > 0 else cpu_workers
    # At most a quarter of the cluster's CPUs go to inference actors' reservations.
    num_cpus = round(min(1.0, cpus / (4 * actors)), 3)
    return InferencePlan(actors=actors, num_cpus=num_cpus, num_gpus=1.0 if gpus > 0 else 0.0, decode_cpus=decode_cpus)


def configure_tensorflow_devices() -> None:
    """Let TensorFlow grow GPU memory on demand, so one actor per GPU never grabs it all up front."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # already initialised in this process; growth was set the first time
