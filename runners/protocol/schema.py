"""The fal wire contract of ``fal-ai/flux-lora/inpainting``: one pydantic model for the input,
one for the output (docs/fal-contract.md). No torch here: the HTTP front imports it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from runners.errors import InvalidField

# fal's presets, (width, height).
IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
ImageSizePreset = Literal["square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"]

# FLUX packs 2x2 latent patches of an 8x VAE: pixel sizes must be multiples of 16.
SIZE_MULTIPLE = 16
MAX_SIDE = 14142  # fal's bound on a custom side
MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 20_000  # far past what CLIP (77) and T5 (512) tokens can hold
MAX_URL_CHARS = 100_000_000  # the body cap is the real limit; this keeps the type bounded


class ImageSize(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    width: int = Field(512, gt=0, le=MAX_SIDE)
    """Pixels; rounded down to a multiple of 16."""
    height: int = Field(512, gt=0, le=MAX_SIDE)
    """Pixels; rounded down to a multiple of 16."""


class LoraWeight(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    path: str = Field(min_length=1, max_length=4096)
    """URL, name in the local LoRA directory, or hub-style name."""
    scale: float = Field(1.0, ge=-4.0, le=4.0, allow_inf_nan=False)
    """How strongly the LoRA is applied: 1 as trained, 0 not at all, negative against it."""


class InpaintRequest(BaseModel):
    """Every input field of fal's endpoint, with fal's defaults and bounds.

    Unknown fields are ignored, as fal does, so clients written for newer fal versions still work.
    Each field's docstring is its description in /openapi.json (and on the playground's form).
    """

    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    """What the repainted region should show."""
    image_url: str = Field(min_length=1, max_length=MAX_URL_CHARS)
    """The image to inpaint: an http(s) URL or a base64 data URI (PNG, JPEG, WEBP, GIF or AVIF)."""
    mask_url: str = Field(min_length=1, max_length=MAX_URL_CHARS)
    """The mask, as a URL or data URI: white = repaint, black = keep; stretched to the output's size."""
    image_size: ImageSizePreset | ImageSize | None = None
    """Output size; unset means the input image's size, rounded down to a multiple of 16."""
    num_inference_steps: int = Field(28, ge=1, le=50)
    """Denoising steps scheduled; `strength` decides how many of them run."""
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    """The same seed and inputs give the same image; unset draws one (the output says which)."""
    loras: list[LoraWeight] = Field([], max_length=16)  # pydantic copies it per request; shown in the schema
    """LoRAs to apply, each a path (URL, local name or hub-style name) and a scale."""
    guidance_scale: float = Field(3.5, ge=0.0, le=35.0, allow_inf_nan=False)
    """How closely to follow the prompt (FLUX.1-dev's embedded guidance, not CFG)."""
    strength: float = Field(0.85, ge=0.01, le=1.0, allow_inf_nan=False)
    """How much the masked region may change: 1 repaints from noise, lower keeps more of the image."""
    sync_mode: bool = False
    """Images come back inline as data URIs and are not stored on the server."""
    num_images: int = Field(1, ge=1, le=4)
    """Images to make; image i uses seed + i."""
    enable_safety_checker: bool = True
    """Check each output for NSFW content; a flagged image is blacked out."""
    output_format: Literal["jpeg", "png"] = "jpeg"
    """The encoding of the output images."""
    acceleration: Literal["none", "regular"] = "none"
    """`regular` is faster with slightly different images (first-block cache, TF32)."""

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must contain non-whitespace text")
        return value

    def requested_size(self) -> tuple[int, int] | None:
        """(width, height) asked for, before rounding; None means "the input image's size"."""
        if self.image_size is None:
            return None
        if isinstance(self.image_size, str):
            return IMAGE_SIZE_PRESETS[self.image_size]
        return self.image_size.width, self.image_size.height

    def without_images(self) -> InpaintRequest:
        """This request with ``"-"`` for its image and mask URLs: what is kept once they are decoded
        (a data URI can be tens of MB, and a URL may carry a token)."""
        return self.model_copy(update={"image_url": "-", "mask_url": "-"})


def output_size(request: InpaintRequest, input_size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """The (width, height) the model will produce: rounded DOWN to a multiple of 16 (as diffusers'
    FLUX pipelines do), at least 16, and within the server's pixel budget."""
    requested = request.requested_size()
    field = "image_size" if requested is not None else "image_url"
    width, height = requested if requested is not None else input_size
    width = max(SIZE_MULTIPLE, width // SIZE_MULTIPLE * SIZE_MULTIPLE)
    height = max(SIZE_MULTIPLE, height // SIZE_MULTIPLE * SIZE_MULTIPLE)
    if width * height > max_pixels:
        raise InvalidField(
            field,
            f"output of {width}x{height} is over this server's limit of {max_pixels} pixels "
            f"(set image_size to something smaller)",
        )
    return width, height


class FalImage(BaseModel):
    url: str
    content_type: str
    file_name: str
    file_size: int
    width: int
    height: int


class InpaintOutput(BaseModel):
    images: list[FalImage]
    timings: dict[str, float]
    seed: int
    has_nsfw_concepts: list[bool]
    prompt: str
