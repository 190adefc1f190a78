"""python -m export: the transformer and the VAE (encoder, decoder) to ONNX, validated against torch,
then (``--tensorrt``) to TensorRT engines, as content-addressed artifacts the server can run from.

It reads the same FLUX_* settings as the server (model, fused LoRAs, sizes, batch sizes, precision),
so what it builds is exactly what ``FLUX_BACKEND=onnxruntime|tensorrt`` looks for. A second run with
nothing changed is a cache hit; a corrupt artifact is rebuilt.
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
        "--tolerance", type=float, default=1e-3, help="largest max-abs error ONNX Runtime may show against torch"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="build nothing: check the artifacts for these settings exist and are intact",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from export.build import onnx_artifact, tensorrt_artifact
    from runners.backends.artifacts import ArtifactError
    from runners.config import load_settings
    from runners.fetch import SafeFetcher
    from runners.pipeline.model import load_model

    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    settings = load_settings()
    progress(f"loading {settings.model.model} ...")
    # Per-request LoRAs have no place in an export; LoRAs in FLUX_FUSED_LORAS are fused into it.
    lora = settings.lora.model_copy(update={"max_per_request": 0})
    model = load_model(settings.model, lora, fetcher=SafeFetcher.for_settings(settings))
    try:
        onnx, hit = onnx_artifact(model, settings, build=not args.verify, tolerance=args.tolerance, progress=progress)
        progress(f"ONNX artifact {onnx.path} ({'cache hit' if hit else 'built'})")
        engines = None
        if args.tensorrt:
            engines, trt_hit = tensorrt_artifact(model, settings, onnx, build=not args.verify, progress=progress)
            progress(f"TensorRT artifact {engines.path} ({'cache hit' if trt_hit else 'built'})")
    except (ArtifactError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary(onnx, engines))
    return 0


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
        lines.append(
            f"| {name} | {entry['file']} | {entry['bytes'] / 1e6:.1f} | {entry.get('export_seconds', '-')} | {error} | {status} |"
        )
    if engines is not None:
        for name, entry in engines.manifest["files"].items():
            lines.append(
                f"| {name} (TensorRT) | {entry['file']} | {entry['bytes'] / 1e6:.1f} | {entry.get('build_seconds', '-')} | - | built |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
