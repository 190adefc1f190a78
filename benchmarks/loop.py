"""The inpainting loop measured directly (no HTTP): seconds per image, megapixels per second,
denoising steps per second, peak memory, the transformer's FLOPs and the achieved fraction of the
device's peak, and cost per megapixel against fal's $0.035/MP.

    python -m benchmarks run [--backends torch,compile] [--sizes square_hd,square] [--batch-sizes 1,4]
        [--steps 28] [--strengths 0.85] [--lora-modes none,fused,deltas,mixed] [--accelerations none,regular] ...

The matrix is backend x size x steps x strength x batch x LoRA mode x acceleration. Warm-up first,
then N timed runs per cell, interleaved across the acceleration variants of one matrix point so
that load changes hit them alike; medians and p95 over those runs. FLOPs are counted from the model's own
config at the run's token counts (74 TFLOP per step at 1024x1024 with 512 text tokens for
FLUX.1-dev), so the fraction of peak needs no profiler. Each ``regular`` cell is compared with the
``none`` cell just before it, same requests and seeds: its speed-up, the fraction of transformer
steps it skipped, and how far its pixels are from ``none``'s (mean and max absolute error in
0..255, PSNR). Every optimisation has a flag here, so a run can ablate it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from .stats import percentile

FAL_PRICE_PER_MP = 0.035  # fal-ai/flux-lora/inpainting, dollars per output megapixel
# Dense bf16 tensor throughput, TFLOP/s, from the vendors' data sheets (matched by device name).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def transformer_flops(
    config, image_tokens: int, text_tokens: int, double_blocks: int | None = None, single_blocks: int | None = None
) -> float:
    """FLOPs of one transformer forward for one sample (2 per multiply-add), from the config.
    Per token a double block runs q/k/v/out (4 d^2) and an MLP (2 * ratio * d^2) on each stream;
    a single block runs linear1 (3 + ratio) d^2 and linear2 (1 + ratio) d^2; joint attention adds
    2 N^2 d in either. Embedders and the final layer are below 0.1% and left out. ``double_blocks``
    and ``single_blocks``: count only that many (the first block alone is what a skipped step runs)."""
    d = config.num_attention_heads * config.attention_head_dim
    ratio = getattr(config, "mlp_ratio", 4.0)
    tokens = image_tokens + text_tokens
    attention = 2 * tokens * tokens * d
    double = (4 + 2 * ratio) * d * d * tokens + attention
    single = (3 + ratio + 1 + ratio) * d * d * tokens + attention
    double_blocks = config.num_layers if double_blocks is None else double_blocks
    single_blocks = config.num_single_layers if single_blocks is None else single_blocks
    return 2.0 * (double_blocks * double + single_blocks * single)


def device_peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None  # no published figure for a CPU: the fraction is left out
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


LORA_MODES = ("none", "fused", "deltas", "mixed")


def cell_requests(width, height, steps, strength, batch, acceleration, loras):
    """The same requests (prompts, seeds, image, mask) for every cell of one size and batch, so a
    ``regular`` cell can be compared with its ``none`` cell pixel for pixel."""
    from PIL import Image

    from runners.pipeline.inpaint import InpaintInputs

    image = Image.new("RGB", (width, height), (120, 140, 160))
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return [
        InpaintInputs(
            prompt=f"benchmark {i}",
            image=image,
            mask=mask,
            width=width,
            height=height,
            seed=i,
            num_inference_steps=steps,
            strength=strength,
            enable_safety_checker=True,
            acceleration=acceleration,
            loras=loras[i],
        )
        for i in range(batch)
    ]


def run_cells(cells: list, repeats: int, warmup: int) -> list:
    """``cells``: (inpainter, requests) pairs of one matrix point that differ only in acceleration.
    Their timed runs are interleaved (run 1 of each, then run 2 of each, ...), so a change in the
    machine's load during the measurement hits every variant alike and their ratio stays fair.
    Per cell: (seconds per run, denoising seconds per run, peak memory, the last run's results); and
    the graphs dynamo compiled during the timed runs (after the warm-up: 0, or a recompile)."""
    from runners.backends.compiled import graphs_compiled

    for inpainter, requests in cells:
        for _ in range(warmup):
            inpainter.run(requests)
    before = graphs_compiled()
    measured = [([], [], None, None) for _ in cells]
    for _ in range(repeats):
        for index, (inpainter, requests) in enumerate(cells):
            seconds, denoise, peak_memory, _ = measured[index]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            results = inpainter.run(requests)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                peak_memory = max(peak_memory or 0, torch.cuda.max_memory_allocated())
            seconds.append(time.perf_counter() - started)
            denoise.append(results[0].timings["inference"])
            measured[index] = (seconds, denoise, peak_memory, results)
    return measured, graphs_compiled() - before


def deviation(reference: list, images: list) -> dict:
    """How far ``images`` are from ``reference`` (same seeds), in 0..255 pixel values."""
    import numpy as np

    a = np.stack([np.asarray(i, dtype=np.float64) for i in reference])
    b = np.stack([np.asarray(i, dtype=np.float64) for i in images])
    mse = float(((a - b) ** 2).mean())
    return {
        "mean_abs_error": float(np.abs(a - b).mean()),
        "max_abs_error": float(np.abs(a - b).max()),
        "psnr_db": 10 * math.log10(255.0**2 / mse) if mse > 0 else None,
    }  # None: identical


def lora_sets(model, modes: list[str], rank: int, batch_sizes: list[int]) -> dict[str, list[list]]:
    """Per LoRA mode, each request's (adapter, scale) list: synthetic random LoRAs with the model's
    real layer shapes (benchmarks.lora.make_lora). ``fused`` and ``deltas`` give every request the
    same LoRA (fused into the weights, or as per-sample deltas: FLUX_LORA_FUSE_UNIFORM_BATCHES);
    ``mixed`` gives each request its own."""
    import tempfile

    from runners.lora.formats import linear_shapes

    from .lora import make_lora

    most = max(batch_sizes)
    sets = {"none": [[] for _ in range(most)]}
    if modes == ["none"]:
        return sets
    shapes = linear_shapes(model.pipeline.transformer)
    adapters = []
    with tempfile.TemporaryDirectory(prefix="bench-loras-") as directory:  # the adapters are read into memory
        for seed in range(most):
            path, sha = make_lora(Path(directory), shapes, rank, seed)
            adapters.append(model.adapters.get(path, sha, path.name))
    sets["fused"] = sets["deltas"] = [[(adapters[0], 1.0)] for _ in range(most)]
    sets["mixed"] = [[(adapters[i], 1.0)] for i in range(most)]
    return sets


def with_backend(model, name: str, model_settings, lora_settings, **backend):
    """A copy of ``model`` running on backend ``name``, or the reason it cannot (no artifacts, ...).
    ``name`` ``compile:blocks`` or ``compile:model``: FLUX_BACKEND=compile with that FLUX_COMPILE_SCOPE.
    ``backend``: more BackendSettings fields (compile_backend, compile_mode)."""
    from runners.config import BackendSettings, Settings
    from runners.pipeline.model import attach_backend

    name, _, scope = name.partition(":")
    if scope:
        backend["compile_scope"] = scope
    variant = dataclasses.replace(model)
    try:
        attach_backend(
            variant,
            Settings(model=model_settings, lora=lora_settings, backend=BackendSettings(backend=name, **backend)),
        )
    except Exception as exc:  # noqa: BLE001 - the reason goes into the report as the cell's result
        return None, f"{type(exc).__name__}: {exc}"
    return variant, None


def compile_seconds(inpainter, requests: list, repeats: int) -> dict:
    """How long compiling takes: ``repeats`` times, dynamo's caches reset (and inductor's on-disk
    caches off), the first run of ``requests`` timed against a warm run right after it; the
    difference is the compile. Also the graphs each compile built (dynamo's own count)."""
    import torch._dynamo
    import torch._inductor.config

    from runners.backends.compiled import graphs_compiled

    runs, graphs = [], []
    with torch._inductor.config.patch(force_disable_caches=True):
        for _ in range(repeats):
            torch._dynamo.reset()
            before = graphs_compiled()
            started = time.perf_counter()
            inpainter.run(requests)
            first = time.perf_counter() - started
            graphs.append(graphs_compiled() - before)
            started = time.perf_counter()
            inpainter.run(requests)
            runs.append(first - (time.perf_counter() - started))
    return {"compile_s": runs, "compile_median_s": statistics.median(runs), "graphs": graphs}


def main(argv: list[str] | None = None) -> dict:
    import argparse

    from runners.config import AccelerationSettings, LoraSettings, ModelSettings
    from runners.pipeline.inpaint import Inpainter
    from runners.pipeline.model import load_model
    from runners.protocol.schema import IMAGE_SIZE_PRESETS

    configured = AccelerationSettings()  # FLUX_ACCEL_*: the flags below start from the server's switches
    parser = argparse.ArgumentParser(prog="python -m benchmarks run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="FLUX_MODEL (default: the configured one, tiny)")
    parser.add_argument(
        "--backends",
        default="torch",
        help="comma-separated: torch, compile (FLUX_COMPILE_SCOPE's default, blocks), compile:blocks, "
        "compile:model, onnxruntime, tensorrt "
        "(the exported ones need `python -m export` first; else their cells are reported as skipped)",
    )
    parser.add_argument("--compile-backend", default="inductor", help="FLUX_COMPILE_BACKEND of compile backends")
    parser.add_argument("--compile-mode", default="default", help="FLUX_COMPILE_MODE of compile backends")
    parser.add_argument(
        "--compile-repeats",
        type=int,
        default=3,
        help="times each compile backend's compile is timed (dynamo reset, inductor caches off), at the "
        "first size and batch; 0: not timed",
    )
    parser.add_argument("--sizes", default="square_hd", help="fal presets or WxH, comma-separated")
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--steps", default="28")
    parser.add_argument("--strengths", default="0.85")
    parser.add_argument("--lora-modes", default="none", help=f"comma-separated: {', '.join(LORA_MODES)}")
    parser.add_argument("--lora-rank", type=int, default=16, help="rank of the synthetic LoRAs")
    parser.add_argument("--accelerations", default="none,regular", help="comma-separated: none, regular")
    parser.add_argument(
        "--accel-thresholds",
        default=f"{configured.threshold:g}",
        help="first-block cache thresholds, one regular cell each (FLUX_ACCEL_THRESHOLD)",
    )
    parser.add_argument("--accel-warmup-steps", type=int, default=configured.warmup_steps)
    parser.add_argument(
        "--accel-max-skips", type=int, default=configured.max_consecutive_skips, help="FLUX_ACCEL_MAX_CONSECUTIVE_SKIPS"
    )
    parser.add_argument(
        "--first-block-cache", choices=("on", "off"), default="on" if configured.first_block_cache else "off"
    )
    parser.add_argument("--tf32", choices=("on", "off"), default="on" if configured.tf32 else "off")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--dollars-per-hour", type=float, default=2.99, help="price of the machine (default: an H100 on demand)"
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak, if not in the built-in table")
    parser.add_argument("--max-sequence-length", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    backends = args.backends.split(",")
    lora_modes = args.lora_modes.split(",")
    accelerations = args.accelerations.split(",")
    if unknown := set(lora_modes) - set(LORA_MODES):
        parser.error(f"unknown LoRA modes {sorted(unknown)}")
    if unknown := set(accelerations) - {"none", "regular"}:
        parser.error(f"unknown accelerations {sorted(unknown)}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    settings = ModelSettings(
        **({"model": args.model} if args.model else {}), max_sequence_length=args.max_sequence_length
    )
    with_loras = lora_modes != ["none"]
    lora_settings = LoraSettings(max_per_request=4 if with_loras else 0, max_rank=max(args.lora_rank, 16))
    model = load_model(settings, lora_settings)
    loras = lora_sets(model, lora_modes, args.lora_rank, batch_sizes)
    switches = dict(
        first_block_cache=args.first_block_cache == "on",
        tf32=args.tf32 == "on",
        warmup_steps=args.accel_warmup_steps,
        max_consecutive_skips=args.accel_max_skips,
    )
    variants = [("none", None)] if "none" in accelerations else []
    if "regular" in accelerations:
        variants += [("regular", float(t)) for t in args.accel_thresholds.split(",")]
    peak = device_peak_tflops(args.peak_tflops)
    sizes = [IMAGE_SIZE_PRESETS.get(s) or tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    results = {
        "model": settings.model,
        "backend": ",".join(backends),
        "device": str(model.device),
        "dtype": str(model.dtype),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": platform.machine(),
        "torch": torch.__version__,
        "dollars_per_hour": args.dollars_per_hour,
        "peak_tflops": peak,
        "repeats": args.repeats,
        "lora_rank": args.lora_rank if with_loras else None,
        "acceleration_switches": switches,
        "compile_backend": args.compile_backend if any(b.startswith("compile") for b in backends) else None,
        "cells": [],
        "compiles": [],
        "skipped": [],
    }
    for backend in backends:
        backend_model, reason = with_backend(
            model,
            backend,
            settings,
            lora_settings,
            **(
                {"compile_backend": args.compile_backend, "compile_mode": args.compile_mode}
                if "compile" in backend
                else {}
            ),
        )
        if backend_model is None:
            results["skipped"].append({"backend": backend, "reason": reason})
            print(f"backend {backend}: skipped: {reason}", flush=True)
            continue
        if backend.startswith("compile") and args.compile_repeats > 0:
            (width, height), steps = sizes[0], int(args.steps.split(",")[0])
            timed = compile_seconds(
                Inpainter(backend_model, AccelerationSettings(**switches)),
                cell_requests(
                    width, height, steps, float(args.strengths.split(",")[0]), batch_sizes[0], "none", loras["none"]
                ),
                args.compile_repeats,
            )
            timed.update(backend=backend, width=width, height=height, batch=batch_sizes[0])
            results["compiles"].append(timed)
            print(
                f"{backend} compile at {width}x{height} batch {batch_sizes[0]}: {timed['compile_median_s']:.1f} s "
                f"(median of {args.compile_repeats}; {timed['graphs']} graphs)",
                flush=True,
            )
        inpainters = {
            (name, threshold): Inpainter(backend_model, AccelerationSettings(**switches, threshold=threshold or 0.0))
            for name, threshold in variants
        }
        matrix = itertools.product(
            sizes,
            [int(s) for s in args.steps.split(",")],
            [float(s) for s in args.strengths.split(",")],
            batch_sizes,
            lora_modes,
        )
        for point in matrix:
            results["cells"] += point_cells(backend_model, backend, inpainters, variants, loras, point, args, peak)
        if backend.startswith("compile"):
            from runners.backends.compiled import uncompile

            uncompile(model.pipeline)  # regional compilation is in place: the next backend starts eager
    write(results, args.out)
    return results


def point_cells(model, backend: str, inpainters: dict, variants: list, loras: dict, point: tuple, args, peak) -> list:
    """The cells of one matrix point: ``point`` is (size, steps, strength, batch, LoRA mode), one cell
    per acceleration variant, run interleaved (``run_cells``), each ``regular`` cell compared with the
    ``none`` cell before it. ``args``: repeats, warmup, max_sequence_length, dollars_per_hour."""
    from runners.pipeline.inpaint import plan_schedule

    (width, height), steps, strength, batch, lora_mode = point
    config = model.pipeline.transformer.config
    model.fuse_uniform_loras = lora_mode == "fused"
    reference = None
    measured, graphs_while_timed = run_cells(
        [
            (
                inpainters[(name, threshold)],
                cell_requests(width, height, steps, strength, batch, name, loras[lora_mode]),
            )
            for name, threshold in variants
        ],
        args.repeats,
        args.warmup,
    )
    cells = []
    for (acceleration, threshold), (seconds, denoise, peak_memory, outputs) in zip(variants, measured):
        ran = len(plan_schedule(model.pipeline.scheduler.config, steps, strength, (width // 16) * (height // 16))[0])
        skipped = sum(r.steps_skipped for r in outputs) / (batch * ran)
        cell = measure(
            config, args, peak, width, height, steps, strength, batch, ran, seconds, denoise, peak_memory, skipped
        )
        inpainter = inpainters[(acceleration, threshold)]
        cell.update(
            backend=backend,
            graphs_compiled_while_timed=graphs_while_timed,
            lora_mode=lora_mode,
            acceleration=acceleration,
            threshold=threshold,
            first_block_cache=acceleration == "regular" and inpainter.first_block_cache,
            tf32=acceleration == "regular" and inpainter.tf32,
        )
        images = [image for r in outputs for image in r.images]
        if acceleration == "none":
            reference = (cell, images)
        elif reference is not None:
            cell["speedup_vs_none"] = reference[0]["median_s"] / cell["median_s"]
            cell["denoise_speedup_vs_none"] = reference[0]["denoise_median_s"] / cell["denoise_median_s"]
            # best run against best run: on a shared machine the least disturbed estimate
            cell["best_speedup_vs_none"] = reference[0]["min_s"] / cell["min_s"]
            cell["best_denoise_speedup_vs_none"] = reference[0]["denoise_min_s"] / cell["denoise_min_s"]
            cell.update(deviation(reference[1], images))
        cells.append(cell)
        print(
            f"{backend} {width}x{height} steps {ran}/{steps} batch {batch} lora {lora_mode} {acceleration}"
            f"{f' @{threshold:g}' if threshold is not None else ''}: {cell['seconds_per_image']:.3f} s/image, "
            f"{cell['megapixels_per_s']:.3f} MP/s, ${cell['cost_per_mp']:.5f}/MP"
            + (
                f", {cell['speedup_vs_none']:.2f}x vs none, {skipped:.0%} steps skipped, "
                f"mean abs error {cell['mean_abs_error']:.2f}"
                if "speedup_vs_none" in cell
                else ""
            ),
            flush=True,
        )
    return cells


def measure(config, args, peak, width, height, steps, strength, batch, ran, seconds, denoise, peak_memory, skipped):
    """One cell's figures. FLOPs are the ones executed: a skipped step runs only the first block."""
    median, p95 = statistics.median(seconds), percentile(seconds, 0.95)
    megapixels = width * height / 1e6 * batch
    tokens = (width // 16) * (height // 16)
    full = transformer_flops(config, tokens, args.max_sequence_length)
    first = transformer_flops(config, tokens, args.max_sequence_length, double_blocks=1, single_blocks=0)
    flops = (full * (1 - skipped) + first * skipped) * batch * ran
    denoise_median = statistics.median(denoise)
    cost_per_mp = args.dollars_per_hour / 3600 * median / megapixels
    return {
        "width": width,
        "height": height,
        "steps": steps,
        "strength": strength,
        "steps_run": ran,
        "batch": batch,
        "median_s": median,
        "p95_s": p95,
        "min_s": min(seconds),
        "seconds_per_image": median / batch,
        "megapixels_per_s": megapixels / median,
        "denoise_median_s": denoise_median,
        "denoise_min_s": min(denoise),
        "denoise_steps_per_s": ran / denoise_median,
        "steps_skipped_fraction": skipped,
        "transformer_tflop": flops / 1e12,
        "achieved_tflops": flops / denoise_median / 1e12,
        "fraction_of_peak": (flops / denoise_median / 1e12 / peak) if peak else None,
        "peak_memory_bytes": peak_memory,
        "cost_per_mp": cost_per_mp,
        "margin_vs_fal": FAL_PRICE_PER_MP / cost_per_mp,
    }


def write(results: dict, out: Path, name: str | None = None) -> None:
    """``<name>.json`` and ``<name>.md`` in ``out``; ``name`` by default from the model, backends and device."""
    out.mkdir(parents=True, exist_ok=True)
    where = (results["gpu"] or results["cpu"]).replace(" ", "-")
    backends = results["backend"].replace(",", "+").replace(":", "-")
    name = name or f"loop-{Path(results['model']).name}-{backends}-{where}"
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    switches = results["acceleration_switches"]
    lines = [
        f"# Inpainting loop: {results['model']} ({results['backend']}, {results['dtype']}) on {results['gpu'] or results['cpu']}",
        "",
        f"Medians of {results['repeats']} runs after warm-up; cost at ${results['dollars_per_hour']}/hour against fal's "
        f"${FAL_PRICE_PER_MP}/MP. `regular`: first-block cache {'on' if switches['first_block_cache'] else 'off'} "
        f"(threshold in the column, warm-up {switches['warmup_steps']}, at most {switches['max_consecutive_skips']} "
        f"skipped in a row), TF32 switch {'on' if switches['tf32'] else 'off'} (it acts on CUDA fp32 models only: "
        "`+TF32` marks the cells where it did); speed-up and pixel error against the `none` "
        "cell above it (same requests and seeds)."
        + (f" LoRA rank {results['lora_rank']}." if results["lora_rank"] else ""),
        "",
        "| backend | size | steps run | batch | LoRA | acceleration | s/image (median) | p95 s (batch) | MP/s | steps/s "
        "| TFLOP/s | of peak | peak memory | $/MP | x cheaper than fal | speed-up: median / best run / best denoising "
        "| steps skipped | mean abs error | max abs error | PSNR |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["cells"]:
        of_peak = f"{c['fraction_of_peak']:.0%}" if c["fraction_of_peak"] is not None else "n/a"
        memory = f"{c['peak_memory_bytes'] / 2**30:.1f} GiB" if c["peak_memory_bytes"] else "n/a"
        accel = c["acceleration"] + (f" @{c['threshold']:g}" if c["threshold"] is not None else "")
        if c["acceleration"] == "regular" and not c["first_block_cache"]:
            accel += " (no cache)"
        if c.get("tf32"):
            accel += " +TF32"
        compared = "| | | | |"
        if "speedup_vs_none" in c:
            psnr = f"{c['psnr_db']:.1f} dB" if c["psnr_db"] is not None else "identical"
            compared = (
                f"| {c['speedup_vs_none']:.2f}x / {c['best_speedup_vs_none']:.2f}x / "
                f"{c['best_denoise_speedup_vs_none']:.2f}x | "
                f"{c['steps_skipped_fraction']:.0%} | {c['mean_abs_error']:.2f} | "
                f"{c['max_abs_error']:.0f} | {psnr} |"
            )
        lines.append(
            f"| {c['backend']} | {c['width']}x{c['height']} | {c['steps_run']}/{c['steps']} | {c['batch']} | "
            f"{c['lora_mode']} | {accel} | {c['seconds_per_image']:.3f} | {c['p95_s']:.3f} | "
            f"{c['megapixels_per_s']:.3f} | {c['denoise_steps_per_s']:.2f} | {c['achieved_tflops']:.3f} | "
            f"{of_peak} | {memory} | {c['cost_per_mp']:.5f} | {c['margin_vs_fal']:.1f} {compared}"
        )
    if results.get("compiles"):
        lines += [
            "",
            f"Compile time ({results['compile_backend']}; dynamo reset and inductor's caches off before each; the "
            "first run's time less a warm run's):",
            "",
            "| backend | size | batch | compile s (median) | runs | graphs | graphs compiled while its cells were timed |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['backend']} | {c['width']}x{c['height']} | {c['batch']} | {c['compile_median_s']:.1f} | "
            f"{', '.join(f'{v:.1f}' for v in c['compile_s'])} | {c['graphs'][0]} | "
            f"{sum(x.get('graphs_compiled_while_timed', 0) for x in results['cells'] if x['backend'] == c['backend'])} |"
            for c in results["compiles"]
        ]
    for s in results["skipped"]:
        lines += ["", f"Backend `{s['backend']}` skipped: {s['reason']}"]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
