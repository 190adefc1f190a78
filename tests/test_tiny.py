"""Tests for runners/pipeline/tiny.py: the tiny FLUX.1 model loads through the real diffusers path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from runners.pipeline.tiny import MARKER_NAME, TINY_FORMAT_VERSION, ensure_tiny_model, write_tiny_model
from tests.conftest import REPO as ROOT

PROMPT = "A photo of a red cat on the sea, café!"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Everything must work without the hub (huggingface_hub reads the env var at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _load(directory: Path):
    from diffusers import FluxInpaintPipeline

    return FluxInpaintPipeline.from_pretrained(directory, torch_dtype=torch.float32)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def test_loads_true_flux_classes_and_runs(tiny_dir):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    pipe = _load(tiny_dir)
    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    assert pipe.transformer.config.guidance_embeds
    assert isinstance(pipe.vae, AutoencoderKL)
    assert pipe.vae.config.latent_channels == 16
    assert pipe.vae_scale_factor == 8
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.text_encoder_2, T5EncoderModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.tokenizer_2, T5TokenizerFast)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.use_dynamic_shifting

    image = Image.new("RGB", (32, 32), (120, 30, 200))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    out = pipe(
        prompt="a cat",
        image=image,
        mask_image=mask,
        height=32,
        width=32,
        num_inference_steps=2,
        strength=1.0,
        generator=torch.Generator().manual_seed(0),
        max_sequence_length=32,
    )
    assert out.images[0].size == (32, 32)


def test_tokenizers_match_t5_and_clip_conventions(tiny_dir):
    pipe = _load(tiny_dir)
    t5 = pipe.tokenizer_2
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    ids = t5(PROMPT, padding="max_length", max_length=512, truncation=True).input_ids
    assert len(ids) == 512 and t5.unk_token_id in ids  # "é" is unknown
    assert ids[ids.index(t5.eos_token_id) + 1 :] == [0] * (511 - ids.index(t5.eos_token_id))
    clip = pipe.tokenizer
    ids = clip(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
    assert pipe.text_encoder.config.vocab_size == len(clip)
    assert pipe.text_encoder_2.config.vocab_size == len(t5)


def test_two_writes_are_identical(tiny_dir, tmp_path):
    other = write_tiny_model(tmp_path / "again")
    for component in ("transformer", "vae"):
        a = _tensors(tiny_dir / component / "diffusion_pytorch_model.safetensors")
        b = _tensors(other / component / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), component
    for component in ("text_encoder", "text_encoder_2"):
        a = _tensors(tiny_dir / component / "model.safetensors")
        b = _tensors(other / component / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), component

    first, second = _load(tiny_dir), _load(other)
    for name in ("tokenizer", "tokenizer_2"):
        assert getattr(first, name)(PROMPT).input_ids == getattr(second, name)(PROMPT).input_ids


def test_safety_checker_loads_and_does_not_flag(tiny_dir):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    folder = tiny_dir / "safety_checker"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (folder / name).is_file(), name
    checker = StableDiffusionSafetyChecker.from_pretrained(folder).eval()
    processor = CLIPImageProcessor.from_pretrained(folder)

    images = np.random.RandomState(0).rand(1, 32, 32, 3).astype(np.float32)
    pil = [Image.fromarray((img * 255).astype(np.uint8)) for img in images]
    clip_input = processor(images=pil, return_tensors="pt").pixel_values
    assert clip_input.shape == (1, 3, 32, 32)
    _, has_nsfw = checker(clip_input=clip_input, images=images)
    assert has_nsfw == [False]


def test_ensure_tiny_model_is_idempotent(cache_dir, tiny_dir):
    marker = tiny_dir / MARKER_NAME
    assert tiny_dir == cache_dir / f"tiny-flux-v{TINY_FORMAT_VERSION}"
    before = marker.stat().st_mtime_ns
    assert ensure_tiny_model(cache_dir) == tiny_dir
    assert marker.stat().st_mtime_ns == before
    # No leftover temporary folders next to the model (the session's cache also holds other tests'
    # outputs/ and loras/, which are not the tiny writer's).
    leftovers = [p.name for p in cache_dir.iterdir() if p != tiny_dir and (p.name.startswith(".") or "tiny" in p.name)]
    assert leftovers == [] and tiny_dir.is_dir()


def test_write_refuses_incomplete_existing_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "unrelated.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_tiny_model(target)
    assert (target / "unrelated.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_cli_writes_loadable_folder(tmp_path):
    target = tmp_path / "cli-model"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "runners.pipeline.tiny", str(target)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(target)
    assert (target / MARKER_NAME).is_file()
    pipe = _load(target)
    assert pipe.transformer.config.num_layers == 2
