"""BentoML wiring and HTTP shapes of the fal-compatible FLUX inpainting server.

Two services, because fal's body is one flat JSON object while a BentoML batchable API takes a
list: ``FluxInpainting`` (the HTTP front) answers fal's routes, validates and decodes inputs, and
calls ``InpaintWorker.inpaint`` with one job; BentoML's adaptive-batching dispatcher in the worker
gathers concurrent jobs into one call. The model work lives in ``runners/``.

    bentoml serve service:FluxInpainting      # or: make serve
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import anyio.to_thread
import bentoml
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse

from runners.config import load_settings
from runners.errors import (
    InpaintError,
    InvalidField,
    ModelNotReady,
    RequestTooLarge,
    WorkerUnavailable,
    validation_error_body,
)
from runners.jobs import InpaintJob, JobResult, fal_output, prepare_job
from runners.model import TINY_WARNING
from runners.schema import InpaintRequest

log = logging.getLogger("flux_inpaint")
# BentoML configures its own loggers only; ours go through the same handlers at INFO.
for _name in ("flux_inpaint", "runners"):
    logging.getLogger(_name).setLevel(logging.INFO)
SETTINGS = load_settings()  # every process reads the same environment; bad values fail here
MODEL_LABEL = "tiny (random weights)" if SETTINGS.model.is_tiny else SETTINGS.model.model
ROUTE = "/fal-ai/flux-lora/inpainting"

BATCH_SIZE = bentoml.metrics.Histogram(
    name="flux_batch_size",
    documentation="Requests handed to the model worker in one adaptive batch",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
)
DENOISE_SECONDS = bentoml.metrics.Histogram(
    name="flux_denoise_seconds",
    documentation="Seconds spent in the denoising loop per batch",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
)
REQUESTS = bentoml.metrics.Counter(
    name="flux_requests",
    documentation="Inpainting requests by outcome (success or error_type)",
    labelnames=["outcome"],
)


@bentoml.service(
    name="flux_inpaint_worker",
    workers=1,
    traffic={"timeout": SETTINGS.batching.timeout_s},
)
class InpaintWorker:
    """Owns the model. Loads it in the background so health probes answer during a long load."""

    def __init__(self) -> None:
        self.inpainter = None
        self.load_error: str | None = None
        self.ready = threading.Event()
        threading.Thread(target=self._load, name="model-load", daemon=True).start()

    def _load(self) -> None:
        from runners.inpaint import Inpainter
        from runners.model import load_model

        try:
            self.inpainter = Inpainter(load_model(SETTINGS.model))
            if SETTINGS.model.warmup:
                self._warm_up()
            self.ready.set()
            log.info("model ready: %s", MODEL_LABEL)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("model failed to load; the worker stays unready")

    def _warm_up(self) -> None:
        from PIL import Image

        from runners.batch import run_jobs
        from runners.images import encode_lossless

        started = time.perf_counter()
        job = InpaintJob(
            request_id="warm-up",
            request=InpaintRequest(prompt="warm-up", image_url="-", mask_url="-", num_inference_steps=2),
            width=256,
            height=256,
            seed=0,
            image_png=encode_lossless(Image.new("RGB", (256, 256), (127, 127, 127))),
            mask_png=encode_lossless(Image.new("L", (256, 256), 255)),
        )
        result = run_jobs(self.inpainter, [job])[0]
        if result.error is not None:
            raise RuntimeError(f"warm-up inference failed: {result.error.detail}")
        log.info("warm-up inference done in %.2f s", time.perf_counter() - started)

    def __is_ready__(self) -> bool:
        return self.ready.is_set()

    def __is_alive__(self) -> bool:
        # A model that failed to load will not load by waiting: let the orchestrator restart us.
        return self.load_error is None

    @bentoml.api(
        batchable=True,
        max_batch_size=SETTINGS.batching.max_size,
        max_latency_ms=SETTINGS.batching.max_latency_ms,
    )
    def inpaint(self, jobs: list[InpaintJob]) -> list[JobResult]:
        from runners.batch import run_jobs

        if not self.ready.is_set():
            reason = f"model failed to load ({self.load_error})" if self.load_error else "model is still loading"
            return [JobResult.failed(job.request_id, ModelNotReady(reason)) for job in jobs]
        BATCH_SIZE.observe(len(jobs))
        started = time.perf_counter()
        results = run_jobs(self.inpainter, jobs, progress=_log_progress)
        DENOISE_SECONDS.observe(max((r.timings.get("inference", 0.0) for r in results), default=0.0))
        log.info("batch of %d request(s) in %.2f s [model=%s]", len(jobs), time.perf_counter() - started, MODEL_LABEL)
        return results


def _log_progress(job: InpaintJob, done: int, total: int) -> None:
    log.debug("request %s step %d/%d", job.request_id, done, total)


app = Starlette()


@bentoml.service(name="flux_inpaint", traffic={"timeout": SETTINGS.batching.timeout_s})
@bentoml.asgi_app(app, path="/")
class FluxInpainting:
    """The fal-compatible HTTP front."""

    worker = bentoml.depends(InpaintWorker)

    def __init__(self) -> None:
        if SETTINGS.model.is_tiny:
            log.warning(TINY_WARNING)


def error_response(status: int, body: dict, request_id: str) -> JSONResponse:
    """Every error answer: fal's body, its error-type header, and a retry hint on 503."""
    headers = {"x-fal-request-id": request_id, "x-fal-error-type": body["error_type"]}
    if status == 503:
        headers["Retry-After"] = "5"
    return JSONResponse(body, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing past ``limit`` bytes without reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"request body is over this server's limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestTooLarge(f"request body is over this server's limit of {limit} bytes")
    return bytes(body)


async def call_worker(service, job: InpaintJob) -> JobResult:
    """One job through the worker's batchable API (where BentoML batches it with others)."""
    try:
        (result,) = await service.worker.to_async.inpaint([job])
    except bentoml.exceptions.BentoMLException as exc:
        status = int(getattr(exc, "error_code", 500))
        log.warning("request %s: worker call failed with %s: %s", job.request_id, status, exc)
        if status in (429, 503):
            raise WorkerUnavailable("the model worker is overloaded or restarting; retry shortly") from None
        raise
    return result if isinstance(result, JobResult) else JobResult.model_validate(result)


async def inpaint_route(request: Request) -> JSONResponse:
    request_id = str(uuid.uuid4())
    started = time.perf_counter()
    service = bentoml.get_current_service()
    try:
        body = await read_body(request, SETTINGS.images.max_body_bytes)
        try:
            fal_request = InpaintRequest.model_validate_json(body)
        except ValidationError as exc:
            REQUESTS.labels(outcome="validation_error").inc()
            log.info("request %s rejected: invalid fields %s", request_id, [e["loc"] for e in exc.errors()])
            return error_response(422, validation_error_body(exc.errors()), request_id)
        if fal_request.loras:
            raise InvalidField("loras", "LoRAs are not supported by this server version yet")
        job = await anyio.to_thread.run_sync(prepare_job, fal_request, SETTINGS.images, request_id)
        result = await call_worker(service, job)
        if result.error is not None:
            raise result.error.as_exception()
    except InpaintError as exc:
        REQUESTS.labels(outcome=exc.error_type).inc()
        log.info("request %s failed: %s %s [model=%s]", request_id, exc.status, exc.error_type, MODEL_LABEL)
        return error_response(exc.status, exc.to_body(), request_id)
    except Exception:
        REQUESTS.labels(outcome="internal_error").inc()
        log.exception("request %s failed with an unexpected error", request_id)
        return error_response(500, InpaintError("internal server error").to_body(), request_id)
    output = fal_output(job, result, time.perf_counter() - started)
    REQUESTS.labels(outcome="success").inc()
    log.info(
        "request %s done: %dx%d, %d image(s), %d steps, %.2f s [model=%s]",
        request_id, job.width, job.height, len(output.images), fal_request.num_inference_steps,
        output.timings["total"], MODEL_LABEL,
    )
    headers = {"x-fal-request-id": request_id, "x-flux-model": MODEL_LABEL}
    return JSONResponse(output.model_dump(), headers=headers)


app.add_route(ROUTE, inpaint_route, methods=["POST"])
