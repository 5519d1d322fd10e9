"""The reliability matrix: runs tests/test_reliability.py and prints its table.

    python bench/reliability.py

Each case (dirty files, bad data roots, an inference actor killed during extraction and
prediction, a writer killed between its shard files and its ledger entry, the driver
interrupted with SIGINT/SIGTERM/SIGKILL and its rerun resuming, two runs into one output, a
training worker killed) records rows in, rows out, duplicates and lost rows; the table is
printed at the end, with the totals on its final line. The rows and totals, with pytest's exit
status, go to ``bench/results/reliability.json`` (date, CPU, commit, command).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ROWS_FILE = "RELIABILITY_ROWS_FILE"  # the environment variable that names where the pytest run leaves its rows


def pytest_sessionfinish(session) -> None:
    """Inside the pytest run (loaded with ``-p bench.reliability``): the matrix's rows, which
    tests/conftest.py collects in its own process, into the file ``ROWS_FILE`` names."""
    path = os.environ.get(ROWS_FILE)
    for plugin in session.config.pluginmanager.get_plugins() if path else ():
        rows = getattr(plugin, "RELIABILITY_ROWS", None)
        if isinstance(rows, list):
            with open(path, "w") as f:
                json.dump(rows, f)
            return


def totals(rows: list[dict], exit_status: int) -> dict:
    """The figures of the matrix, summed as tests/conftest.py's table sums them (cases refused
    before any work write no rows, so duplicates and lost do not apply to them)."""
    counted = [r for r in rows if r["lost"] is not None]
    return {"pytest_exit_status": exit_status, "cases": len(rows), "refused_before_work": len(rows) - len(counted),
            "cases_writing_rows": len(counted), "duplicated_rows": sum(r["duplicates"] for r in counted),
            "lost_rows": sum(r["lost"] for r in counted), "rows": rows}


def main() -> int:
    # No options; parsed so that --help prints this instead of starting the tests.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    sys.path.insert(0, ROOT)
    from bench.result_file import write_result

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.json")
        status = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:logging", "-p", "bench.reliability",
                                  "tests/test_reliability.py"], cwd=ROOT, env={**os.environ, ROWS_FILE: path})
        if not os.path.exists(path):
            print("no reliability rows came back from pytest: no result file written")
            return status or 1
        with open(path) as f:
            rows = json.load(f)
    write_result("reliability", totals(rows, status))
    return status


if __name__ == "__main__":
    sys.exit(main())
