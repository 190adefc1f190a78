"""Read a FLUX LoRA file into one canonical form, refusing anything doubtful.

LoRA files reach this server from users (uploads, URLs, a shared folder), so they are untrusted
input. This module is the single gate they pass through:

* Only safetensors is read, and only with the ``safetensors`` package: a pickle ``.pt``/``.bin``/
  ``.ckpt`` can run code when unpickled, so it is refused without ever being unpickled.
* Three layouts are in common use for FLUX (diffusers/PEFT, kohya sd-scripts with BFL's original
  module names, XLabs). Each is converted to one form, ``LoraWeights``: per diffusers module
  path, a down matrix (r, in), an up matrix (out, r) and a multiplier (alpha / r).
* Every layer is checked against the real transformer's ``nn.Linear`` shapes *before* anything
  touches the model, so a bad file fails here with a message naming the key, never half-applied.

BFL fused layers (qkv, single-block linear1) are split using the model's config rather than
FLUX.1-dev's hard-coded sizes (as diffusers' own converter does), so the same code serves the
tiny test model and the real one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch

Shapes = dict[str, tuple[int, int]]  # module path -> (in_features, out_features)

# Prefixes of text-encoder weights (kohya CLIP/T5, diffusers): the server only patches the
# transformer, so such a file would silently do less than its author intended.
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder.", "text_encoder_2.", "base_model.model.text_encoder")


class LoraError(Exception):
    """A LoRA that cannot be used; the message says why in terms the user can act on."""


@dataclass
class LoraLayer:
    down: torch.Tensor  # (r, in)
    up: torch.Tensor  # (out, r)
    multiplier: float  # alpha / r (1.0 when the file has no alpha)


@dataclass
class LoraWeights:
    layers: dict[str, LoraLayer]  # by diffusers module path inside the transformer
    format: str  # "diffusers", "kohya" or "xlabs"

    @property
    def rank(self) -> int:
        return max(layer.down.shape[0] for layer in self.layers.values())

    @property
    def nbytes(self) -> int:
        # A fused BFL layer shares one down matrix between its parts: count each tensor once.
        unique = {id(t): t for layer in self.layers.values() for t in (layer.down, layer.up)}
        return sum(t.nbytes for t in unique.values())


@dataclass
class _Group:
    """One LoRA pair as named in the file, and the module(s) it lands on."""

    targets: list[str]
    split: list[int] | None = None  # rows of `up` per target when one fused layer feeds several
    swap_halves: bool = False  # BFL's final adaLN orders (shift, scale); diffusers (scale, shift)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # "down", "up", "alpha"


def linear_shapes(transformer: torch.nn.Module) -> Shapes:
    """(in_features, out_features) of every ``nn.Linear`` in the transformer, by module path."""
    return {
        name: (m.in_features, m.out_features)
        for name, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def read_safetensors(data: bytes | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (bytes or path) as float32; anything else is refused."""
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            tensors = safetensors.torch.load(bytes(data))
        else:
            tensors = safetensors.torch.load_file(str(data), device="cpu")
    except FileNotFoundError:
        raise LoraError(f"LoRA file {Path(data).name!r} does not exist") from None
    except Exception as exc:  # SafetensorError, header/JSON errors, truncation, OS errors, ...
        raise LoraError(
            f"not a safetensors file ({exc}); only .safetensors LoRAs are accepted, never pickled .pt/.bin/.ckpt files"
        ) from None
    try:
        return {key: t.to(torch.float32) for key, t in tensors.items()}
    except Exception as exc:  # e.g. a dtype torch cannot convert
        raise LoraError(f"not a usable safetensors LoRA: {exc}") from None


def _cfg(config, name: str) -> int:
    return int(config[name] if isinstance(config, dict) else getattr(config, name))


# kohya / sd-scripts: BFL's module names with dots turned into underscores.
_KOHYA_KEY = re.compile(r"lora_unet_(\w+)\.(lora_down\.weight|lora_up\.weight|alpha)")
_KOHYA_DOUBLE = {
    "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "img_attn_proj": ["attn.to_out.0"],
    "img_mlp_0": ["ff.net.0.proj"],
    "img_mlp_2": ["ff.net.2"],
    "img_mod_lin": ["norm1.linear"],
    "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "txt_attn_proj": ["attn.to_add_out"],
    "txt_mlp_0": ["ff_context.net.0.proj"],
    "txt_mlp_2": ["ff_context.net.2"],
    "txt_mod_lin": ["norm1_context.linear"],
}
_KOHYA_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation_lin": ["norm.linear"],
}
_KOHYA_GLOBAL = {  # outside the blocks, as in diffusers' converter
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}
_KOHYA_ROLE = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}


def _kohya_group(name: str, shapes: Shapes, inner: int) -> _Group | None:
    if name in _KOHYA_GLOBAL:
        return _Group([_KOHYA_GLOBAL[name]], swap_halves=name == "final_layer_adaLN_modulation_1")
    match = re.fullmatch(r"(double|single)_blocks_(\d+)_(\w+)", name)
    table = {"double": _KOHYA_DOUBLE, "single": _KOHYA_SINGLE}[match[1]] if match else {}
    if not match or match[3] not in table:
        return None
    block = f"{'transformer_blocks' if match[1] == 'double' else 'single_transformer_blocks'}.{int(match[2])}"
    targets = [f"{block}.{t}" for t in table[match[3]]]
    if len(targets) == 1:
        return _Group(targets)
    split = [inner] * 3  # q, k, v: heads * head_dim rows each
    if len(targets) == 4:  # single-block linear1 is q, k, v and the MLP input, fused
        split.append(shapes[targets[3]][1] if targets[3] in shapes else 0)
    return _Group(targets, split)


# XLabs: attention-processor LoRAs; 1 = image stream, 2 = text stream (see diffusers'
# _convert_xlabs_flux_lora_to_diffusers). Their single blocks have q/k/v only, no MLP part.
_XLABS_KEY = re.compile(
    r"(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\."
    r"(qkv_lora1|proj_lora1|qkv_lora2|proj_lora2|qkv_lora|proj_lora)\."
    r"(down\.weight|up\.weight|alpha)"
)
_XLABS_DOUBLE = {
    "qkv_lora1": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "proj_lora1": ["attn.to_out.0"],
    "qkv_lora2": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "proj_lora2": ["attn.to_add_out"],
}
_XLABS_SINGLE = {"qkv_lora": ["attn.to_q", "attn.to_k", "attn.to_v"], "proj_lora": ["proj_out"]}
_XLABS_ROLE = {"down.weight": "down", "up.weight": "up", "alpha": "alpha"}

# diffusers / PEFT: the module path itself, optionally prefixed, with one of several suffixes.
_DIFFUSERS_KEY = re.compile(
    r"(?:base_model\.model\.)?(?:transformer\.)?(.+?)\."
    r"(lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|"
    r"lora_down\.weight|lora_up\.weight|alpha)"
)
_DIFFUSERS_ROLE = {
    "lora_A.weight": "down",
    "lora.down.weight": "down",
    "lora_down.weight": "down",
    "lora_B.weight": "up",
    "lora.up.weight": "up",
    "lora_up.weight": "up",
    "alpha": "alpha",
}


def _detect_format(keys: list[str]) -> str:
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(_XLABS_KEY.fullmatch(k) for k in keys):
        return "xlabs"
    return "diffusers"


def _group_keys(tensors: dict[str, torch.Tensor], fmt: str, shapes: Shapes, inner: int) -> dict[str, _Group]:
    """Sort the file's keys into LoRA pairs by the name each pair has in the file."""
    groups: dict[str, _Group] = {}
    unknown: list[str] = []
    for key in sorted(tensors):  # sorted: safetensors' order varies, error messages should not
        tensor, group, role = tensors[key], None, None
        if fmt == "kohya" and (m := _KOHYA_KEY.fullmatch(key)):
            name, role = f"lora_unet_{m[1]}", _KOHYA_ROLE[m[2]]
            group = groups.get(name) or _kohya_group(m[1], shapes, inner)
        elif fmt == "xlabs" and (m := _XLABS_KEY.fullmatch(key)):
            table = _XLABS_DOUBLE if m[1] == "double" else _XLABS_SINGLE
            if m[3] in table:
                block = f"{'transformer_blocks' if m[1] == 'double' else 'single_transformer_blocks'}.{int(m[2])}"
                name, role = f"{m[1]}_blocks.{m[2]}.processor.{m[3]}", _XLABS_ROLE[m[4]]
                targets = [f"{block}.{t}" for t in table[m[3]]]
                group = groups.get(name) or _Group(targets, [inner] * 3 if len(targets) == 3 else None)
        elif fmt == "diffusers" and (m := _DIFFUSERS_KEY.fullmatch(key)):
            name, role = m[1], _DIFFUSERS_ROLE[m[2]]
            group = groups.get(name) or _Group([m[1]])
        if group is None:
            unknown.append(key)
            continue
        if role in group.tensors:
            raise LoraError(f"the {role} weight of {name!r} appears twice in the file (as {key!r})")
        group.tensors[role] = tensor
        groups[name] = group
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise LoraError(f"unknown key {shown} in a {fmt}-format LoRA (not a FLUX transformer LoRA?)")
    return groups


def _check_finite(what: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise LoraError(f"{what} holds NaN or infinite values")


def _check_targets(name: str, group: _Group, shapes: Shapes) -> None:
    for target in group.targets:
        if target not in shapes:
            what = f"module {target!r}" if name == target else f"{name!r} targets module {target!r}, which"
            raise LoraError(f"{what} this model does not have (a LoRA for a different model?)")


def _layers_of(name: str, group: _Group, shapes: Shapes, max_rank: int) -> dict[str, LoraLayer]:
    """The validated per-module layers of one pair from the file."""
    if "down" not in group.tensors or "up" not in group.tensors:
        missing = "lora_down" if "down" not in group.tensors else "lora_up"
        raise LoraError(f"{name!r} has no {missing} weight")
    down, up = group.tensors["down"], group.tensors["up"]
    if down.ndim != 2 or up.ndim != 2:
        raise LoraError(
            f"{name!r} has lora_down of shape {tuple(down.shape)} and lora_up of shape "
            f"{tuple(up.shape)}; a linear LoRA has 2-D matrices (conv/LyCORIS LoRAs are not supported)"
        )
    rank = down.shape[0]
    if rank > max_rank:
        raise LoraError(f"{name!r}: rank {rank} is over this server's limit of {max_rank}")
    if rank == 0:
        raise LoraError(f"{name!r} has rank 0")
    if up.shape[1] != rank:
        raise LoraError(
            f"{name!r}: lora_down has rank {rank} but lora_up of shape {tuple(up.shape)} has rank {up.shape[1]}"
        )
    _check_finite(f"lora_down of {name!r}", down)
    _check_finite(f"lora_up of {name!r}", up)
    multiplier = 1.0
    if "alpha" in group.tensors:
        alpha = group.tensors["alpha"]
        if alpha.numel() != 1:
            raise LoraError(f"alpha of {name!r} has shape {tuple(alpha.shape)}; it must be a single number")
        _check_finite(f"alpha of {name!r}", alpha)
        multiplier = alpha.item() / rank
    for target in group.targets:  # before splitting: a wrong input size says more than a bad split
        if down.shape[1] != shapes[target][0]:
            raise LoraError(
                f"lora_down of {target} has shape {tuple(down.shape)} but that layer takes {shapes[target][0]} inputs"
            )
    if group.swap_halves:
        up = torch.cat(list(reversed(up.chunk(2, dim=0))), dim=0) if up.shape[0] % 2 == 0 else up
    if group.split is not None:
        if sum(group.split) != up.shape[0]:
            raise LoraError(
                f"lora_up of {name!r} has {up.shape[0]} rows, but the fused layer it splits into "
                f"{', '.join(t.rsplit('.', 1)[-1] for t in group.targets)} has "
                f"{' + '.join(map(str, group.split))} outputs in this model"
            )
        ups = torch.split(up, group.split, dim=0)
    else:
        ups = (up,)
    layers = {}
    for target, part in zip(group.targets, ups):
        n_out = shapes[target][1]
        if part.shape[0] != n_out:
            raise LoraError(f"lora_up of {target} has shape {tuple(part.shape)} but that layer gives {n_out} outputs")
        # Fused BFL layers: every part sees the same input, so the parts share one down matrix.
        layers[target] = LoraLayer(down=down, up=part, multiplier=multiplier)
    return layers


def parse_lora(tensors: dict[str, torch.Tensor], shapes: Shapes, transformer_config, max_rank: int) -> LoraWeights:
    """Convert a LoRA state dict of any supported format to ``LoraWeights``, validating every layer."""
    keys = list(tensors)
    if not keys:
        raise LoraError("the file holds no LoRA weights")
    text_keys = [k for k in keys if k.startswith(_TEXT_ENCODER_PREFIXES)]
    if text_keys:
        raise LoraError(
            f"text-encoder LoRA weights are not supported (key {text_keys[0]!r}); "
            "only the FLUX transformer can take a LoRA here"
        )
    fmt = _detect_format(keys)
    inner = _cfg(transformer_config, "num_attention_heads") * _cfg(transformer_config, "attention_head_dim")
    groups = _group_keys(tensors, fmt, shapes, inner)
    for name, group in groups.items():  # first, so a LoRA for another model is called that
        _check_targets(name, group, shapes)
    layers: dict[str, LoraLayer] = {}
    for name, group in groups.items():
        for target, layer in _layers_of(name, group, shapes, max_rank).items():
            if target in layers:  # two spellings of one module, e.g. double_blocks_7 and double_blocks_07
                raise LoraError(f"module {target} is given more than once (again by {name!r})")
            layers[target] = layer
    return LoraWeights(layers=layers, format=fmt)


def load_lora(source: bytes | Path, transformer: torch.nn.Module, max_rank: int) -> LoraWeights:
    """Read and validate a LoRA file against this transformer; raises ``LoraError`` if unusable."""
    return parse_lora(read_safetensors(source), linear_shapes(transformer), transformer.config, max_rank)
