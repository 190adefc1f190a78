"""Decoding the images a request sends, treating every input byte as hostile (docs/security.md).

The bytes come from a ``data:`` URI (decoded here) or from an http(s) URL fetched by
``runners.fetch.SafeFetcher`` (runners/front/preparation.py chooses). Whatever their source, they are
decoded by Pillow restricted to the formats fal accepts for this endpoint (PNG, JPEG, WEBP, GIF,
AVIF), with the pixel budget checked from the header *before* decoding, decompression bombs as
errors, tiny images refused, EXIF orientation applied, and alpha flattened onto black on purpose (so a
transparent area of a mask means "keep"). An animated GIF, WEBP or AVIF gives its first frame: Pillow
opens a file at frame 0 and nothing here seeks, so the other frames are never decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from runners.errors import ImageLoadError
from runners.protocol.schema import SIZE_MULTIPLE

# fal's list for image_url and mask_url: jpg, jpeg, png, webp, gif, avif. Pillow decodes AVIF through
# the libavif its wheels carry (a header-only parse at open, the pixels at load, as the others).
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "AVIF")
NOT_ACCEPTED = "not a PNG, JPEG, WEBP, GIF or AVIF image"


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int
    max_bytes: int


def data_uri_bytes(uri: str, field: str, max_bytes: int) -> bytes:
    """The payload of a base64 ``data:`` URI, refusing other schemes and oversized payloads."""
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme in ("http", "https"):
        raise ImageLoadError(field, "only data: URIs are decoded here; http(s) URLs go through the URL fetcher")
    if scheme != "data":
        raise ImageLoadError(field, "must be a data: URI (data:image/png;base64,...)")
    header, sep, payload = uri.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise ImageLoadError(field, "data: URI must be base64-encoded (data:<type>;base64,<data>)")
    # Refuse before decoding: base64 is 4 characters per 3 bytes.
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise ImageLoadError(field, f"image is larger than this server's limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageLoadError(field, "data: URI payload is not valid base64") from None
    if len(data) > max_bytes:  # the length check above lets up to 3 bytes past
        raise ImageLoadError(field, f"image is larger than this server's limit of {max_bytes} bytes")
    return data


def _claimed_format(data: bytes) -> str | None:
    """The accepted format whose signature ``data`` starts with, if any (Pillow's own check)."""
    Image.init()
    for name in ACCEPTED_FORMATS:
        accept = Image.OPEN[name][1]
        if accept is not None and accept(data[:16]):
            return name
    return None


def open_image(data: bytes, field: str, limits: DecodeLimits) -> Image.Image:
    """Decode untrusted bytes into an upright image, or raise ``ImageLoadError`` naming ``field``."""
    if len(data) > limits.max_bytes:
        raise ImageLoadError(field, f"image is larger than this server's limit of {limits.max_bytes} bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        except UnidentifiedImageError:
            # A file that starts as one of ours but whose header its plugin refused (cut short, or an
            # AVIF declaring more than libavif parses) is not "another format".
            reason = "image could not be read" if _claimed_format(data) else NOT_ACCEPTED
            raise ImageLoadError(field, reason) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageLoadError(field, "image is too large to decode safely") from None
        except Exception:
            raise ImageLoadError(field, "image could not be read") from None
        width, height = image.size  # from the header; nothing decoded yet
        # Pillow's own bomb check only raises while our warning filter holds, and catch_warnings is
        # process-wide: another thread leaving it can drop the filter mid-decode. Check it here too.
        max_pixels = min(limits.max_pixels, Image.MAX_IMAGE_PIXELS or limits.max_pixels)
        if width * height > max_pixels:
            raise ImageLoadError(field, f"image of {width}x{height} is over this server's limit of {max_pixels} pixels")
        if width < SIZE_MULTIPLE or height < SIZE_MULTIPLE:
            raise ImageLoadError(
                field, f"image of {width}x{height} is too small: each side must be at least {SIZE_MULTIPLE} pixels"
            )
        try:
            image.load()
            return ImageOps.exif_transpose(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageLoadError(field, "image is too large to decode safely") from None
        except Exception:
            raise ImageLoadError(field, "image data is corrupt or truncated") from None


_WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grayscale PNG


def flatten(image: Image.Image, mode: str) -> Image.Image:
    """Convert to ``mode`` ("RGB" or "L"), compositing any transparency onto black."""
    if image.mode in _WIDE_GRAY_MODES:
        # Pillow's convert() clips 16-bit values at 255 instead of scaling them (and ignores a tRNS key).
        wide = image.convert("I")
        gray = wide.point([value >> 8 for value in range(65536)], "L")
        key = image.info.get("transparency")
        if isinstance(key, int):
            alpha = wide.point([0 if value == key else 255 for value in range(65536)], "L")
            gray = Image.merge("LA", (gray, alpha))
        image = gray
    # A tRNS colour key (L, RGB, 1 or P PNGs) is transparency too, as in PNGs optimisers write from RGBA.
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert(mode)


def decode_image_bytes(data: bytes, field: str, mode: str, limits: DecodeLimits) -> Image.Image:
    return flatten(open_image(data, field, limits), mode)


def decode_image_uri(uri: str, field: str, mode: str, limits: DecodeLimits) -> Image.Image:
    return decode_image_bytes(data_uri_bytes(uri, field, limits.max_bytes), field, mode, limits)
