"""Smoke runs of the benchmarks on the tiny model: the files appear and the figures are consistent
(positive, ratios equal to their parts). No speed is asserted here."""

from __future__ import annotations

import json

import pytest


def test_lora_benchmark_smoke(tmp_path, cache_dir, monkeypatch):
    from benchmarks import lora

    monkeypatch.setenv("FLUX_CACHE_DIR", str(cache_dir))
    results = lora.main(["--ranks", "2,4", "--repeats", "2", "--size", "64", "--steps", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "lora-tiny-cpu.json").read_text())
    assert saved["ranks"].keys() == {"2", "4"} and (tmp_path / "lora-tiny-cpu.md").read_text().startswith(
        "# LoRA costs"
    )
    for figures in results["ranks"].values():
        for key in ("load_from_disk", "hot_swap_activate", "fuse_and_restore", "forward_deltas", "forward_fused"):
            assert 0 < figures[key]["median_s"] <= figures[key]["p95_s"]
        assert (
            figures["delta_over_fused"] == figures["forward_deltas"]["median_s"] / figures["forward_fused"]["median_s"]
        )
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
        inputs = dict(
            hidden_states=torch.randn(1, 4096, 64),
            encoder_hidden_states=torch.randn(1, 512, 4096),
            pooled_projections=torch.randn(1, 768),
            timestep=torch.ones(1),
            guidance=torch.ones(1),
            img_ids=torch.zeros(4096, 3),
            txt_ids=torch.zeros(512, 3),
            return_dict=False,
        )
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        transformer(**inputs)
    ours = transformer_flops(transformer.config, 4096, 512)
    assert abs(ours / counter.get_total_flops() - 1) < 0.005
    assert 74e12 < ours < 75e12  # the "about 74 TFLOP per step at 1024x1024"


def test_loop_benchmark_smoke(tmp_path, cache_dir, monkeypatch):
    import tempfile

    from benchmarks import loop

    monkeypatch.setenv("FLUX_CACHE_DIR", str(cache_dir))
    scratch = tmp_path / "scratch"  # the run's temporary files (its LoRAs) go here
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    results = loop.main(
        [
            "--backends",
            "torch,onnxruntime",
            "--sizes",
            "64x48",
            "--batch-sizes",
            "1,2",
            "--steps",
            "3",
            "--strengths",
            "1.0",
            "--lora-modes",
            "none,mixed",
            "--lora-rank",
            "4",
            "--accelerations",
            "none,regular",
            "--accel-thresholds",
            "10",
            "--repeats",
            "2",
            "--max-sequence-length",
            "32",
            "--dollars-per-hour",
            "1.0",
            "--out",
            str(tmp_path),
        ]
    )
    assert not list(scratch.glob("bench-loras-*"))  # its LoRA files are not left in the temporary folder
    (json_file,) = tmp_path.glob("loop-*.json")
    assert json_file.name.startswith("loop-tiny-torch+onnxruntime-")
    assert json.loads(json_file.read_text())["cells"] == results["cells"] and len(results["cells"]) == 8
    markdown = (tmp_path / json_file.name.replace(".json", ".md")).read_text()
    assert markdown.startswith("# Inpainting loop") and "Backend `onnxruntime` skipped" in markdown
    # no exported graphs for the tiny model here (and per-request LoRAs are on): reported, never faked
    assert [s["backend"] for s in results["skipped"]] == ["onnxruntime"] and results["skipped"][0]["reason"]
    for cell in results["cells"]:
        megapixels = cell["width"] * cell["height"] * cell["batch"] / 1e6
        assert cell["backend"] == "torch" and cell["lora_mode"] in ("none", "mixed")
        assert 0 < cell["median_s"] <= cell["p95_s"] and cell["steps_run"] == 3
        assert cell["megapixels_per_s"] == megapixels / cell["median_s"]
        assert cell["seconds_per_image"] == cell["median_s"] / cell["batch"]
        assert abs(cell["cost_per_mp"] - 1.0 / 3600 * cell["median_s"] / megapixels) < 1e-15
        assert abs(cell["margin_vs_fal"] * cell["cost_per_mp"] - loop.FAL_PRICE_PER_MP) < 1e-12
        assert cell["transformer_tflop"] > 0 and cell["fraction_of_peak"] is None  # no peak figure for a CPU
    none = [c for c in results["cells"] if c["acceleration"] == "none"]
    regular = [c for c in results["cells"] if c["acceleration"] == "regular"]
    assert len(none) == len(regular) == 4
    for base, fast in zip(none, regular):  # each regular cell follows its none cell, same requests
        assert [base[k] for k in ("width", "height", "batch", "lora_mode")] == [
            fast[k] for k in ("width", "height", "batch", "lora_mode")
        ]
        assert base["steps_skipped_fraction"] == 0 and "speedup_vs_none" not in base
        # 3 steps: 0 warms up, 2 is the last, 1 is skipped by every sample
        assert fast["first_block_cache"] and fast["steps_skipped_fraction"] == 1 / 3
        assert fast["speedup_vs_none"] == base["median_s"] / fast["median_s"]
        assert fast["best_speedup_vs_none"] == base["min_s"] / fast["min_s"] and 0 < fast["min_s"] <= fast["median_s"]
        assert 0 <= fast["mean_abs_error"] <= fast["max_abs_error"] <= 255
        assert fast["psnr_db"] is None or fast["psnr_db"] > 0
        # executed FLOPs: a skipped step runs only the first block
        assert fast["transformer_tflop"] < base["transformer_tflop"]
    by_batch = {(c["width"], c["batch"], c["lora_mode"]): c for c in none}
    assert by_batch[(64, 2, "none")]["transformer_tflop"] == 2 * by_batch[(64, 1, "none")]["transformer_tflop"]

    from benchmarks import report

    written = report.main(["--results", str(tmp_path)])
    assert [p.name for p in written] == ["loop-throughput.png"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and written[0].stat().st_size > 10_000


def test_two_targets_are_paired_within_each_round_and_summarised_by_medians():
    from benchmarks.load import paired, paired_table

    def cell(target, r, p50_s, images_per_s, concurrency=4):
        return {"target": target, "round": r, "concurrency": concurrency, "p50_s": p50_s, "images_per_s": images_per_s}

    levels = [
        cell("memory", 0, 0.100, 10.0),
        cell("redis", 0, 0.102, 9.8),
        cell("redis", 1, 0.130, 8.0),  # a noisy round: both slower, the pair still close
        cell("memory", 1, 0.128, 8.4),
        cell("memory", 2, 0.100, 10.0),
        cell("redis", 2, 0.110, 10.0),
    ]
    (summary,) = paired(levels, "memory", "redis")
    assert summary["rounds"] == 3
    assert summary["added_p50_ms_per_round"] == [2.0, 2.0, 10.0]
    assert summary["added_p50_ms_median"] == pytest.approx(2.0)
    assert summary["throughput_ratio_median"] == pytest.approx(0.98)  # of 0.98, 0.952, 1.0
    table = "\n".join(paired_table([summary], "memory", "redis"))
    assert "| 4 | 3 | +2.0 |" in table and "0.980x" in table
