"""FLUX_BACKEND=compile: regional compilation of the tiny model's repeated blocks, warmed up so that no
traffic recompiles; LoRA-free batches without delta layers; LoRA rank buckets; the first-block cache
compiled; the attention-backend setting; ``flux_compiles_total`` on a served model.

Compiled with ``eager``: dynamo traces and guards as it does for inductor, so recompiles show
exactly, without a minute of kernel generation per graph on this CPU (the inductor compile is measured
by benchmarks/loop.py instead: docs/compile.md). One test compiles with ``aot_eager``, which also
traces through AOTAutograd into the aten ops inductor takes, and checks those graphs' images; the
warm-up of every variant costs twice as long there, for guards that are the same.
"""

from __future__ import annotations

import re
import threading

import httpx
import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from runners.config import AccelerationSettings, Settings
from runners.pipeline.inpaint import Inpainter, InpaintInputs
from tests.conftest import BATCH_ROUNDING_LEVELS, pixels, scene

SMALL, WIDE = (64, 48), (96, 64)  # 12 and 24 image tokens


def settings_for(tiny_dir, **backend) -> Settings:
    return Settings.model_validate(
        {
            "model": {
                "model": str(tiny_dir),
                "max_sequence_length": 32,
                "safety_checker": str(tiny_dir / "safety_checker"),
            },
            "backend": {"backend": "compile", "compile_backend": "eager", **backend},
            "lora": {"max_per_request": 2, "max_rank": 32, "memory_max_bytes": 64 * 1024**2},
        }
    )


@pytest.fixture(scope="module")
def compiled(tiny_dir):
    """The tiny model with per-request LoRAs, regionally compiled (eager) and warmed up."""
    import torch._dynamo

    from runners.pipeline.model import attach_backend, load_model
    from runners.worker.loading import warm_up

    settings = settings_for(tiny_dir)
    torch._dynamo.reset()
    model = load_model(settings.model, settings.lora)
    attach_backend(model, settings)
    inpainter = Inpainter(model, settings.acceleration)
    warm_up(inpainter)
    yield inpainter
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def eager(tiny_dir):
    """The same model and LoRA settings, eager."""
    from runners.pipeline.model import attach_backend, load_model

    settings = settings_for(tiny_dir, backend="torch")
    model = load_model(settings.model, settings.lora)
    attach_backend(model, settings)
    return Inpainter(model, settings.acceleration)


def random_adapter(model, rank: int, seed: int):
    """An adapter on every LoRA layer of ``model``, strong enough to change the image."""
    from runners.lora.adapters import Adapter
    from runners.lora.formats import LoraLayer

    generator = torch.Generator().manual_seed(seed)
    layers = {
        name: LoraLayer(
            down=torch.randn(rank, module.in_features, generator=generator) * 0.3,
            up=torch.randn(module.out_features, rank, generator=generator) * 0.3,
            multiplier=1.0,
        )
        for name, module in model.lora_layers.items()
    }
    return Adapter(sha256=f"test-rank-{rank}-{seed}", name=f"r{rank}", layers=layers, format="test")


def request(size=SMALL, seed=0, steps=4, num_images=1, loras=(), acceleration="none") -> InpaintInputs:
    image, mask = scene(*size, seed=seed)
    return InpaintInputs(
        prompt="a red house",
        image=image,
        mask=mask,
        width=size[0],
        height=size[1],
        seed=seed,
        num_inference_steps=steps,
        num_images=num_images,
        loras=list(loras),
        acceleration=acceleration,
        enable_safety_checker=False,
    )


def traffic(model) -> list[list[InpaintInputs]]:
    """Groups as the server forms them: batch sizes 1-4, num_images 1 and 2, two sizes, LoRAs of
    ranks 8 and 32 (buckets 16, 64) and none, fused and as deltas, "none" and "regular"."""
    r8, r32 = [(random_adapter(model, 8, 1), 0.8)], [(random_adapter(model, 32, 2), 0.6)]
    return [
        [request()],
        [request(WIDE, num_images=2, acceleration="regular")],
        [request(loras=r8)],  # one LoRA set for the whole batch: fused
        [request(WIDE, loras=r8, acceleration="regular"), request(WIDE, seed=1, steps=6)],
        [request(seed=2, loras=r32, num_images=2), request(seed=3, loras=r8, steps=3)],  # ranks 40: bucket 64
        [
            request(WIDE, seed=4, loras=r32, acceleration="regular"),
            request(WIDE, seed=5, steps=3),
            request(WIDE, seed=6, loras=r8, steps=5, acceleration="regular"),
        ],
        [request(seed=s, steps=3 + s % 3, acceleration=("none", "regular")[s % 2]) for s in range(4)],
        [request(seed=s, steps=3 + s, loras=(r8, (), r32, ())[s], acceleration="regular") for s in range(4)],
    ]


def test_a_traffic_mix_after_the_warm_up_never_recompiles(compiled, eager):
    """Every group shape the server forms, under ``error_on_recompile``: any graph not built by the
    warm-up raises. The compiled images are eager's."""
    import torch._dynamo

    from runners.backends.compiled import graphs_compiled

    model = compiled.model
    assert model.transformer.splittable and compiled.first_block_cache  # regional: FBCache still on
    groups = traffic(model)
    before = graphs_compiled()
    with torch._dynamo.config.patch(error_on_recompile=True):
        results = [compiled.run(group) for group in groups]
    assert graphs_compiled() == before
    # The eager model runs the same adapters (same objects: they are on the same device and dtype).
    for group, got in zip(groups[3:5], results[3:5]):
        for a, b in zip(eager.run(group), got):
            assert np.abs(pixels(a.images[0]) - pixels(b.images[0])).max() <= BATCH_ROUNDING_LEVELS


def test_the_first_block_cache_runs_compiled(compiled, eager):
    """``regular`` on the compiled transformer skips what it skips eager, with the same images."""
    import torch._dynamo

    always = AccelerationSettings(threshold=10.0, max_consecutive_skips=2)
    group = [request(seed=1, steps=8, acceleration="regular"), request(seed=2, steps=6)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = Inpainter(compiled.model, always).run(group)
    expected = Inpainter(eager.model, always).run(group)
    assert got[0].steps_skipped == expected[0].steps_skipped > 0
    for a, b in zip(expected, got):
        assert np.abs(pixels(a.images[0]) - pixels(b.images[0])).max() <= BATCH_ROUNDING_LEVELS


def test_aot_eager_graphs_of_lora_deltas_give_eager_images(tiny_dir, eager):
    """Compiled through AOTAutograd (``aot_eager``: the functionalized aten ops inductor takes), a
    batch with LoRA deltas on one of its two requests gives eager's images."""
    from runners.backends.compiled import graphs_compiled
    from runners.pipeline.model import attach_backend, load_model

    settings = settings_for(tiny_dir, compile_backend="aot_eager")
    model = load_model(settings.model, settings.lora)
    attach_backend(model, settings)
    group = [request(loras=[(random_adapter(model, 8, 1), 0.8)]), request(seed=1)]
    before = graphs_compiled()
    got = Inpainter(model, settings.acceleration).run(group)
    assert graphs_compiled() > before  # aot_eager's own graphs ran, not those of the other tests
    for a, b in zip(eager.run(group), got):
        assert np.abs(pixels(a.images[0]) - pixels(b.images[0])).max() <= BATCH_ROUNDING_LEVELS


def counted_flops(inpainter: Inpainter, group: list[InpaintInputs]) -> int:
    """FLOPs of the group's whole run. A dispatch mode cannot run inside a compiled graph, so the
    compiled blocks run their own code eagerly here (``force_eager``): the same aten ops that
    aot_eager's graphs run, with the layers exactly as the batch left them (deltas or none)."""
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        inpainter.run(group)
    return counter.get_total_flops()


def test_lora_free_requests_cost_the_eager_flops(compiled, eager, tiny_model):
    """With per-request LoRAs on and the transformer compiled, a batch without LoRAs runs no delta
    layers: the FLOPs it counts are those of the plain eager model (no LoRA support at all)."""
    group = [request(seed=1), request(WIDE, seed=2, num_images=2)]
    plain = counted_flops(Inpainter(tiny_model), group[:1]) + counted_flops(Inpainter(tiny_model), group[1:])
    free = counted_flops(compiled, group[:1]) + counted_flops(compiled, group[1:])
    assert free == plain > 0
    # The count does see deltas: the same batch with a LoRA (as deltas: two sets) costs more.
    r8 = [(random_adapter(compiled.model, 8, 1), 0.8)]
    with_loras = counted_flops(compiled, [request(seed=1, loras=r8), request(seed=3)])
    assert with_loras > counted_flops(compiled, [request(seed=1), request(seed=3)])


def test_lora_deltas_pad_to_the_smallest_rank_bucket_that_holds_them():
    from runners.backends.compiled import bucket_for, rank_buckets
    from runners.lora.adapters import Adapter, activate, deactivate, enable_lora
    from runners.lora.formats import LoraError, LoraLayer

    assert rank_buckets(128, 4) == (16, 32, 64, 128, 256, 512)  # the defaults: FLUX_LORA_MAX_RANK x MAX_PER_REQUEST
    assert rank_buckets(8, 1) == (8,) and rank_buckets(32, 2) == (16, 32, 64)
    assert [bucket_for(r, (16, 32, 64)) for r in (1, 16, 17, 40, 64)] == [16, 16, 32, 64, 64]
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4))
    layers = enable_lora(net)

    def adapter(rank, names):
        return Adapter(
            f"r{rank}",
            f"r{rank}",
            {
                n: LoraLayer(torch.ones(rank, layers[n].in_features), torch.ones(layers[n].out_features, rank), 1.0)
                for n in names
            },
            "test",
        )

    a, b = adapter(4, ["0"]), adapter(20, ["0", "1"])
    activate(layers, [[(a, 1.0)], []], pad_to=(16, 32, 64))
    # every layer gets deltas of one width, even the one the adapter does not touch; two rows of scales
    assert [m.lora_down.shape[0] for m in layers.values()] == [16, 16] and layers["1"].lora_scales.shape == (2, 16)
    activate(layers, [[(a, 1.0)], [(b, 0.5)]], pad_to=(16, 32, 64))
    assert [m.lora_down.shape[0] for m in layers.values()] == [32, 32]
    activate(layers, [[], []], pad_to=(16, 32, 64))  # no LoRA in the batch: no delta layers at all
    assert all(m.lora_down is None and m.lora_scales is None for m in layers.values())
    with pytest.raises(LoraError, match="need rank 24, over the padded 16"):
        activate(layers, [[(a, 1.0), (b, 1.0)]], pad_to=(16,))
    activate(layers, [[(a, 1.0)]])  # eager: exact ranks, only where the adapter is
    assert layers["0"].lora_down.shape[0] == 4 and layers["1"].lora_down is None
    deactivate(layers)
    assert all(m.lora_down is None for m in layers.values())


def test_auto_compiles_on_cuda_and_stays_eager_on_the_cpu(tiny_dir):
    from runners.config import BackendSettings
    from runners.pipeline.model import attach_backend, load_model

    assert BackendSettings().backend == "auto" and BackendSettings().compile_scope == "blocks"
    assert BackendSettings().resolved_backend("cuda") == "compile"
    assert BackendSettings().resolved_backend("cpu") == "torch"
    settings = settings_for(tiny_dir, backend="auto")
    model = load_model(settings.model, settings.lora)
    attach_backend(model, settings)
    assert model.backend == "torch" and model.lora_rank_buckets is None
    assert not any(getattr(m, "_compiled_call_impl", None) for m in model.pipeline.transformer.modules())


def test_whole_model_compile_stays_an_option(tiny_dir):
    from runners.pipeline.model import attach_backend, load_model

    settings = settings_for(tiny_dir, compile_scope="model")
    model = load_model(settings.model, settings.lora)
    attach_backend(model, settings)
    assert model.backend == "compile" and not model.transformer.splittable  # one graph: no FBCache
    assert model.lora_rank_buckets == (16, 32, 64)


def test_dynamo_settings_hold_in_every_thread_that_runs_the_transformer(tiny_dir):
    """torch keeps config overrides per thread: the compiled transformer enters its settings around
    each call, so the step engine's thread compiles (if it ever must) as the loading thread did."""
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    from runners.backends.compiled import RECOMPILE_LIMIT
    from runners.pipeline.model import attach_backend, load_model

    settings = settings_for(tiny_dir)
    model = load_model(settings.model, settings.lora)
    attach_backend(model, settings)
    seen = []

    def engine_thread():
        with model.transformer.context():
            seen.append(
                (
                    torch._dynamo.config.recompile_limit,
                    torch._dynamo.config.force_nn_module_property_static_shapes,
                    fx_config.use_duck_shape,
                )
            )
        seen.append(torch._dynamo.config.recompile_limit)  # and only around the call

    thread = threading.Thread(target=engine_thread)
    thread.start()
    thread.join()
    assert seen == [(RECOMPILE_LIMIT, False, False), 8]


def test_an_attention_backend_whose_library_is_missing_is_refused_at_start(tiny_dir):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from runners.backends.compiled import check_attention_backend
    from runners.pipeline.model import attach_backend, load_model

    # As on a CUDA server without the package: diffusers' own availability check, its message kept.
    with pytest.raises(RuntimeError, match=r"FLUX_ATTENTION_BACKEND=flash cannot be used: .*flash-attn"):
        check_attention_backend("flash", "cuda")
    with pytest.raises(RuntimeError, match=r"FLUX_ATTENTION_BACKEND=sage cannot be used: .*sageattention"):
        check_attention_backend("sage", "cuda")
    with pytest.raises(RuntimeError, match="downloads its kernel from the Hugging Face hub"):
        check_attention_backend("flash_hub", "cuda")
    with pytest.raises(RuntimeError, match="not one of diffusers' attention backends"):
        check_attention_backend("fa3", "cuda")
    # On this CPU server, through the start-up path: refused before anything is served.
    settings = settings_for(tiny_dir, backend="torch", attention_backend="_native_cudnn")
    model = load_model(settings.model, settings.lora)
    with pytest.raises(RuntimeError, match="_native_cudnn runs on CUDA only"):
        attach_backend(model, settings)
    settings = settings_for(tiny_dir, backend="torch", attention_backend="native")
    attach_backend(model, settings)
    processors = [m.processor for m in model.pipeline.transformer.modules() if hasattr(m, "processor")]
    assert processors and all(p._attention_backend.value == "native" for p in processors)
    assert _AttentionBackendRegistry.get_active_backend()[0].value == "native"


def compiles(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    (value,) = re.findall(r"^flux_compiles_total (\S+)$", text, re.M)
    return float(value)


def test_served_compiled_model_shows_no_compile_after_its_warm_up(tmp_path, tiny_model):
    """``bentoml serve`` with FLUX_BACKEND=compile and continuous batching, so concurrent requests make
    forwards of 1 to 4 samples: ``flux_compiles_total`` counts the warm-up's graphs, then stays."""
    from runners.lora.formats import linear_shapes
    from tests.conftest import bentoml_server
    from tests.test_lora import write_lora
    from tests.test_service import EXAMPLE

    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    shapes = linear_shapes(tiny_model.pipeline.transformer)
    write_lora(lora_dir, "small", 4, 1, shapes)
    write_lora(lora_dir, "large", 16, 2, shapes)
    env = {
        "FLUX_BACKEND": "compile",
        "FLUX_COMPILE_BACKEND": "eager",  # dynamo's guards and recompiles as under inductor, no codegen
        "FLUX_BATCHING": "continuous",
        "FLUX_BATCH_FORWARD_MAX_SAMPLES": "4",
        "FLUX_QUEUE_CONCURRENCY": "4",
        "FLUX_LORA_DIR": str(lora_dir),
        "FLUX_LORA_MAX_PER_REQUEST": "2",
        "FLUX_LORA_MAX_RANK": "16",
    }
    base_body = {
        **EXAMPLE,
        "image_size": {"width": 128, "height": 128},
        "num_inference_steps": 4,
        "sync_mode": True,
        "output_format": "png",
    }
    bodies = [
        {},
        {"num_images": 2, "acceleration": "regular"},
        {"image_size": {"width": 128, "height": 64}, "loras": [{"path": "small.safetensors", "scale": 0.7}]},
        {"image_size": {"width": 128, "height": 64}, "num_images": 2},
        {"loras": [{"path": "large.safetensors"}, {"path": "small.safetensors"}], "acceleration": "regular"},
        {"loras": [{"path": "large.safetensors"}], "num_inference_steps": 6},
        {"acceleration": "regular", "num_inference_steps": 7},
        {
            "image_size": {"width": 128, "height": 64},
            "acceleration": "regular",
            "loras": [{"path": "large.safetensors"}],
        },
    ]
    with bentoml_server(tmp_path, **env) as (base, log_path):
        warmed = compiles(base)
        assert warmed > 0, "the warm-up compiled nothing"
        statuses = []

        def send(body):
            response = httpx.post(f"{base}/fal-ai/flux-lora/inpainting", json={**base_body, **body}, timeout=120)
            statuses.append((response.status_code, response.text[:200]))

        for _ in range(2):
            threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert all(code == 200 for code, _ in statuses), statuses
        assert compiles(base) == warmed
        text = httpx.get(f"{base}/metrics", timeout=10).text
        forwards = float(re.findall(r"^flux_samples_per_forward_count (\S+)$", text, re.M)[0])
        singles = float(re.findall(r'^flux_samples_per_forward_bucket\{le="1.0"\} (\S+)$', text, re.M)[0])
        assert forwards > singles  # some forwards had several samples: the batch sizes varied
        assert "backend compile" in log_path.read_text()
