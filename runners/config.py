"""Typed configuration, one object per concern, read from ``FLUX_*`` environment variables.

Every field has a default and bounds, so a typo in a deployment fails at start-up with the
variable's name instead of surfacing as a strange error under load.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

TINY_MODEL = "tiny"
DEFAULT_SAFETY_CHECKER = "CompVis/stable-diffusion-safety-checker"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flux-inpaint"


class ModelSettings(BaseSettings):
    """Which model is served, and on what device and precision."""

    model_config = SettingsConfigDict(env_prefix="FLUX_", extra="ignore")

    model: str = Field(TINY_MODEL, min_length=1, max_length=4096)
    """A hub id (``black-forest-labs/FLUX.1-dev``), a diffusers-layout folder, or ``tiny``:
    the embedded random-weight model of the true architecture (outputs are noise)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` takes CUDA when a GPU is visible, else the CPU."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``auto`` is bfloat16 on CUDA and float32 on the CPU (bf16 matmuls are ~40x slower there)."""

    safety_checker: str | None = Field(None, min_length=1, max_length=4096)
    """Hub id or folder of a ``StableDiffusionSafetyChecker``. Unset: the tiny model's own tiny
    checker for ``tiny``, else ``CompVis/stable-diffusion-safety-checker``."""

    max_sequence_length: int = Field(512, ge=16, le=512)
    """T5 tokens per prompt. FLUX.1-dev was trained with 512; longer prompts are truncated."""

    cache_dir: Path = Field(default_factory=_default_cache_dir)
    """Where the tiny model (and later engines and LoRAs) are written."""

    warmup: bool = True
    """Run one inference before reporting ready, so the first user request pays no warm-up."""

    @property
    def is_tiny(self) -> bool:
        return self.model == TINY_MODEL

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self, device: str):
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if device == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    def identity(self) -> str:
        """A short hash naming the served model (for logs and response headers)."""
        return hashlib.sha256(self.model.encode()).hexdigest()[:12]


class BatchingSettings(BaseSettings):
    """BentoML adaptive batching of the worker's batchable API."""

    model_config = SettingsConfigDict(env_prefix="FLUX_BATCH_", extra="ignore")

    max_size: int = Field(4, ge=1, le=64)
    """Most requests the dispatcher hands the worker at once."""

    max_latency_ms: int = Field(600_000, ge=1_000, le=3_600_000)
    """BentoML's latency goal: a request whose wait plus estimated run time passes this is
    answered 503. Image generation takes seconds per request, so this is minutes, not ms."""

    timeout_s: float = Field(900.0, ge=10.0, le=7200.0)
    """Worker-side timeout of one batch call."""


class ImageLimits(BaseSettings):
    """Bounds on images a request may send or ask for (see shared/security.md)."""

    model_config = SettingsConfigDict(env_prefix="FLUX_", extra="ignore")

    max_input_pixels: int = Field(4096 * 4096, ge=64 * 64, le=20_000 * 20_000)
    """Largest decoded input image or mask (width*height), checked from the header before decoding."""

    max_input_bytes: int = Field(25 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024)
    """Largest encoded image or mask after base64 decoding."""

    max_output_pixels: int = Field(2048 * 2048, ge=16 * 16, le=14142 * 14142)
    """Largest output image (width*height) after rounding to the model's multiple of 16."""

    max_body_bytes: int = Field(80 * 1024 * 1024, ge=4096, le=1024 * 1024 * 1024)
    """Largest HTTP request body; two max-size images as base64 fit under the default."""


class Settings(BaseSettings):
    """All settings of one process, grouped by concern."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    images: ImageLimits = Field(default_factory=ImageLimits)


def load_settings() -> Settings:
    return Settings()
