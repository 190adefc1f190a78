"""Worker side of a batch: jobs in, one result per job out, a failing job failing alone.

BentoML's adaptive batching hands the worker whatever requests arrived together. They are split
into groups that can share one denoising loop (same output size: the transformer's token count),
each group runs as one batched forward per step, and each job's images are encoded in its format.
If a group raises, its jobs are retried one by one, so only the job that fails gets an error.
Progress ("step i/N") and cancellation go through the ``JobBoard``: a job cancelled before its
group starts never runs; one cancelled while running leaves the batch at the next step. A job past
its deadline is stopped the same way, and answers 504 instead of "cancelled".
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path

from runners.errors import InferenceFailed, InpaintError, LoraLoadError, RequestCancelled, RequestTimedOut
from runners.lora.formats import LoraError
from runners.pipeline.inpaint import Inpainter, InpaintInputs, InpaintResult
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


def group_by_size(jobs: list[tuple[int, InpaintJob]]) -> list[list[tuple[int, InpaintJob]]]:
    """Jobs (with their positions) grouped by output size, the one thing a loop must share."""
    groups: dict[tuple[int, int], list[tuple[int, InpaintJob]]] = defaultdict(list)
    for position, job in jobs:
        groups[(job.width, job.height)].append((position, job))
    return list(groups.values())


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


def run_group(inpainter: Inpainter, jobs: list[InpaintJob], board: JobBoard, loras: list[list]) -> list[JobResult]:
    for job in jobs:
        board.start(job.request_id, f"started: {job.width}x{job.height}, batch of {len(jobs)}")

    def on_step(index: int, done: int, total: int) -> None:
        board.log(jobs[index].request_id, f"step {done}/{total}")

    results = inpainter.run(
        [to_inputs(job, request_loras) for job, request_loras in zip(jobs, loras)],
        on_step=on_step,
        is_cancelled=lambda index: should_stop(jobs[index], board),
    )
    return [encode_result(job, result, board) for job, result in zip(jobs, results)]


def run_jobs(inpainter: Inpainter, jobs: list[InpaintJob], board: JobBoard | None = None) -> list[JobResult]:
    """One ``JobResult`` per job, in order. Never raises for a job's own failure."""
    board = board or JobBoard()
    results: dict[int, JobResult] = {}
    loras: dict[int, list] = {}
    keep = {lora.sha256 for job in jobs for lora in job.loras}  # the batch's adapters stay loaded
    for position, job in enumerate(jobs):
        if should_stop(job, board):  # cancelled or out of time while waiting: never runs
            results[position] = stopped(job, board)
            continue
        try:
            loras[position] = job_loras(job, inpainter.model.adapters, keep)
        except InpaintError as exc:  # a LoRA that fails to load fails its request only
            log.info("request %s: %s", job.request_id, exc.message)
            results[position] = JobResult.failed(job.request_id, exc)
    runnable = [(position, job) for position, job in enumerate(jobs) if position not in results]
    for group in group_by_size(runnable):
        members = [job for _, job in group]
        group_loras = [loras[position] for position, _ in group]
        try:
            group_results = run_group(inpainter, members, board, group_loras)
        except Exception:
            log.exception("a group of %d request(s) failed; running each alone", len(members))
            group_results = (
                [run_alone(inpainter, job, board, request_loras) for job, request_loras in zip(members, group_loras)]
                if len(members) > 1
                else [failure(members[0], board)]
            )
        results.update({position: result for (position, _), result in zip(group, group_results)})
    return [results[position] for position in range(len(jobs))]


def run_alone(inpainter: Inpainter, job: InpaintJob, board: JobBoard, loras: list) -> JobResult:
    try:
        return run_group(inpainter, [job], board, [loras])[0]
    except Exception:
        log.exception("request %s failed inside the model", job.request_id)
        return failure(job, board)


def failure(job: InpaintJob, board: JobBoard) -> JobResult:
    board.finish(job.request_id)
    return JobResult.failed(job.request_id, InferenceFailed("the model failed while running this request"))


def load_inpainter(settings) -> Inpainter:
    """The model as both model tiers (the BentoML worker, the Triton server) serve it: loaded,
    on its backend, and warmed up by one small inference so the first request pays no warm-up."""
    from PIL import Image

    from runners.fetch import SafeFetcher
    from runners.pipeline.model import attach_backend, load_model
    from runners.protocol.images import encode_lossless
    from runners.protocol.schema import InpaintRequest

    model = load_model(settings.model, settings.lora, fetcher=SafeFetcher.for_settings(settings))
    attach_backend(model, settings)
    inpainter = Inpainter(model, settings.acceleration)
    if settings.model.warmup:
        started = time.perf_counter()
        job = InpaintJob(
            request_id="warm-up",
            request=InpaintRequest(prompt="warm-up", image_url="-", mask_url="-", num_inference_steps=2),
            width=256,
            height=256,
            seed=0,
            image_png=encode_lossless(Image.new("RGB", (256, 256), (127, 127, 127))),
            mask_png=encode_lossless(Image.new("L", (256, 256), 255)),
        )
        if (result := run_jobs(inpainter, [job])[0]).error is not None:
            raise RuntimeError(f"warm-up inference failed: {result.error.detail}")
        log.info("warm-up inference done in %.2f s", time.perf_counter() - started)
    return inpainter
