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
QUEUE_DEPTH = bentoml.metrics.Gauge(
    name="flux_queue_depth",
    documentation="Requests accepted and waiting for the model (not yet in flight)",
    multiprocess_mode="livesum",
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
