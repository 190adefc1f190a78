"""python -m benchmarks batching: adaptive against continuous batching (FLUX_BATCHING), on one build.

    python -m benchmarks batching --loads 0.5,0.8 --duration 150 --requests 60

It serves the model once per mode with ``bentoml serve`` on free loopback ports and warms both
up; then, driving one server at a time and alternating the modes cell by cell (so drift in the
machine's other load falls on both alike), measures each one's capacity on the request mix (closed
loop: ``--capacity-clients`` clients, each sending its next request when the last one ends), then
offers open-loop Poisson arrivals (benchmarks/load.py) at each fraction of the *first* mode's
(adaptive's) capacity, so both modes see the same arrival times and requests. The mix: steps
8/28/50 x two sizes x with and without a LoRA (a random rank-4 LoRA written for the model).
Results: ``batching.json``, ``batching.md`` and ``batching.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from .load import MIX_SIZES, level, open_loop, open_loop_table, request_mix
from .serving import bentoml_serve

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def served(mode: str, home: Path, env: dict[str, str]):
    """``bentoml serve`` of service.py with FLUX_BATCHING=mode (benchmarks/serving.py); yields its URL
    once /readyz is 200."""
    # A BENTOML_HOME per server: it holds the Prometheus multiprocess files, which a second server
    # would otherwise clear and share (the first run with both up lost adaptive's worker metrics).
    env = {"BENTOML_HOME": str(home / f"bentoml-{mode}"), **env, "FLUX_BATCHING": mode}
    with bentoml_serve(home / f"serve-{mode}.log", env, ready_timeout_s=600, stop_grace_s=60) as server:
        yield server.url


def write_lora(directory: Path, model: str) -> str:
    """A rank-4 LoRA over the transformer blocks' Linears of ``model``; returns its file name."""
    from runners.config import ModelSettings
    from runners.lora.formats import linear_shapes
    from runners.pipeline.model import load_model

    from .lora import make_lora

    path, _ = make_lora(directory, linear_shapes(load_model(ModelSettings(model=model)).pipeline.transformer), 4, 1)
    return path.name


def padding_probe(model_name: str, sizes: list[str], per_size: int = 2, repeats: int = 5) -> dict:
    """What one padded forward could save over interleaving: the transformer over ``per_size``
    samples of each size as one forward per size, against all of them in one forward at the larger
    size's token count. The padded figure is a lower bound (no attention mask, shared positions):
    padding for real needs a mask and per-sample rotary positions inside the transformer."""
    import statistics

    import torch

    from runners.config import ModelSettings
    from runners.pipeline.model import load_model

    model = load_model(ModelSettings(model=model_name))
    pipe, transformer = model.pipeline, model.transformer
    text = torch.zeros(1, model.max_sequence_length, 3)[0]
    dims = pipe.transformer.config

    def inputs(width: int, height: int, batch: int) -> dict:
        h, w = height // 16, width // 16
        generator = torch.Generator().manual_seed(0)
        return dict(
            hidden_states=torch.randn(batch, h * w, dims.in_channels, generator=generator),
            encoder_hidden_states=torch.randn(batch, text.shape[0], dims.joint_attention_dim, generator=generator),
            pooled_projections=torch.randn(batch, dims.pooled_projection_dim, generator=generator),
            timestep=torch.full((batch,), 0.5),
            guidance=torch.full((batch,), 3.5) if transformer.guidance_embeds else None,
            img_ids=pipe._prepare_latent_image_ids(None, h, w, "cpu", torch.float32),
            txt_ids=text,
        )

    def median(fn) -> float:
        fn()
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - started)
        return statistics.median(samples)

    parsed = [tuple(int(v) for v in size.split("x")) for size in sizes]
    largest = max(parsed, key=lambda wh: wh[0] * wh[1])
    with torch.inference_mode():
        groups = [inputs(w, h, per_size) for w, h in parsed]
        padded = inputs(*largest, per_size * len(parsed))
        interleaved_s = median(lambda: [transformer(**g) for g in groups])
        padded_s = median(lambda: transformer(**padded))
    return {
        "sizes": sizes,
        "samples_per_size": per_size,
        "text_tokens": text.shape[0],
        "interleaved_s": interleaved_s,
        "padded_lower_bound_s": padded_s,
        "padded_over_interleaved": padded_s / interleaved_s,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks batching", description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="adaptive,continuous")
    parser.add_argument("--loads", default="0.5,0.8", help="fractions of the adaptive capacity to offer")
    parser.add_argument("--duration", type=float, default=150.0, help="seconds of arrivals per load level")
    parser.add_argument("--requests", type=int, default=60, help="at most this many arrivals per load level")
    parser.add_argument("--capacity-clients", type=int, default=8)
    parser.add_argument("--capacity-duration", type=float, default=90.0)
    parser.add_argument("--sizes", default=MIX_SIZES)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--torch-threads",
        default="1",
        help="OMP_NUM_THREADS of the servers: 1 on a shared CPU, where two OpenMP threads made steps ~10x slower "
        "(benchmarks/results/load-executors.md)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--padding-probe", action="store_true", help="only measure one padded forward against interleaved ones"
    )
    args = parser.parse_args(argv)
    if args.padding_probe:
        probe = padding_probe(os.environ.get("FLUX_MODEL", "tiny"), args.sizes.split(","))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "batching-padding.json").write_text(json.dumps(probe, indent=2))
        print(json.dumps(probe, indent=2))
        return probe
    home = Path(tempfile.mkdtemp(prefix="flux-batching-"))
    lora_dir = home / "loras"
    lora_dir.mkdir()
    cache = home / "cache"
    os.environ["XDG_CACHE_HOME"] = str(cache)  # the tiny model is written there once, for every server
    env = {"FLUX_LORA_DIR": str(lora_dir), "XDG_CACHE_HOME": str(cache), "OMP_NUM_THREADS": args.torch_threads}
    lora = write_lora(lora_dir, os.environ.get("FLUX_MODEL", "tiny"))
    bodies = request_mix(args.sizes.split(","), [[{"path": lora, "scale": 1.0}]])
    results = {
        "command": "python -m benchmarks batching " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "model": os.environ.get("FLUX_MODEL", "tiny"),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": args.torch_threads,
        "load_average_at_start": os.getloadavg(),
        "mix": {"steps": [8, 28, 50], "sizes": args.sizes.split(","), "loras": ["none", lora]},
        "capacity": {},
        "levels": [],
    }
    modes = args.modes.split(",")
    with contextlib.ExitStack() as stack:
        urls = {mode: stack.enter_context(served(mode, home, env)) for mode in modes}
        for url in urls.values():
            for body in bodies[:: max(1, len(bodies) // 4)]:  # warm-up: both sizes, with and without the LoRA
                httpx.post(f"{url}/fal-ai/flux-lora/inpainting", json={**body, "num_inference_steps": 2}, timeout=600)
        # Cell by cell, alternating the modes, so a change in the machine's other load over the run
        # falls on both alike; the idle server of the pair costs next to nothing.
        for mode, url in urls.items():
            load_before = os.getloadavg()[0]
            capacity = asyncio.run(
                level(url, {}, args.capacity_clients, bodies, ["queue"], args.capacity_duration, 10**6, args.timeout)
            )
            results["capacity"][mode] = {**capacity, "load_average_before": load_before}
            print(f"{mode}: capacity {capacity['images_per_s']:.3f} requests/s", flush=True)
        base = results["capacity"][modes[0]]["images_per_s"]  # the first mode's capacity sets the loads
        for fraction in args.loads.split(","):
            for mode, url in urls.items():
                load_before = os.getloadavg()[0]
                rate = float(fraction) * base
                figures = asyncio.run(
                    open_loop(url, {}, rate, bodies, args.duration, args.requests, args.timeout, args.seed)
                )
                results["levels"].append(
                    {"target": mode, "load": float(fraction), "load_average_before": load_before, **figures}
                )
                print(f"{mode} at {fraction} of capacity: {json.dumps(figures)}", flush=True)
    results["load_average_at_end"] = os.getloadavg()
    write(results, args.out)
    return results


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "batching.json").write_text(json.dumps(results, indent=2))
    fmt = lambda v, spec=".2f": "n/a" if v is None else format(v, spec)  # noqa: E731
    lines = [
        f"# Adaptive against continuous batching ({results['model']}, {results['cpus']} CPUs)",
        "",
        f"`{results['command']}`",
        "",
        f"Mix: steps {results['mix']['steps']} x sizes {results['mix']['sizes']} x LoRA {results['mix']['loras']}, "
        "drawn at random per arrival (the same draws and arrival times for both modes).",
        "",
        "Capacity (closed loop): "
        + ", ".join(
            f"{mode} {c['images_per_s']:.3f} requests/s (p95 {fmt(c['p95_s'])} s)"
            for mode, c in results["capacity"].items()
        )
        + ". Offered loads are fractions of the first mode's capacity.",
        "",
        *open_loop_table(results["levels"], label="mode"),
        "",
    ]
    by = {(f["target"], f["load"]): f for f in results["levels"]}
    for load in sorted({f["load"] for f in results["levels"]}):
        a, c = by.get(("adaptive", load)), by.get(("continuous", load))
        if a and c and a["p95_s"] and c["p95_s"]:
            lines.append(
                f"- at {load:.0%} load: continuous p95 is {c['p95_s'] / a['p95_s']:.2f}x adaptive's, "
                f"throughput {c['requests_per_s'] / a['requests_per_s']:.2f}x, time to first step p50 "
                f"{fmt(c['first_step_p50_s'])} s against {fmt(a['first_step_p50_s'])} s"
            )
    (out / "batching.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "batching.png")
    print("\n".join(lines))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, first) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, color in (("adaptive", "tab:blue"), ("continuous", "tab:orange")):
        levels = sorted((f for f in results["levels"] if f["target"] == mode), key=lambda f: f["load"])
        if not levels:
            continue
        loads = [f["load"] for f in levels]
        for key, style in (("p50_s", ":"), ("p95_s", "-"), ("p99_s", "--")):
            latency.plot(loads, [f[key] for f in levels], style, color=color, marker="o", label=f"{mode} {key[:-2]}")
        first.plot(loads, [f["first_step_p50_s"] for f in levels], "-", color=color, marker="o", label=f"{mode} p50")
        first.plot(loads, [f["first_step_p95_s"] for f in levels], "--", color=color, marker="o", label=f"{mode} p95")
    latency.set(xlabel="offered load (fraction of adaptive capacity)", ylabel="latency (s)", title="Latency")
    first.set(xlabel="offered load (fraction of adaptive capacity)", ylabel="seconds", title="Time to first step")
    for axis in (latency, first):
        axis.legend(fontsize=7)
    figure.suptitle(f"{results['model']} on {results['cpus']} CPUs: {results['command']}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
