"""Online prediction: a Ray Serve application that answers ``POST /predict`` as batch prediction
would, for one image or a few.

- ``POST /predict`` with an image's bytes as the body: one JSON object with the fields batch
  prediction writes per row, ``predicted_class``, ``confidence`` and ``prob_<class>``.
- ``POST /predict`` with ``Content-Type: application/json`` and ``{"images": [<base64>, ...]}``:
  ``{"predictions": [...]}`` in the same order; an image that does not decode gets
  ``{"error": <reason>, "detail": ...}`` in its place.
- An undecodable single image: HTTP 400 with the reason; a body over ``--max-upload-mb``:
  HTTP 413. Either way the replica goes on serving.

Each replica decodes with ``pipeline.decode.decode_image`` and predicts with
``pipeline.predict.LoadedClassifier`` (the model file batch prediction loads, padded batches of
the same size), so the two agree on every image. Concurrent requests are batched by
``@serve.batch``; replicas take a GPU each when the cluster has GPUs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from typing import Any

import numpy as np
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from pipeline import logs, storage
from pipeline.cluster import inference_plan
from pipeline.config import ServeConfig
from pipeline.decode import decode_image, rejection
from pipeline.predict import LoadedClassifier, prediction_table

APP_NAME = "image-classifier"
log = logging.getLogger(__name__)


class TooLarge(Exception):
    """A request body over the upload limit."""


@serve.deployment
class ClassifierService:
    """One replica: the model, the decoder, and a batching queue in front of the model."""

    def __init__(self, model: str, precision: str, max_batch_size: int, batch_wait_s: float, max_upload_bytes: int):
        self.classifier = LoadedClassifier(storage.read_bytes(model), precision, max_batch_size)
        self.max_upload_bytes = max_upload_bytes
        self._probabilities.set_max_batch_size(max_batch_size)
        self._probabilities.set_batch_wait_timeout_s(batch_wait_s)

    async def __call__(self, request: Request) -> JSONResponse:
        if request.url.path.rstrip("/") != "/predict":
            return JSONResponse({"error": "not found", "detail": "POST images to /predict"}, status_code=404)
        if request.method != "POST":
            return JSONResponse({"error": "method not allowed", "detail": "POST images to /predict"}, status_code=405)
        try:
            body = await self._body(request)
        except TooLarge as exc:
            return JSONResponse({"error": "too large", "detail": str(exc)}, status_code=413)
        if request.headers.get("content-type", "").startswith("application/json"):
            return await self._predict_json(body)
        answer = await self._answer(body)
        return JSONResponse(answer, status_code=400 if "error" in answer else 200)

    async def _body(self, request: Request) -> bytes:
        """The request body, refused as soon as it passes the limit (declared or streamed)."""
        limit = self.max_upload_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise TooLarge(f"{declared} bytes; the limit is {limit} (--max-upload-mb)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"over {limit} bytes (--max-upload-mb)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _predict_json(self, body: bytes) -> JSONResponse:
        try:
            items = json.loads(body)["images"]
            images = [base64.b64decode(item, validate=True) for item in items]
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            return JSONResponse({"error": "bad request", "detail": f'expected {{"images": [<base64>, ...]}}: {exc}'},
                                status_code=400)
        answers = await asyncio.gather(*(self._answer(data) for data in images))
        return JSONResponse({"predictions": answers})

    async def _answer(self, data: bytes) -> dict[str, Any]:
        """The prediction for one image's bytes, or why they were rejected (as batch prediction records it)."""
        try:
            image = decode_image(data, self.classifier.image_size)
        except Exception as exc:  # noqa: BLE001 - one odd upload is a rejected upload, never a failed replica
            reason, detail = rejection(exc)
            return {"error": reason, "detail": detail}
        return self._row(await self._probabilities(image))

    def _row(self, probs: np.ndarray) -> dict[str, Any]:
        row = prediction_table([""], probs[None, :], self.classifier.classes).to_pylist()[0]
        del row["path"]
        return row

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _probabilities(self, images: list[np.ndarray]) -> list[np.ndarray]:
        # Padded to a power of two, not to the largest batch: a lone request on a CPU must not
        # pay for 32 images, and TensorFlow traces at most log2(max batch) + 1 shapes. In a
        # thread, so the replica keeps taking requests into the next batch meanwhile.
        pad = min(self.classifier.batch_size, 1 << (len(images) - 1).bit_length())
        probs = await asyncio.to_thread(self.classifier.probabilities, np.stack(images), None, pad)
        return list(probs)


def start_server(cfg: ServeConfig) -> str:
    """Deploy the application on the connected cluster and return its ``/predict`` URL."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    plan = inference_plan(cfg.replicas or 1, (cfg.replicas or gpus) if gpus else None)
    actor_options: dict[str, Any] = {"num_cpus": plan.num_cpus, "num_gpus": plan.num_gpus}
    if storage.is_local(cfg.model):
        # Only this node surely has a local model file.
        actor_options["resources"] = {f"node:{ray.util.get_node_ip_address()}": 0.001}
    quiet = {"log_level": "DEBUG" if logs.verbose() else "WARNING", "enable_access_log": logs.verbose()}
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=quiet)
    # Room for two full batches per replica: one being computed, the next filling.
    app = ClassifierService.options(num_replicas=plan.actors, ray_actor_options=actor_options,
                                    max_ongoing_requests=2 * cfg.max_batch_size).bind(
        storage.absolute(cfg.model), cfg.precision, cfg.max_batch_size, cfg.batch_wait_s,
        int(cfg.max_upload_mb * 1024 * 1024))
    serve.run(app, name=APP_NAME, route_prefix="/", logging_config=quiet)
    url = f"http://{cfg.host}:{cfg.port}/predict"
    log.info("serving %s with %d replica(s) at %s", cfg.model, plan.actors, url)
    return url


def stop_server() -> None:
    """Remove the application and stop Ray Serve on the cluster."""
    serve.shutdown()


def serve_until_interrupted(cfg: ServeConfig) -> None:
    """``jobs.serve``: start the application and keep it up until Ctrl-C (or the job is stopped)."""
    start_server(cfg)
    log.info("Ctrl-C stops the server")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        stop_server()
