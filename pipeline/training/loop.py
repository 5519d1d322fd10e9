"""Data-parallel training with Ray Train's ``TensorflowTrainer``: one loop for all three models,
run by every worker (``train_loop_per_worker``).

A custom loop under ``MultiWorkerMirroredStrategy`` (docs/architecture.md#training-loop; Keras 3
``model.fit`` fails under it with two workers): losses scaled by the *global* batch and summed
gradients make N workers at B/N step exactly like one at B. Each step's all-reduce also counts the
workers with another batch, so uneven shards end the epoch together (tensorflow/tensorflow#35878).

Only workers import this module (``fit`` defers it), so TensorFlow loads at its top.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import keras
import numpy as np
import ray
import ray.train
import tensorflow as tf

from pipeline import logs
from pipeline.batch.cluster import configure_tensorflow_devices
from pipeline.faults import maybe_fail, trace
from pipeline.images.augment import GlobalRows
from pipeline.nets import models
from pipeline.nets.precision import device_precision
from pipeline.training import tracking
from pipeline.training.batches import batch_inputs, epoch_batches
from pipeline.training.checkpoints import averaged_weights, restore_checkpoint, save_checkpoint
from pipeline.training.dropout import GlobalDropout, place
from pipeline.training.kinds import kind_of
from pipeline.training.memory import PrivatePeak, resident_peak_bytes
from pipeline.training.settings import LoopSettings

# What each step all-reduces, in order: sums of the loss and of the correct predictions,
# the number of samples, and how many workers have another batch after this one.
STATS = ("loss_sum", "correct", "samples", "has_next")


def build_model(s: LoopSettings, base_weights=None, top_weights=None):
    """The Keras model (``kinds``) and optimizer of one training kind (under the current strategy scope)."""
    kind = kind_of(s.kind, s.cached_block4)
    model = kind.build(models, GlobalDropout, s, base_weights, top_weights)
    average = {"use_ema": s.ema_momentum > 0, "ema_momentum": s.ema_momentum or 0.99}
    if kind.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate=s.learning_rate, momentum=0.9, **average)
    else:
        optimizer = keras.optimizers.RMSprop(learning_rate=s.learning_rate, **average)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def per_example_loss(num_classes: int):
    """Unreduced cross-entropy of (labels, outputs): binary for two classes (one sigmoid unit, whose labels
    become a float column), categorical otherwise."""
    if num_classes == 2:
        binary = keras.losses.BinaryCrossentropy(reduction=None)
        return lambda y, out: binary(tf.cast(tf.reshape(y, (-1, 1)), tf.float32), out)
    return keras.losses.SparseCategoricalCrossentropy(reduction=None)


def predicted_labels(outputs, num_classes: int):
    """Class indices from model outputs (threshold 0.5 for a sigmoid unit)."""
    if num_classes == 2:
        return tf.cast(outputs[:, 0] > 0.5, tf.int32)
    return tf.cast(tf.argmax(outputs, axis=-1), tf.int32)


@dataclass
class Totals:
    """One split's sums over an epoch, across all workers."""

    loss_sum: float = 0.0
    correct: float = 0.0
    samples: float = 0.0

    def add(self, stats: dict[str, float]) -> None:
        self.loss_sum += stats["loss_sum"]
        self.correct += stats["correct"]
        self.samples += stats["samples"]

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.samples, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.samples, 1)


class DistributedSteps:
    """The model, its optimizer and the compiled train and evaluation steps, each returning the
    all-reduced ``STATS`` of one global batch."""

    def __init__(self, s: LoopSettings, base_weights=None, top_weights=None):
        self.s = s
        # One all-reduce for all gradients (packed) instead of one per variable: on CPUs each
        # collective has a fixed latency that small, fast steps feel.
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(bytes_per_pack=64 * 2**20))
        with self.strategy.scope():
            self.model, self.optimizer = build_model(s, base_weights, top_weights)
            self.loss_fn = per_example_loss(s.num_classes)
        self.train = tf.function(self._all_reduced(self._train_step))
        self.evaluate = tf.function(self._all_reduced(self._eval_step), reduce_retracing=True)
        self.count = tf.function(self._all_reduced(tf.identity))

    def _all_reduced(self, step):
        def run(*args):
            return self.strategy.reduce(tf.distribute.ReduceOp.SUM, self.strategy.run(step, args=args), axis=None)
        return run

    def _stats(self, y, out, losses, has_next):
        correct = tf.reduce_sum(tf.cast(predicted_labels(out, self.s.num_classes) == y, tf.float32))
        return tf.stack([tf.reduce_sum(losses), correct, tf.cast(tf.size(y), tf.float32), has_next])

    def _train_step(self, x, y, has_next):
        with tf.GradientTape() as tape:
            out = self.model(x, training=True)
            losses = self.loss_fn(y, out)
            loss = tf.nn.compute_average_loss(losses, global_batch_size=self.s.batch_size)
        grads = tape.gradient(loss, self.model.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        return self._stats(y, out, losses, has_next)

    def _eval_step(self, x, y, has_next):
        out = self.model(x, training=False)
        return self._stats(y, out, self.loss_fn(y, out), has_next)


def run_epoch(steps: DistributedSteps, step_fn, batches: Iterator[dict], world: int,
              draws: Callable[[int], GlobalRows] | None, fault_site: str | None = None) -> Totals:
    """Run ``step_fn`` over ``batches`` while every worker still has one; the epoch's totals. ``draws(step)``:
    a step's augmentation draws (None: none); ``maybe_fail(fault_site)`` after each step (tests)."""
    totals = Totals()
    batch = next(batches, None)
    everyone_has_batch = int(steps.count(tf.constant(0 if batch is None else 1))) == world
    step = 0
    while everyone_has_batch:
        upcoming = next(batches, None)
        x, y = batch_inputs(batch, steps.s, draws(step) if draws is not None else None)
        reduced = step_fn(tf.convert_to_tensor(x), tf.convert_to_tensor(y),
                          tf.constant(0.0 if upcoming is None else 1.0)).numpy()
        stats = dict(zip(STATS, (float(v) for v in reduced)))
        totals.add(stats)
        everyone_has_batch = round(stats["has_next"]) == world
        batch = upcoming
        step += 1
        if fault_site is not None:
            maybe_fail(fault_site)
    # Drain what another worker's earlier end left, so the next epoch's iterator starts clean.
    for _ in batches:
        pass
    return totals


def _settings_in_worker(config: dict[str, Any]) -> LoopSettings:
    """The loop settings, with the precision decided on this worker's device."""
    s = LoopSettings(**config)
    s.precision = device_precision(s.precision, allow_float16=False)
    # Ray passes tuples back as lists.
    s.feature_shape = tuple(s.feature_shape) if s.feature_shape else None
    s.block4_shape = tuple(s.block4_shape) if s.block4_shape else None
    return s


def _share_cores(local_world_size: int) -> None:
    """Workers sharing a node split its cores instead of each starting one thread per core."""
    configure_tensorflow_devices()
    threads = max(1, (os.cpu_count() or 1) // max(1, local_world_size))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The function Ray Train runs on every worker: train, evaluate, report and checkpoint each epoch."""
    s = _settings_in_worker(config)
    logs.quiet_ray_train_worker()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _share_cores(ctx.get_local_world_size())
    keras.utils.set_random_seed(s.seed)  # identical initial weights on every worker
    with PrivatePeak() as private:  # from here: loading the weights is part of a worker's footprint
        steps = DistributedSteps(s, _get(s.base_weights), _get(s.top_weights))
        # Dropout masks by step and global position (``dropout``); the step count comes back with a checkpoint.
        place(steps.model, rank, world, s.seed, steps.optimizer.iterations)
        state = {"epoch": 0, "history": []}
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                state = restore_checkpoint(d, steps.model, steps.optimizer)
        _run_epochs(s, steps, state, rank, world, private)


def _run_epochs(s: LoopSettings, steps: DistributedSteps, state: dict[str, Any], rank: int, world: int,
                private: PrivatePeak) -> None:
    """Train from ``state``'s epoch to the last, evaluating, reporting and checkpointing after each."""
    per_worker = s.batch_size // world  # exact: the configs refuse worker counts that do not divide the batch
    held: dict[str, dict[str, np.ndarray]] = {}
    # A worker's memory before it reads any data: the fixed part of its footprint (libraries, model, optimizer).
    base = _memory_per_rank(steps, private, rank, world)
    for epoch in range(state["epoch"], s.epochs):
        # Tests: a restarted worker must resume from the checkpoint's weights, not start over.
        trace("epoch_start", lambda: {"epoch": epoch + 1, "rank": rank, "weights": _digest(steps.model)})
        started = time.time()
        shuffle_seed = (s.seed * 1_000_003 + epoch * 7919) % 2**31 if s.shuffle else None
        train = run_epoch(steps, steps.train, epoch_batches("train", s, per_worker, True, shuffle_seed, held), world,
                          _draws(s, epoch, rank * per_worker) if s.augment else None,
                          fault_site=f"train_epoch{epoch + 1}_rank{rank}")
        with averaged_weights(steps.model, steps.optimizer) as trained:
            val = run_epoch(steps, steps.evaluate, epoch_batches("validation", s, per_worker, False, None, held),
                            world, None)
            peak = _memory_per_rank(steps, private, rank, world)
            row = {"epoch": epoch + 1, "loss": train.loss, "accuracy": train.accuracy, "val_loss": val.loss,
                   "val_accuracy": val.accuracy, "train_samples": int(train.samples), "val_samples": int(val.samples),
                   "seconds": round(time.time() - started, 2), "precision": s.precision,
                   "worker_peak_rss_bytes": peak["rss"], "worker_base_rss_bytes": base["rss"],
                   "worker_peak_private_bytes": peak["private"], "worker_base_private_bytes": base["private"]}
            state = {"epoch": epoch + 1, "history": state["history"] + [row]}
            _report(row, state, steps, rank, trained)
        if rank == 0:
            tracking.log_epoch(s.tracking, row)
            logs.log.info("%s epoch %d/%d: loss %.4f, accuracy %.4f, val_loss %.4f, val_accuracy %.4f, %.1fs; workers' "
                          "peak private memory %s GiB", s.kind, row["epoch"], s.epochs, row["loss"], row["accuracy"],
                          row["val_loss"], row["val_accuracy"], row["seconds"],
                          ", ".join(f"{b / 2**30:.2f}" for b in peak["private"]))


def _draws(s: LoopSettings, epoch: int, start: int) -> Callable[[int], GlobalRows]:
    """Each step's augmentation draws: from (seed, epoch, step), for the whole global batch, of which
    this worker's rows begin at ``start`` (``augment.GlobalRows``)."""
    return lambda step: GlobalRows(np.random.default_rng([s.seed, epoch, step]), start, s.batch_size)


def _memory_per_rank(steps: DistributedSteps, private: PrivatePeak, rank: int, world: int) -> dict[str, list[int]]:
    """Every worker's peak resident memory (``rss``, shared pages included) and peak private memory
    (``private``; ``memory``) so far, in bytes, by rank, all-reduced (each rank fills its slots) since Ray
    Train keeps only rank 0's report."""
    mine = np.zeros((2, world), dtype=np.float64)  # float64: exact for any byte count below 2**53
    mine[:, rank] = resident_peak_bytes(), private.peak()
    resident, own = steps.count(tf.constant(mine)).numpy()
    return {"rss": [int(v) for v in resident], "private": [int(v) for v in own]}


def _report(row: dict[str, Any], state: dict[str, Any], steps: DistributedSteps, rank: int,
            trained: list[np.ndarray] | None) -> None:
    """Report an epoch's metrics to Ray Train, with a checkpoint from rank 0."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save_checkpoint(tmp, steps.model, steps.optimizer, state, trained)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(row, checkpoint=checkpoint)
    # Ray Train registers a reported checkpoint only at its controller's next poll, and a worker dying
    # before then took it along; waiting until it is committed lets a restart resume after this epoch.
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def _digest(model) -> str:
    """A sha256 of ``model``'s weights."""
    return hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in model.get_weights())).hexdigest()


def _get(ref):
    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
