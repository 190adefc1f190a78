"""A request's life cycle, written once for both queues (runners/front/queue.py's ``RequestQueue``).

``LifeCycle`` holds what a request goes through wherever its record lives: the submit checks and
their messages, the feeders that hand records to the model tier, what a failure means (its kind:
``InpaintError.retry_elsewhere``), the finish, the progress poll, the deadlines, cancel, drain and
stop, and the supervision of every background loop. Below it, two transports say where the line
and the records are:

- ``MemoryQueue`` (runners/front/memory_queue.py): in this process's memory;
- ``RedisQueue`` (runners/front/redis_queue.py): in Redis, shared by a fleet.

A transport implements the methods marked "transport" below (add, claim, write a finish, write
progress, hand back, let go, look up, wait) and adds its own upkeep loops.

**Every background loop is supervised.** A loop runs one pass at a time through redis-py's own
``Retry`` (the one retry mechanism of the queues, for Redis calls too): any exception a pass raises
is counted (``flux_queue_loop_errors_total{loop}``; Redis failures also in
``flux_queue_redis_errors_total{operation}``), logged at most once per ``WARN_EVERY_S`` per loop,
and the pass is tried again after an exponential backoff (capped at 1 s, under any lease). So an
out-of-memory Redis, a READONLY replica after a failover, a script error or a bug in one pass
never ends a loop: once the cause is gone the loop goes on by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial

from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from runners.config import DEADLINE_GRACE_S, QueueSettings
from runners.errors import (
    AttemptsExhausted,
    InpaintError,
    QueueFull,
    RequestCancelled,
    RequestTimedOut,
    ServerDraining,
)
from runners.front.metrics import QUEUE_LOOP_ERRORS, REDIS_ERRORS
from runners.front.queue import AfterFinish, Executor, Outcome, Record, RequestQueue, Status, finished_line
from runners.logs import REQUEST_ID
from runners.protocol.progress import LogLine
from runners.protocol.schema import InpaintRequest

log = logging.getLogger(__name__)
# What a failed call to Redis raises: redis-py's errors (connection, timeout, OOM, READONLY, script
# errors: all RedisError) and the socket's own.
REDIS_FAILURES = (RedisError, OSError)
UNAVAILABLE_LINE = "handed back by a replica whose model is not ready; queued again"
DRAINING_MESSAGE = "the server shut down before this request finished; retry"


def backoff() -> ExponentialBackoff:
    """0.25 s, 0.5 s, then every 1 s: soon after a cause is gone, and within any lease (>= 1.5 s)."""
    return ExponentialBackoff(cap=1.0, base=0.125)


class GaveUp(Exception):
    """A retried call stopped on purpose (the replica is letting its work go)."""


class LifeCycle:
    """The life cycle of ``RequestQueue``; subclasses are its transports."""

    POLL_INTERVAL_S = 0.25
    # The worker stops a request at its next step boundary, but a step or a decode can be long.
    DEADLINE_GRACE_S = DEADLINE_GRACE_S
    WARN_EVERY_S = 10.0  # one log line per loop per this long while its failures go on
    MIN_PAUSE_S, MAX_PAUSE_S = 2.0, 30.0  # pulling pauses, doubling, while the model tier here is unavailable
    # Whether a request this replica's model tier cannot take (``retry_elsewhere``) goes back to the
    # line for another replica; with one replica it fails at once.
    HANDS_BACK = False
    # Whether the feeders keep pulling while draining: one replica must finish its line, a fleet's
    # draining replica leaves the line to the others.
    PULLS_WHILE_DRAINING = True
    replicas = 1

    def __init__(
        self,
        settings: QueueSettings,
        concurrency: int,
        executor: Executor,
        on_finish: Callable[[Record], Awaitable[None]] | None = None,
        request_timeout_s: float | None = None,
        on_change: Callable[[RequestQueue], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.concurrency = concurrency
        self.executor = executor
        self.on_finish = on_finish
        self.request_timeout_s = request_timeout_s
        self.on_change = on_change  # metrics: called whenever ``waiting`` or ``in_flight`` may have changed
        self.clock = clock
        self.draining = False
        self._held: dict[str, Record] = {}  # claimed by this replica's feeders, running here
        # Held and not yet answered by the model tier. Only these are cancelled there: a cancel for
        # a job the tier has finished would be remembered and stop a later run of the same id here.
        self._in_model: set[str] = set()
        self._handed_back: set[str] = set()
        self._reported_logs: dict[str, int] = {}  # worker log lines last written, per held id
        self._after_finish = AfterFinish(self._report if on_finish is not None else None)
        self._tasks: list[asyncio.Task] = []
        self._let_go_done = False
        self._paused_until, self._pause_s = 0.0, 0.0  # no pulling until then: the model tier here is unavailable
        self._warned: dict[str, float] = {}
        self._loop_retry = Retry(backoff(), retries=-1, supported_errors=(Exception,))

    # what the routes call
    @property
    def in_flight(self) -> int:
        """Requests this replica has handed to its model tier and not finished."""
        return sum(1 for record in self._held.values() if record.dispatched)

    def ensure_started(self) -> None:
        if self._tasks:
            return

        def pulling() -> bool:
            return not self.draining or self.PULLS_WHILE_DRAINING

        self._tasks = [self._loop(f"feeder-{i}", self._feed_once, while_=pulling) for i in range(self.concurrency)]
        self._tasks.append(self._loop("progress", self._progress_once, every=True))
        self._tasks.append(self._loop("deadlines", self._deadlines_once, every=True))
        self._tasks += [self._loop(name, one_pass, every=every) for name, one_pass, every in self._upkeep()]
        self._started()

    async def submit(self, request: InpaintRequest, base_url: str, webhook_url: str | None = None) -> Record:
        if self.draining:
            raise ServerDraining()
        self.ensure_started()
        deadline = time.time() + self.request_timeout_s if self.request_timeout_s else None
        record = Record(request=request, base_url=base_url, webhook_url=webhook_url, deadline=deadline)
        record.front_logs.append(LogLine(message="queued", source="queue"))
        refused = await self._add(record)
        if refused == "length":
            raise QueueFull(f"the queue is full ({self.settings.max_length} requests waiting); retry shortly")
        if refused == "bytes":
            raise QueueFull("the queue holds as many input bytes as it keeps; retry shortly")
        self._changed()
        return record

    async def cancel(self, request_id: str) -> str:
        record = await self.get(request_id)
        if record is None:
            return "NOT_FOUND"
        if record.status == Status.COMPLETED or not await self._end(record, RequestCancelled()):
            return "ALREADY_COMPLETED"
        return "CANCELLATION_REQUESTED"

    async def end(self, record: Record, error: InpaintError) -> None:
        await self._end(record, error)

    async def drain(self, timeout_s: float) -> None:
        """Stop taking work; let what is under way finish for up to ``timeout_s``; then let go of
        the rest (the transport's ``_let_go``: fail it, or hand it to another replica), then wait
        for webhook deliveries still under way, for what is left of the time (at least 5 s).
        Cancelling it (a second SIGTERM) lets go at once."""
        self.draining = True
        until = time.monotonic() + timeout_s
        try:
            while self._unsettled() and time.monotonic() < until:
                await asyncio.sleep(0.1)
        except asyncio.CancelledError:
            log.warning("drain cut short")
            await self._let_go()
            return
        await self._let_go()
        await self._after_finish.wait(max(5.0, until - time.monotonic()))

    async def stop(self) -> None:
        """Shut down: what is unfinished is let go first (no caller waits forever), then the loops end."""
        self.draining = True
        await self._let_go()
        for task in self._tasks:
            # redis-py may turn a cancellation that lands inside a call into a connection error
            # (redis/redis-py#2028, #2665), which the loops survive by design: cancel until it is over.
            while not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=0.5)
        self._tasks = []
        await self._close()

    # the feeders
    async def _feed_once(self) -> None:
        if (pause := self._paused_until - time.monotonic()) > 0:
            await asyncio.sleep(pause)
            return
        claimed = await self._claim()
        if claimed is not None:
            await self._run(*claimed)

    async def _run(self, record: Record, attempts: int) -> None:
        REQUEST_ID.set(record.id)  # this feeder task's log lines belong to this request now
        self._handed_back.discard(record.id)  # handed back once, and claimed again
        self._held[record.id] = record
        self._changed()
        try:
            if attempts > self.settings.max_attempts:
                message = (
                    f"the replicas running this request stopped answering {attempts - 1} times "
                    f"(FLUX_QUEUE_MAX_ATTEMPTS={self.settings.max_attempts}); it is not run again"
                )
                await self._finish(record, error=AttemptsExhausted(message))
                return
            if record.deadline is not None and time.time() > record.deadline:
                await self._finish(record, error=RequestTimedOut.while_waiting())
                return
            if attempts > 1:
                log.info("request %s: running again (attempt %d)", record.id, attempts)
            # IN_PROGRESS from here, as fal's once a runner takes it: the progress poll adds the
            # worker's "step i/N" lines, but a short request can finish between two of its polls.
            record.attempt, record.dispatched, record.status = attempts, True, Status.IN_PROGRESS
            self._changed()
            outcome = error = None
            self._in_model.add(record.id)
            try:
                outcome = await self.executor.run(record)
            except InpaintError as exc:
                error = exc
            except Exception:
                log.exception("request %s failed unexpectedly", record.id)
                error = InpaintError("internal server error")
            finally:
                self._in_model.discard(record.id)
            if record.id in self._handed_back:  # a drain handed it back meanwhile: another replica runs it
                return
            if error is not None and error.retry_elsewhere and self.HANDS_BACK:
                # This replica's model tier cannot take work (still loading, restarting): not the
                # request's fault. Back to the line for a replica that can; this one pauses pulling.
                log.info("request %s: the model tier here is unavailable (%s); handing it back", record.id, error)
                self._pause_s = min(self.MAX_PAUSE_S, max(self.MIN_PAUSE_S, 2 * self._pause_s))
                self._paused_until = time.monotonic() + self._pause_s
                await self._hand_back([record], UNAVAILABLE_LINE)
                return
            self._pause_s = 0.0
            await self._finish(record, outcome=outcome, error=error)
        finally:
            self._held.pop(record.id, None)
            self._reported_logs.pop(record.id, None)
            self._changed()
            REQUEST_ID.set(None)

    async def _finish(
        self, record: Record, outcome: Outcome | None = None, error: InpaintError | None = None, own: bool = True
    ) -> bool:
        """End a request, if it is still unfinished; True if this call ended it. ``own``: a feeder's
        end of its own claim (kept until written); else an end from anyone (cancel, deadline)."""
        line = finished_line(error)
        won = await self._write_finish(record, outcome, error, line, own)
        if won:
            record.status, record.outcome, record.error = Status.COMPLETED, outcome, error
            if outcome is not None:
                record.worker_logs = outcome.logs
            record.end_log = line
            record.finished_at = self.clock()
            record.done.set()
            self._changed()
            self._after_finish.start(record)
        self._ended_here(record, won)
        return won

    async def _end(self, record: Record, error: InpaintError) -> bool:
        """Finish it with ``error`` wherever it is; the replica running it stops it (here, at once;
        elsewhere at its next poll). False if it had finished already."""
        won = await self._finish(record, error=error, own=False)
        held = self._held.get(record.id)
        if won and held is not None:
            held.status, held.error = Status.COMPLETED, error
            await self._stop_in_model(record.id)
        return won

    async def _stop_in_model(self, request_id: str) -> None:
        if request_id not in self._in_model:
            return
        try:
            await self.executor.cancel(request_id)
        except Exception:
            log.warning("request %s: could not tell the model to stop it", request_id, exc_info=True)

    async def _report(self, record: Record) -> None:
        """The after-finish work of a finished request (metrics, webhook)."""
        await self.on_finish(record)

    # the upkeep every queue has
    async def _progress_once(self) -> None:
        """The model tier's progress of what runs here ("step i/N"), kept with the records."""
        running = [r for r in self._held.values() if r.dispatched and r.status != Status.COMPLETED]
        if not running:
            return
        progress = await self.executor.progress([r.id for r in running])
        changed: dict[str, list[LogLine]] = {}
        for record in running:
            report = progress.get(record.id)
            if report is None or not report.started or record.status == Status.COMPLETED:
                continue
            if self._reported_logs.get(record.id) != len(report.logs) or record.status != Status.IN_PROGRESS:
                record.status, record.worker_logs = Status.IN_PROGRESS, report.logs
                self._reported_logs[record.id] = len(report.logs)
                changed[record.id] = report.logs
        if changed:
            try:
                await self._write_progress(changed)
            except Exception:
                for request_id in changed:  # written at the next pass instead
                    self._reported_logs.pop(request_id, None)
                raise

    async def _deadlines_once(self) -> None:
        """Waiting requests end at their deadline; running ones are stopped by the worker at a step
        boundary, and failed here only if no answer came ``DEADLINE_GRACE_S`` later."""
        await self._end_late_waiting()
        now = time.time()
        for record in list(self._held.values()):
            grace = self.DEADLINE_GRACE_S if record.dispatched else 0.0
            if record.status != Status.COMPLETED and record.deadline is not None and now > record.deadline + grace:
                await self._end(record, RequestTimedOut())

    async def _let_go(self) -> None:
        if self._let_go_done:
            return
        self._let_go_done = True
        await self._release()

    # supervision
    def _loop(
        self, name: str, one_pass: Callable[[], Awaitable[None]], every: bool = False, while_=lambda: True
    ) -> asyncio.Task:
        """A background loop: ``one_pass`` again and again (after ``POLL_INTERVAL_S`` each time with
        ``every``) while ``while_()``; a pass that raises is counted, logged and tried again."""

        async def supervised() -> None:
            while while_():
                if every:
                    await asyncio.sleep(self.POLL_INTERVAL_S)
                await self._loop_retry.call_with_retry(one_pass, partial(self._loop_failed, name.split("-")[0]))

        return asyncio.create_task(supervised(), name=name)

    async def _loop_failed(self, loop: str, exc: Exception) -> None:
        self._check_cancelled()
        QUEUE_LOOP_ERRORS.labels(loop=loop).inc()
        if isinstance(exc, REDIS_FAILURES):
            REDIS_ERRORS.labels(operation=loop).inc()
            self._warn(loop, "queue %s: Redis failed (%s: %s); trying again", loop, type(exc).__name__, exc)
        else:
            self._warn(loop, "queue %s: %s: %s; trying again", loop, type(exc).__name__, exc, exc_info=exc)

    def _check_cancelled(self) -> None:
        task = asyncio.current_task()
        if task is not None and task.cancelling():  # redis-py turned our cancellation into an error (#2028)
            raise asyncio.CancelledError

    def _warn(self, kind: str, message: str, *args, exc_info=None) -> None:
        """One line per kind of failure per ``WARN_EVERY_S``, not one per try."""
        if time.monotonic() - self._warned.get(kind, -self.WARN_EVERY_S) >= self.WARN_EVERY_S:
            log.warning(message, *args, exc_info=exc_info)
            self._warned[kind] = time.monotonic()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    # the transport
    async def get(self, request_id: str) -> Record | None:
        raise NotImplementedError

    async def _add(self, record: Record) -> str | None:
        """Put a new record in the line: None, or why not ("length", "bytes")."""
        raise NotImplementedError

    async def _claim(self) -> tuple[Record, int] | None:
        """The next record for a feeder of this replica, and which start of it this is; None when
        there is none now (after waiting a little for one)."""
        raise NotImplementedError

    async def _write_finish(
        self, record: Record, outcome: Outcome | None, error: InpaintError | None, line: LogLine, own: bool
    ) -> bool:
        raise NotImplementedError

    async def _write_progress(self, changed: dict[str, list[LogLine]]) -> None:
        """Keep the worker lines where every replica reads them."""

    async def _hand_back(self, records: list[Record], message: str) -> None:
        raise NotImplementedError

    async def _release(self) -> None:
        """The end of a drain or a stop: what this replica still holds is failed or handed back."""
        raise NotImplementedError

    def _unsettled(self) -> bool:
        """Whether a drain still has something to wait for here."""
        raise NotImplementedError

    async def _end_late_waiting(self) -> None:
        """End the waiting requests past their deadline (the transport knows where the line is)."""

    def _ended_here(self, record: Record, won: bool) -> None:
        """A finish was tried here (``won``: by this call)."""

    def _upkeep(self) -> list[tuple[str, Callable[[], Awaitable[None]], bool]]:
        """The transport's own loops: (name, one pass, whether it waits ``POLL_INTERVAL_S`` first)."""
        return []

    def _started(self) -> None:
        """The loops have started."""

    async def _close(self) -> None:
        """After the loops have ended."""
