"""The in-process request queue (runners/front/queue.py's ``RequestQueue``), the default.

A FIFO in this process's memory, a fixed number of feeder tasks that hand records to the model
tier, and a poller that asks the tier for the progress of dispatched requests, so status answers
IN_PROGRESS with "step i/N" logs without each client poll reaching the worker. State is bounded in
length and retention, and lost on restart (docs/fleet.md puts it in Redis instead).

Limits: at most ``concurrency`` requests in flight at the model and ``max_length`` waiting (429
past it); every request has a deadline (the worker stops its loop there; the queue fails it here
if the worker has not answered shortly after); ``drain`` refuses new work and lets accepted work
finish for a grace period, then fails what is left, so no accepted request ends unreported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable

from runners.config import DEADLINE_GRACE_S, QueueSettings
from runners.errors import InpaintError, QueueFull, RequestCancelled, RequestTimedOut, ServerDraining
from runners.front.queue import AfterFinish, Executor, Outcome, Record, RequestQueue, Status, finished_line
from runners.logs import REQUEST_ID
from runners.protocol.progress import LogLine
from runners.protocol.schema import InpaintRequest

log = logging.getLogger(__name__)


class MemoryQueue:
    """``RequestQueue`` in this process's memory."""

    replicas = 1
    POLL_INTERVAL_S = 0.25
    # The worker stops a request at its next step boundary, but a step or a decode can be long.
    DEADLINE_GRACE_S = DEADLINE_GRACE_S

    def __init__(
        self,
        settings: QueueSettings,
        concurrency: int,
        executor: Executor,
        on_finish: Callable[[Record], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        request_timeout_s: float | None = None,
        on_change: Callable[[RequestQueue], None] | None = None,
    ):
        self.settings = settings
        self.concurrency = concurrency
        self.executor = executor
        self.on_finish = on_finish
        self.clock = clock
        self.request_timeout_s = request_timeout_s
        self.on_change = on_change  # metrics: called whenever ``waiting`` or ``in_flight`` may have changed
        self.draining = False
        self._after_finish = AfterFinish(on_finish)
        self._pending: deque[Record] = deque()
        self._records: dict[str, Record] = {}
        self._finished: OrderedDict[str, Record] = OrderedDict()  # oldest first, for retention
        self._busy = 0  # feeders waiting on the worker
        self._wakeup: asyncio.Condition | None = None
        self._tasks: list[asyncio.Task] = []

    # life cycle: started lazily inside the server's event loop
    def ensure_started(self) -> None:
        if self._tasks:
            return
        self._wakeup = asyncio.Condition()
        self._tasks = [asyncio.create_task(self._feed(), name=f"feeder-{i}") for i in range(self.concurrency)]
        self._tasks.append(asyncio.create_task(self._poll(), name="progress-poller"))

    async def stop(self) -> None:
        """Shut down: whatever is still unfinished (no drain ran, or it was cut short) ends with 503
        ``server_draining``, so no caller waits forever."""
        self.draining = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        await self._fail_unfinished()

    async def drain(self, timeout_s: float) -> None:
        """Stop taking work; wait up to ``timeout_s`` for accepted requests to finish, then fail
        the rest (503 ``server_draining`` to their callers and webhooks); then wait for webhook
        deliveries still under way, for what is left of the time (at least 5 s). Cancelling it (a
        second SIGTERM) fails the rest at once."""
        self.draining = True
        until = time.monotonic() + timeout_s
        try:
            while self._unfinished() and time.monotonic() < until:
                await asyncio.sleep(0.1)
            await self._fail_unfinished()
            await self._after_finish.wait(max(5.0, until - time.monotonic()))
        except asyncio.CancelledError:
            log.warning("drain cut short")
            await self._fail_unfinished()

    def _unfinished(self) -> list[Record]:
        return [r for r in self._records.values() if r.status != Status.COMPLETED]

    async def _fail_unfinished(self) -> None:
        if unfinished := self._unfinished():
            log.warning("%d request(s) unfinished at shutdown; failing them (503 server_draining)", len(unfinished))
        for record in unfinished:
            await self.end(record, ServerDraining("the server shut down before this request finished; retry"))

    # what the routes call
    @property
    def waiting(self) -> int:
        """Requests accepted and not yet handed to the model."""
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        """Requests handed to the model and not finished."""
        return self._busy

    async def submit(self, request: InpaintRequest, base_url: str, webhook_url: str | None = None) -> Record:
        if self.draining:
            raise ServerDraining()
        self.ensure_started()
        self._forget_expired()
        if len(self._pending) >= self.settings.max_length:
            raise QueueFull(f"the queue is full ({self.settings.max_length} requests waiting); retry shortly")
        deadline = time.time() + self.request_timeout_s if self.request_timeout_s else None
        record = Record(request=request, base_url=base_url, webhook_url=webhook_url, deadline=deadline)
        if record.size + sum(r.size for r in self._pending) > self.settings.max_waiting_bytes:
            raise QueueFull("the queue holds as many input bytes as it keeps; retry shortly")
        record.front_logs.append(LogLine(message="queued", source="queue"))
        self._records[record.id] = record
        self._pending.append(record)
        self._changed()
        async with self._wakeup:
            self._wakeup.notify()
        return record

    @property
    def oldest_wait_s(self) -> float:
        return max(0.0, time.time() - self._pending[0].submitted_at) if self._pending else 0.0

    async def get(self, request_id: str) -> Record | None:
        self._forget_expired()
        return self._records.get(request_id)

    async def position(self, record: Record) -> int:
        try:
            return self._pending.index(record)
        except ValueError:
            return 0

    async def wait(self, record: Record) -> Record:
        await record.done.wait()
        return record

    async def cancel(self, request_id: str) -> str:
        record = await self.get(request_id)
        if record is None:
            return "NOT_FOUND"
        if record.status == Status.COMPLETED:
            return "ALREADY_COMPLETED"
        await self.end(record, RequestCancelled())
        return "CANCELLATION_REQUESTED"

    async def end(self, record: Record, error: InpaintError) -> None:
        if record in self._pending:
            self._pending.remove(record)
            self._changed()
        elif record.dispatched:
            try:
                await self.executor.cancel(record.id)
            except Exception:
                log.warning("request %s: could not tell the model to stop it", record.id, exc_info=True)
        self._finish(record, error=error)

    # internals
    async def _feed(self) -> None:
        while True:
            async with self._wakeup:
                await self._wakeup.wait_for(lambda: bool(self._pending))
                record = self._pending.popleft()
            REQUEST_ID.set(record.id)  # this feeder task's log lines belong to this request now
            if record.deadline is not None and time.time() > record.deadline:
                self._changed()
                self._finish(record, error=RequestTimedOut.while_waiting())
                continue
            self._busy += 1
            self._changed()
            # IN_PROGRESS from here, as fal's once a runner takes it (the Redis queue and Triton say the
            # same): the poller adds the worker's "step i/N" lines, but a short request can finish
            # between two of its polls.
            record.status, record.dispatched = Status.IN_PROGRESS, True
            try:
                outcome = await self.executor.run(record)
            except InpaintError as exc:
                self._finish(record, error=exc)
            except asyncio.CancelledError:
                self._finish(record, error=ServerDraining("the server shut down before this request finished; retry"))
                raise
            except Exception:
                log.exception("request %s failed unexpectedly", record.id)
                self._finish(record, error=InpaintError("internal server error"))
            else:
                self._finish(record, outcome=outcome)
            finally:
                self._busy -= 1
                self._changed()
                REQUEST_ID.set(None)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    def _finish(self, record: Record, outcome: Outcome | None = None, error: InpaintError | None = None) -> None:
        if record.status == Status.COMPLETED:  # e.g. cancelled while the worker was still busy with it
            return
        record.status = Status.COMPLETED
        record.outcome, record.error = outcome, error
        # Kept for status and result only: drop the input images (data URIs can be tens of MB).
        record.request = record.request.without_images()
        if outcome is not None:
            record.worker_logs = outcome.logs
        record.front_logs.append(finished_line(error))
        record.finished_at = self.clock()
        self._finished[record.id] = record
        record.done.set()
        self._after_finish.start(record)

    async def _poll(self) -> None:
        last_warning = 0.0
        while True:
            await asyncio.sleep(self.POLL_INTERVAL_S)
            try:
                await self._enforce_deadlines()
                running = [r for r in self._records.values() if r.dispatched and r.status != Status.COMPLETED]
                progress = await self.executor.progress([r.id for r in running]) if running else {}
            except Exception as exc:  # the poller must outlive a worker outage: no deadlines otherwise
                if time.monotonic() - last_warning > 30:  # one line per outage, not four a second
                    log.warning("could not read progress from the worker: %s", exc)
                    last_warning = time.monotonic()
                continue
            for record in running:
                report = progress.get(record.id)
                if report is not None and report.started and record.status != Status.COMPLETED:
                    record.status = Status.IN_PROGRESS
                    record.worker_logs = report.logs

    async def _enforce_deadlines(self) -> None:
        """Waiting requests end at their deadline; running ones are stopped by the worker at a step
        boundary, and failed here only if no answer came ``DEADLINE_GRACE_S`` later."""
        now = time.time()
        for record in list(self._records.values()):
            if record.status == Status.COMPLETED or record.deadline is None:
                continue
            grace = self.DEADLINE_GRACE_S if record.dispatched else 0.0
            if now > record.deadline + grace:
                await self.end(record, RequestTimedOut())

    def _forget_expired(self) -> None:
        now = self.clock()
        while self._finished:
            oldest_id, oldest = next(iter(self._finished.items()))
            expired = now - oldest.finished_at > self.settings.result_retention_s
            if not expired and len(self._finished) <= self.settings.max_retained:
                break
            del self._finished[oldest_id]
            self._records.pop(oldest_id, None)
