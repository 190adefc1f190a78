"""Which artifacts a configuration needs, and making them: ONNX graphs (validated against torch)
and TensorRT engines built from them. ``python -m export`` and the server's backends both use
``onnx_fields``/``tensorrt_fields``, so what the exporter names is exactly what a server looks for.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from export.disk import DiskEstimate
from runners.backends.artifacts import (
    NETWORKS,
    REBUILD,
    Artifact,
    ArtifactStore,
    engine_root,
    find_onnx,
    find_tensorrt,
    onnx_fields,
    tensorrt_fields,
)
from runners.config import Settings

log = logging.getLogger(__name__)


def validation_shapes(settings: Settings) -> list[tuple[int, int, int]]:
    """(batch, height, width) to validate at. The tiny model: three shapes unlike the export example
    (B2 64x48), so its dynamic axes are proven. Any other model: the smallest shape of the
    configured optimisation profile only (the smallest batch size at the smallest size), so that
    validating a 12B transformer costs one small forward each in torch and in ONNX Runtime."""
    if settings.model.is_tiny:
        return [(1, 32, 32), (2, 64, 48), (3, 48, 64)]
    height, width = min(settings.backend.pixel_sizes(), key=lambda hw: (hw[0] * hw[1], hw))
    return [(min(settings.backend.export_batch_sizes), height, width)]


def architecture_weights(model) -> dict[str, int]:
    """Weights per exported network, counted from the model's architecture on the meta device."""
    from export.disk import network_weights

    return network_weights(model.pipeline.transformer.config, model.pipeline.vae.config)


def onnx_artifact(
    model,
    settings: Settings,
    build: bool,
    tolerance: float | None = None,
    progress=log.info,
    *,
    reserve: DiskEstimate | None = None,
) -> tuple[Artifact, bool]:
    """The ONNX artifact for ``model`` under ``settings``: loaded and verified, or (``build``) made.
    Before anything is written the disk it needs (plus ``reserve``: the engines to build after it)
    is checked against the free space. ``tolerance``: None for the model dtype's default."""
    from export.disk import check_disk, onnx_estimate
    from export.memory import PeakMemory
    from export.networks import SPECS, module_device, transformer_module
    from export.onnx_export import default_tolerance, export_onnx, validate
    from runners.backends.onnx_runtime import session_providers

    store = ArtifactStore(engine_root(settings), "onnx")
    fields = onnx_fields(model, settings)
    if not build:
        return find_onnx(model, settings), True
    tolerance = default_tolerance(model.dtype) if tolerance is None else tolerance
    weights = architecture_weights(model)
    needed = onnx_estimate(weights) + (reserve or DiskEstimate())
    transformer_bytes = sum(t.numel() * t.element_size() for t in transformer_module(model).state_dict().values())
    device = module_device(transformer_module(model))
    extra: dict[str, Any] = {}

    def prepare() -> None:
        session_providers(device)  # validation on a GPU model needs ONNX Runtime's CUDA provider: refuse now
        free = check_disk(store.root, needed)
        progress(f"disk: this export needs {needed.total / 1e9:.2f} GB ({needed.describe()}); {free / 1e9:.2f} GB free")

    def make(folder: Path) -> dict[str, Any]:
        files = {}
        stages = []
        with PeakMemory(device) as whole:
            for name in NETWORKS:
                spec = SPECS[name]
                started = time.perf_counter()
                progress(f"exporting {name} to ONNX ...")
                with PeakMemory(device) as exporting:
                    path = export_onnx(spec, model, folder / f"{name}.onnx")
                exported = time.perf_counter() - started
                progress(f"exported {name} in {exported:.1f} s; validating against torch ...")
                with PeakMemory(device) as validating:
                    rows = validate(
                        spec, model, path, validation_shapes(settings), model.max_sequence_length, tolerance
                    )
                for row in rows:
                    progress(
                        f"  {name} {row.shape} on {row.provider or '-'}: max abs {row.max_abs:.2e}, "
                        f"max rel {row.max_rel:.2e} (tolerance {row.tolerance:.0e}) {'ok' if row.ok else 'FAILED'}"
                    )
                if not all(row.ok for row in rows):
                    raise ValueError(f"{name}: ONNX Runtime and torch disagree past the tolerance {tolerance}")
                extra_files = [
                    p.name for p in folder.iterdir() if p.name.startswith(f"{name}.onnx") and p.name != path.name
                ]
                memory = {"export": exporting.result.as_dict(), "validation": validating.result.as_dict()}
                stages += [exporting.result, validating.result]
                files[name] = {
                    "file": path.name,
                    "network": name,
                    "inputs": list(spec.inputs_for(model)),
                    "outputs": list(spec.output_names),
                    "made_by": "torch.onnx.export(dynamo=True) of a meta twin, weights bound lazily",
                    "graph_dtype": "float32",
                    "export_seconds": round(exported, 2),
                    "validation_seconds": round(time.perf_counter() - started - exported, 2),
                    "validation": [row.__dict__ for row in rows],
                    "memory": memory,
                    "extra_files": extra_files,
                }
                progress(
                    f"{name}: host memory added at peak {exporting.result.added / 1e9:.2f} GB exporting, "
                    f"{validating.result.added / 1e9:.2f} GB validating"
                )
        # Each stage restarts the high-water mark, so the run's peak is the highest stage's; measured
        # from the resident set before the first export, it also catches memory one stage leaves behind.
        peak = max(stage.peak for stage in stages) - whole.result.start
        cuda_peaks = [stage.cuda_peak for stage in stages if stage.cuda_peak is not None]
        extra["memory"] = {
            "model_dtype": str(model.dtype).removeprefix("torch."),
            "device": str(device),
            "transformer_bytes": transformer_bytes,
            "rss_before_export": whole.result.start,
            "rss_peak": max(stage.peak for stage in stages),
            "peak_added": peak,
            "peak_added_per_transformer_byte": round(peak / transformer_bytes, 3),
            "peak_reset_per_stage": whole.result.reset,  # False: peaks are the process's lifetime peak
            **({"cuda_peak": max(cuda_peaks)} if cuda_peaks else {}),
        }
        extra["disk_estimate"] = needed.files
        return files

    return store.build(fields, make, REBUILD, prepare=prepare, extra=extra)


def tensorrt_artifact(
    model, settings: Settings, onnx: Artifact, build: bool, progress=log.info
) -> tuple[Artifact, bool]:
    """TensorRT engines for the ONNX artifact, one per network, with the configured profiles."""
    from export.networks import SPECS
    from export.tensorrt_build import EngineRequest, build_engine
    from runners.backends.tensorrt_engine import tensorrt_available

    available, detail = tensorrt_available()
    if not available:
        raise RuntimeError(f"TensorRT engines cannot be built or run here: {detail}")
    store = ArtifactStore(engine_root(settings), "tensorrt")
    fields = tensorrt_fields(onnx, settings, detail)
    if not build:
        return find_tensorrt(model, settings, onnx), True
    sizes = settings.backend.pixel_sizes()
    batches = settings.backend.export_batch_sizes

    def prepare() -> None:
        from export.disk import check_disk, tensorrt_estimate

        needed = tensorrt_estimate(architecture_weights(model), settings.backend.export_precision)
        free = check_disk(store.root, needed)
        progress(f"disk: the engines need {needed.total / 1e9:.2f} GB ({needed.describe()}); {free / 1e9:.2f} GB free")

    def make(folder: Path) -> dict[str, Any]:
        files = {}
        for name in NETWORKS:
            profile = SPECS[name].profile(model, sizes, batches, model.max_sequence_length)
            started = time.perf_counter()
            engine = build_engine(
                EngineRequest(
                    onnx_path=onnx.file(name),
                    engine_path=folder / f"{name}.plan",
                    profiles=[profile],
                    precision=settings.backend.export_precision,
                    refittable=True,
                    workspace_bytes=None,
                ),
                log=progress,
            )
            files[name] = {
                "file": engine.name,
                "network": name,
                "made_by": f"TensorRT {detail}",
                "profile": {k: [list(s) for s in v] for k, v in profile.items()},
                "build_seconds": round(time.perf_counter() - started, 1),
            }
        return files

    return store.build(fields, make, REBUILD + " --tensorrt", prepare=prepare)
