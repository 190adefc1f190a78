"""LoRAs at run time on the tiny model: deltas, fusing, mixed batches, the adapter cache, compile."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from runners.config import FetchSettings, LoraSettings, ModelSettings
from runners.fetch import HostPolicy, SafeFetcher
from runners.lora.adapters import AdapterCache, activate, deactivate, fuse, set_rows, unfuse
from runners.lora.sources import LoraSourceError
from runners.pipeline.inpaint import Inpainter
from runners.pipeline.model import load_model
from runners.protocol.jobs import JobLora
from runners.worker.adaptive import run_jobs
from tests.conftest import BATCH_ROUNDING_LEVELS, LocalHandler, local_http_server, pixels, scene
from tests.test_batch import decoded, job

TARGETS = [
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.1.ff.net.2",
    "single_transformer_blocks.0.proj_out",
    "single_transformer_blocks.1.attn.to_v",
    "transformer_blocks.0.norm1.linear",
]


def write_lora(directory: Path, name: str, rank: int, seed: int, shapes: dict, targets=TARGETS, alpha=None) -> JobLora:
    """A diffusers-format LoRA file for the tiny model; strong enough to change the image."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in targets:
        fan_in, fan_out = shapes[module]
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.5
        tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.5
        if alpha is not None:
            tensors[f"transformer.{module}.alpha"] = torch.tensor(float(alpha))
    path = directory / f"{name}.safetensors"
    save_file(tensors, path)
    return JobLora(path=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest(), scale=1.0, name=name)


@pytest.fixture(scope="module")
def lora_model(tiny_dir):
    settings = ModelSettings(
        model=str(tiny_dir), max_sequence_length=32, safety_checker=str(tiny_dir / "safety_checker")
    )
    return load_model(settings, LoraSettings(max_per_request=4, max_rank=16, memory_max_bytes=64 * 1024**2))


@pytest.fixture(scope="module")
def lora_inpainter(lora_model):
    return Inpainter(lora_model)


@pytest.fixture(scope="module")
def shapes(lora_model):
    from runners.lora.formats import linear_shapes

    return linear_shapes(lora_model.pipeline.transformer)


@pytest.fixture(scope="module")
def loras(tmp_path_factory, shapes):
    directory = tmp_path_factory.mktemp("loras")
    return {
        "style": write_lora(directory, "style", 4, 1, shapes, alpha=8),
        "face": write_lora(directory, "face", 2, 2, shapes, targets=TARGETS[:3]),
        "product": write_lora(directory, "product", 8, 3, shapes, targets=TARGETS[2:]),
    }


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.pipeline.transformer.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def adapters_for(model, *entries):
    return [(model.adapters.get(Path(lora.path), lora.sha256, lora.name), scale) for lora, scale in entries]


def test_deltas_equal_the_hand_computed_weight_sum(lora_model, loras):
    layers = lora_model.lora_layers
    name = TARGETS[0]
    module = layers[name]
    request = adapters_for(lora_model, (loras["style"], 0.7), (loras["face"], -1.3))
    x = torch.randn(2, 5, module.in_features)
    expected_weight = module.weight.detach().clone()
    for adapter, scale in request:
        layer = adapter.layers[name]
        expected_weight += scale * layer.multiplier * layer.up @ layer.down
    assert request[0][0].layers[name].multiplier == 2.0  # alpha 8 / rank 4
    activate(layers, [request, []])  # second request: no LoRA
    set_rows(layers, torch.tensor([0, 1]))
    try:
        with torch.no_grad():
            out = module(x)
        expected = torch.nn.functional.linear(x, expected_weight, module.bias)
        plain = torch.nn.functional.linear(x, module.weight, module.bias)
    finally:
        deactivate(layers)
    assert torch.allclose(out[0], expected[0], atol=1e-5)
    assert torch.equal(out[1], plain[1])  # the other sample gets no delta at all


def test_fused_output_equals_delta_output(lora_model, lora_inpainter, loras, tmp_path):
    from runners.pipeline.inpaint import InpaintInputs

    image, mask = scene()
    request = adapters_for(lora_model, (loras["style"], 0.8), (loras["product"], 0.5))
    inputs = InpaintInputs(
        prompt="a house",
        image=image,
        mask=mask,
        width=64,
        height=48,
        seed=3,
        num_inference_steps=4,
        enable_safety_checker=False,
        loras=request,
    )
    before = weights_digest(lora_model)
    shipped = lora_model.fuse_uniform_loras
    assert shipped  # the default, chosen by benchmarks/lora.py
    try:
        lora_model.fuse_uniform_loras = False
        delta = lora_inpainter.run([inputs])[0].images[0]
        lora_model.fuse_uniform_loras = True
        fused = lora_inpainter.run([inputs])[0].images[0]
    finally:
        lora_model.fuse_uniform_loras = shipped
    plain = lora_inpainter.run([InpaintInputs(**{**inputs.__dict__, "loras": []})])[0].images[0]
    assert np.abs(pixels(delta) - pixels(fused)).max() <= 2
    assert np.abs(pixels(delta) - pixels(plain)).max() > 10  # the LoRA does change the image
    assert weights_digest(lora_model) == before  # fused, then put back bit for bit


def test_a_requests_image_is_the_same_alone_or_in_a_mixed_lora_batch(lora_model, lora_inpainter, loras):
    style = [job("alone", seed=5)]
    style[0].loras.append(loras["style"].model_copy(update={"scale": 0.9}))
    alone = run_jobs(lora_inpainter, style)[0]
    mixed_jobs = [job("face", seed=6), job("style", seed=5), job("none", seed=7), job("both", seed=8)]
    mixed_jobs[0].loras.append(loras["face"])
    mixed_jobs[1].loras.append(loras["style"].model_copy(update={"scale": 0.9}))
    mixed_jobs[3].loras.extend([loras["product"], loras["face"].model_copy(update={"scale": -0.5})])
    mixed = run_jobs(lora_inpainter, mixed_jobs)
    assert all(r.error is None for r in mixed)
    assert np.abs(decoded(mixed[1]) - decoded(alone)).max() <= BATCH_ROUNDING_LEVELS
    plain = run_jobs(lora_inpainter, [job("plain", seed=7)])[0]
    assert np.abs(decoded(mixed[2]) - decoded(plain)).max() <= BATCH_ROUNDING_LEVELS  # no LoRA leaks into its neighbour


def test_base_weights_bit_identical_after_any_sequence(lora_model, lora_inpainter, loras, tmp_path):
    before = weights_digest(lora_model)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    sequence = [
        [loras["style"]],
        [loras["face"], loras["product"]],
        [],
        [JobLora(path=str(bad), sha256="0" * 64, scale=1, name="bad")],
    ]
    jobs = []
    for index, job_loras in enumerate(sequence):
        j = job(f"j{index}", seed=index)
        j.loras.extend(job_loras)
        jobs.append(j)
    results = run_jobs(lora_inpainter, jobs) + run_jobs(lora_inpainter, jobs[:2])
    assert [r.error is None for r in results] == [True, True, True, False, True, True]
    assert weights_digest(lora_model) == before
    assert all(m.lora_down is None for m in lora_model.lora_layers.values())


def test_a_lora_that_fails_to_load_changes_nothing(lora_model, lora_inpainter, loras, tmp_path, shapes):
    cache = lora_model.adapters
    run_jobs(lora_inpainter, [job("warm", seed=1, **{})])
    cached = list(cache._adapters)
    too_big = write_lora(tmp_path, "rank32", 32, 9, shapes)  # over max_rank 16
    broken = job("broken", seed=1)
    broken.loras.extend([loras["style"], too_big])
    fine = job("fine", seed=2)
    fine.loras.append(loras["face"])
    before = weights_digest(lora_model)
    results = run_jobs(lora_inpainter, [broken, fine])
    assert results[0].error.status == 422 and results[0].error.error_type == "lora_load_error"
    assert results[0].error.detail[0]["loc"] == ["body", "loras", 1, "path"]
    assert "rank 32" in results[0].error.detail[0]["msg"]
    assert results[1].error is None
    assert weights_digest(lora_model) == before
    assert too_big.sha256 not in cache._adapters and set(cached) <= set(cache._adapters) | {loras["face"].sha256}


def test_adapter_cache_evicts_least_recently_used_within_budget(lora_model, loras):
    transformer = lora_model.pipeline.transformer
    one = AdapterCache(transformer, max_bytes=10**9, max_rank=16)
    sizes = {k: one.get(Path(lora.path), lora.sha256, k).nbytes for k, lora in loras.items()}
    cache = AdapterCache(transformer, max_bytes=sizes["style"] + sizes["product"] + 1, max_rank=16)
    for key in ("style", "face"):
        cache.get(Path(loras[key].path), loras[key].sha256, key)
    cache.get(Path(loras["style"].path), loras["style"].sha256, "style")  # style is now most recent
    cache.get(Path(loras["product"].path), loras["product"].sha256, "product")
    assert set(cache._adapters) == {loras["style"].sha256, loras["product"].sha256}  # face went
    assert cache.nbytes <= cache.max_bytes
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (1, 3, 1)


def test_fused_at_load_equals_deltas(tiny_dir, loras, lora_model):
    settings = ModelSettings(
        model=str(tiny_dir), max_sequence_length=32, safety_checker=str(tiny_dir / "safety_checker")
    )
    lora_dir = Path(loras["style"].path).parent  # FLUX_LORA_DIR, and FLUX_FUSED_LORAS=style.safetensors:0.6
    fused = LoraSettings(max_per_request=0, dir=lora_dir, fused=["style.safetensors:0.6"])
    fused_model = load_model(settings, fused, fetcher=SafeFetcher(HostPolicy([]), FetchSettings()))
    name = TARGETS[1]
    fused_weight = dict(fused_model.pipeline.transformer.named_modules())[name].weight
    base = lora_model.lora_layers[name].weight
    layer = lora_model.adapters.get(Path(loras["style"].path), loras["style"].sha256, "style").layers[name]
    assert torch.allclose(fused_weight, base + 0.6 * layer.multiplier * layer.up @ layer.down, atol=1e-6)
    assert fused_model.lora_layers is None  # no per-request path when LoRAs are off


def test_a_fused_lora_url_is_fetched_under_the_callers_settings(tiny_dir, loras, tmp_path, monkeypatch):
    """FLUX_FUSED_LORAS by URL goes through the fetcher the caller built from its own settings: the
    model loader reads no settings of its own from the environment."""
    body = Path(loras["style"].path).read_bytes()

    class Serves(LocalHandler):
        def do_GET(self):
            self.send(200, body, "application/octet-stream")

    settings = ModelSettings(
        model=str(tiny_dir), max_sequence_length=32, safety_checker=str(tiny_dir / "safety_checker"), cache_dir=tmp_path
    )
    monkeypatch.delenv("FLUX_ALLOW_PRIVATE_HOSTS", raising=False)  # the environment would refuse 127.0.0.1
    with local_http_server(Serves) as url:
        lora = LoraSettings(max_per_request=0, fused=[f"{url}/style.safetensors:0.6"], max_file_bytes=len(body) + 1)
        allowed = SafeFetcher(HostPolicy(["127.0.0.1"]), FetchSettings())
        model = load_model(settings, lora, fetcher=allowed)
        assert model.fused_loras == [(loras["style"].sha256, 0.6)]
        with pytest.raises(LoraSourceError, match="loopback"):
            load_model(settings, lora, fetcher=SafeFetcher(HostPolicy([]), FetchSettings()))


def test_unfuse_restores_bit_for_bit(lora_model, loras):
    layers = lora_model.lora_layers
    before = weights_digest(lora_model)
    fused = fuse(layers, adapters_for(lora_model, (loras["style"], 0.3), (loras["product"], 1.7)), keep_originals=True)
    assert weights_digest(lora_model) != before
    unfuse(layers, fused)
    assert weights_digest(lora_model) == before


def test_a_batch_without_loras_runs_without_delta_layers(lora_model, lora_inpainter, loras, monkeypatch):
    """LoRA-free requests cost what they would with LoRAs off, even where deltas are padded to a
    fixed rank (a compiled transformer); a LoRA batch gets its deltas, and loses them after."""
    monkeypatch.setattr(lora_model, "lora_rank_buckets", (16, 64))
    monkeypatch.setattr(lora_model, "fuse_uniform_loras", False)
    layers = lora_model.lora_layers
    with lora_inpainter.loras_applied([[], []]):
        assert all(layer.lora_down is None for layer in layers.values())
    style = lora_model.adapters.get(loras["style"].path, loras["style"].sha256, "style")
    with lora_inpainter.loras_applied([[(style, 1.0)], []]):
        assert all(layer.lora_down is not None for layer in layers.values())
    assert all(layer.lora_down is None for layer in layers.values())
