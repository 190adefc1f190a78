"""Loading the served model: a hub id, a diffusers-layout folder, or the embedded tiny model.

All three go through ``FluxInpaintPipeline.from_pretrained``: the tiny model is written to disk
once and loaded back by the same code that loads FLUX.1-dev, so the loading path is tested here.
The pipeline object is kept for what it owns (tokenizers, text encoders, image processors and
the scheduler's config); the denoising loop itself lives in ``runners.pipeline.inpaint``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runners.backends.eager import TorchTransformer, TorchVae
from runners.backends.interfaces import TransformerBackend, VaeBackend
from runners.config import DEFAULT_SAFETY_CHECKER, TINY_WARNING, LoraSettings, ModelSettings
from runners.pipeline.safety import SafetyChecker

if TYPE_CHECKING:
    from runners.fetch import SafeFetcher

log = logging.getLogger(__name__)

RANDOM_WARNING = "SERVING %s: THE FULL-SIZE ARCHITECTURE WITH RANDOM WEIGHTS, for measuring speed: outputs are noise."


@dataclass
class FluxModel:
    """Everything the inpainting loop needs, behind the backend interfaces."""

    pipeline: Any  # diffusers.FluxInpaintPipeline: text encoding, image processors, scheduler config
    transformer: TransformerBackend
    vae: VaeBackend
    safety_checker: SafetyChecker | None
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    source: str
    is_tiny: bool
    max_sequence_length: int
    vae_batch_images: int = 1  # most images one VAE call encodes or decodes (FLUX_VAE_BATCH_IMAGES)
    lora_layers: dict | None = None  # LoraLinear modules by path, when per-request LoRAs are on
    adapters: Any = None  # runners.lora.adapters.AdapterCache
    fuse_uniform_loras: bool = False  # fuse a batch's LoRAs when all its requests share one set
    fused_loras: list = field(default_factory=list)  # (sha256, scale) merged at start-up: part of an export's identity
    # Compiled transformer: a LoRA batch's deltas are padded to the smallest of these total ranks that
    # holds them (runners.backends.compiled.rank_buckets); None: exact ranks (eager).
    lora_rank_buckets: tuple[int, ...] | None = None
    backend: str = "torch"  # what FLUX_BACKEND resolved to: torch, compile, onnxruntime or tensorrt
    compile_scope: str | None = None  # compile: "blocks" (regional) or "model"
    quantize: str = "none"  # FLUX_QUANTIZE: the transformer's weights
    component_bytes: dict = field(default_factory=dict)  # weight bytes per component, measured after loading
    memory_plan: Any = None  # runners.pipeline.memory.MemoryPlan counted before loading


def resolve_source(settings: ModelSettings) -> tuple[str, str | None]:
    """(what to pass to from_pretrained, the safety checker's source)."""
    if settings.is_tiny:
        from runners.pipeline.tiny import ensure_tiny_model

        folder = ensure_tiny_model(Path(settings.cache_dir))
        return str(folder), settings.safety_checker or str(folder / "safety_checker")
    # A folder that carries its own checker (``make tiny DIR=...`` writes one) uses it: no hub needed.
    own_checker = Path(settings.model) / "safety_checker"
    if own_checker.is_dir():
        return settings.model, settings.safety_checker or str(own_checker)
    return settings.model, settings.safety_checker or DEFAULT_SAFETY_CHECKER


def load_model(
    settings: ModelSettings, lora_settings: LoraSettings | None = None, fetcher: SafeFetcher | None = None
) -> FluxModel:
    """The model ``settings`` name, with ``lora_settings``' LoRAs fused into it (``FLUX_FUSED_LORAS``,
    fetched with ``fetcher``: the caller's, built from its own settings) and per-request LoRAs
    enabled when ``max_per_request`` allows them."""
    import torch
    from diffusers import FluxInpaintPipeline

    from runners.pipeline import offload, quantization

    device = torch.device(settings.resolved_device())
    dtype = settings.resolved_dtype(device.type)
    lora_settings = lora_settings or LoraSettings(max_per_request=0)
    # Refused before anything is read: a choice this device cannot run, or a plan it cannot hold.
    quantization.check_supported(settings.quantize, device)
    quantization.check_supported(settings.text_encoder_quantize, device, "FLUX_TEXT_ENCODER_QUANTIZE")
    offload.check_offload(settings.offload, device)
    source, checker_source = (settings.model, None) if settings.random_architecture else resolve_source(settings)
    plan = plan_and_check_memory(settings, lora_settings, device, dtype, source, checker_source)
    started = time.perf_counter()
    if settings.random_architecture:
        from runners.pipeline.random_model import build_random_model

        log.warning(RANDOM_WARNING, source)
        pipeline, checker, feature_extractor = build_random_model(settings.random_architecture, device, dtype)
        safety_checker = SafetyChecker(checker, feature_extractor, device, dtype)
    else:
        if settings.is_tiny:
            log.warning(TINY_WARNING)
        log.info("loading model %s on %s as %s", source, device, dtype)
        # device_map: each component's weights go from the files straight to the device, never a
        # whole copy of the model in host memory first (33 GB for FLUX.1-dev in bf16). Offloaded
        # weights stay in host memory: the offload hooks bring them over.
        home = device if settings.offload == "none" else torch.device("cpu")
        components = {}
        if settings.transformer_file is not None:
            from runners.pipeline.single_file import load_transformer_file

            components["transformer"] = load_transformer_file(settings.transformer_file, source, home, dtype)
        pipeline = FluxInpaintPipeline.from_pretrained(source, torch_dtype=dtype, device_map=home.type, **components)
        safety_checker = SafetyChecker.load(checker_source, device, dtype) if checker_source else None
    pipeline.set_progress_bar_config(disable=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        getattr(pipeline, name).eval().requires_grad_(False)
    log.info("model loaded in %.1f s", time.perf_counter() - started)
    # FLUX_FUSED_LORAS go into the full-precision weights, before quantization rounds them.
    fused = (
        fuse_configured_loras(pipeline.transformer, lora_settings, settings.cache_dir, fetcher)
        if lora_settings.fused
        else []
    )
    for name, choice in (("transformer", settings.quantize), ("text_encoder_2", settings.text_encoder_quantize)):
        if choice != "none":
            count = quantization.quantize(getattr(pipeline, name), choice)
            log.info("%s: %d linear layers quantized to %s", name, count, choice)
    lora_layers = adapters = None
    # Fusing a uniform batch's LoRAs is exact enough only in float32: in bf16 the fused weights round
    # differently from base + delta (measured on the tiny model: up to 10 levels of 255), so a request's
    # image would change with whether its batch-mates share its LoRAs. Deltas then serve every batch.
    # A quantized transformer never fuses: its weights are not in the compute dtype to add a delta to.
    # Nor an offloaded one: its weights are copied in from host memory at each use, past any fuse.
    fuse_uniform = (
        lora_settings.fuse_uniform_batches
        and dtype == torch.float32
        and settings.quantize == "none"
        and settings.offload == "none"
    )
    if lora_settings.fuse_uniform_batches and not fuse_uniform and lora_settings.max_per_request > 0:
        log.info(
            "LoRA batches run as deltas in %s beside the %s weights, never fused: a fused LoRA's image differs "
            "from its delta image there, and an image must not depend on its batch-mates",
            dtype,
            "quantized" if settings.quantize != "none" else "base",
        )
    if lora_settings.max_per_request > 0:
        from runners.lora.adapters import AdapterCache, enable_lora

        lora_layers = enable_lora(pipeline.transformer)
        adapters = AdapterCache(
            pipeline.transformer, lora_settings.memory_max_bytes, lora_settings.max_rank, device=device, dtype=dtype
        )
    component_bytes = {name: quantization.module_bytes(getattr(pipeline, name)) for name in COUNTED}
    if safety_checker is not None:
        component_bytes["safety_checker"] = quantization.module_bytes(safety_checker.checker)
    from runners.pipeline.memory import size

    log.info("weights as loaded: %s", ", ".join(f"{name} {size(nbytes)}" for name, nbytes in component_bytes.items()))
    offload.apply_offload(pipeline, settings.offload, device)
    transformer_backend = offload.transformer_backend(pipeline.transformer, settings.offload)
    return FluxModel(
        pipeline=pipeline,
        transformer=transformer_backend,
        vae=TorchVae(pipeline.vae),
        safety_checker=safety_checker,
        device=device,
        dtype=dtype,
        source=source,
        is_tiny=settings.is_tiny,
        max_sequence_length=settings.max_sequence_length,
        vae_batch_images=settings.vae_batch_images,
        lora_layers=lora_layers,
        adapters=adapters,
        fuse_uniform_loras=fuse_uniform,
        fused_loras=fused,
        quantize=settings.quantize,
        component_bytes=component_bytes,
        memory_plan=plan,
    )


COUNTED = ("transformer", "text_encoder", "text_encoder_2", "vae")


def plan_and_check_memory(settings: ModelSettings, lora_settings: LoraSettings, device, dtype, source, checker_source):
    """The configuration's expected peak, counted on the meta device and logged; refused (MemoryPlanError,
    with the numbers) when over the device's memory and FLUX_MEMORY_CHECK is on."""
    from runners.pipeline import memory

    try:
        architecture = memory.meta_architecture(source, checker_source, settings.random_architecture)
    except (OSError, ValueError) as exc:  # a missing or broken config: the loader says which, in its words
        log.warning("memory: not counted, the model's configs cannot be read (%s): no pre-flight", exc)
        return None
    width, height = settings.plan_size()
    common = dict(
        dtype=dtype,
        device=device.type,
        adapter_bytes=lora_settings.memory_max_bytes if lora_settings.max_per_request > 0 else 0,
        width=width,
        height=height,
        images=settings.memory_plan_images,
        vae_batch_images=settings.vae_batch_images,
    )
    chosen = dict(
        quantize=settings.quantize, text_encoder_quantize=settings.text_encoder_quantize, offload=settings.offload
    )
    plan = memory.plan_memory(architecture, **common, **chosen)
    available, where = memory.device_memory(device, settings.memory_limit_bytes)
    log.info("memory: %s; the device has %s (%s)", plan.summary(), memory.size(available), where)
    if settings.memory_check:
        memory.preflight(plan, available, where, lambda: memory.alternatives_for(architecture, **common))
    return plan


def attach_backend(model: FluxModel, settings) -> None:
    """Put the configured backend (FLUX_BACKEND) behind the loop's interfaces, or refuse at start
    with a message saying what to change. ``settings``: runners.config.Settings."""
    backend = settings.backend
    choice = backend.resolved_backend(model.device.type)
    model.backend = choice
    if backend.attention_backend is not None:
        if choice not in ("torch", "compile"):
            raise RuntimeError(
                f"FLUX_ATTENTION_BACKEND applies to FLUX_BACKEND=torch or compile, not {choice} (exported graphs "
                "have their attention built in): unset it"
            )
        from runners.backends.compiled import set_attention_backend

        set_attention_backend(model.pipeline.transformer, backend.attention_backend, model.device.type)
    if choice == "torch":
        return
    if choice == "compile":
        from runners.backends.compiled import compile_settings, compile_transformer, compile_vae, rank_buckets

        # Compiled lazily: the graphs are built by the first forwards, the warm-up's.
        module = compile_transformer(
            model.pipeline.transformer, backend.compile_scope, backend.compile_backend, backend.compile_mode
        )
        model.transformer = TorchTransformer(module, compile_settings)
        model.compile_scope = backend.compile_scope
        if backend.compile_vae:
            compile_vae(model.pipeline.vae, backend.compile_backend, backend.compile_mode)
            model.vae = TorchVae(model.pipeline.vae, compile_settings)
        if model.lora_layers is not None:
            # A few total ranks for the LoRA deltas, so their shapes are bounded; a batch whose LoRAs
            # need more than the largest runs its requests one by one.
            model.lora_rank_buckets = rank_buckets(settings.lora.max_rank, settings.lora.max_per_request)
        log.info(
            "backend compile (%s, %s%s%s): graphs are built by the warm-up",
            "regional: repeated blocks" if backend.compile_scope == "blocks" else "whole transformer",
            backend.compile_backend,
            "" if backend.compile_mode == "default" else f", {backend.compile_mode}",
            ", VAE too" if backend.compile_vae else "",
        )
        return
    if model.lora_layers is not None:
        raise RuntimeError(
            f"FLUX_BACKEND={choice} runs exported graphs whose weights are fixed, so per-request LoRAs cannot be "
            "applied: set FLUX_LORA_MAX_PER_REQUEST=0 (LoRAs named in FLUX_FUSED_LORAS are exported fused into the "
            "graphs), or use FLUX_BACKEND=torch or compile"
        )
    from runners.backends.artifacts import find_onnx, find_tensorrt

    onnx = find_onnx(model, settings)
    if choice == "onnxruntime":
        from runners.backends.onnx_runtime import OnnxTransformer, OnnxVae

        model.transformer = OnnxTransformer(
            onnx.file("transformer"), model.pipeline.transformer.config, model.device, model.dtype
        )
        model.vae = OnnxVae(onnx.file("vae_encoder"), onnx.file("vae_decoder"), model.vae, model.device, model.dtype)
    else:
        from runners.backends.tensorrt_engine import TensorRTEngine, TensorRTTransformer, TensorRTVae

        engines = find_tensorrt(model, settings, onnx)
        config = model.pipeline.transformer.config
        model.transformer = TensorRTTransformer(
            TensorRTEngine(engines.file("transformer")), config.in_channels, bool(config.guidance_embeds)
        )
        model.vae = TensorRTVae(
            TensorRTEngine(engines.file("vae_encoder")),
            TensorRTEngine(engines.file("vae_decoder")),
            model.vae.latent_channels,
            model.vae.scale_factor,
            model.vae.scaling_factor,
            model.vae.shift_factor,
        )
    log.info("backend %s from %s", choice, onnx.path)


def parse_fused_entry(entry: str) -> tuple[str, float]:
    """``path:scale`` (scale optional). The scale is after the last colon, so URLs keep theirs."""
    path, sep, scale = entry.rpartition(":")
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return entry, 1.0


def fuse_configured_loras(
    transformer, lora_settings: LoraSettings, cache_dir: Path, fetcher: SafeFetcher | None
) -> list[tuple[str, float]]:
    """FLUX_FUSED_LORAS: merged into the base weights once, before anything is served, each found as a
    request's LoRA would be (a URL through ``fetcher``). Returns (sha256, scale) of each, which names
    any export made from these weights."""
    import asyncio

    import torch

    from runners.lora.adapters import Adapter, fuse
    from runners.lora.formats import load_lora
    from runners.lora.sources import LoraSources

    if fetcher is None:
        raise ValueError("fusing FLUX_FUSED_LORAS needs the process's URL fetcher (SafeFetcher.for_settings)")
    sources = LoraSources(lora_settings, fetcher, cache_dir)
    layers = {name: m for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    parameter = next(transformer.parameters())
    fused = []
    for entry in lora_settings.fused:
        path, scale = parse_fused_entry(entry)
        file = asyncio.run(sources.resolve(path))
        weights = load_lora(file.path, transformer, lora_settings.max_rank)
        for layer in weights.layers.values():
            layer.down, layer.up = layer.down.to(parameter.device), layer.up.to(parameter.device)
        fuse(layers, [(Adapter(file.sha256, file.source, weights.layers, weights.format), scale)], keep_originals=False)
        log.info(
            "fused LoRA %s (scale %g, %s, %d layers) into the base weights",
            file.source,
            scale,
            weights.format,
            len(weights.layers),
        )
        fused.append((file.sha256, scale))
    return fused
