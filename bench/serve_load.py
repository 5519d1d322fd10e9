"""Bounded load on the serving job: requests/s and latency of ``POST /predict`` on loopback.

    python bench/serve_load.py --model outputs/cats_vs_dogs_small/top/model.keras
                               [--images ../shared/data/cats_vs_dogs_small/validation]
                               [--requests 500] [--in-flight 16] [--hostile 2] [--name serve_load]

Starts the application the way ``python -m jobs.serve`` does (in-process Ray, 127.0.0.1 only),
warms it up with one request per client, then sends ``--requests`` single-image requests from
``--in-flight`` client threads, real photos in turn, and stops by itself. Prints requests/s,
p50/p90/p99 latency and the count of non-200 answers.

With ``--hostile N`` it then sends the same normal requests again while N more threads keep
sending hostile ones (a JSON list of 20,000 tiny images, 100,000 nested brackets, an 88-Mpx PNG),
and prints the normal requests' latency under that load, the hostile answers' statuses, and the
replica's RSS (its process, a descendant of the bench's, which starts the cluster) before, at the peak and after.
Figures go to ``bench/results/serve_load.json`` with the date, CPU, commit and command.
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import itertools
import json
import os
import socket
import statistics
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.result_file import write_result  # noqa: E402
from pipeline.batch.cluster import init_ray  # noqa: E402
from pipeline.config import MAX_IMAGE_MEGAPIXELS, ServeConfig  # noqa: E402
from pipeline.serving.server import start_server, stop_server  # noqa: E402


def send(url: str, data: bytes, content_type: str = "image/jpeg") -> tuple[int, float]:
    """(HTTP status, seconds) of one request."""
    started = time.perf_counter()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return status, time.perf_counter() - started


def photos(folder: str, count: int) -> list[bytes]:
    """The bytes of up to ``count`` photos found under ``folder``."""
    found = sorted(os.path.join(d, n) for d, _, names in os.walk(folder) for n in names
                   if n.lower().endswith((".jpg", ".jpeg", ".png")))[:count]
    if not found:
        raise SystemExit(f"no photos under {folder}")
    return [open(p, "rb").read() for p in found]


def hostile_bodies() -> dict[str, tuple[bytes, str]]:
    """The hostile requests by name: (body, Content-Type)."""
    huge = io.BytesIO()
    Image.new("RGB", (11_000, 8_000), (120, 30, 200)).save(huge, "PNG", compress_level=9)
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1)).save(tiny, "PNG")
    many = json.dumps({"images": [base64.b64encode(tiny.getvalue()).decode()] * 20_000}).encode()
    return {"20000_images": (many, "application/json"),
            "nested_json": (b"[" * 100_000 + b"]" * 100_000, "application/json"),
            "88_mpx_png": (huge.getvalue(), "image/png")}


def replica_rss() -> int:
    """Bytes resident in the serving replicas' processes: this process started the cluster, so they
    are among its descendants (other clusters on the machine have replicas of their own)."""
    total = 0
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.cmdline()[:1] and proc.cmdline()[0].startswith("ray::ServeReplica:"):
                total += proc.memory_info().rss
        except psutil.Error:
            pass  # a process that ended meanwhile
    return total


def latency_figures(results: list[tuple[int, float]], elapsed: float) -> dict:
    """requests/s, p50/p90/p99 in ms and the count of answers other than 200."""
    cuts = statistics.quantiles(sorted(seconds for _, seconds in results), n=100)
    return {"requests_per_s": round(len(results) / elapsed, 1), "p50_ms": round(cuts[49] * 1000, 1),
            "p90_ms": round(cuts[89] * 1000, 1), "p99_ms": round(cuts[98] * 1000, 1),
            "non_200": sum(status != 200 for status, _ in results)}


def normal_phase(pool: ThreadPoolExecutor, url: str, bodies: list[bytes], count: int) -> dict:
    """Latency figures of ``count`` single-photo requests sent through ``pool``."""
    started = time.perf_counter()
    results = list(pool.map(lambda i: send(url, bodies[i % len(bodies)]), range(count)))
    return latency_figures(results, time.perf_counter() - started)


def hostile_phase(pool: ThreadPoolExecutor, url: str, bodies: list[bytes], count: int, threads: int) -> dict:
    """The normal phase again while ``threads`` threads send hostile requests in turn, with the
    hostile answers' statuses and the replicas' RSS before, at the peak (sampled) and after."""
    hostile, stop = hostile_bodies(), threading.Event()
    statuses: dict[str, collections.Counter] = {name: collections.Counter() for name in hostile}
    rss = {"before": replica_rss(), "peak": 0}

    def attack(offset: int) -> None:
        names = list(hostile)
        for i in itertools.count(offset):
            if stop.is_set():
                return
            name = names[i % len(names)]
            statuses[name][send(url, *hostile[name])[0]] += 1

    def sample() -> None:
        while not stop.wait(0.2):
            rss["peak"] = max(rss["peak"], replica_rss())

    workers = [threading.Thread(target=attack, args=(i,)) for i in range(threads)] + [threading.Thread(target=sample)]
    for worker in workers:
        worker.start()
    try:
        figures = normal_phase(pool, url, bodies, count)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    rss["after"] = replica_rss()
    mib = {f"replica_rss_{k}_mib": round(v / 2**20) for k, v in rss.items()}
    return {**figures, "hostile_statuses": {k: dict(v) for k, v in statuses.items()}, **mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", default=os.path.join("..", "shared", "data", "cats_vs_dogs_small", "validation"))
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--hostile", type=int, default=0, help="threads sending hostile requests (0: none)")
    parser.add_argument("--max-image-megapixels", type=float, default=MAX_IMAGE_MEGAPIXELS,
                        help="the job's option: 89 lets the 88-Mpx PNG be decoded rather than refused")
    parser.add_argument("--name", default="serve_load", help="the result file: bench/results/<name>.json")
    args = parser.parse_args()
    bodies = photos(args.images, args.requests)
    init_ray()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = start_server(ServeConfig(model=args.model, port=port, max_batch_size=args.max_batch_size,
                                   max_image_megapixels=args.max_image_megapixels))
    figures = {"requests": args.requests, "in_flight": args.in_flight, "max_batch_size": args.max_batch_size,
               "max_image_megapixels": args.max_image_megapixels, "model": args.model}
    try:
        with ThreadPoolExecutor(args.in_flight) as pool:
            list(pool.map(lambda i: send(url, bodies[i % len(bodies)]), range(args.in_flight)))  # warm-up
            figures["normal"] = normal_phase(pool, url, bodies, args.requests)
            report("normal requests alone", figures["normal"])
            if args.hostile:
                figures["hostile_threads"] = args.hostile
                figures["under_hostile"] = hostile_phase(pool, url, bodies, args.requests, args.hostile)
                report(f"normal requests while {args.hostile} threads send hostile ones", figures["under_hostile"])
    finally:
        stop_server()
    write_result(args.name, figures)


def report(title: str, figures: dict) -> None:
    """Print one phase's figures."""
    print(f"{title}: {figures['requests_per_s']} requests/s; latency p50 {figures['p50_ms']} ms, "
          f"p90 {figures['p90_ms']} ms, p99 {figures['p99_ms']} ms; {figures['non_200']} answers other than 200")
    if "hostile_statuses" in figures:
        print(f"  hostile answers {figures['hostile_statuses']}; replica RSS {figures['replica_rss_before_mib']} MiB "
              f"before, {figures['replica_rss_peak_mib']} MiB at the peak, {figures['replica_rss_after_mib']} MiB after")


if __name__ == "__main__":
    main()
