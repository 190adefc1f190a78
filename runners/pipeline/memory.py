"""Memory counted before it is spent: the bytes of every component at its precision, counted on the
``meta`` device (no weight is read or allocated), the expected peak of a configuration, and a
pre-flight that refuses one that cannot fit, with the numbers and what would fit instead.

What the peak counts, on the compute device:
- resident weights: every component (transformer, T5-XXL, CLIP, VAE, safety checker) at its
  precision; with FLUX_OFFLOAD=model the largest component plus the VAE and the safety checker (the
  others wait in host memory); with ``group`` the transformer's non-block weights and two of its largest blocks
  (the running one and the next, prefetched), or T5's equivalent when larger;
- the LoRA adapter budget (FLUX_LORA_MEMORY_MAX_BYTES) when per-request LoRAs are on;
- activations: the largest of the transformer forward over FLUX_MEMORY_PLAN_IMAGES images at
  FLUX_MEMORY_PLAN_SIZE (``ACTIVATION_WIDTHS`` hidden-widths per token alive at once inside a single
  block, plus the attention matrix where SDPA has no fused kernel: on the CPU) and the VAE decode
  (about 1.5 GB per 1024x1024 image in bf16, FLUX_VAE_BATCH_IMAGES at once);
- ``RUNTIME_OVERHEAD``: the CUDA context, cuBLAS workspaces and allocator fragmentation.

An estimate, stated so, measured against a GPU where one is lent (benchmarks/device/quantized.py).

``python -m runners.pipeline.memory`` prints docs/hardware.md's table, counted from FLUX.1-dev's
architecture (runners/pipeline/random_model.py) on the meta device.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from runners.pipeline.quantization import is_quantized_linear

log = logging.getLogger(__name__)

GB = 1e9
GIB = 1024**3
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae", "safety_checker")
ACTIVATION_WIDTHS = (
    13  # hidden-size tensors alive per token at a single block's peak (see transformer_activation_bytes)
)
VAE_BYTES_PER_PIXEL_BF16 = 1.5e9 / (1024 * 1024)  # measured order of the VAE decoder at 1024x1024 in bf16
TEXT_TOKENS = 512
RUNTIME_OVERHEAD = 1 * GIB


class MemoryPlanError(RuntimeError):
    """A configuration that cannot fit the device's memory; the message has the numbers."""


def quantized_weight_bytes(module: torch.nn.Linear, choice: str) -> int:
    """What torchao stores for a quantized linear weight (checked against the real tensors in
    tests/test_quantization.py): 1 byte per element plus, per output row, a float32 scale (and an
    int8 zero point for int8)."""
    rows = module.out_features
    per_row = 5 if choice == "int8" else 4
    return module.weight.numel() + rows * per_row


def component_bytes(module: torch.nn.Module, dtype: torch.dtype, choice: str = "none") -> int:
    """Bytes ``module`` takes once loaded in ``dtype`` and quantized by ``choice``: works on a ``meta``
    module as on a loaded one (before quantization)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    seen: set[int] = set()
    for sub in module.modules():
        for pname, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            if pname == "weight" and is_quantized_linear(sub, choice):
                total += quantized_weight_bytes(sub, choice)
            elif tensor.is_floating_point():
                total += tensor.numel() * itemsize
            else:
                total += tensor.numel() * tensor.element_size()
    return total


def largest_block_bytes(module: torch.nn.Module, dtype: torch.dtype, choice: str) -> tuple[int, int]:
    """(bytes of the largest block of the module's block lists, bytes outside every block list)."""
    named = [(n, m) for n, m in module.named_modules() if isinstance(m, torch.nn.ModuleList)]
    # the outermost lists only: a block's own lists (attn.to_out) are part of the block
    lists = [m for n, m in named if not any(n.startswith(other + ".") for other, _ in named if other != n)]
    blocks = [block for blocks in lists for block in blocks]
    if not blocks:
        return 0, component_bytes(module, dtype, choice)
    in_blocks = sum(component_bytes(b, dtype, choice) for b in blocks)
    largest = max(component_bytes(b, dtype, choice) for b in blocks)
    return largest, component_bytes(module, dtype, choice) - in_blocks


@dataclass
class Architecture:
    """What the counting needs of one model: its modules on the meta device."""

    modules: dict[str, torch.nn.Module]

    @property
    def transformer_config(self):
        return self.modules["transformer"].config


def meta_architecture(source: str | None, checker_source: str | None, random_architecture: str | None) -> Architecture:
    """The model's modules built on the ``meta`` device from its configs (a folder or hub id:
    only the config files are read), or from an architecture table (``random:flux-dev``)."""
    from runners.pipeline.random_model import ARCHITECTURES, build_modules
    from runners.pipeline.tiny import _clip_tokenizer, _t5_tokenizer

    if random_architecture is not None:
        if random_architecture not in ARCHITECTURES:
            raise ValueError(f"random:{random_architecture}: unknown architecture")
        with torch.device("meta"):
            return Architecture(build_modules(ARCHITECTURES[random_architecture], (_clip_tokenizer(), _t5_tokenizer())))
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"), _quiet_transformers():
        modules = {
            "transformer": FluxTransformer2DModel.from_config(
                FluxTransformer2DModel.load_config(source, subfolder="transformer")
            ),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(source, subfolder="vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(source, subfolder="text_encoder")),
            "text_encoder_2": T5EncoderModel(T5Config.from_pretrained(source, subfolder="text_encoder_2")),
        }
        if checker_source:
            modules["safety_checker"] = StableDiffusionSafetyChecker(CLIPConfig.from_pretrained(checker_source))
    return Architecture(modules)


@contextlib.contextmanager
def _quiet_transformers():
    import transformers

    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(previous)


def transformer_activation_bytes(config, width: int, height: int, images: int, dtype: torch.dtype, device: str) -> int:
    """Activation bytes of one transformer forward over ``images`` images of ``width`` x ``height``.
    A FLUX single block holds, per token, at its peak (the concatenation before ``proj_out``): the
    input and its norm (2 hidden), the MLP's 4x hidden and the attention output (5), their
    concatenation (5), and the q, k, v being freed (about 1): 13 hidden-widths. Off CUDA, SDPA's
    math kernel also makes the (heads, tokens, tokens) attention matrix in float32."""
    hidden = config.num_attention_heads * config.attention_head_dim
    tokens = (width // 16) * (height // 16) + TEXT_TOKENS
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = images * tokens * hidden * ACTIVATION_WIDTHS * itemsize
    if device != "cuda":
        total += images * config.num_attention_heads * tokens * tokens * 4
    return total


def vae_decode_bytes(config, width: int, height: int, images: int, dtype: torch.dtype) -> int:
    """FLUX's VAE decoder: about 1.5 GB per 1024x1024 image in bf16, scaled by its full-resolution
    width (128 channels in FLUX's; the tiny model's is narrower) and the dtype."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    width_ratio = config.block_out_channels[0] / 128
    return int(images * width * height * VAE_BYTES_PER_PIXEL_BF16 * width_ratio * itemsize / 2)


def size(nbytes: float) -> str:
    """Bytes for people: GB (10^9) from 1 GB up, MB below."""
    return f"{nbytes / GB:.2f} GB" if nbytes >= GB / 10 else f"{nbytes / 1e6:.2f} MB"


@dataclass
class MemoryPlan:
    """The expected peak of one configuration on its device, by part."""

    weights: dict[str, int]  # bytes per component at its precision (all of it, wherever it lives)
    resident: int  # weight bytes on the compute device at the peak
    adapters: int
    activations: int
    overhead: int
    description: str  # the configuration, in the settings' words
    plan: str  # "1 image at 1024x1024"
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return self.resident + self.adapters + self.activations + self.overhead

    def summary(self) -> str:
        weights = ", ".join(f"{name} {size(nbytes)}" for name, nbytes in self.weights.items())
        return (
            f"expected peak {size(self.peak)} for {self.plan} with {self.description}: weights on the device "
            f"{size(self.resident)} (of {weights}), LoRA adapters up to {size(self.adapters)}, "
            f"activations {size(self.activations)}, runtime overhead {size(self.overhead)}"
        )


def plan_memory(
    architecture: Architecture,
    *,
    dtype: torch.dtype,
    device: str,
    quantize: str = "none",
    text_encoder_quantize: str = "none",
    offload: str = "none",
    adapter_bytes: int = 0,
    width: int = 1024,
    height: int = 1024,
    images: int = 1,
    vae_batch_images: int = 1,
) -> MemoryPlan:
    modules = architecture.modules
    choices = {"transformer": quantize, "text_encoder_2": text_encoder_quantize}
    weights = {
        name: component_bytes(modules[name], dtype, choices.get(name, "none")) for name in COMPONENTS if name in modules
    }
    checker = weights.get("safety_checker", 0)
    pipeline_parts = {k: v for k, v in weights.items() if k != "safety_checker"}
    if offload == "none":
        resident = sum(weights.values())
    elif offload == "model":
        # the VAE stays on after its encode (the loop never calls diffusers' maybe_free_model_hooks)
        resident = max(pipeline_parts.values()) + weights.get("vae", 0) + checker
    else:  # group: two blocks (running, prefetched) and the rest of the largest component at a time
        per_component = []
        for name in pipeline_parts:
            block, rest = largest_block_bytes(modules[name], dtype, choices.get(name, "none"))
            per_component.append(rest + 2 * block)
        resident = max(per_component) + checker
    activations = max(
        transformer_activation_bytes(architecture.transformer_config, width, height, images, dtype, device),
        vae_decode_bytes(modules["vae"].config, width, height, min(images, vae_batch_images), dtype),
    )
    description = (
        f"FLUX_QUANTIZE={quantize}, FLUX_TEXT_ENCODER_QUANTIZE={text_encoder_quantize}, FLUX_OFFLOAD={offload}, "
        f"{str(dtype).removeprefix('torch.')}"
    )
    plan = f"{images} image{'s' if images > 1 else ''} at {width}x{height}"
    return MemoryPlan(weights, resident, adapter_bytes, activations, RUNTIME_OVERHEAD, description, plan)


def device_memory(device: torch.device, limit: int | None) -> tuple[int, str]:
    """(bytes the configuration may use, where that figure comes from)."""
    if limit is not None:
        return limit, "FLUX_MEMORY_LIMIT_BYTES"
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return properties.total_memory, properties.name
    import psutil

    return psutil.virtual_memory().total, "the host's memory"


SUGGESTIONS = [  # cheapest in quality and speed first
    dict(text_encoder_quantize="int8"),
    dict(quantize="fp8", text_encoder_quantize="int8"),
    dict(quantize="fp8-weight", text_encoder_quantize="int8"),
    dict(quantize="int8", text_encoder_quantize="int8"),
    dict(quantize="fp8-weight", text_encoder_quantize="int8", offload="model"),
    dict(quantize="fp8-weight", text_encoder_quantize="int8", offload="group"),
]


def preflight(plan: MemoryPlan, available: int, source: str, alternatives: Callable[[], list[MemoryPlan]]) -> None:
    """Refuse a plan over ``available`` bytes, naming the numbers and the first alternative that fits."""
    if plan.peak <= available:
        return
    fits = next((alt for alt in alternatives() if alt.peak <= available), None)
    hint = (
        f"; {fits.description} would need {size(fits.peak)}"
        if fits is not None
        else "; no quantization or offload setting fits: use a larger GPU, or lower FLUX_MEMORY_PLAN_SIZE and "
        "FLUX_MEMORY_PLAN_IMAGES"
    )
    raise MemoryPlanError(
        f"this configuration cannot fit: {plan.summary()}; the device has {size(available)} ({source}){hint}. "
        "FLUX_MEMORY_CHECK=false starts anyway"
    )


def alternatives_for(architecture: Architecture, **base) -> list[MemoryPlan]:
    """The plans of ``SUGGESTIONS`` this device can run (``fp8`` on CUDA, offload on CUDA)."""
    plans = []
    for change in SUGGESTIONS:
        if base["device"] != "cuda" and ("fp8" in change.values() or "offload" in change):
            continue
        plans.append(plan_memory(architecture, **{**base, **change}))
    return plans


# docs/hardware.md: FLUX.1-dev counted on the meta device.
HARDWARE_GB = (80, 48, 24, 16)
TABLE_ROWS = [
    dict(),
    dict(text_encoder_quantize="int8"),
    dict(quantize="fp8", text_encoder_quantize="int8"),
    dict(quantize="fp8-weight", text_encoder_quantize="int8"),
    dict(quantize="int8", text_encoder_quantize="int8"),
    dict(quantize="fp8", text_encoder_quantize="fp8"),
    dict(offload="model"),
    dict(quantize="fp8-weight", text_encoder_quantize="int8", offload="model"),
    dict(offload="group"),
    dict(quantize="fp8-weight", text_encoder_quantize="int8", offload="group"),
]


def fit_table(architecture: Architecture, adapter_bytes: int) -> list[str]:
    """Markdown rows: each TABLE_ROWS configuration of FLUX.1-dev in bf16 on CUDA, one 1024x1024
    image, with ``adapter_bytes`` of LoRA adapters, against each HARDWARE_GB size."""
    lines = [
        "| FLUX_QUANTIZE | FLUX_TEXT_ENCODER_QUANTIZE | FLUX_OFFLOAD | weights on the GPU | expected peak | "
        + " | ".join(f"{gb} GB" for gb in HARDWARE_GB)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(HARDWARE_GB),
    ]
    for row in TABLE_ROWS:
        plan = plan_memory(architecture, dtype=torch.bfloat16, device="cuda", adapter_bytes=adapter_bytes, **row)
        fits = " | ".join("fits" if plan.peak <= gb * GB else "no" for gb in HARDWARE_GB)
        lines.append(
            f"| {row.get('quantize', 'none')} | {row.get('text_encoder_quantize', 'none')} | "
            f"{row.get('offload', 'none')} | {plan.resident / GB:.1f} GB | {plan.peak / GB:.1f} GB | {fits} |"
        )
    return lines


def hardware_table(architecture: Architecture | None = None) -> str:
    """docs/hardware.md's generated part: FLUX.1-dev's component sizes per precision and which
    configurations fit which GPU, with the default 4 GiB LoRA adapter budget, 1 GiB, and LoRAs off."""
    architecture = architecture or meta_architecture(None, None, "flux-dev")
    modules = architecture.modules
    lines = ["| component | bf16 | fp8 / fp8-weight | int8 |", "|---|---|---|---|"]
    for name in COMPONENTS:
        quantizable = name in ("transformer", "text_encoder_2")
        cells = [component_bytes(modules[name], torch.bfloat16, c) / GB for c in ("none", "fp8-weight", "int8")]
        lines.append(
            f"| {name} | {cells[0]:.2f} GB | "
            + (f"{cells[1]:.2f} GB | {cells[2]:.2f} GB |" if quantizable else "(not quantized) | (not quantized) |")
        )
    for title, adapter_bytes in (
        ("Per-request LoRAs on, the default adapter budget (FLUX_LORA_MEMORY_MAX_BYTES=4 GiB):", 4 * GIB),
        ("Per-request LoRAs on, FLUX_LORA_MEMORY_MAX_BYTES=1073741824 (1 GiB):", GIB),
        ("Per-request LoRAs off (FLUX_LORA_MAX_PER_REQUEST=0):", 0),
    ):
        lines += ["", title, "", *fit_table(architecture, adapter_bytes)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m runners.pipeline.memory",
        description="Print docs/hardware.md's table: FLUX.1-dev's memory per setting, counted on the meta device.",
    )
    parser.parse_args(argv)
    print(hardware_table(), end="")


if __name__ == "__main__":
    main()
