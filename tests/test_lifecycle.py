"""SIGTERM drains first, then reaches the server's own handler; a second SIGTERM cuts the drain short."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from runners.lifecycle import drain_on_sigterm


def test_sigterm_runs_the_drain_before_the_servers_handler_and_a_second_one_skips_it():
    events, exits = [], []  # exits: the after-drain exit, recorded here instead of ending pytest
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: events.append("server handler"))  # uvicorn's, here

    async def scenario():
        release = asyncio.Event()

        async def drain():
            events.append("drain started")
            await release.wait()
            events.append("drain done")

        assert drain_on_sigterm(drain, "test", shutdown_grace_s=0.3, exit_after_grace=exits.append)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.05)
        assert events == ["drain started"]  # the server keeps running while it drains
        release.set()
        await asyncio.sleep(0.05)
        assert events == ["drain started", "drain done", "server handler"]
        assert exits == []  # the server's own shutdown gets its grace first ...
        deadline = time.monotonic() + 30
        while not exits and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert exits == [1]  # ... then a process still running is ended, non-zero

        events.clear()
        assert drain_on_sigterm(drain, "test", exit_after_grace=exits.append)
        release.clear()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # impatient: the drain is cut short, then the exit goes on
        await asyncio.sleep(0.05)
        assert events[0] == "drain started" and "drain done" not in events and events[-1] == "server handler"

    try:
        asyncio.run(scenario())
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_outside_an_event_loop_it_declines():
    assert drain_on_sigterm(lambda: None, "test") is False


def test_the_bentoml_socket_patch_is_pinned_to_the_bentoml_it_was_written_for():
    """Fails on a BentoML upgrade: the patch reaches into BentoML's private ``Arbiter`` (its stop
    runs the socket cleanup before circus stops the processes). Re-read that class in the new
    version, then move ``BENTOML_PATCHED_FOR``."""
    import inspect
    from importlib.metadata import version

    from bentoml._internal.utils import circus as bentoml_circus

    from runners.lifecycle import BENTOML_PATCHED_FOR

    assert version("bentoml") == BENTOML_PATCHED_FOR
    # What the patch undoes, as this version has it (read from the source: the patch may be applied).
    source = inspect.getsource(bentoml_circus.Arbiter)
    assert "self.exit_stack.__exit__(None, None, None)\n        return super().stop()" in source


def test_on_another_bentoml_the_patch_is_not_applied(monkeypatch):
    import importlib.metadata

    from bentoml._internal.utils import circus as bentoml_circus
    from circus.arbiter import Arbiter as CircusArbiter

    from runners import lifecycle

    monkeypatch.setattr(bentoml_circus.Arbiter, "stop", bentoml_circus.Arbiter.stop)  # restored after
    if bentoml_circus.Arbiter.stop is CircusArbiter.stop:  # patched by an import of service.py
        return
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9.9")
    assert lifecycle.keep_bentoml_sockets_through_the_drain() is False
    assert bentoml_circus.Arbiter.stop is not CircusArbiter.stop


def test_the_fronts_check_of_its_worker_answers_false_when_the_worker_does_not_answer():
    """BentoML's own readiness check of the worker (on every /readyz of the front) raised on a worker
    that is gone, and the probe was then held open until the traffic timeout, and the server's
    shutdown with it (tests/test_startup.py sees the whole server exit). A worker never seen ready
    is asked at the end of the drain whether it answers at all, so a gone one is not waited on."""
    from runners.front.app import WorkerReadiness

    class Worker:  # BentoML's proxy, as far as the front uses it
        def __init__(self, answer):
            self.answer = answer

        async def is_ready(self, timeout=None):
            if isinstance(self.answer, BaseException):
                raise self.answer
            return self.answer

    gone, loading, ready = Worker(asyncio.TimeoutError()), Worker(False), Worker(True)
    checks = {worker: WorkerReadiness(worker) for worker in (gone, loading, ready)}
    assert asyncio.run(gone.is_ready(5)) is False  # BentoML's /readyz calls the proxy's own method
    assert [asyncio.run(checks[w].answers(1.0)) for w in (gone, loading, ready)] == [False, True, True]
    assert asyncio.run(ready.is_ready(5)) is True
    assert [checks[w].seen_ready for w in (gone, loading, ready)] == [False, False, True]
