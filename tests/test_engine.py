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
from tests.conftest import BATCH_ROUNDING_LEVELS
from tests.test_batch import decoded, job
from tests.test_lora import lora_inpainter, lora_model, loras, shapes, weights_digest  # noqa: F401 (fixtures)

BOUND = BATCH_ROUNDING_LEVELS  # docs/api.md ("Seeds"): the one bound every batch composition is held to


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


@pytest.fixture
def paced(inpainter, monkeypatch):
    """Steps that take at least ``PACE_S``: a newcomer's preparation on the side thread (a few
    milliseconds of the tiny model) then ends within a step or two on any CPU, so a test can say
    at which steps it joins within a fixed slack."""
    real_step = type(inpainter).step

    def paced_step(self, *args, **kwargs):
        time.sleep(PACE_S)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(type(inpainter), "step", paced_step)


PACE_S = 0.05
JOIN_SLACK = 4  # steps a newcomer may take to join: its preparation runs beside the steps


def test_a_request_joining_a_running_loop_at_any_step_gets_its_solo_image(inpainter, engine_for):
    long = dict(num_inference_steps=12, strength=1.0)
    solo_long = decoded(run_jobs(inpainter, [job("long", seed=1, **long)])[0])
    solo_join = decoded(run_jobs(inpainter, [job("join", seed=2, guidance_scale=5.0)])[0])
    for step in (1, 6):  # joins after the first step, and halfway
        board = WatchedBoard()
        engine = engine_for(inpainter, board)
        joined = {}
        board.hooks[("long", f"step {step}/12")] = lambda joined=joined, engine=engine: joined.setdefault(
            "future", engine.submit(job("join", seed=2, guidance_scale=5.0))
        )
        first = result(engine.submit(job("long", seed=1, **long)))
        second = result(joined["future"])
        assert first.error is None and second.error is None
        # It started while the long one was mid-loop, and they shared forwards from then on.
        assert board.order("long", f"step {step}/12") < board.order("join", "started") < board.order("long", "done")
        assert board.order("join", "step 1/3") < board.order("long", "done")
        assert np.abs(decoded(second) - solo_join).max() <= BOUND
        assert np.abs(decoded(first) - solo_long).max() <= BOUND


def test_a_short_request_joining_a_long_one_finishes_first_and_samples_share_forwards(inpainter, engine_for, paced):
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
    # joined within the slack after its arrival at step 2, shared 3 forwards, left after its 3 steps
    joined = forwards.index(2)
    assert 2 <= joined <= 2 + JOIN_SLACK
    assert forwards == [1] * joined + [2, 2, 2] + [1] * (12 - joined - 3)
    answered_by = f"step {joined + 3 + JOIN_SLACK}/12"
    assert board.order("short", "done") < board.order("long", answered_by)  # answered in the long one's middle


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


def test_sizes_interleave_step_by_step_so_none_starves(inpainter, engine_for, paced):
    board = WatchedBoard()
    engine = engine_for(inpainter, board)
    small = {}
    board.hooks[("large", "step 1/16")] = lambda: small.setdefault(
        "future", engine.submit(job("small", 32, 32, seed=1, num_inference_steps=4, strength=1.0))
    )
    large = engine.submit(job("large", 64, 48, seed=2, num_inference_steps=16, strength=1.0))
    assert result(large).error is None and result(small["future"]).error is None
    steps = [(r, m) for r, m in board.lines if m.startswith("step ")]
    # After the small one joins, the two sizes take turns, one step each.
    joined = steps.index(("small", "step 1/4"))
    assert [r for r, _ in steps[joined - 1 : joined + 7]] == ["large", "small"] * 4
    large_steps_then = int(steps[joined - 1][1].split()[1].split("/")[0])
    answered_by = f"step {large_steps_then + 4 + JOIN_SLACK}/16"
    assert board.order("small", "done") < board.order("large", answered_by)


def test_admission_keeps_each_forward_within_the_sample_and_token_budget(inpainter, engine_for, paced):
    forwards = []
    inpainter.on_forward = lambda samples, seconds: forwards.append(samples)
    try:
        engine = engine_for(inpainter, forward_max_samples=3)
        # long enough that the requests prepared one after another on the side thread overlap
        steps = 2 * JOIN_SLACK
        jobs = [
            job(f"r{i}", seed=i, num_inference_steps=steps, strength=1.0, num_images=2 if i == 0 else 1)
            for i in range(4)
        ]
        results = [result(f) for f in [engine.submit(j) for j in jobs]]
        assert all(r.error is None for r in results)
        assert max(forwards) == 3 and sum(forwards) == steps * 5  # 5 images
        forwards.clear()
        # 64x48 is 12 tokens an image: a budget of 24 tokens holds two of them per forward.
        engine = engine_for(inpainter, forward_max_tokens=24)
        results = [result(f) for f in [engine.submit(j) for j in jobs[1:]]]
        assert all(r.error is None for r in results) and max(forwards) == 2
    finally:
        inpainter.on_forward = None


def test_requests_with_different_lora_sets_share_forwards_and_keep_their_images(
    lora_inpainter,  # noqa: F811
    loras,  # noqa: F811
    engine_for,
    monkeypatch,
):
    before = weights_digest(lora_inpainter.model)
    steps = dict(num_inference_steps=4 * JOIN_SLACK, strength=1.0)

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
    real_step = type(lora_inpainter).step
    shared = []  # per forward: the LoRA sets of its samples' requests

    def paced_step(self, active, *args):
        time.sleep(PACE_S)
        shared.append({tuple(id(a) for a, _ in engine_rows[s.row]) for s in active})
        return real_step(self, active, *args)

    monkeypatch.setattr(type(lora_inpainter), "step", paced_step)
    board = WatchedBoard()
    engine = engine_for(lora_inpainter, board)
    engine_rows = {}
    apply = engine._apply_loras

    def recording_apply():
        apply()
        engine_rows.clear()
        engine_rows.update({row: r.inputs.loras for row, r in enumerate(engine._all_running())})

    engine._apply_loras = recording_apply
    later = {}
    board.hooks[("style", "step 2/16")] = lambda: later.update(
        none=engine.submit(requests[1]()), both=engine.submit(requests[2]())
    )
    first = result(engine.submit(requests[0]()))
    rest = [result(later["none"]), result(later["both"])]
    for got, expected in zip([first, *rest], solo):
        assert got.error is None and np.abs(decoded(got) - expected).max() <= BOUND
    assert max(len(sets) for sets in shared) == 3  # one forward held all three LoRA sets: none, one, two
    assert weights_digest(lora_inpainter.model) == before  # idle: the base weights, bit for bit


def test_the_engine_answers_waiting_and_running_requests_when_stopped(inpainter):
    """A shutdown answers every request it holds with 503 server_draining (a client or the fleet
    retries it elsewhere), not with the 500 of a model failure."""
    board = WatchedBoard()
    engine = StepEngine(inpainter, board, BatchingSettings(forward_max_samples=1))
    stopping = threading.Event()
    board.hooks[("running", "step 1/20")] = stopping.set
    running = engine.submit(job("running", num_inference_steps=20, strength=1.0))
    waiting = engine.submit(job("waiting", num_inference_steps=20, strength=1.0))  # over the budget: waits
    assert stopping.wait(60)
    engine.stop()
    for answer in (result(running, 10), result(waiting, 10)):
        assert answer.error.status == 503 and answer.error.error_type == "server_draining"
    assert ("waiting", "started") not in board.lines


def test_the_stepping_thread_never_waits_for_a_newcomers_lora_its_preparation_or_a_decode(
    lora_inpainter,  # noqa: F811
    shapes,  # noqa: F811
    engine_for,
    monkeypatch,
    tmp_path,
):
    """A newcomer whose LoRA is not loaded yet, its preparation and another request's decode each
    take ``SLOW_S`` here (sleep-stepped, the same on any CPU); they run on the side thread, so the
    running request's steps go on meanwhile, never further apart than a fraction of that."""
    from runners.lora import adapters
    from tests.test_lora import write_lora

    slow_s, pace_s = 1.0, 0.08
    inpainter_type = type(lora_inpainter)
    real_load, real_prepare = adapters.load_lora, inpainter_type.prepare
    real_step, real_decode = inpainter_type.step, inpainter_type.decode

    def slow(real, when):
        def slowed(*args, **kwargs):
            if when(*args):
                time.sleep(slow_s)
            return real(*args, **kwargs)

        return slowed

    monkeypatch.setattr(adapters, "load_lora", slow(real_load, lambda *a: True))
    monkeypatch.setattr(inpainter_type, "prepare", slow(real_prepare, lambda self, reqs, *a: reqs[0].seed == 22))
    monkeypatch.setattr(
        inpainter_type, "decode", slow(real_decode, lambda self, samples, *a: len(samples[0].timesteps) == 2)
    )
    monkeypatch.setattr(inpainter_type, "step", slow(real_step, lambda *a: time.sleep(pace_s)))
    fresh = write_lora(tmp_path, "fresh", 4, 99, shapes)
    board = WatchedBoard()
    stamps = []
    log = board.log

    def stamped(request_id, message):
        if request_id == "long" and message.startswith("step "):
            stamps.append(time.perf_counter())
        log(request_id, message)

    board.log = stamped
    engine = engine_for(lora_inpainter, board)
    later = {}
    newcomer = job("newcomer", seed=22, num_inference_steps=4, strength=1.0)
    newcomer.loras.append(fresh)
    board.hooks[("long", "step 2/50")] = lambda: later.update(
        short=engine.submit(job("short", seed=21, num_inference_steps=2, strength=1.0)),
        newcomer=engine.submit(newcomer),
    )
    long = result(engine.submit(job("long", seed=20, num_inference_steps=50, strength=1.0)))
    assert long.error is None and result(later["short"]).error is None and result(later["newcomer"]).error is None
    # the newcomer ran with the long one: its steps came before the long one's end
    assert board.order("newcomer", "step 1/4") < board.order("long", "step 50/50")
    gaps = np.diff(stamps)
    assert len(gaps) == 49 and gaps.max() < slow_s / 2, gaps.max()
