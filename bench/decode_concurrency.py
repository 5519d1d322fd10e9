"""How many decode tasks Ray Data runs at once beside the inference actors on a many-core node.

    python bench/decode_concurrency.py [--cpus 16] [--gpus 1] [--data-dir ../shared/data/cats_vs_dogs_small]
                                       [--block-files 32]

Starts a local Ray cluster that declares ``--cpus`` CPUs and ``--gpus`` GPUs (the shape of a
16-core GPU node, on any machine: the GPUs are only a resource here), plans the product's
inference pool for it (``pipeline.batch.cluster.inference_plan``) and streams the product's decode
tasks (``pipeline.batch.inference.decoded_images``) into actors that reserve what the inference
actors reserve but do no work, so only scheduling can limit decoding. Ray's task events give
every decode task's start and end; the script prints the peak and the time-weighted mean of
decode tasks running at once, against the CPUs the actors leave free. On a machine with fewer
real cores the tasks run slower, but how many Ray Data starts at once is what is measured.
Images are decoded at extraction's default size and batched as its actors batch them
(``ExtractConfig``'s defaults). The final line holds every figure; they also go to
``bench/results/decode_concurrency.json`` (date, CPU, commit, command).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import ray
from ray.util.state import list_tasks

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.result_file import write_result  # noqa: E402
from pipeline.batch.cluster import inference_plan  # noqa: E402
from pipeline.batch.inference import decoded_images  # noqa: E402
from pipeline.config import DEFAULT_BLOCK_FILES, ExtractConfig  # noqa: E402
from pipeline.data.discover import discover  # noqa: E402

# The product's defaults, so the decode tasks are the size extraction's are (224 px, not the 150 of earlier runs).
DEFAULTS = {f: ExtractConfig.__dataclass_fields__[f].default for f in ("image_size", "batch_size", "workers")}


class IdleActor:
    """Takes decoded batches and drops the pixels: a stand-in for an inference actor."""

    def __call__(self, batch):
        batch.pop("image")
        return batch


def concurrency(spans: list[tuple[float, float]]) -> tuple[int, float]:
    """Peak and time-weighted mean number of overlapping (start, end) spans."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    weighted, last = 0.0, events[0][0]
    for t, step in events:
        weighted += running * (t - last)
        running, last = running + step, t
        peak = max(peak, running)
    return peak, weighted / max(events[-1][0] - events[0][0], 1e-9)


def finished_decode_tasks(expected: int, timeout_s: float = 60.0) -> list:
    """The finished decode tasks of this script's own cluster (by its address: another Ray instance on
    the machine would make the state API's guess fail), polled until all ``expected`` have reached
    the state API, which hears of a task a moment after it ends."""
    deadline = time.time() + timeout_s
    while True:
        tasks = [t for t in list_tasks(address=ray.get_runtime_context().gcs_address, detail=True, limit=10000,
                                       filters=[("state", "=", "FINISHED")])
                 if "ReadImageBlocks" in t.name and t.start_time_ms and t.end_time_ms]
        if len(tasks) >= expected or time.time() > deadline:
            return tasks
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpus", type=int, default=16)
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--data-dir", default=os.path.join("..", "shared", "data", "cats_vs_dogs_small"))
    # Not the product's DEFAULT_BLOCK_FILES (128): the sample's 2800 photos would make only 22 tasks, too few to
    # time overlaps; how many tasks Ray Data runs at once is bounded by the free CPUs, not by a task's size.
    parser.add_argument("--block-files", type=int, default=32, help="files per decode task (more tasks, finer timing; "
                        f"the product's default is {DEFAULT_BLOCK_FILES})")
    args = parser.parse_args()

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(num_cpus=args.cpus, num_gpus=args.gpus, include_dashboard=True, configure_logging=False)
    plan = inference_plan(cpu_workers=DEFAULTS["workers"])
    index = discover(args.data_dir)
    ds = decoded_images(index.files.select(["relpath"]), index.root, DEFAULTS["image_size"], plan.decode_cpus,
                        args.block_files)
    ds = ds.map_batches(IdleActor, batch_format="numpy", batch_size=DEFAULTS["batch_size"],
                        compute=ray.data.ActorPoolStrategy(size=plan.actors), num_cpus=plan.num_cpus,
                        num_gpus=plan.num_gpus)
    started = time.time()
    rows = sum(len(b["relpath"]) for b in ds.iter_batches(batch_format="numpy", batch_size=None))
    elapsed = time.time() - started
    tasks = finished_decode_tasks(-(-len(index.files) // args.block_files))
    peak, mean = concurrency([(t.start_time_ms / 1e3, t.end_time_ms / 1e3) for t in tasks])
    free = args.cpus - plan.actors * plan.num_cpus
    figures = {"cpus": args.cpus, "gpus": args.gpus, "actors": plan.actors, "actor_cpus": plan.num_cpus,
               "decode_cpus_per_task": plan.decode_cpus, "cpus_free_for_decoding": free,
               "decode_tasks": len(tasks), "rows": rows, "seconds": round(elapsed, 1),
               "peak_decode_tasks_at_once": peak, "mean_decode_tasks_at_once": round(mean, 1),
               "real_cores": os.cpu_count(), "image_size": DEFAULTS["image_size"],
               "batch_size": DEFAULTS["batch_size"], "block_files": args.block_files, "data_dir": args.data_dir}
    print(f"{args.cpus} CPUs, {args.gpus} GPU(s): {plan.actors} actor(s) reserving {plan.num_cpus} CPU each, "
          f"decode tasks {plan.decode_cpus} CPU each, {free:g} CPUs free for them")
    print(f"{len(tasks)} decode tasks ({rows} images in {elapsed:.1f} s): peak {peak} running at once, "
          f"time-weighted mean {mean:.1f} (the free CPUs allow {int(free // plan.decode_cpus)})")
    ray.shutdown()
    write_result("decode_concurrency", figures)
    print(json.dumps(figures))  # last: the line that holds every figure


if __name__ == "__main__":
    main()
