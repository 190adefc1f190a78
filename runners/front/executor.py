"""How the front's queue reaches the model: one ``Executor`` over a small ``ModelClient`` interface,
with one client per model tier (the BentoML worker here, Triton in runners/front/triton_client.py).

The executor does what is the same on every tier: prepare the job (fetch, decode, LoRA files),
hand it to the model, store the outputs and build fal's answer. Only the client differs.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import anyio.to_thread

from runners.errors import WorkerUnavailable
from runners.front.metrics import LORA_CACHE, LORA_DOWNLOAD_BYTES, LORA_DOWNLOADS, STAGE_SECONDS
from runners.front.preparation import fal_output, prepare_job
from runners.front.queue import Outcome, Record, Status
from runners.metrics import CounterFeed
from runners.protocol.jobs import InpaintJob, JobResult
from runners.protocol.progress import JobProgress

log = logging.getLogger(__name__)


class ModelClient(Protocol):
    """A model tier as the front sees it. ``infer`` raises ``InpaintError`` for what is not the
    job's own fault (overload: 429, unavailable: 503); a job's own failure is in its result."""

    async def infer(self, job: InpaintJob) -> JobResult: ...
    async def cancel(self, request_id: str) -> None: ...
    async def progress(self, request_ids: list[str]) -> dict[str, JobProgress]: ...
    async def ready(self) -> bool: ...
    async def drained(self) -> None: ...  # the front's drain is over: the tier may stop
    async def close(self) -> None: ...


class Executor:
    """runners.front.queue.Executor: a record's whole trip through a model tier."""

    def __init__(self, client: ModelClient, settings, fetcher, store, sources, model_label: str) -> None:
        self.client, self.settings, self.fetcher, self.store, self.sources = client, settings, fetcher, store, sources
        self.model_label = model_label
        self.lora_feed = CounterFeed()
        self._worker_ids: dict[str, str] = {}  # request id -> the id its current attempt has at the model

    @staticmethod
    def worker_id(record: Record) -> str:
        """The id the model tier knows this attempt by. A re-run (``attempt`` > 1) gets its own: a
        worker that saw the first attempt remembers that id (its ledger answers a repeat from the
        first run, its board keeps a cancel for an hour), and would answer the re-run with the
        first attempt's end instead of running it."""
        return record.id if record.attempt <= 1 else f"{record.id}-attempt-{record.attempt}"

    async def run(self, record: Record) -> Outcome:
        self._worker_ids[record.id] = self.worker_id(record)
        try:
            return await self._run(record)
        finally:
            self._worker_ids.pop(record.id, None)

    async def _run(self, record: Record) -> Outcome:
        started = time.perf_counter()
        try:
            job = await prepare_job(
                record.request,
                self.settings.images,
                record.id,
                self.fetcher,
                self.sources,
                deadline=record.deadline,
            )
        finally:
            if self.sources is not None:
                self.lora_feed.publish(
                    self.sources.stats,
                    {
                        "hits": LORA_CACHE.labels(cache="disk", result="hit"),
                        "misses": LORA_CACHE.labels(cache="disk", result="miss"),
                        "downloads": LORA_DOWNLOADS,
                        "download_bytes": LORA_DOWNLOAD_BYTES,
                    },
                )
        if record.status == Status.COMPLETED:  # ended (cancelled, hung up, out of time) while we prepared it
            raise record.error
        worker_id = self._worker_ids[record.id]
        result = await self.client.infer(
            job if worker_id == job.request_id else job.model_copy(update={"request_id": worker_id})
        )
        if result.error is not None:
            raise result.error.as_exception()
        output = await anyio.to_thread.run_sync(
            fal_output, job, result, time.perf_counter() - started, self.store, record.base_url
        )
        log.info(
            "request %s done: %dx%d, %d image(s), %d steps, %.2f s [model=%s]",
            record.id,
            job.width,
            job.height,
            len(output.images),
            record.request.num_inference_steps,
            output.timings["total"],
            self.model_label,
        )
        for stage, seconds in output.timings.items():
            STAGE_SECONDS.labels(stage=stage).observe(seconds)
        return Outcome(
            output=output.model_dump(), logs=result.logs, inference_time=result.timings.get("inference", 0.0)
        )

    async def cancel(self, request_id: str) -> None:
        await self.client.cancel(self._worker_ids.get(request_id, request_id))

    async def progress(self, request_ids: list[str]) -> dict[str, JobProgress]:
        asked = {self._worker_ids.get(i, i): i for i in request_ids}
        return {asked[key]: report for key, report in (await self.client.progress(list(asked))).items() if key in asked}


def connection_lost(exc: BaseException) -> bool:
    """Whether a worker call failed because its connection dropped. aiohttp says so with a
    ``ClientConnectionError`` when the connection drops before the answer, but with a bare
    ``RuntimeError("Connection closed.")`` (aiohttp/streams.py) when it drops while the answer's body
    is read, after the job ran: under load that one failed requests with a 500. Sending the job again
    is safe either way: the worker's ledger (runners/worker/ledger.py) answers a repeat from its
    first run."""
    import aiohttp

    if isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
        return True
    return isinstance(exc, RuntimeError) and str(exc) == "Connection closed."


class BentoWorkerClient:
    """The in-process tier: the model worker service, through BentoML's ``depends`` handle."""

    def __init__(self, worker, continuous: bool = False) -> None:
        self.worker = worker
        self.continuous = continuous  # FLUX_BATCHING=continuous: one call per job into the step engine

    async def _call(self, api: str, *args):
        """A worker API call, tried once more when its connection drops (``connection_lost``): BentoML's
        client reuses pooled keep-alive connections that the worker's server closes when idle, and
        such a request never reached the worker (bentoml/BentoML#4971; the fix proposed upstream,
        bentoml/BentoML#5698, shortens the pool's keep-alive and retries once, as here). Still
        failing: the worker is unavailable (503, ``retry_elsewhere``: another replica's may answer)."""
        for attempt in (1, 2):
            try:
                return await getattr(self.worker.to_async, api)(*args)
            except Exception as exc:
                if not connection_lost(exc):
                    raise
                if attempt == 2:
                    log.warning("worker %s call failed twice: %s", api, exc)
                    raise WorkerUnavailable("the model worker is not reachable; retry shortly") from None
                log.info("worker %s call lost its connection (%s); trying again", api, exc)

    async def infer(self, job: InpaintJob) -> JobResult:
        import bentoml

        try:
            if self.continuous:
                result = await self._call("inpaint_one", job)
            else:
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
        from runners.protocol.progress import ProgressReport

        report = await self._call("progress", request_ids)
        return (report if isinstance(report, ProgressReport) else ProgressReport.model_validate(report)).jobs

    async def ready(self) -> bool:
        return True  # BentoML gates the front's readiness on its dependencies' own

    async def drained(self) -> None:
        await self._call("front_drained")

    async def close(self) -> None:
        pass
