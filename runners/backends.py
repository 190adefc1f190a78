"""The small interfaces the inpainting loop runs the networks through.

The loop only ever calls ``TransformerBackend.__call__`` and ``VaeBackend.encode/decode``, so the
same loop can run on eager torch today and on torch.compile, ONNX Runtime or TensorRT engines
(or behind Triton) without knowing which. Tensors cross these interfaces in the backend's device
and dtype; every method is called under ``torch.inference_mode``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


class TransformerBackend(Protocol):
    """FLUX transformer forward: packed latents in, predicted velocity out (same shape)."""

    in_channels: int
    guidance_embeds: bool

    def __call__(
        self,
        *,
        hidden_states: torch.Tensor,  # (B, image_tokens, 64)
        encoder_hidden_states: torch.Tensor,  # (B, text_tokens, joint_dim) T5
        pooled_projections: torch.Tensor,  # (B, pooled_dim) CLIP
        timestep: torch.Tensor,  # (B,) sigma in [0, 1]
        guidance: torch.Tensor | None,  # (B,) float32, FLUX.1-dev's embedded guidance
        img_ids: torch.Tensor,  # (image_tokens, 3)
        txt_ids: torch.Tensor,  # (text_tokens, 3)
    ) -> torch.Tensor: ...


class VaeBackend(Protocol):
    """The VAE as two networks: images to latent-distribution moments, latents to images."""

    latent_channels: int
    scale_factor: int  # pixels per latent cell (8 for FLUX)
    scaling_factor: float
    shift_factor: float

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> moments (B, 2 * latent_channels, H/8, W/8): mean and log-variance."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, latent_channels, H/8, W/8) -> images (B, 3, H, W) in [-1, 1]."""
        ...


class TorchTransformer:
    """Eager PyTorch FluxTransformer2DModel."""

    def __init__(self, module):
        self.module = module
        self.in_channels = module.config.in_channels
        self.guidance_embeds = bool(module.config.guidance_embeds)

    def __call__(self, *, hidden_states, encoder_hidden_states, pooled_projections, timestep, guidance, img_ids, txt_ids):
        return self.module(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            guidance=guidance,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]


class TorchVae:
    """Eager PyTorch AutoencoderKL."""

    def __init__(self, module):
        self.module = module
        config = module.config
        self.latent_channels = config.latent_channels
        self.scale_factor = 2 ** (len(config.block_out_channels) - 1)
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(config.shift_factor or 0.0)

    def encode(self, images):
        return self.module.encode(images).latent_dist.parameters

    def decode(self, latents):
        return self.module.decode(latents, return_dict=False)[0]
