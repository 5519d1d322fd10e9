"""Online prediction: a Ray Serve application that answers ``POST /predict`` as batch prediction
would, for one image's bytes or ``{"images": [<base64>, ...]}``; its answers and refusals (bodies:
``requests``, tokens: ``auth``) are described in docs/jobs.md#serve. A replica survives any upload.

Replicas decode with batch prediction's decoder and predict with its ``LoadedClassifier`` (same
model file, same padded batches), so the two agree on every image; ``@serve.batch`` batches
concurrent requests. Decoding runs in threads, never on the event loop; images over
``LARGE_PIXELS`` (by header) take turns in a pool of one (one decode's memory at a time).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray
from PIL import Image
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from pipeline import logs
from pipeline.batch.cluster import inference_plan
from pipeline.batch.predict import LoadedClassifier, prediction_table
from pipeline.config import ServeConfig
from pipeline.data import storage
from pipeline.images.decode import FORMATS, decode_image, rejection
from pipeline.serving.auth import authorized, check_exposure, read_token, token_digest
from pipeline.serving.requests import Limits, RequestError, parse_body

APP_NAME = "image-classifier"
# A 12-Mpx phone JPEG decodes at a reduced DCT scale in milliseconds; PNGs and the like of this
# size take a tenth of a second or more per 4 Mpx.
LARGE_PIXELS = 4_000_000
log = logging.getLogger(__name__)


@serve.deployment
class ClassifierService:
    """One replica: the model, the decoder, and a batching queue in front of the model."""

    def __init__(self, model: list[ray.ObjectRef], precision: str, max_batch_size: int, batch_wait_s: float,
                 limits: Limits, digest: bytes | None):
        self.classifier = LoadedClassifier(model[0], precision, max_batch_size)
        self.limits = limits
        self.digest = digest
        # Decoders release the GIL, so this pool uses every core. Large images (hundreds of MB each while
        # decoding) take turns in a pool of one: a burst holds one decode's memory, not the small ones' threads.
        self.decoders = ThreadPoolExecutor(len(os.sched_getaffinity(0)), thread_name_prefix="decode")
        self.large_decoders = ThreadPoolExecutor(1, thread_name_prefix="decode-large")
        self._probabilities.set_max_batch_size(max_batch_size)
        self._probabilities.set_batch_wait_timeout_s(batch_wait_s)

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            self._check_route(request)
            body = await self._body(request)
            # Off the event loop as well: a 20 MiB JSON body takes a while to parse.
            parsed = await asyncio.to_thread(parse_body, body, request.headers.get("content-type", ""),
                                             self.limits.max_images)
        except RequestError as exc:
            bearer = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            return JSONResponse({"error": exc.error, "detail": exc.detail}, status_code=exc.status, headers=bearer)
        answers = await asyncio.gather(*(self._answer(data) for data in parsed.images))
        if parsed.batch:
            return JSONResponse({"predictions": answers})
        return JSONResponse(answers[0], status_code=400 if "error" in answers[0] else 200)

    def _check_route(self, request: Request) -> None:
        """Refuse a request for another path or method, or without the token, before reading its body."""
        if not authorized(request.headers.get("authorization", ""), self.digest):
            raise RequestError(401, "unauthorized", "send 'Authorization: Bearer <token>'")
        if request.url.path.rstrip("/") != "/predict":
            raise RequestError(404, "not found", "POST images to /predict")
        if request.method != "POST":
            raise RequestError(405, "method not allowed", "POST images to /predict")

    async def _body(self, request: Request) -> bytes:
        """The request body, refused as soon as it passes the limit (declared or streamed)."""
        limit = self.limits.max_upload_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(413, "too large", f"{declared} bytes; the limit is {limit} (--max-upload-mb)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, "too large", f"over {limit} bytes (--max-upload-mb)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _answer(self, data: bytes) -> dict[str, Any]:
        """The prediction for one image's bytes, or why they were rejected (as batch prediction records it)."""
        try:
            # Even reading a header can take a while (Pillow inflates a PNG's text chunks first).
            pool = self.large_decoders if await asyncio.to_thread(_pixels, data) > LARGE_PIXELS else self.decoders
            image = await asyncio.get_running_loop().run_in_executor(pool, self._decode, data)
        except Exception as exc:  # noqa: BLE001 - one odd upload is a rejected upload, never a failed replica
            reason, detail = rejection(exc)
            return {"error": reason, "detail": detail}
        return self._row(await self._probabilities(image))

    def _decode(self, data: bytes) -> np.ndarray:
        """``decode_image`` with the replica's pixel cap (in a decoder thread)."""
        return decode_image(data, self.classifier.image_size, max_pixels=self.limits.max_pixels)

    def _row(self, probs: np.ndarray) -> dict[str, Any]:
        row = prediction_table([""], probs[None, :], self.classifier.classes).to_pylist()[0]
        del row["path"]
        return row

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _probabilities(self, images: list[np.ndarray]) -> list[np.ndarray]:
        # Padded to a power of two: a lone request must not pay for a full batch, and TensorFlow traces
        # at most log2(max batch) + 1 shapes. In a thread, so requests keep filling the next batch.
        pad = min(self.classifier.batch_size, 1 << (len(images) - 1).bit_length())
        probs = await asyncio.to_thread(self.classifier.probabilities, np.stack(images), None, pad)
        return list(probs)


def _pixels(data: bytes) -> int:
    """Width x height as the image's header declares them (0 without a header the decoder can read)."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            return im.size[0] * im.size[1]
    except Exception:  # noqa: BLE001 - the decoder refuses the upload, with the reason
        return 0


def start_server(cfg: ServeConfig) -> str:
    """Deploy the application on the connected cluster and return its ``/predict`` URL."""
    token = read_token(cfg.auth_token_file)
    check_exposure(cfg.host, token, cfg.insecure)  # also when called without the job's preflight
    gpus = int(ray.cluster_resources().get("GPU", 0))
    plan = inference_plan(cfg.replicas or 1, (cfg.replicas or gpus) if gpus else None)
    # The model file travels once, through the object store, so replicas run on any node (each on its GPU),
    # also those that cannot see a local file; in a list, so the reference reaches them unresolved.
    model = [ray.put(storage.read_bytes(cfg.model))]
    actor_options = {"num_cpus": plan.num_cpus, "num_gpus": plan.num_gpus}
    quiet = {"log_level": "DEBUG" if logs.verbose() else "WARNING", "enable_access_log": logs.verbose()}
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=quiet)
    # Room for two full batches per replica: one being computed, the next filling.
    app = ClassifierService.options(num_replicas=plan.actors, ray_actor_options=actor_options,
                                    max_ongoing_requests=2 * cfg.max_batch_size).bind(
        model, cfg.precision, cfg.max_batch_size, cfg.batch_wait_s,
        Limits(int(cfg.max_upload_mb * 1024 * 1024), cfg.max_images_per_request, round(cfg.max_image_megapixels * 1e6)),
        token_digest(token))
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
