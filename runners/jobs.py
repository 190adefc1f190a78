"""What travels between the HTTP front and the model worker, and the two ends of that trip.

The front validates a fal request, decodes and checks its images (CPU work that must never reach
the GPU process with hostile bytes), and sends an ``InpaintJob``: the validated fields plus the
decoded images re-encoded losslessly. The worker answers a ``JobResult`` per job: encoded output
images, or the error of that job alone.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import TYPE_CHECKING

import anyio.to_thread

from pydantic import BaseModel, ConfigDict, Field

from .config import ImageLimits
from .errors import ImageLoadError, InpaintError, InvalidField, LoraLoadError, ReportedError
from .fetch import FetchFailed, UrlRefused
from .images import FILE_SUFFIXES, DecodeLimits, data_uri_bytes, decode_image_bytes, encode_lossless, to_data_uri
from .progress import LogLine
from .schema import FalImage, InpaintOutput, InpaintRequest, output_size

from .lora_sources import LoraSourceError

if TYPE_CHECKING:
    from .fetch import SafeFetcher
    from .lora_sources import LoraSources
    from .store import OutputStore


# Images are raw bytes in Python and base64 in JSON, which is how they cross between processes.
BYTES_AS_BASE64 = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")


class JobLora(BaseModel):
    """A request's LoRA, resolved by the front to a local file the worker can load."""

    path: str  # local file (the front and the worker share the disk)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    scale: float
    name: str  # what the request called it (safe to log: no query string)


class InpaintJob(BaseModel):
    model_config = BYTES_AS_BASE64

    request_id: str = Field(min_length=1, max_length=128)
    request: InpaintRequest  # image_url and mask_url blanked: the pixels travel below
    width: int = Field(ge=16, le=14142)
    height: int = Field(ge=16, le=14142)
    seed: int = Field(ge=0)
    image_png: bytes
    mask_png: bytes
    loras: list[JobLora] = Field(default_factory=list)
    preprocess_s: float = 0.0  # time the front spent decoding
    deadline: float | None = None  # unix time: past it the loop drops the job (wall clock, valid across hosts)

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline


class EncodedImage(BaseModel):
    model_config = BYTES_AS_BASE64

    data: bytes
    content_type: str
    width: int
    height: int


class JobError(BaseModel):
    status: int
    error_type: str
    detail: str | list | dict

    def as_exception(self) -> ReportedError:
        return ReportedError(self.status, self.error_type, self.detail)


class JobResult(BaseModel):
    request_id: str
    images: list[EncodedImage] = Field(default_factory=list)
    has_nsfw_concepts: list[bool] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    logs: list[LogLine] = Field(default_factory=list)
    error: JobError | None = None

    @classmethod
    def failed(cls, request_id: str, exc: InpaintError) -> JobResult:
        return cls(request_id=request_id, error=JobError(status=exc.status, error_type=exc.error_type, detail=exc.detail()))


async def load_image_bytes(uri: str, field: str, max_bytes: int, fetcher: SafeFetcher | None) -> bytes:
    """An image's encoded bytes from a data: URI or, through the safe fetcher, an http(s) URL."""
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme not in ("http", "https") or fetcher is None:
        return data_uri_bytes(uri, field, max_bytes)
    try:
        return await fetcher.fetch(uri, max_bytes)
    except UrlRefused as exc:
        raise ImageLoadError(field, str(exc)) from None
    except FetchFailed as exc:
        raise ImageLoadError(field, f"could not fetch the image: {exc}") from None


async def resolve_loras(request: InpaintRequest, sources: LoraSources | None, max_per_request: int) -> list[JobLora]:
    """Each requested LoRA as a local file (downloaded and cached when it is a URL)."""
    if len(request.loras) > max_per_request:
        raise InvalidField("loras", f"at most {max_per_request} LoRAs per request on this server")
    if request.loras and sources is None:
        raise InvalidField("loras", "this server does not take per-request LoRAs")
    resolved = []
    for index, lora in enumerate(request.loras):
        try:
            file = await sources.resolve(lora.path)
        except LoraSourceError as exc:
            raise LoraLoadError(("loras", index, "path"), str(exc)) from None
        resolved.append(JobLora(path=str(file.path), sha256=file.sha256, scale=lora.scale, name=file.source))
    return resolved


async def prepare_job(
    request: InpaintRequest,
    limits: ImageLimits,
    request_id: str,
    fetcher: SafeFetcher | None = None,
    sources: LoraSources | None = None,
    max_loras: int = 0,
    deadline: float | None = None,
) -> InpaintJob:
    """Front side: fetch, decode and check the images and LoRAs, settle size and seed.
    Raises ``InpaintError``."""
    started = time.perf_counter()
    loras = await resolve_loras(request, sources, max_loras)
    image_bytes, mask_bytes = await asyncio.gather(
        load_image_bytes(request.image_url, "image_url", limits.max_input_bytes, fetcher),
        load_image_bytes(request.mask_url, "mask_url", limits.max_input_bytes, fetcher),
    )
    job = await anyio.to_thread.run_sync(decode_job, request, limits, request_id, image_bytes, mask_bytes, started)
    return job.model_copy(update={"loras": loras, "deadline": deadline})


def decode_job(
    request: InpaintRequest, limits: ImageLimits, request_id: str, image_bytes: bytes, mask_bytes: bytes, started: float
) -> InpaintJob:
    decode = DecodeLimits(max_pixels=limits.max_input_pixels, max_bytes=limits.max_input_bytes)
    image = decode_image_bytes(image_bytes, "image_url", "RGB", decode)
    mask = decode_image_bytes(mask_bytes, "mask_url", "L", decode)
    width, height = output_size(request, image.size, limits.max_output_pixels)
    seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
    return InpaintJob(
        request_id=request_id,
        request=request.model_copy(update={"image_url": "-", "mask_url": "-"}),
        width=width,
        height=height,
        seed=seed,
        image_png=encode_lossless(image),
        mask_png=encode_lossless(mask),
        preprocess_s=time.perf_counter() - started,
    )


def fal_output(job: InpaintJob, result: JobResult, total_s: float, store: OutputStore | None, base_url: str) -> InpaintOutput:
    """Front side: the fal response body for a successful job. Images are stored and served from
    ``{base_url}files/<name>``, or returned as data URIs with ``sync_mode`` (or without a store)."""
    suffix = FILE_SUFFIXES[job.request.output_format]
    images = []
    for index, image in enumerate(result.images):
        if job.request.sync_mode or store is None:
            url = to_data_uri(image.data, image.content_type)
        else:
            url = f"{base_url}files/{store.put(image.data, suffix)}"
        images.append(
            FalImage(
                url=url,
                content_type=image.content_type,
                file_name=f"{job.request_id}-{index}.{suffix}",
                file_size=len(image.data),
                width=image.width,
                height=image.height,
            )
        )
    timings = dict(result.timings)
    timings["preprocess"] = timings.get("preprocess", 0.0) + job.preprocess_s
    timings["total"] = total_s
    return InpaintOutput(
        images=images,
        timings=timings,
        seed=job.seed,
        has_nsfw_concepts=result.has_nsfw_concepts,
        prompt=job.request.prompt,
    )
