"""Export artifacts: content addressing, cache hits, corruption, and the ONNX Runtime backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from runners.backends.artifacts import ArtifactError, ArtifactStore, artifact_key, model_identity
from tests.conftest import REPO, pixels

FIELDS = {"model": "abc", "text_tokens": 32, "format": 1}


def make_files(folder):
    (folder / "net.onnx").write_bytes(b"graph")
    (folder / "net.onnx.data").write_bytes(b"weights")
    return {"net": {"file": "net.onnx", "extra_files": ["net.onnx.data"]}}


def test_second_build_is_a_cache_hit_and_a_change_makes_a_new_artifact(tmp_path):
    store = ArtifactStore(tmp_path, "onnx")
    made = []
    first, hit = store.build(FIELDS, lambda f: made.append(1) or make_files(f), "rebuild it")
    assert not hit and first.path.name == f"onnx-{artifact_key(FIELDS)}"
    again, hit = store.build(FIELDS, lambda f: made.append(1) or make_files(f), "rebuild it")
    assert hit and again.path == first.path and made == [1]
    other, hit = store.build({**FIELDS, "text_tokens": 64}, make_files, "rebuild it")
    assert not hit and other.path != first.path
    manifest = json.loads((first.path / "manifest.json").read_text())
    assert manifest["fields"] == FIELDS and manifest["files"]["net"]["bytes"] == 5
    assert set(manifest["files"]["net"]["data_files"]) == {"net.onnx.data"}


@pytest.mark.parametrize("damaged", ["net.onnx", "net.onnx.data", "manifest.json"])
def test_a_corrupt_artifact_is_detected_and_rebuilt(tmp_path, damaged):
    store = ArtifactStore(tmp_path, "onnx")
    artifact, _ = store.build(FIELDS, make_files, "rebuild it")
    with open(artifact.path / damaged, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ArtifactError, match="corrupt"):
        store.load(FIELDS, "rebuild it")
    rebuilt, hit = store.build(FIELDS, make_files, "rebuild it")
    assert not hit and store.load(FIELDS, "rebuild it").path == rebuilt.path


def test_missing_and_foreign_artifacts_are_refused_with_the_fix(tmp_path):
    store = ArtifactStore(tmp_path, "onnx")
    with pytest.raises(ArtifactError, match="no onnx artifact.*run python -m export"):
        store.load(FIELDS, "run python -m export")
    artifact, _ = store.build(FIELDS, make_files, "x")
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    manifest["fields"]["model"] = "someone-else"
    (artifact.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="foreign"):
        store.load(FIELDS, "x")


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    store = ArtifactStore(tmp_path, "onnx")

    def failing(folder):
        make_files(folder)
        raise ValueError("validation failed")

    with pytest.raises(ValueError):
        store.build(FIELDS, failing, "x")
    assert list(tmp_path.iterdir()) == []


def test_model_identity_follows_file_contents(tmp_path):
    model = tmp_path / "model"
    (model / "transformer").mkdir(parents=True)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"a" * 100)
    first = model_identity(model, tmp_path / "cache")
    memo = tmp_path / "cache" / "file-digests.json"
    written = memo.stat().st_mtime_ns
    assert model_identity(model, tmp_path / "cache") == first
    assert memo.stat().st_mtime_ns == written  # nothing new: the memo is not rewritten
    weights.write_bytes(b"b" * 100)
    os.utime(weights, ns=(1, 1))  # even with a different mtime the content decides
    assert model_identity(model, tmp_path / "cache") != first


def run_export(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "export", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def export_env(tmp_path_factory):
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("export-cache")),
        "FLUX_MAX_SEQUENCE_LENGTH": "32",
    }


@pytest.fixture(scope="module")
def exported(export_env):
    result = run_export(export_env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_cli_exports_validates_and_hits_the_cache(export_env, exported):
    assert "exporting transformer to ONNX" in exported.stdout and "built" in exported.stdout
    assert "| transformer |" in exported.stdout and "FAILED" not in exported.stdout
    assert run_export(export_env, "--help").returncode == 0
    again = run_export(export_env)
    assert again.returncode == 0 and "cache hit" in again.stdout and "exporting" not in again.stdout
    other = run_export({**export_env, "FLUX_MAX_SEQUENCE_LENGTH": "48"}, "--verify")
    assert other.returncode == 1 and "no onnx artifact" in other.stderr  # another configuration, another artifact


def test_cli_detects_a_corrupt_graph(export_env, exported, tmp_path):
    root = os.path.join(export_env["XDG_CACHE_HOME"], "flux-inpaint", "engines")
    (folder,) = [os.path.join(root, d) for d in os.listdir(root) if d.startswith("onnx-")]
    graph = os.path.join(folder, "vae_decoder.onnx")
    original = open(graph, "rb").read()
    with open(graph, "r+b") as handle:
        handle.seek(len(original) // 2)
        handle.write(b"\xff\xff\xff\xff")
    verify = run_export(export_env, "--verify")
    assert verify.returncode == 1 and "vae_decoder" in verify.stderr and "corrupt" in verify.stderr
    rebuilt = run_export(export_env)
    assert rebuilt.returncode == 0 and "built" in rebuilt.stdout
    assert run_export(export_env, "--verify").returncode == 0


def test_onnxruntime_backend_images_match_torch(export_env, exported, tiny_dir):
    """The loop on the exported graphs, against the same loop on torch, same seed."""
    from pathlib import Path

    from runners.config import Settings
    from runners.pipeline.inpaint import Inpainter, InpaintInputs
    from runners.pipeline.model import attach_backend, load_model
    from tests.conftest import scene

    cache = Path(export_env["XDG_CACHE_HOME"]) / "flux-inpaint"
    settings = Settings.model_validate(
        {"model": {"cache_dir": cache, "max_sequence_length": 32}, "backend": {"backend": "onnxruntime"}}
    )
    image, mask = scene()
    request = InpaintInputs(
        prompt="a house",
        image=image,
        mask=mask,
        width=64,
        height=48,
        seed=5,
        num_inference_steps=6,
        enable_safety_checker=False,
    )
    torch_model = load_model(settings.model)
    expected = Inpainter(torch_model).run([request])[0].images[0]
    onnx_model = load_model(settings.model)
    attach_backend(onnx_model, settings)
    assert type(onnx_model.transformer).__name__ == "OnnxTransformer"
    got = Inpainter(onnx_model).run([request, InpaintInputs(**{**request.__dict__, "seed": 6})])[0].images[0]
    assert np.abs(pixels(got) - pixels(expected)).max() <= 2  # stated tolerance: 2 levels of 255

    # acceleration "regular" on the real ONNX Runtime transformer: one graph, no first-block cache, so
    # it runs as "none" (docs/benchmarks.md), even with a threshold that would skip every step it may.
    from runners.config import AccelerationSettings

    alone = Inpainter(onnx_model).run([request])[0].images[0]
    eager_skips = Inpainter(torch_model, AccelerationSettings(threshold=10.0))
    regular_request = InpaintInputs(**{**request.__dict__, "acceleration": "regular"})
    assert eager_skips.run([regular_request])[0].steps_skipped > 0  # the same settings do skip on torch
    regular = Inpainter(onnx_model, AccelerationSettings(threshold=10.0)).run([regular_request])[0]
    assert regular.steps_skipped == 0
    assert np.array_equal(pixels(regular.images[0]), pixels(alone))


def test_backends_refuse_what_they_cannot_do(export_env, exported):
    from pathlib import Path

    from runners.config import LoraSettings, Settings
    from runners.pipeline.model import attach_backend, load_model

    cache = Path(export_env["XDG_CACHE_HOME"]) / "flux-inpaint"
    settings = Settings.model_validate(
        {"model": {"cache_dir": cache, "max_sequence_length": 32}, "backend": {"backend": "onnxruntime"}}
    )
    with_loras = load_model(settings.model, LoraSettings(max_per_request=4))
    with pytest.raises(RuntimeError, match="FLUX_LORA_MAX_PER_REQUEST=0"):
        attach_backend(with_loras, settings)
    unexported = Settings.model_validate(
        {"model": {"cache_dir": cache, "max_sequence_length": 40}, "backend": {"backend": "onnxruntime"}}
    )
    with pytest.raises(ArtifactError, match="python -m export"):
        attach_backend(load_model(unexported.model), unexported)
    trt = Settings.model_validate(
        {"model": {"cache_dir": cache, "max_sequence_length": 32}, "backend": {"backend": "tensorrt"}}
    )
    with pytest.raises(RuntimeError, match="TensorRT engines cannot be built or run here"):
        attach_backend(load_model(trt.model), trt)


def test_the_service_runs_on_onnxruntime_and_matches_torch(export_env, exported, tmp_path):
    """A real `bentoml serve` with FLUX_BACKEND=onnxruntime; its image against the torch path in-process."""
    import asyncio
    import base64
    import io
    from pathlib import Path

    import httpx
    from PIL import Image

    from runners.config import ImageLimits, ModelSettings
    from runners.front.preparation import prepare_job
    from runners.pipeline.inpaint import Inpainter
    from runners.pipeline.model import load_model
    from runners.protocol.schema import InpaintRequest
    from runners.worker.batch import run_jobs
    from tests.conftest import bentoml_server

    body = {
        **json.loads((REPO / "examples" / "request.json").read_text()),
        "num_inference_steps": 8,
        "output_format": "png",
        "sync_mode": True,
    }
    env = {
        "XDG_CACHE_HOME": export_env["XDG_CACHE_HOME"],
        "FLUX_MAX_SEQUENCE_LENGTH": "32",
        "FLUX_BACKEND": "onnxruntime",
        "FLUX_LORA_MAX_PER_REQUEST": "0",
    }
    with bentoml_server(tmp_path, **env) as (base, log_path):
        response = httpx.post(f"{base}/fal-ai/flux-lora/inpainting", json=body, timeout=120)
        assert response.status_code == 200, response.text
        assert "backend onnxruntime" in log_path.read_text()
    served = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]["url"].split(",", 1)[1])))
    cache = Path(export_env["XDG_CACHE_HOME"]) / "flux-inpaint"
    torch_model = load_model(ModelSettings(cache_dir=cache, max_sequence_length=32))
    job = asyncio.run(prepare_job(InpaintRequest(**body), ImageLimits(), "torch"))
    (result,) = run_jobs(Inpainter(torch_model), [job])
    expected = Image.open(io.BytesIO(result.images[0].data))
    assert np.abs(pixels(served) - pixels(expected)).max() <= 2  # stated tolerance: 2 levels of 255


def test_compile_backend_serves_the_same_images_as_eager(tiny_dir):
    """FLUX_BACKEND=compile: torch.compile of the transformer (inductor; ~1 minute here), LoRAs on."""
    import torch._dynamo

    from runners.config import Settings
    from runners.pipeline.inpaint import Inpainter, InpaintInputs
    from runners.pipeline.model import attach_backend, load_model
    from tests.conftest import scene

    settings = Settings.model_validate(
        {
            "model": {
                "model": str(tiny_dir),
                "max_sequence_length": 32,
                "safety_checker": str(tiny_dir / "safety_checker"),
            },
            "backend": {"backend": "compile"},
            "lora": {"max_per_request": 2, "max_rank": 8},
        }
    )
    image, mask = scene()
    requests = [
        InpaintInputs(
            prompt="a house",
            image=image,
            mask=mask,
            width=64,
            height=48,
            seed=seed,
            num_inference_steps=3,
            enable_safety_checker=False,
        )
        for seed in (1, 2)
    ]
    eager = Inpainter(load_model(settings.model, settings.lora)).run(requests)
    compiled_model = load_model(settings.model, settings.lora)
    attach_backend(compiled_model, settings)
    assert compiled_model.lora_pad_to == 16 and compiled_model.backend == "compile"
    torch._dynamo.reset()
    try:
        compiled = Inpainter(compiled_model).run(requests)
    finally:
        torch._dynamo.reset()
    for a, b in zip(eager, compiled):
        assert np.abs(pixels(a.images[0]) - pixels(b.images[0])).max() <= 2


def test_a_random_architecture_is_identified_by_its_name_without_a_download(tmp_path):
    from runners.backends.artifacts import model_digest

    first, again = model_digest("random:flux-dev", tmp_path), model_digest("random:flux-dev", tmp_path)
    assert first == again and first != model_digest("random:other", tmp_path)
