"""A job's way into and out of the denoising loop, shared by both batching modes (the adaptive
runner, runners/worker/adaptive.py, and the step engine, runners/worker/engine.py): its LoRAs loaded,
its inputs decoded, whether it must stop, and its answer (images encoded, or why it stopped or failed).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from runners.errors import InferenceFailed, LoraLoadError, RequestCancelled, RequestTimedOut
from runners.lora.formats import LoraError
from runners.pipeline.inpaint import InpaintInputs, InpaintResult
from runners.protocol.images import CONTENT_TYPES, decode_trusted_png, encode_image
from runners.protocol.jobs import EncodedImage, InpaintJob, JobResult
from runners.worker.board import JobBoard

log = logging.getLogger(__name__)


def job_loras(job: InpaintJob, adapters, keep: set[str]) -> list:
    """The job's adapters, loaded (or found in memory) and checked against the model."""
    loras = []
    for index, lora in enumerate(job.loras):
        field = ("loras", index, "path")
        if adapters is None:
            raise LoraLoadError(field, "this server does not take per-request LoRAs")
        try:
            loras.append((adapters.get(Path(lora.path), lora.sha256, lora.name, keep), lora.scale))
        except LoraError as exc:
            raise LoraLoadError(field, f"{lora.name}: {exc}") from None
        except OSError:
            raise LoraLoadError(field, f"{lora.name}: the downloaded file is gone (evicted); retry") from None
    return loras


def to_inputs(job: InpaintJob, loras: list | None = None) -> InpaintInputs:
    request = job.request
    return InpaintInputs(
        prompt=request.prompt,
        image=decode_trusted_png(job.image_png, "RGB"),
        mask=decode_trusted_png(job.mask_png, "L"),
        width=job.width,
        height=job.height,
        seed=job.seed,
        num_inference_steps=request.num_inference_steps,
        strength=request.strength,
        guidance_scale=request.guidance_scale,
        num_images=request.num_images,
        enable_safety_checker=request.enable_safety_checker,
        loras=loras or [],
        acceleration=request.acceleration,
    )


def should_stop(job: InpaintJob, board: JobBoard) -> bool:
    return board.is_cancelled(job.request_id) or job.past_deadline()


def stopped(job: InpaintJob, board: JobBoard) -> JobResult:
    """The answer of a job that was stopped (cancelled or out of time) before it finished."""
    why = "cancelled" if board.is_cancelled(job.request_id) or not job.past_deadline() else "out of time"
    steps = [line.message for line in board.finish(job.request_id) if line.message.startswith("step ")]
    log.info(
        "request %s %s: left the batch after %s",
        job.request_id,
        why,
        steps[-1] if steps else "no step",
        extra={"request_id": job.request_id},
    )
    return JobResult.failed(job.request_id, RequestCancelled() if why == "cancelled" else RequestTimedOut())


def encode_result(job: InpaintJob, result: InpaintResult, board: JobBoard) -> JobResult:
    if result.cancelled:
        return stopped(job, board)
    started = time.perf_counter()
    fmt = job.request.output_format
    images = [
        EncodedImage(
            data=encode_image(image, fmt), content_type=CONTENT_TYPES[fmt], width=image.width, height=image.height
        )
        for image in result.images
    ]
    timings = dict(result.timings)
    timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - started
    board.log(job.request_id, "done")
    return JobResult(
        request_id=job.request_id,
        images=images,
        has_nsfw_concepts=result.has_nsfw_concepts,
        timings=timings,
        logs=board.finish(job.request_id),
    )


def failure(job: InpaintJob, board: JobBoard) -> JobResult:
    board.finish(job.request_id)
    return JobResult.failed(job.request_id, InferenceFailed("the model failed while running this request"))
