"""Bounded load on the serving job: requests/s and latency of ``POST /predict`` on loopback.

    python bench/serve_load.py --model outputs/cats_vs_dogs_small/top/model.keras
                               [--images ../shared/data/cats_vs_dogs_small/validation]
                               [--requests 500] [--in-flight 16]

Starts the application the way ``python -m jobs.serve`` does (in-process Ray, 127.0.0.1 only),
warms it up with one request per client, then sends ``--requests`` single-image requests from
``--in-flight`` client threads, real photos in turn, and stops by itself. Prints requests/s,
p50/p90/p99 latency and the count of non-200 answers, then a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pipeline.cluster import init_ray  # noqa: E402
from pipeline.config import ServeConfig  # noqa: E402
from pipeline.serving import start_server, stop_server  # noqa: E402


def send(url: str, data: bytes) -> tuple[int, float]:
    """(HTTP status, seconds) of one request."""
    started = time.perf_counter()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "image/jpeg"}, method="POST")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", default=os.path.join("..", "shared", "data", "cats_vs_dogs_small", "validation"))
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=32)
    args = parser.parse_args()
    bodies = photos(args.images, args.requests)
    init_ray()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = start_server(ServeConfig(model=args.model, port=port, max_batch_size=args.max_batch_size))
    try:
        with ThreadPoolExecutor(args.in_flight) as pool:
            list(pool.map(lambda i: send(url, bodies[i % len(bodies)]), range(args.in_flight)))  # warm-up
            started = time.perf_counter()
            results = list(pool.map(lambda i: send(url, bodies[i % len(bodies)]), range(args.requests)))
            elapsed = time.perf_counter() - started
    finally:
        stop_server()
    latencies = sorted(seconds for _, seconds in results)
    cuts = statistics.quantiles(latencies, n=100)
    figures = {"requests": args.requests, "in_flight": args.in_flight, "max_batch_size": args.max_batch_size,
               "requests_per_s": round(args.requests / elapsed, 1), "p50_ms": round(cuts[49] * 1000, 1),
               "p90_ms": round(cuts[89] * 1000, 1), "p99_ms": round(cuts[98] * 1000, 1),
               "non_200": sum(status != 200 for status, _ in results), "model": args.model}
    print(f"{figures['requests_per_s']} requests/s; latency p50 {figures['p50_ms']} ms, p90 {figures['p90_ms']} ms, "
          f"p99 {figures['p99_ms']} ms; {figures['non_200']} answers other than 200")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
