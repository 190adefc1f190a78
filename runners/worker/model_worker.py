"""The model worker process around the loop: loads the model in the background (so health probes
answer during a long load), runs each batch BentoML's dispatcher hands it through the ledger (a job
sent twice runs once), and answers progress and cancel from the job board. service.py's
``InpaintWorker`` is this object's BentoML face."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time

from runners.config import Settings
from runners.errors import ModelNotReady
from runners.lifecycle import drain_on_sigterm
from runners.metrics import LORA_CACHE, CounterFeed
from runners.protocol.jobs import InpaintJob, JobResult
from runners.protocol.progress import ProgressReport
from runners.worker.board import JobBoard
from runners.worker.ledger import JobLedger
from runners.worker.metrics import BATCH_SIZE, DENOISE_SECONDS, LORA_LOAD_SECONDS, STEP_SECONDS

log = logging.getLogger(__name__)


class ModelWorker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
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
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.front_done.wait(), self.settings.server.drain_timeout_s + 10)

    def _load(self) -> None:
        from runners.worker.batch import load_inpainter

        try:
            self.inpainter = load_inpainter(self.settings)
            self.ready.set()
            log.info("model ready: %s", self.settings.model.label)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            # Waiting will not load it: exit, and service.py's BENTOML_CONTAINERIZED makes BentoML's
            # arbiter stop the whole server with an error instead of respawning this process, so
            # `bentoml serve` ends non-zero with this reason above it and Kubernetes restarts the pod.
            log.exception("model failed to load (%s): stopping the server", self.load_error)
            logging.shutdown()  # flush every handler: os._exit skips that
            os._exit(3)

    @property
    def alive(self) -> bool:
        # A model that failed to load will not load by waiting: let the orchestrator restart us.
        return self.load_error is None

    def inpaint(self, jobs: list[InpaintJob]) -> list[JobResult]:
        from runners.worker.batch import run_jobs

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
                {
                    "hits": LORA_CACHE.labels(cache="memory", result="hit"),
                    "misses": LORA_CACHE.labels(cache="memory", result="miss"),
                    "seconds": LORA_LOAD_SECONDS,
                },
            )
        DENOISE_SECONDS.observe(inference := max((r.timings.get("inference", 0.0) for r in results), default=0.0))
        steps = max((sum(line.message.startswith("step ") for line in r.logs) for r in results), default=0)
        if steps:
            STEP_SECONDS.observe(inference / steps)  # the batch's mean step
        log.info(
            "batch of %d request(s) in %.2f s [model=%s]",
            len(jobs),
            time.perf_counter() - started,
            self.settings.model.label,
        )
        return results

    def progress(self, request_ids: list[str]) -> ProgressReport:
        return ProgressReport(jobs=self.board.snapshot(request_ids))

    def cancel(self, request_id: str) -> None:
        self.board.cancel(request_id)
