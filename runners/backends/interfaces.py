"""The small interfaces the inpainting loop runs the networks through.

The loop only ever calls ``TransformerBackend.__call__`` and ``VaeBackend.encode/decode``, so the
same loop can run on eager torch today and on torch.compile, ONNX Runtime or TensorRT engines
(or behind Triton) without knowing which. One optional capability, ``SplitTransformerBackend``
(eager torch has it), lets ``acceleration: "regular"`` run the blocks after the first for only
some samples of a batch (runners/pipeline/acceleration.py); without it "regular" runs the whole forward. Tensors cross these interfaces in the backend's device
and dtype; every method is called under ``torch.inference_mode``.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class FirstBlockOutput:
    """The transformer after its embeddings and first double-stream block: what the first-block
    cache (runners.pipeline.acceleration) looks at to decide which samples need the remaining blocks."""

    hidden_states: torch.Tensor  # (B, image_tokens, dim) image stream after the first block
    encoder_hidden_states: torch.Tensor  # (B, text_tokens, dim) text stream after the first block
    residual: torch.Tensor  # (B, image_tokens, dim) what the first block added to the image stream
    temb: torch.Tensor  # (B, dim) timestep, guidance and pooled-text conditioning
    rotary: tuple  # (cos, sin) RoPE of the joint (text, image) positions, the same for every sample


class SplitTransformerBackend(TransformerBackend, Protocol):
    """An optional capability: the forward in three parts, so some samples of a batch can skip the
    middle one. ``first_block`` then ``remaining_blocks`` then ``output`` computes exactly ``__call__``.
    Backends that run one opaque graph (ONNX Runtime, TensorRT, torch.compile) have ``splittable`` False."""

    splittable: bool

    def first_block(self, **inputs) -> FirstBlockOutput:
        """Embeddings and the first double-stream block; ``inputs`` as for ``__call__``."""
        ...

    def remaining_blocks(self, first: FirstBlockOutput, index: torch.Tensor | None = None) -> torch.Tensor:
        """The image stream after the last block, for the samples at ``index`` (all when None)."""
        ...

    def output(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Final norm and projection: image stream to predicted velocity."""
        ...


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
