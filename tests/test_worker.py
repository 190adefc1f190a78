"""The model worker's readiness: false until the model is loaded and one warm-up inference ran."""

from __future__ import annotations

import threading

import pytest

from runners.config import load_settings
from runners.front.executor import BentoWorkerClient
from runners.pipeline.inpaint import Inpainter
from runners.worker.model_worker import ModelWorker
from tests.test_batch import job


def Worker():  # noqa: N802 (stands for the class)
    """What service.py's InpaintWorker wraps."""
    return ModelWorker(load_settings())


def call_inpaint(worker, jobs):
    return worker.inpaint(jobs)


@pytest.fixture
def gated_load(monkeypatch, tiny_model):
    """Model loading that waits for the test to release it."""
    release = threading.Event()
    warmups = []

    def load_model(settings, lora_settings=None, fetcher=None):
        release.wait(30)
        return tiny_model

    monkeypatch.setattr("runners.pipeline.model.load_model", load_model)
    import runners.worker.adaptive

    real_run_jobs = runners.worker.adaptive.run_jobs
    watched = []  # the worker under test, to check its readiness during the warm-up

    def run_jobs(inpainter, jobs, board=None):
        if [j.request_id for j in jobs] == ["warm-up"]:
            warmups.append(not any(w.ready.is_set() for w in watched))  # still unready while warming up
        return real_run_jobs(inpainter, jobs, board)

    monkeypatch.setattr(runners.worker.adaptive, "run_jobs", run_jobs)
    return release, warmups, watched


def test_not_ready_until_loaded_and_warmed(gated_load):
    release, warmups, watched = gated_load
    worker = Worker()
    watched.append(worker)
    assert not worker.ready.is_set() and worker.alive
    (result,) = call_inpaint(worker, [job("early")])
    assert result.error is not None and result.error.status == 503
    assert result.error.error_type == "model_not_ready"
    release.set()
    assert worker.ready.wait(60)
    assert warmups == [True] and isinstance(worker.inpainter, Inpainter)
    (result,) = call_inpaint(worker, [job("later")])
    assert result.error is None and len(result.images) == 1


def test_a_model_that_fails_to_load_says_why_and_ends_the_process(monkeypatch):
    """The worker ends its process (tests/test_startup.py sees the whole `bentoml serve` stop); here
    the exit is recorded instead, so the test process survives it."""

    def load_model(settings, lora_settings=None, fetcher=None):
        raise OSError("black-forest-labs/FLUX.1-dev is not reachable (offline)")

    monkeypatch.setattr("runners.pipeline.model.load_model", load_model)
    exits = []
    worker = ModelWorker(load_settings(), exit_process=exits.append)
    for _ in range(200):
        if exits:
            break
        threading.Event().wait(0.05)
    assert exits == [ModelWorker.LOAD_FAILED_EXIT] and "not reachable" in worker.load_error
    assert not worker.ready.is_set() and not worker.alive
    (result,) = call_inpaint(worker, [job("x")])
    assert result.error.status == 503 and "not reachable" in str(result.error.detail)


def test_a_worker_call_whose_pooled_connection_was_closed_is_tried_once_more():
    import asyncio

    import aiohttp

    from runners.errors import WorkerUnavailable

    class FlakyWorker:
        def __init__(self, failures, failure):
            self.failures, self.calls, self.failure = failures, 0, failure
            self.to_async = self

        async def progress(self, request_ids):
            self.calls += 1
            if self.calls <= self.failures:
                raise self.failure
            return {"jobs": {}}

    # Dropped before the answer, and while its body was read (aiohttp's bare RuntimeError: a 500 once)
    for failure in (aiohttp.ServerDisconnectedError(), RuntimeError("Connection closed.")):
        once = FlakyWorker(failures=1, failure=failure)
        assert asyncio.run(BentoWorkerClient(once).progress(["a"])) == {}
        assert once.calls == 2
    other = FlakyWorker(failures=1, failure=RuntimeError("something else"))  # not a lost connection: not sent again
    with pytest.raises(RuntimeError, match="something else"):
        asyncio.run(BentoWorkerClient(other).progress(["a"]))
    assert other.calls == 1
    always = FlakyWorker(failures=5, failure=aiohttp.ServerDisconnectedError())
    with pytest.raises(WorkerUnavailable) as error:
        asyncio.run(BentoWorkerClient(always).progress(["a"]))
    assert error.value.status == 503 and always.calls == 2
