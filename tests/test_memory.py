"""Memory at FLUX's size, checked on the CPU: loading straight onto the device, and the room a
uniform-LoRA fuse counts on a GPU (the CUDA calls faked: what is tested is the arithmetic)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from runners.config import ModelSettings
from runners.lora import adapters


def test_the_model_loads_straight_onto_its_device(tiny_dir, monkeypatch):
    """``device_map``: the weights go from the files to the device; the pipeline is never loaded on
    the host and then moved (``.to``), which for FLUX.1-dev would be a 33 GB host copy first."""
    from diffusers import FluxInpaintPipeline

    from runners.pipeline.model import load_model

    calls = {}
    load = FluxInpaintPipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls["device_map"] = kwargs.get("device_map")
        return load(cls, *args, **kwargs)

    def refuse(self, *args, **kwargs):
        raise AssertionError("the loaded pipeline was moved to its device afterwards")

    monkeypatch.setattr(FluxInpaintPipeline, "from_pretrained", classmethod(spy))
    monkeypatch.setattr(FluxInpaintPipeline, "to", refuse)
    model = load_model(ModelSettings(model=str(tiny_dir), max_sequence_length=16))
    assert calls["device_map"] == "cpu"
    assert model.pipeline.hf_device_map is not None
    assert all(p.device.type == "cpu" for p in model.pipeline.transformer.parameters())


def fake_cuda_layers(nbytes: int) -> tuple[dict, list]:
    weight = SimpleNamespace(device=torch.device("cuda"), numel=lambda: nbytes // 2, element_size=lambda: 2)
    layer = SimpleNamespace(weight=weight)
    adapter = SimpleNamespace(layers={"block.to_q": object()})
    return {"block.to_q": layer}, [(adapter, 1.0)]


def test_a_fuse_counts_the_allocators_cached_blocks_as_room(monkeypatch):
    layers, loras = fake_cuda_layers(1000)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (600, 10_000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 5_000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 4_000)
    assert adapters.fuse_fits(layers, loras)  # 600 free + 1,000 cached > 1.5 x 1,000
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 4_500)
    assert not adapters.fuse_fits(layers, loras)  # 600 + 500 < 1,500: deltas instead
