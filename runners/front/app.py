"""The HTTP front's state, built from the settings: the fetcher, the output store, LoRA sources, the
queue and the executor over the configured model tier. service.py creates one per front process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp
import anyio.to_thread

from runners.config import TINY_WARNING, Settings
from runners.fetch import SafeFetcher
from runners.front.executor import BentoWorkerClient, Executor, ModelClient
from runners.front.metrics import FLEET_QUEUE_DEPTH, IN_FLIGHT, OLDEST_WAIT, QUEUE_DEPTH, REQUESTS
from runners.front.queue import Record, RequestQueue, make_queue
from runners.front.store import make_store
from runners.front.webhooks import deliver, webhook_body
from runners.lifecycle import drain_on_sigterm
from runners.lora.sources import LoraSources

log = logging.getLogger(__name__)
STORE_SWEEP_EVERY_S = 60.0
WORKER_DRAINED_TIMEOUT_S = 10.0
# At the end of the drain, how long a worker never seen ready has to answer a readiness check (ready
# or not) before the front stops waiting on it: a worker that is gone never answers (below).
WORKER_ANSWER_S = 2.0


class WorkerReadiness:
    """The model worker's readiness as BentoML's /readyz of the front asks it (``is_ready`` of the
    worker's ``depends`` proxy, on every probe), kept: whether the worker was ever seen ready.

    Also BentoML's check made to answer False when the worker does not answer. BentoML 1.4.39
    catches only aiohttp's read timeout there, and a worker that is gone (its model could not load)
    gives another: its socket still listens in BentoML's arbiter, nobody accepts, and the total
    timeout raises ``asyncio.TimeoutError`` out of /readyz. BentoML's ``TimeoutMiddleware`` then
    holds that probe open for the whole traffic timeout (it waits for a response that never comes),
    uvicorn's shutdown waits for the probe, and the server did not exit (lifecycle's watchdog did)."""

    def __init__(self, worker) -> None:
        self.seen_ready = False
        self._ask = worker.is_ready
        worker.is_ready = self.is_ready  # the proxy is one object per front: BentoML's /readyz calls this

    async def is_ready(self, timeout: float | None = None) -> bool:
        return bool(await self._answer(timeout))

    async def answers(self, timeout_s: float) -> bool:
        """Whether the worker answers a readiness check at all (ready or not) within ``timeout_s``."""
        return await self._answer(timeout_s) is not None

    async def _answer(self, timeout: float | None) -> bool | None:
        """The worker's readiness, or None when it does not answer."""
        try:
            ready = await self._ask(timeout)
        except (asyncio.TimeoutError, OSError, aiohttp.ClientError) as exc:
            log.warning("model worker did not answer its readiness check: %s", type(exc).__name__)
            return None
        self.seen_ready |= ready
        return ready


def model_client(settings: Settings, worker) -> ModelClient:
    """The configured model tier (FLUX_EXECUTOR): the BentoML worker, or a Triton server."""
    if settings.executor.executor == "triton":
        from runners.front.triton_client import TritonClient

        log.info("model tier: Triton at %s (model %s)", settings.executor.triton_url, settings.executor.triton_model)
        return TritonClient(settings.executor)
    return BentoWorkerClient(worker, continuous=settings.batching.mode == "continuous")


class Front:
    def __init__(self, settings: Settings, client: ModelClient) -> None:
        self.settings = settings
        if settings.model.is_tiny:
            log.warning(TINY_WARNING)
        if not settings.server.api_keys:
            log.warning("FLUX_API_KEYS is not set: the API is open to anyone who can reach it")
        self.client = client
        in_process = isinstance(client, BentoWorkerClient) and client.worker is not None
        self.worker_readiness = WorkerReadiness(client.worker) if in_process else None
        self.fetcher = SafeFetcher.for_settings(settings)
        self.store = make_store(settings.store, settings.model.cache_dir)
        self.last_sweep = time.monotonic()
        sources = (
            LoraSources(settings.lora, self.fetcher, settings.model.cache_dir)
            if settings.lora.max_per_request
            else None
        )
        executor = Executor(client, settings, self.fetcher, self.store, sources, settings.model.label)
        concurrency = settings.queue.concurrency or 2 * settings.batching.max_size
        self.queue = make_queue(
            settings.queue,
            concurrency,
            executor,
            on_finish=self._finished,
            request_timeout_s=settings.server.request_timeout_s,
            on_change=self._gauge,
        )
        self._gauge(self.queue)  # the gauges exist (at 0) from the first scrape on
        if not drain_on_sigterm(self._drain, "front"):
            log.warning("SIGTERM cannot be handled in this process: stopping will not drain the queue")

    async def ready(self) -> bool:
        # The first readiness probe starts the feeders (on Redis they pull the fleet's work before any
        # request reaches this replica). Not in __init__: started there, the in-memory queue's
        # concurrent requests stop sharing batches (tests/test_fal_api.py's batching test).
        self.queue.ensure_started()
        if self.queue.draining:  # readiness goes false on SIGTERM, so traffic moves elsewhere
            return False
        return await self.client.ready()

    async def _drain(self) -> None:
        await self.queue.drain(self.settings.server.drain_timeout_s)
        if (readiness := self.worker_readiness) is not None and not readiness.seen_ready:
            # Never seen ready: a worker still loading or not yet probed answers at once, one that
            # is gone (it exits when its model cannot load) never does, and waiting on it for
            # WORKER_DRAINED_TIMEOUT_S only held up the exit of a pod that could not start.
            if not await readiness.answers(WORKER_ANSWER_S):
                log.info("front: the model worker does not answer; not waiting for it")
                return
        with contextlib.suppress(Exception):  # the worker served the drain; now it may go too
            # Bounded: a worker that stops answering never would, and BentoML's client keeps trying
            # it, which would hold the whole server up.
            await asyncio.wait_for(self.client.drained(), WORKER_DRAINED_TIMEOUT_S)

    @staticmethod
    def _gauge(queue: RequestQueue) -> None:
        # Each replica reports its share of the line, so the series summed over pods is the depth
        # and its average (what an HPA's Pods metric takes) the depth per replica, on Redis as in memory.
        QUEUE_DEPTH.set(queue.waiting / max(1, queue.replicas))
        FLEET_QUEUE_DEPTH.set(queue.waiting)
        OLDEST_WAIT.set(queue.oldest_wait_s)
        IN_FLIGHT.set(queue.in_flight)

    async def _finished(self, record: Record) -> None:
        REQUESTS.labels(outcome="success" if record.error is None else record.error.error_type).inc()
        if record.webhook_url:
            error = record.error.to_body() if record.error is not None else None
            output = record.outcome.output if record.outcome is not None else None
            await deliver(
                self.fetcher, record.webhook_url, webhook_body(record.id, output, error), self.settings.webhook
            )
        if self.settings.store.sweep and time.monotonic() - self.last_sweep > STORE_SWEEP_EVERY_S:
            self.last_sweep = time.monotonic()  # expired outputs free their space
            try:
                await anyio.to_thread.run_sync(self.store.sweep)
            except Exception:  # a disk or bucket error; the request itself is done
                log.exception("could not sweep expired outputs")

    async def stop(self) -> None:
        await self.queue.stop()
        await self.client.close()
