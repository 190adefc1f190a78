"""The front's in-memory request queue against a fake worker: positions, cancellation, limits, retention."""

from __future__ import annotations

import asyncio

import pytest

from runners.config import QueueSettings
from runners.errors import ImageLoadError, QueueFull, ServerDraining
from runners.front.memory_queue import MemoryQueue
from runners.front.queue import Outcome, Status
from runners.protocol.progress import JobProgress, LogLine
from runners.protocol.schema import InpaintRequest

REQUEST = InpaintRequest(prompt="p", image_url="data:,", mask_url="data:,")


class FakeWorker:
    """Runs whatever it is handed until the test releases it, reporting progress like the worker."""

    def __init__(self):
        self.release: dict[str, asyncio.Event] = {}
        self.started: list[str] = []
        self.attempts: list[int] = []  # each run's Record.attempt
        self.cancelled: list[str] = []
        self.fail: set[str] = set()

    async def run(self, record):
        self.started.append(record.id)
        self.attempts.append(record.attempt)
        event = self.release.setdefault(record.id, asyncio.Event())
        await event.wait()
        if record.id in self.fail:
            raise ImageLoadError("image_url", "broken")
        return Outcome(output={"images": [], "seed": 1}, logs=[LogLine(message="step 1/1")], inference_time=0.5)

    async def cancel(self, request_id):
        self.cancelled.append(request_id)
        self.release.setdefault(request_id, asyncio.Event()).set()

    async def progress(self, request_ids):
        return {
            i: JobProgress(started=True, logs=[LogLine(message="step 1/2")]) for i in request_ids if i in self.started
        }

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
        queue = MemoryQueue(QueueSettings(), concurrency=1, executor=worker)
        queue.POLL_INTERVAL_S = 0.01
        first, second, third = [await queue.submit(REQUEST, "http://h/") for _ in range(3)]
        await settle()
        assert first.dispatched and await queue.position(first) == 0
        assert [await queue.position(second), await queue.position(third)] == [0, 1]
        await asyncio.sleep(0.05)  # the poller sees the worker's progress
        assert first.status == Status.IN_PROGRESS and [line["message"] for line in first.logs] == ["queued", "step 1/2"]
        assert second.status == Status.IN_QUEUE
        worker.finish(first)
        await first.done.wait()
        assert first.status == Status.COMPLETED and first.outcome.output["seed"] == 1
        assert [line["message"] for line in first.logs] == ["queued", "step 1/1", "completed"]  # docs/api.md's order
        assert await queue.position(third) == 0  # second moved to the worker
        await queue.stop()

    run(scenario())


class SilentWorker(FakeWorker):
    """Reports no progress, as a request between two polls (or Triton, which has none)."""

    async def progress(self, request_ids):
        return {}


def test_a_request_is_in_progress_once_a_feeder_takes_it_before_any_progress():
    async def scenario():
        worker = SilentWorker()
        queue = MemoryQueue(QueueSettings(), concurrency=1, executor=worker)
        first, second = [await queue.submit(REQUEST, "http://h/") for _ in range(2)]
        await settle()
        assert worker.started == [first.id]
        assert (first.status, second.status) == (Status.IN_PROGRESS, Status.IN_QUEUE)
        await queue.stop()

    run(scenario())


def test_cancel_queued_never_runs_and_cancel_running_reaches_the_worker():
    async def scenario():
        worker = FakeWorker()
        queue = MemoryQueue(QueueSettings(), concurrency=1, executor=worker)
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
        assert (queue.waiting, queue.in_flight) == (0, 0)
        await queue.stop()

    run(scenario())


def test_waiting_requests_are_bounded_and_in_flight_by_concurrency():
    async def scenario():
        seen = []
        queue = MemoryQueue(
            QueueSettings(max_length=2),
            concurrency=1,
            executor=FakeWorker(),
            on_change=lambda q: seen.append((q.waiting, q.in_flight)),
        )
        await queue.submit(REQUEST, "http://h/")
        await settle()  # the first is in flight: it no longer counts against the waiting room
        for _ in range(2):
            await queue.submit(REQUEST, "http://h/")
        with pytest.raises(QueueFull) as error:
            await queue.submit(REQUEST, "http://h/")
        assert error.value.status == 429
        assert (queue.waiting, queue.in_flight) == (2, 1)
        assert seen[-1] == (2, 1) and (0, 1) in seen  # the metrics hook saw every change
        await queue.stop()

    run(scenario())


def test_a_waiting_request_ends_at_its_deadline_without_running():
    async def scenario():
        worker = FakeWorker()
        queue = MemoryQueue(QueueSettings(), concurrency=1, executor=worker, request_timeout_s=0.2)
        queue.POLL_INTERVAL_S = 0.02
        running = await queue.submit(REQUEST, "http://h/")
        waiting = await queue.submit(REQUEST, "http://h/")
        await waiting.done.wait()
        assert waiting.error.status == 504 and waiting.error.error_type == "request_timeout"
        assert waiting.id not in worker.started and queue.waiting == 0
        assert running.deadline is not None and not running.done.is_set()  # the worker has its grace
        await queue.stop()

    run(scenario())


def test_a_running_request_unanswered_past_its_deadline_is_stopped():
    async def scenario():
        worker = FakeWorker()
        queue = MemoryQueue(QueueSettings(), concurrency=1, executor=worker, request_timeout_s=0.1)
        queue.POLL_INTERVAL_S, queue.DEADLINE_GRACE_S = 0.02, 0.1
        record = await queue.submit(REQUEST, "http://h/")
        await record.done.wait()
        assert record.error.error_type == "request_timeout" and worker.cancelled == [record.id]
        await queue.stop()

    run(scenario())


def test_drain_refuses_new_work_finishes_what_it_can_and_reports_the_rest():
    async def scenario():
        worker = FakeWorker()
        finished = []

        async def on_finish(record):
            await asyncio.sleep(0.05)  # a webhook delivery the drain waits for
            finished.append(record.id)

        queue = MemoryQueue(QueueSettings(), concurrency=1, executor=worker, on_finish=on_finish)
        quick, stuck, waiting = [await queue.submit(REQUEST, "http://h/") for _ in range(3)]
        await settle()
        drain = asyncio.create_task(queue.drain(timeout_s=0.5))
        await settle()
        with pytest.raises(ServerDraining) as refused:
            await queue.submit(REQUEST, "http://h/")
        assert refused.value.status == 503
        worker.finish(quick)  # finishes inside the grace period; the next one never finishes
        await drain
        assert quick.error is None
        assert stuck.error.error_type == "server_draining" and waiting.error.error_type == "server_draining"
        assert stuck.id in worker.cancelled and waiting.id not in worker.started
        assert set(finished) == {quick.id, stuck.id, waiting.id}  # every caller's webhook was told
        await queue.stop()

    run(scenario())


def test_failures_complete_with_their_error_and_results_expire():
    async def scenario():
        now = [0.0]
        worker = FakeWorker()
        finished = []

        async def on_finish(record):
            finished.append(record.id)

        queue = MemoryQueue(
            QueueSettings(result_retention_s=60, max_retained=10),
            concurrency=2,
            executor=worker,
            on_finish=on_finish,
            clock=lambda: now[0],
        )
        good, bad = await queue.submit(REQUEST, "http://h/"), await queue.submit(REQUEST, "http://h/")
        worker.fail.add(bad.id)
        await settle()
        worker.finish(good), worker.finish(bad)
        await good.done.wait(), await bad.done.wait()
        await settle()
        assert bad.error.status == 422 and bad.error.error_type == "image_load_error"
        assert good.error is None and set(finished) == {good.id, bad.id}
        now[0] = 59
        assert await queue.get(good.id) is good
        now[0] = 61
        assert await queue.get(good.id) is None and await queue.get(bad.id) is None
        await queue.stop()

    run(scenario())


def test_only_the_newest_finished_requests_are_kept():
    async def scenario():
        worker = FakeWorker()
        queue = MemoryQueue(QueueSettings(max_retained=10), concurrency=4, executor=worker)
        records = []
        for _ in range(12):
            record = await queue.submit(REQUEST, "http://h/")
            await settle()
            worker.finish(record)
            await record.done.wait()
            records.append(record)
        await queue.submit(REQUEST, "http://h/")  # submitting forgets the surplus
        assert await queue.get(records[0].id) is None and await queue.get(records[1].id) is None
        assert await queue.get(records[2].id) is records[2]
        await queue.stop()

    run(scenario())


def test_stopping_without_a_drain_still_answers_every_caller():
    async def scenario():
        worker = FakeWorker()
        queue = MemoryQueue(QueueSettings(), concurrency=1, executor=worker)
        running, waiting = await queue.submit(REQUEST, "http://h/"), await queue.submit(REQUEST, "http://h/")
        await settle()
        await queue.stop()  # e.g. a second SIGTERM, or a process whose signals could not be handled
        assert running.error.error_type == "server_draining" and waiting.error.error_type == "server_draining"
        assert running.done.is_set() and waiting.done.is_set()

    run(scenario())


def test_waiting_input_bytes_are_bounded_and_finished_requests_drop_their_images():
    async def scenario():
        worker = FakeWorker()
        big = REQUEST.model_copy(update={"image_url": "data:image/png;base64," + "A" * 600_000})
        queue = MemoryQueue(QueueSettings(max_waiting_bytes=1024**2), concurrency=1, executor=worker)
        first = await queue.submit(big, "http://h/")
        await settle()  # in flight: its bytes no longer count as waiting
        await queue.submit(big, "http://h/")
        with pytest.raises(QueueFull):
            await queue.submit(big, "http://h/")  # two waiting would pass 1 MiB
        worker.finish(first)
        await first.done.wait()
        assert first.request.image_url == "-" and first.request.prompt == REQUEST.prompt
        await queue.stop()

    run(scenario())


def test_a_rerun_reaches_the_model_under_its_own_id_so_a_worker_that_saw_the_first_attempt_runs_it(monkeypatch):
    """The Redis queue runs a dead replica's request again under the same request id, maybe on a
    replica whose model worker saw the first attempt: that worker's board keeps a cancel for an
    hour and its ledger answers a repeated id from the first run. Each attempt must be new to it."""
    from runners.errors import InpaintError, RequestCancelled
    from runners.front import executor as executor_module
    from runners.front.executor import Executor
    from runners.front.queue import Record
    from runners.protocol.jobs import InpaintJob, JobResult
    from runners.worker.board import JobBoard

    class BoardClient:  # the worker's rules: cancelled ids stay cancelled, each id runs once
        def __init__(self):
            self.board, self.seen, self.running = JobBoard(), set(), asyncio.Event()

        async def infer(self, job):
            if job.request_id in self.seen or self.board.is_cancelled(job.request_id):
                return JobResult.failed(job.request_id, RequestCancelled())
            self.seen.add(job.request_id)
            self.board.start(job.request_id, "started")
            self.running.set()
            while not self.board.is_cancelled(job.request_id):
                await asyncio.sleep(0.01)
                if len(self.seen) > 1:  # the re-run: let it finish
                    return JobResult(request_id=job.request_id, logs=self.board.finish(job.request_id))
            return JobResult.failed(job.request_id, RequestCancelled())

        async def cancel(self, request_id):
            self.board.cancel(request_id)

        async def progress(self, request_ids):
            return self.board.snapshot(request_ids)

    async def prepare(request, limits, request_id, *args, **kwargs):
        return InpaintJob(
            request_id=request_id, request=request, width=16, height=16, seed=1, image_png=b"", mask_png=b""
        )

    monkeypatch.setattr(executor_module, "prepare_job", prepare)
    monkeypatch.setattr(
        executor_module,
        "fal_output",
        lambda job, result, *a: type(
            "Out",
            (),
            {"timings": {"total": 0.0}, "images": [], "model_dump": lambda self: {"request_id": result.request_id}},
        )(),
    )

    async def scenario():
        client = BoardClient()
        executor = Executor(client, type("S", (), {"images": None})(), None, None, None, "tiny")
        record = Record(request=REQUEST, base_url="http://h/")
        first = asyncio.create_task(executor.run(record))
        await client.running.wait()
        assert (await executor.progress([record.id]))[record.id].logs[0].message == "started"
        await executor.cancel(record.id)  # its replica lost the claim: the worker stops it
        with pytest.raises(InpaintError) as ended:
            await first
        assert ended.value.error_type == "request_cancelled"
        rerun = Record(request=REQUEST, base_url="http://h/", id=record.id, attempt=2)  # claimed again
        outcome = await executor.run(rerun)
        assert outcome.output == {"request_id": f"{record.id}-attempt-2"} and outcome.logs[0].message == "started"

    run(scenario())


def test_an_errors_kind_is_its_class_not_its_status():
    """Only a failure of the replica's model tier may run again elsewhere; a storage outage is a
    503 too, and ends the request. The kind survives the trip across tiers (``ReportedError``)."""
    from runners.errors import ModelNotReady, ReportedError, StorageUnavailable, WorkerUnavailable

    assert WorkerUnavailable("x").retry_elsewhere and ModelNotReady("x").retry_elsewhere
    assert not StorageUnavailable("x").retry_elsewhere and not ImageLoadError("image_url", "x").retry_elsewhere
    assert ReportedError(503, "model_not_ready", "loading").retry_elsewhere
    assert not ReportedError(503, "storage_unavailable", "refused").retry_elsewhere


def test_a_storage_outage_ends_the_request_once_with_its_own_type():
    from runners.errors import StorageUnavailable

    class StorageDown(FakeWorker):
        async def run(self, record):
            self.started.append(record.id)
            raise StorageUnavailable("could not store the output image: refused")

    async def scenario():
        worker = StorageDown()
        queue = MemoryQueue(QueueSettings(), concurrency=1, executor=worker)
        record = await queue.submit(REQUEST, "http://h/")
        await record.done.wait()
        assert (record.error.status, record.error.error_type) == (503, "storage_unavailable")
        assert worker.started == [record.id] and [line["message"].split(":")[0] for line in record.logs] == [
            "queued",
            "failed",
        ]
        await queue.stop()

    run(scenario())


def test_an_error_in_each_background_loop_is_counted_and_the_loop_goes_on():
    """The same supervision as the Redis queue's (one life cycle): a failing claim, progress read and
    deadline sweep are each counted, and every loop goes on."""
    import prometheus_client

    def errors(loop):
        return prometheus_client.REGISTRY.get_sample_value("flux_queue_loop_errors_total", {"loop": loop}) or 0.0

    async def scenario():
        worker = FakeWorker()
        queue = MemoryQueue(QueueSettings(), concurrency=1, executor=worker)
        queue.POLL_INTERVAL_S = 0.01
        failed: set[str] = set()

        def once(name, call):
            def wrapped(*args, **kwargs):
                if name not in failed:
                    failed.add(name)
                    raise RuntimeError(f"injected {name} error")
                return call(*args, **kwargs)

            return wrapped

        queue._claim = once("feeder", queue._claim)
        queue._deadlines_once = once("deadlines", queue._deadlines_once)
        worker.progress = once("progress", worker.progress)
        before = {loop: errors(loop) for loop in ("feeder", "progress", "deadlines")}
        record = await queue.submit(REQUEST, "http://h/")
        while not (failed == {"feeder", "progress", "deadlines"} and "step 1/2" in str(record.logs)):
            await asyncio.sleep(0.01)
        assert {loop: errors(loop) - before[loop] for loop in before} == {"feeder": 1, "progress": 1, "deadlines": 1}
        assert all(not task.done() for task in queue._tasks)
        worker.finish(record)
        await record.done.wait()
        assert record.error is None
        await queue.stop()

    run(scenario())
