"""bfloat16, the precision FLUX is served in on a GPU, run on the CPU with the tiny model.

What docs/api.md ("Seeds") promises holds in bf16 too: a request's image is within
``BATCH_ROUNDING_LEVELS`` of the same request run alone, whatever it is batched with (other
prompts, several images, mixed or shared LoRAs, ``regular``). Two things make that so in bf16,
and each test below fails without them: the VAE encodes and decodes one image per call
(``FLUX_VAE_BATCH_IMAGES=1``; batched convolutions round differently by batch size), and a batch
whose requests share one LoRA set runs deltas, not fused weights (fused bf16 weights round
differently from base + delta). float16 is refused.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from runners.config import AccelerationSettings, LoraSettings, ModelSettings
from runners.pipeline.inpaint import Inpainter, InpaintInputs
from runners.pipeline.model import load_model
from tests.conftest import BATCH_ROUNDING_LEVELS, pixels, scene
from tests.test_loop import inputs
from tests.test_lora import write_lora


@pytest.fixture(scope="module")
def bf16(tiny_dir):
    settings = ModelSettings(
        model=str(tiny_dir),
        dtype="bfloat16",
        max_sequence_length=32,
        safety_checker=str(tiny_dir / "safety_checker"),
    )
    model = load_model(settings, LoraSettings(max_per_request=4, max_rank=16, memory_max_bytes=64 * 1024**2))
    assert model.dtype == torch.bfloat16 and next(model.pipeline.transformer.parameters()).dtype == torch.bfloat16
    return Inpainter(model, AccelerationSettings(threshold=0.5))


@pytest.fixture(scope="module")
def adapters(bf16, tmp_path_factory):
    from runners.lora.formats import linear_shapes

    model = bf16.model
    shapes = linear_shapes(model.pipeline.transformer)
    directory = tmp_path_factory.mktemp("bf16-loras")
    files = [write_lora(directory, name, rank, seed, shapes) for name, rank, seed in (("a", 4, 1), ("b", 8, 2))]
    return [model.adapters.get(f.path, f.sha256, f.name) for f in files]


def request(seed: int, **fields) -> InpaintInputs:
    image, mask = scene(seed=seed)
    return inputs(image=image, mask=mask, seed=seed, num_inference_steps=6, strength=0.9, **fields)


def image_of(inpainter, group, index=0) -> np.ndarray:
    return pixels(inpainter.run(group)[index].images[0])


def test_bf16_runs_the_loop_and_repeats_its_seed(bf16):
    first, again = image_of(bf16, [request(3)]), image_of(bf16, [request(3)])
    assert np.array_equal(first, again)
    assert first.std() > 5  # an image, not a black or NaN-filled frame
    assert not np.array_equal(first, image_of(bf16, [request(4)]))


@pytest.mark.parametrize(
    "composition",
    ["other prompts and two images", "regular beside none"],
)
def test_a_bf16_image_does_not_depend_on_its_batch_mates(bf16, composition):
    if composition == "other prompts and two images":
        target = request(1)
        mates = [request(11, prompt="a blue door", num_images=2), request(12, guidance_scale=5.0)]
    else:
        target = request(1, acceleration="regular")
        mates = [request(11), request(12, acceleration="regular", prompt="a blue door")]
    solo = image_of(bf16, [target])
    batched = image_of(bf16, [target, *mates])
    assert np.abs(solo - batched).max() <= BATCH_ROUNDING_LEVELS


def test_bf16_lora_requests_keep_their_solo_image_in_mixed_and_shared_batches(bf16, adapters):
    a, b = adapters
    assert not bf16.model.fuse_uniform_loras  # bf16: deltas for every batch, never a per-batch fuse
    target = request(2, loras=[(a, 1.0)])
    solo = image_of(bf16, [target])
    assert not np.array_equal(solo, image_of(bf16, [replace(target, loras=[])]))  # the LoRA does something
    for mates in (
        [request(21, loras=[(b, 0.7)])],  # mixed: another LoRA
        [request(22)],  # beside a LoRA-free request
        [request(23, loras=[(a, 1.0)])],  # shared: the same LoRA set
    ):
        assert np.abs(solo - image_of(bf16, [target, *mates])).max() <= BATCH_ROUNDING_LEVELS


def test_the_vae_runs_the_configured_number_of_images_per_call(bf16, monkeypatch):
    vae = bf16.model.vae
    calls = {"encode": [], "decode": []}
    encode, decode = vae.encode, vae.decode
    monkeypatch.setattr(vae, "encode", lambda x: calls["encode"].append(len(x)) or encode(x))
    monkeypatch.setattr(vae, "decode", lambda x: calls["decode"].append(len(x)) or decode(x))
    group = [request(5, num_images=2), request(6), request(7)]
    bf16.run(group)
    assert calls == {"encode": [1, 1, 1], "decode": [1, 1, 1, 1]}
    monkeypatch.setattr(bf16.model, "vae_batch_images", 3)
    calls["encode"].clear(), calls["decode"].clear()
    bf16.run(group)
    assert calls == {"encode": [3], "decode": [3, 1]}


def test_float16_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="float16 is not supported: .*overflow"):
        ModelSettings(dtype="float16")
