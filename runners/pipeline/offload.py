"""FLUX_OFFLOAD: weights in host memory, brought to the GPU when used (diffusers' offloading).

- ``model``: diffusers' model offload: each pipeline component comes onto the GPU for its own
  forward and leaves when the next one arrives. The first-block cache runs the transformer's first
  block on its own (runners/backends/eager.py), past the hook on ``forward``: ``OnloadingTransformer``
  brings it on first.
- ``group``: diffusers' group offloading at leaf level: every layer is brought on for its own
  forward (the next one prefetched on a CUDA stream), so any path through the blocks, the
  first-block cache's included, finds its weights on the GPU.

LoRA adapters and deltas are not weights of these modules: they are made on the compute device
(``AdapterCache(device=...)``, ``activate(device=...)``) and stay there.
"""

from __future__ import annotations

import logging

import torch

from runners.backends.eager import TorchTransformer

log = logging.getLogger(__name__)

GROUP_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")


class OffloadRefused(RuntimeError):
    """FLUX_OFFLOAD on a device it cannot help."""


def check_offload(choice: str, device: torch.device) -> None:
    if choice != "none" and device.type != "cuda":
        raise OffloadRefused(
            f"FLUX_OFFLOAD={choice} keeps weights in host memory and moves them to a GPU when used; this server "
            f"computes on the {device.type.upper()}, where the weights already are: set FLUX_OFFLOAD=none"
        )


def apply_offload(pipeline, choice: str, onload: torch.device, offload: torch.device | None = None) -> None:
    """Offload ``pipeline``'s components (loaded in host memory) onto ``onload`` when used.
    ``offload``: where they wait (the host; tests pass the CPU for both)."""
    if choice == "none":
        return
    offload = offload or torch.device("cpu")
    if choice == "model":
        pipeline.hf_device_map = None
        pipeline.enable_model_cpu_offload(device=onload)
        return
    from diffusers.hooks import apply_group_offloading

    streams = onload.type == "cuda"
    for name in GROUP_COMPONENTS:
        apply_group_offloading(
            getattr(pipeline, name),
            onload_device=onload,
            offload_device=offload,
            offload_type="leaf_level",
            use_stream=streams,
            non_blocking=streams,
        )


class OnloadingTransformer(TorchTransformer):
    """The eager transformer under model offload: the split forward (first block on its own) brings
    the transformer onto the GPU first, as its ``forward`` hook would."""

    def first_block(self, **inputs):
        hook = getattr(self.module, "_hf_hook", None)
        if hook is not None:
            hook.pre_forward(self.module)
        return super().first_block(**inputs)


def transformer_backend(transformer, choice: str) -> TorchTransformer:
    """The eager backend for ``transformer`` under FLUX_OFFLOAD=``choice``."""
    return (OnloadingTransformer if choice == "model" else TorchTransformer)(transformer)
