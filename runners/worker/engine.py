"""The step engine (``FLUX_BATCHING=continuous``): requests join the running denoising batch at the
next step boundary and leave it the moment their own last step is decoded.

One thread owns the model and loops; every pass is one step boundary:

 1. requests cancelled or past their deadline leave (running or still waiting), answered at once;
 2. waiting requests are admitted, oldest first, while their size's forward stays within the
    budget (``FLUX_BATCH_FORWARD_MAX_SAMPLES`` images, ``FLUX_BATCH_FORWARD_MAX_TOKENS`` image
    tokens); admission loads the request's LoRAs and runs ``Inpainter.prepare`` for it alone, so
    its noise, latents and schedule are exactly what it would get running by itself;
 3. one size group takes a step: the one stepped least recently, so sizes interleave step by step
    and none starves another (docs/batching.md says why not padding); its samples, whatever their
    step counts, strengths, guidance, LoRAs and ``acceleration``, share one transformer forward
    (``Inpainter.step``);
 4. each request of that group whose samples are all done is decoded, encoded and answered.

A step that raises is retried request by request, so only the request that fails gets an error
and the others go on (and the loop itself survives anything). Per-request LoRAs are applied for the
set of running requests (fused when they all share one set, else per-sample deltas, as
``Inpainter.loras_applied`` decides) and re-applied only when that set changes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from runners.config import BatchingSettings
from runners.errors import InpaintError
from runners.pipeline.inpaint import Inpainter, InpaintInputs, InpaintResult, Sample
from runners.protocol.jobs import InpaintJob, JobResult
from runners.worker.board import JobBoard
from runners.worker.job_io import encode_result, failure, job_loras, should_stop, stopped, to_inputs
from runners.worker.metrics import ADMISSION_WAIT_SECONDS

log = logging.getLogger(__name__)

Size = tuple[int, int]  # (width, height): what the samples of one forward share


@dataclass
class Waiting:
    job: InpaintJob
    future: Future
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class Running:
    job: InpaintJob
    inputs: InpaintInputs
    samples: list[Sample]
    future: Future
    started: float  # perf_counter at admission
    prepared: float  # perf_counter when its samples were ready

    @property
    def done(self) -> bool:
        return all(s.done for s in self.samples)


def image_tokens(job: InpaintJob) -> int:
    """Image tokens one of the job's images puts in a forward (FLUX: one per 16x16 pixels)."""
    return (job.width // 16) * (job.height // 16)


class StepEngine:
    def __init__(self, inpainter: Inpainter, board: JobBoard, settings: BatchingSettings) -> None:
        self.inpainter, self.board = inpainter, board
        self.max_samples, self.max_tokens = settings.forward_max_samples, settings.forward_max_tokens
        self._wake = threading.Condition()
        self._waiting: deque[Waiting] = deque()
        self._groups: dict[Size, list[Running]] = {}
        self._last_stepped: dict[Size, float] = {}
        self._loras = contextlib.ExitStack()
        self._lora_members: list[str] | None = []  # request ids the applied LoRAs are for
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="step-engine", daemon=True)
        self._thread.start()

    def submit(self, job: InpaintJob) -> Future:
        """Queue a job for admission at the next step boundary; the future gets its ``JobResult``."""
        future: Future = Future()
        with self._wake:
            self._waiting.append(Waiting(job, future))
            self._wake.notify()
        return future

    @property
    def running(self) -> int:
        return sum(len(group) for group in self._groups.values())

    def stop(self, timeout_s: float = 30.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._waiting and not self._groups and not self._stopping:
                        self._wake.wait()
                    if self._stopping:
                        break
                try:
                    self._boundary()
                except Exception:  # a bug of ours, not a request's: answer everyone, keep serving
                    log.exception("step engine: unexpected failure; failing the requests it held")
                    self._fail_everything()
        self._fail_everything()

    def _boundary(self) -> None:
        self._leave_if_stopped()
        self._admit()
        if not self._groups:
            return
        size = min(self._groups, key=lambda s: self._last_stepped.get(s, float("-inf")))
        self._last_stepped[size] = time.perf_counter()
        self._step(size)
        self._finish(size)

    # 1. cancel and deadline, checked at every boundary for every request the engine holds
    def _leave_if_stopped(self) -> None:
        with self._wake:
            waiting = [w for w in self._waiting if should_stop(w.job, self.board)]
            for w in waiting:
                self._waiting.remove(w)
        for w in waiting:
            w.future.set_result(stopped(w.job, self.board))
        for size in list(self._groups):
            for r in [r for r in self._groups[size] if should_stop(r.job, self.board)]:
                self._leave(size, r, stopped(r.job, self.board))

    # 2. admission within the forward budget, oldest first; one size that does not fit does not
    # hold back another size
    def _admit(self) -> None:
        with self._wake:
            candidates = list(self._waiting)
        full: set[Size] = set()
        for w in candidates:
            size = (w.job.width, w.job.height)
            if size in full or not self._fits(size, w.job):
                full.add(size)  # later jobs of this size wait behind it (FIFO within a size)
                continue
            with self._wake:
                self._waiting.remove(w)
            self._start(size, w)

    def _fits(self, size: Size, job: InpaintJob) -> bool:
        group = self._groups.get(size)
        if not group:
            return True  # an idle size always runs, even one request over the budget
        samples = sum(len(r.samples) for r in group) + job.request.num_images
        return samples <= self.max_samples and samples * image_tokens(job) <= self.max_tokens

    def _start(self, size: Size, w: Waiting) -> None:
        job = w.job
        ADMISSION_WAIT_SECONDS.observe(time.perf_counter() - w.submitted)
        keep = {lora.sha256 for r in self._all_running() for lora in r.job.loras}
        keep |= {lora.sha256 for lora in job.loras}
        try:
            inputs = to_inputs(job, job_loras(job, self.inpainter.model.adapters, keep))
        except InpaintError as exc:  # a LoRA that fails to load fails its request only
            log.info("request %s: %s", job.request_id, exc.message)
            w.future.set_result(JobResult.failed(job.request_id, exc))
            return
        started = time.perf_counter()
        group = self._groups.get(size, [])
        self.board.start(job.request_id, f"started: {job.width}x{job.height}, batch of {len(group) + 1}")
        try:
            samples = self.inpainter.prepare([inputs], job.width, job.height)
        except Exception:
            log.exception("request %s failed inside the model (preparing)", job.request_id)
            w.future.set_result(failure(job, self.board))
            return
        self._groups.setdefault(size, []).append(
            Running(job, inputs, samples, w.future, started=started, prepared=time.perf_counter())
        )

    # 3. one step of one size group
    def _step(self, size: Size) -> None:
        self._apply_loras()
        group = self._groups.get(size)
        if not group:  # its LoRAs could not be applied: the request that broke them has left
            return
        width, height = size
        try:
            self.inpainter.step([s for r in group for s in r.samples], width, height)
        except Exception:
            if len(group) == 1:
                log.exception("request %s failed inside the model", group[0].job.request_id)
                self._leave(size, group[0], failure(group[0].job, self.board))
                return
            log.exception("a step of %d requests failed; stepping each alone", len(group))
            for r in list(group):
                try:
                    self.inpainter.step(r.samples, width, height)
                except Exception:
                    log.exception("request %s failed inside the model", r.job.request_id)
                    self._leave(size, r, failure(r.job, self.board))
        for r in self._groups.get(size, []):
            first = r.samples[0]
            self.board.log(r.job.request_id, f"step {first.step}/{len(first.timesteps)}")

    def _apply_loras(self) -> None:
        """The running requests' LoRAs on the transformer, their rows numbered in running order.
        If applying them fails, the newest request (the one that changed the set) fails alone."""
        while True:
            running = self._all_running()
            members = [r.job.request_id for r in running]
            if members == self._lora_members:
                return
            self._loras.close()
            self._lora_members = None
            for row, r in enumerate(running):
                for s in r.samples:
                    s.row = row
            try:
                self._loras.enter_context(self.inpainter.loras_applied([r.inputs.loras for r in running]))
                self._lora_members = members
                return
            except Exception:
                newest = max(running, key=lambda r: r.started)
                log.exception("request %s: its LoRAs could not join the running batch", newest.job.request_id)
                self._leave((newest.job.width, newest.job.height), newest, failure(newest.job, self.board))

    # 4. decode and answer whoever finished
    def _finish(self, size: Size) -> None:
        width, height = size
        for r in [r for r in self._groups.get(size, []) if r.done]:
            denoised = time.perf_counter()
            try:
                images, flags = self.inpainter.decode(
                    r.samples, width, height, [r.inputs.enable_safety_checker] * len(r.samples)
                )
                timings = {
                    "preprocess": r.prepared - r.started,
                    "inference": denoised - r.prepared,
                    "decode": time.perf_counter() - denoised,
                }
                skipped = sum(s.first_block_cache.skipped for s in r.samples if s.first_block_cache is not None)
                result = InpaintResult(images, flags, timings, steps_skipped=skipped)
                answer = encode_result(r.job, result, self.board)
            except Exception:
                log.exception("request %s failed inside the model (decoding)", r.job.request_id)
                answer = failure(r.job, self.board)
            self._leave(size, r, answer)

    def _leave(self, size: Size, r: Running, answer: JobResult) -> None:
        group = self._groups[size]
        group.remove(r)
        if not group:
            del self._groups[size]
            self._last_stepped.pop(size, None)
        if not self._groups:  # idle: the base weights as loaded, whatever runs on the model next
            self._loras.close()
            self._lora_members = []
        r.future.set_result(answer)

    def _all_running(self) -> list[Running]:
        return [r for group in self._groups.values() for r in group]

    def _fail_everything(self) -> None:
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        for w in waiting:
            w.future.set_result(failure(w.job, self.board))
        for size in list(self._groups):
            for r in list(self._groups[size]):
                self._leave(size, r, failure(r.job, self.board))
