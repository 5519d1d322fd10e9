"""Figures a script printed: every result file README or docs/ cites is under bench/results/ with the
date, CPU, commit and command that made it, and every result file there is cited (issue 28)."""

from __future__ import annotations

import glob
import json
import os
import re

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
RESULTS = os.path.join(ROOT, "bench", "results")
BENCHES = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "bench", "*.py"))}
# Named as what its script will write, with no figure quoted from it (docs/performance.md#gpu-ceilings).
NOT_YET_RUN = {"gpu_check.json"}


def cited() -> dict[str, set[str]]:
    """Each result file's name (a bench's name, maybe with a ``-suffix``) → the documents citing it."""
    found: dict[str, set[str]] = {}
    for doc in [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md"))]:
        with open(doc) as f:
            for stem in re.findall(r"([\w.-]+)\.json", f.read()):
                if stem.split("-")[0] in BENCHES:
                    found.setdefault(f"{stem}.json", set()).add(os.path.basename(doc))
    return found


def test_every_cited_result_file_exists():
    missing = {name: docs for name, docs in cited().items()
               if name not in NOT_YET_RUN and not os.path.exists(os.path.join(RESULTS, name))}
    assert not missing


def test_every_result_file_names_what_made_it_and_is_cited():
    files = sorted(glob.glob(os.path.join(RESULTS, "*.json")))
    assert files
    for path in files:
        with open(path) as f:
            result = json.load(f)
        assert all(result.get(key) for key in ("date", "cpu", "commit", "command")), path
        assert result["command"].startswith("python bench/"), path
    assert {os.path.basename(p) for p in files} <= set(cited())
