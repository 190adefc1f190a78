"""python -m export: the transformer and the VAE (encoder, decoder) to ONNX, validated against torch,
then (``--tensorrt``) to TensorRT engines, as content-addressed artifacts the server can run from.

It reads the same FLUX_* settings as the server (model, fused LoRAs, sizes, batch sizes, precision),
so what it builds is exactly what ``FLUX_BACKEND=onnxruntime|tensorrt`` looks for. A second run with
nothing changed is a cache hit; a corrupt artifact is rebuilt. Before writing, the disk the export
needs is counted from the architecture and checked against the free space (``--estimate`` prints the
count without loading any weights). docs/export.md has what FLUX.1-dev's export takes.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export the configured FLUX model's transformer and VAE to ONNX (validated against torch) "
        "and optionally to TensorRT engines. Settings come from the FLUX_* environment, as for the server.",
    )
    parser.add_argument(
        "--tensorrt", action="store_true", help="also build TensorRT engines (needs tensorrt and a CUDA GPU)"
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest max-abs error ONNX Runtime may show against torch (default: 1e-3 for a float32 model, "
        "5e-2 for bfloat16/float16, whose torch outputs carry their own rounding)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="build nothing: check the artifacts for these settings exist and are intact",
    )
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="build nothing, load no weights: print the disk this export needs (counted from the architecture) "
        "and the free space where it would go",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from export.build import onnx_artifact, tensorrt_artifact
    from export.disk import DiskSpaceError, network_weights, tensorrt_estimate
    from runners.backends.artifacts import ArtifactError
    from runners.config import load_settings
    from runners.fetch import SafeFetcher
    from runners.pipeline.model import load_model

    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    settings = load_settings()
    if args.estimate:
        print(estimate(settings))
        return 0
    progress(f"loading {settings.model.model} ...")
    # Per-request LoRAs have no place in an export; LoRAs in FLUX_FUSED_LORAS are fused into it.
    lora = settings.lora.model_copy(update={"max_per_request": 0})
    model = load_model(settings.model, lora, fetcher=SafeFetcher.for_settings(settings))
    drop_unexported(model)
    reserve = None
    if args.tensorrt:  # the engines' disk is counted before the first ONNX byte is written
        weights = network_weights(model.pipeline.transformer.config, model.pipeline.vae.config)
        reserve = tensorrt_estimate(weights, settings.backend.export_precision)
    try:
        onnx, hit = onnx_artifact(
            model, settings, build=not args.verify, tolerance=args.tolerance, progress=progress, reserve=reserve
        )
        progress(f"ONNX artifact {onnx.path} ({'cache hit' if hit else 'built'})")
        engines = None
        if args.tensorrt:
            engines, trt_hit = tensorrt_artifact(model, settings, onnx, build=not args.verify, progress=progress)
            progress(f"TensorRT artifact {engines.path} ({'cache hit' if trt_hit else 'built'})")
    except (ArtifactError, DiskSpaceError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary(onnx, engines))
    return 0


def drop_unexported(model) -> None:
    """Free what the export never runs (text encoders, safety checker): on a GPU that is ~10 GB of
    FLUX.1-dev's 34 GB, room the validation's ONNX Runtime session needs."""
    import gc

    import torch

    for name in ("text_encoder", "text_encoder_2"):
        if getattr(model.pipeline, name, None) is not None:
            setattr(model.pipeline, name, None)
    model.safety_checker = None
    gc.collect()
    if model.device.type == "cuda":
        torch.cuda.empty_cache()


def estimate(settings) -> str:
    """The disk an export with ``settings`` needs, counted from the architecture, without weights."""
    import torch

    from export.disk import free_bytes, network_weights, onnx_estimate, tensorrt_estimate
    from runners.backends.artifacts import engine_root

    transformer, vae = architecture_configs(settings)
    weights = network_weights(transformer, vae)
    onnx = onnx_estimate(weights)
    engines = tensorrt_estimate(weights, settings.backend.export_precision)
    device = settings.model.resolved_device()
    dtype = settings.model.resolved_dtype(device)
    served = weights["transformer"] * torch.empty((), dtype=dtype).element_size()
    root = engine_root(settings)
    return "\n".join(
        [
            f"model {settings.model.model}: transformer {weights['transformer'] / 1e9:.2f}B weights, "
            f"{served / 1e9:.2f} GB in {str(dtype).removeprefix('torch.')}",
            f"ONNX (float32 graphs): {onnx.total / 1e9:.2f} GB ({onnx.describe()})",
            f"TensorRT engines ({settings.backend.export_precision}): {engines.total / 1e9:.2f} GB ({engines.describe()})",
            f"ONNX and engines: {(onnx + engines).total / 1e9:.2f} GB; free at {root}: {free_bytes(root) / 1e9:.2f} GB",
        ]
    )


def architecture_configs(settings):
    """(transformer config, VAE config) of the configured model, read without loading weights."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from runners.pipeline.model import resolve_source
    from runners.pipeline.random_model import ARCHITECTURES

    name = settings.model.random_architecture
    if name is not None:
        if name not in ARCHITECTURES:
            raise ValueError(f"random:{name}: unknown architecture; known: {', '.join(sorted(ARCHITECTURES))}")
        return ARCHITECTURES[name]["transformer"], ARCHITECTURES[name]["vae"]
    source, _ = resolve_source(settings.model)
    return (
        FluxTransformer2DModel.load_config(source, subfolder="transformer"),
        AutoencoderKL.load_config(source, subfolder="vae"),
    )


def summary(onnx, engines) -> str:
    lines = [
        "",
        "| network | file | MB | seconds | max abs error (worst shape) | status |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in onnx.manifest["files"].items():
        worst = max(entry.get("validation", []), key=lambda row: row["max_abs"], default=None)
        error = f"{worst['max_abs']:.2e} ({worst['shape']})" if worst else "-"
        status = "ok" if all(row["ok"] for row in entry.get("validation", [])) else "FAILED"
        size = entry["bytes"] + entry.get("data_bytes", 0)
        lines.append(
            f"| {name} | {entry['file']} | {size / 1e6:.1f} | {entry.get('export_seconds', '-')} | {error} | {status} |"
        )
    memory = onnx.manifest.get("memory")
    if memory:
        lines.append(
            f"\npeak host memory added by the export: {memory['peak_added'] / 1e9:.2f} GB = "
            f"{memory['peak_added_per_transformer_byte']:.2f} x the transformer's {memory['transformer_bytes'] / 1e9:.2f} GB "
            f"({memory['model_dtype']} on {memory['device']})"
        )
    if engines is not None:
        for name, entry in engines.manifest["files"].items():
            lines.append(
                f"| {name} (TensorRT) | {entry['file']} | {entry['bytes'] / 1e6:.1f} | {entry.get('build_seconds', '-')} | - | built |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
