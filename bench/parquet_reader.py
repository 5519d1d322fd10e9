"""Reading a split's feature shards pass after pass, as a streamed training worker's epochs do:
the product's reader (``pipeline.training.batches.read_shards``: Ray's first Parquet reader, one
block per shard) against Ray 2.60's default reader on the same call.

    python bench/parquet_reader.py FEATURE_SPLIT_DIR [--passes 3] [--columns path,label,features]

Each pass executes the dataset again and pulls every block into this process (no training), on a
local Ray cluster of this machine's CPUs; printed per reader: the seconds of each pass, the blocks
and rows of a pass, and the worker processes Ray started during the passes (the default reader
starts footer-reading actors on every execution). The figures go to
``bench/results/parquet_reader.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import psutil  # noqa: E402
import ray  # noqa: E402

from bench.result_file import write_result  # noqa: E402
from pipeline.data import storage  # noqa: E402
from pipeline.training.batches import read_shards  # noqa: E402


def _default_reader(split_dir: str, columns: list[str]) -> ray.data.Dataset:
    """``read_shards``'s call with Ray's default reader."""
    shards = len(storage.list_parquet(split_dir))
    return ray.data.read_parquet(split_dir, override_num_blocks=shards).select_columns(columns)


def _ray_processes() -> set[int]:
    return {p.pid for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0].startswith("ray::")}


def passes(ds: ray.data.Dataset, count: int) -> dict:
    """Seconds, blocks and rows of ``count`` full passes over ``ds``, and the Ray processes started meanwhile
    (sampled every 0.2 s: the default reader's actors live for part of a pass)."""
    before, started, done = _ray_processes(), set(), threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            started.update(_ray_processes() - before)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    seconds = []
    for _ in range(count):
        start, blocks, rows = time.perf_counter(), 0, 0
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            blocks, rows = blocks + 1, rows + block.num_rows
        seconds.append(round(time.perf_counter() - start, 1))
    done.set()
    sampler.join()
    return {"seconds_per_pass": seconds, "blocks_per_pass": blocks, "rows_per_pass": rows,
            "ray_processes_started": len(started)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("split_dir")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--columns", default="path,label,features")
    args = parser.parse_args()
    columns = args.columns.split(",")
    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    figures = {"split_dir": os.path.abspath(args.split_dir), "shards": len(storage.list_parquet(args.split_dir))}
    for name, reader in (("read_shards", read_shards), ("ray_default_reader", _default_reader)):
        figures[name] = passes(reader(args.split_dir, columns), args.passes)
        print(name, figures[name], flush=True)
    write_result("parquet_reader", figures)


if __name__ == "__main__":
    main()
