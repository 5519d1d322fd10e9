"""Running on clusters: cluster.yaml, a real `ray start` head node with `ray job submit`,
logical-GPU sharding, and outputs on an S3-compatible server on loopback."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
pytestmark = pytest.mark.timeout(600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _kill_node(session: subprocess.Popen, temp_dir: str) -> None:
    """Stop exactly the processes of the head node this test started (never `ray stop`, which stops all)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(session.pid, sig)
        except ProcessLookupError:
            pass
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if temp_dir.encode() in f.read():
                        os.kill(int(pid), sig)
            except (OSError, ProcessLookupError):
                continue
        time.sleep(2)


@pytest.fixture
def head_node():
    """A real local head node started with `ray start --head` and token authentication, stopped after."""
    temp_dir = tempfile.mkdtemp(prefix="ric", dir="/tmp")
    port, dashboard = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)
    start = subprocess.Popen(
        [os.path.join(BIN, "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}",
         "--num-cpus=2", f"--temp-dir={temp_dir}", "--include-dashboard=true", "--disable-usage-stats",
         # Every agent port of its own: another Ray instance on this machine (the tests'
         # in-process cluster) already holds the default ones.
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = start.communicate(timeout=120)
        assert start.returncode == 0, out
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        _kill_node(start, temp_dir)


def test_ray_job_submit_runs_extraction_on_a_local_head_node(head_node, real_root, tmp_path):
    out = str(tmp_path / "features")
    cmd = [os.path.join(BIN, "ray"), "job", "submit", "--address", head_node["address"], "--working-dir", REPO,
           "--", "python", "-m", "jobs.extract_features", "--data-dir", real_root, "--weights", "none",
           "--image-size", "32", "--precision", "float32", "--output-dir", out]
    deadline = time.time() + 120
    while True:
        proc = subprocess.run(cmd, env=head_node["env"], cwd=REPO, capture_output=True, text=True, timeout=480)
        # A fresh head node refuses jobs until its dashboard agent has registered.
        if "No available agent" not in proc.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in (proc.stdout + proc.stderr).lower()
    from pipeline.extract import read_split

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


def test_one_inference_actor_per_logical_gpu(real_root, tmp_path):
    result = _isolated("logical_gpus", real_root, str(tmp_path / "out"))
    actors = result["actors"]
    assert result["plan"]["actors"] == 2 and result["plan"]["num_gpus"] == 1.0
    assert len(actors) == 2, actors
    assert {tuple(a["gpu_ids"]) for a in actors} == {("0",), ("1",)}
    assert {a["cuda_visible_devices"] for a in actors} == {"0", "1"}
    assert sum(a["rows"] for a in actors) == result["num_images"] == 40


@pytest.fixture
def s3_server():
    """moto's S3 server on a loopback port, with one bucket; stopped after the test."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="shards")
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_extraction_writes_shards_to_s3(s3_server, real_root):
    result = _isolated("s3_extract", real_root, "s3://shards/runs/1", env=s3_server)
    assert result["num_images"] == 40
    import pyarrow.parquet as pq
    from pyarrow import fs

    s3 = fs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", scheme="http",
                         endpoint_override=s3_server["AWS_ENDPOINT_URL"].split("://")[1])
    assert len(pq.read_table("shards/runs/1/train", filesystem=s3)) == 20
    with s3.open_input_stream("shards/runs/1/manifest.json") as f:
        assert json.loads(f.read())["counts"]["validation"] == {"cats": 10, "dogs": 10}
    assert s3.get_file_info("shards/runs/1.partial").type == fs.FileType.NotFound
