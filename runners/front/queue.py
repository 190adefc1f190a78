"""The request queue of the HTTP front, which both fal routes use: one interface, two implementations.

Every request, synchronous or queued, becomes a ``Record``: it waits in a FIFO (that is its
``queue_position``), is handed to the model tier by one of a fixed number of feeder tasks (enough to
keep one batch running and the next forming in BentoML's dispatcher), and ends COMPLETED with an
output or an error. The routes (runners/front/fal_http.py) and the front (runners/front/app.py) see
only ``RequestQueue`` below. The life cycle behind it is written once (runners/front/life_cycle.py,
``LifeCycle``), over two transports:

- ``MemoryQueue`` (runners/front/memory_queue.py), the default: the line and the records live in
  this process's memory; one replica, and a restart loses them.
- ``RedisQueue`` (runners/front/redis_queue.py), with ``FLUX_QUEUE_URL``: the records and the line
  live in Redis, shared by every replica: any replica answers any request, each replica's feeders
  pull from one line when their model tier has room, and a dead replica's claimed work is run again
  by another (docs/fleet.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from runners.config import QueueSettings
from runners.errors import InpaintError
from runners.protocol.progress import JobProgress, LogLine
from runners.protocol.schema import InpaintRequest


class Status(str, Enum):
    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"


@dataclass
class Outcome:
    output: dict[str, Any]  # fal's output JSON
    logs: list[LogLine]
    inference_time: float


class Executor(Protocol):
    """How records reach the model: the BentoML worker, or a Triton server (runners/front/executor.py)."""

    async def run(self, record: Record) -> Outcome: ...  # raises InpaintError for the caller's faults
    async def cancel(self, request_id: str) -> None: ...
    async def progress(self, request_ids: list[str]) -> dict[str, JobProgress]: ...


@dataclass(eq=False)
class Record:
    """One request. The memory queue keeps and updates these objects; the Redis queue builds one
    from Redis for each look-up (a snapshot, ``request`` left out) and for each request it runs."""

    request: InpaintRequest | None  # None in a snapshot: the routes never need the inputs
    base_url: str  # for the URLs this request's answers carry
    webhook_url: str | None = None
    deadline: float | None = None  # unix time (it travels to the worker, maybe on another host)
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    submitted_at: float = field(default_factory=time.time)  # unix time
    status: Status = Status.IN_QUEUE
    dispatched: bool = False
    front_logs: list[LogLine] = field(default_factory=list)  # the queue's: queued, queued again ...
    worker_logs: list[LogLine] = field(default_factory=list)  # the model tier's: started, step i/N ...
    end_log: LogLine | None = None  # the queue's last: completed, or failed
    outcome: Outcome | None = None
    error: InpaintError | None = None
    finished_at: float | None = None
    position: int | None = None  # a Redis snapshot's place in the line when it was read
    attempt: int = 1  # which start of this request this is (the Redis queue runs a dead replica's again)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def size(self) -> int:
        """Bytes its inputs hold while it waits (data URIs can be tens of MB)."""
        return len(self.request.image_url) + len(self.request.mask_url) + len(self.request.prompt)

    @property
    def logs(self) -> list[dict[str, Any]]:
        """In the order they happened, as docs/api.md promises: "queued", then the model tier's
        ("started", "step i/N", ...) of the attempt that ran, then "completed" (or "failed: ...").
        A line the queue adds while a request waits again ("queued again") comes before the worker
        lines of the attempt after it: a re-run starts its worker lines afresh."""
        lines = [*self.front_logs, *self.worker_logs, *([self.end_log] if self.end_log else [])]
        return [line.model_dump() for line in lines]


def finished_line(error: InpaintError | None) -> LogLine:
    """The queue's last log line of a request."""
    return LogLine(
        message="completed" if error is None else f"failed: {error.message}",
        source="queue",
        level="INFO" if error is None else "ERROR",
    )


class RequestQueue(Protocol):
    """What the routes and the front use. ``submit`` raises ``QueueFull`` (429), ``ServerDraining``
    (503) or, on Redis, ``QueueUnavailable`` (503); look-ups raise the last too."""

    draining: bool

    @property
    def waiting(self) -> int:
        """Requests accepted and not yet handed to a model tier (in Redis: fleet-wide)."""

    @property
    def in_flight(self) -> int:
        """Requests this replica has handed to its model tier and not finished."""

    @property
    def replicas(self) -> int:
        """Replicas pulling from this line (1 in memory), so each can report its share of ``waiting``."""

    @property
    def oldest_wait_s(self) -> float:
        """How long the request at the head of the line has waited (0 when none waits)."""

    def ensure_started(self) -> None:
        """Start the feeders; call inside the server's event loop (idempotent)."""

    async def submit(self, request: InpaintRequest, base_url: str, webhook_url: str | None = None) -> Record: ...
    async def get(self, request_id: str) -> Record | None: ...
    async def position(self, record: Record) -> int:
        """Requests ahead of this one; 0 once handed to a model tier but not yet started."""

    async def wait(self, record: Record) -> Record:
        """Until the request is finished; the finished record."""

    async def cancel(self, request_id: str) -> str:
        """``CANCELLATION_REQUESTED``, ``ALREADY_COMPLETED`` or ``NOT_FOUND``."""

    async def end(self, record: Record, error: InpaintError) -> None:
        """End an unfinished request with ``error``: a waiting one never runs, a running one is told
        to leave its batch at the next denoising step (on whichever replica runs it)."""

    async def drain(self, timeout_s: float) -> None: ...
    async def stop(self) -> None: ...


class AfterFinish:
    """The after-finish work of finished records (request metrics, webhooks), run as tasks kept
    referenced until they end; a failure is logged, never lost. Each queue has one."""

    def __init__(self, on_finish: Callable[[Record], Awaitable[None]] | None) -> None:
        self.on_finish = on_finish
        self.tasks: set[asyncio.Task] = set()

    def start(self, record: Record) -> None:
        if self.on_finish is None:
            return
        task = asyncio.create_task(self.on_finish(record))
        self.tasks.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # a lost webhook must leave a trace
            logging.getLogger(__name__).error("after-finish work (webhook) failed", exc_info=task.exception())

    async def wait(self, timeout_s: float) -> None:
        """Until what is running has ended, or ``timeout_s`` (a drain's end)."""
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=timeout_s)


def make_queue(settings: QueueSettings, *args, **kwargs) -> RequestQueue:
    """The configured queue: in Redis with ``FLUX_QUEUE_URL``, else in memory. The other arguments
    are the life cycle's (runners/front/life_cycle.py, ``LifeCycle``): concurrency, executor,
    on_finish, request_timeout_s, on_change."""
    if settings.url:
        from runners.front.redis_queue import RedisQueue

        return RedisQueue(settings, *args, **kwargs)
    from runners.front.memory_queue import MemoryQueue

    return MemoryQueue(settings, *args, **kwargs)
