"""Worker side of a batch: jobs in, one result per job out, a failing job failing alone.

BentoML's adaptive batching hands the worker whatever requests arrived together. They are split
into groups that can share one denoising loop (same output size: the transformer's token count),
each group runs as one batched forward per step, and each job's images are encoded in its format.
If a group raises, its jobs are retried one by one, so only the job that fails gets an error.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable

from .errors import InferenceFailed
from .images import CONTENT_TYPES, decode_trusted_png, encode_image
from .inpaint import Inpainter, InpaintInputs, InpaintResult
from .jobs import EncodedImage, InpaintJob, JobResult

log = logging.getLogger(__name__)

# (job, steps done, steps total): progress for logs and, later, queue status.
ProgressCallback = Callable[[InpaintJob, int, int], None]


def to_inputs(job: InpaintJob) -> InpaintInputs:
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
    )


def group_by_size(jobs: list[tuple[int, InpaintJob]]) -> list[list[tuple[int, InpaintJob]]]:
    """Jobs (with their positions) grouped by output size, the one thing a loop must share."""
    groups: dict[tuple[int, int], list[tuple[int, InpaintJob]]] = defaultdict(list)
    for position, job in jobs:
        groups[(job.width, job.height)].append((position, job))
    return list(groups.values())


def encode_result(job: InpaintJob, result: InpaintResult) -> JobResult:
    started = time.perf_counter()
    fmt = job.request.output_format
    images = [
        EncodedImage(data=encode_image(image, fmt), content_type=CONTENT_TYPES[fmt], width=image.width, height=image.height)
        for image in result.images
    ]
    timings = dict(result.timings)
    timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - started
    return JobResult(request_id=job.request_id, images=images, has_nsfw_concepts=result.has_nsfw_concepts, timings=timings)


def run_group(inpainter: Inpainter, jobs: list[InpaintJob], progress: ProgressCallback | None) -> list[JobResult]:
    def on_step(request_index: int, done: int, total: int) -> None:
        if progress is not None:
            progress(jobs[request_index], done, total)

    results = inpainter.run([to_inputs(job) for job in jobs], on_step=on_step)
    return [encode_result(job, result) for job, result in zip(jobs, results)]


def run_jobs(inpainter: Inpainter, jobs: list[InpaintJob], progress: ProgressCallback | None = None) -> list[JobResult]:
    """One ``JobResult`` per job, in order. Never raises for a job's own failure."""
    results: dict[int, JobResult] = {}
    for group in group_by_size(list(enumerate(jobs))):
        members = [job for _, job in group]
        try:
            group_results = run_group(inpainter, members, progress)
        except Exception:
            log.exception("a group of %d request(s) failed; running each alone", len(members))
            group_results = [run_alone(inpainter, job, progress) for job in members] if len(members) > 1 else [failure(members[0])]
        results.update({position: result for (position, _), result in zip(group, group_results)})
    return [results[position] for position in range(len(jobs))]


def run_alone(inpainter: Inpainter, job: InpaintJob, progress: ProgressCallback | None) -> JobResult:
    try:
        return run_group(inpainter, [job], progress)[0]
    except Exception:
        log.exception("request %s failed inside the model", job.request_id)
        return failure(job)


def failure(job: InpaintJob) -> JobResult:
    return JobResult.failed(job.request_id, InferenceFailed("the model failed while running this request"))
