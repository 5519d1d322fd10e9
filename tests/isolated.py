"""Scenarios that need a Ray cluster of their own (logical GPUs, S3 credentials in every worker).

Run as ``python -m tests.isolated <scenario> <args…>``; prints one JSON line with the result.
The session's shared cluster cannot be reconfigured, so these start their own, in a subprocess.
"""

from __future__ import annotations

import json
import sys


def logical_gpus(data_dir: str, output_dir: str, photo: str) -> dict:
    """On a CPU-only cluster that declares two logical GPUs: the serving job's deployment of a local
    model file answering one photo (then stopped), then an extraction. How many ``inference_actor``
    trace lines serving wrote is returned, so a test can tell its replicas from the extraction's actors."""
    import os
    import urllib.request

    from pipeline.batch.cluster import init_ray
    from pipeline.batch.extract import run_extraction
    from pipeline.config import ExtractConfig, ServeConfig
    from pipeline.nets import models
    from pipeline.nets.modelfile import save_classifier
    from pipeline.serving.server import start_server, stop_server
    from tests.clusters import free_port

    init_ray(local=True, num_cpus=2, num_gpus=2, include_dashboard=False)
    model = os.path.join(os.path.dirname(output_dir), "model.keras")
    save_classifier(models.scratch_cnn(32, 2), model, {"kind": "scratch", "classes": ["cats", "dogs"], "image_size": 32})
    url = start_server(ServeConfig(model=model, port=free_port(), precision="float32"))
    with open(photo, "rb") as f, urllib.request.urlopen(urllib.request.Request(url, data=f.read()), timeout=120) as r:
        answer = json.loads(r.read())
    stop_server()
    with open(os.environ["RIC_FAULT_TRACE"]) as f:
        serving_traced = sum(1 for line in f if json.loads(line)["site"] == "inference_actor")
    manifest = run_extraction(ExtractConfig(data_dir=data_dir, output_dir=output_dir, weights="none",
                                            image_size=32, precision="float32", batch_size=2, block_files=2))
    return {"actors": manifest["inference_actors"], "plan": manifest["inference"], "num_images": manifest["num_images"],
            "answer": answer, "serving_traced": serving_traced}


def s3_extract(data_dir: str, uri: str) -> dict:
    """Extraction into an S3 URI (the endpoint and credentials come from the environment)."""
    from pipeline.batch.cluster import init_ray
    from pipeline.batch.extract import run_extraction
    from pipeline.config import ExtractConfig

    init_ray(local=True, num_cpus=2, include_dashboard=False)
    manifest = run_extraction(ExtractConfig(data_dir=data_dir, output_dir=uri, weights="none", image_size=32,
                                            precision="float32"))
    return {"num_images": manifest["num_images"], "output_dir": manifest["output_dir"]}


def extract(data_dir: str, output_dir: str) -> dict:
    """A plain extraction on a cluster of its own (the environment may carry RIC_FAULT_KILL)."""
    from pipeline.batch.cluster import init_ray
    from pipeline.batch.extract import run_extraction
    from pipeline.config import ExtractConfig

    init_ray(local=True, num_cpus=2, include_dashboard=False)
    manifest = run_extraction(ExtractConfig(data_dir=data_dir, output_dir=output_dir, weights="none", image_size=32,
                                            precision="float32", batch_size=2))
    return {"num_images": manifest["num_images"], "counts": manifest["counts"]}


def predict(model: str, input_dir: str, output: str) -> dict:
    """A plain prediction on a cluster of its own (the environment may carry RIC_FAULT_KILL)."""
    from pipeline.batch.cluster import init_ray
    from pipeline.batch.predict import run_prediction
    from pipeline.config import PredictConfig

    init_ray(local=True, num_cpus=2, include_dashboard=False)
    summary = run_prediction(PredictConfig(model=model, input=input_dir, output=output, precision="float32",
                                           batch_size=2, block_files=2))
    return {"num_images": summary["num_images"], "num_rejects": summary["num_rejects"]}


def train_beside(workdir: str) -> dict:
    """A short top-MLP training on a cluster of its own, started in-process (run while another
    cluster on the machine is recorded as the latest one)."""
    import os
    import tempfile

    import ray

    from pipeline.batch.cluster import init_ray
    from pipeline.batch.extract import run_extraction
    from pipeline.config import ExtractConfig, TrainTopConfig
    from pipeline.training.top import train_top

    # A temp folder of its own, as an in-process cluster beside a `ray start` head has: the
    # machine's record of its latest cluster (under RAY_TMPDIR) then names the other one.
    temp_dir = tempfile.mkdtemp(prefix="ric", dir="/tmp")
    init_ray(local=True, num_cpus=2, include_dashboard=True, _temp_dir=temp_dir)
    features = os.path.join(workdir, "features")
    run_extraction(ExtractConfig(output_dir=features, weights="none", image_size=32, precision="float32",
                                 max_images_per_class=16))
    summary = train_top(TrainTopConfig(features_dir=features, output_dir=workdir, epochs=8, batch_size=4,
                                       precision="float32"))
    # Ray's warning when a process of this cluster looked a cluster up by itself and took the other one.
    logs = [os.path.join(d, f) for d, _, files in os.walk(temp_dir) for f in files if f.endswith((".err", ".out", ".log"))]
    strays = [p for p in logs if "Connecting to latest cluster" in open(p, errors="replace").read()]
    return {"epochs": summary["epochs"], "own_address": ray.get_runtime_context().gcs_address,
            "processes_that_addressed_another_cluster": strays}


if __name__ == "__main__":
    scenario, *args = sys.argv[1:]
    result = {"logical_gpus": logical_gpus, "s3_extract": s3_extract, "extract": extract,
              "predict": predict, "train_beside": train_beside}[scenario](*args)
    print("RESULT " + json.dumps(result))
