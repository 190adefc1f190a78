"""The front's Prometheus series (served on ``/metrics`` by BentoML, summed across processes)."""

from __future__ import annotations

import bentoml

from runners.metrics import LORA_CACHE  # noqa: F401 (re-exported: both tiers count into it)

REQUESTS = bentoml.metrics.Counter(
    name="flux_requests",
    documentation="Inpainting requests by outcome (success or error_type)",
    labelnames=["outcome"],
)
# Gauges under BentoML's multiprocess Prometheus: "livesum" adds up the live processes (only the front
# sets them) into one unlabelled series per pod, which is what an autoscaler averages.
# With the queue in Redis every replica sees the fleet's one line: each reports its share (the depth
# over the live replicas), so that summing over pods gives the depth and averaging the depth per pod.
QUEUE_DEPTH = bentoml.metrics.Gauge(
    name="flux_queue_depth",
    documentation="Requests accepted and waiting for a model (not yet in flight): this replica's share of the line",
    multiprocess_mode="livesum",
)
FLEET_QUEUE_DEPTH = bentoml.metrics.Gauge(
    name="flux_fleet_queue_depth",
    documentation="Requests waiting in the whole line (every replica reports the same value: take the max)",
    multiprocess_mode="livemax",
)
OLDEST_WAIT = bentoml.metrics.Gauge(
    name="flux_queue_oldest_wait_seconds",
    documentation="How long the request at the head of the line has waited (fleet-wide on Redis)",
    multiprocess_mode="livemax",
)
RERUNS = bentoml.metrics.Counter(
    name="flux_queue_reruns",
    documentation="Requests queued again because the replica running them stopped renewing its lease",
)
REPORTS_TAKEN_OVER = bentoml.metrics.Counter(
    name="flux_queue_reports_taken_over",
    documentation="Finished requests whose report (webhook) a replica took over, the one finishing them having stopped",
)
REDIS_ERRORS = bentoml.metrics.Counter(
    name="flux_queue_redis_errors",
    documentation="Redis calls of the queue that failed (unreachable, timed out, out of memory, read-only, script errors), by operation",
    labelnames=["operation"],
)
QUEUE_LOOP_ERRORS = bentoml.metrics.Counter(
    name="flux_queue_loop_errors",
    documentation="Exceptions in the queue's background loops (feeders, progress, deadlines, heartbeat, listener), "
    "each retried with backoff, by loop",
    labelnames=["loop"],
)
IN_FLIGHT = bentoml.metrics.Gauge(
    name="flux_in_flight", documentation="Requests handed to the model and not finished", multiprocess_mode="livesum"
)
REJECTIONS = bentoml.metrics.Counter(
    name="flux_rejections",
    documentation="Requests refused or stopped before an answer, by reason (queue_full, draining, timeout, ...)",
    labelnames=["reason"],
)
STAGE_SECONDS = bentoml.metrics.Histogram(
    name="flux_stage_seconds",
    documentation="Seconds per request in each stage: preprocess, inference, decode, total",
    labelnames=["stage"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
)
LORA_DOWNLOADS = bentoml.metrics.Counter(name="flux_lora_downloads", documentation="LoRA files downloaded")
LORA_DOWNLOAD_BYTES = bentoml.metrics.Counter(
    name="flux_lora_download_bytes", documentation="Bytes of LoRA files downloaded"
)


def reject(reason: str) -> None:
    """A request refused before it reached the queue (auth, size, overload, draining)."""
    REJECTIONS.labels(reason=reason).inc()
    REQUESTS.labels(outcome=reason).inc()
