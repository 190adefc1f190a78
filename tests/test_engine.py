"""The step engine (FLUX_BATCHING=continuous) on the tiny model: requests join the running loop at a
step boundary and leave when done; their images never depend on what they ran with."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from runners.config import BatchingSettings
from runners.worker.adaptive import run_jobs
from runners.worker.board import JobBoard
from runners.worker.engine import StepEngine
from tests.test_batch import decoded, job
from tests.test_lora import lora_inpainter, lora_model, loras, shapes, weights_digest  # noqa: F401 (fixtures)

BOUND = 2  # levels: what tests/test_batch.py holds the adaptive path to


class WatchedBoard(JobBoard):
    """A job board that records every line in order and runs a hook on chosen ones."""

    def __init__(self):
        super().__init__()
        self.lines: list[tuple[str, str]] = []
        self.hooks: dict[tuple[str, str], object] = {}

    def start(self, request_id, message):
        super().start(request_id, message)
        self.lines.append((request_id, "started"))

    def log(self, request_id, message):
        super().log(request_id, message)
        self.lines.append((request_id, message))
        if (hook := self.hooks.pop((request_id, message), None)) is not None:
            hook()

    def order(self, request_id: str, message: str) -> int:
        return self.lines.index((request_id, message))


@pytest.fixture
def engine_for(request):
    engines = []

    def make(inpainter, board=None, **settings):
        engine = StepEngine(inpainter, board or WatchedBoard(), BatchingSettings(**settings))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def result(future, timeout=120):
    return future.result(timeout)


def test_a_request_joining_a_running_loop_at_any_step_gets_its_solo_image(inpainter, engine_for):
    long = dict(num_inference_steps=8, strength=1.0)
    solo_long = decoded(run_jobs(inpainter, [job("long", seed=1, **long)])[0])
    solo_join = decoded(run_jobs(inpainter, [job("join", seed=2, guidance_scale=5.0)])[0])
    for step in (1, 4):  # joins after the first step, and halfway
        board = WatchedBoard()
        engine = engine_for(inpainter, board)
        joined = {}
        board.hooks[("long", f"step {step}/8")] = lambda joined=joined, engine=engine: joined.setdefault(
            "future", engine.submit(job("join", seed=2, guidance_scale=5.0))
        )
        first = result(engine.submit(job("long", seed=1, **long)))
        second = result(joined["future"])
        assert first.error is None and second.error is None
        # It started while the long one was mid-loop, and they shared forwards from then on.
        assert board.order("long", f"step {step}/8") < board.order("join", "started") < board.order("long", "done")
        assert board.order("join", "step 1/3") < board.order("long", f"step {step + 2}/8")
        assert np.abs(decoded(second) - solo_join).max() <= BOUND
        assert np.abs(decoded(first) - solo_long).max() <= BOUND


def test_a_short_request_joining_a_long_one_finishes_first_and_samples_share_forwards(inpainter, engine_for):
    board = WatchedBoard()
    engine = engine_for(inpainter, board)
    forwards = []
    inpainter.on_forward = lambda samples, seconds: forwards.append(samples)
    try:
        short = {}
        board.hooks[("long", "step 2/12")] = lambda: short.setdefault(
            "future", engine.submit(job("short", seed=3, num_inference_steps=3, strength=1.0))
        )
        long = engine.submit(job("long", seed=4, num_inference_steps=12, strength=1.0))
        assert result(long).error is None and result(short["future"]).error is None
    finally:
        inpainter.on_forward = None
    assert board.order("short", "done") < board.order("long", "step 6/12")  # answered in the long one's middle
    assert forwards == [1, 1, 2, 2, 2] + [1] * 7  # joined at step 3, left after its 3 steps


def test_cancel_and_deadline_leave_the_others_images_unchanged(inpainter, engine_for):
    steps = dict(num_inference_steps=6, strength=1.0)
    solo = decoded(run_jobs(inpainter, [job("keeps", seed=5, **steps)])[0])
    board = WatchedBoard()
    engine = engine_for(inpainter, board)
    board.hooks[("cancelled", "step 2/6")] = lambda: board.cancel("cancelled")
    late = job("late", seed=7, **steps).model_copy(update={"deadline": time.time() + 600})
    board.hooks[("late", "step 3/6")] = lambda: setattr(late, "deadline", time.time() - 1)
    futures = [
        engine.submit(job("cancelled", seed=6, **steps)),
        engine.submit(late),
        engine.submit(job("keeps", seed=5, **steps)),
    ]
    cancelled, timed_out, keeps = (result(f) for f in futures)
    assert cancelled.error.error_type == "request_cancelled"
    assert timed_out.error.error_type == "request_timeout" and timed_out.error.status == 504
    steps_of = lambda rid: [m for r, m in board.lines if r == rid and m.startswith("step ")]  # noqa: E731
    assert steps_of("cancelled") == ["step 1/6", "step 2/6"]  # left at the next step boundary
    assert steps_of("late") == ["step 1/6", "step 2/6", "step 3/6"]
    assert keeps.error is None and np.abs(decoded(keeps) - solo).max() <= BOUND
    assert board.snapshot(["cancelled", "late", "keeps"]) == {}  # nothing left behind


def test_a_request_cancelled_while_waiting_never_starts(inpainter, engine_for):
    board = WatchedBoard()
    board.cancel("early")
    engine = engine_for(inpainter, board)
    assert result(engine.submit(job("early"))).error.error_type == "request_cancelled"
    assert ("early", "started") not in board.lines


def test_a_request_failing_in_a_shared_step_fails_alone_and_the_engine_goes_on(inpainter, engine_for, monkeypatch):
    steps = dict(num_inference_steps=5, strength=1.0)
    solo = decoded(run_jobs(inpainter, [job("ok", seed=8, **steps)])[0])
    real_step = type(inpainter).step
    poison_guidance = 7.25

    def step_failing_on_poison(self, active, width, height):
        if any(s.guidance == poison_guidance for s in active):
            raise RuntimeError("simulated CUDA error")
        return real_step(self, active, width, height)

    monkeypatch.setattr(type(inpainter), "step", step_failing_on_poison)
    board = WatchedBoard()
    engine = engine_for(inpainter, board)
    poison = {}
    board.hooks[("ok", "step 1/5")] = lambda: poison.setdefault(
        "future", engine.submit(job("poison", seed=9, guidance_scale=poison_guidance, **steps))
    )
    ok = result(engine.submit(job("ok", seed=8, **steps)))
    failed = result(poison["future"])
    assert failed.error.status == 500 and failed.error.error_type == "inference_error"
    assert "CUDA" not in str(failed.error.detail)
    assert ok.error is None and np.abs(decoded(ok) - solo).max() <= BOUND
    after = result(engine.submit(job("after", seed=8, **steps)))  # the engine survived
    assert after.error is None and np.abs(decoded(after) - solo).max() <= BOUND


def test_sizes_interleave_step_by_step_so_none_starves(inpainter, engine_for):
    board = WatchedBoard()
    engine = engine_for(inpainter, board)
    small = {}
    board.hooks[("large", "step 1/10")] = lambda: small.setdefault(
        "future", engine.submit(job("small", 32, 32, seed=1, num_inference_steps=4, strength=1.0))
    )
    large = engine.submit(job("large", 64, 48, seed=2, num_inference_steps=10, strength=1.0))
    assert result(large).error is None and result(small["future"]).error is None
    steps = [(r, m) for r, m in board.lines if m.startswith("step ")]
    # After the small one joins, the two sizes take turns, one step each.
    joined = steps.index(("small", "step 1/4"))
    assert [r for r, _ in steps[joined - 1 : joined + 7]] == ["large", "small"] * 4
    assert board.order("small", "done") < board.order("large", "step 6/10")


def test_admission_keeps_each_forward_within_the_sample_and_token_budget(inpainter, engine_for):
    forwards = []
    inpainter.on_forward = lambda samples, seconds: forwards.append(samples)
    try:
        engine = engine_for(inpainter, forward_max_samples=3)
        jobs = [
            job(f"r{i}", seed=i, num_inference_steps=3, strength=1.0, num_images=2 if i == 0 else 1) for i in range(4)
        ]
        results = [result(f) for f in [engine.submit(j) for j in jobs]]
        assert all(r.error is None for r in results)
        assert max(forwards) == 3 and sum(forwards) == 3 * 5  # 5 images, 3 steps each
        forwards.clear()
        # 64x48 is 12 tokens an image: a budget of 24 tokens holds two of them per forward.
        engine = engine_for(inpainter, forward_max_tokens=24)
        results = [result(f) for f in [engine.submit(j) for j in jobs[1:]]]
        assert all(r.error is None for r in results) and max(forwards) == 2
    finally:
        inpainter.on_forward = None


def test_requests_with_different_lora_sets_share_forwards_and_keep_their_images(lora_inpainter, loras, engine_for):  # noqa: F811
    before = weights_digest(lora_inpainter.model)
    steps = dict(num_inference_steps=6, strength=1.0)

    def with_loras(name, seed, *entries):
        j = job(name, seed=seed, **steps)
        j.loras.extend(entries)
        return j

    requests = [
        lambda: with_loras("style", 1, loras["style"].model_copy(update={"scale": 0.9})),
        lambda: with_loras("none", 2),
        lambda: with_loras("both", 3, loras["product"], loras["face"].model_copy(update={"scale": -0.5})),
    ]
    solo = [decoded(run_jobs(lora_inpainter, [make()])[0]) for make in requests]
    board = WatchedBoard()
    engine = engine_for(lora_inpainter, board)
    later = {}
    board.hooks[("style", "step 2/6")] = lambda: later.update(
        none=engine.submit(requests[1]()), both=engine.submit(requests[2]())
    )
    first = result(engine.submit(requests[0]()))
    rest = [result(later["none"]), result(later["both"])]
    for got, expected in zip([first, *rest], solo):
        assert got.error is None and np.abs(decoded(got) - expected).max() <= BOUND
    assert weights_digest(lora_inpainter.model) == before  # idle: the base weights, bit for bit


def test_the_engine_answers_waiting_and_running_requests_when_stopped(inpainter):
    board = WatchedBoard()
    engine = StepEngine(inpainter, board, BatchingSettings())
    stopping = threading.Event()
    board.hooks[("running", "step 1/20")] = stopping.set
    running = engine.submit(job("running", num_inference_steps=20, strength=1.0))
    assert stopping.wait(60)
    engine.stop()
    assert result(running, 10).error is not None  # answered, not left hanging
