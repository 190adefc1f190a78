"""The in-process transport of the request life cycle (runners/front/life_cycle.py), the default.

A FIFO in this process's memory that the life cycle's feeders pull from, the records in a dict, and
the finished ones kept, bounded in number and retention, for status and result. Lost on restart
(docs/fleet.md puts it in Redis instead).

Limits: at most ``max_length`` waiting (429 past it) and ``max_waiting_bytes`` of their inputs;
``drain`` lets the whole line finish for its grace period (no other replica will run it), then
fails what is left, so no accepted request ends unreported.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque

from runners.errors import InpaintError, RequestTimedOut, ServerDraining
from runners.front.life_cycle import DRAINING_MESSAGE, LifeCycle
from runners.front.queue import Outcome, Record, Status
from runners.protocol.progress import LogLine

log = logging.getLogger(__name__)


class MemoryQueue(LifeCycle):
    """``RequestQueue`` in this process's memory."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pending: deque[Record] = deque()
        self._records: dict[str, Record] = {}
        self._finished: OrderedDict[str, Record] = OrderedDict()  # oldest first, for retention
        self._wakeup = asyncio.Condition()

    @property
    def waiting(self) -> int:
        """Requests accepted and not yet handed to the model."""
        return len(self._pending)

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

    # the transport
    async def _add(self, record: Record) -> str | None:
        self._forget_expired()
        if len(self._pending) >= self.settings.max_length:
            return "length"
        if record.size + sum(r.size for r in self._pending) > self.settings.max_waiting_bytes:
            return "bytes"
        self._records[record.id] = record
        self._pending.append(record)
        async with self._wakeup:
            self._wakeup.notify()
        return None

    async def _claim(self) -> tuple[Record, int]:
        async with self._wakeup:
            await self._wakeup.wait_for(lambda: bool(self._pending))
            record = self._pending.popleft()
        return record, 1

    async def _write_finish(
        self, record: Record, outcome: Outcome | None, error: InpaintError | None, line: LogLine, own: bool
    ) -> bool:
        if record.status == Status.COMPLETED:  # e.g. cancelled while the worker was still busy with it
            return False
        if record in self._pending:
            self._pending.remove(record)
        # Kept for status and result only: drop the input images (data URIs can be tens of MB).
        record.request = record.request.without_images()
        self._finished[record.id] = record
        return True

    async def _hand_back(self, records: list[Record], message: str) -> None:
        raise AssertionError("one replica hands nothing back")  # HANDS_BACK is False

    def _unfinished(self) -> list[Record]:
        return [r for r in self._records.values() if r.status != Status.COMPLETED]

    def _unsettled(self) -> bool:
        return bool(self._unfinished())

    async def _release(self) -> None:
        if unfinished := self._unfinished():
            log.warning("%d request(s) unfinished at shutdown; failing them (503 server_draining)", len(unfinished))
        for record in unfinished:
            await self.end(record, ServerDraining(DRAINING_MESSAGE))

    async def _end_late_waiting(self) -> None:
        now = time.time()
        for record in [r for r in self._pending if r.deadline is not None and now > r.deadline]:
            await self.end(record, RequestTimedOut.while_waiting())

    def _forget_expired(self) -> None:
        now = self.clock()
        while self._finished:
            oldest_id, oldest = next(iter(self._finished.items()))
            expired = now - oldest.finished_at > self.settings.result_retention_s
            if not expired and len(self._finished) <= self.settings.max_retained:
                break
            del self._finished[oldest_id]
            self._records.pop(oldest_id, None)
