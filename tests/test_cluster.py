"""Running on clusters: cluster.yaml, a real `ray start` head node with `ray job submit`,
logical-GPU sharding, and outputs on an S3-compatible server on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

from tests.clusters import BIN, REPO, cluster_env, free_port, local_cluster, s3_server, submit

pytestmark = pytest.mark.timeout(600)


def test_cluster_yaml_validates_against_rays_schema():
    import jsonschema
    import ray
    import yaml

    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as f:
        schema = json.load(f)
    with open(os.path.join(REPO, "cluster.yaml")) as f:
        config = yaml.safe_load(f)
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types and types["gpu_workers"]["max_workers"] >= 1
    assert any('".[gpu]"' in c for c in config["setup_commands"])
    broken = {**config, "max_wokers": 3}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


@pytest.fixture
def head_node():
    """A real local head node started with `ray start --head` and token authentication, stopped after."""
    temp_dir = tempfile.mkdtemp(prefix="ric", dir="/tmp")
    env = cluster_env()
    with local_cluster(temp_dir, env) as cluster:
        yield {**cluster, "env": env}


def test_ray_job_submit_runs_extraction_on_a_local_head_node(head_node, real_root, tmp_path):
    out = str(tmp_path / "features")
    proc = submit(head_node["address"], head_node["env"], [
        "python", "-m", "jobs.extract_features", "--data-dir", real_root, "--weights", "none", "--image-size", "32",
        "--precision", "float32", "--output-dir", out], timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in (proc.stdout + proc.stderr).lower()
    from pipeline.data.shards import read_split

    assert len(read_split(out, "train")) == 20 and len(read_split(out, "validation")) == 20
    # Without the cluster's token the same cluster refuses the client.
    env = {k: v for k, v in head_node["env"].items() if k != "RAY_AUTH_TOKEN"}
    env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "no-token")
    refused = subprocess.run([os.path.join(BIN, "ray"), "job", "list", "--address", head_node["address"]],
                             env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()


def _isolated(scenario: str, *args: str, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.isolated", scenario, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=480)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow  # starts a cluster of its own in a subprocess
def test_one_inference_actor_and_one_serving_replica_per_logical_gpu(real_root, tmp_path):
    traced = tmp_path / "trace.jsonl"
    photo = os.path.join(real_root, "validation", "cats", sorted(os.listdir(os.path.join(real_root, "validation", "cats")))[0])
    # Ray Data waits for both actors before the first block (an actor still loading when one alone has
    # taken every block would be dropped unseen), and the trace shows every actor that started: on a loaded
    # machine the manifest (actors that wrote rows) may still list only one.
    result = _isolated("logical_gpus", real_root, str(tmp_path / "out"), photo,
                       env={**os.environ, "RIC_FAULT_TRACE": str(traced),
                            "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300"})
    started = [json.loads(line) for line in traced.read_text().splitlines()]
    started = [a for a in started if a["site"] == "inference_actor"]
    # Serving first: one replica of the local model file per GPU, each on its own, and an answer.
    replicas, actors = started[:result["serving_traced"]], started[result["serving_traced"]:]
    assert len(replicas) == 2 and {tuple(a["gpu_ids"]) for a in replicas} == {("0",), ("1",)}, replicas
    assert result["answer"]["predicted_class"] in ("cats", "dogs")
    assert result["plan"]["actors"] == 2 and result["plan"]["num_gpus"] == 1.0
    assert len(actors) == 2, actors
    assert {tuple(a["gpu_ids"]) for a in actors} == {("0",), ("1",)}
    assert {a["cuda_visible_devices"] for a in actors} == {"0", "1"}
    assert {a["pid"] for a in result["actors"]} <= {a["pid"] for a in actors}
    assert sum(a["rows"] for a in result["actors"]) == result["num_images"] == 40


@pytest.fixture
def s3_env():
    """moto's S3 server on a loopback port with a bucket ``shards``; stopped after the test."""
    with s3_server(("shards",)) as aws:
        yield {**os.environ, **aws}


def test_extraction_writes_shards_to_s3(s3_env, real_root):
    result = _isolated("s3_extract", real_root, "s3://shards/runs/1", env=s3_env)
    assert result["num_images"] == 40
    import pyarrow.parquet as pq
    from pyarrow import fs

    s3 = fs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", scheme="http",
                         endpoint_override=s3_env["AWS_ENDPOINT_URL"].split("://")[1])
    assert len(pq.read_table("shards/runs/1/train", filesystem=s3)) == 20
    with s3.open_input_stream("shards/runs/1/manifest.json") as f:
        assert json.loads(f.read())["counts"]["validation"] == {"cats": 10, "dogs": 10}
    # A finished output has its ledger folded into one file and no entries left.
    assert s3.get_file_info("shards/runs/1/ledger.parquet").type == fs.FileType.File
    assert s3.get_file_info("shards/runs/1/_ledger").type == fs.FileType.NotFound
    assert len(pq.read_table("shards/runs/1/ledger.parquet", filesystem=s3)) == 40


@pytest.mark.slow  # starts a job process (it must fail before any work, but it is a job)
@pytest.mark.parametrize("where", ["recorded by ray start", "RAY_ADDRESS"])
def test_an_unreachable_cluster_fails_fast_naming_it(tmp_path, where):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if where == "RAY_ADDRESS":
        env["RAY_ADDRESS"] = address
    else:
        # A head node killed without `ray stop` leaves its address in Ray's temp folder.
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(address)
        env["RAY_TMPDIR"] = str(tmp_path)
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "jobs.extract_features", "--weights", "none",
                           "--output-dir", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert address in proc.stderr and "ray stop" in proc.stderr and "RAY_ADDRESS=local" in proc.stderr
    assert time.time() - started < 60


def test_gpus_that_never_join_are_a_clear_error(ray_cluster, real_root, tmp_path):
    from pipeline.batch.cluster import ClusterError
    from pipeline.batch.extract import run_extraction
    from pipeline.config import ExtractConfig

    out = tmp_path / "out"
    with pytest.raises(ClusterError, match=r"--gpus 1: the cluster still has 0 GPU\(s\) after 3 s"):
        run_extraction(ExtractConfig(data_dir=real_root, output_dir=str(out), weights="none", gpus=1, gpu_wait_s=3))
    # Nothing was extracted and nothing looks finished: a rerun once the GPUs are there starts the work.
    assert not (out / "manifest.json").exists() and not (out / "train").exists()
