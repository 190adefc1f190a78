"""One small contract per exported network: what goes in and out, which dimensions vary, and what
shapes an engine must accept for the configured sizes (as NVIDIA's TensorRT diffusion demo keeps
per-model classes, minus everything that is not the contract).

The three networks are exactly what the loop calls through ``runners.backends.interfaces``, so an exported graph can stand in
for ``TransformerBackend.__call__``, ``VaeBackend.encode`` and ``VaeBackend.decode``:

- ``transformer``: packed latents and conditioning -> velocity (``FluxTransformer2DModel``);
- ``vae_encoder``: images in [-1, 1] -> latent-distribution moments (mean, log-variance);
- ``vae_decoder``: unscaled latents -> images (the loop applies ``scaling_factor`` / ``shift_factor``).

Sizes are (height, width) in pixels, as ``BackendSettings.pixel_sizes()`` gives them (``FLUX_EXPORT_SIZES``). One image
token covers 16 x 16 pixels (8x VAE, then FLUX's 2x2 patches); one latent cell 8 x 8.

Per-request LoRAs are not part of any graph: they are applied as per-sample deltas by the eager
loop. LoRAs fused at start-up are in the weights and so in the graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from runners.backends.eager import TorchTransformer

# Names of the dynamic axes used in ``NetworkSpec.dynamic_axes`` (and as the ONNX symbolic dims).
BATCH = "batch"
IMAGE_TOKENS = "image_tokens"  # (height / 16) * (width / 16)
TEXT_TOKENS = "text_tokens"  # the T5 sequence length (max_sequence_length)
HEIGHT, WIDTH = "height", "width"  # pixels
LATENT_HEIGHT, LATENT_WIDTH = "latent_height", "latent_width"  # pixels / 8

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]


def transformer_module(model: Any) -> torch.nn.Module:
    """The diffusers FluxTransformer2DModel of a ``runners.pipeline.model.FluxModel`` (or the module itself)."""
    pipeline = getattr(model, "pipeline", None)
    return pipeline.transformer if pipeline is not None else model


def vae_module(model: Any) -> torch.nn.Module:
    """The diffusers AutoencoderKL of a ``runners.pipeline.model.FluxModel`` (or the module itself)."""
    pipeline = getattr(model, "pipeline", None)
    return pipeline.vae if pipeline is not None else model


def vae_scale_factor(vae: torch.nn.Module) -> int:
    """Pixels per latent cell: 8 for FLUX (as ``runners.backends.eager.TorchVae`` computes it)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def module_device(module: torch.nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def latent_image_ids(token_height: int, token_width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """FLUX's image position ids, (token_height * token_width, 3): (0, row, column) per token,
    as ``FluxInpaintPipeline._prepare_latent_image_ids`` makes them."""
    ids = torch.zeros(token_height, token_width, 3)
    ids[..., 1] = torch.arange(token_height)[:, None]
    ids[..., 2] = torch.arange(token_width)[None, :]
    return ids.reshape(token_height * token_width, 3).to(device=device, dtype=dtype)


class TransformerNetwork(torch.nn.Module):
    """The transformer with positional inputs in ``SPECS["transformer"].input_names`` order."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(
        self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance=None
    ):
        # The same call the torch backend makes, so the graph is exactly what the loop runs.
        return TorchTransformer(self.transformer)(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            guidance=guidance,
            img_ids=img_ids,
            txt_ids=txt_ids,
        )


class VaeEncoderNetwork(torch.nn.Module):
    """images (B, 3, H, W) in [-1, 1] -> moments (B, 2 * latent_channels, H/8, W/8)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, images):
        return self.vae.encode(images).latent_dist.parameters


class VaeDecoderNetwork(torch.nn.Module):
    """Unscaled latents (B, latent_channels, H/8, W/8) -> images (B, 3, H, W)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


@dataclass(frozen=True)
class NetworkSpec:
    """The contract of one exported network.

    ``input_names`` are every input the network can take, in the wrapper module's positional order;
    ``inputs_for(model)`` are the ones a given model takes (the transformer drops ``guidance`` when
    its config has no ``guidance_embeds``). ``dynamic_axes`` maps each input and output name to
    ``{dimension index: axis name}`` for the dimensions that vary (axis names above).
    """

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: Mapping[str, Mapping[int, str]]

    # -- per-network parts (subclasses) --
    def module(self, model: Any) -> torch.nn.Module:
        """A small wrapper around the model's live network (no copy) taking positional tensors
        in ``inputs_for(model)`` order and returning the one output tensor."""
        raise NotImplementedError

    def input_shapes(self, model: Any, batch: int, height: int, width: int, text_tokens: int) -> dict[str, Shape]:
        """Each of ``inputs_for(model)``'s shape for a batch of ``height`` x ``width`` pixel images."""
        raise NotImplementedError

    def output_shapes(self, model: Any, batch: int, height: int, width: int, text_tokens: int) -> dict[str, Shape]:
        raise NotImplementedError

    def _sample(self, name: str, shape: Shape, generator: torch.Generator, height: int, width: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    # -- shared --
    def inputs_for(self, model: Any) -> tuple[str, ...]:
        return self.input_names

    def sample_inputs(
        self,
        model: Any,
        batch: int,
        height: int,
        width: int,
        text_tokens: int,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Inputs in ``inputs_for(model)`` order with the shapes, dtypes and value ranges the loop
        passes (float32 throughout: the exported graphs are float32). Deterministic for a seed."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        shapes = self.input_shapes(model, batch, height, width, text_tokens)
        if device is None:
            device = module_device(self.module(model))
        return tuple(
            self._sample(name, shape, generator, height, width).to(device=device, dtype=dtype)
            for name, shape in shapes.items()
        )

    def profile(self, model: Any, sizes: list[tuple[int, int]], batch_sizes: list[int], text_tokens: int) -> Profile:
        """TensorRT-style (min, opt, max) shapes per input over every (height, width) in ``sizes``
        at every batch size in ``batch_sizes``. min and max are taken per dimension (so e.g. the
        VAE's min height and min width may come from different sizes, as a profile allows); opt is
        the most common serving case: the first configured size at the largest batch size."""
        if not sizes or not batch_sizes:
            raise ValueError("profile() needs at least one size and one batch size")
        every = [self.input_shapes(model, b, h, w, text_tokens) for b in batch_sizes for h, w in sizes]
        opt = self.input_shapes(model, max(batch_sizes), sizes[0][0], sizes[0][1], text_tokens)
        result = {}
        for name, opt_shape in opt.items():
            low = tuple(min(shapes[name][d] for shapes in every) for d in range(len(opt_shape)))
            high = tuple(max(shapes[name][d] for shapes in every) for d in range(len(opt_shape)))
            result[name] = (low, tuple(opt_shape), high)
        return result


def _check_size(height: int, width: int, multiple: int) -> None:
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise ValueError(f"{height}x{width} pixels: height and width must be positive multiples of {multiple}")


@dataclass(frozen=True)
class TransformerSpec(NetworkSpec):
    def module(self, model):
        return TransformerNetwork(transformer_module(model))

    def inputs_for(self, model):
        guidance = bool(transformer_module(model).config.guidance_embeds)
        return tuple(n for n in self.input_names if guidance or n != "guidance")

    def input_shapes(self, model, batch, height, width, text_tokens):
        config = transformer_module(model).config
        _check_size(height, width, 16)
        tokens = (height // 16) * (width // 16)
        shapes = {
            "hidden_states": (batch, tokens, config.in_channels),
            "encoder_hidden_states": (batch, text_tokens, config.joint_attention_dim),
            "pooled_projections": (batch, config.pooled_projection_dim),
            "timestep": (batch,),
            "img_ids": (tokens, 3),
            "txt_ids": (text_tokens, 3),
            "guidance": (batch,),
        }
        return {name: shapes[name] for name in self.inputs_for(model)}

    def output_shapes(self, model, batch, height, width, text_tokens):
        config = transformer_module(model).config
        return {"velocity": (batch, (height // 16) * (width // 16), config.in_channels)}

    def _sample(self, name, shape, generator, height, width):
        if name == "img_ids":  # real positions: RoPE is where float precision matters
            return latent_image_ids(height // 16, width // 16)
        if name == "txt_ids":
            return torch.zeros(shape)
        if name == "timestep":  # sigma in [0, 1]
            return torch.rand(shape, generator=generator)
        if name == "guidance":  # guidance scale, around FLUX.1-dev's 3.5
            return 1.0 + 6.0 * torch.rand(shape, generator=generator)
        return torch.randn(shape, generator=generator)


@dataclass(frozen=True)
class VaeEncoderSpec(NetworkSpec):
    def module(self, model):
        return VaeEncoderNetwork(vae_module(model))

    def input_shapes(self, model, batch, height, width, text_tokens):
        _check_size(height, width, vae_scale_factor(vae_module(model)))
        return {"images": (batch, 3, height, width)}

    def output_shapes(self, model, batch, height, width, text_tokens):
        vae = vae_module(model)
        scale = vae_scale_factor(vae)
        return {"moments": (batch, 2 * vae.config.latent_channels, height // scale, width // scale)}

    def _sample(self, name, shape, generator, height, width):
        return torch.rand(shape, generator=generator) * 2 - 1  # images in [-1, 1]


@dataclass(frozen=True)
class VaeDecoderSpec(NetworkSpec):
    def module(self, model):
        return VaeDecoderNetwork(vae_module(model))

    def input_shapes(self, model, batch, height, width, text_tokens):
        vae = vae_module(model)
        scale = vae_scale_factor(vae)
        _check_size(height, width, scale)
        return {"latents": (batch, vae.config.latent_channels, height // scale, width // scale)}

    def output_shapes(self, model, batch, height, width, text_tokens):
        return {"images": (batch, 3, height, width)}


SPECS: dict[str, NetworkSpec] = {
    "transformer": TransformerSpec(
        name="transformer",
        input_names=(
            "hidden_states",
            "encoder_hidden_states",
            "pooled_projections",
            "timestep",
            "img_ids",
            "txt_ids",
            "guidance",
        ),
        output_names=("velocity",),
        dynamic_axes={
            "hidden_states": {0: BATCH, 1: IMAGE_TOKENS},
            "encoder_hidden_states": {0: BATCH, 1: TEXT_TOKENS},
            "pooled_projections": {0: BATCH},
            "timestep": {0: BATCH},
            "img_ids": {0: IMAGE_TOKENS},
            "txt_ids": {0: TEXT_TOKENS},
            "guidance": {0: BATCH},
            "velocity": {0: BATCH, 1: IMAGE_TOKENS},
        },
    ),
    "vae_encoder": VaeEncoderSpec(
        name="vae_encoder",
        input_names=("images",),
        output_names=("moments",),
        dynamic_axes={
            "images": {0: BATCH, 2: HEIGHT, 3: WIDTH},
            "moments": {0: BATCH, 2: LATENT_HEIGHT, 3: LATENT_WIDTH},
        },
    ),
    "vae_decoder": VaeDecoderSpec(
        name="vae_decoder",
        input_names=("latents",),
        output_names=("images",),
        dynamic_axes={
            "latents": {0: BATCH, 2: LATENT_HEIGHT, 3: LATENT_WIDTH},
            "images": {0: BATCH, 2: HEIGHT, 3: WIDTH},
        },
    ),
}
