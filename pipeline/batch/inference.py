"""The Ray Data plumbing that extraction, prediction and training share: files → decode tasks →
an actor pool running a model → a sink that commits each block and tallies who did what; and
extraction's and prediction's committed-output flow (``commit_run``).

Work is an Arrow table, one row per file (``relpath`` under a ``root``, plus columns carried to the
sink), cut into blocks of ``--block-files`` files: one decode task, actor call and committed part
each, so the driver plans thousands of blocks, not millions, and an interruption loses only those in flight.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections import Counter
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import ray
from ray.data import Datasink, Datasource, ReadTask
from ray.data.block import BlockAccessor, BlockMetadata

from pipeline import names
from pipeline.batch.cluster import (
    InferencePlan,
    configure_tensorflow_devices,
    inference_plan,
    pin_to_this_node,
    wait_for_gpus,
)
from pipeline.batch.runahead import ACTOR_TASKS_IN_FLIGHT, cap_run_ahead
from pipeline.config import DEFAULT_BLOCK_FILES, InferenceOptions
from pipeline.data import ledger, storage
from pipeline.errors import DataError
from pipeline.faults import maybe_fail, trace
from pipeline.images.decode import MAX_PIXELS, decode_batch
from pipeline.nets.precision import device_precision
from pipeline.options import write_config

log = logging.getLogger(__name__)

# What a decode task holds besides its block's pixels: the worker itself (about 110 MiB)
# and one 12-megapixel photo decoded at full size before it is scaled down.
DECODE_TASK_BASE_BYTES = 160 * 2**20


class ImageBlocks(Datasource):
    """The files of a table (``relpath`` under ``root``) as blocks of ``block_rows`` decoded images. The
    table goes into the object store once and each read task holds only its block number, so planning a
    million files costs no Python object per file; reading *is* decoding, so no read operator holds a CPU."""

    def __init__(self, files: pa.Table, root: str, image_size: int, block_rows: int, order: np.ndarray | None,
                 max_pixels: int = MAX_PIXELS, files_ref: ray.ObjectRef | None = None):
        super().__init__()
        self.max_pixels = max_pixels
        self.rows = len(files)
        self.files = files_ref if files_ref is not None else ray.put(files)
        self.order = ray.put(order) if order is not None else None
        self.root, self.image_size, self.block_rows = root, image_size, block_rows

    def block_bytes(self, rows: int) -> int:
        """Decoded pixels of a block of ``rows`` images."""
        return rows * self.image_size * self.image_size * 3

    def estimate_inmemory_data_size(self) -> int:
        return self.block_bytes(self.rows)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        tasks = []
        for start in range(0, max(self.rows, 1), self.block_rows):
            rows = min(self.block_rows, self.rows - start)
            meta = BlockMetadata(num_rows=rows, size_bytes=self.block_bytes(rows), input_files=None, exec_stats=None)
            tasks.append(ReadTask(functools.partial(self._read, start), meta))
        return tasks

    def _read(self, start: int) -> list[Any]:
        table = ray.get(self.files)
        positions = ray.get(self.order) if self.order is not None else np.arange(len(table))
        block = table.take(positions[start:start + self.block_rows])
        rows = {name: column.to_numpy(zero_copy_only=False) for name, column in zip(block.column_names, block.columns)}
        root = names.escape(self.root)  # the root's own name in stored form too, as decoding unescapes the whole path
        rows["path"] = np.array([storage.join(root, str(r)) for r in rows["relpath"]], dtype=object)
        out = decode_batch(rows, self.image_size, self.max_pixels)
        out["decode_node"] = np.full(len(out["image"]), ray.get_runtime_context().get_node_id()[:12], dtype=object)
        return [BlockAccessor.batch_to_block(out)]


def decoded_images(files: pa.Table, root: str, image_size: int, decode_cpus: float,
                   block_rows: int = DEFAULT_BLOCK_FILES, order: np.ndarray | None = None,
                   max_pixels: int = MAX_PIXELS, files_ref: ray.ObjectRef | None = None) -> ray.data.Dataset:
    """A Ray dataset of ``files`` (``relpath`` under ``root``; in the order of the positions ``order`` if
    given) plus each file's ``path``, decoded ``image``, ``reason``, ``error`` and ``decode_node``. Each
    file is decoded on its own, so a bad one becomes a reject row instead of failing its block (unlike
    ``ray.data.read_images``); local roots are decoded on the driver's node (``pin_to_this_node``).
    ``files_ref``: ``files`` already in the object store (``pipeline.batch.listing``), not put there again."""
    source = ImageBlocks(files, root, image_size, block_rows, order, max_pixels, files_ref)
    # Stating the memory decode tasks need also keeps Ray Data from fusing them (operators whose remote
    # args match) into the inference actors, which would serialise decoding and inference. Twice the
    # pixels: with them once, a 224 px task of streamed fine-tuning was seen using 187.8 MiB against
    # the 178.4 it asked for (what holds the rest was not measured apart).
    memory = 2 * source.block_bytes(block_rows) + DECODE_TASK_BASE_BYTES
    return ray.data.read_datasource(source, num_cpus=decode_cpus, memory=memory,
                                    override_num_blocks=max(1, -(-len(files) // block_rows)), **pin_to_this_node(root))


def find_rejects(files: pa.Table, root: str, image_size: int, max_pixels: int = MAX_PIXELS) -> pa.Table:
    """Decode every file once with Ray Data; the rows of ``files`` that fail, with ``reason`` and ``error``."""
    columns = ("relpath", "reason", "error")

    def reasons(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        bad = batch["reason"] != ""
        return {k: batch[k][bad] for k in columns}

    ds = decoded_images(files.select(["relpath"]), root, image_size, inference_plan(1).decode_cpus, max_pixels=max_pixels)
    found = ds.map_batches(reasons, batch_format="numpy").to_arrow_refs()
    tables = [t for t in ray.get(found) if len(t)]
    bad = pa.concat_tables(tables) if tables else pa.table({k: pa.array([], pa.string()) for k in columns})
    return files.join(bad.cast(pa.schema([(f.name, pa.string()) for f in bad.schema])), "relpath",
                      join_type="inner").sort_by("relpath")


def check_reject_fraction(rejects: pa.Table, total: int, max_fraction: float, hint: str) -> None:
    """Raise DataError, naming a few of them and ``hint``, when more than ``max_fraction`` of
    ``total`` files (or all of them) are ``rejects`` (a table with ``path`` and ``reason``)."""
    if len(rejects) <= max_fraction * total and len(rejects) < total:
        return
    sample = "; ".join(f"{p} ({r})" for p, r in zip(rejects.column("path").to_pylist()[:5],
                                                   rejects.column("reason").to_pylist()[:5]))
    raise DataError(f"{len(rejects)} of {total} files could not be decoded, more than --max-reject-fraction "
                    f"{max_fraction}; e.g. {sample}. {hint}")


def plan_inference(options: InferenceOptions) -> InferencePlan:
    """The actor pool for ``options``; with ``--gpus``, once the cluster has those GPUs."""
    if options.gpus:
        wait_for_gpus(options.gpus, options.gpu_wait_s)
    return inference_plan(options.workers, options.gpus)


def map_with_actors(ds: ray.data.Dataset, actor_cls: type, constructor_kwargs: dict[str, Any],
                    plan: InferencePlan, batch_size: int, block_rows: int = DEFAULT_BLOCK_FILES) -> ray.data.Dataset:
    """Run ``actor_cls`` over ``ds`` (blocks of ``block_rows`` rows) in a pool of ``plan.actors`` actors,
    each built once, fed at most ``runahead.cap_run_ahead``'s blocks ahead."""
    cap_run_ahead(ds.context, plan.actors, -(-batch_size // block_rows))
    return ds.map_batches(
        actor_cls,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.actors, max_tasks_in_flight_per_actor=ACTOR_TASKS_IN_FLIGHT),
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
    )


class InferenceActor:
    """One model in this process (a Ray Data actor, or a classifier's serving replica) on the devices it got:
    TensorFlow set up first, the precision resolved for them, then a subclass's ``load(model_data, precision)``
    builds the model. A call adds a subclass's ``infer(batch, images)`` outputs to the batch and marks each row
    with the actor and the call's wall-clock span, from which ``Tally`` adds up the actor's busy time."""

    FAULT_SITE: str  # the ``maybe_fail`` site of each call

    def __init__(self, model_data: Any, precision: str, batch_size: int):
        configure_tensorflow_devices()
        if isinstance(model_data, ray.ObjectRef):
            model_data = ray.get(model_data)
        precision = device_precision(precision)
        self.model = self.load(model_data, precision)
        self.batch_size = batch_size
        # JSON for the manifest; also traced as ``inference_actor``, so a test sees an actor that got no rows.
        identity = {"node": ray.get_runtime_context().get_node_id()[:12], "pid": os.getpid(),
                    "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "precision": precision}
        trace("inference_actor", lambda: identity)
        self.identity = json.dumps(identity, sort_keys=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.time()
        maybe_fail(self.FAULT_SITE)
        self.infer(batch, batch.pop("image"))
        n = len(batch["relpath"])
        batch["actor"] = np.full(n, self.identity, dtype=object)
        batch["call_start"] = np.full(n, started)
        batch["call_end"] = np.full(n, time.time())
        return batch

    def run_model(self, images: np.ndarray, ok: np.ndarray, batch_size: int | None = None):
        """The model's output (an array, or a list for several outputs) for the rows where ``ok``, in batches
        padded to ``batch_size`` (default the actor's) so TF never retraces; None when no row is ok."""
        batch_size = batch_size or self.batch_size
        good = images[ok]
        if len(good) == 0:
            return None
        pad = (-len(good)) % batch_size
        if pad:
            good = np.concatenate([good, np.zeros((pad, *good.shape[1:]), good.dtype)])
        chunks = [self.model.predict_on_batch(good[i:i + batch_size]) for i in range(0, len(good), batch_size)]
        n = int(ok.sum())
        if isinstance(chunks[0], (list, tuple)):
            return [np.concatenate([np.asarray(c[k], dtype=np.float32) for c in chunks])[:n]
                    for k in range(len(chunks[0]))]
        return np.concatenate([np.asarray(c, dtype=np.float32) for c in chunks])[:n]


def _busy(spans: set[tuple[float, float]]) -> dict[str, float]:
    """An actor's time inside its calls, the span from its first call to its last, and their ratio."""
    busy = sum(end - start for start, end in spans)
    active = max(end for _, end in spans) - min(start for start, _ in spans)
    return {"busy_s": round(busy, 2), "active_s": round(active, 2), "busy_fraction": round(busy / max(active, 1e-9), 3)}


class Tally:
    """Who did a run's inference: rows per inference actor (its identity) and per decoding node, and each
    actor's calls as (start, end) spans. Each write task returns one, the sink adds them up; a run that
    processed nothing has an empty one."""

    def __init__(self) -> None:
        self.actor_rows: Counter[str] = Counter()
        self.decode_nodes: Counter[str] = Counter()
        self.calls: dict[str, set[tuple[float, float]]] = {}

    def count(self, batch: dict[str, np.ndarray]) -> Tally:
        """Count a batch of rows an ``InferenceActor`` marked; returns this tally."""
        self.actor_rows.update(str(a) for a in batch["actor"])
        self.decode_nodes.update(str(n) for n in batch["decode_node"])
        for actor, start, end in zip(batch["actor"], batch["call_start"], batch["call_end"]):
            self.calls.setdefault(str(actor), set()).add((float(start), float(end)))
        return self

    def add(self, other: Tally) -> Tally:
        """Add ``other`` into this tally and return it; a call split over two blocks counts once."""
        self.actor_rows.update(other.actor_rows)
        self.decode_nodes.update(other.decode_nodes)
        for actor, spans in other.calls.items():
            self.calls.setdefault(actor, set()).update(spans)
        return self

    def report(self, requested_precision: str) -> dict[str, Any]:
        """A manifest's ``precision`` the actors ran at (``mixed`` if they disagree, ``requested_precision`` if none
        ran), ``inference_actors`` (each one's rows and busy time), rows per ``decode_nodes`` and ``processed``."""
        actors = [{**json.loads(identity), "rows": rows, **_busy(self.calls[identity])}
                  for identity, rows in sorted(self.actor_rows.items())]
        chosen = {a["precision"] for a in actors}
        return {"precision": chosen.pop() if len(chosen) == 1 else ("mixed" if chosen else requested_precision),
                "inference_actors": actors, "decode_nodes": dict(sorted(self.decode_nodes.items())),
                "processed": sum(self.actor_rows.values())}


# Writers reserve a tenth of a CPU (writing is mostly I/O): one asking for a whole CPU waits while decode
# tasks and actors hold the cores, and nothing is committed until the last file is decoded.
WRITE_CPUS = 0.1


class CommittingSink(Datasink):
    """A Datasink that commits each block to ``output``: its data files (``write_block``), then its
    ledger entry, rejects included; the write tasks' ``Tally`` objects are added up into ``self.tally``.
    Part names come from the run and the task's index, so a retried task overwrites its own files."""

    def __init__(self, output: str, run_id: str):
        self.output = output
        self.run_id = run_id
        self.tally = Tally()

    def write_block(self, part: str, batch: dict[str, np.ndarray], ok: np.ndarray) -> None:
        """Write the data files of one block (``ok``: the rows that decoded)."""
        raise NotImplementedError

    def write(self, blocks: Iterable[Any], ctx: Any) -> Tally:
        total = Tally()
        for n, block in enumerate(blocks):
            batch = BlockAccessor.for_block(block).to_numpy()
            if len(batch["relpath"]) == 0:
                continue
            part = ledger.part_name(self.run_id, ctx.task_idx, n)
            total.count(batch)
            self.write_block(part, batch, batch["reason"] == "")
            maybe_fail("write")  # tests: a writer that dies between its files and its entry
            ledger.write_entry(self.output, part, batch)
        return total

    def on_write_complete(self, write_result) -> None:
        self.tally = functools.reduce(Tally.add, write_result.write_returns, Tally())

    def commit(self, ds: ray.data.Dataset) -> Tally:
        """Write ``ds`` through this sink, its write tasks on ``output``'s node when local; the run's tally."""
        ds.write_datasink(self, ray_remote_args={"num_cpus": WRITE_CPUS, **pin_to_this_node(self.output)})
        return self.tally


def commit_run(work: str, finished: dict[str, Any] | None, *, inputs: str, record: dict[str, Any], marker: str,
               what: str, reused: str, config: tuple[str, str, dict[str, Any]] | None, listing: pa.Table,
               listing_ref: ray.ObjectRef, folders: list[str],
               process: Callable[[pa.Table, str, ray.ObjectRef | None], Any],
               finish: Callable[[pa.Table, Any], tuple[dict[str, Any], str]], started: float) -> dict[str, Any]:
    """Extraction's and prediction's flow, under the output's lock once ``ledger.open_output`` gave ``work``'s
    ``finished`` summary: reuse it when of the same ``inputs``; else ``ledger.start`` (``record``: the settings and
    more), the ``config`` file (uri, job, values), ``ledger.refresh`` (``process(files to do, run id, their ref)``
    commits them; the ref is ``listing_ref``, ``listing`` in the object store, when they are all of it, else None)
    and, last, the summary ``finish(live ledger, process's result or None)`` returns with its uri, timing added."""
    if finished is not None and finished.get("inputs") == inputs:
        log.info(f"reusing finished {reused}")
        return finished
    ledger.start(work, record, marker)
    if config:
        write_config(*config)
    # A first run's files to do are the listing itself (``ledger.plan`` makes no copy), already in the object store.
    live, update, done = ledger.refresh(work, listing, folders, f"{'updating' if finished else 'resuming'} {what}",
                                        lambda todo, run_id: process(todo, run_id, listing_ref if todo is listing else None))
    summary, uri = finish(live, done)
    elapsed = time.time() - started
    summary.update(settings=record["settings"], inputs=inputs, update=update.counts, elapsed_s=round(elapsed, 2),
                   images_per_s=round(summary["processed"] / max(elapsed, 1e-9), 2))
    storage.write_json(uri, summary)
    return summary
