"""Real Ray nodes and a real S3 server for the cluster tests, all on this machine, all stopped after.

Nodes are started with `ray start` in their own session and temp folder; stopping them kills
exactly their processes (never `ray stop`, which would stop every Ray cluster on the machine).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
RAY = os.path.join(BIN, "ray")


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the nodes and clients: token auth on, this venv first on PATH."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": BIN + os.pathsep + os.environ.get("PATH", ""), **(extra or {})}
    env.pop("RAY_ADDRESS", None)
    return env


def _agent_ports() -> list[str]:
    # Every agent port of its own: other Ray instances on this machine (the tests'
    # in-process cluster, the other node) already hold the default ones.
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


def _ray_start(args: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run([RAY, "start", *args, "--disable-usage-stats", *_agent_ports()], env=env,
                          start_new_session=True, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def kill_processes_of(temp_dir: str) -> None:
    """Stop every process whose command line names ``temp_dir`` (the nodes started there)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if temp_dir.encode() in f.read():
                        os.kill(int(pid), sig)
            except (OSError, ProcessLookupError):
                continue
        time.sleep(2)


@contextlib.contextmanager
def local_cluster(temp_dir: str, env: dict[str, str], head_cpus: int = 2,
                  worker: dict[str, int] | None = None) -> Iterator[dict[str, str]]:
    """A head node (and optionally a second node with ``worker`` = {"cpus": C, "gpus": G}) on this
    machine; yields the dashboard address and the GCS address."""
    port, dashboard = free_port(), free_port()
    # The second node gets a temp folder of its own, as on a real cluster: two nodes sharing
    # one would share (and garbage-collect) each other's unpacked job working directories.
    node_dir = temp_dir + "-node2"
    try:
        _ray_start(["--head", f"--port={port}", f"--dashboard-port={dashboard}", f"--num-cpus={head_cpus}",
                    f"--temp-dir={temp_dir}", "--include-dashboard=true"], env)
        if worker:
            _ray_start([f"--address=127.0.0.1:{port}", f"--num-cpus={worker['cpus']}",
                        f"--num-gpus={worker['gpus']}", f"--temp-dir={node_dir}"], env)
        yield {"address": f"http://127.0.0.1:{dashboard}", "gcs": f"127.0.0.1:{port}"}
    finally:
        kill_processes_of(temp_dir)  # also matches node_dir, which starts with it


def submit(address: str, env: dict[str, str], argv: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """`ray job submit` of ``argv`` with the repository as working dir; retried while a fresh
    head has no dashboard agent registered yet."""
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", REPO, "--", *argv]
    deadline = time.time() + 120
    while True:
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in proc.stderr or time.time() > deadline:
            return proc
        time.sleep(3)


@contextlib.contextmanager
def s3_server(buckets: tuple[str, ...]) -> Iterator[dict[str, str]]:
    """moto's S3 server on a loopback port with ``buckets``; yields the AWS_* environment for it."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        client = s3_client(env)
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


def s3_client(env: dict[str, str]):
    """A boto3 S3 client for the server ``env`` describes (independent of the product's pyarrow code)."""
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])


def upload_tree(env: dict[str, str], local_root: str, bucket: str, prefix: str) -> list[str]:
    """Upload every file under ``local_root`` to ``s3://bucket/prefix/…``; returns the keys relative to prefix."""
    client = s3_client(env)
    keys = []
    for dirpath, _, files in os.walk(local_root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), local_root)
            client.upload_file(os.path.join(dirpath, name), bucket, f"{prefix}/{rel}")
            keys.append(rel)
    return sorted(keys)


def s3_keys(env: dict[str, str], bucket: str, prefix: str) -> list[str]:
    """Every key under ``s3://bucket/prefix/``, relative to the prefix."""
    client = s3_client(env)
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        keys += [o["Key"][len(prefix) + 1:] for o in page.get("Contents", [])]
    return sorted(keys)


def s3_read(env: dict[str, str], bucket: str, key: str) -> bytes:
    """The bytes of one object."""
    return s3_client(env).get_object(Bucket=bucket, Key=key)["Body"].read()
