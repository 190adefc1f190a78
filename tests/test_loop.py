"""The inpainting loop on the tiny model: parity with diffusers, seeds, batching, the known region."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from runners.pipeline.inpaint import InpaintInputs, plan_schedule
from tests.conftest import BATCH_ROUNDING_LEVELS, pixels, scene


def inputs(**overrides) -> InpaintInputs:
    image, mask = scene()
    values = dict(
        prompt="a red house",
        image=image,
        mask=mask,
        width=64,
        height=48,
        seed=7,
        num_inference_steps=5,
        strength=0.85,
        guidance_scale=3.5,
        enable_safety_checker=False,
    )
    values.update(overrides)
    return InpaintInputs(**values)


@pytest.mark.parametrize(
    ("steps", "strength", "size"),
    [(5, 0.85, (64, 48)), (4, 1.0, (32, 32)), (7, 0.3, (48, 64))],
)
def test_matches_diffusers_flux_inpaint_pipeline(tiny_model, inpainter, steps, strength, size):
    width, height = size
    image, mask = scene(width, height, seed=steps)
    ours = inpainter.run(
        [inputs(image=image, mask=mask, width=width, height=height, num_inference_steps=steps, strength=strength)]
    )
    reference = tiny_model.pipeline(
        prompt="a red house",
        image=image,
        mask_image=mask,
        width=width,
        height=height,
        num_inference_steps=steps,
        strength=strength,
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(7),
        max_sequence_length=32,
        output_type="np",
    ).images
    reference_uint8 = tiny_model.pipeline.image_processor.numpy_to_pil(reference)[0]
    assert ours[0].images[0].size == (width, height)
    assert np.array_equal(pixels(ours[0].images[0]), pixels(reference_uint8))


@pytest.mark.parametrize(("steps", "strength"), [(28, 0.85), (28, 1.0), (50, 0.01), (1, 0.01), (10, 0.55), (3, 0.5)])
def test_schedule_is_diffusers_get_timesteps(tiny_model, steps, strength):
    from diffusers.pipelines.flux.pipeline_flux_inpaint import calculate_shift, retrieve_timesteps

    pipe = tiny_model.pipeline
    timesteps, sigmas = plan_schedule(pipe.scheduler.config, steps, strength, image_seq_len=12)
    retrieve_timesteps(pipe.scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(12))
    expected, runs = pipe.get_timesteps(steps, strength, "cpu")
    assert len(timesteps) == runs >= 1
    assert torch.equal(timesteps, expected.float())
    assert len(sigmas) == len(timesteps) + 1 and sigmas[-1] == 0


def test_default_request_runs_24_of_28_steps(tiny_model):
    timesteps, _ = plan_schedule(tiny_model.pipeline.scheduler.config, 28, 0.85, image_seq_len=4096)
    assert len(timesteps) == 24  # diffusers skips int(28 - 23.8) = 4 steps


def test_same_seed_same_image_other_seed_other_image(inpainter):
    first = inpainter.run([inputs(seed=11)])[0].images[0]
    again = inpainter.run([inputs(seed=11)])[0].images[0]
    other = inpainter.run([inputs(seed=12)])[0].images[0]
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))


def test_num_images_are_distinct_and_each_is_its_own_seed(inpainter):
    result = inpainter.run([inputs(seed=20, num_images=3)])[0]
    assert len(result.images) == 3 and result.has_nsfw_concepts == [False] * 3
    assert not np.array_equal(pixels(result.images[0]), pixels(result.images[1]))
    single = inpainter.run([inputs(seed=22)])[0].images[0]
    assert np.abs(pixels(result.images[2]) - pixels(single)).max() <= BATCH_ROUNDING_LEVELS


def test_image_is_the_same_alone_or_in_a_mixed_batch(inpainter):
    alone = inpainter.run([inputs(seed=5)])[0].images[0]
    image, mask = scene(seed=9)
    neighbours = [
        inputs(prompt="a blue door", seed=1, num_inference_steps=9, strength=0.5, guidance_scale=7.0, num_images=2),
        inputs(prompt="snow", image=image, mask=mask, seed=2, num_inference_steps=3, strength=1.0),
    ]
    batched = inpainter.run([neighbours[0], inputs(seed=5), neighbours[1]])
    assert len(batched[0].images) == 2 and len(batched[1].images) == 1
    assert np.abs(pixels(batched[1].images[0]) - pixels(alone)).max() <= BATCH_ROUNDING_LEVELS


def test_known_region_equals_the_original_latents(inpainter):
    request = inputs(seed=3, num_inference_steps=6, strength=1.0)
    samples = inpainter.prepare([request], request.width, request.height)
    sample = samples[0]
    assert not torch.equal(sample.latents, sample.image_latents)  # noised at the start
    inpainter.denoise(samples, request.width, request.height)
    keep = sample.mask == 0
    repaint = sample.mask == 1
    assert keep.any() and repaint.any()
    assert torch.equal(sample.latents[keep], sample.image_latents[keep])
    assert not torch.equal(sample.latents[repaint], sample.image_latents[repaint])


def test_progress_reports_every_step_of_every_request(inpainter):
    seen = []
    inpainter.run(
        [inputs(num_inference_steps=4, strength=1.0), inputs(seed=1, num_inference_steps=6, strength=0.5)],
        on_step=lambda request, done, total: seen.append((request, done, total)),
    )
    assert [s for s in seen if s[0] == 0] == [(0, i, 4) for i in range(1, 5)]
    assert [s for s in seen if s[0] == 1] == [(1, i, 3) for i in range(1, 4)]


def test_a_group_must_share_its_size(inpainter):
    with pytest.raises(ValueError):
        inpainter.run([inputs(), inputs(width=32, height=32)])


def test_safety_checker_blacks_out_what_it_flags(tiny_model, inpainter):
    thresholds = tiny_model.safety_checker.checker.concept_embeds_weights
    request = inputs(seed=4, enable_safety_checker=True)
    clean = inpainter.run([request])[0]
    assert clean.has_nsfw_concepts == [False] and pixels(clean.images[0]).max() > 0

    # A checker that must flag: every concept threshold below any cosine similarity. (Changed in
    # place: monkeypatch would delete a module parameter on undo, for the session's shared model.)
    original = thresholds.detach().clone()
    try:
        with torch.no_grad():
            thresholds.fill_(-2.0)
        flagged = inpainter.run([request, replace(request, enable_safety_checker=False)])
    finally:
        with torch.no_grad():
            thresholds.copy_(original)
    assert flagged[0].has_nsfw_concepts == [True]
    assert pixels(flagged[0].images[0]).max() == 0  # black
    assert flagged[1].has_nsfw_concepts == [False]  # checker off for that request: untouched
    # It ran in a batch of two, `clean` alone: the same image up to the documented batch rounding
    # (docs/api.md, "Seeds"), not bit for bit (MKL's kernels differ by row count on some CPUs).
    assert np.abs(pixels(flagged[1].images[0]) - pixels(clean.images[0])).max() <= BATCH_ROUNDING_LEVELS


def test_model_settings_choose_cpu_and_float32_here():
    from runners.config import ModelSettings

    settings = ModelSettings()
    assert settings.is_tiny and settings.resolved_device() == "cpu"
    assert settings.resolved_dtype("cpu") == torch.float32
    assert settings.resolved_dtype("cuda") == torch.bfloat16


def test_tiny_default_loads_from_the_cache_through_the_same_loader(cache_dir):
    from runners.config import ModelSettings
    from runners.pipeline.model import load_model

    model = load_model(ModelSettings(model="tiny", cache_dir=cache_dir, max_sequence_length=16))
    assert model.is_tiny and model.source == str(cache_dir / "tiny-flux-v1")
    assert model.safety_checker is not None
    assert type(model.pipeline).__name__ == "FluxInpaintPipeline"
