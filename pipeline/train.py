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

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np

STATE_FILE = "state.json"
WEIGHTS_FILE = "model.weights.h5"
OPTIMIZER_FILE = "optimizer.npz"


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
    image_size: int = 150
    feature_shape: tuple[int, ...] = (4, 4, 512)
    # Fine-tuning on cached block-4 outputs (columns block4 / block4_flipped) instead of images.
    cached_block4: bool = False
    block4_shape: tuple[int, ...] = (9, 9, 512)
    # Columnar data (features, block-4 cache) small enough to hold: each worker reads its shard
    # once and draws every later epoch from memory, in a fresh seeded order, instead of
    # re-running the Ray Data pipeline (Parquet decoding, shuffling) every epoch.
    hold_in_memory: bool = False
    dropout: float = 0.5
    augment: bool = False
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


def freeze_below_block5(features_model) -> None:
    """Blocks 1–4 of the VGG16 inside ``features_model`` frozen, block 5 trainable."""
    vgg = features_model.get_layer("vgg16")
    for layer in vgg.layers:
        layer.trainable = layer.name.startswith("block5")


def build_model(s: LoopSettings, base_weights=None, top_weights=None):
    """The Keras model and optimizer of one training kind (under the current strategy scope)."""
    import keras

    from pipeline import models

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
        top = models.top_classifier(s.feature_shape, s.num_classes, s.precision, dropout=s.dropout)
        if top_weights is not None:
            top.set_weights(top_weights)
        model = models.image_classifier(features, top, name="vgg16_finetuned")
    if s.kind == "finetune":
        optimizer = keras.optimizers.SGD(learning_rate=s.learning_rate, momentum=0.9)
    else:
        optimizer = keras.optimizers.RMSprop(learning_rate=s.learning_rate)
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


def batch_inputs(batch: dict[str, Any], s: LoopSettings, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """A Ray Data batch as (model input, labels); images are augmented when ``rng`` is given."""
    from pipeline.augment import augment_batch

    labels = np.asarray(batch["label"], dtype=np.int32)
    if s.kind == "top":
        x = _float_rows(batch["features"], len(labels), s.feature_shape)
    elif s.cached_block4:
        x = _float_rows(batch["block4"], len(labels), s.block4_shape)
        if rng is not None:  # the cached augmentation: the mirrored image's block-4 output for a random half
            mirrored = rng.random(len(labels)) < 0.5
            x[mirrored] = _float_rows(batch["block4_flipped"], len(labels), s.block4_shape)[mirrored]
    else:
        images = np.asarray(batch["image"])
        x = augment_batch(images, rng) if rng is not None else images.astype(np.float32)
    return x, labels


def _float_rows(column, n: int, shape: tuple[int, ...]) -> np.ndarray:
    """A fixed-size-list column (pyarrow, or numpy rows) as a writable ``(n, *shape)`` float32 array."""
    from pipeline.extract import list_rows

    if hasattr(column, "combine_chunks"):  # pyarrow
        flat = list_rows(column)
    elif isinstance(column, np.ndarray) and column.dtype != object:  # rows held in memory
        flat = column
    else:
        flat = np.stack(column)
    return np.array(flat, dtype=np.float32).reshape(n, *shape)


def load_shard(shard) -> dict[str, np.ndarray]:
    """A worker's whole dataset shard as numpy columns (fixed-size lists become 2-D float32 arrays)."""
    import pyarrow as pa

    from pipeline.extract import list_rows

    parts: dict[str, list[np.ndarray]] = {}
    for batch in shard.iter_batches(batch_size=1024, batch_format="pyarrow"):
        for name in batch.column_names:
            column = batch.column(name).combine_chunks()
            if pa.types.is_fixed_size_list(column.type):
                values = list_rows(column)
            else:
                values = column.to_numpy(zero_copy_only=False)
            parts.setdefault(name, []).append(values)
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def _held_batches(columns: dict[str, np.ndarray], batch_size: int, drop_last: bool,
                  seed: int | None) -> Iterator[dict]:
    n = len(columns["label"]) if columns else 0
    order = np.random.default_rng(seed).permutation(n) if seed is not None else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        rows = order[start:start + batch_size]
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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The function Ray Train runs on every worker: train, evaluate, report and checkpoint each epoch."""
    import ray.train
    import tensorflow as tf

    from pipeline.cluster import configure_tensorflow_devices

    from pipeline.precision import device_precision

    config = dict(config)
    extras = config.pop("extras", {}) or {}
    s = LoopSettings(**config)
    s.precision = device_precision(s.precision, allow_float16=False)
    s.feature_shape, s.block4_shape = tuple(s.feature_shape), tuple(s.block4_shape)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    configure_tensorflow_devices()
    # Workers sharing a node split its cores instead of each starting one thread per core.
    threads = max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size()))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))

    import keras

    keras.utils.set_random_seed(s.seed)  # identical initial weights on every worker
    # One all-reduce for all gradients (packed) instead of one per variable: on CPUs each
    # collective has a fixed latency that small, fast steps feel.
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(bytes_per_pack=64 * 2**20))
    base_weights = _get(extras.get("base_weights"))
    top_weights = _get(extras.get("top_weights"))
    with strategy.scope():
        model, optimizer = build_model(s, base_weights, top_weights)
        loss_fn = per_example_loss(s.num_classes)

    state = {"epoch": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = _restore(d, model, optimizer)

    per_worker = s.batch_size // world  # exact: the configs refuse worker counts that do not divide the batch

    @tf.function
    def workers_with_batch(flag):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(tf.identity, args=(flag,)), axis=None)

    def stats(y, out, losses, has_next):
        correct = tf.reduce_sum(tf.cast(predicted_labels(out, s.num_classes) == y, tf.float32))
        return tf.stack([tf.reduce_sum(losses), correct, tf.cast(tf.size(y), tf.float32), has_next])

    def train_step(x, y, has_next):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            losses = loss_fn(_targets(y, s.num_classes), out)
            loss = tf.nn.compute_average_loss(losses, global_batch_size=s.batch_size)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return stats(y, out, losses, has_next)

    def eval_step(x, y, has_next):
        out = model(x, training=False)
        return stats(y, out, loss_fn(_targets(y, s.num_classes), out), has_next)

    @tf.function
    def distributed_train(x, y, has_next):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(train_step, args=(x, y, has_next)), axis=None)

    @tf.function(reduce_retracing=True)
    def distributed_eval(x, y, has_next):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(eval_step, args=(x, y, has_next)), axis=None)

    held: dict[str, dict[str, np.ndarray]] = {}

    def run_epoch(split: str, step_fn, drop_last: bool, shuffle_seed: int | None, augment_seed: list[int] | None,
                  fault=None):
        totals = np.zeros(3)
        shard = ray.train.get_dataset_shard(split)
        if shard is None:
            it = iter(())
        elif s.hold_in_memory:
            if split not in held:
                held[split] = load_shard(shard)
            it = _held_batches(held[split], per_worker, drop_last, shuffle_seed)
        else:
            it = _batches(shard, per_worker, drop_last, s, shuffle_seed)
        batch = next(it, None)
        everyone_has_batch = int(workers_with_batch(tf.constant(0 if batch is None else 1))) == world
        step = 0
        while everyone_has_batch:
            upcoming = next(it, None)
            rng = np.random.default_rng(augment_seed + [step]) if augment_seed is not None else None
            x, y = batch_inputs(batch, s, rng)
            reduced = step_fn(tf.convert_to_tensor(x), tf.convert_to_tensor(y),
                              tf.constant(0.0 if upcoming is None else 1.0)).numpy()
            totals += reduced[:3]
            everyone_has_batch = round(float(reduced[3])) == world
            batch = upcoming
            step += 1
            if fault is not None:
                fault()
        # Drain a shard that still has rows (another worker ran out first), so the
        # next epoch's iterator starts clean.
        for _ in it:
            pass
        return totals

    for epoch in range(state["epoch"], s.epochs):
        epoch_started = time.time()
        shuffle_seed = (s.seed * 1_000_003 + epoch * 7919 + rank) % 2**31 if s.shuffle else None
        augment_seed = [s.seed, epoch, rank] if s.augment else None
        tr = run_epoch("train", distributed_train, True, shuffle_seed, augment_seed,
                       fault=_fault_hook(extras.get("fault"), epoch + 1, rank))
        va = run_epoch("validation", distributed_eval, False, None, None)
        row = {"epoch": epoch + 1,
               "loss": float(tr[0] / max(tr[2], 1)), "accuracy": float(tr[1] / max(tr[2], 1)),
               "val_loss": float(va[0] / max(va[2], 1)), "val_accuracy": float(va[1] / max(va[2], 1)),
               "train_samples": int(tr[2]), "val_samples": int(va[2]),
               "seconds": round(time.time() - epoch_started, 2), "precision": s.precision}
        state = {"epoch": epoch + 1, "history": state["history"] + [row]}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                _save(tmp, model, optimizer, state)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(row, checkpoint=ckpt)


def _fault_hook(fault: dict[str, Any] | None, epoch: int, rank: int):
    """For fault-tolerance tests: a callable that kills this worker's process once, mid-epoch.

    ``fault`` is ``{"kill_at_epoch": E, "rank": R, "marker": path}``; the marker file makes
    the kill happen only once, so the restarted worker group can finish.
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


def _save(directory: str, model, optimizer, state: dict[str, Any]) -> None:
    model.save_weights(os.path.join(directory, WEIGHTS_FILE))
    np.savez(os.path.join(directory, OPTIMIZER_FILE), *[np.asarray(v) for v in optimizer.variables])
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(state, f)


def _restore(directory: str, model, optimizer) -> dict[str, Any]:
    model.load_weights(os.path.join(directory, WEIGHTS_FILE))
    with np.load(os.path.join(directory, OPTIMIZER_FILE)) as saved:
        for i, var in enumerate(optimizer.variables):
            var.assign(saved[f"arr_{i}"])
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
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

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
        ),
        datasets=datasets,
    )
    return trainer.fit()
