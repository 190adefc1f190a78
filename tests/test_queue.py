"""The front's request queue against a fake worker: positions, cancellation, limits, retention."""

from __future__ import annotations

import asyncio

import pytest

from runners.config import QueueSettings
from runners.errors import ImageLoadError, QueueFull
from runners.progress import JobProgress, LogLine
from runners.queue import Outcome, RequestQueue, Status
from runners.schema import InpaintRequest

REQUEST = InpaintRequest(prompt="p", image_url="data:,", mask_url="data:,")


class FakeWorker:
    """Runs whatever it is handed until the test releases it, reporting progress like the worker."""

    def __init__(self):
        self.release: dict[str, asyncio.Event] = {}
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.fail: set[str] = set()

    async def run(self, record):
        self.started.append(record.id)
        event = self.release.setdefault(record.id, asyncio.Event())
        await event.wait()
        if record.id in self.fail:
            raise ImageLoadError("image_url", "broken")
        return Outcome(output={"images": [], "seed": 1}, logs=[LogLine(message="step 1/1")], inference_time=0.5)

    async def cancel(self, request_id):
        self.cancelled.append(request_id)
        self.release.setdefault(request_id, asyncio.Event()).set()

    async def progress(self, request_ids):
        return {i: JobProgress(started=True, logs=[LogLine(message="step 1/2")]) for i in request_ids if i in self.started}

    def finish(self, record):
        self.release.setdefault(record.id, asyncio.Event()).set()


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 10))


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_positions_progress_and_completion():
    async def scenario():
        worker = FakeWorker()
        queue = RequestQueue(QueueSettings(), concurrency=1, executor=worker)
        queue.POLL_INTERVAL_S = 0.01
        first, second, third = [await queue.submit(REQUEST, "http://h/") for _ in range(3)]
        await settle()
        assert first.dispatched and queue.position(first) == 0
        assert [queue.position(second), queue.position(third)] == [0, 1]
        await asyncio.sleep(0.05)  # the poller sees the worker's progress
        assert first.status == Status.IN_PROGRESS and [l["message"] for l in first.logs] == ["queued", "step 1/2"]
        assert second.status == Status.IN_QUEUE
        worker.finish(first)
        await first.done.wait()
        assert first.status == Status.COMPLETED and first.outcome.output["seed"] == 1
        assert [l["message"] for l in first.logs] == ["queued", "completed", "step 1/1"]
        assert queue.position(third) == 0  # second moved to the worker
        await queue.stop()

    run(scenario())


def test_cancel_queued_never_runs_and_cancel_running_reaches_the_worker():
    async def scenario():
        worker = FakeWorker()
        queue = RequestQueue(QueueSettings(), concurrency=1, executor=worker)
        running = await queue.submit(REQUEST, "http://h/")
        waiting = await queue.submit(REQUEST, "http://h/")
        await settle()
        assert await queue.cancel(waiting.id) == "CANCELLATION_REQUESTED"
        assert waiting.status == Status.COMPLETED and waiting.error.error_type == "request_cancelled"
        assert await queue.cancel(running.id) == "CANCELLATION_REQUESTED"
        assert worker.cancelled == [running.id] and running.error.error_type == "request_cancelled"
        await settle()
        assert waiting.id not in worker.started  # it never ran
        assert await queue.cancel(running.id) == "ALREADY_COMPLETED"
        assert await queue.cancel("nope") == "NOT_FOUND"
        assert queue.depth == 0
        await queue.stop()

    run(scenario())


def test_queue_length_is_bounded():
    async def scenario():
        queue = RequestQueue(QueueSettings(max_length=3), concurrency=1, executor=FakeWorker())
        for _ in range(3):
            await queue.submit(REQUEST, "http://h/")
        with pytest.raises(QueueFull) as error:
            await queue.submit(REQUEST, "http://h/")
        assert error.value.status == 429
        await queue.stop()

    run(scenario())


def test_failures_complete_with_their_error_and_results_expire():
    async def scenario():
        now = [0.0]
        worker = FakeWorker()
        finished = []

        async def on_finish(record):
            finished.append(record.id)

        queue = RequestQueue(QueueSettings(result_retention_s=60, max_retained=10), concurrency=2,
                             executor=worker, on_finish=on_finish, clock=lambda: now[0])
        good, bad = await queue.submit(REQUEST, "http://h/"), await queue.submit(REQUEST, "http://h/")
        worker.fail.add(bad.id)
        await settle()
        worker.finish(good), worker.finish(bad)
        await good.done.wait(), await bad.done.wait()
        await settle()
        assert bad.error.status == 422 and bad.error.error_type == "image_load_error"
        assert good.error is None and set(finished) == {good.id, bad.id}
        now[0] = 59
        assert queue.get(good.id) is good
        now[0] = 61
        assert queue.get(good.id) is None and queue.get(bad.id) is None
        await queue.stop()

    run(scenario())


def test_only_the_newest_finished_requests_are_kept():
    async def scenario():
        worker = FakeWorker()
        queue = RequestQueue(QueueSettings(max_retained=10), concurrency=4, executor=worker)
        records = []
        for _ in range(12):
            record = await queue.submit(REQUEST, "http://h/")
            await settle()
            worker.finish(record)
            await record.done.wait()
            records.append(record)
        await queue.submit(REQUEST, "http://h/")  # submitting forgets the surplus
        assert queue.get(records[0].id) is None and queue.get(records[1].id) is None
        assert queue.get(records[2].id) is records[2]
        await queue.stop()

    run(scenario())
