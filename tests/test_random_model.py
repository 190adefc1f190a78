"""FLUX_MODEL=random:flux-dev: the full-size architecture with random weights, for measuring on GPUs
that cannot download FLUX.1-dev. Its size is checked on the meta device (no memory); the build and
the loop are run here on a shrunk copy of the same table, through the same loader."""

from __future__ import annotations

import pytest

from tests.conftest import scene


def test_flux_dev_has_the_published_parameter_counts():
    import torch

    from runners.pipeline.random_model import FLUX_DEV, build_modules
    from runners.pipeline.tiny import _clip_tokenizer, _t5_tokenizer

    with torch.device("meta"):
        modules = build_modules(FLUX_DEV, (_clip_tokenizer(), _t5_tokenizer()))
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}
    # FLUX.1-dev's transformer (11.9B), VAE, CLIP-L text and T5-XXL encoder as published on the hub,
    # and the CompVis safety checker (CLIP ViT-L/14 vision).
    assert counts == {
        "transformer": 11_901_408_320,
        "vae": 83_819_683,
        "text_encoder": 123_060_480,
        "text_encoder_2": 4_762_310_656,
        "safety_checker": 303_981_588,
    }


def test_flux_dev_2block_has_flux_dev_widths_with_one_block_of_each_kind():
    """random:flux-dev-2block: FLUX.1-dev's transformer widths and VAE, one double- and one single-stream
    block, text encoders as wide as the transformer reads (T5 4096, CLIP 768); ~1.1 GB in bf16."""
    import torch

    from runners.pipeline.random_model import ARCHITECTURES, FLUX_DEV, build_modules
    from runners.pipeline.tiny import _clip_tokenizer, _t5_tokenizer

    table = ARCHITECTURES["flux-dev-2block"]
    differs = {k for k in FLUX_DEV["transformer"] if table["transformer"][k] != FLUX_DEV["transformer"][k]}
    assert differs == {"num_layers", "num_single_layers"}
    assert (table["transformer"]["num_layers"], table["transformer"]["num_single_layers"]) == (1, 1)
    with torch.device("meta"):
        modules = build_modules(table, (_clip_tokenizer(), _t5_tokenizer()))
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}
    assert counts["transformer"] == 545_548_096 and counts["vae"] == 83_819_683  # the real VAE
    assert 1.0e9 < counts["transformer"] * 2 < 1.2e9  # bf16 bytes: "on the order of 1 GB"
    assert modules["text_encoder_2"].config.d_model == table["transformer"]["joint_attention_dim"] == 4096
    assert modules["text_encoder"].config.hidden_size == table["transformer"]["pooled_projection_dim"] == 768
    assert counts["text_encoder"] + counts["text_encoder_2"] < 10_000_000  # just large enough to feed it


def test_the_flop_count_the_benchmark_uses_is_this_architectures():
    from benchmarks.loop import transformer_flops
    from runners.pipeline.random_model import FLUX_DEV

    flops = transformer_flops(type("Config", (), FLUX_DEV["transformer"]), image_tokens=4096, text_tokens=512)
    assert flops / 1e12 == pytest.approx(74.36, abs=0.01)  # issue 6's "about 74 TFLOP per step at 1024x1024"


def shrunk(table: dict) -> dict:
    """The same architecture table at toy sizes: every component, none of the memory."""
    return {
        "transformer": {
            **table["transformer"],
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "pooled_projection_dim": 32,
            "axes_dims_rope": (4, 6, 6),
        },
        "vae": {**table["vae"], "block_out_channels": (16, 16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8},
        "clip_text": {
            **table["clip_text"],
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "projection_dim": 32,
        },
        "t5": {**table["t5"], "d_model": 32, "d_ff": 37, "d_kv": 8, "num_heads": 4, "num_layers": 1},
        "safety": {
            "vision_config": {
                **table["safety"]["vision_config"],
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "image_size": 32,
                "patch_size": 4,
            },
            "projection_dim": 32,
        },
    }


def test_a_random_model_loads_through_the_real_loader_and_inpaints(monkeypatch):
    import runners.pipeline.random_model as random_model
    from runners.config import ModelSettings
    from runners.pipeline.inpaint import Inpainter, InpaintInputs
    from runners.pipeline.model import load_model

    monkeypatch.setitem(random_model.ARCHITECTURES, "flux-dev-shrunk", shrunk(random_model.FLUX_DEV))
    model = load_model(ModelSettings(model="random:flux-dev-shrunk", max_sequence_length=32, device="cpu"))
    assert not model.is_tiny and model.source == "random:flux-dev-shrunk" and model.safety_checker is not None
    image, mask = scene(64, 48)
    (result,) = Inpainter(model).run(
        [InpaintInputs(prompt="a house", image=image, mask=mask, width=64, height=48, seed=1, num_inference_steps=2)]
    )
    assert [im.size for im in result.images] == [(64, 48)] and result.has_nsfw_concepts == [False]


def test_an_unknown_architecture_is_refused_with_the_known_ones():
    from runners.config import ModelSettings
    from runners.pipeline.model import load_model

    with pytest.raises(ValueError, match="random:flux-schnell: unknown architecture; known: flux-dev, flux-dev-2block"):
        load_model(ModelSettings(model="random:flux-schnell", device="cpu"))
