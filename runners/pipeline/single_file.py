"""A FLUX transformer from one ``.safetensors`` file (FLUX_TRANSFORMER_FILE): Black Forest Labs'
original layout (``flux1-dev.safetensors``), ComfyUI's (the same keys under ``model.diffusion_model.``,
float8 weights, optionally with a per-tensor ``scale_weight``), or diffusers' own keys in one file.

The key mapping is the one diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` applies
(tests/test_single_file.py holds this module to it on FLUX.1-dev's shapes), written as one table so
that it runs both ways: to load a file, and to write the tiny model in BFL's layout
(``python -m runners.pipeline.tiny --single-file``). Where diffusers assumes FLUX.1's width (3072)
to split fused projections, this takes the split sizes from the model's own config, so the tiny
model's file loads through the same code as FLUX.1-dev's.

The file is checked against the transformer the config describes before anything is loaded: a
file that is not safetensors, is not a FLUX transformer, or holds other shapes stops the server
with a ``CheckpointError`` naming what differs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

COMFY_PREFIX = "model.diffusion_model."

# BFL name -> diffusers names. One target: renamed (".scale" of a norm becomes ".weight"); several:
# the BFL tensor is their concatenation along dim 0, in this order. "swap": BFL stores (shift, scale)
# where diffusers' AdaLayerNormContinuous wants (scale, shift).
_TOP = {
    "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
    "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
    "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
    "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
    "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
    "txt_in": ["context_embedder"],
    "img_in": ["x_embedder"],
    "final_layer.linear": ["proj_out"],
    "final_layer.adaLN_modulation.1": ["norm_out.linear", "swap"],
}
_DOUBLE = {
    "img_mod.lin": ["norm1.linear"],
    "txt_mod.lin": ["norm1_context.linear"],
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.norm.query_norm": ["attn.norm_q"],
    "img_attn.norm.key_norm": ["attn.norm_k"],
    "txt_attn.norm.query_norm": ["attn.norm_added_q"],
    "txt_attn.norm.key_norm": ["attn.norm_added_k"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
    "img_attn.proj": ["attn.to_out.0"],
    "txt_attn.proj": ["attn.to_add_out"],
}
_SINGLE = {
    "modulation.lin": ["norm.linear"],
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "norm.query_norm": ["attn.norm_q"],
    "norm.key_norm": ["attn.norm_k"],
    "linear2": ["proj_out"],
}


class CheckpointError(ValueError):
    """FLUX_TRANSFORMER_FILE cannot serve as this model's transformer; the message says why."""


def mapping(num_layers: int, num_single_layers: int) -> list[tuple[str, list[str], bool]]:
    """(BFL module name, diffusers module names, swap halves) for a transformer of this depth."""
    rows = []
    for bfl, targets in _TOP.items():
        rows.append((bfl, [t for t in targets if t != "swap"], "swap" in targets))
    for i in range(num_layers):
        rows += [
            (f"double_blocks.{i}.{b}", [f"transformer_blocks.{i}.{t}" for t in ts], False) for b, ts in _DOUBLE.items()
        ]
    for i in range(num_single_layers):
        rows += [
            (f"single_blocks.{i}.{b}", [f"single_transformer_blocks.{i}.{t}" for t in ts], False)
            for b, ts in _SINGLE.items()
        ]
    return rows


def _swap(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _suffixes(bfl: str) -> list[tuple[str, str]]:
    """(BFL suffix, diffusers suffix) of a module's tensors: a qk-norm's ``scale`` is diffusers' ``weight``."""
    if bfl.endswith("_norm"):
        return [("scale", "weight")]
    return [("weight", "weight"), ("bias", "bias")]


def bfl_to_diffusers(state: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """BFL keys to diffusers keys. ``shapes``: the target model's tensor shapes by diffusers key (its
    fused projections are split by them). Keys the table does not know are kept, so that the
    strict comparison with the model names them."""
    state = dict(state)
    layers = 1 + max((int(k.split(".")[1]) for k in shapes if k.startswith("transformer_blocks.")), default=-1)
    singles = 1 + max((int(k.split(".")[1]) for k in shapes if k.startswith("single_transformer_blocks.")), default=-1)
    converted = {}
    for bfl, targets, swap in mapping(layers, singles):
        for bfl_suffix, suffix in _suffixes(bfl):
            key = f"{bfl}.{bfl_suffix}"
            if key not in state:
                continue
            tensor = state.pop(key)
            names = [f"{t}.{suffix}" for t in targets]
            if len(names) == 1:
                converted[names[0]] = _swap(tensor) if swap else tensor
                continue
            sizes = [shapes[n][0] if n in shapes else -1 for n in names]
            if -1 in sizes or sum(sizes) != tensor.shape[0]:
                raise CheckpointError(
                    f"{key} has {tensor.shape[0]} rows, the model's {', '.join(names)} need "
                    f"{'+'.join(str(s) for s in sizes)}: the file is another FLUX variant than the model's config"
                )
            converted.update(zip(names, torch.split(tensor, sizes, dim=0), strict=True))
    converted.update(state)  # left over: reported as unexpected keys
    return converted


def diffusers_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``bfl_to_diffusers``: a diffusers transformer's state dict in BFL's layout."""
    layers = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")), default=-1)
    singles = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks.")), default=-1)
    out = {}
    for bfl, targets, swap in mapping(layers, singles):
        for bfl_suffix, suffix in _suffixes(bfl):
            names = [f"{t}.{suffix}" for t in targets]
            if not all(n in state for n in names):
                continue
            tensor = torch.cat([state[n] for n in names], dim=0)
            out[f"{bfl}.{bfl_suffix}"] = (_swap(tensor) if swap else tensor).contiguous()
    return out


def read_checkpoint(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """The file's tensors, on ``device``, with ComfyUI's prefix removed and scaled float8 weights
    (``scale_weight``) turned back into plain weights."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"FLUX_TRANSFORMER_FILE={path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"FLUX_TRANSFORMER_FILE={path} is not a readable safetensors file: {exc}") from None
    state = {key.removeprefix(COMFY_PREFIX): tensor for key, tensor in state.items()}
    state.pop("scaled_fp8", None)  # ComfyUI's marker of a scaled float8 file
    for key in [k for k in state if k.endswith(".scale_weight")]:
        scale = state.pop(key).float()
        weight = key.removesuffix(".scale_weight") + ".weight"
        if weight in state:
            state[weight] = state[weight].float() * scale
    for key in [k for k in state if k.endswith(".scale_input")]:  # for float8 activations, which we compute ourselves
        del state[key]
    return state


def load_transformer_file(path: Path, config_source: str, device: torch.device, dtype: torch.dtype):
    """A ``FluxTransformer2DModel`` with ``config_source``'s ``transformer/`` config and ``path``'s
    weights, in ``dtype`` on ``device``."""
    from diffusers import FluxTransformer2DModel

    config = FluxTransformer2DModel.load_config(config_source, subfolder="transformer")
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    expected = model.state_dict()
    state = read_checkpoint(path, device)
    if "double_blocks.0.img_attn.qkv.weight" in state or "img_in.weight" in state:
        layout = "Black Forest Labs"
        state = bfl_to_diffusers(state, {k: v.shape for k, v in expected.items()})
    elif "x_embedder.weight" in state:
        layout = "diffusers"
    else:
        sample = ", ".join(sorted(state)[:3]) or "no tensors"
        raise CheckpointError(
            f"FLUX_TRANSFORMER_FILE={path} is not a FLUX transformer (neither Black Forest Labs' keys nor "
            f"diffusers'; its first keys: {sample})"
        )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} (the model's {tuple(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} tensors missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
            )
        if unexpected:
            parts.append(
                f"{len(unexpected)} unknown ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})"
            )
        if wrong:
            parts.append(f"{len(wrong)} of other shapes ({'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''})")
        raise CheckpointError(
            f"FLUX_TRANSFORMER_FILE={path} ({layout} layout) does not match the transformer of {config_source}: "
            + ", ".join(parts)
        )
    stored = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    log.info("transformer from %s (%s layout, stored as %s) as %s on %s", path, layout, "/".join(stored), dtype, device)
    return model.eval().requires_grad_(False)
