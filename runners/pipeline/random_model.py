"""Full-size FLUX.1 architectures with random weights, built in memory on the target device.

Why: the GPU machines that measure this project cannot download FLUX.1-dev, and a 12B-parameter
transformer times the same whatever its weights are. ``FLUX_MODEL=random:flux-dev`` builds the
real architecture (transformer, 16-channel VAE, CLIP-L and T5-XXL text encoders, the CompVis safety
checker) straight on the device in the served dtype, without writing ~30 GB to disk, so that
``python -m benchmarks run`` and a served load test measure what FLUX.1-dev would cost. The outputs
are noise. The tokenizers are the tiny model's (runners/pipeline/tiny.py): prompts are padded to
``max_sequence_length`` tokens either way, which is what sets the cost.

The configurations are FLUX.1-dev's published ones; tests/test_random_model.py checks the parameter
counts they give on the meta device against the published sizes. ``random:flux-dev-2block`` is FLUX.1-dev
at every width with one block of each kind (a 1.1 GB transformer in bf16): what proves on a CPU that
the export (docs/export.md) works at FLUX's real widths, and measures its memory per transformer byte.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

log = logging.getLogger(__name__)

FLUX_DEV: dict[str, dict[str, Any]] = {
    # black-forest-labs/FLUX.1-dev transformer/config.json
    "transformer": dict(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
    # vae/config.json
    "vae": dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=1024,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    ),
    # text_encoder: CLIP ViT-L/14's text tower
    "clip_text": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        projection_dim=768,
        hidden_act="quick_gelu",
        vocab_size=49408,
    ),
    # text_encoder_2: T5 v1.1 XXL's encoder
    "t5": dict(
        d_model=4096,
        d_ff=10240,
        d_kv=64,
        num_heads=64,
        num_layers=24,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        vocab_size=32128,
    ),
    # CompVis/stable-diffusion-safety-checker: CLIP ViT-L/14's vision tower and projection
    "safety": dict(
        vision_config=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            hidden_act="quick_gelu",
        ),
        projection_dim=768,
    ),
}
# FLUX.1-dev scaled to fit a CPU: every width of FLUX.1-dev's transformer (3072 wide, 24 heads, joint
# attention 4096, pooled 768, 64 channels in, guidance embedded) with one double-stream and one
# single-stream block instead of 19 and 38, FLUX.1-dev's VAE as it is, and text encoders just large
# enough to feed the transformer: T5 and CLIP with one layer and their output widths (4096, 768),
# vocabularies the size of the tokenizers'. The transformer is ~1.1 GB in bf16 (tests/test_random_model.py
# counts it), so an export of it measures what the full model's export costs per transformer byte.
FLUX_DEV_2BLOCK: dict[str, dict[str, Any]] = {
    "transformer": {**FLUX_DEV["transformer"], "num_layers": 1, "num_single_layers": 1},
    "vae": FLUX_DEV["vae"],
    "clip_text": {
        **FLUX_DEV["clip_text"],
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "vocab_size": None,  # the tokenizer's
    },
    "t5": {**FLUX_DEV["t5"], "d_ff": 64, "d_kv": 32, "num_heads": 2, "num_layers": 1, "vocab_size": None},
    "safety": {
        "vision_config": {
            **FLUX_DEV["safety"]["vision_config"],
            "hidden_size": 64,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        "projection_dim": 768,
    },
}
ARCHITECTURES: dict[str, dict[str, dict[str, Any]]] = {"flux-dev": FLUX_DEV, "flux-dev-2block": FLUX_DEV_2BLOCK}


def build_modules(table: dict[str, dict[str, Any]], tokenizers: tuple) -> dict[str, Any]:
    """The modules of one architecture, built wherever the caller's ``torch.device`` context puts
    them (``meta`` for counting, a GPU for serving)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tokenizer, t5_tokenizer = tokenizers
    special = dict(
        bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    )
    clip_text = {**table["clip_text"], **special}
    if clip_text.get("vocab_size") is None:
        clip_text["vocab_size"] = len(clip_tokenizer)
    t5 = dict(table["t5"])
    if t5.get("vocab_size") is None:
        t5["vocab_size"] = len(t5_tokenizer)
    return {
        "transformer": FluxTransformer2DModel(**table["transformer"]),
        "vae": AutoencoderKL(**table["vae"]),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**clip_text)),
        "text_encoder_2": T5EncoderModel(
            T5Config(
                **t5,
                pad_token_id=t5_tokenizer.pad_token_id,
                eos_token_id=t5_tokenizer.eos_token_id,
                decoder_start_token_id=t5_tokenizer.pad_token_id,
            )
        ),
        "safety_checker": StableDiffusionSafetyChecker(CLIPConfig(text_config=clip_text, **table["safety"])),
    }


def build_random_model(name: str, device, dtype):
    """(FluxInpaintPipeline, safety checker module, its feature extractor) for architecture ``name``,
    random weights, every module created directly on ``device`` in ``dtype``."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxInpaintPipeline
    from transformers import CLIPImageProcessor

    from runners.pipeline.tiny import _clip_tokenizer, _t5_tokenizer

    if name not in ARCHITECTURES:
        raise ValueError(f"random:{name}: unknown architecture; known: {', '.join(sorted(ARCHITECTURES))}")
    tokenizers = (_clip_tokenizer(), _t5_tokenizer())
    previous = torch.get_default_dtype()
    # Created in place, in the served dtype: a 12B-parameter model never exists in fp32 on the device.
    with torch.device(device), torch.random.fork_rng(devices=[]), contextlib.ExitStack() as stack:
        torch.manual_seed(0)
        torch.set_default_dtype(dtype)
        stack.callback(torch.set_default_dtype, previous)
        modules = build_modules(ARCHITECTURES[name], tokenizers)
    for module in modules.values():
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    checker = modules.pop("safety_checker")
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipeline = FluxInpaintPipeline(scheduler=scheduler, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], **modules)
    side = ARCHITECTURES[name]["safety"]["vision_config"]["image_size"]  # 224 for CLIP ViT-L/14
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return pipeline, checker, feature_extractor
