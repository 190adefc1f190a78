"""The front's two ends of a job's trip: preparing an ``InpaintJob`` from a fal request (fetch,
decode and check the images and LoRAs: CPU work that must never reach the GPU process with hostile
bytes), and turning the worker's ``JobResult`` into fal's output body.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import TYPE_CHECKING

import anyio.to_thread

from runners.config import ImageLimits
from runners.errors import ImageLoadError, InvalidField, LoraLoadError
from runners.fetch import FetchFailed, UrlRefused
from runners.front.images import DecodeLimits, data_uri_bytes, decode_image_bytes
from runners.lora.sources import LoraSourceError
from runners.protocol.images import FILE_SUFFIXES, encode_lossless, to_data_uri
from runners.protocol.jobs import InpaintJob, JobLora, JobResult
from runners.protocol.schema import FalImage, InpaintOutput, InpaintRequest, output_size

if TYPE_CHECKING:
    from runners.fetch import SafeFetcher
    from runners.front.store import OutputStore
    from runners.lora.sources import LoraSources


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
        request=request.without_images(),
        width=width,
        height=height,
        seed=seed,
        image_png=encode_lossless(image),
        mask_png=encode_lossless(mask),
        preprocess_s=time.perf_counter() - started,
    )


def fal_output(
    job: InpaintJob, result: JobResult, total_s: float, store: OutputStore | None, base_url: str
) -> InpaintOutput:
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
