"""The Redis queue's upkeep (runners/front/redis_queue.py): one heartbeat per poll renews this
replica's leases and report claims, puts the work of replicas that stopped renewing theirs back in
the line, takes over their undelivered reports, and ends the waiting requests past their deadline.
Run as a supervised loop of the life cycle (runners/front/life_cycle.py): a pass that fails is
counted and tried again, and a Redis that answers again finds every lease renewed at the next pass.
"""

from __future__ import annotations

import logging
import time

from runners.errors import QueueUnavailable, RequestCancelled, RequestTimedOut
from runners.front.metrics import REPORTS_TAKEN_OVER, RERUNS
from runners.front.queue import Status
from runners.protocol.progress import LogLine

log = logging.getLogger(__name__)
REQUEUED_LINE = LogLine(
    message="the replica running it stopped answering; queued again", source="queue", level="WARNING"
).model_dump_json()
TAKEN_BACK_LINE = LogLine(message="its replica answered again and goes on with it", source="queue").model_dump_json()
HEAD = 16  # the first requests of the line checked for their deadline at each beat
EXPIRING = 32  # the claims checked for a lease that ran out, the first to expire first


class Upkeep:
    """The heartbeat half of ``RedisQueue`` (a mixin: it reads the queue's state)."""

    REPORTS_PER_POLL = 8  # the most reports of other replicas one beat takes over

    async def _heartbeat_once(self) -> None:
        # Reports are taken over only by a replica that will be around to deliver them.
        wanted = 0 if self.on_finish is None or self.draining else self.REPORTS_PER_POLL
        keys = self.scripts
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrange(keys.fixed[0], 0, HEAD - 1)  # waiting, by arrival
            pipe.zrange(keys.fixed[1], 0, EXPIRING - 1)  # running, by lease expiry
            pipe.zrange(keys.fixed[2], 0, max(wanted, 1) - 1)  # unreported, by claim expiry
            head, expiring, unreported = await pipe.execute()
        held = [record_id for record_id in self._held if record_id not in self._handed_back]
        reporting = list(self._reporting)
        unreported = unreported if wanted else []
        answer = await self.scripts(
            "heartbeat",
            [*held, *reporting, *head, *expiring, *unreported],
            owner=self.replica,
            lease_ms=self.lease_ms,
            taken_back_line=TAKEN_BACK_LINE,
            requeued_line=REQUEUED_LINE,
            now_s=time.time(),
            wanted=wanted,
            max_attempts=self.settings.max_attempts,
            held=held,
            reporting=reporting,
            head=head,
            running=expiring,
            unreported=unreported,
        )
        depth, oldest_ms, replicas, lost, late, taken, dropped, requeued = answer
        self._depth, self._oldest_s, self._replicas = int(depth), int(oldest_ms) / 1000, max(1, int(replicas))
        self._changed()
        if requeued:
            RERUNS.inc(requeued)
            log.warning("%d request(s) whose replica stopped renewing its lease queued again", requeued)
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
        await self._end_waiting(late)
        await self._take_over_reports(taken)

    async def _end_waiting(self, late: list[str]) -> None:
        """A request that waits past its deadline ends then (504), as in the memory queue, not
        when a replica next claims it: with every feeder busy that could be much later."""
        for request_id in late:
            record = await self.get(request_id)
            if record is not None and record.status != Status.COMPLETED:
                await self._end(record, RequestTimedOut.while_waiting())

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
