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
from collections import defaultdict

from runners.errors import InpaintError
from runners.pipeline.inpaint import Inpainter
from runners.protocol.jobs import InpaintJob, JobResult
from runners.worker.board import JobBoard
from runners.worker.job_io import encode_result, failure, job_loras, should_stop, stopped, to_inputs

log = logging.getLogger(__name__)


def group_by_size(jobs: list[tuple[int, InpaintJob]]) -> list[list[tuple[int, InpaintJob]]]:
    """Jobs (with their positions) grouped by output size, the one thing a loop must share."""
    groups: dict[tuple[int, int], list[tuple[int, InpaintJob]]] = defaultdict(list)
    for position, job in jobs:
        groups[(job.width, job.height)].append((position, job))
    return list(groups.values())


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
