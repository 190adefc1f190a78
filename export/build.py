"""Which artifacts a configuration needs, and making them: ONNX graphs (validated against torch)
and TensorRT engines built from them. ``python -m export`` and the server's backends both use
``onnx_fields``/``tensorrt_fields``, so what the exporter names is exactly what a server looks for.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

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
    """(batch, height, width): the export's own batch, then others, so dynamic axes are proven."""
    small = [(1, 32, 32), (2, 64, 48), (3, 48, 64)] if settings.model.is_tiny else [(1, 512, 512), (2, 768, 1024)]
    return small


def onnx_artifact(
    model, settings: Settings, build: bool, tolerance: float = 1e-3, progress=log.info
) -> tuple[Artifact, bool]:
    """The ONNX artifact for ``model`` under ``settings``: loaded and verified, or (``build``) made."""
    from export.networks import SPECS
    from export.onnx_export import export_onnx, validate

    store = ArtifactStore(engine_root(settings), "onnx")
    fields = onnx_fields(model, settings)
    if not build:
        return find_onnx(model, settings), True

    def make(folder: Path) -> dict[str, Any]:
        files = {}
        for name in NETWORKS:
            spec = SPECS[name]
            started = time.perf_counter()
            progress(f"exporting {name} to ONNX ...")
            path = export_onnx(spec, model, folder / f"{name}.onnx")
            exported = time.perf_counter() - started
            progress(f"exported {name} in {exported:.1f} s; validating against torch ...")
            rows = validate(spec, model, path, validation_shapes(settings), model.max_sequence_length, tolerance)
            for row in rows:
                progress(
                    f"  {name} {row.shape}: max abs {row.max_abs:.2e}, max rel {row.max_rel:.2e} "
                    f"(tolerance {row.tolerance:.0e}) {'ok' if row.ok else 'FAILED'}"
                )
            if not all(row.ok for row in rows):
                raise ValueError(f"{name}: ONNX Runtime and torch disagree past the tolerance {tolerance}")
            extra = [p.name for p in folder.iterdir() if p.name.startswith(f"{name}.onnx") and p.name != path.name]
            files[name] = {
                "file": path.name,
                "network": name,
                "inputs": list(spec.inputs_for(model)),
                "outputs": list(spec.output_names),
                "made_by": "torch.onnx.export(dynamo=True)",
                "export_seconds": round(exported, 2),
                "validation": [row.__dict__ for row in rows],
                "extra_files": extra,
            }
        return files

    return store.build(fields, make, REBUILD)


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

    return store.build(fields, make, REBUILD + " --tensorrt")
