"""What the benches watch while a job runs: the resident memory of every process of the job's
tree, by the kind of process (driver, Ray's daemons, decode workers, inference actors, training
workers), and how many files its output has committed."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading
import time

import psutil
import pyarrow.parquet as pq


def kind_of(proc: psutil.Process, driver_pid: int) -> str:
    """The role of a process of the job's tree, from its command line (Ray names its workers by what
    they run: an idle task worker is ``ray::IDLE``, in extraction a decode task's process)."""
    if proc.pid == driver_pid:
        return "driver"
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    for needle, kind in (("raylet", "raylet"), ("gcs_server", "gcs"), ("dashboard", "dashboard"),
                         ("DashboardAgent", "dashboard"), ("RuntimeEnvAgent", "ray_agents"),
                         ("log_monitor", "ray_agents"), ("monitor.py", "ray_agents"),
                         ("TrainWorker", "train_workers"), ("TrainController", "train_controller"),
                         ("MapWorker", "inference_actor"), ("ReadImageBlocks", "task_workers"),
                         ("ray::IDLE", "task_workers"), ("ray::_", "ray_data_actors"),
                         ("ActorLocationTracker", "ray_data_actors"), ("ray::", "ray_workers_other")):
        if needle in cmd:
            return kind
    return "other:" + proc.name()


def committed_rows(output: str, seen: dict[str, int]) -> int:
    """Rows of the ledger entries committed so far (``seen`` caches the entries already read)."""
    folder = os.path.join(output, "_ledger")
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.endswith(".parquet") and name not in seen:
            try:
                seen[name] = pq.read_metadata(os.path.join(folder, name)).num_rows
            except (OSError, ValueError):  # being written right now: read on the next call
                continue
    return sum(seen.values())


class Sampler(threading.Thread):
    """Samples the job tree's RSS by process kind and the committed rows every ``period`` s."""

    def __init__(self, driver_pid: int, output: str | None = None, period: float = 2.0):
        super().__init__(daemon=True)
        self.driver, self.output, self.period = psutil.Process(driver_pid), output, period
        # (time, committed rows, {kind: [RSS of each process of that kind]})
        self.samples: list[tuple[float, int, dict[str, list[int]]]] = []
        # The machine's 1-minute load average at each sample: whether others shared the cores.
        self.load: list[float] = []
        self.seen: dict[str, int] = {}
        self.stop = threading.Event()

    def committed(self) -> int:
        return committed_rows(self.output, self.seen)

    def run(self) -> None:
        while not self.stop.is_set():
            by_kind: dict[str, list[int]] = collections.defaultdict(list)
            try:
                procs = [self.driver, *self.driver.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    # Both read before the kind's list is made: a process that ends between them leaves no empty list.
                    kind, rss = kind_of(p, self.driver.pid), p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                by_kind[kind].append(rss)
            self.samples.append((time.time(), self.committed() if self.output else 0, dict(by_kind)))
            self.load.append(os.getloadavg()[0])
            self.stop.wait(self.period)

    def peaks(self, since: float = 0.0, until: float = float("inf")) -> dict[str, dict[str, int]]:
        """Each kind's peak in MiB between two times (see ``peaks_of``)."""
        return self.peaks_of(self.samples, since, until)

    @staticmethod
    def peaks_of(samples: list, since: float, until: float) -> dict[str, dict[str, int]]:
        """Each kind's peak in MiB between two times: its largest process, and the kind's sum;
        ``whole_tree``: the peak of the sum over every process."""
        window = [s for s in samples if since <= s[0] <= until]
        kinds = sorted({kind for s in window for kind in s[2]})
        found = {kind: {"max_process_mib": round(max(max(s[2].get(kind, [0])) for s in window) / 2**20),
                        "kind_sum_mib": round(max(sum(s[2].get(kind, [0])) for s in window) / 2**20)}
                 for kind in kinds}
        found["whole_tree"] = {"sum_mib": round(max((sum(sum(v) for v in s[2].values()) for s in window),
                                                    default=0) / 2**20)}
        return found


def start_job(args: list[str], cwd: str, log_path: str) -> subprocess.Popen:
    """``python -m <args>`` as a user starts a job, on a local Ray cluster of its own, in a session
    of its own (so that its whole tree can be killed), its output into ``log_path``."""
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env={**os.environ, "RAY_ADDRESS": "local"},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run_sampled(args: list[str], cwd: str, log_path: str, period: float = 1.0,
                output: str | None = None) -> tuple[float, Sampler]:
    """Run ``python -m <args>`` (``start_job``) to its end while sampling its tree (and the rows
    committed into ``output``, when given); its seconds and the sampler. Raises SystemExit with
    the log's end when it fails."""
    started = time.time()
    job = start_job(args, cwd, log_path)
    sampler = Sampler(job.pid, output, period=period)
    sampler.start()
    code = job.wait()
    sampler.stop.set()
    sampler.join()
    if code != 0:
        with open(log_path) as f:
            raise SystemExit(f"python -m {' '.join(args)} failed (exit {code}):\n{f.read()[-3000:]}")
    return time.time() - started, sampler
