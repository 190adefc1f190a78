"""Export artifacts: content addressing, cache hits, corruption, the disk check, the ONNX Runtime
backend, and the export at FLUX.1-dev's widths (``random:flux-dev-2block``) on the CPU in bf16."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    assert manifest["files"]["net"]["data_bytes"] == 7


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
        [sys.executable, "-m", "export", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def export_main(monkeypatch, capsys, env, *args) -> tuple[int, str, str]:
    """``python -m export`` run in this process (export.__main__.main, what the module runs) with
    ``env`` in its environment: (exit status, stdout, stderr). No interpreter and imports to start."""
    from export.__main__ import main

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def export_env(tiny_onnx, tmp_path_factory):
    """The settings (FLUX_* environment) under which `python -m export` and a server look for the
    session's export of the tiny model (conftest's tiny_onnx) and find it."""
    settings, _, _ = tiny_onnx
    return {
        "HF_HUB_OFFLINE": "1",
        "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("export-cache")),
        "FLUX_CACHE_DIR": str(settings.model.cache_dir),
        "FLUX_ENGINE_DIR": str(settings.backend.engine_dir),
        "FLUX_MAX_SEQUENCE_LENGTH": "32",
    }


def onnxruntime_settings(tiny_onnx):
    """The session's tiny-model settings with FLUX_BACKEND=onnxruntime."""
    settings, _, _ = tiny_onnx
    return settings.model_copy(update={"backend": settings.backend.model_copy(update={"backend": "onnxruntime"})})


def test_cli_finds_the_export_of_the_same_settings_as_a_cache_hit(export_env, tiny_onnx, monkeypatch, capsys):
    """`python -m export` with the settings the session's build was made under (in-process, by the
    exporter's own build) names the same artifact: a cache hit, nothing exported, its validation in
    the table. The CLI building and validating one: test_the_scaled_export_runs_on_the_cpu_in_bf16...."""
    _, artifact, _ = tiny_onnx
    assert run_export(export_env, "--help").returncode == 0
    again = run_export(export_env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "cache hit" in again.stdout and "exporting" not in again.stdout and str(artifact.path) in again.stdout
    assert "| transformer |" in again.stdout and "FAILED" not in again.stdout
    other = {**export_env, "FLUX_MAX_SEQUENCE_LENGTH": "48"}
    status, _, err = export_main(monkeypatch, capsys, other, "--verify")
    assert status == 1 and "no onnx artifact" in err  # another configuration, another artifact


def test_cli_detects_a_corrupt_graph(export_env, tiny_onnx, monkeypatch, capsys):
    _, artifact, _ = tiny_onnx
    graph = artifact.file("vae_decoder")
    original = graph.read_bytes()
    middle = len(original) // 2
    with open(graph, "r+b") as handle:
        handle.seek(middle)
        handle.write(bytes(byte ^ 0xFF for byte in original[middle : middle + 4]))
    try:
        status, _, err = export_main(monkeypatch, capsys, export_env, "--verify")
        assert status == 1 and "vae_decoder" in err and "corrupt" in err, err
    finally:
        # The damaged bytes put back rather than a re-export (the rebuild of a corrupt artifact is
        # test_a_corrupt_artifact_is_detected_and_rebuilt's): the session's other tests serve from it.
        graph.write_bytes(original)


def test_onnxruntime_backend_images_match_torch(tiny_onnx, tiny_model):
    """The loop on the exported graphs, against the same loop on torch, same seed."""
    from runners.pipeline.inpaint import Inpainter, InpaintInputs
    from runners.pipeline.model import attach_backend, load_model
    from tests.conftest import scene

    settings = onnxruntime_settings(tiny_onnx)
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
    expected = Inpainter(tiny_model).run([request])[0].images[0]
    onnx_model = load_model(settings.model)
    attach_backend(onnx_model, settings)
    assert type(onnx_model.transformer).__name__ == "OnnxTransformer"
    got = Inpainter(onnx_model).run([request, InpaintInputs(**{**request.__dict__, "seed": 6})])[0].images[0]
    assert np.abs(pixels(got) - pixels(expected)).max() <= 2  # stated tolerance: 2 levels of 255

    # acceleration "regular" on the real ONNX Runtime transformer: one graph, no first-block cache, so
    # it runs as "none" (docs/benchmarks.md), even with a threshold that would skip every step it may.
    from runners.config import AccelerationSettings

    alone = Inpainter(onnx_model).run([request])[0].images[0]
    eager_skips = Inpainter(tiny_model, AccelerationSettings(threshold=10.0))
    regular_request = InpaintInputs(**{**request.__dict__, "acceleration": "regular"})
    assert eager_skips.run([regular_request])[0].steps_skipped > 0  # the same settings do skip on torch
    regular = Inpainter(onnx_model, AccelerationSettings(threshold=10.0)).run([regular_request])[0]
    assert regular.steps_skipped == 0
    assert np.array_equal(pixels(regular.images[0]), pixels(alone))


def test_backends_refuse_what_they_cannot_do(tiny_onnx):
    from runners.config import LoraSettings
    from runners.pipeline.model import attach_backend, load_model

    settings = onnxruntime_settings(tiny_onnx)
    with_loras = load_model(settings.model, LoraSettings(max_per_request=4))
    with pytest.raises(RuntimeError, match="FLUX_LORA_MAX_PER_REQUEST=0"):
        attach_backend(with_loras, settings)
    unexported = settings.model_copy(update={"model": settings.model.model_copy(update={"max_sequence_length": 40})})
    with pytest.raises(ArtifactError, match="python -m export"):
        attach_backend(load_model(unexported.model), unexported)
    trt = settings.model_copy(update={"backend": settings.backend.model_copy(update={"backend": "tensorrt"})})
    with pytest.raises(RuntimeError, match="TensorRT engines cannot be built or run here"):
        attach_backend(load_model(trt.model), trt)


def test_the_service_runs_on_onnxruntime_and_matches_torch(export_env, tiny_model, tmp_path):
    """A real `bentoml serve` with FLUX_BACKEND=onnxruntime; its image against the torch path in-process."""
    import asyncio
    import base64
    import io

    import httpx
    from PIL import Image

    from runners.config import ImageLimits
    from runners.front.preparation import prepare_job
    from runners.pipeline.inpaint import Inpainter
    from runners.protocol.schema import InpaintRequest
    from runners.worker.adaptive import run_jobs
    from tests.conftest import bentoml_server

    body = {
        **json.loads((REPO / "examples" / "request.json").read_text()),
        "num_inference_steps": 8,
        "output_format": "png",
        "sync_mode": True,
    }
    env = {
        **{name: export_env[name] for name in ("FLUX_CACHE_DIR", "FLUX_ENGINE_DIR", "FLUX_MAX_SEQUENCE_LENGTH")},
        "FLUX_BACKEND": "onnxruntime",
        "FLUX_LORA_MAX_PER_REQUEST": "0",
    }
    with bentoml_server(tmp_path, **env) as (base, log_path):
        response = httpx.post(f"{base}/fal-ai/flux-lora/inpainting", json=body, timeout=120)
        assert response.status_code == 200, response.text
        assert "backend onnxruntime" in log_path.read_text()
    served = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]["url"].split(",", 1)[1])))
    job = asyncio.run(prepare_job(InpaintRequest(**body), ImageLimits(), "torch"))
    (result,) = run_jobs(Inpainter(tiny_model), [job])
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
    assert compiled_model.lora_rank_buckets == (16,) and compiled_model.backend == "compile"
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


# -- the disk, counted before writing -----------------------------------------------------------------------

# FLUX.1-dev's disk per precision, counted from its architecture on the meta device (docs/export.md's table).
FLUX_DEV_DISK_GB = {"onnx": 48.14, "fp32": 51.14, "bf16": 25.97, "fp16": 25.97, "fp8": 13.39}


def test_the_disk_flux_dev_needs_is_counted_from_its_architecture():
    from export.disk import network_weights, onnx_estimate, tensorrt_estimate
    from runners.pipeline.random_model import FLUX_DEV

    weights = network_weights(FLUX_DEV["transformer"], FLUX_DEV["vae"])
    assert weights["transformer"] == 11_901_408_320  # tests/test_random_model.py: the published count
    assert weights["vae_encoder"] + weights["vae_decoder"] == 83_819_683
    got = {"onnx": onnx_estimate(weights).total}
    got.update({p: tensorrt_estimate(weights, p).total for p in ("fp32", "bf16", "fp16", "fp8")})
    assert {k: round(v / 1e9, 2) for k, v in got.items()} == FLUX_DEV_DISK_GB
    assert got["onnx"] + got["bf16"] > 64 * 2**30  # why the device box's 64 GiB disk is refused up front


def test_estimate_without_weights_names_the_numbers(monkeypatch, capsys, tmp_path):
    from export.__main__ import main

    monkeypatch.setenv("FLUX_MODEL", "random:flux-dev")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert main(["--estimate"]) == 0
    out = capsys.readouterr().out
    assert f"ONNX (float32 graphs): {FLUX_DEV_DISK_GB['onnx']:.2f} GB" in out
    assert f"TensorRT engines (bf16): {FLUX_DEV_DISK_GB['bf16']:.2f} GB" in out
    assert "transformer 11.90B weights" in out


def test_a_too_small_disk_is_refused_before_anything_is_written(monkeypatch, capsys, tmp_path):
    """`python -m export` with a target whose free space is faked: refused with both numbers, and
    the engine folder holds nothing afterwards (no temporary folder, no half-written graph)."""
    import export.disk
    from export.__main__ import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("FLUX_MAX_SEQUENCE_LENGTH", "32")
    monkeypatch.setattr(export.disk, "free_bytes", lambda path: 1_000_000)
    exported = []
    monkeypatch.setattr("export.onnx_export.export_onnx", lambda *a, **k: exported.append(a))
    assert main([]) == 1
    err = capsys.readouterr().err
    assert "not enough disk" in err and "needs 0." in err and "0.00 GB is free" in err, err
    assert "nothing was written" in err and not exported
    engines = tmp_path / "flux-inpaint" / "engines"
    assert not engines.exists() or not any(engines.rglob("*"))


# -- ONNX Runtime on the model's device ----------------------------------------------------------------------


def test_onnxruntime_without_its_cuda_provider_is_refused_for_a_cuda_model(tiny_onnx, monkeypatch):
    """The check runs without a GPU: the model's device is set to CUDA and the providers are faked."""
    import onnxruntime
    import torch

    from runners.backends import onnx_runtime
    from runners.pipeline.model import attach_backend, load_model

    settings = onnxruntime_settings(tiny_onnx)
    model = load_model(settings.model)
    model.device = torch.device("cuda", 0)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="no CUDA provider.*pip install onnxruntime-gpu"):
        attach_backend(model, settings)
    # With the provider there, the session is asked for it on the model's GPU (the CPU only as fallback).
    asked = []

    class Session:
        def __init__(self, path, sess_options, providers):
            asked.append(providers)

        def get_providers(self):
            return ["CPUExecutionProvider"]  # as when onnxruntime-gpu cannot load CUDA's libraries

    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(onnxruntime, "InferenceSession", Session)
    with pytest.raises(RuntimeError, match="could not start its CUDA provider"):
        onnx_runtime.OnnxSession(settings.model.cache_dir / "x.onnx", "cuda:1")
    assert asked == [[("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]]


def test_an_export_of_a_cuda_model_without_the_cuda_provider_is_refused_before_writing(
    tiny_model, tmp_path, monkeypatch
):
    """Validation runs on the model's device; without ONNX Runtime's CUDA provider the export of a
    CUDA model stops before its first graph, naming the package (device and providers faked)."""
    import onnxruntime
    import torch

    import export.networks
    from export.build import onnx_artifact
    from runners.config import Settings

    monkeypatch.setattr(export.networks, "module_device", lambda module: torch.device("cuda", 0))
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    settings = Settings.model_validate(
        {
            "model": {"max_sequence_length": 32, "cache_dir": str(tmp_path / "cache")},
            "backend": {"engine_dir": str(tmp_path / "engines")},
        }
    )
    with pytest.raises(RuntimeError, match="no CUDA provider.*pip install onnxruntime-gpu"):
        onnx_artifact(tiny_model, settings, build=True, progress=lambda _: None)
    assert not (tmp_path / "engines").exists()


def test_onnxruntime_steps_bind_tensors_in_place(tiny_onnx, tiny_model, monkeypatch):
    """IO binding: each input is bound by its address on the model's device, and the output is the
    very torch tensor ONNX Runtime wrote into (no numpy round trip)."""
    import torch

    from runners.backends.artifacts import find_onnx
    from runners.backends.onnx_runtime import OnnxSession

    settings, _, _ = tiny_onnx
    model = tiny_model
    session = OnnxSession(find_onnx(model, settings).file("vae_decoder"), "cpu")
    bound = []
    real = session.session.io_binding

    def spying():
        binding = real()
        original_input, original_output = binding.bind_input, binding.bind_output
        binding.bind_input = lambda *a: bound.append(("in", *a)) or original_input(*a)
        binding.bind_output = lambda *a: bound.append(("out", *a)) or original_output(*a)
        return binding

    monkeypatch.setattr(session.session, "io_binding", spying)
    monkeypatch.setattr(session.session, "run", None)  # the plain run (numpy in, numpy out) is never used
    latents = torch.randn(2, 16, 4, 6)
    images = session((2, 3, 32, 48), latents=latents)
    (inputs, outputs) = [b for b in bound if b[0] == "in"], [b for b in bound if b[0] == "out"]
    assert inputs == [("in", "latents", "cpu", 0, np.float32, (2, 16, 4, 6), latents.data_ptr())]
    assert outputs == [("out", "images", "cpu", 0, np.float32, (2, 3, 32, 48), images.data_ptr())]
    with torch.inference_mode():
        expected = model.pipeline.vae.decode(latents, return_dict=False)[0]
    torch.testing.assert_close(images, expected, atol=1e-3, rtol=1e-3)


# -- FLUX.1-dev's widths, on the CPU in bf16 -------------------------------------------------------------------

# The export adds at most this many bytes of host memory per byte of the served transformer: the
# validating ONNX Runtime session holds the float32 graph (2x a bf16 transformer) and its arena; the
# export itself adds ~0.45x here (the graph and twice the largest weight, one written at a time: a
# constant, not a share of the model). docs/export.md scales it to FLUX.1-dev.
PEAK_MULTIPLE = 2.5
SCALED = {
    "FLUX_MODEL": "random:flux-dev-2block",
    "FLUX_DTYPE": "bfloat16",
    "FLUX_DEVICE": "cpu",
    # Validated at the profile's smallest shape, B1 32x32: what 64x64 proves, for a quarter of the
    # bf16 VAE's convolutions on the CPU (the served test below runs 64x64 on the same graphs).
    "FLUX_EXPORT_SIZES": "64x64,32x32",
    "FLUX_EXPORT_BATCH_SIZES": "1,2",
    "FLUX_MAX_SEQUENCE_LENGTH": "16",
}


@pytest.fixture(scope="module", autouse=True)
def scaled_export_started(request, tmp_path_factory):
    """`python -m export` of random:flux-dev-2block, started in the background as this module
    begins, when a selected test needs it: its minute and more of mostly single-threaded tracing and
    writing runs beside the module's other tests instead of after them. Yields (environment, the
    process, its output folder) or None."""
    selected = [item for item in request.session.items if getattr(item, "module", None) is request.module]
    if not any("scaled_export" in item.fixturenames for item in selected):
        yield None
        return
    folder = tmp_path_factory.mktemp("scaled")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(folder / "cache"), **SCALED}
    with open(folder / "stdout", "w") as stdout, open(folder / "stderr", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "export"], cwd=REPO, env=env, stdout=stdout, stderr=stderr, text=True
        )
    try:
        yield env, process, folder
    finally:
        if process.poll() is None:  # a run stopped early: no export left behind
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def scaled_export(scaled_export_started):
    """`python -m export` of random:flux-dev-2block (FLUX.1-dev's widths, 1 + 1 blocks, the real VAE)
    in bf16 on the CPU, once it has finished: (environment, manifest, artifact folder, its stdout)."""
    env, process, folder = scaled_export_started
    process.wait(timeout=600)
    stdout, stderr = (folder / "stdout").read_text(), (folder / "stderr").read_text()
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    root = Path(env["XDG_CACHE_HOME"]) / "flux-inpaint" / "engines"
    (artifact,) = root.glob("onnx-*")
    return env, json.loads((artifact / "manifest.json").read_text()), artifact, stdout


def test_the_scaled_export_runs_on_the_cpu_in_bf16_within_its_memory_multiple(scaled_export):
    """The CLI's build, end to end: exported, validated, in the table, within its memory multiple."""
    _, manifest, folder, stdout = scaled_export
    assert "exporting transformer to ONNX" in stdout and "(built)" in stdout
    assert "| transformer |" in stdout and "| vae_decoder |" in stdout and "FAILED" not in stdout
    memory = manifest["memory"]
    assert memory["model_dtype"] == "bfloat16" and memory["device"] == "cpu" and memory["peak_reset_per_stage"]
    assert 1.0e9 < memory["transformer_bytes"] < 1.2e9  # ~1 GB in bf16, as the issue asks
    print("peak added", memory["peak_added"] / 1e9, "GB =", memory["peak_added_per_transformer_byte"], "x")
    assert memory["peak_added"] <= PEAK_MULTIPLE * memory["transformer_bytes"], memory
    # Exporting (as opposed to validating) adds well under one transformer: no copy of the network.
    exporting = manifest["files"]["transformer"]["memory"]["export"]["rss_added"]
    assert exporting < 0.75 * memory["transformer_bytes"], manifest["files"]["transformer"]["memory"]
    for name, entry in manifest["files"].items():
        # validated once, at the smallest shape of the profile (batch 1, 32x32), on the CPU's provider
        assert [(row["shape"], row["provider"], row["ok"]) for row in entry["validation"]] == [
            ("B1 32x32", "CPUExecutionProvider", True)
        ]
        on_disk = entry["bytes"] + entry.get("data_bytes", 0)
        estimate = manifest["disk_estimate"][f"{name}.onnx"]
        assert on_disk <= estimate <= on_disk * 1.02 + 64 * 2**20, (name, on_disk, estimate)
    assert manifest["files"]["transformer"]["data_files"]  # 2.2 GB of float32: external data
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_the_served_onnxruntime_backend_on_the_scaled_model_matches_torch(scaled_export, monkeypatch):
    """The worker's own loading path (load_inpainter: load_model, attach_backend) with
    FLUX_BACKEND=onnxruntime, run in-process rather than behind `bentoml serve` (which would load a
    second 1.5 GB model in another process on this 2-core machine), against the same pipeline's torch
    modules on the same job. Stated tolerance for a bf16 model against its float32 graph: mean 2 and
    99th percentile 12 levels of 255 (measured 0.8 and 6; the float32 tiny model matches within 2)."""
    import asyncio
    import dataclasses
    import io

    from PIL import Image

    from runners.backends.eager import TorchTransformer, TorchVae
    from runners.config import ImageLimits, load_settings
    from runners.front.preparation import prepare_job
    from runners.pipeline.inpaint import Inpainter
    from runners.protocol.schema import InpaintRequest
    from runners.worker.adaptive import run_jobs
    from runners.worker.loading import load_inpainter

    env, _, _, _ = scaled_export
    for name in ("XDG_CACHE_HOME", *SCALED):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("FLUX_BACKEND", "onnxruntime")
    monkeypatch.setenv("FLUX_LORA_MAX_PER_REQUEST", "0")
    monkeypatch.setenv("FLUX_WARMUP", "false")
    settings = load_settings()
    served = load_inpainter(settings)
    model = served.model
    assert type(model.transformer).__name__ == "OnnxTransformer" and type(model.vae).__name__ == "OnnxVae"
    body = {
        **json.loads((REPO / "examples" / "request.json").read_text()),
        "num_inference_steps": 4,
        "output_format": "png",
        "image_size": {"width": 64, "height": 64},
    }
    job = asyncio.run(prepare_job(InpaintRequest(**body), ImageLimits(), "scaled"))
    (got,) = run_jobs(served, [job])
    eager = dataclasses.replace(
        model, transformer=TorchTransformer(model.pipeline.transformer), vae=TorchVae(model.pipeline.vae)
    )
    (expected,) = run_jobs(Inpainter(eager, settings.acceleration), [job])
    assert got.error is None and expected.error is None
    a, b = (pixels(Image.open(io.BytesIO(r.images[0].data))) for r in (got, expected))
    difference = np.abs(a.astype(int) - b.astype(int))
    print(
        f"ORT vs torch (bf16): mean {difference.mean():.2f}, p99 {np.percentile(difference, 99):.0f}, max {difference.max()}"
    )
    assert a.shape == (64, 64, 3) and difference.mean() <= 2 and np.percentile(difference, 99) <= 12
