"""A real two-node Ray cluster on this machine, photos and outputs on an S3 server (moto) on
loopback, jobs submitted with `ray job submit` (token auth on): no path is shared between the
driver and the work except through object storage."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pyarrow.parquet as pq
import pytest

from pipeline.data.storage import cache_dir
from tests.clusters import REPO, cluster_env, local_cluster, s3_keys, s3_read, s3_server, upload_tree
from tests.conftest import make_real_root

pytestmark = pytest.mark.timeout(1800)
PER_CLASS = 3
SMALL_RUN = ("--extract-batch-size 2 --top-batch-size 2 --finetune-batch-size 2 --scratch-batch-size 2 --epochs 2 "
             "--extract-image-size 64 --scratch-image-size 64")


def _files_under(root: str, skip: tuple[str, ...] = ()) -> set[str]:
    found = set()
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and os.path.join(dirpath, d) not in skip]
        found |= {os.path.relpath(os.path.join(dirpath, f), root) for f in files}
    return found


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Head (2 CPUs, no GPU) + a second node (2 CPUs, 2 logical GPUs), nodes and jobs with their own
    HOME and TMPDIR so that anything they write to local disk can be found; photos on s3://docs/photos
    (README's s3://BUCKET/photos), their validation split again on s3://docs/new-photos."""
    base = tempfile.mkdtemp(prefix="ric2n", dir="/tmp")
    home, tmp = os.path.join(base, "home"), os.path.join(base, "tmp")
    os.makedirs(home)
    os.makedirs(tmp)
    local = make_real_root(str(tmp_path_factory.mktemp("photos")), PER_CLASS)
    with s3_server(("docs",)) as aws:
        # The weights and the built-in data set come from the usual cache, not a fresh download.
        env = cluster_env({**aws, "HOME": home, "TMPDIR": tmp, "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                           "RIC_CACHE_DIR": cache_dir()})
        keys = upload_tree(aws, local, "docs", "photos")
        upload_tree(aws, os.path.join(local, "validation"), "docs", "new-photos")
        try:
            with local_cluster(os.path.join(base, "ray"), env, worker={"cpus": 2, "gpus": 2}) as cluster:
                yield {**cluster, "env": env, "aws": aws, "keys": keys, "base": base, "home": home, "tmp": tmp}
        finally:
            shutil.rmtree(base, ignore_errors=True)


def _s3_table(aws, bucket: str, prefix: str):
    import pyarrow as pa

    tables = [pq.read_table(io.BytesIO(s3_read(aws, bucket, f"{prefix}/{k}")))
              for k in s3_keys(aws, bucket, prefix) if k.endswith(".parquet")]
    return pa.concat_tables(tables)


def _working_dir_copies(base: str) -> list[str]:
    found = []
    for dirpath, dirnames, _ in os.walk(base):
        if os.path.basename(dirpath) == "working_dir_files":
            found += [os.path.join(dirpath, d) for d in dirnames]
            dirnames[:] = []
    return found


def _uploaded_files() -> set[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    return {p for p in listed if os.path.isfile(os.path.join(REPO, p))}


def test_training_beside_another_cluster_keeps_to_its_own(two_nodes, tmp_path):
    """An in-process cluster trains while the two-node cluster is up and recorded as the machine's
    latest (RAY_TMPDIR points at its record): Ray Train's placement-group cleaner must ask its own
    cluster about its controller, or it judges the run dead and tears it down."""
    # The same token as the other cluster, as for a user whose ~/.ray/auth_token serves both.
    env = {**os.environ, "RAY_TMPDIR": two_nodes["base"], "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": two_nodes["env"]["RAY_AUTH_TOKEN"]}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "tests.isolated", "train_beside", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["epochs"] == 8 and result["own_address"].split(":")[1] != two_nodes["gcs"].split(":")[1]
    assert result["processes_that_addressed_another_cluster"] == []


def documented_cluster_commands() -> list[str]:
    """Every `ray job submit` and `python -m jobs…` command in README.md's cluster section and in
    cluster.yaml's header, continuation lines joined, in order, each once."""
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme.split("\n## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    with open(os.path.join(REPO, "cluster.yaml")) as f:
        header = "".join(line[2:] if line.startswith("# ") else "\n" for line in f if line.startswith("#"))
    commands = []
    for text in blocks + [header]:
        joined = re.sub(r"\\\n\s*", "", text)
        for line in joined.splitlines():
            line = line.split("  #", 1)[0].strip()
            if re.match(r"(\w+=\S+ )*ray job submit |python -m jobs\.", line) and line not in commands:
                commands.append(line)
    return commands


def test_documented_cluster_commands_run_on_both_nodes_with_every_path_on_s3(two_nodes, tmp_path):
    aws, keys = two_nodes["aws"], two_nodes["keys"]
    home_before = set(os.listdir(two_nodes["home"]))
    commands = documented_cluster_commands()
    assert any("run_all" in c and "s3://" in c for c in commands) and any("jobs.predict" in c for c in commands)
    dashboard = two_nodes["address"].split("://", 1)[1]
    # The documented placeholders, pointed at this test's cluster, bucket and a scratch folder;
    # its 6 training photos are fewer than the default batch of 32, which training refuses, and
    # two epochs per model at 64 px show the commands work (the default 50 + 10 + 100 epochs at
    # 224 and 150 px would take most of CI's time).
    concrete_commands = dict.fromkeys(
        c.replace("s3://YOUR-BUCKET/", "s3://docs/").replace("s3://BUCKET/", "s3://docs/")
        .replace("127.0.0.1:8265", dashboard).replace('"$PWD/outputs', f'"{tmp_path}/outputs')
        .replace("--num-workers 2", f"--num-workers 2 {SMALL_RUN}") for c in commands)
    for concrete in concrete_commands:
        proc = subprocess.run(["bash", "-c", concrete], cwd=REPO, env=two_nodes["env"], capture_output=True,
                              text=True, timeout=1200)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "succeeded" in out.lower(), concrete + "\n" + out[-4000:]
    # The local cluster's run on the built-in data: each model trained, exported and evaluated on its 32 photos.
    for kind in ("top", "finetune", "scratch"):
        with open(os.path.join(tmp_path, "outputs", "cluster-run", kind, "evaluation.json")) as f:
            assert json.load(f)["num_samples"] == 32, kind
        assert os.path.getsize(os.path.join(tmp_path, "outputs", "cluster-run", kind, "model.keras")) > 0

    manifest = json.loads(s3_read(aws, "docs", "runs/1/features/manifest.json"))
    actors = manifest["inference_actors"]
    # A pool of two one-GPU actors, so every actor that ran holds a GPU and sits on the only node
    # that has them (on 12 photos one actor may take every batch); the driver ran on the head.
    assert manifest["inference"]["actors"] == 2 and manifest["inference"]["num_gpus"] == 1.0
    assert actors and all(a["gpu_ids"] in (["0"], ["1"]) for a in actors), actors
    assert sum(a["rows"] for a in actors) == 4 * PER_CLASS
    gpu_node = {a["node"] for a in actors}
    assert len(gpu_node) == 1
    assert manifest["driver_node"] not in gpu_node and sum(manifest["decode_nodes"].values()) == 4 * PER_CLASS
    assert set(manifest["decode_nodes"]) <= gpu_node | {manifest["driver_node"]}, manifest["decode_nodes"]
    assert all(a["precision"] in ("bfloat16", "float32") for a in actors)
    # Every photo exactly once, compared with the keys uploaded (not with the product's own listing).
    rows = [p for split in ("train", "validation") for p in _s3_table(aws, "docs", f"runs/1/features/{split}").column("path").to_pylist()]
    assert sorted(rows) == keys and len(rows) == 4 * PER_CLASS
    # Each model's files, its two epochs and its evaluation of the 6 validation photos, all in the bucket.
    for kind in ("top", "finetune", "scratch"):
        written = s3_keys(aws, "docs", f"runs/1/{kind}")
        assert {"model.keras", "curves.png", "summary.json"} <= set(written), (kind, written)
        assert any(k.startswith("ray_train/") for k in written), written
        epochs = [r["epoch"] for r in csv.DictReader(io.StringIO(s3_read(aws, "docs", f"runs/1/{kind}/metrics.csv").decode()))]
        assert epochs == ["1", "2"], (kind, epochs)
        assert json.loads(s3_read(aws, "docs", f"runs/1/{kind}/evaluation.json"))["num_samples"] == 2 * PER_CLASS

    summary = json.loads(s3_read(aws, "docs", "predictions/1/summary.json"))
    assert summary["num_images"] == 2 * PER_CLASS and summary["evaluation"]["num_samples"] == 2 * PER_CLASS
    predicted = _s3_table(aws, "docs", "predictions/1/predictions").column("path").to_pylist()
    assert sorted(predicted) == sorted(k[len("validation/"):] for k in keys if k.startswith("validation/"))
    assert {a["node"] for a in summary["inference_actors"]} == gpu_node

    # Nothing on local disk: the jobs' working-directory copies hold only what was uploaded, the
    # nodes' TMPDIR holds only Ray's own folders, and their HOME gained nothing but caches.
    uploaded = _uploaded_files()
    for copy in _working_dir_copies(two_nodes["base"]):
        assert _files_under(copy) - uploaded == set(), copy
    # TensorFlow's autograph, Ray and multiprocessing keep their own scratch files in the temp folder.
    scratch = r"__autograph_generated_file\w+\.py|_ray_lockfiles/\w+\.lock|pymp-\w+/listener-\w+"
    leftovers = {f for f in _files_under(two_nodes["tmp"], skip=(os.path.join(two_nodes["tmp"], "ray"),))
                 if not re.fullmatch(scratch, f)}
    assert leftovers == set(), leftovers
    # Libraries' own cache and config folders (Keras, matplotlib's font cache) are allowed there.
    assert set(os.listdir(two_nodes["home"])) - home_before - {".cache", ".keras", ".config"} == set()
