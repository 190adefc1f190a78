"""Loading the served model: a hub id, a diffusers-layout folder, or the embedded tiny model.

All three go through ``FluxInpaintPipeline.from_pretrained``: the tiny model is written to disk
once and loaded back by the same code that loads FLUX.1-dev, so the loading path is tested here.
The pipeline object is kept for what it owns (tokenizers, text encoders, image processors and
the scheduler's config); the denoising loop itself lives in ``runners.inpaint``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends import TorchTransformer, TorchVae, TransformerBackend, VaeBackend
from .config import DEFAULT_SAFETY_CHECKER, ModelSettings
from .safety import SafetyChecker

log = logging.getLogger(__name__)

TINY_WARNING = (
    "SERVING THE TINY EMBEDDED MODEL WITH RANDOM WEIGHTS: outputs are noise, not images. "
    "Set FLUX_MODEL to a hub id (black-forest-labs/FLUX.1-dev) or a diffusers folder to serve FLUX."
)


@dataclass
class FluxModel:
    """Everything the inpainting loop needs, behind the backend interfaces."""

    pipeline: Any  # diffusers.FluxInpaintPipeline: text encoding, image processors, scheduler config
    transformer: TransformerBackend
    vae: VaeBackend
    safety_checker: SafetyChecker | None
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    source: str
    is_tiny: bool
    max_sequence_length: int


def resolve_source(settings: ModelSettings) -> tuple[str, str | None]:
    """(what to pass to from_pretrained, the safety checker's source)."""
    if settings.is_tiny:
        from .tiny import ensure_tiny_model

        folder = ensure_tiny_model(Path(settings.cache_dir))
        return str(folder), settings.safety_checker or str(folder / "safety_checker")
    return settings.model, settings.safety_checker or DEFAULT_SAFETY_CHECKER


def load_model(settings: ModelSettings) -> FluxModel:
    import torch
    from diffusers import FluxInpaintPipeline

    device = torch.device(settings.resolved_device())
    dtype = settings.resolved_dtype(device.type)
    source, checker_source = resolve_source(settings)
    if settings.is_tiny:
        log.warning(TINY_WARNING)
    started = time.perf_counter()
    log.info("loading model %s on %s as %s", source, device, dtype)
    pipeline = FluxInpaintPipeline.from_pretrained(source, torch_dtype=dtype)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        getattr(pipeline, name).eval().requires_grad_(False)
    safety_checker = SafetyChecker.load(checker_source, device, dtype) if checker_source else None
    log.info("model loaded in %.1f s", time.perf_counter() - started)
    return FluxModel(
        pipeline=pipeline,
        transformer=TorchTransformer(pipeline.transformer),
        vae=TorchVae(pipeline.vae),
        safety_checker=safety_checker,
        device=device,
        dtype=dtype,
        source=source,
        is_tiny=settings.is_tiny,
        max_sequence_length=settings.max_sequence_length,
    )
