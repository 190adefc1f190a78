"""The prepared GPU run (benchmarks/device/run.sh) in its CPU smoke mode: the same script, plan,
writers and time budget as on the device, with the tiny model at toy sizes. No speed is asserted:
the figures must be present, positive and consistent with each other."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO

SAFE_NAME = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def smoke_env(cache_dir: Path) -> dict:
    return {**os.environ, "FLUX_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def results_in(out: Path, suffix: str = "device") -> tuple[dict, str]:
    (json_file,) = out.glob(f"loop-*-{suffix}.json")
    assert set(json_file.name) <= SAFE_NAME  # the device tool brings back no other names
    return json.loads(json_file.read_text()), json_file.with_suffix(".md").read_text()


def assert_cells_consistent(results: dict) -> None:
    for cell in results["cells"]:
        megapixels = cell["width"] * cell["height"] * cell["batch"] / 1e6
        assert 0 < cell["min_s"] <= cell["median_s"] <= cell["p95_s"]
        assert cell["megapixels_per_s"] == megapixels / cell["median_s"]
        assert cell["seconds_per_image"] == cell["median_s"] / cell["batch"]
        assert math.isclose(cell["cost_per_mp"], results["dollars_per_hour"] / 3600 * cell["median_s"] / megapixels)
        assert math.isclose(cell["achieved_tflops"], cell["transformer_tflop"] / cell["denoise_median_s"])
        assert cell["transformer_tflop"] > 0 and 0 < cell["denoise_median_s"] < cell["median_s"]
        assert cell["steps_run"] == 2 and cell["steps"] == 3  # strength 0.6 of 3 steps, as 24 of 28 at 0.85
        assert cell["fraction_of_peak"] is None  # no published peak for a CPU
        if cell["backend"].startswith("compile") and cell["warmup_s"] is not None:
            assert cell["compile_s"] == cell["warmup_s"] - cell["median_s"]
        else:
            assert cell["compile_s"] is None
        assert cell["recompiles"] == 0  # nothing compiled while a cell was measured
        assert cell["host_transfers_per_step"] is not None and cell["host_transfers_per_step"] >= 0


def test_smoke_runs_one_point_of_each_kind_and_writes_the_loop_schema(tmp_path, cache_dir):
    """One point of each kind of the plan (eager, regionally compiled, whole-model compiled; with and
    without LoRAs): every code path the GPU run takes, without every size and batch."""
    from benchmarks.device.run import PLAN, SMOKE, Point, QuantizedCells, one_of_each

    out = tmp_path / "out"
    run = subprocess.run(
        ["bash", "benchmarks/device/run.sh", "--smoke", "--served", "off", "--one-of-each", "--out", str(out)],
        cwd=REPO,
        env={**smoke_env(cache_dir), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "install: skipped" in run.stdout and "status: complete" in run.stdout
    results, markdown = results_in(out)
    # the loop benchmark's schema, so benchmarks/results and `python -m benchmarks report` take it as is
    with open(REPO / "benchmarks" / "results" / "loop-tiny-torch-x86_64.json") as committed:
        loop_keys = json.load(committed).keys()
    assert loop_keys <= results.keys() and results["status"] == "complete"
    env = results["environment"]
    for key in ("gpu", "driver", "torch", "cuda", "diffusers", "transformers", "python"):
        assert key in env
    assert env["torch"] and env["python"] and env["gpu"] is None  # the CPU: no GPU, no driver
    assert results["model_build_s"] > 0 and results["backend"] == "compile,torch,compile:model"
    points = [item for item in one_of_each(PLAN) if isinstance(item, Point)]
    kinds = {(p.backend, p.lora_mode != "none") for p in PLAN if isinstance(p, Point)}
    assert {(p.backend, p.lora_mode != "none") for p in points} == kinds and len(points) == len(kinds)
    assert [i["item"] for i in results["items"]] == [p.label(SMOKE) for p in points] + [QuantizedCells().label(SMOKE)]
    assert all(i["status"] == "ran" for i in results["items"])
    # the quantized cells ran on the same model: bf16 and int8 measured, fp8 refused on the CPU
    quantized = {c["cell"].split()[0]: c for c in results["quantized"]}
    assert quantized["bf16"]["status"] == quantized["int8"]["status"] == "ran", results["quantized"]
    assert quantized["fp8"]["status"] != "ran" and "8.9" in quantized["fp8"]["reason"]
    assert "Quantized transformers and group offload" in markdown
    assert len(results["cells"]) == sum(len(p.accelerations) for p in points)
    for point in points:  # every point of the plan measured what it says
        cells = [c for c in results["cells"] if c["item"] == point.label(SMOKE)]
        assert [c["acceleration"] for c in cells] == list(point.accelerations)
        assert {(c["backend"], c["batch"], c["lora_mode"]) for c in cells} == {
            (point.backend, point.batch, point.lora_mode)
        }
        assert all((c["width"], c["height"]) == SMOKE.sizes[point.size] for c in cells)
    assert_cells_consistent(results)
    first = results["cells"][0]
    assert first["warmup_s"] > 0 and not first["lora_layers"]  # warmed once per shape, before any LoRA
    # LoRA cells: compiled ones pad to the server's default rank buckets, eager ones to nothing
    lora_cells = [c for c in results["cells"] if c["lora_mode"] != "none"]
    assert lora_cells and all(c["lora_layers"] for c in lora_cells)
    assert {c["backend"]: c["lora_rank_buckets"] for c in lora_cells} == {
        "compile": [16, 32, 64, 128, 256, 512],
        "torch": None,
    }
    compared = 0
    for before, cell in zip(results["cells"], results["cells"][1:]):  # regular against the none cell before it
        if cell["acceleration"] == "regular" and before["item"] == cell["item"]:
            assert cell["speedup_vs_none"] == before["median_s"] / cell["median_s"]
            assert 0 <= cell["mean_abs_error"] <= cell["max_abs_error"] <= 255
            compared += 1
    assert compared == sum(p.accelerations == ("none", "regular") for p in points)
    assert markdown.startswith("# Inpainting loop: tiny") and "## This run" in markdown
    assert "Status: **complete**" in markdown
    rows = [
        line for line in markdown.splitlines() if line.startswith(("| torch | ", "| compile | ", "| compile:model | "))
    ]
    assert len(rows) == len(results["cells"])

    from benchmarks import report

    assert [p.name for p in report.main(["--results", str(out)])] == ["loop-throughput.png"]


def test_budget_cut_lists_every_item_not_run_with_its_reason(tmp_path, cache_dir, monkeypatch):
    from benchmarks.device import run

    monkeypatch.setenv("FLUX_CACHE_DIR", str(cache_dir))
    results = run.main(["--smoke", "--budget-s", "0", "--out", str(tmp_path)])
    saved, markdown = results_in(tmp_path)
    assert saved["status"] == results["status"] == "cut by the time budget" and saved["cells"] == []
    assert len(saved["items"]) == len(run.PLAN)
    assert all(i["status"] == "not run" and i["reason"].startswith("time budget") for i in saved["items"])
    assert "Status: **cut by the time budget**" in markdown and "| not run |" in markdown


def test_prediction_runs_what_fits_and_skips_what_does_not(tmp_path, tiny_model):
    """The walk over the plan, with the measuring replaced: an item predicted past the deadline is not
    run, a cheaper one after it still is, and an item with nothing to go on runs."""
    from types import SimpleNamespace

    from benchmarks.device.run import SMOKE, DeviceRun, Point, ServedPath

    args = SimpleNamespace(budget_s=50.0, out=tmp_path, smoke=True, dollars_per_hour=1.0, peak_tflops=None)
    device = DeviceRun(SMOKE, args, time.monotonic())
    device.model = tiny_model
    device.results = {"items": []}
    device.save = lambda final=False: None
    ran = []
    device.run_point = lambda point: ran.append(point)
    device.run_served = lambda: ran.append("served")

    small = Point("torch", "512", 1)
    assert device.predicted_s(small) is None  # nothing measured yet
    device.history.append(("torch", device.flops_per_run(small), 10.0))
    device.warmed.add(device.warm_key(small))
    # warmed: repeats x variants runs at the measured rate (10% margin); not warmed: one run more
    assert math.isclose(device.predicted_s(small), 1.1 * SMOKE.repeats * 10.0)
    cold = Point("torch", "512", 2)
    assert math.isclose(device.predicted_s(cold), 1.1 * (SMOKE.repeats + 1) * 10.0 * 2)
    compiled = Point("compile", "512", 1)  # no compile measured: torch's rate plus the compile allowance
    assert math.isclose(device.predicted_s(compiled), 1.1 * (SMOKE.repeats + 1) * 10.0 + SMOKE.compile_allowance_s)
    device.compile_seconds.append(5.0)  # once a compile was measured, the longest one stands in for it
    assert math.isclose(device.predicted_s(compiled), 1.1 * (SMOKE.repeats + 1) * 10.0 + 5.0)
    assert device.predicted_s(ServedPath()) == SMOKE.served_estimate_s

    big = Point("torch", "1024", 2, accelerations=("none", "regular"))  # predicted ~150 s
    assert device.predicted_s(big) > args.budget_s > device.predicted_s(small)
    device.walk([big, small, ServedPath()])
    assert ran == [small]  # the served path (60 s) does not fit either
    statuses = [(i["status"], i.get("reason", "")[:11]) for i in device.results["items"]]
    assert statuses == [("not run", "time budget"), ("ran", ""), ("not run", "time budget")]


def test_sigterm_stops_the_run_with_what_it_measured_on_disk(tmp_path, cache_dir):
    """run.sh's `timeout` sends SIGTERM when a run overruns: the run stops, the results it has are
    complete files, marked interrupted."""
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", "device", "--smoke", "--served", "off", "--out", str(out)],
        cwd=REPO,
        env=smoke_env(cache_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 600
        while not (list(out.glob("*-device.json")) and results_in(out)[0]["cells"]):
            assert process.poll() is None and time.monotonic() < deadline, "no cell written in time"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, output[-3000:]
    results, markdown = results_in(out)
    assert results["status"] == "interrupted by SIGTERM" and "Status: **interrupted by SIGTERM**" in markdown
    from benchmarks.device.run import PLAN

    assert results["cells"] and len(results["items"]) < len(PLAN)
    assert_cells_consistent(results)
    assert not list(out.glob(".*.partial"))


def test_served_path_serves_the_model_and_drives_a_short_burst(tmp_path, cache_dir):
    """--served only: `bentoml serve` of service.py with the same model on a free loopback port,
    `python -m benchmarks load` against it (load.json, load.md), the server stopped after."""
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "device", "--smoke", "--served", "only", "--out", str(out)],
        cwd=REPO,
        env=smoke_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results, markdown = results_in(out, "device-served")  # apart from a full run's files
    assert [i["status"] for i in results["items"]] == ["ran"], results["items"]
    assert results["model_build_s"] is None and results["cells"] == []  # only the server builds one
    served = results["served"]
    assert served["startup_s"] > 0 and served["levels"][0]["succeeded"] >= 1
    assert served["levels"][0]["error_rate"] == 0 and served["levels"][0]["megapixels_per_s"] > 0
    load = json.loads((out / "load.json").read_text())
    assert load["levels"] == served["levels"] and (out / "load.md").read_text().startswith("# Load test")
    assert "Served path: `bentoml serve` ready in" in markdown and (out / "serve.log").stat().st_size > 0
    port = int(served["url"].rsplit(":", 1)[1])
    import socket

    with socket.socket() as sock:  # the server is gone: its port is free again
        sock.bind(("127.0.0.1", port))


def test_carried_wheels_are_the_locks_pins_for_what_the_image_lacks():
    """benchmarks/device/wheels.txt: every package of requirements.lock missing from the device
    image, at the lock's version, and nothing the lock does not pin."""
    from benchmarks.device.wheels import HERE, pins

    lock, carried, image = (
        pins(REPO / "requirements.lock"),
        pins(HERE / "wheels.txt"),
        pins(HERE / "image-packages.txt"),
    )
    assert {name: lock.get(name) for name in carried} == carried
    assert {name for name in lock if name not in image} <= carried.keys()
    assert {"diffusers", "pydantic", "pydantic-settings", "bentoml"} <= carried.keys()
