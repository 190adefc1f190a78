"""The step engine (``FLUX_BATCHING=continuous``): requests join the running denoising batch at the
next step boundary and leave it the moment their own last step is decoded.

One thread owns the transformer and loops; every pass is one step boundary:

 1. requests cancelled or past their deadline leave (running or still waiting), answered at once;
 2. waiting requests are admitted, oldest first, while their size's forward stays within the
    budget (``FLUX_BATCH_FORWARD_MAX_SAMPLES`` images, ``FLUX_BATCH_FORWARD_MAX_TOKENS`` image
    tokens, counting requests still being prepared); admission hands the request to the side
    thread, which loads its LoRAs and runs ``Inpainter.prepare`` for it alone, so its noise,
    latents and schedule are exactly what it would get running by itself;
 3. requests whose preparation has finished join their size's group;
 4. one size group takes a step: the one stepped least recently, so sizes interleave step by step
    and none starves another (docs/batching.md says why not padding); its samples, whatever their
    step counts, strengths, guidance, LoRAs and ``acceleration``, share one transformer forward
    (``Inpainter.step``);
 5. each request of that group whose samples are all done leaves it, and the side thread decodes,
    encodes and answers it.

So the stepping thread runs steps and nothing else that can be slow: a newcomer's LoRA download
and load, its text encoding and VAE encode, and a finished request's VAE decode, safety check and
image encoding all run on the side thread meanwhile (tests/test_engine.py measures the gap between
steps while they happen). Both threads queue their kernels on the same CUDA stream, so GPU work
stays ordered without events; what overlaps is host work, and the stepping thread never waits for
the side thread's reads of the device.

A step that raises is retried request by request, so only the request that fails gets an error
and the others go on (and the loop itself survives anything). Per-request LoRAs are applied for the
set of running requests (per-sample deltas, or fused in float32 when they all share one set, as
``Inpainter.loras_applied`` decides) and re-applied only when that set changes, which is timed
(``flux_lora_activation_seconds``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from runners.config import BatchingSettings
from runners.errors import InpaintError, ServerDraining
from runners.pipeline.inpaint import Inpainter, InpaintInputs, InpaintResult, Sample
from runners.protocol.jobs import InpaintJob, JobResult
from runners.worker.board import JobBoard
from runners.worker.job_io import encode_result, failure, job_loras, should_stop, stopped, to_inputs
from runners.worker.metrics import ADMISSION_WAIT_SECONDS, LORA_ACTIVATION_SECONDS

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


@dataclass
class Preparing:
    """Admitted, and being prepared on the side thread: ``task`` gives its ``Running``, or the
    ``JobResult`` that answers it when its LoRAs or its preparation failed."""

    waiting: Waiting
    size: Size
    task: Future


def image_tokens(job: InpaintJob) -> int:
    """Image tokens one of the job's images puts in a forward (FLUX: one per 16x16 pixels)."""
    return (job.width // 16) * (job.height // 16)


class StepEngine:
    def __init__(self, inpainter: Inpainter, board: JobBoard, settings: BatchingSettings) -> None:
        self.inpainter, self.board = inpainter, board
        self.max_samples, self.max_tokens = settings.forward_max_samples, settings.forward_max_tokens
        self._wake = threading.Condition()
        self._kicked = False  # something happened since the loop last looked (under _wake)
        self._waiting: deque[Waiting] = deque()
        self._preparing: list[Preparing] = []
        self._groups: dict[Size, list[Running]] = {}
        self._last_stepped: dict[Size, float] = {}
        self._loras = contextlib.ExitStack()
        self._lora_members: list[str] | None = []  # request ids the applied LoRAs are for
        self._stopping = False
        self._side = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step-engine-side")
        self._thread = threading.Thread(target=self._loop, name="step-engine", daemon=True)
        self._thread.start()

    def submit(self, job: InpaintJob) -> Future:
        """Queue a job for admission at the next step boundary; the future gets its ``JobResult``."""
        future: Future = Future()
        with self._wake:
            self._waiting.append(Waiting(job, future))
        self._kick()
        return future

    @property
    def running(self) -> int:
        return sum(len(group) for group in self._groups.values()) + len(self._preparing)

    def stop(self, timeout_s: float = 30.0) -> None:
        with self._wake:
            self._stopping = True
        self._kick()
        self._thread.join(timeout_s)

    def _kick(self, *_) -> None:
        with self._wake:
            self._kicked = True
            self._wake.notify()

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            busy = False
            while True:
                with self._wake:
                    if not busy and not self._kicked and not self._stopping:
                        # woken by a submit or by side work ending; the timeout lets deadlines of
                        # requests that wait behind a full budget be seen
                        self._wake.wait(timeout=1.0)
                    self._kicked = False
                    if self._stopping:
                        break
                try:
                    busy = self._boundary()
                except Exception:  # a bug of ours, not a request's: answer everyone, keep serving
                    log.exception("step engine: unexpected failure; failing the requests it held")
                    self._fail_everything(failure)
                    busy = False
        self._fail_everything(lambda job, board: JobResult.failed(job.request_id, ServerDraining()))
        self._side.shutdown(wait=True)

    def _boundary(self) -> bool:
        """One step boundary; False when there was nothing to do (the loop then sleeps)."""
        left = self._leave_if_stopped()
        admitted = self._admit()
        joined = self._join_prepared()
        if not self._groups:
            return left or admitted or joined
        size = min(self._groups, key=lambda s: self._last_stepped.get(s, float("-inf")))
        self._last_stepped[size] = time.perf_counter()
        self._step(size)
        self._finish(size)
        return True

    # 1. cancel and deadline, checked at every boundary for every request the engine holds
    def _leave_if_stopped(self) -> bool:
        with self._wake:
            waiting = [w for w in self._waiting if should_stop(w.job, self.board)]
            for w in waiting:
                self._waiting.remove(w)
        for w in waiting:
            w.future.set_result(stopped(w.job, self.board))
        left = bool(waiting)
        for size in list(self._groups):
            for r in [r for r in self._groups[size] if should_stop(r.job, self.board)]:
                self._leave(size, r, stopped(r.job, self.board))
                left = True
        return left

    # 2. admission within the forward budget, oldest first; one size that does not fit does not
    # hold back another size
    def _admit(self) -> bool:
        with self._wake:
            candidates = list(self._waiting)
        full: set[Size] = set()
        admitted = False
        for w in candidates:
            size = (w.job.width, w.job.height)
            if size in full or not self._fits(size, w.job):
                full.add(size)  # later jobs of this size wait behind it (FIFO within a size)
                continue
            with self._wake:
                self._waiting.remove(w)
            self._start(size, w)
            admitted = True
        return admitted

    def _fits(self, size: Size, job: InpaintJob) -> bool:
        running = [len(r.samples) for r in self._groups.get(size, [])]
        preparing = [p.waiting.job.request.num_images for p in self._preparing if p.size == size]
        if not running and not preparing:
            return True  # an idle size always runs, even one request over the budget
        samples = sum(running) + sum(preparing) + job.request.num_images
        return samples <= self.max_samples and samples * image_tokens(job) <= self.max_tokens

    def _start(self, size: Size, w: Waiting) -> None:
        job = w.job
        ADMISSION_WAIT_SECONDS.observe(time.perf_counter() - w.submitted)
        keep = {lora.sha256 for r in self._all_running() for lora in r.job.loras}
        keep |= {lora.sha256 for p in self._preparing for lora in p.waiting.job.loras}
        keep |= {lora.sha256 for lora in job.loras}
        batch = len(self._groups.get(size, [])) + sum(p.size == size for p in self._preparing) + 1
        self.board.start(job.request_id, f"started: {job.width}x{job.height}, batch of {batch}")
        task = self._side.submit(self._prepare, w, keep)
        self._preparing.append(Preparing(w, size, task))
        task.add_done_callback(self._kick)

    def _prepare(self, w: Waiting, keep: set[str]) -> Running | JobResult:
        """On the side thread: the request's LoRAs, loaded (or found in memory), and its samples."""
        import torch

        job, started = w.job, time.perf_counter()
        if self._stopping:
            return JobResult.failed(job.request_id, ServerDraining())
        with torch.inference_mode():
            try:
                inputs = to_inputs(job, job_loras(job, self.inpainter.model.adapters, keep))
            except InpaintError as exc:  # a LoRA that fails to load fails its request only
                log.info("request %s: %s", job.request_id, exc.message)
                return JobResult.failed(job.request_id, exc)
            try:
                samples = self.inpainter.prepare([inputs], job.width, job.height)
            except Exception:
                log.exception("request %s failed inside the model (preparing)", job.request_id)
                return failure(job, self.board)
        return Running(job, inputs, samples, w.future, started=started, prepared=time.perf_counter())

    # 3. prepared requests join their group
    def _join_prepared(self) -> bool:
        ready = [p for p in self._preparing if p.task.done()]
        for p in ready:
            self._preparing.remove(p)
            prepared = p.task.result()
            if isinstance(prepared, JobResult):
                p.waiting.future.set_result(prepared)
            else:
                self._groups.setdefault(p.size, []).append(prepared)
        return bool(ready)

    # 4. one step of one size group
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
            started = time.perf_counter()
            self._loras.close()
            self._lora_members = None
            for row, r in enumerate(running):
                for s in r.samples:
                    s.row = row
            try:
                self._loras.enter_context(self.inpainter.loras_applied([r.inputs.loras for r in running]))
                self._lora_members = members
                LORA_ACTIVATION_SECONDS.observe(time.perf_counter() - started)
                return
            except Exception:
                newest = max(running, key=lambda r: r.started)
                log.exception("request %s: its LoRAs could not join the running batch", newest.job.request_id)
                self._leave((newest.job.width, newest.job.height), newest, failure(newest.job, self.board))

    # 5. whoever finished leaves the group; the side thread decodes and answers them
    def _finish(self, size: Size) -> None:
        for r in [r for r in self._groups.get(size, []) if r.done]:
            self._leave(size, r, None)
            self._side.submit(self._answer, r, size)

    def _answer(self, r: Running, size: Size) -> None:
        """On the side thread: decode, check and encode a finished request, and answer it."""
        import torch

        width, height = size
        denoised = time.perf_counter()
        try:
            with torch.inference_mode():
                images, flags = self.inpainter.decode(
                    r.samples, width, height, [r.inputs.enable_safety_checker] * len(r.samples)
                )
            timings = {
                "preprocess": r.prepared - r.started,
                "inference": denoised - r.prepared,
                "decode": time.perf_counter() - denoised,
            }
            skipped = sum(s.first_block_cache.skipped for s in r.samples if s.first_block_cache is not None)
            answer = encode_result(r.job, InpaintResult(images, flags, timings, steps_skipped=skipped), self.board)
        except Exception:
            log.exception("request %s failed inside the model (decoding)", r.job.request_id)
            answer = failure(r.job, self.board)
        r.future.set_result(answer)

    def _leave(self, size: Size, r: Running, answer: JobResult | None) -> None:
        """``r`` leaves its group, answered with ``answer`` (None: the side thread answers it)."""
        group = self._groups[size]
        group.remove(r)
        if not group:
            del self._groups[size]
            self._last_stepped.pop(size, None)
        if not self._groups:  # idle: the base weights as loaded, whatever runs on the model next
            self._loras.close()
            self._lora_members = []
        if answer is not None:
            r.future.set_result(answer)

    def _all_running(self) -> list[Running]:
        return [r for group in self._groups.values() for r in group]

    def _fail_everything(self, answer) -> None:
        """Answer every request held, waiting, being prepared or running, with ``answer(job, board)``."""
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        for w in waiting:
            w.future.set_result(answer(w.job, self.board))
        for p in self._preparing:
            self.board.finish(p.waiting.job.request_id)
            p.waiting.future.set_result(answer(p.waiting.job, self.board))
        self._preparing.clear()
        for size in list(self._groups):
            for r in list(self._groups[size]):
                self.board.finish(r.job.request_id)
                self._leave(size, r, answer(r.job, self.board))
