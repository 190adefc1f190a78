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
        self._clock = clock

    def run(self, jobs: list[InpaintJob], runner, wait_s: float = 3600.0) -> list[JobResult]:
        """``runner(fresh_jobs) -> results`` for the jobs this worker has not seen; everyone's results in order."""
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
        repeats = len(jobs) - len(fresh)
        if repeats:
            log.warning("%d job(s) arrived again (a retried worker call): answering from their first run", repeats)
        try:
            results = runner(fresh) if fresh else []
            with self._lock:
                for job, result in zip(fresh, results):
                    self._done[job.request_id] = (self._clock(), result)
        finally:
            with self._lock:
                for job in fresh:
                    self._running.pop(job.request_id).set()
        answers = []
        for job in jobs:
            with self._lock:
                running = self._running.get(job.request_id)
            if running is not None:
                running.wait(wait_s)
            with self._lock:
                kept = self._done.get(job.request_id)
            answers.append(
                kept[1]
                if kept
                else JobResult.failed(job.request_id, InferenceFailed("the model failed while running this request"))
            )
        return answers

    def _forget_old(self) -> None:
        now = self._clock()
        while self._done:
            oldest_id, (finished, _) = next(iter(self._done.items()))
            if now - finished < self.KEEP_S and len(self._done) <= self.MAX_KEPT:
                break
            del self._done[oldest_id]
