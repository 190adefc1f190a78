"""The request queue in Redis (``FLUX_QUEUE_URL``), shared by every replica of a fleet (docs/fleet.md).

Every state change is one Lua script (runners/front/redis_scripts.py, run through redis-py's
``register_script``: atomic on the server, so two replicas never claim, finish or re-queue the same
request at once). The keys, under the prefix:

- ``req:<id>``, a hash: the request (inputs included until it finishes), its status, logs, owner
  (the replica running it), attempts, outcome or error. Kept ``FLUX_QUEUE_RESULT_RETENTION_S``
  after it finishes (and at most ``FLUX_QUEUE_MAX_RETAINED`` finished ones, via ``finished``).
- ``waiting``, a sorted set scored by arrival order: the one line every replica's feeders pull from
  (``ZRANK`` is the global queue position, ``ZCARD`` the depth that the 429 bound checks).
- ``running``, a sorted set scored by lease expiry: a claim lasts ``FLUX_QUEUE_LEASE_S`` and the
  claimer renews it with every poll; any replica's poller puts an expired one back at its place
  in the line, and it runs again, same id, up to ``FLUX_QUEUE_MAX_ATTEMPTS`` starts.
- ``bytes`` (inputs held by unfinished requests, bounded by ``FLUX_QUEUE_MAX_WAITING_BYTES``),
  ``seq``, ``replicas`` (heartbeats), ``wake`` (a list a submit pushes to, that idle feeders block
  on) and the pub/sub channel ``done``, which wakes the replica whose sync caller waits for a request.
- ``unreported``, a sorted set scored by claim expiry: finished requests whose report (metrics,
  webhook) is not done. The finisher holds the claim and renews it while it delivers; a claim that
  runs out (its replica died) is taken over by another replica's poller, so a webhook is delivered
  once, by one replica, even when its first reporter was killed mid-delivery.

A feeder claims a request only when it is idle, so a replica pulls no more than its model tier has
room for. A cancel (or any end) from any replica marks the record finished; the replica running it
sees, at its next poll, that its claim is gone and tells its model tier to drop the request at the
next step. Redis unreachable: new requests and look-ups get 503 ``queue_unavailable``; running
work goes on and its result is written once Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from runners.config import DEADLINE_GRACE_S, QueueSettings
from runners.errors import (
    AttemptsExhausted,
    InpaintError,
    QueueFull,
    QueueUnavailable,
    ReportedError,
    RequestCancelled,
    RequestTimedOut,
    ServerDraining,
)
from runners.front.metrics import REDIS_ERRORS, REPORTS_TAKEN_OVER, RERUNS
from runners.front.queue import AfterFinish, Executor, Outcome, Record, RequestQueue, Status, finished_line
from runners.front.redis_scripts import (
    CLAIM,
    FINISH,
    HAND_BACK,
    HEARTBEAT,
    LUA_HELPERS,
    PROGRESS,
    REQUEUE_EXPIRED,
    SUBMIT,
)
from runners.logs import REQUEST_ID
from runners.protocol.progress import LogLine
from runners.protocol.schema import InpaintRequest

log = logging.getLogger(__name__)
# What "Redis is unreachable" looks like to redis-py: no connection, no answer in time, still
# loading its AOF after a restart (BusyLoadingError is a ConnectionError), or a replica after a failover.
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError)

SNAPSHOT_FIELDS = (
    "status",
    "base_url",
    "webhook_url",
    "deadline",
    "submitted_ms",
    "front_logs",
    "worker_logs",
    "outcome",
    "error",
)
REQUEUED_LINE = "the replica running it stopped answering; queued again"
HANDED_BACK_LINE = "handed back by a replica shutting down; queued again"
UNAVAILABLE_LINE = "handed back by a replica whose model is not ready; queued again"
TAKEN_BACK_LINE = LogLine(message="its replica answered again and goes on with it", source="queue").model_dump_json()


def connect(settings: QueueSettings) -> aioredis.Redis:
    """redis-py's asyncio client for ``FLUX_QUEUE_URL`` (TLS for ``rediss://``); a password in the
    URL wins over ``FLUX_QUEUE_REDIS_PASSWORD(_FILE)``."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
        "health_check_interval": 15,
    }
    if password := settings.redis_password_value():
        options["password"] = password
    if settings.url.startswith("rediss://") and settings.redis_ca_file is not None:
        options["ssl_ca_certs"] = str(settings.redis_ca_file)
    return aioredis.from_url(settings.url, **options)


def _error_json(error: InpaintError) -> str:
    return json.dumps({"status": error.status, "error_type": error.error_type, "detail": error.detail()})


def _logs(text: str | None) -> list[LogLine]:
    return [LogLine.model_validate(line) for line in json.loads(text or "[]")]


def _logs_json(lines: list[LogLine]) -> str:
    return json.dumps([line.model_dump() for line in lines])


def _record(request_id: str, fields: dict[str, str | None], position: int | None = None) -> Record:
    """A record as Redis holds it (with its inputs when ``fields`` has the request)."""
    outcome = error = None
    if fields.get("outcome"):
        data = json.loads(fields["outcome"])
        outcome = Outcome(output=data["output"], logs=_logs(json.dumps(data["logs"])), inference_time=data["time"])
    if fields.get("error"):
        data = json.loads(fields["error"])
        error = ReportedError(data["status"], data["error_type"], data["detail"])
    return Record(
        request=InpaintRequest.model_validate_json(fields["request"]) if fields.get("request") else None,
        base_url=fields.get("base_url") or "",
        webhook_url=fields.get("webhook_url") or None,
        deadline=float(fields["deadline"]) if fields.get("deadline") else None,
        id=request_id,
        submitted_at=int(fields.get("submitted_ms") or 0) / 1000,
        status=Status(fields["status"]),
        front_logs=_logs(fields.get("front_logs")),
        worker_logs=_logs(fields.get("worker_logs")),
        outcome=outcome,
        error=error,
        position=position,
    )


@dataclass
class _Waiter:
    """A caller of this replica waiting for a request (the sync route)."""

    record: Record
    woken: asyncio.Event = field(default_factory=asyncio.Event)
    finished: Record | None = None  # set when this replica finished it: no read needed


class RedisQueue:
    """``RequestQueue`` in Redis, shared by every replica that names the same URL and key prefix."""

    POLL_INTERVAL_S = 0.25
    REPORTS_PER_POLL = 8  # the most reports of other replicas one poll takes over
    DEADLINE_GRACE_S = DEADLINE_GRACE_S
    MIN_PAUSE_S, MAX_PAUSE_S = 2.0, 30.0  # pulling pauses, doubling, while the model tier answers 503

    def __init__(
        self,
        settings: QueueSettings,
        concurrency: int,
        executor: Executor,
        on_finish: Callable[[Record], Awaitable[None]] | None = None,
        request_timeout_s: float | None = None,
        on_change: Callable[[RequestQueue], None] | None = None,
    ) -> None:
        self.settings = settings
        self.concurrency = concurrency
        self.executor = executor
        self.on_finish = on_finish
        self.request_timeout_s = request_timeout_s
        self.on_change = on_change
        self.draining = False
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.redis = connect(settings)
        self.p = settings.key_prefix
        self.lease_ms = int(settings.lease_s * 1000)
        self.scripts = {
            name: self.redis.register_script(LUA_HELPERS + body)
            for name, body in (
                ("submit", SUBMIT),
                ("claim", CLAIM),
                ("heartbeat", HEARTBEAT),
                ("requeue", REQUEUE_EXPIRED),
                ("hand_back", HAND_BACK),
                ("progress", PROGRESS),
                ("finish", FINISH),
            )
        }
        self._held: dict[str, Record] = {}  # claimed by this replica's feeders, running here
        # Held and not yet answered by the model tier. Only these are cancelled there: a cancel for
        # a job the tier has finished would be remembered and stop a later run of the same id here.
        self._in_model: set[str] = set()
        self._handed_back: set[str] = set()
        self._waiters: dict[str, _Waiter] = {}
        self._reported_logs: dict[str, int] = {}  # worker log lines last written, per held id
        self._reporting: set[str] = set()  # the finished requests whose report (webhook) runs here
        self._after_finish = AfterFinish(self._report if on_finish is not None else None)
        self._tasks: list[asyncio.Task] = []
        self._let_go_done = False
        self._depth, self._oldest_s, self._replicas = 0, 0.0, 1
        self._paused_until, self._pause_s = 0.0, 0.0  # no pulling until then: the model tier here answered 503
        self._last_warning = 0.0

    # the fleet's figures, as of the last poll
    @property
    def waiting(self) -> int:
        return self._depth

    @property
    def in_flight(self) -> int:
        return sum(1 for record in self._held.values() if record.dispatched)

    @property
    def replicas(self) -> int:
        return self._replicas

    @property
    def oldest_wait_s(self) -> float:
        return self._oldest_s

    # life cycle
    def ensure_started(self) -> None:
        if self._tasks:
            return
        self._tasks = [asyncio.create_task(self._feed(), name=f"feeder-{i}") for i in range(self.concurrency)]
        self._tasks.append(asyncio.create_task(self._poll(), name="queue-poller"))
        self._tasks.append(asyncio.create_task(self._poll_progress(), name="progress-poller"))
        self._tasks.append(asyncio.create_task(self._listen(), name="done-listener"))
        log.info("queue: Redis at %s, replica %s, %d feeders", self._where(), self.replica, self.concurrency)

    def _where(self) -> str:
        kwargs = self.redis.connection_pool.connection_kwargs
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"

    async def drain(self, timeout_s: float) -> None:
        """Stop pulling; let what this replica holds and what its sync callers wait for finish, for up
        to ``timeout_s``; then hand back to the line what is still running here (another replica runs
        it) and fail the sync requests whose callers are connected here (503 ``server_draining``).
        Requests waiting in the line are not touched: the other replicas take them."""
        self.draining = True
        until = time.monotonic() + timeout_s
        try:
            while (self._held or self._unanswered()) and time.monotonic() < until:
                await asyncio.sleep(0.1)
        except asyncio.CancelledError:
            log.warning("drain cut short")
        await self._let_go()
        await self._after_finish.wait(max(5.0, until - time.monotonic()))

    async def stop(self) -> None:
        self.draining = True
        await self._let_go()
        for task in self._tasks:
            # redis-py may turn a cancellation that lands inside a call into a connection error,
            # which the loops survive by design: cancel until the task is really over.
            while not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=0.5)
        self._tasks = []
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    def _unanswered(self) -> list[_Waiter]:
        return [w for w in self._waiters.values() if w.finished is None and w.record.status != Status.COMPLETED]

    async def _let_go(self) -> None:
        if self._let_go_done:
            return
        self._let_go_done = True
        for waiter in self._unanswered():
            with contextlib.suppress(InpaintError):
                await self.end(
                    waiter.record, ServerDraining("the server shut down before this request finished; retry")
                )
        held = [record for record in self._held.values() if record.status != Status.COMPLETED]
        if held:
            await self._hand_back(held, HANDED_BACK_LINE)
            log.info("handed %d running request(s) back to the line", len(held))
        for record in held:
            await self._stop_in_model(record.id)

    async def _hand_back(self, records: list[Record], message: str) -> None:
        """Back to their place in the line, the attempt not counted; this replica drops them."""
        self._handed_back.update(record.id for record in records)
        line = LogLine(message=message, source="queue").model_dump_json()
        try:
            await self.scripts["hand_back"](args=[self.p, self.replica, line, *(record.id for record in records)])
        except UNREACHABLE as exc:  # their leases run out instead, and another replica takes them
            self._redis_failed("hand_back", exc)

    # what the routes call
    async def submit(self, request: InpaintRequest, base_url: str, webhook_url: str | None = None) -> Record:
        if self.draining:
            raise ServerDraining()
        self.ensure_started()
        deadline = time.time() + self.request_timeout_s if self.request_timeout_s else None
        record = Record(request=request, base_url=base_url, webhook_url=webhook_url, deadline=deadline)
        queued = LogLine(message="queued", source="queue")
        record.front_logs.append(queued)
        fields = {
            "request": request.model_dump_json(),
            "base_url": base_url,
            "webhook_url": webhook_url or "",
            "deadline": repr(deadline) if deadline is not None else "",
        }
        args = [self.p, record.id, self.settings.max_length, self.settings.max_waiting_bytes, record.size]
        try:
            rank = await self.scripts["submit"](args=[*args, queued.model_dump_json(), *_pairs(fields)])
        except UNREACHABLE as exc:
            raise self._unavailable("submit", exc) from None
        if rank == -1:
            raise QueueFull(f"the queue is full ({self.settings.max_length} requests waiting); retry shortly")
        if rank == -2:
            raise QueueFull("the queue holds as many input bytes as it keeps; retry shortly")
        record.position = rank
        return record

    async def get(self, request_id: str) -> Record | None:
        if len(request_id) > 100:  # ours are UUIDs; a longer key is nobody's
            return None
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hmget(self.p + "req:" + request_id, SNAPSHOT_FIELDS)
                pipe.zrank(self.p + "waiting", request_id)
                values, rank = await pipe.execute()
        except UNREACHABLE as exc:
            raise self._unavailable("read", exc) from None
        fields = dict(zip(SNAPSHOT_FIELDS, values, strict=True))
        return _record(request_id, fields, rank or 0) if fields["status"] else None

    async def position(self, record: Record) -> int:
        if record.position is not None:
            return record.position
        try:
            return await self.redis.zrank(self.p + "waiting", record.id) or 0
        except UNREACHABLE as exc:
            raise self._unavailable("read", exc) from None

    async def wait(self, record: Record) -> Record:
        """Woken by this replica's own finish, or by the ``done`` channel when another replica
        finished it; a read every second besides, in case a message was lost with a connection."""
        waiter = self._waiters.setdefault(record.id, _Waiter(record))
        try:
            while True:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(waiter.woken.wait(), 1.0)
                if waiter.finished is not None:
                    return waiter.finished
                waiter.woken.clear()
                with contextlib.suppress(QueueUnavailable):  # still waiting: Redis may come back
                    snapshot = await self.get(record.id)
                    if snapshot is None or snapshot.status == Status.COMPLETED:
                        return snapshot or record
        finally:
            self._waiters.pop(record.id, None)

    async def cancel(self, request_id: str) -> str:
        record = await self.get(request_id)
        if record is None:
            return "NOT_FOUND"
        if record.status == Status.COMPLETED or not await self._end(record, RequestCancelled()):
            return "ALREADY_COMPLETED"
        return "CANCELLATION_REQUESTED"

    async def end(self, record: Record, error: InpaintError) -> None:
        await self._end(record, error)

    async def _end(self, record: Record, error: InpaintError) -> bool:
        """Finish it with ``error`` wherever it is; the replica running it stops it at its next
        poll (here, at once). False if it had finished already."""
        won = await self._finish(record, error=error, owner="", retry=False)
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

    # internals
    async def _feed(self) -> None:
        while not self.draining:
            if (pause := self._paused_until - time.monotonic()) > 0:
                await asyncio.sleep(pause)
                continue
            try:
                claimed = await self.scripts["claim"](args=[self.p, self.replica, self.lease_ms])
                if not claimed:
                    await self.redis.blpop([self.p + "wake"], timeout=1)
                    continue
            except UNREACHABLE as exc:
                self._redis_failed("claim", exc)
                await asyncio.sleep(1.0)
                continue
            request_id, flat = claimed
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            await self._run(_record(request_id, fields), int(fields["attempts"]))

    async def _run(self, record: Record, attempts: int) -> None:
        REQUEST_ID.set(record.id)  # this feeder task's log lines belong to this request now
        self._handed_back.discard(record.id)  # handed back once (503 here), and claimed again
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
            record.attempt, record.dispatched = attempts, True
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
            if error is not None and error.status == 503 and record.id not in self._handed_back:
                # This replica's model tier cannot take work (still loading, restarting): not the
                # request's fault. Back to the line for a replica that can; this one pauses pulling.
                log.info(
                    "request %s: the model tier here is unavailable (%s); handing it back", record.id, error.message
                )
                self._pause_s = min(self.MAX_PAUSE_S, max(self.MIN_PAUSE_S, 2 * self._pause_s))
                self._paused_until = time.monotonic() + self._pause_s
                await self._hand_back([record], UNAVAILABLE_LINE)
            elif record.id not in self._handed_back:
                self._pause_s = 0.0
                await self._finish(record, outcome=outcome, error=error)
        finally:
            self._held.pop(record.id, None)
            self._reported_logs.pop(record.id, None)
            self._changed()
            REQUEST_ID.set(None)

    async def _finish(
        self,
        record: Record,
        outcome: Outcome | None = None,
        error: InpaintError | None = None,
        owner: str | None = None,
        retry: bool = True,
    ) -> bool:
        """Write the end of a request, if it is still unfinished (and, for a feeder, still its own
        claim). ``retry``: a feeder's result waits for Redis to come back rather than being lost."""
        fields: dict[str, str] = {}
        if outcome is not None:
            fields["outcome"] = json.dumps(
                {
                    "output": outcome.output,
                    "logs": [line.model_dump() for line in outcome.logs],
                    "time": outcome.inference_time,
                }
            )
            fields["worker_logs"] = _logs_json(outcome.logs)
        if error is not None:
            fields["error"] = _error_json(error)
        line = finished_line(error)
        token = secrets.token_hex(8)
        owner = self.replica if owner is None else owner
        args = [
            self.p,
            record.id,
            token,
            owner,
            self.replica if self.on_finish is not None else "",
            self.lease_ms,
            self.settings.result_retention_s,
            self.settings.max_retained,
            line.model_dump_json(),
            *_pairs(fields),
        ]
        if retry:
            # Shutting down, it stops trying: its lease runs out and another replica runs it.
            answer = await self._until_answered(
                "finish", lambda: self.scripts["finish"](args=args), give_up=lambda: self._let_go_done
            )
            if answer is None:
                log.error("request %s: finished, but Redis is unreachable to record it", record.id)
                return False
        else:
            try:
                answer = await self.scripts["finish"](args=args)
            except UNREACHABLE as exc:
                raise self._unavailable("finish", exc) from None
        won = bool(answer)
        waiter = self._waiters.get(record.id)
        if won:
            record.status, record.outcome, record.error = Status.COMPLETED, outcome, error
            if outcome is not None:
                record.worker_logs = outcome.logs
            record.front_logs.append(line)
            record.finished_at = time.monotonic()
            if waiter is not None:
                waiter.finished = record
            self._after_finish.start(record)
        if waiter is not None:
            waiter.woken.set()
        return won

    async def _report(self, record: Record) -> None:
        """The finish hook (metrics, webhook) of a request this replica finished, or whose report it
        took over. Its claim in ``unreported`` is renewed by the heartbeat meanwhile; once the hook
        has ended (delivered or given up), the claim goes. Cut short (this replica stopping), the
        claim stays and runs out, and another replica reports the request."""
        self._reporting.add(record.id)
        cut_short = False
        try:
            await self.on_finish(record)
        except asyncio.CancelledError:
            cut_short = True
            raise
        finally:
            if not cut_short:
                await self._reported(record.id)
            self._reporting.discard(record.id)

    async def _reported(self, request_id: str) -> None:
        """Drop the report claim, waiting for Redis if need be (the heartbeat renews the claim
        meanwhile): a claim left to run out would make another replica deliver its webhook again."""
        await self._until_answered("report", lambda: self.redis.zrem(self.p + "unreported", request_id))

    async def _until_answered(
        self, operation: str, call: Callable[[], Awaitable[Any]], give_up: Callable[[], bool] = lambda: False
    ) -> Any:
        """``call()`` until Redis answers, trying again soon after it is back (0.5 s, then every
        1 s: before a lease runs out); None once ``give_up()`` says so after a failed try."""
        delay = 0.5
        while True:
            try:
                return await call()
            except UNREACHABLE as exc:
                self._redis_failed(operation, exc)
                if give_up():
                    return None
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)

    async def _listen(self) -> None:
        """Wake this replica's waiters when another replica finishes their request."""
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.p + "done")
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and (waiter := self._waiters.get(message["data"])) is not None:
                        waiter.woken.set()
            except UNREACHABLE as exc:
                self._redis_failed("listen", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.POLL_INTERVAL_S)
            try:
                late, taken = await self._heartbeat()
                requeued = await self.scripts["requeue"](
                    args=[self.p, LogLine(message=REQUEUED_LINE, source="queue", level="WARNING").model_dump_json()]
                )
            except UNREACHABLE as exc:
                self._redis_failed("heartbeat", exc)
                continue
            if requeued:
                RERUNS.inc(requeued)
                log.warning("%d request(s) whose replica stopped renewing its lease queued again", requeued)
            await self._end_waiting(late)
            await self._take_over_reports(taken)
            for record in list(self._held.values()):
                grace = self.DEADLINE_GRACE_S if record.dispatched else 0.0
                if record.deadline is not None and time.time() > record.deadline + grace:
                    with contextlib.suppress(InpaintError):
                        await self.end(record, RequestTimedOut())

    async def _heartbeat(self) -> tuple[list[str], list[str]]:
        """This replica's upkeep in one call (HEARTBEAT in redis_scripts.py); the waiting requests
        past their deadline, and the reports this replica has taken over."""
        held = [record_id for record_id in self._held if record_id not in self._handed_back]
        # Reports are taken over only by a replica that will be around to deliver them.
        wanted = 0 if self.on_finish is None or self.draining else self.REPORTS_PER_POLL
        args = [self.p, self.replica, self.lease_ms, TAKEN_BACK_LINE, time.time(), wanted]
        depth, oldest_ms, replicas, lost, late, taken, dropped = await self.scripts["heartbeat"](
            args=[*args, self.settings.max_attempts, len(held), *held, *self._reporting]
        )
        self._depth, self._oldest_s, self._replicas = int(depth), int(oldest_ms) / 1000, max(1, int(replicas))
        self._changed()
        for record_id in lost:
            record = self._held.get(record_id)
            if record is None or record.status == Status.COMPLETED:
                continue
            log.info("request %s: ended elsewhere, or its claim moved on; stopping it here", record_id)
            record.status = Status.COMPLETED
            record.error = RequestCancelled("the request was ended by another replica")
            await self._stop_in_model(record_id)
        for record_id in dropped:
            log.error(
                "request %s: its report (webhook) was cut short with its replica %d times; not delivered",
                record_id,
                self.settings.max_attempts,
            )
        return late, taken

    async def _end_waiting(self, late: list[str]) -> None:
        """A request that waits past its deadline ends then (504), as in the memory queue, not
        when a replica next claims it: with every feeder busy that could be much later."""
        for request_id in late:
            try:
                record = await self.get(request_id)
                if record is not None and record.status != Status.COMPLETED:
                    await self._end(record, RequestTimedOut.while_waiting())
            except QueueUnavailable:
                return  # counted; the next poll tries again

    async def _take_over_reports(self, taken: list[str]) -> None:
        """Report the requests whose reporter stopped renewing its claim (killed while delivering)."""
        for request_id in taken:
            if request_id in self._reporting:  # its own claim, run out while Redis was slow: goes on
                continue
            try:
                record = await self.get(request_id)
            except QueueUnavailable:
                return  # the claim runs out again, and this or another replica takes it then
            if record is None or record.status != Status.COMPLETED:
                continue
            REPORTS_TAKEN_OVER.inc()
            log.warning("request %s: its replica stopped before reporting it; reporting it here", request_id)
            self._after_finish.start(record)

    async def _poll_progress(self) -> None:
        """Apart from the heartbeat's loop: a model tier slow to answer must not hold up the
        renewal of this replica's leases (another replica would run its requests again)."""
        while True:
            await asyncio.sleep(self.POLL_INTERVAL_S)
            await self._progress()

    async def _progress(self) -> None:
        """The worker's progress of what runs here, written to Redis for every replica's status route."""
        running = [r for r in self._held.values() if r.dispatched and r.status != Status.COMPLETED]
        if not running:
            return
        try:
            progress = await self.executor.progress([r.id for r in running])
        except Exception as exc:  # the poller must outlive a worker outage
            if time.monotonic() - self._last_warning > 30:
                log.warning("could not read progress from the worker: %s", exc)
                self._last_warning = time.monotonic()
            return
        changed: list[str] = []
        for record in running:
            report = progress.get(record.id)
            if report is None or not report.started or record.status == Status.COMPLETED:
                continue
            if self._reported_logs.get(record.id) != len(report.logs) or record.status != Status.IN_PROGRESS:
                record.status, record.worker_logs = Status.IN_PROGRESS, report.logs
                self._reported_logs[record.id] = len(report.logs)
                changed += [record.id, _logs_json(report.logs)]
        if changed:
            try:
                await self.scripts["progress"](args=[self.p, self.replica, *changed])
            except UNREACHABLE as exc:
                self._redis_failed("progress", exc)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    def _redis_failed(self, operation: str, exc: Exception) -> None:
        task = asyncio.current_task()
        if task is not None and task.cancelling():  # redis-py turned our cancellation into an error
            raise asyncio.CancelledError
        REDIS_ERRORS.labels(operation=operation).inc()
        if time.monotonic() - self._last_warning > 10:  # one line per outage, not one per call
            log.warning("Redis unreachable (%s): %s", operation, exc)
            self._last_warning = time.monotonic()

    def _unavailable(self, operation: str, exc: Exception) -> QueueUnavailable:
        self._redis_failed(operation, exc)
        return QueueUnavailable()


def _pairs(fields: dict[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]
