"""Typed configuration, one object per concern, read from ``FLUX_*`` environment variables.

Every field has a default and bounds, so a typo in a deployment fails at start-up with the
variable's name instead of surfacing as a strange error under load.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, FilePath, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

TINY_MODEL = "tiny"
TINY_WARNING = (
    "SERVING THE TINY EMBEDDED MODEL WITH RANDOM WEIGHTS: outputs are noise, not images. "
    "Set FLUX_MODEL to a hub id (black-forest-labs/FLUX.1-dev) or a diffusers folder to serve FLUX."
)
# How long past its deadline a running request may go unanswered before the queue fails it itself;
# the timeouts of the calls that carry a request must outlast the deadline by at least this much.
DEADLINE_GRACE_S = 30.0
# How long an idle feeder of the Redis queue blocks on its wake-up list per call (runners/front/
# redis_queue.py). FLUX_QUEUE_REDIS_TIMEOUT_S must leave room above it, or an idle, healthy fleet
# would read its own blocking pops as "Redis unreachable".
REDIS_BLOCKING_POP_S = 0.5
DEFAULT_SAFETY_CHECKER = "CompVis/stable-diffusion-safety-checker"


def _default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/flux-inpaint``, or ``~/.cache/flux-inpaint`` without ``XDG_CACHE_HOME``"""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flux-inpaint"


def _comma_separated(value):
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class SettingsGroup(BaseSettings):
    """The settings of one concern, read from the environment. The string literal under each field
    is its documentation (``use_attribute_docstrings``): pydantic keeps it as the field's
    description, and docs/configuration.md is generated from it (docs/write_configuration.py)."""

    model_config = SettingsConfigDict(extra="ignore", use_attribute_docstrings=True)


class ModelSettings(SettingsGroup):
    """Which model is served, and on what device and precision."""

    model_config = SettingsConfigDict(env_prefix="FLUX_", extra="ignore")

    model: str = Field(TINY_MODEL, min_length=1, max_length=4096)
    """A hub id (``black-forest-labs/FLUX.1-dev``), a diffusers-layout folder, ``tiny``: the
    embedded random-weight model of the true architecture (outputs are noise), ``random:flux-dev``:
    the full-size architecture with random weights, built on the device (for measuring speed), or
    ``random:flux-dev-2block``: FLUX.1-dev's widths with one block of each kind (about 1 GB in bf16,
    for proving the export and the backends at FLUX's widths on a CPU)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` takes CUDA when a GPU is visible, else the CPU."""

    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """``auto`` is bfloat16 on CUDA and float32 on the CPU (bf16 matmuls are ~40x slower there).
    float16 is refused: FLUX's transformer and T5-XXL overflow its range (their activations pass
    65504), which gives black or NaN images."""

    vae_batch_images: int = Field(1, ge=1, le=64)
    """Most images one VAE call encodes or decodes; a group goes through in chunks of this many.
    Bounds the VAE's activation memory (about 1.5 GB per 1024x1024 image in bf16: 16 at once would
    need about 25 GB). 1, the default, also keeps an image independent of its batch-mates: in bf16
    the VAE's convolutions round differently by batch size (measured on the CPU: up to 7 levels of
    255 between an image decoded alone and in a pair), while one image per call costs next to
    nothing at FLUX's sizes, where one image already fills a GPU."""

    safety_checker: str | None = Field(None, min_length=1, max_length=4096)
    """Hub id or folder of a ``StableDiffusionSafetyChecker``. Unset: the tiny model's own tiny
    checker for ``tiny``, a model folder's own ``safety_checker/`` when it has one, else
    ``CompVis/stable-diffusion-safety-checker``."""

    max_sequence_length: int = Field(512, ge=16, le=512)
    """T5 tokens per prompt. FLUX.1-dev was trained with 512; longer prompts are truncated."""

    cache_dir: Path = Field(default_factory=_default_cache_dir)
    """Where this server writes what it makes: the tiny model, exported artifacts (``engines/``), downloaded
    LoRAs (``loras/``) and stored outputs (``outputs/``), unless their own settings say otherwise."""

    warmup: bool = True
    """Run one inference before reporting ready, so the first user request pays no warm-up."""

    quantize: Literal["none", "fp8", "fp8-weight", "int8"] = "none"
    """The transformer's weights (docs/hardware.md). ``fp8``: torchao's float8 dynamic activation and
    weight quantization: about half the memory and the fastest matmuls, on GPUs of compute
    capability 8.9 and above (Ada, Hopper) only: refused elsewhere, the CPU included. ``fp8-weight``:
    float8 weights, multiplied in the compute dtype: half the memory on any device. ``int8``: torchao's
    int8 weight-only quantization, on any device. Quantized after ``FLUX_FUSED_LORAS`` are fused;
    per-request LoRAs run as deltas in the compute dtype beside the quantized layers, never fused
    into them. nf4 (bitsandbytes) is not offered: it needs a GPU to test and to run."""

    text_encoder_quantize: Literal["none", "fp8", "fp8-weight", "int8"] = "none"
    """T5-XXL's weights (9.5 GB in bf16), with the same choices as ``FLUX_QUANTIZE``. The CLIP text
    encoder (0.25 GB) and the VAE stay in the compute dtype."""

    offload: Literal["none", "model", "group"] = "none"
    """Keep weights in host memory and move them to the GPU when used (diffusers' offloading).
    ``model``: each whole component (text encoders, transformer, VAE) comes onto the GPU for its own
    turn: the peak is the largest component, at the cost of moving the transformer every request.
    ``group``: one layer at a time (diffusers' leaf-level group offloading), the next one's copy
    overlapping the current one's compute on a CUDA stream: the smallest peak, the slowest. LoRA adapters and their deltas stay on the GPU. Needs a
    GPU (on the CPU there is nowhere to offload from) and FLUX_BACKEND=torch or compile."""

    transformer_file: Path | None = None
    """One ``.safetensors`` file holding the transformer, instead of the model folder's
    ``transformer/``: Black Forest Labs' original layout (``flux1-dev.safetensors``), with or without
    ComfyUI's ``model.diffusion_model.`` prefix, float8 ComfyUI files (``flux1-dev-fp8``: weights
    stored in float8, scaled or not) included. The rest of the pipeline, and the transformer's
    config, come from ``FLUX_MODEL``. A file that is not safetensors, or does not match that
    config, stops the server with the reason."""

    memory_check: bool = True
    """Before loading, count the bytes the configuration needs (weights per component and precision,
    the LoRA adapter budget, the activations of ``FLUX_MEMORY_PLAN_IMAGES`` images at
    ``FLUX_MEMORY_PLAN_SIZE``) and refuse to start, with the numbers, when they exceed the device's
    memory. The expected peak is logged either way."""

    memory_limit_bytes: int | None = Field(None, ge=64 * 1024**2, le=64 * 1024**4)
    """The memory the check counts against. Unset: the GPU's total memory, or the host's on the CPU.
    Set it lower when the device is shared with another process."""

    memory_plan_size: str = Field("1024x1024", pattern=r"^[1-9][0-9]{1,4}x[1-9][0-9]{1,4}$")
    """``WIDTHxHEIGHT`` of the largest images the check plans activations for."""

    memory_plan_images: int = Field(1, ge=1, le=256)
    """Images denoised in one transformer forward that the check plans for (a batch of requests,
    or one request's ``num_images``)."""

    @field_validator("dtype", mode="before")
    @classmethod
    def _no_float16(cls, value):
        if value in ("float16", "fp16", "half"):
            raise ValueError(
                "float16 is not supported: FLUX.1's transformer and T5-XXL overflow float16's range "
                "(black or NaN images); use bfloat16 (the CUDA default) or float32"
            )
        return value

    @property
    def is_tiny(self) -> bool:
        return self.model == TINY_MODEL

    @property
    def random_architecture(self) -> str | None:
        """``random:flux-dev``: the full-size architecture with random weights, built on the device
        (runners/pipeline/random_model.py): for measuring on machines that cannot download FLUX.1-dev."""
        return self.model.removeprefix("random:") if self.model.startswith("random:") else None

    @property
    def label(self) -> str:
        """How logs and the ``x-flux-model`` header name what is served."""
        if self.is_tiny:
            return "tiny (random weights)"
        return f"{self.model} (random weights)" if self.random_architecture else self.model

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self, device: str):
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if device == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    def plan_size(self) -> tuple[int, int]:
        """FLUX_MEMORY_PLAN_SIZE as (width, height)."""
        width, _, height = self.memory_plan_size.partition("x")
        return int(width), int(height)

    def identity(self) -> str:
        """A short hash naming the served model (for logs and response headers)."""
        return hashlib.sha256(self.model.encode()).hexdigest()[:12]


class BackendSettings(SettingsGroup):
    """What runs the transformer and the VAE, and the exported artifacts it runs from."""

    model_config = SettingsConfigDict(env_prefix="FLUX_", extra="ignore")

    backend: Literal["auto", "torch", "compile", "onnxruntime", "tensorrt"] = "auto"
    """``auto``: ``compile`` on CUDA, ``torch`` on the CPU (there compiling costs about a minute per graph
    and gains nothing measurable: docs/compile.md). ``torch``: eager PyTorch. ``compile``: torch.compile
    of the transformer (FLUX_COMPILE_SCOPE), warmed at start for every shape the server can meet.
    ``onnxruntime`` and ``tensorrt``: the graphs ``python -m export`` wrote for this exact model and
    configuration."""
    compile_scope: Literal["blocks", "model"] = "blocks"
    """``blocks``: regional compilation, each of FLUX's repeated block classes compiled once (fullgraph)
    and shared by its 19 or 38 instances: seconds to compile, and the first-block cache of
    ``acceleration: "regular"`` keeps working. ``model``: the whole transformer as one graph (minutes on
    FLUX.1-dev; "regular" then runs as "none"), kept for the benchmark's comparison."""
    compile_vae: bool = False
    """Also compile the VAE's encoder and decoder. Off by default: whether it pays for its compile time
    is for a GPU measurement to settle (benchmarks/device/, docs/benchmarks.md)."""
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    """The torch.compile backend. ``aot_eager`` and ``eager`` trace and guard exactly as ``inductor``
    does but generate no kernels: for tests and for finding a recompile quickly, never for speed."""
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile's mode. ``max-autotune-no-cudagraphs`` benchmarks matmul and kernel choices while
    compiling (several times the compile time). CUDA graphs are not offered: the loop's shapes vary."""
    attention_backend: str | None = Field(None, min_length=1, max_length=64)
    """diffusers' attention dispatcher backend for the transformer (``native``, ``_native_cudnn``,
    ``_native_flash``, ``flash``, ``_flash_3``, ``sage``, ``xformers``, ...). Unset: diffusers' default
    (PyTorch's scaled_dot_product_attention, which picks its own kernel). A backend whose library is
    missing, or that needs CUDA on a server without it, is refused at start."""

    def resolved_backend(self, device: str) -> str:
        """``auto`` made concrete for ``device`` (``cuda`` or ``cpu``)."""
        if self.backend == "auto":
            return "compile" if device == "cuda" else "torch"
        return self.backend

    engine_dir: Path | None = None
    """Where exported artifacts live. Unset: ``<FLUX_CACHE_DIR>/engines``."""
    export_precision: Literal["fp32", "fp16", "bf16", "fp8"] = "bf16"
    """TensorRT engine precision (fp8 needs compute capability 8.9 or above). ONNX graphs are exported in
    fp32 (straight from the served weights, without a copy of the network), and ONNX Runtime runs them so.
    The engines' disk at this precision is counted and checked before the export writes anything
    (``python -m export --estimate``; FLUX.1-dev: docs/export.md)."""
    export_sizes: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["1024x1024", "512x512", "768x1024", "1024x768", "576x1024", "1024x576"], max_length=32
    )
    """Pixel sizes ``WIDTHxHEIGHT`` (multiples of 16, from 16 to 14142) the TensorRT optimisation profiles
    cover: fal's presets by default."""
    export_batch_sizes: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [1, 4], min_length=1, max_length=16
    )
    """Batch sizes (each from 1 to 64) the TensorRT profiles cover: their range is min..max."""

    @field_validator("export_sizes", mode="before")
    @classmethod
    def _sizes(cls, value):
        sizes = _comma_separated(value)
        for size in sizes:
            width, _, height = size.partition("x")
            if not (
                width.isdigit()
                and height.isdigit()
                and int(width) % 16 == 0
                and int(height) % 16 == 0
                and 16 <= int(width) <= 14142
                and 16 <= int(height) <= 14142
            ):
                raise ValueError(f"{size!r}: sizes are WIDTHxHEIGHT, multiples of 16 between 16 and 14142")
        return sizes

    @field_validator("export_batch_sizes", mode="before")
    @classmethod
    def _batches(cls, value):
        sizes = [int(v) for v in _comma_separated(value)] if isinstance(value, str) else value
        if any(not 1 <= size <= 64 for size in sizes):
            raise ValueError("batch sizes are between 1 and 64")
        return sizes

    def pixel_sizes(self) -> list[tuple[int, int]]:
        """(height, width) pairs."""
        return [(int(s.split("x")[1]), int(s.split("x")[0])) for s in self.export_sizes]


class BatchingSettings(SettingsGroup):
    """How the worker batches requests: BentoML adaptive batching of whole requests, or the step
    engine, where requests join and leave the running denoising batch at step boundaries."""

    # populate_by_name: ``mode`` is read from FLUX_BATCHING but can still be given by name in code.
    model_config = SettingsConfigDict(env_prefix="FLUX_BATCH_", extra="ignore", populate_by_name=True)

    mode: Literal["continuous", "adaptive"] = Field("adaptive", validation_alias="FLUX_BATCHING")
    """``FLUX_BATCHING``. ``continuous``: the step engine (runners/worker/engine.py) admits a request
    into the running denoising loop at the next step boundary and answers it as soon as its own last
    step is decoded. ``adaptive``: BentoML's dispatcher hands the worker batches of whole requests,
    and a batch runs until its slowest request ends (nothing joins it). The default by measurement on
    the CPU (docs/batching.md): continuous halves median latency and time to first step, but at 80%
    load its p95 was 3.7x adaptive's, as long requests share every step with the newcomers."""

    forward_max_samples: int = Field(8, ge=1, le=256)
    """Continuous mode: most images one transformer forward denoises; requests beyond it wait for
    admission (a request with more images than this runs alone)."""

    forward_max_tokens: int = Field(32_768, ge=16, le=1_048_576)
    """Continuous mode: most image tokens (images x (width/16) x (height/16)) in one forward: bounds
    its activation memory (1024x1024 is 4096 tokens an image)."""

    max_size: int = Field(4, ge=2, le=64)
    """Adaptive mode: most requests the dispatcher hands the worker at once. BentoML's batchable APIs take 2 or
    more; to run one request at a time, set ``FLUX_QUEUE_CONCURRENCY=1`` instead."""

    max_latency_ms: int = Field(600_000, ge=1_000, le=3_600_000)
    """Adaptive mode: BentoML's latency goal: a request whose wait plus estimated run time passes this is
    answered 503. Image generation takes seconds per request, so this is minutes, not ms."""

    timeout_s: float = Field(900.0, ge=10.0, le=7200.0)
    """Timeout of one call from the front to the BentoML worker. Must be at least ``FLUX_REQUEST_TIMEOUT_S``
    plus the 30 s grace the queue gives a running request (checked at start)."""


class ImageLimits(SettingsGroup):
    """Bounds on images a request may send or ask for (docs/security.md)."""

    model_config = SettingsConfigDict(env_prefix="FLUX_", extra="ignore")

    max_input_pixels: int = Field(4096 * 4096, ge=64 * 64, le=20_000 * 20_000)
    """Largest decoded input image or mask (width*height), checked from the header before decoding."""

    max_input_bytes: int = Field(25 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024)
    """Largest encoded image or mask after base64 decoding."""

    max_output_pixels: int = Field(2048 * 2048, ge=16 * 16, le=14142 * 14142)
    """Largest output image (width*height) after rounding to the model's multiple of 16."""

    max_body_bytes: int = Field(80 * 1024 * 1024, ge=4096, le=1024 * 1024 * 1024)
    """Largest HTTP request body; two max-size images as base64 fit under the default."""


class ServerSettings(SettingsGroup):
    """Who may call, what the server calls itself, and which private hosts it may fetch from."""

    model_config = SettingsConfigDict(env_prefix="FLUX_", extra="ignore")

    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, max_length=1000)
    """Comma-separated keys; when any is set every fal route needs ``Authorization: Key <key>``."""

    public_url: str | None = Field(None, pattern=r"^https?://[^\s/]+(/[^\s]*)?$", max_length=2048)
    """Base URL clients reach this server at (for status/response/file URLs); unset: the request's host."""

    allow_private_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list, max_length=1000)
    """Comma-separated host names, IP addresses or CIDRs that URL fetching may reach although not public
    (development, tests); every other private, loopback or link-local address is refused."""

    request_timeout_s: float = Field(600.0, ge=1.0, le=7200.0)
    """Deadline of one request from its arrival: past it the denoising loop drops the request at the
    next step and the caller gets 504 ``request_timeout`` (queued time counts)."""
    drain_timeout_s: float = Field(120.0, ge=0.0, le=3600.0)
    """On SIGTERM: how long accepted requests may take to finish before they are failed (503) to
    their callers and webhooks. Keep Kubernetes' terminationGracePeriodSeconds above it."""
    log_format: Literal["json", "text"] = "json"
    """``json``: one JSON object per log event, with the request id (for log pipelines). ``text``: one
    ``time level logger: message [request_id=...]`` line per event. BentoML's own logs keep BentoML's format."""

    _split = field_validator("api_keys", "allow_private_hosts", mode="before")(_comma_separated)


class FetchSettings(SettingsGroup):
    """Limits on fetching the URLs a request or an operator gives: images, LoRAs, webhooks (docs/security.md)."""

    model_config = SettingsConfigDict(env_prefix="FLUX_FETCH_", extra="ignore")

    connect_timeout_s: float = Field(5.0, ge=0.1, le=60.0)
    """Longest wait for a TCP (and TLS) connection to one checked address."""
    read_timeout_s: float = Field(15.0, ge=0.1, le=300.0)
    """Longest silence while reading a response."""
    total_timeout_s: float = Field(30.0, ge=0.5, le=600.0)
    """Whole fetch, redirects included."""
    max_redirects: int = Field(3, ge=0, le=10)
    """Redirects followed, each hop's address checked again (0: a redirect is an error)."""


# The longest a SigV4 presigned URL may live (S3's limit; MinIO, R2 and GCS keep it).
PRESIGNED_URL_MAX_S = 7 * 86_400


class StoreSettings(SettingsGroup):
    """Where output images are kept when a request does not ask for ``sync_mode``: a local directory
    (the default), or an S3-compatible bucket (docs/storage.md)."""

    model_config = SettingsConfigDict(env_prefix="FLUX_STORE_", extra="ignore")

    url: str | None = Field(
        None, pattern=r"^s3://[a-z0-9][a-z0-9._-]{1,61}[a-z0-9](/[A-Za-z0-9._/-]*)?$", max_length=600
    )
    """``s3://bucket/prefix``: keep outputs as objects under that prefix, through boto3 (credentials
    from boto3's usual chain: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
    ``AWS_SHARED_CREDENTIALS_FILE``, a workload identity; region from ``AWS_REGION``). Unset: the
    directory store (FLUX_STORE_DIR)."""
    endpoint_url: str | None = Field(None, pattern=r"^https?://[^\s/]+/?$", max_length=2048)
    """The S3 API's endpoint, for S3-compatible stores: MinIO (``http://minio:9000``), Cloudflare R2
    (``https://<account>.r2.cloudflarestorage.com``), GCS's interoperability API
    (``https://storage.googleapis.com``). Unset: AWS S3 for the region."""
    presign_endpoint_url: str | None = Field(None, pattern=r"^https?://[^\s/]+/?$", max_length=2048)
    """The endpoint presigned URLs name, when clients reach the store elsewhere than this server
    does (an in-cluster MinIO behind an ingress). Signing is local: the server need not reach it.
    Unset: FLUX_STORE_ENDPOINT_URL."""
    public_base_url: str | None = Field(None, pattern=r"^https?://[^\s/]+(/[^\s]*)?$", max_length=2048)
    """With FLUX_STORE_URL: image URLs are this plus the object key (a CDN or a public-read bucket)
    instead of presigned GETs. The objects must then be readable there without a signature."""
    timeout_s: float = Field(10.0, ge=1.0, le=120.0)
    """With FLUX_STORE_URL: connect and read timeout of one call to object storage (boto3 retries
    failed calls up to 3 times in all); a put that still fails fails its request with 503."""
    sweep: bool = True
    """Delete expired outputs about once a minute. With FLUX_STORE_URL each replica lists the prefix
    to do it: once a bucket lifecycle rule expires the objects (docs/storage.md), turn this off."""
    dir: Path | None = None
    """The directory store's folder. Unset: ``<FLUX_CACHE_DIR>/outputs``. Not used with FLUX_STORE_URL."""
    max_bytes: int = Field(10 * 1024**3, ge=1024**2, le=10 * 1024**4)
    """The directory store's size budget: past it the oldest files are deleted (a bucket has none)."""
    ttl_s: int = Field(86_400, ge=60, le=30 * 86_400)
    """Retention: files older than this are deleted and their URLs answer 404. With FLUX_STORE_URL,
    presigned URLs live this long (7 days at most, S3's limit, unless FLUX_STORE_PUBLIC_BASE_URL)."""

    @model_validator(mode="after")
    def _presigned_urls_can_live_that_long(self):
        if self.url and not self.public_base_url and self.ttl_s > PRESIGNED_URL_MAX_S:
            raise ValueError(
                f"FLUX_STORE_TTL_S={self.ttl_s} is longer than a presigned S3 URL may live "
                f"({PRESIGNED_URL_MAX_S} s, 7 days): lower it, or set FLUX_STORE_PUBLIC_BASE_URL"
            )
        return self


class QueueSettings(SettingsGroup):
    """The request queue of the HTTP front (sync and queue routes share it): in this process's
    memory, or in Redis (``FLUX_QUEUE_URL``) shared by every replica."""

    model_config = SettingsConfigDict(env_prefix="FLUX_QUEUE_", extra="ignore")

    max_length: int = Field(256, ge=1, le=100_000)
    """Requests waiting for the model (not yet in flight); past it new ones get 429 with Retry-After
    (the fal clients retry)."""
    max_waiting_bytes: int = Field(2 * 1024**3, ge=1024**2, le=1024**4)
    """Input bytes (images sent inline, prompts) the waiting requests may hold together; past it, 429.
    Bounds the front's memory when many large requests wait."""
    concurrency: int | None = Field(None, ge=1, le=256)
    """Most requests in flight at the model at once. Unset: twice the batch size (one batch running,
    one forming)."""
    result_retention_s: int = Field(3600, ge=10, le=7 * 86_400)
    """How long a finished request's status and result stay available."""
    max_retained: int = Field(1000, ge=10, le=1_000_000)
    """Most finished requests kept (the oldest are forgotten first)."""

    # The shared queue of a fleet (runners/front/redis_queue.py, docs/fleet.md).
    url: str | None = Field(None, pattern=r"^rediss?(\+sentinel)?://\S+$", max_length=2048)
    """``redis://host:6379/0`` (``rediss://`` for TLS): every replica keeps the whole request life
    cycle in this Redis, so any replica answers any request and a dead one's work is run again.
    ``redis+sentinel://host1:26379,host2:26379/<master name>/0`` (``rediss+sentinel://`` for TLS to
    the primary): ask these Redis Sentinels for the primary, and follow it after a failover.
    Unset: the queue lives in this process's memory (one replica, lost on restart)."""
    redis_password: SecretStr | None = Field(None, min_length=1, max_length=4096)
    """Redis password, when the URL does not carry one (``redis://:password@host``)."""
    redis_password_file: FilePath | None = None
    """A file holding the Redis password (a mounted Kubernetes Secret); read at start-up, and taken
    over ``FLUX_QUEUE_REDIS_PASSWORD``."""
    redis_ca_file: FilePath | None = None
    """PEM bundle of the CA that signed the Redis server's certificate (``rediss://``); unset: the
    system's trust store."""
    key_prefix: str = Field("flux:", pattern=r"^[A-Za-z0-9:_.-]{1,64}$")
    """Prefix of every Redis key this fleet uses, so several fleets can share one Redis."""
    lease_s: float = Field(30.0, ge=1.0, le=3600.0)
    """How long a replica's claim on a running request, or on delivering a finished request's
    webhook, lasts without renewal (it renews it four times a second). A replica killed while
    running requests or delivering their webhooks leaves them to another replica this long after
    its last renewal."""
    max_attempts: int = Field(3, ge=1, le=20)
    """Most times one request is started: past it, a request whose replicas keep dying fails with
    500 ``attempts_exhausted`` instead of being run again. Bounds the replicas that try one
    request's webhook the same way (past it, the webhook is dropped with an error in the log)."""
    redis_timeout_s: float = Field(5.0, ge=0.1, le=60.0)
    """Longest wait for one Redis answer (and to connect); past it the call counts as Redis being
    unreachable: new requests get 503 ``queue_unavailable``. At least 0.5 s over an idle feeder's
    blocking pop (0.5 s), and at least 1 s under ``FLUX_QUEUE_LEASE_S``."""

    @model_validator(mode="after")
    def _timeouts_fit_together(self):
        least = REDIS_BLOCKING_POP_S + 0.5
        if self.redis_timeout_s < least:
            raise ValueError(
                f"FLUX_QUEUE_REDIS_TIMEOUT_S={self.redis_timeout_s:g} must be at least {least:g}: an idle "
                f"feeder's blocking pop waits {REDIS_BLOCKING_POP_S:g} s for an answer, which a shorter "
                "timeout would read as Redis being unreachable"
            )
        # A renewal may wait the whole timeout, and the next comes within a second: a shorter lease
        # would let a slow but healthy Redis hand a live replica's work to another.
        if self.lease_s < self.redis_timeout_s + 1.0:
            raise ValueError(
                f"FLUX_QUEUE_LEASE_S={self.lease_s:g} must be at least FLUX_QUEUE_REDIS_TIMEOUT_S + 1 = "
                f"{self.redis_timeout_s + 1.0:g}: one lease renewal may wait the whole timeout for Redis"
            )
        return self

    def redis_password_value(self) -> str | None:
        if self.redis_password_file is not None:
            return self.redis_password_file.read_text().strip() or None
        return self.redis_password.get_secret_value() if self.redis_password else None


class LoraSettings(SettingsGroup):
    """Per-request LoRAs (hot-swapped as low-rank deltas) and LoRAs fused at start-up."""

    # populate_by_name: ``fused`` is read from FLUX_FUSED_LORAS but can still be given by name in code.
    model_config = SettingsConfigDict(env_prefix="FLUX_LORA_", extra="ignore", populate_by_name=True)

    dir: Path | None = None
    """Local LoRA directory: requests may name files under it (no path escapes)."""
    max_per_request: int = Field(4, ge=0, le=16)
    """Most LoRAs one request may use (0 refuses per-request LoRAs)."""
    max_rank: int = Field(128, ge=1, le=1024)
    """Highest LoRA rank accepted; a file over it is refused."""
    max_file_bytes: int = Field(2 * 1024**3, ge=1024, le=64 * 1024**3)
    """Largest LoRA file downloaded or read."""
    cache_max_bytes: int = Field(20 * 1024**3, ge=1024**2, le=10 * 1024**4)
    """Disk budget of downloaded LoRA files (least recently used deleted first)."""
    memory_max_bytes: int = Field(4 * 1024**3, ge=1024**2, le=1024**4)
    """Budget of adapters kept loaded in memory (least recently used dropped first)."""
    fuse_uniform_batches: bool = True
    """Fuse a batch's LoRAs into the weights (and restore them bit for bit after) when all its requests
    use the same LoRA set, instead of per-sample deltas. On by measurement (benchmarks/lora.py): deltas
    cost 1.3x fused per step, fusing and restoring costs less than one step. Needs a copy of the
    touched weights while fused; on a GPU without room for it, deltas are used. float32 only: in
    bfloat16 a fused LoRA's image differs from its delta image, so deltas serve every batch there."""
    fused: Annotated[list[str], NoDecode] = Field(
        default_factory=list, max_length=64, validation_alias="FLUX_FUSED_LORAS"
    )
    """Comma-separated ``path:scale`` (scale optional, default 1), each path in any form a request may
    use (docs/loras.md), merged into the base weights once at start-up."""

    _split = field_validator("fused", mode="before")(_comma_separated)


class WebhookSettings(SettingsGroup):
    """Delivery of ``fal_webhook`` callbacks, retried with exponential backoff (1 s, 2 s, 4 s ...)."""

    model_config = SettingsConfigDict(env_prefix="FLUX_WEBHOOK_", extra="ignore")

    attempts: int = Field(5, ge=1, le=20)
    """Most delivery attempts; a 2xx answer ends them, and so does an answer that retrying cannot change
    (400, 401, 403, 404, 405, 410, 413, 422)."""
    total_timeout_s: float = Field(120.0, ge=1.0, le=3600.0)
    """Give up delivering after this long, retries included."""


class AccelerationSettings(SettingsGroup):
    """What a request with ``acceleration: "regular"`` gets (``"none"`` always runs the full model).
    Each optimisation has its own switch, so a benchmark can ablate it (benchmarks/loop.py)."""

    model_config = SettingsConfigDict(env_prefix="FLUX_ACCEL_", extra="ignore")

    first_block_cache: bool = True
    """First-block residual cache: on a step where the first transformer block's output barely
    changed since the sample's last full step, reuse what the other blocks added then instead of
    running them. Needs a backend that can split the transformer (``torch``); others run as ``none``."""
    threshold: float = Field(0.08, ge=0.0, le=10.0)
    """Relative mean absolute change of the first block's residual under which a step is skipped.
    0.08 is ParaAttention's default for FLUX (1.55x at 28 steps, "nearly zero quality loss");
    0 never skips (the output then equals ``none`` bit for bit); above ~2, every step the other rules
    allow is skipped (an ablation, not a setting)."""
    warmup_steps: int = Field(1, ge=1, le=50)
    """The first steps of every sample always run the whole transformer (the first has no reference)."""
    max_consecutive_skips: int = Field(3, ge=0, le=50)
    """Most steps in a row one sample may skip before a full step refreshes its cache (0: never skip).
    The last step is never skipped."""
    tf32: bool = True
    """TF32 matmuls (CUDA, fp32 weights only: bf16 and fp16 models already use tensor cores) for a
    transformer forward whose samples are all ``regular``; a forward with any ``none`` sample keeps
    full fp32 precision. No effect on the CPU."""


class ExecutorSettings(SettingsGroup):
    """Where the front's requests run: the in-process BentoML worker, or a Triton server (docs/triton.md)."""

    model_config = SettingsConfigDict(env_prefix="FLUX_", extra="ignore")

    executor: Literal["in-process", "triton"] = "in-process"
    """``in-process``: the BentoML worker this server starts owns the model. ``triton``: the model runs
    on the Triton server at FLUX_TRITON_URL (``python -m runners.worker.triton_server``); no model here."""
    triton_url: str = Field("http://127.0.0.1:8000", pattern=r"^https?://[^\s/]+/?$", max_length=2048)
    """KServe v2 HTTP endpoint of the Triton tier."""
    triton_model: str = Field("flux_inpaint", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """Name of the model on the Triton server. The Triton server reads the same variable, so one value names
    the model on both sides."""
    triton_connect_timeout_s: float = Field(5.0, ge=0.1, le=60.0)
    """Longest wait for a connection to the Triton server."""
    triton_timeout_s: float = Field(900.0, ge=1.0, le=7200.0)
    """One inference call, Triton's queueing included. Must be at least ``FLUX_REQUEST_TIMEOUT_S`` plus the
    30 s grace the queue gives a running request (checked at start)."""
    triton_ready_cache_s: float = Field(1.0, ge=0.0, le=60.0)
    """How long the front's /readyz reuses Triton's last /v2/health/ready answer."""


class Settings(BaseSettings):
    """All settings of one process, grouped by concern."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    images: ImageLimits = Field(default_factory=ImageLimits)
    server: ServerSettings = Field(default_factory=ServerSettings)
    fetch: FetchSettings = Field(default_factory=FetchSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    backend: BackendSettings = Field(default_factory=BackendSettings)
    executor: ExecutorSettings = Field(default_factory=ExecutorSettings)
    acceleration: AccelerationSettings = Field(default_factory=AccelerationSettings)

    @model_validator(mode="after")
    def _groups_fit_together(self):
        """The rules across groups, checked however the settings are built (``Settings()`` in code
        too, not only ``load_settings``)."""
        # A request may run until its deadline plus the queue's grace; the timeouts of the calls that
        # carry it must not cut it short first (they would answer a bare 504 and leave the work running).
        needed = self.server.request_timeout_s + DEADLINE_GRACE_S
        for name, value in (
            ("FLUX_BATCH_TIMEOUT_S", self.batching.timeout_s),
            ("FLUX_TRITON_TIMEOUT_S", self.executor.triton_timeout_s),
        ):
            if value < needed:
                raise ValueError(
                    f"{name}={value:g} must be at least FLUX_REQUEST_TIMEOUT_S + {DEADLINE_GRACE_S:g} = {needed:g}"
                )
        # Exported graphs hold their own weights: a quantized or offloaded torch module is not what runs.
        if self.backend.backend in ("onnxruntime", "tensorrt"):
            for name, value in (("FLUX_QUANTIZE", self.model.quantize), ("FLUX_OFFLOAD", self.model.offload)):
                if value != "none":
                    raise ValueError(
                        f"{name}={value} applies to the torch transformer, but FLUX_BACKEND={self.backend.backend} "
                        "runs exported graphs: use FLUX_BACKEND=torch or compile, or FLUX_EXPORT_PRECISION=fp8 for "
                        "TensorRT"
                    )
            if self.model.transformer_file is not None:  # exported artifacts are named by the model folder's hash
                raise ValueError(
                    f"FLUX_TRANSFORMER_FILE is not used by FLUX_BACKEND={self.backend.backend}: its exported graphs "
                    "are named by FLUX_MODEL's files, not this one; use FLUX_BACKEND=torch or compile"
                )
        # A finished request's result names its images' URLs for as long as it is kept.
        if self.store.ttl_s < self.queue.result_retention_s:
            raise ValueError(
                f"FLUX_STORE_TTL_S={self.store.ttl_s} must be at least FLUX_QUEUE_RESULT_RETENTION_S="
                f"{self.queue.result_retention_s}: a result still kept would name deleted images"
            )
        return self


class SettingsError(ValueError):
    """A ``FLUX_*`` value the server cannot run with; the message names the variable."""


def variable_names(group: type[BaseSettings], field: str) -> list[str]:
    """The environment variables a settings field is read from, as pydantic-settings computes them:
    its alias(es), and the group's prefix plus the field's name (upper-cased) when there is no alias
    or the group also populates by name. The first is the one errors name; docs/configuration.md
    lists them all."""
    info = group.model_fields.get(field)
    if info is None:  # pydantic reports an aliased field by its alias, which is the variable
        return [field]
    alias = info.validation_alias
    aliases = [alias] if isinstance(alias, str) else [c for c in getattr(alias, "choices", []) if isinstance(c, str)]
    by_name = not aliases or group.model_config.get("populate_by_name") or group.model_config.get("validate_by_name")
    names = [a.upper() for a in aliases] + (
        [(group.model_config.get("env_prefix", "") + field).upper()] if by_name else []
    )
    return list(dict.fromkeys(names))


def variable_name(group: type[BaseSettings], field: str) -> str:
    """The environment variable a bad value of this field is reported by."""
    return variable_names(group, field)[0]


def load_settings() -> Settings:
    groups = {info.annotation.__name__: info.annotation for info in Settings.model_fields.values()}
    try:
        return Settings()
    except ValidationError as exc:  # raised by one group's own validation (exc.title is its class), or across groups
        group = groups.get(exc.title)
        problems = [
            f"{variable_name(group, str(error['loc'][0]))}: {error['msg']}"
            if group and error["loc"]
            else error["msg"].removeprefix("Value error, ")  # a cross-field rule: its message names the variables
            for error in exc.errors()
        ]  # never the values: some are secrets (FLUX_API_KEYS)
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
