"""Per-request progress and cancellation inside the model worker.

The batch runs in a worker thread; the front asks for progress and sends cancellations through
small async APIs on the event loop. ``JobBoard`` is what both sides share, under one lock.
A cancellation may arrive before its job does (still in BentoML's batching queue), so cancelled
ids are remembered for a while even when the board does not know them yet.
"""

from __future__ import annotations

import threading
import time

from runners.protocol.progress import JobProgress, LogLine


class JobBoard:
    MAX_LOGS = 500  # per request: 50 steps and a few lines fit with room
    CANCEL_MEMORY_S = 3600.0

    def __init__(self, clock=time.monotonic):
        self._lock = threading.Lock()
        self._jobs: dict[str, JobProgress] = {}
        self._cancelled: dict[str, float] = {}
        self._clock = clock

    def start(self, request_id: str, message: str) -> None:
        with self._lock:
            self._jobs[request_id] = JobProgress(started=True, logs=[LogLine(message=message)])

    def log(self, request_id: str, message: str) -> None:
        with self._lock:
            job = self._jobs.get(request_id)
            if job is not None and len(job.logs) < self.MAX_LOGS:
                job.logs.append(LogLine(message=message))

    def finish(self, request_id: str) -> list[LogLine]:
        """Forget the job; return its logs."""
        with self._lock:
            self._cancelled.pop(request_id, None)
            job = self._jobs.pop(request_id, None)
        return job.logs if job is not None else []

    def cancel(self, request_id: str) -> None:
        now = self._clock()
        with self._lock:
            self._cancelled = {k: t for k, t in self._cancelled.items() if now - t < self.CANCEL_MEMORY_S}
            self._cancelled[request_id] = now

    def is_cancelled(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._cancelled

    def snapshot(self, request_ids: list[str]) -> dict[str, JobProgress]:
        with self._lock:
            return {i: self._jobs[i].model_copy(deep=True) for i in request_ids if i in self._jobs}
