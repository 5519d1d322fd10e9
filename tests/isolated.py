"""Scenarios that need a Ray cluster of their own (logical GPUs, S3 credentials in every worker).

Run as ``python -m tests.isolated <scenario> <args…>``; prints one JSON line with the result.
The session's shared cluster cannot be reconfigured, so these start their own, in a subprocess.
"""

from __future__ import annotations

import json
import sys


def logical_gpus(data_dir: str, output_dir: str) -> dict:
    """Extraction on a CPU-only cluster that declares two logical GPUs."""
    import ray

    from pipeline.config import ExtractConfig
    from pipeline.extract import run_extraction

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, configure_logging=False)
    manifest = run_extraction(ExtractConfig(data_dir=data_dir, output_dir=output_dir, weights="none",
                                            image_size=32, precision="float32", batch_size=2))
    return {"actors": manifest["inference_actors"], "plan": manifest["inference"], "num_images": manifest["num_images"]}


def s3_extract(data_dir: str, uri: str) -> dict:
    """Extraction into an S3 URI (the endpoint and credentials come from the environment)."""
    import ray

    from pipeline.config import ExtractConfig
    from pipeline.extract import run_extraction

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    manifest = run_extraction(ExtractConfig(data_dir=data_dir, output_dir=uri, weights="none", image_size=32,
                                            precision="float32"))
    return {"num_images": manifest["num_images"], "output_dir": manifest["output_dir"]}


def extract(data_dir: str, output_dir: str) -> dict:
    """A plain extraction on a cluster of its own (the environment may carry RIC_FAULT_KILL)."""
    import ray

    from pipeline.config import ExtractConfig
    from pipeline.extract import run_extraction

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    manifest = run_extraction(ExtractConfig(data_dir=data_dir, output_dir=output_dir, weights="none", image_size=32,
                                            precision="float32", batch_size=2))
    return {"num_images": manifest["num_images"], "counts": manifest["counts"]}


def predict(model: str, input_dir: str, output: str) -> dict:
    """A plain prediction on a cluster of its own (the environment may carry RIC_FAULT_KILL)."""
    import ray

    from pipeline.config import PredictConfig
    from pipeline.predict import run_prediction

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    summary = run_prediction(PredictConfig(model=model, input=input_dir, output=output, precision="float32",
                                           batch_size=2))
    return {"num_images": summary["num_images"], "num_rejects": summary["num_rejects"]}


if __name__ == "__main__":
    scenario, *args = sys.argv[1:]
    result = {"logical_gpus": logical_gpus, "s3_extract": s3_extract, "extract": extract,
              "predict": predict}[scenario](*args)
    print("RESULT " + json.dumps(result))
