"""FLUX_TRANSFORMER_FILE: the key mapping held to diffusers' own on FLUX.1-dev's shapes, the tiny
model's ComfyUI float8 file giving the image of the folder model with float8-rounded weights, and a
bad or mismatched file refused with the reason (the served refusal: tests/test_quantized_serving.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from runners.config import ModelSettings
from runners.pipeline.model import load_model
from runners.pipeline.single_file import CheckpointError, bfl_to_diffusers, diffusers_to_bfl
from runners.pipeline.tiny import write_transformer_file


def row_ids(shapes: dict) -> dict:
    """A BFL checkpoint of these diffusers shapes whose every row holds its own number (one column):
    any reordering of rows shows. Built through our inverse, then checked against diffusers."""
    counter = iter(range(10**9))
    state = {k: torch.tensor([[float(next(counter))] for _ in range(s[0])]) for k, s in shapes.items()}
    return diffusers_to_bfl(state)


def test_the_mapping_is_diffusers_own_on_flux_dev_shapes():
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from runners.pipeline.random_model import FLUX_DEV

    with torch.device("meta"):
        model = FluxTransformer2DModel(**{**FLUX_DEV["transformer"], "num_layers": 2, "num_single_layers": 2})
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    bfl = row_ids(shapes)
    assert "double_blocks.1.img_attn.qkv.weight" in bfl and "final_layer.adaLN_modulation.1.weight" in bfl
    ours = bfl_to_diffusers(dict(bfl), shapes)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert set(ours) == set(theirs) == set(shapes)
    for key in shapes:
        assert torch.equal(ours[key], theirs[key]), key


def test_bfl_layout_round_trips_the_tiny_transformer(tiny_dir, tmp_path):
    file = write_transformer_file(tiny_dir, tmp_path / "bfl.safetensors")
    (folder,) = (tiny_dir / "transformer").glob("*.safetensors")
    original = load_file(folder)
    converted = bfl_to_diffusers(load_file(file), {k: v.shape for k, v in original.items()})
    assert set(converted) == set(original)
    assert all(torch.equal(converted[k], original[k]) for k in original)


def test_a_comfyui_fp8_file_gives_the_image_of_the_float8_rounded_folder_model(tiny_dir, tmp_path):
    from runners.pipeline.inpaint import Inpainter, InpaintInputs
    from tests.conftest import scene

    file = write_transformer_file(tiny_dir, tmp_path / "comfy.safetensors", layout="comfy-fp8")
    stored = load_file(file)
    assert all(k.startswith("model.diffusion_model.") for k in stored)
    assert stored["model.diffusion_model.img_in.weight"].dtype == torch.float8_e4m3fn

    settings = dict(model=str(tiny_dir), max_sequence_length=32, safety_checker=str(tiny_dir / "safety_checker"))
    from_file = load_model(ModelSettings(**settings, transformer_file=file))
    folder = load_model(ModelSettings(**settings))
    with torch.no_grad():  # what the file stores: every matrix through float8
        for parameter in folder.pipeline.transformer.parameters():
            if parameter.dim() == 2:
                parameter.copy_(parameter.to(torch.float8_e4m3fn).float())
    image, mask = scene(32, 32)

    def run(model):
        inputs = InpaintInputs(
            prompt="a cat", image=image, mask=mask, width=32, height=32, seed=4, num_inference_steps=3
        )
        return np.asarray(Inpainter(model).run([inputs])[0].images[0])

    assert np.array_equal(run(from_file), run(folder))


def tiny_file_of_another_shape(tmp_path):
    """A BFL file of a transformer one block shallower and with another text width."""
    from diffusers import FluxTransformer2DModel

    from runners.pipeline.tiny import build_tiny_components

    config = dict(build_tiny_components()["transformer"].config)
    config.update(num_single_layers=1, joint_attention_dim=48)
    other = FluxTransformer2DModel.from_config(config)
    path = tmp_path / "other.safetensors"
    save_file(diffusers_to_bfl(other.state_dict()), path)
    return path


def test_a_bad_or_mismatched_file_is_refused_naming_what_differs(tiny_dir, tmp_path):
    from runners.pipeline.single_file import load_transformer_file

    def load(path):
        return load_transformer_file(path, str(tiny_dir), torch.device("cpu"), torch.float32)

    with pytest.raises(CheckpointError, match="no such file"):
        load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04\x95 not safetensors at all")
    with pytest.raises(CheckpointError, match="is not a readable safetensors file"):
        load(tmp_path / "junk.safetensors")
    save_file({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other-model.safetensors")
    with pytest.raises(CheckpointError, match="is not a FLUX transformer"):
        load(tmp_path / "other-model.safetensors")
    with pytest.raises(CheckpointError) as refused:
        load(tiny_file_of_another_shape(tmp_path))
    message = str(refused.value)
    assert "does not match the transformer of" in message, message
    assert "tensors missing (single_transformer_blocks.1." in message, message
    assert "of other shapes (context_embedder.weight (32, 48) (the model's (32, 32))" in message, message


def test_a_scaled_fp8_comfyui_file_is_scaled_back_on_load(tiny_dir, tmp_path):
    """ComfyUI's "scaled fp8" files store each matrix divided by a per-tensor ``scale_weight`` (and a
    ``scaled_fp8`` marker): the load multiplies it back."""
    from runners.pipeline.single_file import COMFY_PREFIX, load_transformer_file

    (folder,) = (tiny_dir / "transformer").glob("*.safetensors")
    original = load_file(folder)
    scaled = {COMFY_PREFIX + "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, tensor in diffusers_to_bfl(original).items():
        if tensor.dim() == 2:
            scale = tensor.abs().max() / 448
            scaled[COMFY_PREFIX + key] = (tensor / scale).to(torch.float8_e4m3fn)
            scaled[COMFY_PREFIX + key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1)
        else:
            scaled[COMFY_PREFIX + key] = tensor
    save_file(scaled, tmp_path / "scaled.safetensors")
    loaded = load_transformer_file(tmp_path / "scaled.safetensors", str(tiny_dir), torch.device("cpu"), torch.float32)
    for key, weight in loaded.state_dict().items():
        expected = original[key]
        error = (weight - expected).abs().max() / expected.abs().max()
        assert error < 0.07, (key, float(error))  # float8 e4m3: 3 mantissa bits
