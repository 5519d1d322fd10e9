"""The reliability matrix: runs tests/test_reliability.py and prints its table.

    python bench/reliability.py

Each case (dirty files, bad data roots, an inference actor killed during extraction and
prediction, a writer killed between its shard files and its ledger entry, the driver
interrupted with SIGINT/SIGTERM/SIGKILL and its rerun resuming, two runs into one output, a
training worker killed) records rows in, rows out, duplicates and lost rows; the table is
printed at the end, with the totals on its final line.
"""

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:logging", "tests/test_reliability.py"],
                         cwd=ROOT))
