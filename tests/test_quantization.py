"""Quantization, offload and memory counting on the CPU: fp8's refusal, the meta-device count held
to the bytes torchao really stores, FLUX.1-dev's counts, the pre-flight's refusal with numbers (the
GPU's total memory faked), and LoRA deltas made on the compute device whatever the weights' home."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from runners.config import LoraSettings, ModelSettings
from runners.pipeline import memory, quantization
from runners.pipeline.model import load_model


def tiny_settings(tiny_dir, **fields) -> ModelSettings:
    return ModelSettings(
        model=str(tiny_dir), max_sequence_length=32, safety_checker=str(tiny_dir / "safety_checker"), **fields
    )


@pytest.fixture(scope="module")
def flux_dev():
    """FLUX.1-dev's architecture on the meta device."""
    return memory.meta_architecture(None, None, "flux-dev")


def test_fp8_is_refused_on_the_cpu_with_its_reason(tiny_dir):
    for variable, field in (("FLUX_QUANTIZE", "quantize"), ("FLUX_TEXT_ENCODER_QUANTIZE", "text_encoder_quantize")):
        with pytest.raises(quantization.QuantizationRefused) as refused:
            load_model(tiny_settings(tiny_dir, **{field: "fp8"}))
        message = str(refused.value)
        assert f"{variable}=fp8" in message and "compute capability 8.9" in message, message
        assert "the CPU" in message and "fp8-weight" in message, message  # why, and what to use instead


def test_fp8_needs_compute_capability_8_9(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(quantization.QuantizationRefused, match=r"A100-SXM4-80GB\) has compute capability 8\.0"):
        quantization.check_supported("fp8", cuda)
    quantization.check_supported("fp8-weight", cuda)  # float8 storage only: any device
    for capability in ((8, 9), (9, 0), (10, 0)):  # Ada, Hopper, Blackwell
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        quantization.check_supported("fp8", cuda)


@pytest.mark.parametrize("choice", ["none", "int8", "fp8-weight"])
def test_the_meta_device_count_is_what_the_loaded_model_holds(tiny_dir, choice):
    """The count docs/hardware.md and the pre-flight use, against torchao's real tensors."""
    model = load_model(tiny_settings(tiny_dir, dtype="bfloat16", quantize=choice, text_encoder_quantize=choice))
    architecture = memory.meta_architecture(str(tiny_dir), str(tiny_dir / "safety_checker"), None)
    choices = {"transformer": choice, "text_encoder_2": choice}
    counted = {
        name: memory.component_bytes(module, torch.bfloat16, choices.get(name, "none"))
        for name, module in architecture.modules.items()
    }
    assert counted == model.component_bytes
    if choice != "none":
        assert type(model.pipeline.transformer.transformer_blocks[0].attn.to_q.weight).__module__.startswith("torchao")


def test_flux_dev_quantized_transformer_takes_at_most_0_55_of_bf16(flux_dev):
    transformer = flux_dev.modules["transformer"]
    bf16 = memory.component_bytes(transformer, torch.bfloat16)
    assert 23.7e9 < bf16 < 23.9e9  # 11.9B parameters
    for choice in ("fp8", "fp8-weight", "int8"):
        ratio = memory.component_bytes(transformer, torch.bfloat16, choice) / bf16
        assert ratio <= 0.55, (choice, ratio)
    t5 = flux_dev.modules["text_encoder_2"]
    assert memory.component_bytes(t5, torch.bfloat16, "int8") / memory.component_bytes(t5, torch.bfloat16) <= 0.55


def test_an_impossible_fit_is_refused_with_the_numbers(tiny_dir, caplog):
    caplog.set_level(logging.INFO, logger="runners.pipeline.model")
    load_model(tiny_settings(tiny_dir, memory_limit_bytes=8 * 1024**3), LoraSettings(max_per_request=1))
    (line,) = [r.getMessage() for r in caplog.records if "expected peak" in r.getMessage()]
    assert "for 1 image at 1024x1024" in line and "LoRA adapters up to 4.29 GB" in line, line  # the start-up line
    with pytest.raises(memory.MemoryPlanError) as refused:
        load_model(tiny_settings(tiny_dir, memory_limit_bytes=2 * 1024**3), LoraSettings(max_per_request=1))
    message = str(refused.value)
    assert "cannot fit" in message and "expected peak 5.75 GB" in message and "the device has 2.15 GB" in message, (
        message
    )
    assert "FLUX_MEMORY_LIMIT_BYTES" in message and "FLUX_MEMORY_CHECK=false" in message, message
    load_model(  # the same without per-request LoRAs: no adapter budget, it fits
        tiny_settings(tiny_dir, memory_limit_bytes=2 * 1024**3), LoraSettings(max_per_request=0)
    )


def test_flux_dev_on_a_24_gb_gpu_is_refused_in_bf16_and_told_what_fits(flux_dev, monkeypatch):
    """The GPU's total memory faked: what is tested is the count and the advice."""
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=24_000_000_000, name="L4")
    )
    available, where = memory.device_memory(torch.device("cuda"), None)
    assert (available, where) == (24_000_000_000, "L4")
    common = dict(dtype=torch.bfloat16, device="cuda", adapter_bytes=4 * 1024**3)
    plan = memory.plan_memory(flux_dev, **common)
    with pytest.raises(memory.MemoryPlanError) as refused:
        memory.preflight(plan, available, where, lambda: memory.alternatives_for(flux_dev, **common))
    message = str(refused.value)
    assert "transformer 23.80 GB" in message and "text_encoder_2 9.52 GB" in message, message
    assert "the device has 24.00 GB (L4)" in message, message
    assert "FLUX_QUANTIZE=fp8-weight, FLUX_TEXT_ENCODER_QUANTIZE=int8, FLUX_OFFLOAD=model" in message, message
    fits = memory.plan_memory(flux_dev, **common, quantize="fp8", text_encoder_quantize="int8")
    assert fits.resident < 18e9  # fp8 transformer + int8 T5 on the GPU: 24 GB cards hold the weights
    memory.preflight(
        memory.plan_memory(
            flux_dev, **{**common, "adapter_bytes": 1024**3}, quantize="fp8", text_encoder_quantize="int8"
        ),
        available,
        where,
        list,
    )  # with a 1 GiB adapter budget it fits


def test_the_hardware_page_is_the_count(flux_dev):
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "hardware.md").read_text()
    assert memory.hardware_table(flux_dev) in page, "docs/hardware.md is stale: python -m runners.pipeline.memory"


def test_lora_deltas_are_made_on_the_compute_device_not_where_the_weights_wait(tiny_dir, tmp_path):
    """Offloaded weights wait in host memory while the GPU computes: adapters and deltas must be made
    on the compute device. Here the weights are on ``meta`` and the compute device is the CPU."""
    from diffusers import FluxTransformer2DModel

    from runners.lora.adapters import AdapterCache, activate, enable_lora
    from runners.lora.formats import linear_shapes
    from tests.test_lora import write_lora

    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(tiny_dir / "transformer"))
    layers = enable_lora(transformer)
    lora = write_lora(tmp_path, "a", 2, 1, linear_shapes(transformer))
    cache = AdapterCache(transformer, 2**30, 16, device=torch.device("cpu"), dtype=torch.bfloat16)
    adapter = cache.get(lora.path, lora.sha256, lora.name)
    assert {(t.device.type, t.dtype) for layer in adapter.layers.values() for t in (layer.down, layer.up)} == {
        ("cpu", torch.bfloat16)
    }
    activate(layers, [[(adapter, 1.0)]], device=torch.device("cpu"), dtype=torch.bfloat16)
    touched = [m for m in layers.values() if m.lora_down is not None]
    assert touched and all(m.lora_down.device.type == "cpu" and m.lora_up.dtype == torch.bfloat16 for m in touched)


def test_a_quantized_model_runs_uniform_lora_batches_as_deltas(tiny_dir):
    """Even in float32 (where an unquantized model fuses them): int8 weights take no delta."""
    lora = LoraSettings(max_per_request=2)
    assert load_model(tiny_settings(tiny_dir), lora).fuse_uniform_loras
    assert not load_model(tiny_settings(tiny_dir, quantize="int8"), lora).fuse_uniform_loras


def test_offload_is_refused_on_the_cpu(tiny_dir):
    from runners.pipeline.offload import OffloadRefused

    for choice in ("model", "group"):
        with pytest.raises(OffloadRefused, match=f"FLUX_OFFLOAD={choice} keeps weights in host memory"):
            load_model(tiny_settings(tiny_dir, offload=choice))


@pytest.mark.parametrize("choice", ["model", "group"])
def test_offload_hooks_leave_the_image_and_its_loras_unchanged(tiny_dir, tmp_path, choice):
    """diffusers' model offload and leaf-level group offloading (CPU to CPU here) under a hot-swapped
    LoRA and the first-block cache's split forward: the same image as without. Under model offload
    the split forward brings the transformer on itself (its first block bypasses ``forward``'s hook)."""
    from runners.lora.formats import linear_shapes
    from runners.pipeline import offload
    from runners.pipeline.inpaint import Inpainter, InpaintInputs
    from tests.conftest import scene
    from tests.test_lora import write_lora

    onloads = []

    def run(offloaded: bool):
        model = load_model(tiny_settings(tiny_dir), LoraSettings(max_per_request=2))
        lora = write_lora(tmp_path, "g", 4, 3, linear_shapes(model.pipeline.transformer))
        adapter = model.adapters.get(lora.path, lora.sha256, lora.name)
        if offloaded:
            offload.apply_offload(model.pipeline, choice, torch.device("cpu"), torch.device("cpu"))
            model.transformer = offload.transformer_backend(model.pipeline.transformer, choice)
            if choice == "group":
                assert getattr(model.pipeline.transformer.x_embedder, "_diffusers_hook", None) is not None
            else:
                hook = model.pipeline.transformer._hf_hook
                pre_forward = hook.pre_forward
                hook.pre_forward = lambda module, *a, **k: (onloads.append(module), pre_forward(module, *a, **k))[1]
        image, mask = scene(32, 32)
        inputs = InpaintInputs(
            prompt="a cat", image=image, mask=mask, width=32, height=32, seed=3, num_inference_steps=4,
            loras=[(adapter, 0.8)], acceleration="regular",
        )  # fmt: skip
        (result,) = Inpainter(model).run([inputs])
        return np.asarray(result.images[0])

    assert np.array_equal(run(True), run(False))
    if choice == "model":  # every step's split forward onloaded the transformer first
        assert len(onloads) >= 4


def test_the_device_cells_run_on_the_cpu(tiny_dir, tmp_path):
    """benchmarks/device/quantized.py's wiring, on the tiny model (the GPU run's figures come from a
    lent GPU): fp8 refused as a server refuses it, int8 against bf16, group offload with a LoRA."""
    from benchmarks.device.quantized import markdown, run_quantized_cells

    model = load_model(tiny_settings(tiny_dir))
    cells = run_quantized_cells(
        model, workdir=tmp_path, request=dict(width=32, height=32, steps=2), repeats=1, offload_steps=2, lora_rank=2
    )
    bf16, fp8, int8, group = cells
    assert bf16["status"] == "ran" and bf16["seconds_per_image"] > 0
    assert fp8["status"] == "refused" and "compute capability 8.9" in fp8["reason"]
    assert int8["status"] == "ran" and int8["transformer_bytes"] < 0.3 * bf16["transformer_bytes"]  # fp32 base
    assert int8["psnr_db_vs_bf16"] is not None and int8["max_abs_levels_vs_bf16"] > 0
    assert int8["lora_psnr_db_vs_bf16"] is not None and "lora_failed" not in int8, int8
    assert bf16["lora_psnr_db_vs_own_base"] is not None  # the LoRA moves the image
    assert group["status"] == "ran", group
    assert group["adapters_on_compute_device"] and group["max_abs_levels_vs_resident"] == 0
    assert len(markdown(cells)) == 2 + len(cells)
    assert type(model.pipeline.transformer.x_embedder.weight) is torch.nn.Parameter  # bf16 (here fp32) put back


@pytest.mark.parametrize(
    ("variable", "value"),
    [("FLUX_QUANTIZE", "int8"), ("FLUX_OFFLOAD", "group"), ("FLUX_TRANSFORMER_FILE", "/models/flux1-dev.safetensors")],
)
def test_exported_backends_refuse_torch_only_settings(monkeypatch, variable, value):
    """ONNX Runtime and TensorRT run graphs with their own weights, named by the model folder."""
    from runners.config import SettingsError, load_settings

    monkeypatch.setenv("FLUX_BACKEND", "tensorrt")
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=f"{variable}.*FLUX_BACKEND=tensorrt"):
        load_settings()
    monkeypatch.setenv("FLUX_BACKEND", "compile")
    assert load_settings().backend.backend == "compile"
