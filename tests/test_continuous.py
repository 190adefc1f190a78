"""Continuous batching against a real ``bentoml serve`` (FLUX_BATCHING=continuous): a request that
arrives while another is mid-loop joins it at the next step, ends on its own schedule, and gets the
image it gets alone; cancel and deadline of one request leave the others' images unchanged. The
order of events is read from each request's status logs (fal's ``logs=1``), never from timings. The
long and doomed requests are long because their steps sleep (tests/faults), not because they compute:
their length does not depend on the CPU."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import BATCH_ROUNDING_LEVELS, FAULT_PATH, REPO, SLOW_PROMPT, bentoml_server

APP = "fal-ai/flux-lora/inpainting"
EXAMPLE = json.loads((REPO / "examples" / "request.json").read_text())
BASE = {**EXAMPLE, "strength": 1.0, "output_format": "png", "sync_mode": True}  # 256x256, the example's size
# 50 sleeping steps: 15 s or more on any machine; the short one's 4 steps (each also slept, as they
# share its forwards) and its encode/decode are a fraction of that.
LONG = {**BASE, "num_inference_steps": 50, "seed": 1, "prompt": f"a garden shed, {SLOW_PROMPT}"}
SHORT = {**BASE, "num_inference_steps": 4, "seed": 2, "guidance_scale": 5.0, "prompt": "a red door"}
# FLUX_REQUEST_TIMEOUT_S of this server: less than the 15 s that 50 sleeping steps take at the least,
# so the doomed request is past it on any CPU; and what the short request needs many times over, even
# sharing the slow one's forwards, so the long one (whose deadline it is too) outlives it before its
# test cancels it.
DEADLINE_S = 14
DOOMED = {**BASE, "num_inference_steps": 50, "seed": 8, "prompt": f"a shed, {SLOW_PROMPT}"}
SMALL = {**BASE, "num_inference_steps": 2, "seed": 7}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {
        "FLUX_BATCHING": "continuous",
        "FLUX_QUEUE_CONCURRENCY": "4",
        "FLUX_REQUEST_TIMEOUT_S": str(DEADLINE_S),
        "PYTHONPATH": FAULT_PATH,
    }
    with bentoml_server(tmp_path_factory.mktemp("continuous"), **env) as (base, _):
        yield base


def submit(base: str, body: dict) -> dict:
    response = httpx.post(f"{base}/queue/{APP}", json=body, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()


def status(handle: dict) -> dict:
    return httpx.get(handle["status_url"], params={"logs": "1"}, timeout=30).json()


def messages(state: dict) -> list[str]:
    return [line["message"] for line in state.get("logs") or []]


def wait_for(handle: dict, predicate, timeout_s: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate(state := status(handle)):
            return state
        time.sleep(0.05)
    pytest.fail(f"{handle['request_id']}: not there in {timeout_s:.0f} s: {status(handle)}")


def at_step(n: int):
    return lambda state: any(m.startswith(f"step {n}/") for m in messages(state)) or state["status"] == "COMPLETED"


def completed(state: dict) -> bool:
    return state["status"] == "COMPLETED"


def image(base: str, handle: dict) -> np.ndarray:
    output = httpx.get(handle["response_url"], timeout=30).json()
    url = output["images"][0]["url"]
    data = base64.b64decode(url.split(",", 1)[1]) if url.startswith("data:") else httpx.get(url, timeout=30).content
    return np.asarray(Image.open(io.BytesIO(data))).astype(np.int16)


def solo(base: str, body: dict) -> np.ndarray:
    handle = submit(base, body)
    wait_for(handle, completed)
    return image(base, handle)


def logged_at(state: dict, prefix: str) -> str:
    """The ISO timestamp of the first log line starting with ``prefix``."""
    times = [line["timestamp"] for line in state.get("logs") or [] if line["message"].startswith(prefix)]
    assert times, f"{state['request_id']} logged no '{prefix}' line: {messages(state)}"
    return times[0]


def last_step_at(state: dict) -> str:
    """When a request's loop last stepped (it may have ended done, or out of time)."""
    return [line["timestamp"] for line in state["logs"] if line["message"].startswith("step ")][-1]


def test_a_request_arriving_mid_loop_starts_before_the_running_one_ends_finishes_first_with_its_solo_image(server):
    alone = solo(server, SHORT)
    long = submit(server, LONG)
    assert not completed(wait_for(long, at_step(3)))
    short = submit(server, SHORT)
    short_done = wait_for(short, completed)
    assert short_done.get("error") is None, short_done
    # From the status logs: the short one started while the long one was mid-loop, joined its forwards,
    # and was answered while the long one still had steps to go.
    long_after = wait_for(long, lambda state: completed(state) or last_step_at(state) > logged_at(short_done, "done"))
    assert not completed(long_after), "the long request ended before the short one: no overlap to check"
    assert logged_at(long_after, "step 3/") < logged_at(short_done, "started") < logged_at(short_done, "done")
    assert "batch of 2" in next(m for m in messages(short_done) if m.startswith("started"))
    assert np.abs(image(server, short) - alone).max() <= BATCH_ROUNDING_LEVELS
    httpx.put(long["cancel_url"], timeout=30)  # its end is not what this test is about
    wait_for(long, completed)


def test_cancel_of_one_request_leaves_the_others_image_unchanged(server):
    keep_body = {**SHORT, "num_inference_steps": 6, "seed": 5}
    alone = solo(server, keep_body)
    doomed = submit(server, {**LONG, "seed": 6})
    wait_for(doomed, at_step(2))
    keep = submit(server, keep_body)
    wait_for(keep, at_step(2))  # sharing forwards with the doomed one
    assert httpx.put(doomed["cancel_url"], timeout=30).status_code == 202
    cancelled = wait_for(doomed, completed)
    kept = wait_for(keep, completed)
    assert cancelled["error_type"] == "request_cancelled"
    assert len([m for m in messages(cancelled) if m.startswith("step ")]) < 50
    assert kept.get("error") is None, kept
    assert np.abs(image(server, keep) - alone).max() <= BATCH_ROUNDING_LEVELS


def test_a_deadline_of_one_request_leaves_the_others_image_unchanged(server):
    alone = solo(server, SMALL)
    doomed = submit(server, DOOMED)
    wait_for(doomed, at_step(1))
    keep = submit(server, SMALL)
    kept = wait_for(keep, completed)
    timed_out = wait_for(doomed, completed, timeout_s=DEADLINE_S + 120)
    assert timed_out["error_type"] == "request_timeout"
    assert len([m for m in messages(timed_out) if m.startswith("step ")]) < 50  # stopped in the loop
    # The kept one joined the doomed one's forwards and was answered while the doomed one still
    # stepped: both ends are the worker's own lines, written in the loop (the front's "failed:" line
    # comes after the loop has ended, so it orders nothing).
    assert "batch of 2" in next(m for m in messages(kept) if m.startswith("started"))
    assert logged_at(kept, "started") < logged_at(kept, "done") < last_step_at(timed_out)
    assert kept.get("error") is None, kept
    assert np.abs(image(server, keep) - alone).max() <= BATCH_ROUNDING_LEVELS
