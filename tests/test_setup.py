"""README's set-up: `make run` and `make test` are what they say, and CI runs `make test`."""

from __future__ import annotations

import os
import re
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry_run(*args: str) -> list[str]:
    """The commands make would run on a fresh clone (no .venv), without running them."""
    # Under `make test` (CI) this runs inside make: without --no-print-directory a nested make
    # adds "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    proc = subprocess.run(["make", "--no-print-directory", "-n", "-B", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()


def test_make_test_installs_with_the_test_extra_then_runs_the_readme_test_command():
    lines = _dry_run("test")
    assert lines[0].startswith("python3 -m venv .venv")
    assert '.venv/bin/python -m pip install -q -e ".[cpu,test]"' in lines
    assert lines[-1] == ".venv/bin/python -m pytest -q"
    with open(os.path.join(REPO, "README.md")) as f:
        setup = f.read().split("## Set-up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert re.findall(r"^make (\w+)", setup, re.M) == ["run", "test"]
    with open(os.path.join(REPO, ".ci", "run")) as f:
        assert f.read().strip().splitlines()[-1] == "make test"


def test_make_run_runs_the_main_job_with_the_chosen_extra():
    lines = _dry_run("run", "EXTRA=gpu", "ARGS=--num-workers 2")
    assert '.venv/bin/python -m pip install -q -e ".[gpu]"' in lines
    assert lines[-1] == ".venv/bin/python -m jobs.run_all --num-workers 2"
