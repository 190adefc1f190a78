"""Smoke runs of the benchmarks on the tiny model: the files appear and the figures are consistent
(positive, ratios equal to their parts). No speed is asserted here."""

from __future__ import annotations

import json


def test_lora_benchmark_smoke(tmp_path, cache_dir, monkeypatch):
    from benchmarks import lora

    monkeypatch.setenv("FLUX_CACHE_DIR", str(cache_dir))
    results = lora.main(["--ranks", "2,4", "--repeats", "2", "--size", "64", "--steps", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "lora-tiny-cpu.json").read_text())
    assert saved["ranks"].keys() == {"2", "4"} and (tmp_path / "lora-tiny-cpu.md").read_text().startswith("# LoRA costs")
    for figures in results["ranks"].values():
        for key in ("load_from_disk", "hot_swap_activate", "fuse_and_restore", "forward_deltas", "forward_fused"):
            assert 0 < figures[key]["median_s"] <= figures[key]["p95_s"]
        assert figures["delta_over_fused"] == figures["forward_deltas"]["median_s"] / figures["forward_fused"]["median_s"]
    mixed = results["mixed_batch"]
    assert mixed["speedup"] == mixed["split"]["median_s"] / mixed["mixed"]["median_s"]
    assert mixed["images_per_s_mixed"] == 4 / mixed["mixed"]["median_s"]


def test_flop_formula_matches_torchs_own_count_at_full_flux_size():
    """The benchmark's FLOPs against torch's FlopCounterMode over a real FLUX.1-dev forward, run on
    the meta device (shapes only: nothing allocated). Math attention so attention is counted too."""
    import torch
    from diffusers import FluxTransformer2DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.loop import transformer_flops

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True)  # FLUX.1-dev: 19 + 38 blocks, 24 x 128 heads
        inputs = dict(hidden_states=torch.randn(1, 4096, 64), encoder_hidden_states=torch.randn(1, 512, 4096),
                      pooled_projections=torch.randn(1, 768), timestep=torch.ones(1), guidance=torch.ones(1),
                      img_ids=torch.zeros(4096, 3), txt_ids=torch.zeros(512, 3), return_dict=False)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        transformer(**inputs)
    ours = transformer_flops(transformer.config, 4096, 512)
    assert abs(ours / counter.get_total_flops() - 1) < 0.005
    assert 74e12 < ours < 75e12  # the "about 74 TFLOP per step at 1024x1024"


def test_loop_benchmark_smoke(tmp_path, cache_dir, monkeypatch):
    from benchmarks import loop

    monkeypatch.setenv("FLUX_CACHE_DIR", str(cache_dir))
    results = loop.main(["--sizes", "64x48,square", "--batch-sizes", "1,2", "--steps", "3", "--strengths", "1.0",
                         "--repeats", "2", "--max-sequence-length", "32", "--dollars-per-hour", "1.0", "--out", str(tmp_path)])
    (json_file,) = tmp_path.glob("loop-*.json")
    assert json.loads(json_file.read_text())["cells"] == results["cells"] and len(results["cells"]) == 4
    assert (tmp_path / json_file.name.replace(".json", ".md")).read_text().startswith("# Inpainting loop")
    for cell in results["cells"]:
        megapixels = cell["width"] * cell["height"] * cell["batch"] / 1e6
        assert 0 < cell["median_s"] <= cell["p95_s"] and cell["steps_run"] == 3
        assert cell["megapixels_per_s"] == megapixels / cell["median_s"]
        assert cell["seconds_per_image"] == cell["median_s"] / cell["batch"]
        assert abs(cell["cost_per_mp"] - 1.0 / 3600 * cell["median_s"] / megapixels) < 1e-15
        assert abs(cell["margin_vs_fal"] * cell["cost_per_mp"] - loop.FAL_PRICE_PER_MP) < 1e-12
        assert cell["transformer_tflop"] > 0 and cell["fraction_of_peak"] is None  # no peak figure for a CPU
    assert results["cells"][1]["transformer_tflop"] == 2 * results["cells"][0]["transformer_tflop"]  # batch 2

    from benchmarks import report

    written = report.main(["--results", str(tmp_path)])
    assert [p.name for p in written] == ["loop-throughput.png"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and written[0].stat().st_size > 10_000
