"""Worker side: each request id runs once, however often the front sends it.

BentoML's client retries nothing itself; the front (service.py) sends a job again when its
connection to the worker drops before the answer, because a pooled keep-alive connection the
worker closed while idle fails that way before the worker ever sees the request. But a connection
can also drop while the answer is on its way, after the job ran. This ledger makes the retry safe
in both cases: a repeat waits for the first run's result, or is answered from it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from runners.errors import InferenceFailed
from runners.protocol.jobs import InpaintJob, JobResult

log = logging.getLogger(__name__)


class JobLedger:
    """Results of the jobs this worker ran, by request id, for ``KEEP_S`` (at most ``MAX_KEPT``)."""

    # A retry comes within seconds; results hold encoded images, so keep few, briefly.
    KEEP_S = 60.0
    MAX_KEPT = 32

    def __init__(self, clock=time.monotonic):
        self._lock = threading.Lock()
        self._running: dict[str, threading.Event] = {}
        self._done: OrderedDict[str, tuple[float, JobResult]] = OrderedDict()
        self._pending: dict = {}  # request id -> asyncio task of a run_one (touched on the event loop only)
        self._clock = clock

    def run(self, jobs: list[InpaintJob], runner, wait_s: float = 3600.0) -> list[JobResult]:
        """``runner(fresh_jobs) -> results`` for the jobs this worker has not seen; everyone's results in order."""
        fresh = self._claim(jobs)
        try:
            results = runner(fresh) if fresh else []
            self._keep(fresh, results)
        finally:
            self._release(fresh)
        return [self._answer(job, wait_s) for job in jobs]

    async def run_one(self, job: InpaintJob, runner, wait_s: float = 3600.0) -> JobResult:
        """``await runner(job) -> result`` if this worker has not seen the job, else the first run's
        result (continuous batching: one call per job, awaited on the event loop). The run is a task
        of its own: a caller that goes away (its connection dropped) does not stop it, and a repeat
        awaits the same task without holding a thread."""
        import asyncio

        if (pending := self._pending.get(job.request_id)) is not None:
            log.warning("job %s arrived again (a retried worker call): awaiting its first run", job.request_id)
        elif self._claim([job]):
            pending = self._pending[job.request_id] = asyncio.ensure_future(self._run_and_keep(job, runner))
        if pending is not None:
            return await asyncio.shield(pending)
        return await asyncio.to_thread(self._answer, job, wait_s)  # it ran (or runs) through ``run``

    async def _run_and_keep(self, job: InpaintJob, runner) -> JobResult:
        try:
            result = await runner(job)
            self._keep([job], [result])
            return result
        finally:
            self._release([job])
            self._pending.pop(job.request_id, None)

    def _claim(self, jobs: list[InpaintJob]) -> list[InpaintJob]:
        """The jobs not running nor run yet, now marked running."""
        with self._lock:
            self._forget_old()
            fresh = list(
                {
                    j.request_id: j
                    for j in jobs
                    if j.request_id not in self._running and j.request_id not in self._done
                }.values()
            )
            for job in fresh:
                self._running[job.request_id] = threading.Event()
        if repeats := len(jobs) - len(fresh):
            log.warning("%d job(s) arrived again (a retried worker call): answering from their first run", repeats)
        return fresh

    def _keep(self, jobs: list[InpaintJob], results: list[JobResult]) -> None:
        with self._lock:
            for job, result in zip(jobs, results):
                self._done[job.request_id] = (self._clock(), result)

    def _release(self, jobs: list[InpaintJob]) -> None:
        with self._lock:
            for job in jobs:
                self._running.pop(job.request_id).set()

    def _answer(self, job: InpaintJob, wait_s: float) -> JobResult:
        with self._lock:
            running = self._running.get(job.request_id)
        if running is not None:
            running.wait(wait_s)
        with self._lock:
            kept = self._done.get(job.request_id)
        if kept:
            return kept[1]
        return JobResult.failed(job.request_id, InferenceFailed("the model failed while running this request"))

    def _forget_old(self) -> None:
        now = self._clock()
        while self._done:
            oldest_id, (finished, _) = next(iter(self._done.items()))
            if now - finished < self.KEEP_S and len(self._done) <= self.MAX_KEPT:
                break
            del self._done[oldest_id]
