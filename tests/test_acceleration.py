"""``acceleration: "regular"`` on the tiny model: the split forward is exact, the first-block cache
skips what its rules allow and no more, per sample, in mixed batches and with per-request LoRAs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from runners.config import AccelerationSettings, LoraSettings, ModelSettings
from runners.pipeline.acceleration import FirstBlockCache, may_skip
from runners.pipeline.inpaint import Inpainter, InpaintInputs
from tests.conftest import BATCH_ROUNDING_LEVELS, pixels, scene

ALWAYS = 10.0  # a threshold no relative change reaches: every step the rules allow is skipped


def inputs(**overrides) -> InpaintInputs:
    image, mask = scene()
    values = dict(
        prompt="a red house",
        image=image,
        mask=mask,
        width=64,
        height=48,
        seed=7,
        num_inference_steps=10,
        strength=0.85,
        guidance_scale=3.5,
        enable_safety_checker=False,
    )
    values.update(overrides)
    return InpaintInputs(**values)


def accelerated(model, **settings) -> Inpainter:
    return Inpainter(model, AccelerationSettings(**settings))


def test_split_forward_equals_the_whole_forward_bit_for_bit(tiny_model):
    transformer = tiny_model.transformer
    generator = torch.Generator().manual_seed(0)
    config = tiny_model.pipeline.transformer.config
    args = dict(
        hidden_states=torch.randn(3, 12, 64, generator=generator),
        encoder_hidden_states=torch.randn(3, 32, config.joint_attention_dim, generator=generator),
        pooled_projections=torch.randn(3, config.pooled_projection_dim, generator=generator),
        timestep=torch.tensor([0.9, 0.5, 0.1]),
        guidance=torch.tensor([3.5, 1.0, 7.0]),
        img_ids=torch.rand(12, 3, generator=generator),
        txt_ids=torch.zeros(32, 3),
    )
    with torch.inference_mode():
        whole = transformer(**args)
        first = transformer.first_block(**args)
        split = transformer.output(transformer.remaining_blocks(first), first.temb)
        rows = transformer.remaining_blocks(first, torch.tensor([2, 0]))
    assert transformer.splittable and torch.equal(whole, split)
    assert torch.allclose(rows, transformer.remaining_blocks(first)[[2, 0]], atol=1e-6)


def test_threshold_zero_is_none_bit_for_bit(tiny_model, inpainter):
    group = [inputs(), inputs(seed=3, num_inference_steps=6, strength=1.0, prompt="a boat")]
    none = inpainter.run(group)
    regular = accelerated(tiny_model, threshold=0.0).run(
        [InpaintInputs(**{**vars(r), "acceleration": "regular"}) for r in group]
    )
    for a, b in zip(none, regular):
        assert b.steps_skipped == 0
        assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))


def test_skips_follow_the_rules_and_stay_close(tiny_model, inpainter):
    none = inpainter.run([inputs()])[0]
    # 10 steps at strength 0.85 run 9 (0..8): step 0 warms up, 8 is the last; 3 in a row at most:
    # skip 1 2 3, full 4, skip 5 6 7, full 8.
    regular = accelerated(tiny_model, threshold=ALWAYS, max_consecutive_skips=3).run([inputs(acceleration="regular")])[
        0
    ]
    assert regular.steps_skipped == 6
    assert (
        accelerated(tiny_model, threshold=ALWAYS, max_consecutive_skips=1)
        .run([inputs(acceleration="regular")])[0]
        .steps_skipped
        == 4
    )  # 1 3 5 7
    assert (
        accelerated(tiny_model, threshold=ALWAYS, warmup_steps=5).run([inputs(acceleration="regular")])[0].steps_skipped
        == 3
    )  # 5 6 7
    assert (
        accelerated(tiny_model, threshold=ALWAYS, first_block_cache=False)
        .run([inputs(acceleration="regular")])[0]
        .steps_skipped
        == 0
    )
    error = np.abs(pixels(regular.images[0]) - pixels(none.images[0]))
    assert error.max() > 0  # skipping changed something ...
    # ... but the image stays close (levels of 255). Measured, 6 of 9 steps skipped, seeds 7..10:
    # max 7-9 levels, mean 0.41-0.65; the bounds are about twice that.
    assert error.mean() < 1.5 and error.max() <= 16


def test_the_rules_alone():
    settings = AccelerationSettings(warmup_steps=2, max_consecutive_skips=2)

    class S:
        def __init__(self, step, cache):
            self.step, self.first_block_cache, self.timesteps = step, cache, torch.zeros(6)

    warm = FirstBlockCache(first_residual=torch.zeros(1), rest_residual=torch.zeros(1))
    assert not may_skip(S(3, None), settings)  # "none"
    assert not may_skip(S(3, FirstBlockCache()), settings)  # nothing cached yet
    assert not may_skip(S(1, warm), settings)  # warm-up
    assert not may_skip(S(5, warm), settings)  # the last step
    assert may_skip(S(2, warm), settings) and may_skip(S(4, warm), settings)
    warm.skips_in_a_row = 2
    assert not may_skip(S(3, warm), settings)


def test_a_none_request_gets_its_own_image_in_a_mixed_batch(tiny_model, inpainter):
    none_alone = inpainter.run([inputs(seed=1)])[0]
    regular_alone = accelerated(tiny_model, threshold=ALWAYS).run([inputs(seed=2, acceleration="regular")])[0]
    mixed = accelerated(tiny_model, threshold=ALWAYS).run(
        [
            inputs(seed=1),
            inputs(seed=2, acceleration="regular"),
            inputs(seed=3, num_inference_steps=5, acceleration="regular"),
        ]
    )
    assert mixed[0].steps_skipped == 0 and mixed[1].steps_skipped == regular_alone.steps_skipped == 6
    assert np.abs(pixels(mixed[0].images[0]) - pixels(none_alone.images[0])).max() <= BATCH_ROUNDING_LEVELS
    assert np.abs(pixels(mixed[1].images[0]) - pixels(regular_alone.images[0])).max() <= BATCH_ROUNDING_LEVELS


class RecordingTransformer:
    """The tiny model's transformer, noting the TF32 setting each forward ran under."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, **inputs):
        self.seen.append(torch.backends.cuda.matmul.fp32_precision)
        return self.inner(**inputs)

    def first_block(self, **inputs):
        self.seen.append(torch.backends.cuda.matmul.fp32_precision)
        return self.inner.first_block(**inputs)


def test_tf32_only_for_steps_whose_samples_all_asked_for_it(tiny_model, monkeypatch):
    recording = RecordingTransformer(tiny_model.transformer)
    monkeypatch.setattr(tiny_model, "transformer", recording)
    before = torch.backends.cuda.matmul.fp32_precision
    inpainter = accelerated(tiny_model, first_block_cache=False)
    assert not inpainter.tf32  # fp32 on the CPU: TF32 would change nothing, so the flag is left alone
    inpainter.tf32 = True  # as on a CUDA fp32 model
    inpainter.run([inputs(num_inference_steps=3, strength=1.0, acceleration="regular")])
    assert recording.seen == ["tf32"] * 3
    recording.seen.clear()
    # The "none" request has 2 steps, the "regular" one 4: only the 2 steps it is alone are TF32.
    inpainter.run(
        [
            inputs(num_inference_steps=2, strength=1.0),
            inputs(num_inference_steps=4, strength=1.0, acceleration="regular"),
        ]
    )
    assert recording.seen == [before, before, "tf32", "tf32"]
    recording.seen.clear()
    inpainter.tf32 = False  # FLUX_ACCEL_TF32=false, or a model where it changes nothing
    inpainter.run([inputs(num_inference_steps=2, strength=1.0, acceleration="regular")])
    assert recording.seen == [before, before] and torch.backends.cuda.matmul.fp32_precision == before


class WholeGraphTransformer:
    """A backend that cannot split the transformer (as ONNX Runtime and TensorRT)."""

    splittable = False

    def __init__(self, inner):
        self.inner, self.in_channels, self.guidance_embeds = inner, inner.in_channels, inner.guidance_embeds

    def __call__(self, **inputs):
        return self.inner(**inputs)


def test_a_backend_that_cannot_split_runs_regular_as_none(tiny_model, inpainter, monkeypatch, caplog):
    monkeypatch.setattr(tiny_model, "transformer", WholeGraphTransformer(tiny_model.transformer))
    monkeypatch.setattr(tiny_model, "backend", "onnxruntime")
    with caplog.at_level(logging.INFO, logger="runners.pipeline.inpaint"):
        whole = accelerated(tiny_model, threshold=ALWAYS)
    assert "no first-block cache" in caplog.text and "onnxruntime" in caplog.text
    result = whole.run([inputs(acceleration="regular")])[0]
    monkeypatch.undo()
    assert result.steps_skipped == 0
    assert np.array_equal(pixels(result.images[0]), pixels(inpainter.run([inputs()])[0].images[0]))


@pytest.fixture(scope="module")
def lora_model(tiny_dir):
    from runners.pipeline.model import load_model

    settings = ModelSettings(
        model=str(tiny_dir), max_sequence_length=32, safety_checker=str(tiny_dir / "safety_checker")
    )
    return load_model(settings, LoraSettings(max_per_request=4, max_rank=16, memory_max_bytes=64 * 1024**2))


@pytest.fixture(scope="module")
def adapters(lora_model, tmp_path_factory):
    """Two LoRAs over blocks and over the layers outside the split (embedders, the final projection),
    which run over the whole batch while the remaining blocks run over a sub-batch."""
    from pathlib import Path

    from runners.lora.formats import linear_shapes
    from tests.test_lora import TARGETS, write_lora

    shapes = linear_shapes(lora_model.pipeline.transformer)
    targets = TARGETS + [name for name in ("x_embedder", "context_embedder", "proj_out") if name in shapes]
    directory = tmp_path_factory.mktemp("accel-loras")
    files = [write_lora(directory, f"l{seed}", 4, seed, shapes, targets=targets) for seed in (11, 12)]
    return [lora_model.adapters.get(Path(f.path), f.sha256, f.name) for f in files]


def test_per_request_lora_deltas_follow_their_samples_into_the_sub_batch(lora_model, adapters):
    plain = Inpainter(lora_model)
    fast = accelerated(lora_model, threshold=ALWAYS)
    group = [
        inputs(seed=1, loras=[(adapters[0], 1.0)]),  # none: computes every step
        inputs(seed=2, acceleration="regular", loras=[(adapters[1], 0.8)]),  # skips 6 of 9
        inputs(seed=3, num_inference_steps=6, acceleration="regular"),  # no LoRA, its own schedule (6 steps run)
        inputs(seed=4, loras=[(adapters[1], -0.5), (adapters[0], 0.5)]),
    ]
    mixed = fast.run(group)
    assert [r.steps_skipped for r in mixed] == [0, 6, 3, 0]  # 6 steps run: skip 1 2 3, full 4, last 5
    alone = [plain.run([group[0]])[0], fast.run([group[1]])[0], fast.run([group[2]])[0], plain.run([group[3]])[0]]
    for together, by_itself in zip(mixed, alone):
        assert np.abs(pixels(together.images[0]) - pixels(by_itself.images[0])).max() <= BATCH_ROUNDING_LEVELS
    # and the LoRAs did change the images (else the test would prove nothing)
    assert np.abs(pixels(alone[0].images[0]) - pixels(plain.run([inputs(seed=1)])[0].images[0])).max() > 8


def test_the_request_path_carries_acceleration():
    from runners.worker.job_io import to_inputs
    from tests.test_batch import job

    assert to_inputs(job("fast", acceleration="regular")).acceleration == "regular"
    assert to_inputs(job("plain")).acceleration == "none"
