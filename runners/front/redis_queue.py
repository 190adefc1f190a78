"""The Redis transport of the request life cycle (runners/front/life_cycle.py), with
``FLUX_QUEUE_URL``: shared by every replica of a fleet (docs/fleet.md).

Every state change is one Lua script (runners/front/redis_scripts.py, called through
runners/front/redis_codec.py with its keys declared): atomic on the server, so two replicas never
claim, finish or re-queue the same request at once. The keys, under the prefix:

- ``req:<id>``, a hash: the request (inputs included until it finishes), its status, logs, owner
  (the replica running it), attempts, outcome or error. Kept ``FLUX_QUEUE_RESULT_RETENTION_S``
  after it finishes (and at most ``FLUX_QUEUE_MAX_RETAINED`` finished ones, via ``finished``).
- ``waiting``, a sorted set scored by arrival order: the one line every replica's feeders pull from
  (``ZRANK`` is the global queue position, ``ZCARD`` the depth that the 429 bound checks).
- ``running``, a sorted set scored by lease expiry: a claim lasts ``FLUX_QUEUE_LEASE_S`` and the
  claimer renews it with every heartbeat; any replica's heartbeat puts an expired one back at its
  place in the line, and it runs again, same id, up to ``FLUX_QUEUE_MAX_ATTEMPTS`` starts.
- ``bytes`` (inputs held by unfinished requests, bounded by ``FLUX_QUEUE_MAX_WAITING_BYTES``),
  ``seq``, ``replicas`` (heartbeats), ``wake`` (a list a submit pushes to, that idle feeders block
  on) and the pub/sub channel ``done``, which wakes the replica whose sync caller waits for a request.
- ``unreported``, a sorted set scored by claim expiry: finished requests whose report (metrics,
  webhook) is not done. The finisher holds the claim and renews it while it delivers; a claim that
  runs out (its replica died) is taken over by another replica's heartbeat
  (runners/front/redis_upkeep.py), so a webhook is delivered once, by one replica, even when its
  first reporter was killed mid-delivery.

A feeder claims a request only when it is idle, so a replica pulls no more than its model tier has
room for. A cancel (or any end) from any replica marks the record finished; the replica running it
sees, at its next heartbeat, that its claim is gone and tells its model tier to drop the request at
the next step. Any Redis failure (unreachable, out of memory, READONLY, a script error): new
requests and look-ups get 503 ``queue_unavailable``; running work goes on and its result is written
once Redis takes it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.retry import Retry

from runners.config import REDIS_BLOCKING_POP_S
from runners.errors import InpaintError, QueueUnavailable, ServerDraining
from runners.front.life_cycle import DRAINING_MESSAGE, REDIS_FAILURES, GaveUp, LifeCycle, backoff
from runners.front.metrics import REDIS_ERRORS
from runners.front.queue import Outcome, Record, Status
from runners.front.redis_codec import (
    SNAPSHOT_FIELDS,
    Scripts,
    connect,
    logs_json,
    outcome_fields,
    record_from,
    request_fields,
    where,
)
from runners.front.redis_upkeep import Upkeep
from runners.protocol.progress import LogLine

log = logging.getLogger(__name__)
HANDED_BACK_LINE = "handed back by a replica shutting down; queued again"


@dataclass
class _Waiter:
    """A caller of this replica waiting for a request (the sync route)."""

    record: Record
    woken: asyncio.Event = field(default_factory=asyncio.Event)
    finished: Record | None = None  # set when this replica finished it: no read needed


class RedisQueue(Upkeep, LifeCycle):
    """``RequestQueue`` in Redis, shared by every replica that names the same URL and key prefix."""

    HANDS_BACK = True
    PULLS_WHILE_DRAINING = False
    WAIT_READ_EVERY_S = 1.0  # a waiting caller reads its request this often besides the done channel

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.redis = connect(self.settings)
        self.p = self.settings.key_prefix
        self.lease_ms = int(self.settings.lease_s * 1000)
        self.scripts = Scripts(self.redis, self.p)
        self._redis_retry = Retry(backoff(), retries=-1, supported_errors=REDIS_FAILURES)
        self._waiters: dict[str, _Waiter] = {}
        self._reporting: set[str] = set()  # the finished requests whose report (webhook) runs here
        self._depth, self._oldest_s, self._replicas = 0, 0.0, 1

    # the fleet's figures, as of the last heartbeat
    @property
    def waiting(self) -> int:
        return self._depth

    @property
    def replicas(self) -> int:
        return self._replicas

    @property
    def oldest_wait_s(self) -> float:
        return self._oldest_s

    def _upkeep(self):
        return [("heartbeat", self._heartbeat_once, True), ("listener", self._listen_once, False)]

    def _started(self) -> None:
        log.info("queue: Redis at %s, replica %s, %d feeders", where(self.redis), self.replica, self.concurrency)

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    # look-ups
    async def get(self, request_id: str) -> Record | None:
        if len(request_id) > 100:  # ours are UUIDs; a longer key is nobody's
            return None
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hmget(self.scripts.key(request_id), SNAPSHOT_FIELDS)
                pipe.zrank(self.scripts.fixed[0], request_id)
                values, rank = await pipe.execute()
        except REDIS_FAILURES as exc:
            raise self._unavailable("read", exc) from None
        fields = dict(zip(SNAPSHOT_FIELDS, values, strict=True))
        return record_from(request_id, fields, rank or 0) if fields["status"] else None

    async def position(self, record: Record) -> int:
        if record.position is not None:
            return record.position
        try:
            return await self.redis.zrank(self.scripts.fixed[0], record.id) or 0
        except REDIS_FAILURES as exc:
            raise self._unavailable("read", exc) from None

    async def wait(self, record: Record) -> Record:
        """Woken by this replica's own finish, or by the ``done`` channel when another replica
        finished it; a read every ``WAIT_READ_EVERY_S`` besides, in case a message was lost with a
        connection."""
        waiter = self._waiters.setdefault(record.id, _Waiter(record))
        try:
            while True:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(waiter.woken.wait(), self.WAIT_READ_EVERY_S)
                if waiter.finished is not None:
                    return waiter.finished
                waiter.woken.clear()
                with contextlib.suppress(QueueUnavailable):  # still waiting: Redis may come back
                    snapshot = await self.get(record.id)
                    if snapshot is None or snapshot.status == Status.COMPLETED:
                        return snapshot or record
        finally:
            self._waiters.pop(record.id, None)

    # the transport
    async def _add(self, record: Record) -> str | None:
        try:
            rank = await self.scripts(
                "submit",
                [record.id],
                id=record.id,
                max_length=self.settings.max_length,
                max_bytes=self.settings.max_waiting_bytes,
                size=record.size,
                line=record.front_logs[0].model_dump_json(),
                fields=request_fields(record),
            )
        except REDIS_FAILURES as exc:  # unreachable, out of memory, READONLY, a script error: all 503
            raise self._unavailable("submit", exc) from None
        if rank < 0:
            return "length" if rank == -1 else "bytes"
        record.position = rank
        return None

    async def _claim(self) -> tuple[Record, int] | None:
        head = await self.redis.zrange(self.scripts.fixed[0], 0, 0)
        if not head:
            await self.redis.blpop([self.scripts.fixed[7]], timeout=REDIS_BLOCKING_POP_S)  # woken by a submit
            return None
        flat = await self.scripts("claim", head, id=head[0], owner=self.replica, lease_ms=self.lease_ms)
        if not flat:  # another feeder took it first
            return None
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        return record_from(head[0], fields), int(fields["attempts"])

    async def _write_finish(
        self, record: Record, outcome: Outcome | None, error: InpaintError | None, line: LogLine, own: bool
    ) -> bool:
        """A feeder's finish of its own claim waits for Redis to take it (else the result would be
        lost), until this replica lets its work go: then its lease runs out and another replica
        runs it. An end from anyone (cancel, deadline) answers 503 when Redis fails instead."""

        def call() -> Any:
            return self.scripts(
                "finish",
                [record.id],
                id=record.id,
                token=secrets.token_hex(8),
                owner=self.replica if own else "",
                reporter=self.replica if self.on_finish is not None else "",
                lease_ms=self.lease_ms,
                retention_s=self.settings.result_retention_s,
                max_retained=self.settings.max_retained,
                line=line.model_dump_json(),
                fields=outcome_fields(outcome, error),
                channel=self.p + "done",
            )

        if own:
            try:
                won, over = await self._until_answered("finish", call, give_up=lambda: self._let_go_done)
            except GaveUp:
                log.error("request %s: finished, but Redis is unreachable to record it", record.id)
                return False
        else:
            try:
                won, over = await call()
            except REDIS_FAILURES as exc:
                raise self._unavailable("finish", exc) from None
        if over:  # past FLUX_QUEUE_MAX_RETAINED; the next finish tries again if this fails
            with contextlib.suppress(*REDIS_FAILURES):
                await self.scripts("forget", over)
        return bool(won)

    def _ended_here(self, record: Record, won: bool) -> None:
        if (waiter := self._waiters.get(record.id)) is not None:
            if won:
                waiter.finished = record
            waiter.woken.set()

    async def _write_progress(self, changed: dict[str, list[LogLine]]) -> None:
        logs = {request_id: logs_json(lines) for request_id, lines in changed.items()}
        await self.scripts("progress", list(changed), owner=self.replica, logs=logs)

    async def _hand_back(self, records: list[Record], message: str) -> None:
        """Back to their place in the line, the attempt not counted; this replica drops them."""
        self._handed_back.update(record.id for record in records)
        line = LogLine(message=message, source="queue").model_dump_json()
        try:
            await self.scripts("hand_back", [r.id for r in records], owner=self.replica, line=line)
        except REDIS_FAILURES as exc:  # their leases run out instead, and another replica takes them
            self._redis_failed("hand_back", exc)

    def _unanswered(self) -> list[_Waiter]:
        return [w for w in self._waiters.values() if w.finished is None and w.record.status != Status.COMPLETED]

    def _unsettled(self) -> bool:
        return bool(self._held or self._unanswered())

    async def _release(self) -> None:
        """Hand back to the line what still runs here (another replica runs it) and fail the sync
        requests whose callers are connected here (503 ``server_draining``). Requests waiting in the
        line are not touched: the other replicas take them."""
        for waiter in self._unanswered():
            with contextlib.suppress(InpaintError):
                await self.end(waiter.record, ServerDraining(DRAINING_MESSAGE))
        held = [record for record in self._held.values() if record.status != Status.COMPLETED]
        if held:
            await self._hand_back(held, HANDED_BACK_LINE)
            log.info("handed %d running request(s) back to the line", len(held))
        for record in held:
            await self._stop_in_model(record.id)

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
                # Dropped once Redis answers (the heartbeat renews the claim meanwhile): a claim left
                # to run out would make another replica deliver the webhook again.
                await self._until_answered("report", lambda: self.redis.zrem(self.scripts.fixed[2], record.id))
            self._reporting.discard(record.id)

    async def _listen_once(self) -> None:
        """Wake this replica's waiters when another replica finishes their request."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.p + "done")
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is not None and (waiter := self._waiters.get(message["data"])) is not None:
                    waiter.woken.set()
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    # Redis failures
    async def _until_answered(self, operation: str, call, give_up=lambda: False) -> Any:
        """``call()`` until Redis answers, through redis-py's ``Retry`` (the queue's one retry
        mechanism); raises ``GaveUp`` once ``give_up()`` says so after a failed try."""

        async def failed(exc: Exception) -> None:
            self._redis_failed(operation, exc)
            if give_up():
                raise GaveUp from exc

        return await self._redis_retry.call_with_retry(call, failed)

    def _redis_failed(self, operation: str, exc: Exception) -> None:
        self._check_cancelled()
        REDIS_ERRORS.labels(operation=operation).inc()
        self._warn("redis", "Redis failed (%s): %s: %s", operation, type(exc).__name__, exc)

    def _unavailable(self, operation: str, exc: Exception) -> QueueUnavailable:
        self._redis_failed(operation, exc)
        return QueueUnavailable()
