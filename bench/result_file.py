"""The result file every bench writes: its figures with the date, CPU, commit and command that
made them, under ``bench/results/<name>.json`` (committed, so a figure in README or docs/ can
name the file it came from)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")


def cpu_name() -> str:
    """The CPU's model name and whether it has AMX or AVX512-BF16 (figures name their CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = [f for f in ("amx_bf16", "avx512_bf16") if f" {f}" in info]
    cores = os.cpu_count()
    return f"{cores} x {model} ({', '.join(flags) or 'no bf16 extensions'})"


def commit() -> str:
    """The checked-out commit, with ``+changes`` when the work tree differs from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
        except OSError:  # no git (a lent GPU machine): the figures must still be written
            return ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def write_result(name: str, figures: dict[str, Any]) -> str:
    """Write ``bench/results/<name>.json`` (figures plus date, CPU, commit, command); print and
    return its path."""
    os.makedirs(RESULTS, exist_ok=True)
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "cpu": cpu_name(), "commit": commit(), "command": " ".join(["python", *sys.argv]), **figures}
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2, default=str)
        f.write("\n")
    print(f"result file: {os.path.relpath(path, REPO)}")
    return path
