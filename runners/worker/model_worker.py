"""The model worker process around the loop: loads the model in the background (so health probes
answer during a long load), runs jobs through the ledger (a job sent twice runs once), and answers
progress and cancel from the job board. service.py's ``InpaintWorker`` is this object's BentoML face.

Two ways in, by ``FLUX_BATCHING``: ``adaptive``: ``inpaint`` runs each batch BentoML's dispatcher
hands it (runners/worker/adaptive.py); ``continuous``: ``inpaint_one`` hands one job to the step engine
(runners/worker/engine.py) and awaits it on the event loop, so arrivals reach the running loop while
it runs (BentoML's dispatcher runs one batch call at a time per process; a plain async API does not
go through it)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable

from runners.config import Settings
from runners.errors import ModelNotReady
from runners.lifecycle import drain_on_sigterm
from runners.lifecycle import exit_process as end_this_process
from runners.metrics import LORA_CACHE, CounterFeed
from runners.protocol.jobs import InpaintJob, JobResult
from runners.protocol.progress import ProgressReport
from runners.worker.board import JobBoard
from runners.worker.ledger import JobLedger
from runners.worker.metrics import (
    BATCH_SIZE,
    COMPILES,
    DENOISE_SECONDS,
    LORA_LOAD_SECONDS,
    MODEL_BYTES,
    SAMPLES_PER_FORWARD,
    STEP_SECONDS,
)

log = logging.getLogger(__name__)


class ModelWorker:
    # The exit status of a worker whose model cannot load (BentoML's arbiter then stops the server).
    LOAD_FAILED_EXIT = 3

    def __init__(self, settings: Settings, exit_process: Callable[[int], object] | None = None) -> None:
        self.settings = settings
        # the model loads in a thread, where sys.exit would end only that thread
        self.exit_process = exit_process or end_this_process
        self.inpainter = None
        self.engine = None  # the step engine, in continuous mode, once the model is ready
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
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.front_done.wait(), self.settings.server.drain_timeout_s + 10)

    def _load(self) -> None:
        from runners.backends.compiled import on_compile
        from runners.worker.loading import load_inpainter

        on_compile(COMPILES.inc)  # from the warm-up on: an operator sees any recompile while serving
        try:
            inpainter = load_inpainter(self.settings)
            inpainter.on_forward = self._forward_done
            for component, nbytes in inpainter.model.component_bytes.items():
                MODEL_BYTES.labels(component=component).set(nbytes)
            if self.settings.batching.mode == "continuous":
                from runners.worker.engine import StepEngine

                self.engine = StepEngine(inpainter, self.board, self.settings.batching)
            self.inpainter = inpainter
            self.ready.set()
            log.info("model ready: %s", self.settings.model.label)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            # Waiting will not load it: exit, and service.py's BENTOML_CONTAINERIZED makes BentoML's
            # arbiter stop the whole server with an error instead of respawning this process, so
            # `bentoml serve` ends non-zero with this reason above it and Kubernetes restarts the pod.
            log.exception("model failed to load (%s): stopping the server", self.load_error)
            self.exit_process(self.LOAD_FAILED_EXIT)

    @property
    def alive(self) -> bool:
        # A model that failed to load will not load by waiting: let the orchestrator restart us.
        return self.load_error is None

    @staticmethod
    def _forward_done(samples: int, seconds: float) -> None:
        SAMPLES_PER_FORWARD.observe(samples)
        STEP_SECONDS.observe(seconds)

    def _not_ready(self, job: InpaintJob) -> JobResult | None:
        if self.ready.is_set():
            return None
        reason = f"model failed to load ({self.load_error})" if self.load_error else "model is still loading"
        return JobResult.failed(job.request_id, ModelNotReady(reason))

    def inpaint(self, jobs: list[InpaintJob]) -> list[JobResult]:
        """A batch from BentoML's dispatcher (adaptive mode; in continuous mode its jobs go to the engine)."""
        from runners.worker.adaptive import run_jobs

        if not self.ready.is_set():
            return [self._not_ready(job) for job in jobs]
        BATCH_SIZE.observe(len(jobs))
        started = time.perf_counter()
        if self.engine is not None:
            engine = self.engine
            results = self.ledger.run(jobs, lambda fresh: [f.result() for f in [engine.submit(j) for j in fresh]])
        else:
            results = self.ledger.run(jobs, lambda fresh: run_jobs(self.inpainter, fresh, self.board))
        self._publish_lora_stats()
        DENOISE_SECONDS.observe(max((r.timings.get("inference", 0.0) for r in results), default=0.0))
        log.info(
            "batch of %d request(s) in %.2f s [model=%s]",
            len(jobs),
            time.perf_counter() - started,
            self.settings.model.label,
        )
        return results

    async def inpaint_one(self, job: InpaintJob) -> JobResult:
        """One job through the step engine (continuous mode), awaited without holding a thread."""
        if (refused := self._not_ready(job)) is not None:
            return refused
        if self.engine is None:
            raise RuntimeError("inpaint_one needs FLUX_BATCHING=continuous")
        engine = self.engine
        result = await self.ledger.run_one(job, lambda j: asyncio.wrap_future(engine.submit(j)))
        self._publish_lora_stats()
        DENOISE_SECONDS.observe(result.timings.get("inference", 0.0))
        return result

    def _publish_lora_stats(self) -> None:
        if (adapters := self.inpainter.model.adapters) is not None:
            stats = adapters.stats
            self.lora_feed.publish(
                {"hits": stats.hits, "misses": stats.misses, "seconds": stats.load_seconds},
                {
                    "hits": LORA_CACHE.labels(cache="memory", result="hit"),
                    "misses": LORA_CACHE.labels(cache="memory", result="miss"),
                    "seconds": LORA_LOAD_SECONDS,
                },
            )

    def progress(self, request_ids: list[str]) -> ProgressReport:
        return ProgressReport(jobs=self.board.snapshot(request_ids))

    def cancel(self, request_id: str) -> None:
        self.board.cancel(request_id)
