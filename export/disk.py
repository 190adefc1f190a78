"""The disk an export will write, counted from the architecture and the precision before anything is
written, and the refusal when the target has less free.

The counts come from the networks built on the ``meta`` device from their configs (no memory, no
weights), so the same code answers for the loaded model and for FLUX.1-dev on a machine that has
never seen it (``python -m export --estimate``). Each exported graph holds its network's weights in
float32 (export/onnx_export.py) plus the graph itself; each TensorRT engine holds them at the
engine's precision plus kernels and refit metadata.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GRAPH_BYTES = 64 * 2**20  # allowance per ONNX file for the graph beside its weights (FLUX.1-dev's: a few MB)
ENGINE_SHARE = 0.05  # allowance per engine for kernels, tactics and refit maps, as a share of its weights
ENGINE_BYTES = 256 * 2**20  # and a fixed allowance per engine on top
PRECISION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}  # bytes per weight in a TensorRT engine
GRAPH_ITEMSIZE = 4  # the exported graphs are float32


class DiskSpaceError(RuntimeError):
    """The export would not fit on the target; the message has both numbers."""


@dataclass
class DiskEstimate:
    """Bytes each file of an export will take, and what they add up to."""

    files: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.files.values())

    def __add__(self, other: DiskEstimate) -> DiskEstimate:
        return DiskEstimate({**self.files, **other.files})

    def describe(self) -> str:
        return ", ".join(f"{name} {size / 1e9:.2f} GB" for name, size in self.files.items())


def network_weights(transformer_config: Any, vae_config: Any) -> dict[str, int]:
    """Weights (parameters and buffers, floating and not) in each exported network, counted on the
    ``meta`` device from the diffusers configs: {network: element count}."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(dict(transformer_config))
        vae = AutoencoderKL.from_config(dict(vae_config))

    def count(*modules) -> int:
        return sum(t.numel() for m in modules if m is not None for t in [*m.parameters(), *m.buffers()])

    return {
        "transformer": count(transformer),
        # each VAE graph keeps only what its half runs (the exporter drops the other half's weights)
        "vae_encoder": count(vae.encoder, vae.quant_conv),
        "vae_decoder": count(vae.decoder, vae.post_quant_conv),
    }


def onnx_estimate(weights: dict[str, int]) -> DiskEstimate:
    return DiskEstimate({f"{name}.onnx": n * GRAPH_ITEMSIZE + GRAPH_BYTES for name, n in weights.items()})


def tensorrt_estimate(weights: dict[str, int], precision: str) -> DiskEstimate:
    itemsize = PRECISION_BYTES[precision]
    return DiskEstimate(
        {f"{name}.plan": int(n * itemsize * (1 + ENGINE_SHARE)) + ENGINE_BYTES for name, n in weights.items()}
    )


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_disk(target: Path, needed: DiskEstimate) -> int:
    """Refuse (DiskSpaceError) when ``target``'s filesystem has less free than ``needed``; else the
    free bytes."""
    free = free_bytes(target)
    if needed.total > free:
        raise DiskSpaceError(
            f"not enough disk for this export at {target}: it needs {needed.total / 1e9:.2f} GB "
            f"({needed.describe()}) and {free / 1e9:.2f} GB is free. Free space there, or point "
            "FLUX_ENGINE_DIR at a volume with room; nothing was written"
        )
    return free
