"""Data-parallel training with Ray Train's ``TensorflowTrainer``: one loop for all three models.

Each worker runs under ``tf.distribute.MultiWorkerMirroredStrategy`` with a custom
loop (Keras 3 ``model.fit`` fails under that strategy with two workers): every
replica computes the loss on its own shard's batch, scaled by the *global* batch
size, and the optimizer all-reduces (sums) the gradients, so N workers at a per-worker
batch of B/N take exactly the steps one worker takes at batch B (N must divide B: the
job configs refuse other worker counts).

The workers agree on whether all of them still have a batch (an all-reduced count),
so shards of unequal length end the epoch together instead of leaving one worker
waiting forever in a collective (tensorflow/tensorflow#35878). That count rides in the
all-reduce every step already makes of its loss and accuracy sums, so it costs no
collective of its own except once at the start of an epoch.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np

from pipeline import logs
from pipeline.training import tracking

STATE_FILE = "state.json"
WEIGHTS_FILE = "model.weights.h5"
OPTIMIZER_FILE = "optimizer.npz"
# With a moving average, a checkpoint's model weights are the average (what was evaluated and
# is exported); the weights training goes on from are kept beside them, for a resumed run.
TRAINED_FILE = "trained_weights.npz"
# The average spans at most this fraction of a run's steps (see ema_momentum).
EMA_MAX_SPAN = 0.1


@dataclass
class LoopSettings:
    """Everything a training worker needs, passed to it as ``train_loop_config``."""

    kind: str
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    precision: str
    num_classes: int
    # Each kind sets what it uses (images: image_size; top: feature_shape; cached: block4_shape),
    # so a default can never stand in for the data's real shape.
    image_size: int | None = None
    feature_shape: tuple[int, ...] | None = None
    # Fine-tuning on cached block-4 outputs (columns block4 / block4_flipped) instead of images.
    cached_block4: bool = False
    block4_shape: tuple[int, ...] | None = None
    # Columnar data (features, block-4 cache) small enough to hold: each worker reads its shard
    # once and draws every later epoch from memory, in a fresh seeded order, instead of
    # re-running the Ray Data pipeline (Parquet decoding, shuffling) every epoch.
    hold_in_memory: bool = False
    # The bytes of the data each worker holds (0: streamed), reported in the job's summary.
    held_bytes: int = 0
    dropout: float = 0.5
    # Momentum of the weights' moving average that evaluation, checkpoints and the export use (0: off).
    ema_momentum: float = 0.0
    augment: bool = False
    # Image augmentation beyond the article's shear, zoom and flip: ±degrees and ±fraction of the side.
    rotation: float = 0.0
    shift: float = 0.0
    preprocessing: str = "torch"
    shuffle: bool = True
    # Object refs of the base (or block-5) and top weights for fine-tuning; "fault" (tests only) kills a worker.
    extras: dict[str, Any] = field(default_factory=dict)

    def to_config(self) -> dict[str, Any]:
        """The dict form Ray Train passes to each worker."""
        return asdict(self)


def default_learning_rate(kind: str) -> float:
    """The reference article's optimizers: rmsprop (Keras default 1e-3) for top and scratch, SGD 1e-4 for fine-tuning."""
    return 1e-4 if kind == "finetune" else 1e-3


def ema_momentum(requested: float, total_steps: int) -> float:
    """The momentum of the weights' moving average for a run of ``total_steps``: ``requested``,
    lowered so that the average spans (1 / (1 - momentum) steps) at most a tenth of the run. A
    short run averages little or nothing instead of exporting weights that are mostly its first
    steps' (Keras' average starts from the first step's weights). 0 turns the average off."""
    if requested <= 0 or total_steps <= 0:
        return 0.0
    return round(max(0.0, min(requested, 1.0 - 1.0 / (EMA_MAX_SPAN * total_steps))), 6)


def freeze_below_block5(features_model) -> None:
    """Blocks 1–4 of the VGG16 inside ``features_model`` frozen, block 5 trainable."""
    vgg = features_model.get_layer("vgg16")
    for layer in vgg.layers:
        layer.trainable = layer.name.startswith("block5")


def build_model(s: LoopSettings, base_weights=None, top_weights=None):
    """The Keras model and optimizer of one training kind (under the current strategy scope)."""
    import keras

    from pipeline.nets import models

    if s.kind == "top":
        model = models.top_classifier(s.feature_shape, s.num_classes, s.precision, dropout=s.dropout)
    elif s.kind == "scratch":
        model = models.scratch_cnn(s.image_size, s.num_classes, s.precision, dropout=s.dropout)
    elif s.cached_block4:
        model = models.block5_classifier(s.block4_shape, s.num_classes, s.precision, dropout=s.dropout)
        if base_weights is not None:
            model.get_layer("vgg16_block5").set_weights(base_weights)
        if top_weights is not None:
            model.get_layer("top").set_weights(top_weights)
    else:
        features = models.feature_extractor(s.image_size, base_weights, s.preprocessing, s.precision)
        freeze_below_block5(features)
        top = models.top_classifier(features.output_shape[1:], s.num_classes, s.precision, dropout=s.dropout)
        if top_weights is not None:
            top.set_weights(top_weights)
        model = models.image_classifier(features, top, name="vgg16_finetuned")
    average = {"use_ema": s.ema_momentum > 0, "ema_momentum": s.ema_momentum or 0.99}
    if s.kind == "finetune":
        optimizer = keras.optimizers.SGD(learning_rate=s.learning_rate, momentum=0.9, **average)
    else:
        optimizer = keras.optimizers.RMSprop(learning_rate=s.learning_rate, **average)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def per_example_loss(num_classes: int):
    """Unreduced cross-entropy: binary for two classes (one sigmoid unit), categorical otherwise."""
    import keras

    if num_classes == 2:
        return keras.losses.BinaryCrossentropy(reduction=None)
    return keras.losses.SparseCategoricalCrossentropy(reduction=None)


def predicted_labels(outputs, num_classes: int):
    """Class indices from model outputs (threshold 0.5 for a sigmoid unit)."""
    import tensorflow as tf

    if num_classes == 2:
        return tf.cast(outputs[:, 0] > 0.5, tf.int32)
    return tf.cast(tf.argmax(outputs, axis=-1), tf.int32)


def block4_cells(shift: float, image_size: int) -> int:
    """``shift`` (a fraction of the image's side) in whole cells of VGG16's block-4 map (16 px each)."""
    return int(round(shift * image_size / 16))


def batch_inputs(batch: dict[str, Any], s: LoopSettings, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """A Ray Data batch as (model input, labels); images and cached block-4 maps are augmented
    when ``rng`` is given, the top MLP's features never."""
    from pipeline.images.augment import Augmentation, augment_batch, shift_maps

    labels = np.asarray(batch["label"], dtype=np.int32)
    if s.kind == "top":
        x = _float_rows(batch["features"], len(labels), s.feature_shape)
    elif s.cached_block4:
        # The cached maps' augmentation: the mirror image's maps for a random half, then shifts by whole cells.
        x = _float_rows(batch["block4"], len(labels), s.block4_shape)
        if rng is not None:
            mirrored = rng.random(len(labels)) < 0.5
            x[mirrored] = _float_rows(batch["block4_flipped"], len(labels), s.block4_shape)[mirrored]
            x = shift_maps(x, rng, block4_cells(s.shift, s.image_size))
    else:
        images = np.asarray(batch["image"])
        aug = Augmentation(rotation=s.rotation, shift=s.shift)
        x = augment_batch(images, rng, aug) if rng is not None else images.astype(np.float32)
    return x, labels


def _float_rows(column, n: int, shape: tuple[int, ...]) -> np.ndarray:
    """A fixed-size-list column (pyarrow, or numpy rows) as a writable ``(n, *shape)`` float32 array."""
    from pipeline.data.shards import list_rows

    if hasattr(column, "combine_chunks"):  # pyarrow
        flat = list_rows(column)
    elif isinstance(column, np.ndarray) and column.dtype != object:  # rows held in memory
        flat = column
    else:
        flat = np.stack(column)
    return np.array(flat, dtype=np.float32).reshape(n, *shape)


def load_shard(shard) -> dict[str, np.ndarray]:
    """A worker's whole dataset shard as numpy columns sorted by path, so that its order does not
    depend on how Ray read it (fixed-size lists become 2-D arrays). Each of Ray's blocks is
    copied once, straight into its sorted rows: the worker holds the data once (a concatenation
    and then a sorted copy held it three times at the peak)."""
    import pyarrow as pa

    from pipeline.data.shards import list_rows

    blocks = [b for b in shard.iter_batches(batch_size=None, batch_format="pyarrow") if b.num_rows]
    if not blocks:
        return {}
    total = sum(b.num_rows for b in blocks)
    where = np.arange(total)
    if "path" in blocks[0].column_names:
        order = np.argsort(np.concatenate([b.column("path").to_numpy(zero_copy_only=False).astype(str)
                                           for b in blocks]), kind="stable")
        where[order] = np.arange(total)
    held: dict[str, np.ndarray] = {}
    start = 0
    for block in blocks:
        rows = where[start:start + block.num_rows]
        for name in block.column_names:
            column = block.column(name)
            column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
            values = list_rows(column) if pa.types.is_fixed_size_list(column.type) else column.to_numpy(
                zero_copy_only=False)
            if name not in held:
                held[name] = np.empty((total, *values.shape[1:]), dtype=values.dtype)
            held[name][rows] = values
        start += block.num_rows
    return held


def _held_batches(columns: dict[str, np.ndarray], per_worker: int, rank: int, world: int, drop_last: bool,
                  seed: int | None) -> Iterator[dict]:
    """This worker's batches of a split every worker holds whole (sorted by path, so its order does
    not depend on how Ray read it): each global batch of ``per_worker * world`` rows, drawn in one
    seeded order, is cut into ``world`` slices and this worker takes slice ``rank``. N workers
    so take exactly the steps one worker takes at the same global batch."""
    n = len(columns["label"]) if columns else 0
    order = np.random.default_rng(seed).permutation(n) if seed is not None else np.arange(n)
    if not drop_last:
        # Evaluation: every row once, spread over the workers. All take as many steps as the
        # one with the most rows (an empty batch adds nothing), so no row is left unevaluated.
        mine = order[rank::world]
        for start in range(0, -(-n // world), per_worker):
            yield {name: values[mine[start:start + per_worker]] for name, values in columns.items()}
        return
    batch = per_worker * world
    for start in range(0, n - n % batch, batch):
        rows = order[start + rank * per_worker:start + (rank + 1) * per_worker]
        yield {name: values[rows] for name, values in columns.items()}


def _batches(shard, batch_size: int, drop_last: bool, s: LoopSettings, seed: int | None) -> Iterator[dict]:
    columnar = s.kind == "top" or s.cached_block4
    kwargs: dict[str, Any] = {"batch_size": batch_size, "drop_last": drop_last,
                              "batch_format": "pyarrow" if columnar else "numpy"}
    if seed is not None:
        kwargs.update(local_shuffle_buffer_size=max(4 * batch_size, 256), local_shuffle_seed=seed)
    for batch in shard.iter_batches(**kwargs):
        if columnar:
            yield {name: batch.column(name) for name in batch.column_names}
        else:
            yield batch


# What each step all-reduces, in order: sums of the loss and of the correct predictions,
# the number of samples, and how many workers have another batch after this one.
STATS = ("loss_sum", "correct", "samples", "has_next")


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
        import tensorflow as tf

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
        import tensorflow as tf

        def run(*args):
            return self.strategy.reduce(tf.distribute.ReduceOp.SUM, self.strategy.run(step, args=args), axis=None)
        return run

    def _stats(self, y, out, losses, has_next):
        import tensorflow as tf

        correct = tf.reduce_sum(tf.cast(predicted_labels(out, self.s.num_classes) == y, tf.float32))
        return tf.stack([tf.reduce_sum(losses), correct, tf.cast(tf.size(y), tf.float32), has_next])

    def _train_step(self, x, y, has_next):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            out = self.model(x, training=True)
            losses = self.loss_fn(_targets(y, self.s.num_classes), out)
            loss = tf.nn.compute_average_loss(losses, global_batch_size=self.s.batch_size)
        grads = tape.gradient(loss, self.model.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        return self._stats(y, out, losses, has_next)

    def _eval_step(self, x, y, has_next):
        out = self.model(x, training=False)
        return self._stats(y, out, self.loss_fn(_targets(y, self.s.num_classes), out), has_next)


@contextlib.contextmanager
def averaged_weights(model, optimizer) -> Iterator[list[np.ndarray] | None]:
    """With a moving average (``optimizer.use_ema``): the average in ``model`` for the block
    (evaluation, checkpoint), the trained weights back after it, which it yields (else None)."""
    if not optimizer.use_ema:
        yield None
        return
    variables = model.trainable_variables
    trained = [np.array(v) for v in variables]
    optimizer.finalize_variable_values(variables)
    try:
        yield trained
    finally:
        for variable, value in zip(variables, trained):
            variable.assign(value)


def epoch_batches(split: str, s: LoopSettings, per_worker: int, drop_last: bool, shuffle_seed: int | None,
                  held: dict[str, dict[str, np.ndarray]]) -> Iterator[dict]:
    """This worker's batches of ``split`` for one epoch: from memory when the settings hold the
    data (every worker reads the whole split once into ``held``; see ``_held_batches``), else
    streamed from the worker's shard of the split. ``shuffle_seed`` is the same on every worker."""
    import ray.train

    shard = ray.train.get_dataset_shard(split)
    if shard is None:
        return iter(())
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if s.hold_in_memory:
        if split not in held:
            held[split] = load_shard(shard)
        return _held_batches(held[split], per_worker, rank, world, drop_last, shuffle_seed)
    # Streamed shards differ between workers; so do their local shuffles.
    return _batches(shard, per_worker, drop_last, s, None if shuffle_seed is None else (shuffle_seed + rank) % 2**31)


def run_epoch(steps: DistributedSteps, step_fn, batches: Iterator[dict], world: int,
              augment_seed: list[int] | None, fault=None) -> Totals:
    """Run ``step_fn`` over ``batches`` while every worker still has one; the epoch's totals."""
    import tensorflow as tf

    totals = Totals()
    batch = next(batches, None)
    everyone_has_batch = int(steps.count(tf.constant(0 if batch is None else 1))) == world
    step = 0
    while everyone_has_batch:
        upcoming = next(batches, None)
        rng = np.random.default_rng(augment_seed + [step]) if augment_seed is not None else None
        x, y = batch_inputs(batch, steps.s, rng)
        reduced = step_fn(tf.convert_to_tensor(x), tf.convert_to_tensor(y),
                          tf.constant(0.0 if upcoming is None else 1.0)).numpy()
        stats = dict(zip(STATS, (float(v) for v in reduced)))
        totals.add(stats)
        everyone_has_batch = round(stats["has_next"]) == world
        batch = upcoming
        step += 1
        if fault is not None:
            fault()
    # Drain a shard that still has rows (another worker ran out first), so the
    # next epoch's iterator starts clean.
    for _ in batches:
        pass
    return totals


def _settings_in_worker(config: dict[str, Any]) -> tuple[LoopSettings, dict[str, Any]]:
    """The loop settings (precision decided on this worker's device) and the extras."""
    from pipeline.nets.precision import device_precision

    config = dict(config)
    extras = config.pop("extras", {}) or {}
    s = LoopSettings(**config)
    s.precision = device_precision(s.precision, allow_float16=False)
    # Ray passes tuples back as lists.
    s.feature_shape = tuple(s.feature_shape) if s.feature_shape else None
    s.block4_shape = tuple(s.block4_shape) if s.block4_shape else None
    return s, extras


def _share_cores(local_world_size: int) -> None:
    """Workers sharing a node split its cores instead of each starting one thread per core."""
    import tensorflow as tf

    from pipeline.batch.cluster import configure_tensorflow_devices

    configure_tensorflow_devices()
    threads = max(1, (os.cpu_count() or 1) // max(1, local_world_size))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The function Ray Train runs on every worker: train, evaluate, report and checkpoint each epoch."""
    import keras
    import ray.train

    s, extras = _settings_in_worker(config)
    logs.quiet_ray_train_worker()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _share_cores(ctx.get_local_world_size())
    keras.utils.set_random_seed(s.seed)  # identical initial weights on every worker
    steps = DistributedSteps(s, _get(extras.get("base_weights")), _get(extras.get("top_weights")))
    state = {"epoch": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = _restore(d, steps.model, steps.optimizer)
    per_worker = s.batch_size // world  # exact: the configs refuse worker counts that do not divide the batch
    held: dict[str, dict[str, np.ndarray]] = {}
    # A worker's memory before it reads any data: the fixed part of its footprint (libraries, model, optimizer).
    base_rss = _peak_rss_per_rank(steps, rank, world)
    for epoch in range(state["epoch"], s.epochs):
        _log_epoch_start(extras.get("fault"), epoch + 1, rank, steps.model)
        started = time.time()
        shuffle_seed = (s.seed * 1_000_003 + epoch * 7919) % 2**31 if s.shuffle else None
        train = run_epoch(steps, steps.train, epoch_batches("train", s, per_worker, True, shuffle_seed, held), world,
                          [s.seed, epoch, rank] if s.augment else None,
                          fault=_fault_hook(extras.get("fault"), epoch + 1, rank))
        with averaged_weights(steps.model, steps.optimizer) as trained:
            val = run_epoch(steps, steps.evaluate, epoch_batches("validation", s, per_worker, False, None, held),
                            world, None)
            row = {"epoch": epoch + 1, "loss": train.loss, "accuracy": train.accuracy, "val_loss": val.loss,
                   "val_accuracy": val.accuracy, "train_samples": int(train.samples), "val_samples": int(val.samples),
                   "seconds": round(time.time() - started, 2), "precision": s.precision,
                   "worker_peak_rss_bytes": _peak_rss_per_rank(steps, rank, world), "worker_base_rss_bytes": base_rss}
            state = {"epoch": epoch + 1, "history": state["history"] + [row]}
            _report(row, state, steps, rank, trained)
        if rank == 0:
            tracking.log_epoch(extras.get("mlflow"), row)
            logs.log.info("%s epoch %d/%d: loss %.4f, accuracy %.4f, val_loss %.4f, val_accuracy %.4f, %.1fs",
                          s.kind, row["epoch"], s.epochs, row["loss"], row["accuracy"], row["val_loss"],
                          row["val_accuracy"], row["seconds"])


def _peak_rss_per_rank(steps: DistributedSteps, rank: int, world: int) -> list[int]:
    """Every worker's peak resident memory so far, in bytes, by rank. Ray Train keeps only rank
    0's report, so the peaks are all-reduced (each rank fills its own slot) into every report."""
    import tensorflow as tf

    mine = np.zeros(world, dtype=np.float64)  # float64: exact for any byte count below 2**53
    mine[rank] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux counts kB
    return [int(v) for v in steps.count(tf.constant(mine)).numpy()]


def _report(row: dict[str, Any], state: dict[str, Any], steps: DistributedSteps, rank: int,
            trained: list[np.ndarray] | None) -> None:
    """Report an epoch's metrics to Ray Train, with a checkpoint from rank 0."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            _save(tmp, steps.model, steps.optimizer, state, trained)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(row, checkpoint=checkpoint)
    # Ray Train registers a reported checkpoint when its controller next polls the workers; a
    # worker that died before that poll took the report with it, and the restarted group began
    # again at epoch 1 (tests/test_train.py caught it). Waiting here until the checkpoint is
    # committed makes every finished epoch one a restart resumes after.
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def _log_epoch_start(fault: dict[str, Any] | None, epoch: int, rank: int, model) -> None:
    """For fault-tolerance tests: with ``fault["epoch_log"]``, append the epoch this worker starts
    and a digest of the weights it starts from (a restart must resume, not start over)."""
    if not fault or not fault.get("epoch_log"):
        return
    import hashlib

    digest = hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in model.get_weights())).hexdigest()
    with open(fault["epoch_log"], "a") as f:
        f.write(json.dumps({"epoch": epoch, "rank": rank, "weights": digest}) + "\n")


def _fault_hook(fault: dict[str, Any] | None, epoch: int, rank: int):
    """For fault-tolerance tests: a callable that kills this worker's process once, mid-epoch.

    ``fault`` is ``{"kill_at_epoch": E, "rank": R, "marker": path}`` (and optionally
    ``"epoch_log"``: see ``_log_epoch_start``); the marker file makes the kill happen only
    once, so the restarted worker group can finish.
    """
    if not fault or fault["kill_at_epoch"] != epoch or fault["rank"] != rank or os.path.exists(fault["marker"]):
        return None

    def kill() -> None:
        with open(fault["marker"], "w") as f:
            f.write(f"killed rank {rank} in epoch {epoch}\n")
        os._exit(1)

    return kill


def _get(ref):
    import ray

    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


def _targets(y, num_classes: int):
    import tensorflow as tf

    if num_classes == 2:
        return tf.cast(tf.reshape(y, (-1, 1)), tf.float32)
    return y


def _slot_name(variable) -> str:
    # The path less the optimizer's own name ("rm_sprop/conv1_kernel_velocity" → "conv1_kernel_velocity"),
    # which Keras may number differently in another process.
    return variable.path.split("/", 1)[-1]


def _save(directory: str, model, optimizer, state: dict[str, Any], trained: list[np.ndarray] | None) -> None:
    model.save_weights(os.path.join(directory, WEIGHTS_FILE))
    if trained is not None:
        np.savez(os.path.join(directory, TRAINED_FILE),
                 **{v.path: value for v, value in zip(model.trainable_variables, trained)})
    # Keyed by name, so a restore into a model built differently fails loudly instead of
    # pouring one layer's momentum into another.
    slots = {_slot_name(v): np.asarray(v) for v in optimizer.variables}
    if len(slots) != len(optimizer.variables):
        raise RuntimeError("optimizer variables with the same name: their state cannot be saved by name")
    np.savez(os.path.join(directory, OPTIMIZER_FILE), **slots)
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(state, f)


def _restore(directory: str, model, optimizer) -> dict[str, Any]:
    model.load_weights(os.path.join(directory, WEIGHTS_FILE))
    with np.load(os.path.join(directory, OPTIMIZER_FILE)) as saved:
        missing = sorted({_slot_name(v) for v in optimizer.variables} - set(saved.files))
        if missing:
            raise RuntimeError(f"the checkpoint has no optimizer state for {missing[:3]} "
                               f"({len(missing)} in all); it was written for another model")
        for var in optimizer.variables:
            var.assign(saved[_slot_name(var)])
    if os.path.exists(os.path.join(directory, TRAINED_FILE)):
        with np.load(os.path.join(directory, TRAINED_FILE)) as saved:
            for var in model.trainable_variables:
                var.assign(saved[var.path])
    with open(os.path.join(directory, STATE_FILE)) as f:
        return json.load(f)


def read_checkpoint_state(checkpoint) -> dict[str, Any]:
    """The epoch count and per-epoch history stored in a training checkpoint."""
    with checkpoint.as_directory() as d, open(os.path.join(d, STATE_FILE)) as f:
        return json.load(f)


def load_checkpoint_weights(checkpoint, model) -> None:
    """Load a training checkpoint's model weights into ``model`` (built like the trained one)."""
    with checkpoint.as_directory() as d:
        model.load_weights(os.path.join(d, WEIGHTS_FILE))


def fit(settings: LoopSettings, datasets: dict[str, Any], num_workers: int, use_gpu: bool, storage_path: str,
        name: str, max_failures: int):
    """Run ``train_loop_per_worker`` on ``num_workers`` Ray Train workers; returns the Ray Train Result.

    A run with the same ``storage_path`` and ``name`` as an interrupted one resumes
    from its latest checkpoint; a failed worker group restarts from it too, up to
    ``max_failures`` times.
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    for ds in datasets.values():
        # A training epoch's progress is its epoch line; bars redrawn by every epoch's data
        # coordinator would bury it.
        ds.context.enable_progress_bars = False
    cpus = float(ray.cluster_resources().get("CPU", 1))
    # Workers that each hold a whole CPU on a small machine starve the Ray Data
    # tasks that feed them and the run hangs without a word: reserve at most half.
    per_worker_cpu = round(min(1.0, cpus / (2 * num_workers)), 3)
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config=settings.to_config(),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": per_worker_cpu}),
        run_config=RunConfig(
            name=name, storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_accuracy",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=max_failures),
            # Ray Train's per-report and per-checkpoint lines stay in its log files unless --verbose.
            logging_config=LoggingConfig(log_level="INFO" if logs.verbose() else "WARNING"),
        ),
        datasets=datasets,
        # Held data is small: every worker reads it whole and takes its own slices of each batch.
        dataset_config=DataConfig(datasets_to_split=[] if settings.hold_in_memory else "all"),
    )
    return trainer.fit()
