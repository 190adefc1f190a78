"""BentoML wiring of the fal-compatible FLUX inpainting server: two services, the ASGI mount and the
health hooks. The work lives in runners/ (docs/architecture.md):

- ``FluxInpainting``, the HTTP front (runners.front): fal's routes, validation, the request queue.
- ``InpaintWorker``, the model worker (runners.worker): one process owns the model. With
  ``FLUX_BATCHING=continuous`` the front calls ``inpaint_one``, a plain async API (BentoML's
  dispatcher runs one batch call at a time per process; this bypasses it, so a request reaches the
  step engine while a batch is running); with ``adaptive``, BentoML's adaptive-batching dispatcher
  gathers the front's one-job ``inpaint`` calls into batches.

Two services, because fal's body is one flat JSON object while a BentoML batchable API takes a list.

    bentoml serve service:FluxInpainting      # or: make serve
"""

from __future__ import annotations

import os

import bentoml

from runners.config import load_settings
from runners.front.app import Front, model_client
from runners.front.fal_http import FalApi
from runners.front.metrics import reject
from runners.lifecycle import keep_bentoml_sockets_through_the_drain
from runners.logs import configure_logging
from runners.protocol.jobs import InpaintJob, JobResult
from runners.protocol.progress import ProgressReport
from runners.worker.model_worker import ModelWorker

# BentoML's own container setting (its Dockerfile sets it), here for every way the server starts: a
# process that exits is not respawned, and the arbiter then stops the whole server with an error. A
# worker whose model cannot load exits (runners/worker/model_worker.py), so `bentoml serve` ends
# non-zero instead of serving unready forever, and Kubernetes restarts the pod.
os.environ.setdefault("BENTOML_CONTAINERIZED", "true")
keep_bentoml_sockets_through_the_drain()  # so that the front can reach its worker while it drains

SETTINGS = load_settings()  # every process reads the same environment; bad values fail here
configure_logging(SETTINGS.server.log_format)  # ours: one JSON line per event (BentoML's keep theirs)


@bentoml.service(name="flux_inpaint_worker", workers=1, traffic={"timeout": SETTINGS.batching.timeout_s})
class InpaintWorker:
    """Owns the model (runners.worker.model_worker.ModelWorker)."""

    def __init__(self) -> None:
        self.worker = ModelWorker(SETTINGS)

    def __is_ready__(self) -> bool:
        return self.worker.ready.is_set()

    def __is_alive__(self) -> bool:
        return self.worker.alive

    @bentoml.api(
        batchable=True, max_batch_size=SETTINGS.batching.max_size, max_latency_ms=SETTINGS.batching.max_latency_ms
    )
    def inpaint(self, jobs: list[InpaintJob]) -> list[JobResult]:
        return self.worker.inpaint(jobs)

    @bentoml.api
    async def inpaint_one(self, job: InpaintJob) -> JobResult:
        """Continuous batching: one job into the running step engine, answered when it is done."""
        return await self.worker.inpaint_one(job)

    # async: these run on the event loop, not behind the thread that is running a batch
    @bentoml.api
    async def progress(self, request_ids: list[str]) -> ProgressReport:
        return self.worker.progress(request_ids)

    @bentoml.api
    async def cancel(self, request_id: str) -> bool:
        self.worker.cancel(request_id)
        return True

    @bentoml.api
    async def front_drained(self) -> bool:
        """The front has finished or failed all its work (SIGTERM): this worker may exit now."""
        self.worker.front_done.set()
        return True


app = FalApi(
    context=lambda: bentoml.get_current_service().front,
    settings=SETTINGS,
    reject=reject,
    model_label=SETTINGS.model.label,
).app()


@bentoml.service(name="flux_inpaint", traffic={"timeout": SETTINGS.batching.timeout_s})
@bentoml.asgi_app(app, path="/")
class FluxInpainting:
    """The fal-compatible HTTP front (runners.front.app.Front)."""

    if SETTINGS.executor.executor == "in-process":  # on Triton the model is not ours: no worker process
        worker = bentoml.depends(InpaintWorker)

    def __init__(self) -> None:
        self.front = Front(SETTINGS, model_client(SETTINGS, getattr(self, "worker", None)))

    async def __is_ready__(self) -> bool:
        return await self.front.ready()

    @bentoml.on_shutdown
    async def _stop_queue(self) -> None:
        await self.front.stop()
