"""A job the front sends twice (a retried worker call) runs once; the repeat gets the same answer."""

from __future__ import annotations

import threading
import time

from runners.protocol.jobs import InpaintJob, JobResult
from runners.protocol.schema import InpaintRequest
from runners.worker.ledger import JobLedger

REQUEST = InpaintRequest(prompt="p", image_url="-", mask_url="-")


def job(request_id: str) -> InpaintJob:
    return InpaintJob(
        request_id=request_id, request=REQUEST, width=64, height=64, seed=1, image_png=b"i", mask_png=b"m"
    )


class CountingRunner:
    def __init__(self, hold: threading.Event | None = None):
        self.ran: list[str] = []
        self.hold = hold

    def __call__(self, jobs):
        self.ran += [j.request_id for j in jobs]
        if self.hold is not None:
            self.hold.wait(5)
        return [JobResult(request_id=j.request_id, timings={"inference": len(self.ran)}) for j in jobs]


def test_a_repeat_after_the_first_run_is_answered_from_it():
    ledger, runner = JobLedger(), CountingRunner()
    first = ledger.run([job("a"), job("b")], runner)
    again = ledger.run([job("b"), job("c")], runner)
    assert runner.ran == ["a", "b", "c"]  # b ran once
    assert again[0] == first[1] and [r.request_id for r in again] == ["b", "c"]


def test_a_repeat_during_the_first_run_waits_for_it():
    hold = threading.Event()
    ledger, runner = JobLedger(), CountingRunner(hold)
    answers = {}
    original = threading.Thread(target=lambda: answers.setdefault("first", ledger.run([job("a")], runner)))
    original.start()
    time.sleep(0.05)
    repeat = threading.Thread(target=lambda: answers.setdefault("repeat", ledger.run([job("a")], runner)))
    repeat.start()
    time.sleep(0.05)
    assert "repeat" not in answers  # waiting, not running it again
    hold.set()
    original.join(5), repeat.join(5)
    assert runner.ran == ["a"] and answers["repeat"] == answers["first"]


def test_results_are_forgotten_after_a_while():
    now = [0.0]
    ledger, runner = JobLedger(clock=lambda: now[0]), CountingRunner()
    ledger.run([job("a")], runner)
    now[0] = JobLedger.KEEP_S + 1
    ledger.run([job("a")], runner)
    assert runner.ran == ["a", "a"]  # long gone: a new run, not a stale answer


def test_a_run_that_raised_leaves_nothing_behind():
    ledger = JobLedger()

    def broken(jobs):
        raise RuntimeError("boom")

    try:
        ledger.run([job("a")], broken)
    except RuntimeError:
        pass
    result = ledger.run([job("a")], CountingRunner())  # not kept: it runs again
    assert result[0].error is None


def test_run_one_a_repeat_awaits_the_first_run_which_outlives_its_callers_hang_up():
    import asyncio

    ran = []

    async def scenario():
        ledger, release = JobLedger(), asyncio.Event()

        async def runner(j):
            ran.append(j.request_id)
            await release.wait()
            return JobResult(request_id=j.request_id, timings={"inference": 1.0})

        first = asyncio.create_task(ledger.run_one(job("a"), runner))
        await asyncio.sleep(0.01)
        first.cancel()  # the first caller's connection dropped
        repeat = asyncio.create_task(ledger.run_one(job("a"), runner))
        await asyncio.sleep(0.01)
        release.set()
        answer = await asyncio.wait_for(repeat, 5)
        later = await ledger.run_one(job("a"), runner)  # after the run: answered from the ledger
        return answer, later

    answer, later = asyncio.run(scenario())
    assert ran == ["a"]  # one run for three calls
    assert answer.error is None and answer.timings == {"inference": 1.0} and later == answer
