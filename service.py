"""BentoML wiring and HTTP shapes of the fal-compatible FLUX inpainting server.

Two services, because fal's body is one flat JSON object while a BentoML batchable API takes a
list: ``FluxInpainting`` (the HTTP front) answers fal's routes, validates inputs and keeps the
request queue (runners/queue.py); its feeders call ``InpaintWorker.inpaint`` with one job each, and
BentoML's adaptive-batching dispatcher in the worker gathers concurrent jobs into one call.
The model work lives in ``runners/``.

    bentoml serve service:FluxInpainting      # or: make serve
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

import anyio.to_thread
import bentoml
from pydantic import BaseModel, Field

from runners.config import load_settings
from runners.errors import ModelNotReady, WorkerUnavailable
from runners.fal_http import FalApi
from runners.fetch import HostPolicy, SafeFetcher
from runners.jobs import InpaintJob, JobResult, fal_output, prepare_job
from runners.ledger import JobLedger
from runners.lifecycle import drain_on_sigterm
from runners.logs import configure_logging
from runners.lora_sources import LoraSources
from runners.model import TINY_WARNING
from runners.progress import JobBoard, JobProgress
from runners.queue import Outcome, Record, RequestQueue, Status
from runners.store import make_store
from runners.webhooks import deliver, webhook_body

log = logging.getLogger("flux_inpaint")
SETTINGS = load_settings()  # every process reads the same environment; bad values fail here
configure_logging(SETTINGS.server.log_format)  # ours: one JSON line per event (BentoML's keep theirs)
MODEL_LABEL = (
    "tiny (random weights)" if SETTINGS.model.is_tiny
    else f"{SETTINGS.model.model} (random weights)" if SETTINGS.model.random_architecture
    else SETTINGS.model.model
)

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
# Gauges under BentoML's multiprocess Prometheus: "livesum" adds up the live processes (only the front
# sets them) into one unlabelled series per pod, which is what an autoscaler averages.
QUEUE_DEPTH = bentoml.metrics.Gauge(
    name="flux_queue_depth", documentation="Requests accepted and waiting for the model (not yet in flight)",
    multiprocess_mode="livesum",
)
IN_FLIGHT = bentoml.metrics.Gauge(
    name="flux_in_flight", documentation="Requests handed to the model and not finished", multiprocess_mode="livesum"
)
REJECTIONS = bentoml.metrics.Counter(
    name="flux_rejections",
    documentation="Requests refused or stopped before an answer, by reason (queue_full, draining, timeout, ...)",
    labelnames=["reason"],
)
STEP_SECONDS = bentoml.metrics.Histogram(
    name="flux_step_seconds",
    documentation="Seconds per denoising step of a batch (one transformer forward and the update)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8),
)
STAGE_SECONDS = bentoml.metrics.Histogram(
    name="flux_stage_seconds",
    documentation="Seconds per request in each stage: preprocess, inference, decode, total",
    labelnames=["stage"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
)
LORA_CACHE = bentoml.metrics.Counter(
    name="flux_lora_cache",
    documentation="LoRA lookups by cache (memory: loaded adapters; disk: downloaded files) and result",
    labelnames=["cache", "result"],
)
LORA_DOWNLOADS = bentoml.metrics.Counter(name="flux_lora_downloads", documentation="LoRA files downloaded")
LORA_DOWNLOAD_BYTES = bentoml.metrics.Counter(name="flux_lora_download_bytes", documentation="Bytes of LoRA files downloaded")
LORA_LOAD_SECONDS = bentoml.metrics.Counter(
    name="flux_lora_load_seconds", documentation="Seconds spent reading and checking LoRA files into adapters"
)


class CounterFeed:
    """Publishes the growth of cumulative counts (kept by the caches) to Prometheus counters."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def publish(self, counts: dict[str, float], counters: dict) -> None:
        for key, counter in counters.items():
            grown = counts.get(key, 0) - self.last.get(key, 0)
            if grown > 0:
                counter.inc(grown)
            self.last[key] = counts.get(key, 0)


class ProgressReport(BaseModel):
    jobs: dict[str, JobProgress] = Field(default_factory=dict)


@bentoml.service(name="flux_inpaint_worker", workers=1, traffic={"timeout": SETTINGS.batching.timeout_s})
class InpaintWorker:
    """Owns the model. Loads it in the background so health probes answer during a long load."""

    def __init__(self) -> None:
        self.inpainter = None
        self.load_error: str | None = None
        self.ready = threading.Event()
        self.board = JobBoard()
        self.lora_feed = CounterFeed()
        self.front_done = asyncio.Event()  # set by the front at the end of its drain
        self.ledger = JobLedger()  # a job the front sends twice (a retried call) runs once
        threading.Thread(target=self._load, name="model-load", daemon=True).start()
        if not drain_on_sigterm(self._drain, "model worker"):
            log.warning("SIGTERM cannot be handled in this process: stopping will not wait for the front")

    async def _drain(self) -> None:
        """Keep serving after SIGTERM: the front drains its queue through us, and says when it is
        done (``front_drained``). If it never does (it crashed), stop after its drain time."""
        import asyncio

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.front_done.wait(), SETTINGS.server.drain_timeout_s + 10)

    def _load(self) -> None:
        from runners.batch import load_inpainter

        try:
            self.inpainter = load_inpainter(SETTINGS)
            self.ready.set()
            log.info("model ready: %s", MODEL_LABEL)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("model failed to load; the worker stays unready")

    def __is_ready__(self) -> bool:
        return self.ready.is_set()

    def __is_alive__(self) -> bool:
        # A model that failed to load will not load by waiting: let the orchestrator restart us.
        return self.load_error is None

    @bentoml.api(batchable=True, max_batch_size=SETTINGS.batching.max_size, max_latency_ms=SETTINGS.batching.max_latency_ms)
    def inpaint(self, jobs: list[InpaintJob]) -> list[JobResult]:
        from runners.batch import run_jobs

        if not self.ready.is_set():
            reason = f"model failed to load ({self.load_error})" if self.load_error else "model is still loading"
            return [JobResult.failed(job.request_id, ModelNotReady(reason)) for job in jobs]
        BATCH_SIZE.observe(len(jobs))
        started = time.perf_counter()
        results = self.ledger.run(jobs, lambda fresh: run_jobs(self.inpainter, fresh, self.board))
        if (adapters := self.inpainter.model.adapters) is not None:
            stats = adapters.stats
            self.lora_feed.publish(
                {"hits": stats.hits, "misses": stats.misses, "seconds": stats.load_seconds},
                {"hits": LORA_CACHE.labels(cache="memory", result="hit"),
                 "misses": LORA_CACHE.labels(cache="memory", result="miss"), "seconds": LORA_LOAD_SECONDS},
            )
        DENOISE_SECONDS.observe(inference := max((r.timings.get("inference", 0.0) for r in results), default=0.0))
        steps = max((sum(line.message.startswith("step ") for line in r.logs) for r in results), default=0)
        if steps:
            STEP_SECONDS.observe(inference / steps)  # the batch's mean step
        log.info("batch of %d request(s) in %.2f s [model=%s]", len(jobs), time.perf_counter() - started, MODEL_LABEL)
        return results

    # async: these run on the event loop, not behind the thread that is running a batch
    @bentoml.api
    async def progress(self, request_ids: list[str]) -> ProgressReport:
        return ProgressReport(jobs=self.board.snapshot(request_ids))

    @bentoml.api
    async def cancel(self, request_id: str) -> bool:
        self.board.cancel(request_id)
        return True

    @bentoml.api
    async def front_drained(self) -> bool:
        """The front has finished or failed all its work (SIGTERM): this worker may exit now."""
        self.front_done.set()
        return True


class WorkerExecutor:
    """How the front's queue reaches the worker (runners.queue.Executor)."""

    def __init__(self, worker, fetcher: SafeFetcher, store, sources: LoraSources | None) -> None:
        self.worker, self.fetcher, self.store, self.sources = worker, fetcher, store, sources
        self.lora_feed = CounterFeed()

    async def _call(self, api: str, *args):
        """A worker API call, tried once more when the connection fails before an answer: BentoML's
        client reuses pooled keep-alive connections that the worker's server closes when idle, and
        such a request never reached the worker. Still failing: the worker is unavailable (503)."""
        import aiohttp

        for attempt in (1, 2):
            try:
                return await getattr(self.worker.to_async, api)(*args)
            except aiohttp.ClientConnectionError as exc:
                if attempt == 2:
                    log.warning("worker %s call failed twice: %s", api, exc)
                    raise WorkerUnavailable("the model worker is not reachable; retry shortly") from None
                log.info("worker %s call lost its connection (%s); trying again", api, exc)

    async def run(self, record: Record) -> Outcome:
        started = time.perf_counter()
        try:
            job = await prepare_job(
                record.request, SETTINGS.images, record.id, self.fetcher, self.sources, SETTINGS.lora.max_per_request,
                deadline=record.deadline,
            )
        finally:
            if self.sources is not None:
                self.lora_feed.publish(self.sources.stats, {
                    "hits": LORA_CACHE.labels(cache="disk", result="hit"),
                    "misses": LORA_CACHE.labels(cache="disk", result="miss"),
                    "downloads": LORA_DOWNLOADS, "download_bytes": LORA_DOWNLOAD_BYTES,
                })
        if record.status == Status.COMPLETED:  # ended (cancelled, hung up, out of time) while we prepared it
            raise record.error
        result = await self.infer(job)
        if result.error is not None:
            raise result.error.as_exception()
        output = await anyio.to_thread.run_sync(
            fal_output, job, result, time.perf_counter() - started, self.store, record.base_url
        )
        log.info(
            "request %s done: %dx%d, %d image(s), %d steps, %.2f s [model=%s]", record.id, job.width, job.height,
            len(output.images), record.request.num_inference_steps, output.timings["total"], MODEL_LABEL,
        )
        for stage, seconds in output.timings.items():
            STAGE_SECONDS.labels(stage=stage).observe(seconds)
        return Outcome(output=output.model_dump(), logs=result.logs, inference_time=result.timings.get("inference", 0.0))

    async def infer(self, job: InpaintJob) -> JobResult:
        """The one step that differs between executors: the job to the model, its result back."""
        try:
            (result,) = await self._call("inpaint", [job])
        except bentoml.exceptions.BentoMLException as exc:
            log.warning("request %s: worker call failed: %s", job.request_id, exc)
            if int(getattr(exc, "error_code", 500)) in (429, 503):
                raise WorkerUnavailable("the model worker is overloaded or restarting; retry shortly") from None
            raise
        return result if isinstance(result, JobResult) else JobResult.model_validate(result)

    async def cancel(self, request_id: str) -> None:
        await self._call("cancel", request_id)

    async def progress(self, request_ids: list[str]) -> dict[str, JobProgress]:
        report = await self._call("progress", request_ids)
        return (report if isinstance(report, ProgressReport) else ProgressReport.model_validate(report)).jobs


class TritonExecutor(WorkerExecutor):
    """FLUX_EXECUTOR=triton: the same path with the model on a Triton server; only ``infer`` differs.
    Triton reports no step progress and cannot stop a running request (runners/triton_executor.py)."""

    def __init__(self, client, fetcher: SafeFetcher, store, sources: LoraSources | None) -> None:
        super().__init__(None, fetcher, store, sources)
        self.client = client

    async def infer(self, job: InpaintJob) -> JobResult:
        return await self.client.infer(job)

    async def cancel(self, request_id: str) -> None:
        await self.client.cancel(request_id)

    async def progress(self, request_ids: list[str]) -> dict[str, JobProgress]:
        return await self.client.progress(request_ids)


app = FalApi(
    context=bentoml.get_current_service,
    settings=SETTINGS,
    reject=lambda reason: (REJECTIONS.labels(reason=reason).inc(), REQUESTS.labels(outcome=reason).inc()),
    model_label=MODEL_LABEL,
).app()


@bentoml.service(name="flux_inpaint", traffic={"timeout": SETTINGS.batching.timeout_s})
@bentoml.asgi_app(app, path="/")
class FluxInpainting:
    """The fal-compatible HTTP front."""

    if SETTINGS.executor.executor == "in-process":  # on Triton the model is not ours: no worker process
        worker = bentoml.depends(InpaintWorker)

    def __init__(self) -> None:
        if SETTINGS.model.is_tiny:
            log.warning(TINY_WARNING)
        if not SETTINGS.server.api_keys:
            log.warning("FLUX_API_KEYS is not set: the API is open to anyone who can reach it")
        self.fetcher = SafeFetcher(HostPolicy(SETTINGS.server.allow_private_hosts), SETTINGS.fetch)
        self.store = make_store(SETTINGS.store, SETTINGS.model.cache_dir)
        self.last_sweep = time.monotonic()
        sources = LoraSources(SETTINGS.lora, self.fetcher, SETTINGS.model.cache_dir) if SETTINGS.lora.max_per_request else None
        concurrency = SETTINGS.queue.concurrency or 2 * SETTINGS.batching.max_size
        self.queue = RequestQueue(
            SETTINGS.queue, concurrency, self._executor(sources),
            on_finish=self._finished, request_timeout_s=SETTINGS.server.request_timeout_s, on_change=self._gauge,
        )
        self._gauge(self.queue)  # the gauges exist (at 0) from the first scrape on
        if not drain_on_sigterm(self._drain, "front"):
            log.warning("SIGTERM cannot be handled in this process: stopping will not drain the queue")

    async def __is_ready__(self) -> bool:
        if self.queue.draining:  # readiness goes false on SIGTERM, so traffic moves elsewhere
            return False
        return self.triton is None or await self.triton.ready()  # Triton's /v2/health/ready, cached

    async def _drain(self) -> None:
        await self.queue.drain(SETTINGS.server.drain_timeout_s)
        if self.triton is None:  # the worker serves the drain; now it may go too
            with contextlib.suppress(Exception):
                await self.worker.to_async.front_drained()

    @staticmethod
    def _gauge(queue: RequestQueue) -> None:
        QUEUE_DEPTH.set(queue.waiting)
        IN_FLIGHT.set(queue.in_flight)

    def _executor(self, sources: LoraSources | None) -> WorkerExecutor:
        if SETTINGS.executor.executor == "triton":
            from runners.triton_executor import TritonClient

            self.triton = TritonClient(SETTINGS.executor)
            log.info("model tier: Triton at %s (model %s)", SETTINGS.executor.triton_url, SETTINGS.executor.triton_model)
            return TritonExecutor(self.triton, self.fetcher, self.store, sources)
        self.triton = None
        return WorkerExecutor(self.worker, self.fetcher, self.store, sources)

    async def _finished(self, record: Record) -> None:
        REQUESTS.labels(outcome="success" if record.error is None else record.error.error_type).inc()
        if record.webhook_url:
            error = record.error.to_body() if record.error is not None else None
            output = record.outcome.output if record.outcome is not None else None
            await deliver(self.fetcher, record.webhook_url, webhook_body(record.id, output, error), SETTINGS.webhook)
        if time.monotonic() - self.last_sweep > 60:  # expired outputs free their disk space
            self.last_sweep = time.monotonic()
            try:
                await anyio.to_thread.run_sync(self.store.sweep)
            except OSError:
                log.exception("could not sweep expired outputs")

    @bentoml.on_shutdown
    async def _stop_queue(self) -> None:
        await self.queue.stop()
        if self.triton is not None:
            await self.triton.close()
