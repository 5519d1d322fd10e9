"""Connecting to Ray and sizing work from what the cluster really has."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray._common.utils import get_ray_address_file
from ray._private.utils import read_ray_address

from pipeline import logs
from pipeline.data import storage
from pipeline.errors import UserError

log = logging.getLogger(__name__)
# How long a recorded or given cluster address may take to accept a connection.
CONNECT_TIMEOUT_S = 5.0


class ClusterError(UserError):
    """The Ray cluster to use cannot be reached, or cannot give what the job asked for."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_reachable(address: str, where: str) -> None:
    """Fail within seconds, naming ``address``, when nothing accepts connections there."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:
        raise ClusterError(
            f"the Ray cluster at {address} ({where}) is not reachable: {exc}. If that cluster is gone (a head node "
            f"killed without `ray stop` leaves its address recorded), run `ray stop` to clear the record, or set "
            f"RAY_ADDRESS=local to start an in-process cluster; otherwise set RAY_ADDRESS to a live cluster"
        ) from None


def _target_address() -> str | None:
    """The GCS address to attach to (None: start one in-process): Ray's own lookup (``RAY_ADDRESS``, else
    this machine's last ``ray start``), made explicit so a dead address fails fast, not retried for ever."""
    env = os.environ.get("RAY_ADDRESS", "")
    if env == "local":
        return None
    if env and env != "auto":
        if env.startswith(("ray://", "http://", "https://")):
            return env  # Ray Client / dashboard addresses: Ray reports their errors itself
        _check_reachable(env, "from RAY_ADDRESS")
        return env
    recorded = read_ray_address()
    if not recorded:
        return None
    _check_reachable(recorded, f"recorded in {get_ray_address_file(None)}")
    return recorded


def init_ray(local: bool = False, env_vars: dict[str, str] | None = None, verbose: bool = False,
             **start_options: Any) -> None:
    """Attach to a running cluster (``RAY_ADDRESS`` or a local ``ray start``), else (or with ``local``) start
    one in-process with ``start_options``; unless ``verbose``, TensorFlow's and Ray's chatter stays in log files.
    Every process of the job gets ``RAY_ADDRESS`` (and ``env_vars``): a helper that looks a cluster up itself
    (Ray Train's placement-group cleaner) could take another, the machine's latest, and tear down this run."""
    if ray.is_initialized():
        return
    logs.setup_driver(verbose)
    address = None if local else _target_address()
    quiet = logs.worker_env(verbose)
    env = {**quiet["env_vars"], **(env_vars or {})}
    hook = {"worker_process_setup_hook": quiet["worker_process_setup_hook"]}
    if address is None:
        # In-process start: choose the GCS port up front, so the address is known before start.
        port = _free_port()
        env["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{port}"
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        try:
            ray.init(address="local", runtime_env={"env_vars": env, **hook}, configure_logging=False, **start_options)
        finally:
            del os.environ["RAY_GCS_SERVER_PORT"]  # other clusters this process starts pick their own
        return
    if "://" not in address:
        env["RAY_ADDRESS"] = address
    ray.init(address=address, runtime_env={"env_vars": env, **hook}, configure_logging=False)


@dataclass(frozen=True)
class InferencePlan:
    """How many inference actors to run and what each one holds."""

    actors: int
    num_cpus: float
    num_gpus: float
    decode_cpus: float


def inference_plan(cpu_workers: int, gpus: int | None = None) -> InferencePlan:
    """``gpus`` one-GPU actors when asked; else one per GPU of the cluster, or ``cpu_workers``
    fractional-CPU actors when it has none. CPU actors reserve a fraction of a CPU (TensorFlow uses
    every core anyway): whole ones would leave the decode tasks none on a small machine, and it stalls."""
    resources = ray.cluster_resources()
    cpus = float(resources.get("CPU", 1))
    present = int(resources.get("GPU", 0))
    decode_cpus = 0.5 if cpus <= 4 else 1.0
    gpu_actors = gpus if gpus is not None else present
    actors = gpu_actors if gpu_actors > 0 else cpu_workers
    # At most a quarter of the cluster's CPUs go to inference actors' reservations.
    num_cpus = round(min(1.0, cpus / (4 * actors)), 3)
    return InferencePlan(actors=actors, num_cpus=num_cpus, num_gpus=1.0 if gpu_actors > 0 else 0.0,
                         decode_cpus=decode_cpus)


def wait_for_gpus(count: int, timeout_s: float, poll_s: float = 2.0) -> None:
    """Ask the autoscaler for ``count`` GPUs (unasked, a cluster with none would never start one) and
    wait, minutes if need be, until the cluster has them; ClusterError after ``timeout_s``."""
    have = int(ray.cluster_resources().get("GPU", 0))
    if have >= count:
        return
    # Deferred: the autoscaler's SDK takes a fifth of a second to load, for clusters that must grow.
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": 1}] * count)
    log.warning("waiting for %d GPU(s) to join the cluster (it has %d); an autoscaler starts GPU nodes on this "
                "request, for up to %.0f s (--gpu-wait-s)", count, have, timeout_s)
    deadline = time.monotonic() + timeout_s
    next_note = time.monotonic() + 30
    try:
        while have < count:
            if time.monotonic() > deadline:
                raise ClusterError(f"--gpus {count}: the cluster still has {have} GPU(s) after {timeout_s:.0f} s; "
                                   f"check that it has GPU node types the autoscaler may start (cluster.yaml), "
                                   f"or lower --gpus")
            time.sleep(poll_s)
            have = int(ray.cluster_resources().get("GPU", 0))
            if time.monotonic() > next_note:
                log.warning("still waiting: %d of %d GPU(s) up", have, count)
                next_note += 30
    finally:
        # A standing request would keep GPU nodes up after the job; the actors hold them from here on.
        request_resources(bundles=[])
    log.warning("%d GPU(s) up", have)


def pin_to_this_node(location: str) -> dict[str, Any]:
    """Ray remote args that keep tasks and actors (Serve replicas too) using a local ``location`` on the
    driver's node, the only one sure to have it; object-store URIs need no pinning."""
    if not storage.is_local(location):
        return {}
    # As Ray's own local:// reads pin: a hard label constraint, Ray's successor to hard node affinity.
    return {"label_selector": {"ray.io/node-id": ray.get_runtime_context().get_node_id()}}


def configure_tensorflow_devices() -> None:
    """Let TensorFlow grow GPU memory on demand, so one actor per GPU never grabs it all up front."""
    import tensorflow as tf  # deferred: seconds to load, and only the actors that run a model need it

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # already initialised in this process; growth was set the first time
