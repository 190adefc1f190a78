"""Images that cross tiers: inputs the front already validated travel as lossless PNG, outputs as
the requested format. Untrusted bytes are never decoded here (runners.front.images does that)."""

from __future__ import annotations

import base64
import io

from PIL import Image

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}  # by output_format
FILE_SUFFIXES = {"jpeg": "jpg", "png": "png"}
# A stored output file's suffix -> its content type (the file route serves it so).
SUFFIX_CONTENT_TYPES = {FILE_SUFFIXES[fmt]: CONTENT_TYPES[fmt] for fmt in CONTENT_TYPES}


def encode_image(image: Image.Image, output_format: str) -> bytes:
    buffer = io.BytesIO()
    if output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def to_data_uri(data: bytes, content_type: str) -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


def encode_lossless(image: Image.Image) -> bytes:
    """PNG with fast compression: how decoded inputs travel from the front to the worker."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_trusted_png(data: bytes, mode: str) -> Image.Image:
    """Inputs that our own front already validated and re-encoded."""
    image = Image.open(io.BytesIO(data), formats=("PNG",))
    image.load()
    return image.convert(mode)
