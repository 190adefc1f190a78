"""The model worker's Prometheus series (``flux_lora_cache`` is shared: runners/metrics.py)."""

from __future__ import annotations

import bentoml

from runners.metrics import LORA_CACHE  # noqa: F401 (re-exported: both tiers count into it)

BATCH_SIZE = bentoml.metrics.Histogram(
    name="flux_batch_size",
    documentation="Requests handed to the model worker in one adaptive batch",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
)
DENOISE_SECONDS = bentoml.metrics.Histogram(
    name="flux_denoise_seconds",
    documentation="Seconds spent in the denoising loop per batch (adaptive) or per request (continuous)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
)
STEP_SECONDS = bentoml.metrics.Histogram(
    name="flux_step_seconds",
    documentation="Seconds per denoising step (one transformer forward over its samples and the update)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8),
)
LORA_LOAD_SECONDS = bentoml.metrics.Counter(
    name="flux_lora_load_seconds", documentation="Seconds spent reading and checking LoRA files into adapters"
)
SAMPLES_PER_FORWARD = bentoml.metrics.Histogram(
    name="flux_samples_per_forward",
    documentation="Images denoised together in one transformer forward (both batching modes)",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
)
ADMISSION_WAIT_SECONDS = bentoml.metrics.Histogram(
    name="flux_admission_wait_seconds",
    documentation="Continuous batching: seconds a request waited in the worker before joining the running loop",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
)
LORA_ACTIVATION_SECONDS = bentoml.metrics.Histogram(
    name="flux_lora_activation_seconds",
    documentation="Continuous batching: seconds spent putting the running requests' LoRAs on the transformer "
    "when the set of running requests changes (the stepping thread waits for it)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2),
)
# "livemax": one series per component however many worker processes there are (each loads the same
# model, so the largest is every worker's); a stopped worker's value goes with it.
MODEL_BYTES = bentoml.metrics.Gauge(
    name="flux_model_bytes",
    documentation="Bytes of each model component's weights as loaded (quantized ones count their data, scales "
    "and zero points): transformer, text_encoder (CLIP), text_encoder_2 (T5-XXL), vae, safety_checker",
    labelnames=["component"],
    multiprocess_mode="livemax",
)
COMPILES = bentoml.metrics.Counter(
    name="flux_compiles",
    documentation=(
        "Graphs torch.compile built in the model worker (dynamo's own count, recompiles included). "
        "It grows during the start-up warm-up only: a rise while serving is a recompile inside a live request"
    ),
)
