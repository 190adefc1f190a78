"""The adaptive runner (runners/worker/adaptive.py): grouping by size, order kept, output formats, one failing request failing alone."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
from PIL import Image

from runners.config import ImageLimits
from runners.front.preparation import prepare_job
from runners.protocol.images import encode_lossless
from runners.protocol.schema import InpaintRequest
from runners.worker.adaptive import group_by_size, run_jobs
from tests.conftest import BATCH_ROUNDING_LEVELS, scene


def job(request_id: str, width: int = 64, height: int = 48, **fields):
    image, mask = scene(width, height)
    uri = lambda im: "data:image/png;base64," + base64.b64encode(encode_lossless(im)).decode()  # noqa: E731
    values = dict(
        prompt="a house",
        image_url=uri(image),
        mask_url=uri(mask),
        num_inference_steps=3,
        seed=1,
        enable_safety_checker=False,
        output_format="png",  # lossless: batch comparisons read the model's pixels, not JPEG's rounding
    )
    values.update(fields)
    return asyncio.run(prepare_job(InpaintRequest(**values), ImageLimits(), request_id))


def decoded(result, index=0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[index].data))).astype(np.int16)


def test_groups_by_output_size_and_keeps_positions():
    jobs = [job("a"), job("b", 32, 32), job("c"), job("d", 32, 32)]
    groups = group_by_size(list(enumerate(jobs)))
    assert [[position for position, _ in group] for group in groups] == [[0, 2], [1, 3]]


def test_results_come_back_in_order_in_each_format(inpainter):
    jobs = [job("a", output_format="png"), job("b", 32, 32, output_format="jpeg", num_images=2), job("c")]
    results = run_jobs(inpainter, jobs)
    assert [r.request_id for r in results] == ["a", "b", "c"]
    assert all(r.error is None for r in results)
    assert results[0].images[0].content_type == "image/png" and results[0].images[0].data[:4] == b"\x89PNG"
    assert [i.content_type for i in results[1].images] == ["image/jpeg"] * 2
    assert results[1].images[0].data[:2] == b"\xff\xd8"
    assert (results[1].images[0].width, results[1].images[0].height) == (32, 32)
    assert {"preprocess", "inference", "decode"} <= set(results[2].timings)


def test_a_request_that_fails_in_the_model_fails_alone(inpainter, monkeypatch):
    jobs = [job("ok-1", seed=1), job("poison", seed=2, prompt="poison"), job("ok-2", seed=3)]
    expected = {r.request_id: decoded(r) for r in run_jobs(inpainter, [jobs[0], jobs[2]])}

    real_run = type(inpainter).run
    steps_before_the_fault = []

    def run_that_fails_on_poison(self, requests, *, on_step, **kwargs):
        poison = next((i for i, r in enumerate(requests) if r.prompt == "poison"), None)

        def step_then_fail(index, done, total):
            on_step(index, done, total)
            if index == poison and done == 2:  # inside the loop, after two steps of the whole batch
                steps_before_the_fault.append(done)
                raise RuntimeError("simulated CUDA error")

        return real_run(self, requests, on_step=step_then_fail, **kwargs)

    monkeypatch.setattr(type(inpainter), "run", run_that_fails_on_poison)
    results = run_jobs(inpainter, jobs)
    assert steps_before_the_fault == [2, 2]  # in the batch of three, then alone: mid-loop both times
    assert results[1].error is not None and results[1].error.status == 500
    assert results[1].error.error_type == "inference_error"
    assert "CUDA" not in str(results[1].error.detail)  # internals stay in the log
    for result in (results[0], results[2]):
        assert result.error is None
        # run alone after the batch failed, against run in a batch of two: BATCH_ROUNDING_LEVELS
        assert np.abs(decoded(result) - expected[result.request_id]).max() <= BATCH_ROUNDING_LEVELS


def test_a_job_cancelled_before_its_batch_never_runs_and_one_cancelled_mid_run_stops(inpainter):
    from runners.worker.board import JobBoard

    seen_steps = []

    class CancelAfterTwoSteps(JobBoard):
        def log(self, request_id, message):
            super().log(request_id, message)
            if request_id == "mid" and message.startswith("step "):
                seen_steps.append(message)
                if message == "step 2/6":
                    self.cancel("mid")

    board = CancelAfterTwoSteps()
    board.cancel("early")  # cancelled while still waiting in BentoML's queue
    jobs = [
        job("early"),
        job("mid", num_inference_steps=6, strength=1.0),
        job("keeps", num_inference_steps=6, strength=1.0),
    ]
    results = run_jobs(inpainter, jobs, board)
    assert [r.error.error_type if r.error else None for r in results] == [
        "request_cancelled",
        "request_cancelled",
        None,
    ]
    assert seen_steps == ["step 1/6", "step 2/6"]  # left the batch at the next step boundary
    assert len(results[2].images) == 1
    assert [line.message for line in results[2].logs][-2:] == ["step 6/6", "done"]
    assert board.snapshot(["early", "mid", "keeps"]) == {}  # nothing left behind


def test_a_job_past_its_deadline_leaves_the_loop_at_a_step_boundary_with_a_504(inpainter):
    import time

    from runners.worker.board import JobBoard

    seen_steps = []

    class DeadlineAfterTwoSteps(JobBoard):
        def log(self, request_id, message):
            super().log(request_id, message)
            if request_id == "slow" and message.startswith("step "):
                seen_steps.append(message)
                if message == "step 2/6":
                    jobs[1].deadline = time.time() - 1  # its time runs out here

    late = job("late").model_copy(update={"deadline": time.time() - 1})  # out of time before its batch
    slow = job("slow", num_inference_steps=6, strength=1.0).model_copy(update={"deadline": time.time() + 600})
    jobs = [late, slow, job("keeps", num_inference_steps=6, strength=1.0)]
    results = run_jobs(inpainter, jobs, DeadlineAfterTwoSteps())
    assert [r.error.error_type if r.error else None for r in results] == ["request_timeout", "request_timeout", None]
    assert results[0].error.status == 504
    assert seen_steps == ["step 1/6", "step 2/6"]  # the loop stopped, not just the caller's wait
    assert len(results[2].images) == 1


def test_batching_changes_a_samples_transformer_output_only_in_its_low_bits(tiny_model):
    """The measurement behind BATCH_ROUNDING_LEVELS (docs/api.md, "Seeds"): the same sample's
    transformer output alone and in a batch of two differs by float rounding only (MKL's fp32
    matmuls pick kernels by row count), orders of magnitude under one 8-bit level. Run with -s to
    see the figures."""
    import torch

    transformer, config = tiny_model.pipeline.transformer, tiny_model.pipeline.transformer.config
    generator = torch.Generator().manual_seed(0)
    tokens = (48 // 16) * (64 // 16)
    batch = dict(
        hidden_states=torch.randn(2, tokens, config.in_channels, generator=generator),
        encoder_hidden_states=torch.randn(2, 32, config.joint_attention_dim, generator=generator),
        pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=generator),
        timestep=torch.tensor([0.5, 0.7]),
        guidance=torch.tensor([3.5, 3.5]),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(32, 3),
    )
    alone = {k: v[:1] if k not in ("img_ids", "txt_ids") else v for k, v in batch.items()}
    with torch.no_grad():
        in_batch = transformer(**batch, return_dict=False)[0][:1]
        by_itself = transformer(**alone, return_dict=False)[0]
    difference = (in_batch - by_itself).abs().max().item()
    scale = by_itself.abs().max().item()
    print(f"\ntransformer output, batch of 2 against alone: max |difference| {difference:.3g} (scale {scale:.3g})")
    assert difference <= 1e-5 * max(scale, 1.0)  # measured here: 4.8e-7 at scale ~3
