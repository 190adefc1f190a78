"""The inpainting loop measured directly (no HTTP): seconds per image, megapixels per second,
denoising steps per second, peak memory, the transformer's FLOPs and the achieved fraction of the
device's peak, and cost per megapixel against fal's $0.035/MP.

    python -m benchmarks run [--sizes square_hd,square] [--batch-sizes 1,4] [--steps 28] ...

Warm-up first, then N timed runs per matrix cell; medians and p95 over those runs. FLOPs are
counted from the model's own config at the run's token counts (74 TFLOP per step at 1024x1024
with 512 text tokens for FLUX.1-dev), so the fraction of peak needs no profiler.
"""

from __future__ import annotations

import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from .stats import percentile

FAL_PRICE_PER_MP = 0.035  # fal-ai/flux-lora/inpainting, dollars per output megapixel
# Dense bf16 tensor throughput, TFLOP/s, from the vendors' data sheets (matched by device name).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def transformer_flops(config, image_tokens: int, text_tokens: int) -> float:
    """FLOPs of one transformer forward for one sample (2 per multiply-add), from the config.
    Per token a double block runs q/k/v/out (4 d^2) and an MLP (2 * ratio * d^2) on each stream;
    a single block runs linear1 (3 + ratio) d^2 and linear2 (1 + ratio) d^2; joint attention adds
    2 N^2 d in either. Embedders and the final layer are below 0.1% and left out."""
    d = config.num_attention_heads * config.attention_head_dim
    ratio = getattr(config, "mlp_ratio", 4.0)
    tokens = image_tokens + text_tokens
    attention = 2 * tokens * tokens * d
    double = (4 + 2 * ratio) * d * d * tokens + attention
    single = (3 + ratio + 1 + ratio) * d * d * tokens + attention
    return 2.0 * (config.num_layers * double + config.num_single_layers * single)


def device_peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None  # no published figure for a CPU: the fraction is left out
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def run_cell(inpainter, model, width, height, steps, strength, batch, repeats, warmup):
    from PIL import Image

    from runners.inpaint import InpaintInputs

    image = Image.new("RGB", (width, height), (120, 140, 160))
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    requests = [InpaintInputs(prompt=f"benchmark {i}", image=image, mask=mask, width=width, height=height, seed=i,
                              num_inference_steps=steps, strength=strength, enable_safety_checker=True)
                for i in range(batch)]
    for _ in range(warmup):
        inpainter.run(requests)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds, denoise = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        results = inpainter.run(requests)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        denoise.append(results[0].timings["inference"])
    peak_memory = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return seconds, denoise, peak_memory


def main(argv: list[str] | None = None) -> dict:
    import argparse

    from runners.config import LoraSettings, ModelSettings
    from runners.inpaint import Inpainter, plan_schedule
    from runners.model import load_model
    from runners.schema import IMAGE_SIZE_PRESETS

    parser = argparse.ArgumentParser(prog="python -m benchmarks run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="FLUX_MODEL (default: the configured one, tiny)")
    parser.add_argument("--sizes", default="square_hd", help="fal presets or WxH, comma-separated")
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--steps", default="28")
    parser.add_argument("--strengths", default="0.85")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dollars-per-hour", type=float, default=2.99, help="price of the machine (default: an H100 on demand)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak, if not in the built-in table")
    parser.add_argument("--max-sequence-length", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    settings = ModelSettings(**({"model": args.model} if args.model else {}), max_sequence_length=args.max_sequence_length)
    model = load_model(settings, LoraSettings(max_per_request=0))
    inpainter = Inpainter(model)
    config = model.pipeline.transformer.config
    peak = device_peak_tflops(args.peak_tflops)
    sizes = [IMAGE_SIZE_PRESETS.get(s) or tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    results = {
        "model": settings.model, "backend": model.backend, "device": str(model.device), "dtype": str(model.dtype),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "cpu": platform.machine(),
        "torch": torch.__version__, "dollars_per_hour": args.dollars_per_hour, "peak_tflops": peak,
        "repeats": args.repeats, "cells": [],
    }
    matrix = itertools.product(sizes, [int(s) for s in args.steps.split(",")], [float(s) for s in args.strengths.split(",")],
                               [int(b) for b in args.batch_sizes.split(",")])
    for (width, height), steps, strength, batch in matrix:
        seconds, denoise, peak_memory = run_cell(inpainter, model, width, height, steps, strength, batch,
                                                 args.repeats, args.warmup)
        ran = len(plan_schedule(model.pipeline.scheduler.config, steps, strength, (width // 16) * (height // 16))[0])
        median, p95 = statistics.median(seconds), percentile(seconds, 0.95)
        megapixels = width * height / 1e6 * batch
        flops = transformer_flops(config, (width // 16) * (height // 16), args.max_sequence_length) * batch * ran
        denoise_median = statistics.median(denoise)
        cost_per_mp = args.dollars_per_hour / 3600 * median / megapixels
        cell = {
            "width": width, "height": height, "steps": steps, "strength": strength, "steps_run": ran, "batch": batch,
            "median_s": median, "p95_s": p95, "seconds_per_image": median / batch,
            "megapixels_per_s": megapixels / median, "denoise_steps_per_s": ran / denoise_median,
            "transformer_tflop": flops / 1e12, "achieved_tflops": flops / denoise_median / 1e12,
            "fraction_of_peak": (flops / denoise_median / 1e12 / peak) if peak else None,
            "peak_memory_bytes": peak_memory, "cost_per_mp": cost_per_mp, "margin_vs_fal": FAL_PRICE_PER_MP / cost_per_mp,
        }
        results["cells"].append(cell)
        print(f"{width}x{height} steps {ran}/{steps} batch {batch}: {cell['seconds_per_image']:.3f} s/image, "
              f"{cell['megapixels_per_s']:.3f} MP/s, ${cost_per_mp:.5f}/MP", flush=True)
    write(results, args.out)
    return results


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    where = (results["gpu"] or results["cpu"]).replace(" ", "-")
    name = f"loop-{Path(results['model']).name}-{results['backend']}-{where}"
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"# Inpainting loop: {results['model']} ({results['backend']}, {results['dtype']}) on {results['gpu'] or results['cpu']}",
        "", f"Medians of {results['repeats']} runs after warm-up; cost at ${results['dollars_per_hour']}/hour against fal's "
        f"${FAL_PRICE_PER_MP}/MP.", "",
        "| size | steps run | batch | s/image (median) | p95 s (batch) | MP/s | steps/s | TFLOP/s | of peak | peak memory | $/MP | x cheaper than fal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["cells"]:
        of_peak = f"{c['fraction_of_peak']:.0%}" if c["fraction_of_peak"] is not None else "n/a"
        memory = f"{c['peak_memory_bytes'] / 2**30:.1f} GiB" if c["peak_memory_bytes"] else "n/a"
        lines.append(f"| {c['width']}x{c['height']} | {c['steps_run']}/{c['steps']} | {c['batch']} | {c['seconds_per_image']:.3f} | "
                     f"{c['p95_s']:.3f} | {c['megapixels_per_s']:.3f} | {c['denoise_steps_per_s']:.2f} | "
                     f"{c['achieved_tflops']:.3f} | {of_peak} | {memory} | {c['cost_per_mp']:.5f} | {c['margin_vs_fal']:.1f} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
