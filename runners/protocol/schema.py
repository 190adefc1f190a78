"""The fal wire contract of ``fal-ai/flux-lora/inpainting``: one pydantic model for the input,
one for the output (see shared/fal-contract.md). No torch here: the HTTP front imports it.
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
    model_config = ConfigDict(extra="forbid")

    width: int = Field(512, gt=0, le=MAX_SIDE)
    height: int = Field(512, gt=0, le=MAX_SIDE)


class LoraWeight(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=4096)
    """URL, name in the local LoRA directory, or hub-style name."""
    scale: float = Field(1.0, ge=-4.0, le=4.0, allow_inf_nan=False)


class InpaintRequest(BaseModel):
    """Every input field of fal's endpoint, with fal's defaults and bounds.

    Unknown fields are ignored, as fal does, so clients written for newer fal versions still work.
    """

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    image_url: str = Field(min_length=1, max_length=MAX_URL_CHARS)
    mask_url: str = Field(min_length=1, max_length=MAX_URL_CHARS)
    """White = repaint, black = keep."""
    image_size: ImageSizePreset | ImageSize | None = None
    """Output size; unset means the input image's size, rounded down to a multiple of 16."""
    num_inference_steps: int = Field(28, ge=1, le=50)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    loras: list[LoraWeight] = Field(default_factory=list, max_length=16)
    guidance_scale: float = Field(3.5, ge=0.0, le=35.0, allow_inf_nan=False)
    strength: float = Field(0.85, ge=0.01, le=1.0, allow_inf_nan=False)
    sync_mode: bool = False
    num_images: int = Field(1, ge=1, le=4)
    enable_safety_checker: bool = True
    output_format: Literal["jpeg", "png"] = "jpeg"
    acceleration: Literal["none", "regular"] = "none"

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must contain non-whitespace text")
        return value

    def without_images(self) -> InpaintRequest:
        """A copy without the input images (data URIs can be tens of MB): what is kept of a request
        once its images are decoded, or once it has finished."""
        return self.model_copy(update={"image_url": "-", "mask_url": "-"})

    def requested_size(self) -> tuple[int, int] | None:
        """(width, height) asked for, before rounding; None means "the input image's size"."""
        if self.image_size is None:
            return None
        if isinstance(self.image_size, str):
            return IMAGE_SIZE_PRESETS[self.image_size]
        return self.image_size.width, self.image_size.height


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
