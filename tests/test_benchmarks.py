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
