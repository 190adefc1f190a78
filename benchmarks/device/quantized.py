"""The device run's cells for quantized and offloaded FLUX (docs/hardware.md): at the default fal
request (1024x1024, 28 steps, strength 0.85), the transformer in bf16, ``fp8`` (torchao float8
dynamic activation + weight) and ``int8`` (weight-only): seconds per image, the peak of allocated
GPU memory, the transformer's bytes, and the pixel error of each against bf16 on the same seed
(PSNR, mean and largest absolute difference in 8-bit levels), also with a hot-swapped LoRA (its
error against bf16 with the same LoRA, and how far the LoRA moves each base's image: a LoRA that
comes out weaker on a quantized base shows there); then group offload's cost (the
transformer offloaded leaf by leaf, a few steps, with a hot-swapped LoRA): seconds per step against
resident bf16's, the peak, whether the LoRA adapters and deltas sit on the GPU, and the image's
difference from the resident one.

    from benchmarks.device.quantized import run_quantized_cells
    cells = run_quantized_cells(model, workdir=..., deadline=...)   # model: runners' FluxModel, bf16

Every transformer measured is built afresh from one host copy of the bf16 weights, so each cell
holds only its own transformer on the GPU; a plain bf16 resident transformer is put back at the
end. Run these cells last in the plan (they replace the model's transformer, and any compiled
variant of it). With ``random:flux-dev`` the weights are random: the pixel errors say how far each
precision moves this architecture's output, not how FLUX.1-dev's images look.

On the CPU (``--smoke``, the tiny model) ``fp8`` is refused with its reason, as a server refuses it,
and the offload cell offloads to the CPU itself: the wiring runs, the figures mean nothing.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_REQUEST = dict(width=1024, height=1024, steps=28, strength=0.85)


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else 10 * float(np.log10(255.0**2 / mse))


def pixel_error(image: np.ndarray, reference: np.ndarray) -> dict:
    difference = np.abs(image.astype(np.int16) - reference.astype(np.int16))
    return {
        "psnr_db_vs_bf16": psnr(image, reference),  # None: identical
        "mean_abs_levels_vs_bf16": float(difference.mean()),
        "max_abs_levels_vs_bf16": int(difference.max()),
    }


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def requests_for(width, height, steps, strength, loras=()):
    from PIL import Image

    from runners.pipeline.inpaint import InpaintInputs

    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return [
        InpaintInputs(
            prompt="a small wooden garden shed on the lawn",
            image=Image.new("RGB", (width, height), (120, 140, 100)),
            mask=mask,
            width=width,
            height=height,
            seed=42,
            num_inference_steps=steps,
            strength=strength,
            enable_safety_checker=False,
            loras=list(loras),
        )
    ]


def measure(model, requests, repeats: int) -> dict:
    """One warm-up run, then ``repeats`` timed: median seconds, the peak allocated, the last image."""
    from runners.pipeline.inpaint import Inpainter

    inpainter = Inpainter(model)
    inpainter.run(requests)
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        (result,) = inpainter.run(requests)
        sync()
        seconds.append(time.perf_counter() - started)
    return {
        "median_s": statistics.median(seconds),
        "peak_allocated_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "image": np.asarray(result.images[0]),
    }


def fresh_transformer(config, host: dict, device: torch.device, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(config)
    transformer.load_state_dict({k: v.to(device=device, dtype=dtype, copy=True) for k, v in host.items()}, assign=True)
    return transformer.eval().requires_grad_(False)


def install(model, transformer, backend_class=None) -> None:
    """Make ``transformer`` the one the loop runs, alone on the GPU."""
    from runners.backends.eager import TorchTransformer

    model.pipeline.transformer = transformer
    model.transformer = (backend_class or TorchTransformer)(transformer)
    model.lora_layers = model.adapters = None
    model.lora_rank_buckets = None
    model.fuse_uniform_loras = False
    model.quantize = "none"
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_quantized_cells(
    model,
    *,
    workdir: Path,
    deadline: float | None = None,
    request: dict | None = None,
    repeats: int = 2,
    offload_steps: int = 4,
    lora_rank: int = 16,
) -> list[dict]:
    """The cells, in order: bf16, fp8, int8 (each: s/image, peak, bytes, pixel error against bf16),
    then group offload (s/step against resident bf16's, with a hot-swapped LoRA). ``deadline``
    (time.monotonic()): a cell predicted to overrun it is listed as not run."""
    from runners.pipeline import quantization

    request = {**DEFAULT_REQUEST, **(request or {})}
    width, height, steps, strength = request["width"], request["height"], request["steps"], request["strength"]
    device, dtype = model.device, model.dtype
    config = model.pipeline.transformer.config
    started = time.perf_counter()
    host = {k: v.detach().to("cpu", copy=True) for k, v in model.pipeline.transformer.state_dict().items()}
    copy_s = time.perf_counter() - started
    install(model, fresh_transformer(config, host, device, dtype))
    cells: list[dict] = []
    base_requests = requests_for(width, height, steps, strength)
    reference = reference_lora = None
    run_s = None
    lora_file = None

    def out_of_time(estimate: float) -> str | None:
        if deadline is None or time.monotonic() + estimate < deadline:
            return None
        return f"time budget: needs ~{estimate:.0f} s, {max(0.0, deadline - time.monotonic()):.0f} s left"

    for choice in ("none", "fp8", "int8"):
        cell = {"cell": f"{'bf16' if choice == 'none' else choice} {width}x{height} {steps} steps", "quantize": choice}
        cells.append(cell)
        estimate = (repeats + 1) * (run_s or 0.0) + 2 * copy_s
        if (why := out_of_time(estimate)) is not None:
            cell.update(status="not run", reason=why)
            continue
        try:
            quantization.check_supported(choice, device)
            if choice != "none":
                install(model, fresh_transformer(config, host, device, dtype))
                began = time.perf_counter()
                quantization.quantize(model.pipeline.transformer, choice)
                sync()
                cell["quantize_s"] = time.perf_counter() - began
            cell["transformer_bytes"] = quantization.module_bytes(model.pipeline.transformer)
            figures = measure(model, base_requests, repeats)
        except quantization.QuantizationRefused as exc:
            cell.update(status="refused", reason=str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - one failed cell must not cost the others' figures
            cell.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:2000])
            continue
        image = figures.pop("image")
        cell.update(status="ran", seconds_per_image=figures["median_s"], **figures)
        if choice == "none":
            reference, run_s = image, figures["median_s"]
        elif reference is not None:
            cell.update(pixel_error(image, reference))
        # The same request with a hot-swapped LoRA (deltas in the compute dtype beside this base):
        # its error against bf16 with the LoRA, and how far the LoRA moves the image (its strength).
        try:
            lora_file = lora_file or lora_for(model.pipeline.transformer, workdir, lora_rank)
            with_lora = lora_image(model, lora_file, lora_rank, width, height, steps, strength)
            cell["lora_psnr_db_vs_own_base"] = psnr(with_lora, image)
            if choice == "none":
                reference_lora = with_lora
            elif reference_lora is not None:
                cell.update({f"lora_{k}": v for k, v in pixel_error(with_lora, reference_lora).items()})
        except Exception as exc:  # noqa: BLE001
            cell["lora_failed"] = f"{type(exc).__name__}: {exc}"[:2000]
    cells.append(offload_cell(model, config, host, workdir, offload_steps, lora_rank, (width, height), out_of_time))
    install(model, fresh_transformer(config, host, device, dtype))  # as the run found it: bf16, resident
    return cells


def lora_for(transformer, workdir: Path, rank: int):
    from benchmarks.lora import make_lora
    from runners.lora.formats import linear_shapes

    return make_lora(Path(workdir), linear_shapes(transformer), rank, seed=7)


def lora_image(model, lora_file, rank: int, width, height, steps, strength) -> np.ndarray:
    """One run of the request with ``lora_file`` hot-swapped onto the model's current transformer."""
    from runners.lora.adapters import AdapterCache, enable_lora
    from runners.pipeline.inpaint import Inpainter

    path, sha = lora_file
    model.lora_layers = enable_lora(model.pipeline.transformer)
    model.adapters = AdapterCache(model.pipeline.transformer, 4 * 1024**3, rank, device=model.device, dtype=model.dtype)
    adapter = model.adapters.get(path, sha, "quantized-check")
    (result,) = Inpainter(model).run(requests_for(width, height, steps, strength, loras=[(adapter, 1.0)]))
    model.adapters = None
    return np.asarray(result.images[0])


def offload_cell(model, config, host, workdir, steps, lora_rank, size, out_of_time) -> dict:
    """Group offload of the transformer (leaf level, CUDA stream prefetch) with one hot-swapped LoRA:
    seconds per step against the resident bf16 transformer's on the same request, the peak, where
    the adapters and deltas live, and the image's difference from the resident one."""
    from benchmarks.lora import make_lora
    from runners.lora.adapters import AdapterCache, activate, deactivate, enable_lora
    from runners.lora.formats import linear_shapes

    width, height = size
    device, dtype = model.device, model.dtype
    cell = {"cell": f"group offload {width}x{height} {steps} steps, LoRA rank {lora_rank}", "offload": "group"}
    if (why := out_of_time(60.0)) is not None:
        return {**cell, "status": "not run", "reason": why}
    try:
        figures = {}
        for where in ("resident", "group"):
            home = device if where == "resident" else torch.device("cpu")
            transformer = fresh_transformer(config, host, home, dtype)
            layers = enable_lora(transformer)
            if where == "group":
                from diffusers.hooks import apply_group_offloading

                streams = device.type == "cuda"
                apply_group_offloading(
                    transformer,
                    onload_device=device,
                    offload_device=torch.device("cpu"),
                    offload_type="leaf_level",
                    use_stream=streams,
                    non_blocking=streams,
                )
            install(model, transformer)
            model.lora_layers = layers
            model.adapters = AdapterCache(transformer, 4 * 1024**3, lora_rank, device=device, dtype=dtype)
            path, sha = make_lora(Path(workdir), linear_shapes(transformer), lora_rank, seed=7)
            adapter = model.adapters.get(path, sha, "offload-check")
            activate(layers, [[(adapter, 1.0)]], device=device, dtype=dtype)
            deltas = {
                (m.lora_down.device.type, str(m.lora_down.dtype)) for m in layers.values() if m.lora_down is not None
            }
            deactivate(layers)
            adapters = {
                (t.device.type, str(t.dtype)) for layer in adapter.layers.values() for t in (layer.down, layer.up)
            }
            requests = requests_for(width, height, steps, 1.0, loras=[(adapter, 1.0)])
            measured = measure(model, requests, 1)
            figures[where] = dict(measured, adapters=sorted(adapters), deltas=sorted(deltas))
        resident, group = figures["resident"], figures["group"]
        cell.update(
            status="ran",
            seconds_per_step=group["median_s"] / steps,
            resident_seconds_per_step=resident["median_s"] / steps,
            cost_vs_resident=group["median_s"] / resident["median_s"],
            peak_allocated_bytes=group["peak_allocated_bytes"],
            resident_peak_allocated_bytes=resident["peak_allocated_bytes"],
            adapters_on=group["adapters"],
            deltas_on=group["deltas"],
            adapters_on_compute_device=all(d == device.type for d, _ in group["adapters"] + group["deltas"]),
            **{k.replace("bf16", "resident"): v for k, v in pixel_error(group["image"], resident["image"]).items()},
        )
    except Exception as exc:  # noqa: BLE001
        cell.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:2000])
    return cell


def markdown(cells: list[dict]) -> list[str]:
    """Lines for the device run's report."""
    lines = [
        "| cell | status | s/image (s/step) | peak allocated | transformer | PSNR vs bf16 | max levels "
        "| with a LoRA: PSNR vs bf16 + LoRA | the LoRA's own effect (PSNR vs no LoRA) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        timing = c.get("seconds_per_image") or c.get("seconds_per_step")
        peak = c.get("peak_allocated_bytes")
        nbytes = c.get("transformer_bytes")
        lines.append(
            f"| {c['cell']} | {c['status']}{': ' + c['reason'][:120] if 'reason' in c else ''} | "
            f"{'' if timing is None else f'{timing:.3f}'} | {'' if peak is None else f'{peak / 1e9:.1f} GB'} | "
            f"{'' if nbytes is None else f'{nbytes / 1e9:.2f} GB'} | "
            f"{c.get('psnr_db_vs_bf16', c.get('psnr_db_vs_resident', ''))} | "
            f"{c.get('max_abs_levels_vs_bf16', c.get('max_abs_levels_vs_resident', ''))} | "
            f"{c.get('lora_psnr_db_vs_bf16', '')} | {c.get('lora_psnr_db_vs_own_base', '')} |"
        )
    return lines
