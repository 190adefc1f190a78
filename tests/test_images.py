"""Tests for runners/front/images.py and runners/front/preparation.py: the hostile-image cases of
docs/security.md. Every refusal must be an ``ImageLoadError`` naming the field, with status 422."""

from __future__ import annotations

import asyncio
import base64
import io
import random
import struct
import threading
import time
import warnings

import numpy as np
import pytest
from PIL import AvifImagePlugin, Image

import runners.front.images as images
import runners.protocol.images as protocol_images
from runners.config import ImageLimits
from runners.errors import ImageLoadError, InvalidField
from runners.front.images import DecodeLimits, data_uri_bytes, decode_image_uri, flatten, open_image
from runners.front.preparation import prepare_job
from runners.protocol.images import encode_image
from runners.protocol.schema import InpaintRequest


def prepare_sync(*args):
    """prepare_job is a coroutine (it may fetch URLs); these cases only use data: URIs."""
    return asyncio.run(prepare_job(*args))


LIMITS = DecodeLimits(max_pixels=4096 * 4096, max_bytes=25 * 1024 * 1024)
JOB_LIMITS = ImageLimits(
    max_input_pixels=4096 * 4096,
    max_input_bytes=25 * 1024 * 1024,
    max_output_pixels=2048 * 2048,
    max_body_bytes=80 * 1024 * 1024,
)
FIELDS = ["image_url", "mask_url"]
ACCEPTED_MESSAGE = "PNG, JPEG, WEBP, GIF or AVIF"


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


# AVIF's lossless setting in Pillow: quality 100 (AV1's lossless mode) without chroma subsampling. Pillow
# writes YCbCr with BT.601 coefficients, so an RGB colour may still move by a level or so; grayscale
# (written as 4:0:0, Y only) and the colours avif_exact_palette() picks come back exactly.
AVIF_LOSSLESS = {"quality": 100, "subsampling": "4:4:4"}


def data_uri(data: bytes, content_type: str = "image/png") -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


def noise(size=(64, 48), mode="RGB", seed=0) -> Image.Image:
    rng = random.Random(seed)
    channels = len(mode)
    return Image.frombytes(mode, size, rng.randbytes(size[0] * size[1] * channels))


def refused(call, field: str) -> ImageLoadError:
    """Run ``call``; it must raise exactly ``ImageLoadError`` naming ``field`` as a 422."""
    with pytest.raises(ImageLoadError) as caught:
        call()
    error = caught.value
    assert error.field == field
    assert error.status == 422
    body = error.to_body()
    assert body["error_type"] == "image_load_error"
    assert body["detail"][0]["loc"] == ["body", field]
    assert error.reason
    return error


def job_request(image_uri: str, mask_uri: str, **fields) -> InpaintRequest:
    return InpaintRequest(prompt="a cat", image_url=image_uri, mask_url=mask_uri, **fields)


PNG_64 = encode(noise(), "PNG")
MASK_64 = encode(Image.new("L", (64, 48), 255), "PNG")


# --- schemes and data URIs ------------------------------------------------------------------------

BAD_SCHEMES = [
    "file:///etc/passwd",
    "FILE:///etc/passwd",
    "ftp://x",
    "gopher://x",
    "javascript:x",
    "/etc/passwd",
    "../../etc/passwd",
    "image.png",
    "C:\\Windows\\win.ini",
    "http://169.254.169.254/latest/meta-data/",
    "https://example.com/cat.png",
    "HTTPS://example.com/cat.png",
]


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("uri", BAD_SCHEMES)
def test_scheme_refused(uri, field):
    refused(lambda: data_uri_bytes(uri, field, LIMITS.max_bytes), field)
    refused(lambda: decode_image_uri(uri, field, "RGB", LIMITS), field)


@pytest.mark.parametrize("field", FIELDS)
def test_scheme_refused_through_prepare_job(field):
    uris = {"image_url": data_uri(PNG_64), "mask_url": data_uri(MASK_64), field: "file:///etc/passwd"}
    refused(lambda: prepare_sync(job_request(uris["image_url"], uris["mask_url"]), JOB_LIMITS, "rid"), field)


@pytest.mark.parametrize(
    "uri",
    [
        "data:image/png," + "%89PNG",  # not base64
        "data:image/png;charset=utf-8,abc",
        "data:image/png;base64",  # no payload separator
        "data:image/png;base64,@@@@",  # not the base64 alphabet
        "data:image/png;base64,QUJ",  # bad padding
        "data:image/png;base64,QUJ DRA==",  # whitespace inside
    ],
)
def test_data_uri_encoding_refused(uri):
    refused(lambda: data_uri_bytes(uri, "mask_url", LIMITS.max_bytes), "mask_url")


def test_data_uri_invalid_base64_says_so():
    error = refused(lambda: data_uri_bytes("data:image/png;base64,!!!!", "image_url", 1024), "image_url")
    assert "base64" in error.reason


def test_data_uri_payload_decoded():
    assert data_uri_bytes("data:image/png;base64,QUJD", "image_url", 1024) == b"ABC"
    assert data_uri_bytes("DATA:image/png;BASE64,QUJD", "image_url", 1024) == b"ABC"
    assert data_uri_bytes(data_uri(b"x" * 1024), "image_url", 1024) == b"x" * 1024


@pytest.mark.parametrize("size", [1025, 1026, 1027, 1028, 5000])
def test_data_uri_over_max_bytes_refused(size):
    error = refused(lambda: data_uri_bytes(data_uri(b"x" * size), "image_url", 1024), "image_url")
    assert "1024 bytes" in error.reason


def test_oversized_payload_refused_before_decoding(monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("base64 decoded an oversized payload")

    monkeypatch.setattr(images.base64, "b64decode", no_decoding)
    huge = "data:image/png;base64," + "A" * (64 * 1024 * 1024)  # 48 MiB once decoded
    started = time.perf_counter()
    error = refused(lambda: data_uri_bytes(huge, "mask_url", 1024 * 1024), "mask_url")
    assert time.perf_counter() - started < 0.5
    assert "larger than" in error.reason


def test_open_image_refuses_over_max_bytes():
    error = refused(lambda: open_image(PNG_64, "image_url", DecodeLimits(4096 * 4096, len(PNG_64) - 1)), "image_url")
    assert "bytes" in error.reason
    assert open_image(PNG_64, "image_url", DecodeLimits(4096 * 4096, len(PNG_64))).size == (64, 48)


# --- formats ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params"),
    [
        ("PNG", {}),
        ("JPEG", {"quality": 90}),
        ("WEBP", {"quality": 90}),
        ("WEBP", {"lossless": True}),
        ("GIF", {}),
        ("AVIF", {"quality": 90}),
        ("AVIF", AVIF_LOSSLESS),
    ],
)
def test_accepted_formats(fmt, params):
    data = encode(noise((40, 24)), fmt, **params)
    assert Image.open(io.BytesIO(data)).format == fmt
    image = open_image(data, "image_url", LIMITS)
    assert image.size == (40, 24)
    decoded = decode_image_uri(data_uri(data), "image_url", "RGB", LIMITS)
    assert decoded.mode == "RGB" and decoded.size == (40, 24)


def _refused_payloads() -> dict[str, bytes]:
    picture = noise((32, 32))
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>'
    return {
        "bmp": encode(picture, "BMP"),
        "tiff": encode(picture, "TIFF"),
        "ico": encode(picture, "ICO"),
        "ppm": encode(picture, "PPM"),
        "svg": svg,
        "html": b"<html><body><img src=x onerror=alert(1)></body></html>",
        "random": random.Random(7).randbytes(4096),
        "empty": b"",
        "png-magic-only": b"\x89PNG\r\n\x1a\n",
    }


REFUSED = _refused_payloads()


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("kind", REFUSED)
def test_refused_formats(kind, field):
    payload = REFUSED[kind]
    error = refused(lambda: decode_image_uri(data_uri(payload), field, "RGB", LIMITS), field)
    if kind != "png-magic-only":  # a PNG signature with nothing behind it is a broken PNG, not another format
        assert ACCEPTED_MESSAGE in error.reason


def test_content_type_is_not_trusted():
    png = encode(noise((32, 32)), "PNG")
    as_jpeg = decode_image_uri(data_uri(png, "image/jpeg"), "image_url", "RGB", LIMITS)
    assert as_jpeg.size == (32, 32)
    as_octets = decode_image_uri(
        data_uri(encode(noise((32, 32)), "JPEG"), "application/octet-stream"), "image_url", "RGB", LIMITS
    )
    assert as_octets.size == (32, 32)
    error = refused(
        lambda: decode_image_uri(data_uri(REFUSED["bmp"], "image/png"), "mask_url", "L", LIMITS), "mask_url"
    )
    assert ACCEPTED_MESSAGE in error.reason


# --- pixel budget ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    """10000x10000 of one colour: 100 megapixels in a few KB."""
    data = encode(Image.new("1", (10000, 10000), 1), "PNG")
    assert len(data) < 100_000
    return data


@pytest.fixture(scope="module")
def big_png() -> bytes:
    """5000x5000: over a 4096x4096 budget, yet under Pillow's own bomb limit."""
    data = encode(Image.new("1", (5000, 5000), 0), "PNG")
    assert 5000 * 5000 < Image.MAX_IMAGE_PIXELS
    return data


@pytest.fixture
def no_decoding(monkeypatch) -> list[str]:
    """Any decode of pixel data fails the test loudly (open_image would turn it into another message),
    and is recorded in the list returned. AVIF decodes its frame in its own ``load`` before Pillow's."""
    from PIL import ImageFile

    decoded: list[str] = []

    def forbidden(self):
        decoded.append(self.format)
        raise AssertionError("pixel data decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", forbidden)
    monkeypatch.setattr(AvifImagePlugin.AvifImageFile, "load", forbidden)
    return decoded


@pytest.mark.parametrize("field", FIELDS)
def test_huge_image_refused_quickly(huge_png, field):
    started = time.perf_counter()
    refused(lambda: decode_image_uri(data_uri(huge_png), field, "RGB", LIMITS), field)
    assert time.perf_counter() - started < 0.5


def test_over_budget_refused_from_header(big_png, no_decoding):
    started = time.perf_counter()
    error = refused(lambda: open_image(big_png, "image_url", LIMITS), "image_url")
    assert time.perf_counter() - started < 0.5
    assert "5000x5000" in error.reason and str(4096 * 4096) in error.reason


def test_budget_edge(no_decoding):
    data = encode(Image.new("L", (64, 32)), "PNG")
    refused(lambda: open_image(data, "image_url", DecodeLimits(64 * 32 - 1, 10**6)), "image_url")


def test_budget_edge_accepted():
    assert open_image(encode(Image.new("L", (64, 32)), "PNG"), "image_url", DecodeLimits(64 * 32, 10**6)).size == (
        64,
        32,
    )


def declaring(data: bytes, width: int, height: int) -> bytes:
    """A small GIF or AVIF whose header claims another canvas: the GIF's logical screen, the AVIF's
    'ispe' (image spatial extents) box. Nothing else changes: a bomb that costs a few bytes."""
    patched = bytearray(data)
    if data.startswith(b"GIF"):
        patched[6:10] = struct.pack("<HH", width, height)
    else:
        box = patched.index(b"ispe") + 8  # after the type and the version and flags
        patched[box : box + 8] = struct.pack(">II", width, height)
    return bytes(patched)


SMALL = {"GIF": encode(noise((32, 32)).quantize(16), "GIF"), "AVIF": encode(noise((32, 32)), "AVIF")}


SMALL_BUDGET = DecodeLimits(max_pixels=1000 * 1000, max_bytes=10**6)


@pytest.fixture(scope="module")
def big_gif_avif() -> dict[str, bytes]:
    """Real 1200x1000 files of one colour, over a budget of 1000x1000 pixels, that decode where
    the budget allows them."""
    files = {
        "GIF": encode(Image.new("P", (1200, 1000)), "GIF"),
        "AVIF": encode(Image.new("RGB", (1200, 1000)), "AVIF", speed=10),
    }
    for data in files.values():
        assert len(data) < 20_000
        assert open_image(data, "mask_url", DecodeLimits(1200 * 1000, 10**6)).size == (1200, 1000)
    return files


@pytest.mark.parametrize("fmt", ["GIF", "AVIF"])
def test_gif_and_avif_over_budget_refused_before_decoding(big_gif_avif, no_decoding, fmt):
    started = time.perf_counter()
    error = refused(lambda: open_image(big_gif_avif[fmt], "mask_url", SMALL_BUDGET), "mask_url")
    assert time.perf_counter() - started < 0.5
    assert "1200x1000" in error.reason and str(1000 * 1000) in error.reason
    assert no_decoding == []


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize(
    ("fmt", "width", "height"),
    [
        ("GIF", 5000, 5000),  # over the server's budget
        ("GIF", 10000, 10000),  # over Image.MAX_IMAGE_PIXELS: Pillow warns, which is an error here
        ("GIF", 65535, 65535),  # over twice that: Pillow raises (the largest a GIF can declare)
        ("AVIF", 5000, 5000),
        ("AVIF", 10000, 10000),
        ("AVIF", 16384, 16384),
        ("AVIF", 60000, 60000),  # past libavif's own limit: it refuses to parse the header
    ],
)
def test_gif_and_avif_declaring_a_huge_canvas_refused_before_decoding(no_decoding, fmt, width, height, field):
    data = declaring(SMALL[fmt], width, height)
    started = time.perf_counter()
    error = refused(lambda: decode_image_uri(data_uri(data), field, "RGB", LIMITS), field)
    assert time.perf_counter() - started < 0.5
    assert no_decoding == []
    expected = {5000: "5000x5000 is over", 60000: "could not be read"}.get(width, "too large to decode safely")
    assert expected in error.reason, error.reason


def test_huge_image_refused_through_prepare_job(huge_png):
    request = job_request(data_uri(huge_png), data_uri(MASK_64))
    refused(lambda: prepare_sync(request, JOB_LIMITS, "rid"), "image_url")
    request = job_request(data_uri(PNG_64), data_uri(huge_png))
    refused(lambda: prepare_sync(request, JOB_LIMITS, "rid"), "mask_url")


def test_max_image_pixels_stays_finite():
    import runners.front.preparation  # noqa: F401  (everything the front imports)
    import runners.protocol.schema  # noqa: F401

    assert isinstance(Image.MAX_IMAGE_PIXELS, int) and 0 < Image.MAX_IMAGE_PIXELS < 20_000 * 20_000
    before = Image.MAX_IMAGE_PIXELS
    open_image(PNG_64, "image_url", LIMITS)
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "AVIF"])
@pytest.mark.parametrize("side", [40, 100])  # 1600 px: Pillow warns; 10000 px: Pillow raises
def test_decompression_bomb_is_an_error(monkeypatch, side, fmt):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(Image.new("RGB", (side, side)), fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a caller's filter must not turn the bomb into a mere warning
        refused(lambda: open_image(data, "mask_url", DecodeLimits(10**8, 10**8)), "mask_url")


def test_decompression_bomb_refused_when_warning_filter_is_lost(monkeypatch):
    """catch_warnings is process-wide: another thread leaving it can drop our filter mid-decode."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    set_filter = warnings.simplefilter
    monkeypatch.setattr(images.warnings, "simplefilter", lambda *args, **kwargs: None)
    data = encode(Image.new("RGB", (40, 40)), "PNG")
    with warnings.catch_warnings():
        set_filter("ignore")
        refused(lambda: open_image(data, "image_url", DecodeLimits(10**8, 10**8)), "image_url")


def test_warning_filters_left_as_they_were():
    before = list(warnings.filters)
    open_image(PNG_64, "image_url", LIMITS)
    with pytest.raises(ImageLoadError):
        open_image(REFUSED["bmp"], "image_url", LIMITS)
    assert warnings.filters == before


def test_concurrent_decodes_all_checked(big_png):
    errors: list[BaseException] = []

    def decode(index: int):
        try:
            if index % 2:
                open_image(PNG_64, "image_url", LIMITS)
            else:
                with pytest.raises(ImageLoadError):
                    open_image(big_png, "image_url", LIMITS)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# --- tiny images -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(15, 15), (1, 1), (16, 15), (15, 16), (4000, 1), (1, 16)])
@pytest.mark.parametrize("field", FIELDS)
def test_tiny_images_refused(size, field):
    data = encode(Image.new("RGB", size, (255, 255, 255)), "PNG")
    error = refused(lambda: decode_image_uri(data_uri(data), field, "RGB", LIMITS), field)
    assert "16" in error.reason and "at least" in error.reason


@pytest.mark.parametrize("fmt", ["GIF", "AVIF"])
@pytest.mark.parametrize("size", [(15, 15), (1, 1), (16, 15), (15, 16)])
@pytest.mark.parametrize("field", FIELDS)
def test_tiny_gif_and_avif_refused(size, field, fmt):
    data = encode(Image.new("RGB", size, (255, 255, 255)), fmt)
    error = refused(lambda: decode_image_uri(data_uri(data), field, "RGB", LIMITS), field)
    assert "16" in error.reason and "at least" in error.reason


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "AVIF"])
def test_smallest_image_accepted(fmt):
    assert decode_image_uri(data_uri(encode(Image.new("RGB", (16, 16)), fmt)), "image_url", "RGB", LIMITS).size == (
        16,
        16,
    )


def test_tiny_mask_refused_through_prepare_job():
    tiny = data_uri(encode(Image.new("L", (1, 1), 255), "PNG"))
    refused(lambda: prepare_sync(job_request(data_uri(PNG_64), tiny), JOB_LIMITS, "rid"), "mask_url")


# --- truncated and corrupt files ----------------------------------------------------------------------


FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "AVIF"]


@pytest.fixture(scope="module")
def encoded_noise() -> dict[str, bytes]:
    picture = noise((96, 64), seed=3)
    return {
        "PNG": encode(picture, "PNG"),
        "JPEG": encode(picture, "JPEG", quality=95),
        "WEBP": encode(picture, "WEBP", quality=95),
        "GIF": encode(picture.quantize(256), "GIF"),
        "AVIF": encode(picture, "AVIF", **AVIF_LOSSLESS),
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_cut_in_half_refused(encoded_noise, fmt):
    data = encoded_noise[fmt]
    refused(lambda: open_image(data[: len(data) // 2], "image_url", LIMITS), "image_url")


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_cut_refused_cleanly(encoded_noise, fmt):
    """Wherever the file ends, the answer is a 422 ImageLoadError naming the field and what is wrong,
    never another exception, unless nothing of the image was lost: a file cut only in what follows
    its pixel data (measured over every cut: a PNG's last 20 bytes, its last CRC and IEND; a GIF's
    last 2, the block terminator and trailer; none for JPEG, WEBP and AVIF) decodes to the whole
    image, as browsers show it. No cut that loses a pixel is accepted."""
    data = encoded_noise[fmt]
    whole = np.asarray(open_image(data, "mask_url", LIMITS).convert("RGB"))
    cuts = sorted(
        set(range(0, 64)) | set(range(64, len(data), max(1, len(data) // 60))) | set(range(len(data) - 32, len(data)))
    )
    reasons = (f"not a {ACCEPTED_MESSAGE} image", "image could not be read", "image data is corrupt or truncated")
    accepted = []
    for cut in cuts:
        try:
            opened = open_image(data[:cut], "mask_url", LIMITS)
        except ImageLoadError as error:
            assert error.field == "mask_url" and error.reason in reasons, (cut, error.reason)
            continue
        assert np.array_equal(np.asarray(opened.convert("RGB")), whole), f"a cut at {cut} of {len(data)} bytes decoded"
        accepted.append(len(data) - cut)
    assert max(accepted, default=0) <= {"PNG": 20, "GIF": 2}.get(fmt, 0), accepted


@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupted_bytes_refused_cleanly(encoded_noise, fmt):
    rng = random.Random(11)
    data = encoded_noise[fmt]
    for _ in range(40):
        damaged = bytearray(data)
        for _ in range(8):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        try:
            decode_image_uri(data_uri(bytes(damaged)), "image_url", "RGB", LIMITS)
        except ImageLoadError as error:
            assert error.field == "image_url"


def test_png_crc_damage_refused(encoded_noise):
    data = bytearray(encoded_noise["PNG"])
    start = data.index(b"IDAT") + 4
    data[start + 10] ^= 0xFF
    refused(lambda: open_image(bytes(data), "image_url", LIMITS), "image_url")


# --- EXIF orientation --------------------------------------------------------------------------------


def test_exif_orientation_applied():
    picture = Image.new("RGB", (40, 20), (0, 0, 255))
    picture.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    data = encode(picture, "JPEG", exif=exif, quality=95)
    upright = decode_image_uri(data_uri(data, "image/jpeg"), "image_url", "RGB", LIMITS)
    assert upright.size == (20, 40)
    red, green, blue = upright.getpixel((10, 5))  # the left half went to the top
    assert red > 200 and blue < 60
    red, green, blue = upright.getpixel((10, 35))
    assert blue > 200 and red < 60


def test_no_exif_keeps_size():
    assert open_image(encode(Image.new("RGB", (40, 20)), "JPEG"), "image_url", LIMITS).size == (40, 20)


# --- alpha and modes ---------------------------------------------------------------------------------


def test_transparent_pixels_flattened_onto_black():
    picture = Image.new("RGBA", (16, 16), (255, 255, 255, 0))
    picture.putpixel((1, 1), (255, 255, 255, 255))
    picture.putpixel((2, 2), (200, 100, 50, 128))
    rgb = decode_image_uri(data_uri(encode(picture, "PNG")), "image_url", "RGB", LIMITS)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (0, 0, 0)
    assert rgb.getpixel((1, 1)) == (255, 255, 255)
    assert all(abs(a - b) <= 2 for a, b in zip(rgb.getpixel((2, 2)), (100, 50, 25)))


def test_transparent_webp_flattened_onto_black():
    picture = Image.new("RGBA", (16, 16), (255, 255, 255, 0))
    rgb = decode_image_uri(data_uri(encode(picture, "WEBP", lossless=True)), "image_url", "RGB", LIMITS)
    assert rgb.getpixel((5, 5)) == (0, 0, 0)


@pytest.mark.parametrize("background", [(0, 0, 0, 0), (255, 255, 255, 0), (255, 0, 0, 0)])
def test_rgba_mask_with_transparent_background(background):
    mask = Image.new("RGBA", (32, 32), background)
    mask.paste((255, 255, 255, 255), (8, 8, 24, 24))  # an opaque white stroke
    decoded = decode_image_uri(data_uri(encode(mask, "PNG")), "mask_url", "L", LIMITS)
    assert decoded.mode == "L"
    assert decoded.getpixel((0, 0)) == 0 and decoded.getpixel((31, 31)) == 0
    assert decoded.getpixel((8, 8)) == 255 and decoded.getpixel((16, 16)) == 255
    assert decoded.getextrema() == (0, 255)


def _mask_in_mode(mode: str) -> Image.Image:
    white_square = Image.new("L", (32, 32), 0)
    white_square.paste(255, (8, 8, 24, 24))
    if mode == "LA":
        return Image.merge("LA", (white_square, Image.new("L", (32, 32), 255)))
    return white_square.convert(mode)


@pytest.mark.parametrize("mode", ["1", "P", "RGB", "LA", "L", "RGBA"])
def test_mask_modes_become_l(mode):
    mask = _mask_in_mode(mode)
    assert mask.mode == mode
    decoded = decode_image_uri(data_uri(encode(mask, "PNG")), "mask_url", "L", LIMITS)
    assert decoded.mode == "L"
    assert decoded.getpixel((0, 0)) == 0 and decoded.getpixel((16, 16)) == 255


@pytest.mark.parametrize("mode", ["1", "P", "RGB", "LA", "L", "RGBA", "CMYK", "I;16"])
def test_flatten_any_mode(mode):
    picture = Image.new(mode, (16, 16))
    for target in ("L", "RGB"):
        assert flatten(picture, target).mode == target


@pytest.mark.parametrize(
    ("mode", "colour", "key"),
    [("RGB", (255, 255, 255), (255, 255, 255)), ("L", 255, 255), ("1", 1, 1), ("P", 1, 1)],
)
def test_transparency_key_flattened_onto_black(mode, colour, key):
    """A tRNS colour key is transparency too (PNG optimisers write RGBA images this way)."""
    if mode == "P":
        picture = Image.new("P", (16, 16), 1)
        picture.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    else:
        picture = Image.new(mode, (16, 16), colour)
    picture.putpixel((0, 0), 0)  # one opaque black pixel; the rest is white and transparent
    data = encode(picture, "PNG", transparency=key)
    opened = open_image(data, "image_url", LIMITS)
    assert "transparency" in opened.info
    assert flatten(opened, "L").getextrema() == (0, 0)
    assert flatten(opened, "RGB").getpixel((5, 5)) == (0, 0, 0)


def test_sixteen_bit_grayscale_scaled_not_clipped():
    picture = Image.new("I;16", (16, 16), 65535)
    picture.putpixel((0, 0), 0)
    picture.putpixel((1, 0), 32768)
    picture.putpixel((2, 0), 255)  # 0.4% grey: near black, not white
    opened = open_image(encode(picture, "PNG"), "mask_url", LIMITS)
    assert opened.mode.startswith("I")
    gray = flatten(opened, "L")
    assert [gray.getpixel((x, 0)) for x in range(4)] == [0, 128, 0, 255]
    assert flatten(opened, "RGB").getpixel((1, 0)) == (128, 128, 128)


def test_sixteen_bit_grayscale_transparency_key():
    picture = Image.new("I;16", (16, 16), 65535)
    picture.putpixel((0, 0), 30000)
    opened = open_image(encode(picture, "PNG", transparency=65535), "mask_url", LIMITS)
    gray = flatten(opened, "L")
    assert gray.getpixel((0, 0)) == 30000 >> 8 and gray.getpixel((5, 5)) == 0


# --- GIF and AVIF: palettes, transparency, animation -----------------------------------------------


def _palette_noise(colours: int = 200, transparent: int | None = None) -> Image.Image:
    picture = noise((48, 32), seed=5).quantize(colours)
    if transparent is not None:
        picture.info["transparency"] = transparent
    return picture


def _stroke_mask(mode: str) -> Image.Image:
    """A white stroke on black (or on transparent white, for RGBA): white = repaint, black = keep."""
    if mode == "RGBA":
        mask = Image.new("RGBA", (48, 32), (255, 255, 255, 0))
        mask.paste((255, 255, 255, 255), (8, 8, 40, 24))
        return mask
    return _mask_in_mode("L").resize((48, 32)).convert(mode)


GIF_CONTENTS = {
    "palette": lambda: _palette_noise(),
    "palette with a transparent index": lambda: _palette_noise(transparent=7),
    "grayscale": lambda: noise((48, 32), "L", seed=6),
    "1-bit mask": lambda: _stroke_mask("1"),
    "grayscale mask": lambda: _stroke_mask("L"),
    "palette mask": lambda: _stroke_mask("P"),
    "transparent mask": lambda: _stroke_mask("RGBA"),
}


@pytest.mark.parametrize("content", GIF_CONTENTS)
@pytest.mark.parametrize(("field", "mode"), [("image_url", "RGB"), ("mask_url", "L")])
def test_gif_ends_as_a_png_of_the_same_content(content, field, mode):
    """Whatever mode Pillow opens the GIF in (P, or L for a 1-bit source; the PNG may be 1, L, P or
    RGBA), the decoded input has the mode and the pixels of the PNG's, as image and as mask."""
    picture = GIF_CONTENTS[content]()
    params = {"transparency": picture.info["transparency"]} if "transparency" in picture.info else {}
    gif = decode_image_uri(data_uri(encode(picture, "GIF", **params), "image/gif"), field, mode, LIMITS)
    png = decode_image_uri(data_uri(encode(picture, "PNG", **params)), field, mode, LIMITS)
    assert gif.mode == png.mode == mode
    assert np.array_equal(np.asarray(gif), np.asarray(png))
    if "transparen" in content:  # transparency is flattened onto black in both
        assert np.asarray(png).min() == 0


def _frames(fmt: str) -> tuple[bytes, Image.Image]:
    """A three-frame animation (two colours after a noisy first frame) and its first frame's pixels,
    as the format holds them."""
    first = _palette_noise(64).convert("RGB") if fmt == "GIF" else noise((48, 32), seed=8)
    rest = [Image.new("RGB", (48, 32), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    params = {"duration": 100, **{"AVIF": AVIF_LOSSLESS, "WEBP": {"lossless": True}}.get(fmt, {})}
    data = encode(first, fmt, save_all=True, append_images=rest, **params)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    return data, Image.open(io.BytesIO(encode(first, fmt, **params))).convert("RGB")


@pytest.mark.parametrize("fmt", ["GIF", "AVIF", "WEBP"])
def test_animation_gives_its_first_frame(fmt):
    data, first = _frames(fmt)
    decoded = decode_image_uri(data_uri(data), "image_url", "RGB", LIMITS)
    assert decoded.size == (48, 32)
    assert np.array_equal(np.asarray(decoded), np.asarray(first))
    assert 0 < pixels_of(decoded).std()  # noise, not one of the later frames' flat colour


def test_animated_gif_first_frame_through_prepare_job():
    data, first = _frames("GIF")
    job = prepare_sync(job_request(data_uri(data, "image/gif"), data_uri(MASK_64)), JOB_LIMITS, "rid")
    assert np.array_equal(np.asarray(_decoded(job.image_png)), np.asarray(first))


def pixels_of(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


# --- prepare_job ---------------------------------------------------------------------------------


def _decoded(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def test_prepare_job_rounds_input_size_and_accepts_other_mask_size():
    image = encode(noise((1000, 777)), "PNG")
    mask = encode(Image.new("RGBA", (50, 40), (255, 255, 255, 0)), "PNG")
    job = prepare_sync(job_request(data_uri(image), data_uri(mask), seed=1234), JOB_LIMITS, "rid-1")
    assert (job.width, job.height) == (992, 768)
    assert job.seed == 1234
    assert job.request_id == "rid-1"
    assert job.request.image_url == "-" and job.request.mask_url == "-"
    decoded_image, decoded_mask = _decoded(job.image_png), _decoded(job.mask_png)
    assert decoded_image.mode == "RGB" and decoded_image.size == (1000, 777)
    assert decoded_mask.mode == "L" and decoded_mask.size == (50, 40)
    assert decoded_mask.getextrema() == (0, 0)  # transparent means keep
    assert job.preprocess_s >= 0


def test_prepare_job_size_from_upright_image():
    picture = Image.new("RGB", (48, 32))
    exif = Image.Exif()
    exif[0x0112] = 8
    job = prepare_sync(job_request(data_uri(encode(picture, "JPEG", exif=exif)), data_uri(MASK_64)), JOB_LIMITS, "r")
    assert (job.width, job.height) == (32, 48)


@pytest.mark.parametrize(
    ("image_size", "expected"),
    [("square", (512, 512)), ("landscape_16_9", (1024, 576)), ({"width": 100, "height": 37}, (96, 32))],
)
def test_prepare_job_honours_image_size(image_size, expected):
    job = prepare_sync(job_request(data_uri(PNG_64), data_uri(MASK_64), image_size=image_size), JOB_LIMITS, "rid")
    assert (job.width, job.height) == expected
    assert _decoded(job.image_png).size == (64, 48)


def test_prepare_job_output_budget():
    limits = JOB_LIMITS.model_copy(update={"max_output_pixels": 512 * 512})
    request = job_request(data_uri(PNG_64), data_uri(MASK_64), image_size="square_hd")
    with pytest.raises(InvalidField) as caught:
        prepare_sync(request, limits, "rid")
    assert caught.value.field == "image_size" and caught.value.status == 422


def test_prepare_job_draws_seed_when_missing():
    request = job_request(data_uri(PNG_64), data_uri(MASK_64))
    seeds = {prepare_sync(request, JOB_LIMITS, "rid").seed for _ in range(6)}
    assert all(0 <= seed < 2**32 for seed in seeds)
    assert len(seeds) > 1


def test_prepare_job_keeps_seed_zero_and_max():
    for seed in (0, 2**63 - 1):
        assert prepare_sync(job_request(data_uri(PNG_64), data_uri(MASK_64), seed=seed), JOB_LIMITS, "r").seed == seed


# --- encode_image --------------------------------------------------------------------------------


@pytest.mark.parametrize("output_format", ["jpeg", "png"])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_encode_image_round_trip(output_format, mode):
    picture = noise((48, 32)).convert(mode)
    data = encode_image(picture, output_format)
    decoded = _decoded(data)
    assert decoded.format == {"jpeg": "JPEG", "png": "PNG"}[output_format]
    assert decoded.size == (48, 32)
    if output_format == "png":
        assert decoded.mode == mode
        assert decoded.tobytes() == picture.tobytes()
    else:
        assert decoded.mode == "RGB"
    assert protocol_images.CONTENT_TYPES[output_format] == f"image/{output_format}"


def test_encoded_output_decodes_as_input():
    out = encode_image(noise((32, 32)), "jpeg")
    assert decode_image_uri(protocol_images.to_data_uri(out, "image/jpeg"), "image_url", "RGB", LIMITS).size == (32, 32)
