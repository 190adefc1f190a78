"""One prepared GPU run: the figures every speed claim needs, measured on a lent H100/H200 by one
command of at most 8 minutes (docs/benchmarks.md, "Performance").

    benchmarks/device/run.sh [--smoke] [--out DIR] [--budget-s S] [--served auto|off|only]
    python -m benchmarks device ...        (what run.sh starts, after installing the wheels in .whl/)

It builds ``random:flux-dev`` (FLUX.1-dev's full architecture with random weights) on the GPU in
bf16 and walks ``PLAN`` in order, most important first: the default fal request (1024x1024, 28
steps, strength 0.85: 24 denoising steps) compiled as the server compiles it by default
(``FLUX_BACKEND=auto``: regional compilation, docs/compile.md), with its compile time; the served
path early (``bentoml serve`` with the defaults, whose start-up warms every compiled variant, and a
short bounded ``python -m benchmarks load`` burst); the same request eager; then batch 2, 512x512
and LoRAs (rank 64, deltas and mixed, padded to the server's rank buckets); the whole-model compile
last, for comparison. Each matrix point is measured by the loop benchmark's own code
(benchmarks/loop.py: interleaved variants, medians, counted FLOPs, $/MP). Beside each cell: the
graphs dynamo compiled while it was measured (after its warm-up: anything but 0 is a recompile on
live traffic) and the host-device transfers a steady denoising step makes
(runners/pipeline/host_reads.py).

The time budget: before each item its time is predicted from what has been measured (seconds per
counted FLOP of the nearest measured cell of that backend, plus a compile allowance before a first
compile); an item that would overrun is listed as not run, with the reason, and the next one is
tried. After every item the results are written again (each file replaced whole) to ``--out``: the
loop's JSON and Markdown schema (benchmarks/results/), plus the environment (GPU, driver, torch,
CUDA), each cell's warm-up and compile time, and the items not run. SIGTERM (run.sh's ``timeout``)
stops it at once with everything measured so far on disk.

``--smoke``: the same code on the CPU with the tiny model at toy sizes, in seconds
(tests/test_device_benchmark.py runs it in ``make test``, one point of each kind: ``--one-of-each``).
Compiled points run there under ``torch.compiler.set_stance("force_eager")``: the compile backend's
wiring runs, inductor does not (it takes a minute per graph on the CPU; tests/test_compile.py
covers compiled outputs and recompiles). Eager (``torch``) points always run under that stance, as
regional compilation compiles the shared transformer's blocks in place.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks import loop, serving

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Point:
    """One matrix point: the loop's cells that differ only in acceleration, run interleaved."""

    backend: str  # torch or compile
    size: str  # a key of Profile.sizes
    batch: int
    lora_mode: str = "none"
    accelerations: tuple[str, ...] = ("none",)

    def label(self, profile: Profile) -> str:
        width, height = profile.sizes[self.size]
        return (
            f"{self.backend} {width}x{height} batch {self.batch} LoRA {self.lora_mode} {'+'.join(self.accelerations)}"
        )


@dataclasses.dataclass(frozen=True)
class ServedPath:
    """``bentoml serve`` of service.py with the same model, then a short ``python -m benchmarks load``."""

    def label(self, profile: Profile) -> str:
        return f"served path ({profile.served_size}, concurrency {profile.served_concurrency})"


@dataclasses.dataclass(frozen=True)
class QuantizedCells:
    """fp8 and int8 transformers against bf16 at 1024x1024 (s/image, peak memory, pixel error), and
    group offload's cost (benchmarks/device/quantized.py). Last: it swaps the model's transformer."""

    def label(self, profile: Profile) -> str:
        width, height = profile.sizes["1024"]
        return f"quantized: bf16, fp8, int8 at {width}x{height}; group offload"


# Most important first; the budget stops the walk cleanly wherever it runs out. Every point before
# the first LoRA point runs on the plain model; LoRA layers are switched on for the rest (a server
# with FLUX_LORA_MAX_PER_REQUEST > 0, the default: a compiled transformer then has LoRA graphs too,
# and pads a LoRA batch's deltas to the smallest rank bucket that holds them). ``compile`` is the
# default scope (regional, "regular" keeps its first-block cache); ``compile:model`` the whole
# transformer as one graph, last: it takes minutes to compile, and undoes the regional compile.
PLAN: tuple[Point | ServedPath, ...] = (
    Point("compile", "1024", 1, accelerations=("none", "regular")),  # the default fal request, as served
    ServedPath(),
    Point("torch", "1024", 1, accelerations=("none", "regular")),
    Point("compile", "1024", 2),
    Point("compile", "512", 1, accelerations=("none", "regular")),
    Point("compile", "1024", 1, "deltas"),
    Point("compile", "1024", 2, "mixed", ("none", "regular")),
    Point("torch", "1024", 2),
    Point("torch", "1024", 1, "deltas"),
    Point("torch", "512", 1),
    Point("compile", "512", 2, "mixed"),
    Point("compile:model", "1024", 1),
    QuantizedCells(),
)


def one_of_each(plan) -> list:
    """The first point of each kind (backend, with or without LoRAs) and the served path: what the
    CPU smoke test walks, so that it covers every code path without every size and batch."""
    seen, picked = set(), []
    for item in plan:
        kind = type(item).__name__ if not isinstance(item, Point) else (item.backend, item.lora_mode != "none")
        if kind not in seen:
            seen.add(kind)
            picked.append(item)
    return picked


@dataclasses.dataclass(frozen=True)
class Profile:
    """Everything that differs between the GPU run and its CPU smoke mode (the code is the same)."""

    model: str
    sizes: dict[str, tuple[int, int]]
    steps: int
    strength: float
    max_sequence_length: int
    lora_rank: int
    repeats: int
    budget_s: float
    compile_allowance_s: float  # predicted cost of a compile at a new shape, until one was measured
    lora_setup_allowance_s: float  # making and loading the synthetic LoRAs, once
    served_estimate_s: float  # server start, model build, warm-up, the burst, the drain
    served_size: str  # for python -m benchmarks load --sizes
    served_concurrency: str
    served_duration_s: float
    served_requests: int  # at most, per concurrency level
    served_ready_timeout_s: float


GPU = Profile(
    model="random:flux-dev",
    sizes={"1024": (1024, 1024), "512": (512, 512)},
    steps=28,
    strength=0.85,
    max_sequence_length=512,
    lora_rank=64,
    repeats=3,
    budget_s=450.0,
    compile_allowance_s=150.0,
    lora_setup_allowance_s=30.0,
    served_estimate_s=200.0,  # build ~30 s, the compiled warm-up's graphs, the burst, the drain
    served_size="square_hd",
    served_concurrency="1,2",
    served_duration_s=20.0,
    served_requests=8,
    served_ready_timeout_s=300.0,
)
SMOKE = dataclasses.replace(
    GPU,
    model="tiny",
    sizes={"1024": (64, 64), "512": (32, 32)},
    steps=3,
    strength=0.6,  # 2 of the 3 steps run, as 24 of 28 at 0.85
    max_sequence_length=32,
    lora_rank=4,  # the tiny model's layers are 32 wide
    repeats=2,
    budget_s=300.0,
    compile_allowance_s=1.0,
    lora_setup_allowance_s=1.0,
    served_estimate_s=60.0,
    served_size="64x64",
    served_concurrency="1",
    served_duration_s=1.0,
    served_requests=2,
    served_ready_timeout_s=180.0,
)


class Interrupted(BaseException):
    """SIGTERM arrived (run.sh's timeout): stop now, keep what is written. Not an Exception, so the
    per-item error handling never swallows it."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the final save short
    raise Interrupted()


def safe_name(text: str) -> str:
    """Letters, digits, '.', '_' and '-' only: what the device tool brings back from $OUT."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def nvidia_smi() -> dict:
    """The driver (torch does not report it), and the card's clock and power limits as it is set."""
    fields = ("driver", "max_sm_clock", "power_limit")
    try:
        answer = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        answer = []
    values = [part.strip() for part in answer[0].split(",")] if answer else []
    return {field: value for field, value in zip(fields, values)} | {"driver": values[0] if values else None}


def matmul_tflops() -> float | None:
    """The bf16 matrix ceiling as this GPU gives it now: an 8192^3 product on random data, the median
    of 10 timed with CUDA events after 3 warm-ups (as KINDS.md measured it: ~790 TFLOP/s on an H200)."""
    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 8192**3 / sorted(times)[len(times) // 2] / 1e12


def environment() -> dict:
    import diffusers
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpu": None,
        "gpu_memory_bytes": None,
        "compute_capability": None,
        **nvidia_smi(),
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        env.update(
            gpu=properties.name,
            gpu_memory_bytes=properties.total_memory,
            compute_capability=f"{properties.major}.{properties.minor}",
        )
    return env


class DeviceRun:
    """The walk over PLAN, its budget, and the files it keeps up to date."""

    def __init__(self, profile: Profile, args, started: float):
        self.profile, self.args, self.started = profile, args, started
        self.deadline = started + args.budget_s
        self.out: Path = args.out
        self.history: list[tuple[str, float, float]] = []  # (backend, FLOPs per run, seconds per run)
        self.warmed: set[tuple] = set()
        self.compile_seconds: list[float] = []  # each first compiled run at a shape, less a steady run
        self.variants: dict[tuple[str, bool], object] = {}  # (backend, LoRA layers on) -> model variant
        self.loras: dict | None = None
        self.smoke = args.smoke
        self.results: dict = {}
        self.name = "device"

    # --- the model and its variants -------------------------------------------------------------

    def build(self, load: bool = True) -> None:
        """The environment and the results' frame, then (``load``: the plan measures points) the model."""
        from runners.config import AccelerationSettings, LoraSettings, ModelSettings
        from runners.pipeline.model import load_model

        profile = self.profile
        self.model_settings = ModelSettings(model=profile.model, max_sequence_length=profile.max_sequence_length)
        # the server's defaults (4 LoRAs of rank 128 at most): the rank buckets a compiled transformer
        # pads to are then 16 ... 512, and the plan's rank-64 LoRAs take the 64 (or 128 mixed) one
        self.lora_settings = LoraSettings()
        env = environment()
        env["matmul_bf16_tflops_measured"] = matmul_tflops()
        switches = AccelerationSettings()
        self.switches = dict(
            first_block_cache=switches.first_block_cache,
            tf32=switches.tf32,
            warmup_steps=switches.warmup_steps,
            max_consecutive_skips=switches.max_consecutive_skips,
        )
        self.threshold = switches.threshold
        self.peak = loop.device_peak_tflops(self.args.peak_tflops)
        device = self.model_settings.resolved_device()
        backends = list(dict.fromkeys(item.backend for item in PLAN if isinstance(item, Point)))
        self.results = {  # benchmarks/loop.py's schema, then what only this run records
            "model": profile.model,
            "backend": ",".join(backends),
            "device": device,
            "dtype": str(self.model_settings.resolved_dtype(device)),
            "gpu": env["gpu"],
            "cpu": platform.machine(),
            "torch": torch.__version__,
            "dollars_per_hour": self.args.dollars_per_hour,
            "peak_tflops": self.peak,
            "repeats": profile.repeats,
            "lora_rank": profile.lora_rank,
            "acceleration_switches": self.switches,
            "cells": [],
            "skipped": [],
            "environment": env,
            "profile": "smoke" if self.smoke else "gpu",
            "steps": profile.steps,
            "strength": profile.strength,
            "max_sequence_length": profile.max_sequence_length,
            "budget_s": self.args.budget_s,
            "model_build_s": None,
            "model_memory_bytes": None,
            "status": "building the model",
            "items": [],  # every item of the plan taken: ran, not run (with the reason) or failed
            "served": None,
        }
        where = env["gpu"] or platform.machine()
        self.name = safe_name(f"loop-{Path(profile.model).name}-{where}-device{'' if load else '-served'}")
        self.save()
        if not load:  # the served path alone: its server builds its own model
            self.results["status"] = "running"
            return
        built = time.perf_counter()
        self.model = load_model(self.model_settings, LoraSettings(max_per_request=0))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.results.update(
            model_build_s=time.perf_counter() - built,
            model_memory_bytes=torch.cuda.memory_allocated() if torch.cuda.is_available() else None,
            status="running",
        )

    def variant(self, backend: str):
        lora_on = self.model.lora_layers is not None
        if backend == "compile:model" and (backend, lora_on) not in self.variants:
            from runners.backends.compiled import uncompile

            uncompile(self.model.pipeline)  # the regional compile is in place: whole-model starts clean
        if (backend, lora_on) not in self.variants:
            variant, reason = loop.with_backend(self.model, backend, self.model_settings, self.lora_settings)
            if variant is None:
                raise RuntimeError(reason)
            self.variants[(backend, lora_on)] = variant
        return self.variants[(backend, lora_on)]

    def enable_loras(self) -> None:
        """LoRA layers on the transformer (as load_model does when FLUX_LORA_MAX_PER_REQUEST > 0), and
        the synthetic rank-``lora_rank`` LoRAs on its real layer shapes (benchmarks/lora.make_lora)."""
        from runners.lora.adapters import AdapterCache, enable_lora

        started = time.perf_counter()
        transformer = self.model.pipeline.transformer
        self.model.lora_layers = enable_lora(transformer)
        self.model.adapters = AdapterCache(
            transformer, self.lora_settings.memory_max_bytes, self.lora_settings.max_rank
        )
        most = max(item.batch for item in PLAN if isinstance(item, Point))
        self.loras = loop.lora_sets(self.model, list(loop.LORA_MODES), self.profile.lora_rank, [most])
        self.results["lora_setup_s"] = time.perf_counter() - started

    # --- prediction and the walk ---------------------------------------------------------------

    def point_shape(self, point: Point) -> tuple[int, int, int]:
        """(width, height, denoising steps run) of a point."""
        from runners.pipeline.inpaint import plan_schedule

        width, height = self.profile.sizes[point.size]
        timesteps, _ = plan_schedule(
            self.model.pipeline.scheduler.config,
            self.profile.steps,
            self.profile.strength,
            (width // 16) * (height // 16),
        )
        return width, height, len(timesteps)

    def flops_per_run(self, point: Point) -> float:
        width, height, ran = self.point_shape(point)
        config = self.model.pipeline.transformer.config
        tokens = (width // 16) * (height // 16)
        return loop.transformer_flops(config, tokens, self.profile.max_sequence_length) * ran * point.batch

    def warm_key(self, point: Point) -> tuple:
        """What one warm-up serves: a shape on a backend. A compiled transformer also compiles again
        once LoRA layers are on (another graph); eager kernels do not care."""
        lora_on = self.model.lora_layers is not None or point.lora_mode != "none"
        compiled = point.backend.startswith("compile")
        return (point.backend, self.profile.sizes[point.size], point.batch, compiled and lora_on)

    def predicted_s(self, item) -> float | None:
        """Seconds the item should take, from what was measured; None: nothing to go on yet (run it)."""
        if isinstance(item, ServedPath):
            return self.profile.served_estimate_s
        if isinstance(item, QuantizedCells):
            # four models' cells (bf16, fp8, int8, offload), each its repeats plus a warm-up and a
            # reference run, plus ~80 s of host copies and quantizing (quantized.py's own estimate)
            bf16 = self.predicted_s(Point("torch", "1024", 1))
            return None if bf16 is None else 4 * (self.profile.repeats + 2) * bf16 / self.profile.repeats + 80
        flops = self.flops_per_run(item)
        seen = [h for h in self.history if h[0] == item.backend] or [h for h in self.history if h[0] == "torch"]
        if not seen:
            return None
        _, near_flops, near_seconds = min(seen, key=lambda h: abs(math.log(h[1] / flops)))
        warmed = self.warm_key(item) in self.warmed
        runs = self.profile.repeats * len(item.accelerations) + (0 if warmed else 1)
        extra = 0.0
        if item.backend.startswith("compile") and not warmed:  # the longest compile seen, or the allowance
            extra += max(self.compile_seconds, default=self.profile.compile_allowance_s)
        if item.lora_mode != "none" and self.loras is None:
            extra += self.profile.lora_setup_allowance_s
        return 1.1 * runs * near_seconds * flops / near_flops + extra

    def walk(self, plan) -> None:
        for item in plan:
            remaining = self.deadline - time.monotonic()
            predicted = self.predicted_s(item)
            record = {"item": item.label(self.profile), "predicted_s": predicted}
            if remaining <= 0 or (predicted is not None and predicted > remaining):
                record.update(
                    status="not run", reason=f"time budget: needs ~{predicted or 0:.0f} s, {remaining:.0f} s left"
                )
                print(f"not run: {record['item']} ({record['reason']})", flush=True)
                self.results["items"].append(record)
                continue
            print(
                f"--- {record['item']} (predicted {'?' if predicted is None else f'{predicted:.0f}'} s, {remaining:.0f} s left)",
                flush=True,
            )
            started = time.monotonic()
            self.results["items"].append(record)
            try:
                if isinstance(item, ServedPath):
                    self.run_served()
                elif isinstance(item, QuantizedCells):
                    self.run_quantized()
                else:
                    self.run_point(item)
                record["status"] = "ran"
            except Exception as exc:  # noqa: BLE001 - one failed item must not cost the others' figures
                record.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:2000])
                print(f"failed: {record['item']}: {record['reason']}", flush=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            record["seconds"] = time.monotonic() - started
            self.save()

    def run_point(self, point: Point) -> None:
        from runners.config import AccelerationSettings
        from runners.pipeline.inpaint import Inpainter

        if point.lora_mode != "none" and self.loras is None:
            self.enable_loras()
        model = self.variant(point.backend)
        variants = [(name, None if name == "none" else self.threshold) for name in point.accelerations]
        inpainters = {
            (name, threshold): Inpainter(model, AccelerationSettings(**self.switches, threshold=threshold or 0.0))
            for name, threshold in variants
        }
        width, height, _ = self.point_shape(point)
        loras = self.loras or {"none": [[] for _ in range(point.batch)]}
        compiled = point.backend.startswith("compile")
        eager = self.smoke or not compiled
        stance = torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext()
        with stance:
            warmup_s = None
            key = self.warm_key(point)
            if key not in self.warmed:  # one warm-up per shape: a compile happens here, and is timed
                name, threshold = variants[0]
                model.fuse_uniform_loras = point.lora_mode == "fused"
                requests = loop.cell_requests(
                    width, height, self.profile.steps, self.profile.strength, point.batch, name, loras[point.lora_mode]
                )
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                started = time.perf_counter()
                inpainters[(name, threshold)].run(requests)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                warmup_s = time.perf_counter() - started
                self.warmed.add(key)
            graphs_before = graphs_compiled()
            figures = SimpleNamespace(
                repeats=self.profile.repeats,
                warmup=0,
                max_sequence_length=self.profile.max_sequence_length,
                dollars_per_hour=self.args.dollars_per_hour,
            )
            cells = loop.point_cells(
                model,
                point.backend,
                inpainters,
                variants,
                loras,
                ((width, height), self.profile.steps, self.profile.strength, point.batch, point.lora_mode),
                figures,
                self.peak,
            )
            recompiles = graphs_compiled() - graphs_before
        first = variants[0][0]
        requests = loop.cell_requests(
            width, height, self.profile.steps, self.profile.strength, point.batch, first, loras[point.lora_mode]
        )
        transfers = host_transfers_per_step(inpainters[variants[0]], requests, width, height)
        measured = self.results["environment"]["matmul_bf16_tflops_measured"]
        for cell in cells:
            cell.update(
                item=point.label(self.profile),
                warmup_s=warmup_s,
                # the first run at a shape, less a steady one: what torch.compile cost there
                compile_s=warmup_s - cell["median_s"] if compiled and warmup_s is not None else None,
                # graphs dynamo built while the cell was measured, after its warm-up: 0, or a recompile
                recompiles=recompiles,
                host_transfers_per_step=transfers,
                lora_layers=self.model.lora_layers is not None,
                lora_rank_buckets=model.lora_rank_buckets,
                fraction_of_measured_matmul=cell["achieved_tflops"] / measured if measured else None,
            )
            self.history.append((point.backend, cell["transformer_tflop"] * 1e12, cell["median_s"]))
            if cell["compile_s"] is not None:
                self.compile_seconds.append(cell["compile_s"])
        self.results["cells"] += cells

    @staticmethod
    def served_compiles(base: str) -> float | None:
        """``flux_compiles_total`` of the served model worker, None if it has none."""
        import httpx

        text = httpx.get(f"{base}/metrics", timeout=10).text
        found = re.findall(r"^flux_compiles_total (\S+)$", text, re.M)
        return float(found[0]) if found else None

    def run_served(self) -> None:
        """The same model behind ``bentoml serve`` (its own process), driven by ``python -m benchmarks
        load`` for a short bounded burst (load.json/load.md in --out); the server is stopped after."""
        from benchmarks import load

        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the server's process builds its own copy of the model
        profile = self.profile
        scratch = Path(tempfile.mkdtemp(prefix="device-serve-"))
        env = {
            "FLUX_MODEL": profile.model,
            "FLUX_MAX_SEQUENCE_LENGTH": str(profile.max_sequence_length),
            "BENTOML_HOME": str(scratch / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "True",  # offline: its analytics call would wait for a timeout
            "FLUX_CACHE_DIR": os.environ.get("FLUX_CACHE_DIR", str(scratch / "cache")),
        }
        log_path = self.out / "serve.log"
        self.out.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        served = {
            "url": None,
            "log": log_path.name,
            "startup_s": None,
            "levels": None,
            "compiles_at_ready": None,  # graphs the start-up warm-up compiled
            "compiles_while_serving": None,  # graphs compiled during the burst: 0, or a recompile
        }
        self.results["served"] = served
        ready_within = min(profile.served_ready_timeout_s, self.deadline - time.monotonic())
        with serving.bentoml_serve(log_path, env, ready_timeout_s=ready_within) as server:
            base = served["url"] = server.url
            served["startup_s"] = time.monotonic() - started
            served["compiles_at_ready"] = self.served_compiles(base)
            print(f"served: ready in {served['startup_s']:.0f} s", flush=True)
            figures = load.main(
                ["--url", base, "--concurrency", profile.served_concurrency, "--sizes", profile.served_size]
                + ["--steps", str(profile.steps), "--routes", "sync", "--duration", str(profile.served_duration_s)]
                + ["--requests", str(profile.served_requests), "--timeout", "180"]
                + ["--dollars-per-hour", str(self.args.dollars_per_hour), "--out", str(self.out)]
            )
            served["levels"] = figures["levels"]
            after = self.served_compiles(base)
            if after is not None and served["compiles_at_ready"] is not None:
                served["compiles_while_serving"] = after - served["compiles_at_ready"]

    def run_quantized(self) -> None:
        """The quantized cells on this run's model (its transformer is swapped: the plan's last item)."""
        from benchmarks.device.quantized import run_quantized_cells

        self.variants.clear()  # compiled variants hold the transformer the cells replace
        profile = self.profile
        width, height = profile.sizes["1024"]
        self.results["quantized"] = run_quantized_cells(
            self.model,
            workdir=self.out / "quantized",
            deadline=self.deadline,
            request=dict(width=width, height=height, steps=profile.steps, strength=profile.strength),
            repeats=max(1, profile.repeats - 1),
            lora_rank=min(16, profile.lora_rank),
        )

    # --- the files ----------------------------------------------------------------------------

    def save(self, final: bool = False) -> None:
        """The loop's JSON and Markdown, with this run's section, replacing the previous ones whole:
        a kill between two saves leaves the last complete pair."""
        if not self.results:
            return
        staging = Path(tempfile.mkdtemp(prefix="device-results-"))
        quiet = contextlib.nullcontext() if final else contextlib.redirect_stdout(io.StringIO())
        with quiet:
            loop.write(self.results, staging, self.name)
        markdown = staging / f"{self.name}.md"
        markdown.write_text(markdown.read_text() + "\n".join(self.section()) + "\n")
        self.out.mkdir(parents=True, exist_ok=True)
        for file in staging.iterdir():
            partial = self.out / f".{file.name}.partial"
            shutil.copyfile(file, partial)
            os.replace(partial, self.out / file.name)
        shutil.rmtree(staging, ignore_errors=True)

    def section(self) -> list[str]:
        r, env = self.results, self.results["environment"]
        gib = lambda b: f"{b / 2**30:.1f} GiB" if b else "n/a"  # noqa: E731
        matmul = env["matmul_bf16_tflops_measured"]
        lines = [
            "",
            "## This run",
            "",
            f"Status: **{r['status']}** (budget {r['budget_s']:.0f} s). {r['steps']} steps at strength "
            f"{r['strength']}, {r['max_sequence_length']} text tokens. Model {r['model']} built in "
            f"{'n/a' if r['model_build_s'] is None else format(r['model_build_s'], '.1f')} s "
            f"({gib(r['model_memory_bytes'])} on the device).",
            "",
            f"GPU {env['gpu'] or 'none'} ({gib(env['gpu_memory_bytes'])}, compute capability "
            f"{env['compute_capability'] or 'n/a'}), driver {env['driver'] or 'n/a'}, torch {env['torch']}, "
            f"CUDA {env['cuda'] or 'n/a'}, cuDNN {env['cudnn'] or 'n/a'}, diffusers {env['diffusers']}, "
            f"transformers {env['transformers']}, Python {env['python']}, {env['cpu_count']} CPUs. "
            + (
                f"bf16 matmul ceiling measured here: {matmul:.0f} TFLOP/s (8192^3, median of 10); "
                f"'of peak' above is against the datasheet's {r['peak_tflops']:g}."
                if matmul
                else "No GPU: no fraction of peak."
            ),
            "",
            "| item | status | predicted s | took s | warm-up s | compile s | recompiles | host transfers/step "
            "| reason |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        fmt = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
        for item in r["items"]:
            cells = [c for c in r["cells"] if c.get("item") == item["item"]]
            warmup = next((c["warmup_s"] for c in cells if c["warmup_s"] is not None), None)
            compiled = next((c["compile_s"] for c in cells if c["compile_s"] is not None), None)
            recompiles = sum(c["recompiles"] for c in cells[:1]) if cells else None
            transfers = cells[0]["host_transfers_per_step"] if cells else None
            lines.append(
                f"| {item['item']} | {item.get('status', 'running')} | {fmt(item['predicted_s'])} | "
                f"{fmt(item.get('seconds'))} | {fmt(warmup)} | {fmt(compiled)} | "
                f"{'' if recompiles is None else recompiles} | {fmt(transfers)} | {item.get('reason', '')} |"
            )
        if r["served"]:
            s = r["served"]
            lines += [
                "",
                f"Served path: `bentoml serve` ready in {fmt(s['startup_s'])} s; the burst's figures are in "
                f"load.md (log: {s['log']}). flux_compiles_total: {s.get('compiles_at_ready')} at ready, "
                f"{s.get('compiles_while_serving')} more while serving.",
            ]
        if r.get("quantized"):
            from benchmarks.device.quantized import markdown

            lines += ["", "Quantized transformers and group offload (benchmarks/device/quantized.py):", ""]
            lines += markdown(r["quantized"])
        return lines


def graphs_compiled() -> int:
    from runners.backends.compiled import graphs_compiled as count

    return count()


def host_transfers_per_step(inpainter, requests, width: int, height: int, steps: int = 2) -> float | None:
    """Host-device transfers (reads and blocking copies: runners/pipeline/host_reads.py) of a steady
    denoising step of ``requests``: their first step runs uncounted (it makes the device constants),
    then up to ``steps`` steps are counted. The counter is a dispatch mode, which cannot run inside a
    compiled graph, so the step runs under ``force_eager``: the same loop code, and a fullgraph
    block makes no transfer of its own. None when the counter is not there."""
    try:
        from runners.pipeline.host_reads import count_host_reads
    except ImportError:
        return None
    counted = taken = 0
    with torch.inference_mode(), torch.compiler.set_stance("force_eager"):
        samples = inpainter.prepare(requests, width, height)
        with inpainter.loras_applied([r.loras for r in requests]):
            inpainter.step(samples, width, height)
            while taken < steps and not all(s.done for s in samples):
                active = [s for s in samples if not s.done]
                with count_host_reads() as transfers:
                    inpainter.step(active, width, height)
                counted += transfers.count
                taken += 1
    return counted / taken if taken else None


def summary(results: dict) -> list[str]:
    """The short table printed last (the device tool's reply carries the end of the output)."""
    lines = [
        "",
        "| item | acceleration | s/image | MP/s | of peak | peak memory | $/MP | compile s | recompiles "
        "| host transfers/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["cells"]:
        of_peak = f"{c['fraction_of_peak']:.0%}" if c["fraction_of_peak"] is not None else "n/a"
        memory = f"{c['peak_memory_bytes'] / 2**30:.1f} GiB" if c["peak_memory_bytes"] else "n/a"
        compiled = f"{c['compile_s']:.0f}" if c["compile_s"] is not None else ""
        lines.append(
            f"| {c['item']} | {c['acceleration']} | {c['seconds_per_image']:.3f} | {c['megapixels_per_s']:.3f} | "
            f"{of_peak} | {memory} | {c['cost_per_mp']:.5f} | {compiled} | {c['recompiles']} | "
            f"{'' if c['host_transfers_per_step'] is None else format(c['host_transfers_per_step'], '.1f')} |"
        )
    if results["served"]:
        served = results["served"]
        lines.append(
            f"served: flux_compiles_total {served.get('compiles_at_ready')} at ready, "
            f"{served.get('compiles_while_serving')} more while serving"
        )
    for level in (results["served"] or {}).get("levels") or []:
        lines.append(
            f"served, concurrency {level['concurrency']}: {level['succeeded']}/{level['requests']} ok, "
            f"{level['images_per_s']:.3f} images/s, p50 {level['p50_s']} s, mean batch {level['mean_batch_size']}"
        )
    not_run = [i["item"] for i in results["items"] if i.get("status") != "ran"]
    lines.append(f"\nstatus: {results['status']}; not run or failed: {', '.join(not_run) or 'none'}")
    return lines


def main(argv: list[str] | None = None) -> dict:
    started = time.monotonic()
    parser = argparse.ArgumentParser(prog="python -m benchmarks device", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny model on the CPU at toy sizes, in seconds")
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default: $OUT, else benchmarks/results)"
    )
    parser.add_argument("--budget-s", type=float, default=None, help="seconds for everything, from the start")
    parser.add_argument(
        "--served",
        choices=("auto", "off", "only"),
        default="auto",
        help="the served path: in the plan, left out, or alone",
    )
    parser.add_argument(
        "--dollars-per-hour", type=float, default=2.99, help="price of the machine (default: an H100 on demand)"
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak, if not in loop.py's table")
    parser.add_argument(
        "--one-of-each", action="store_true", help="walk only the first point of each kind (the smoke test's plan)"
    )
    args = parser.parse_args(argv)
    profile = SMOKE if args.smoke else GPU
    args.out = args.out or Path(os.environ.get("OUT") or REPO / "benchmarks" / "results")
    args.budget_s = profile.budget_s if args.budget_s is None else args.budget_s
    plan = one_of_each(PLAN) if args.one_of_each else list(PLAN)
    plan = [item for item in plan if args.served == "auto" or (isinstance(item, ServedPath) == (args.served == "only"))]
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    run = DeviceRun(profile, args, started)
    try:
        run.build(load=any(isinstance(item, Point) for item in plan))
        run.save()
        run.walk(plan)
        cut = any(i.get("status") == "not run" for i in run.results["items"])
        run.results["status"] = "cut by the time budget" if cut else "complete"
    except Interrupted:
        if run.results:
            run.results["status"] = "interrupted by SIGTERM"
            for item in run.results["items"]:
                item.setdefault("status", "interrupted")
        print("interrupted by SIGTERM: the results so far are written", flush=True)
        raise SystemExit(143) from None
    finally:
        if run.results:
            run.results["total_s"] = time.monotonic() - started
            run.save(final=True)
            print("\n".join(summary(run.results)), flush=True)
        signal.signal(signal.SIGTERM, previous)
    return run.results
