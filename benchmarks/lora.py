"""LoRA costs, measured: hot-swap latency, per-step cost of deltas against fused weights, and a
mixed-LoRA batch against the same requests split into one batch per LoRA.

    python -m benchmarks.lora [--model tiny] [--ranks 4,16,32] [--repeats 5] [--out benchmarks/results]

Warm-up first, then medians (and p95) over repeated runs, all ratios measured in the same run.
On the CPU with the tiny model the figures show overheads, not FLUX speed; the same command on a
GPU host with ``--model black-forest-labs/FLUX.1-dev`` gives the real ones.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .stats import percentile


def timed(fn, repeats: int, warmup: int = 1) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - started)
    return {"median_s": statistics.median(samples), "p95_s": percentile(samples, 0.95)}


def make_lora(directory: Path, shapes: dict, rank: int, seed: int):
    """A diffusers-format LoRA on every Linear of the transformer blocks (the common FLUX target set)."""
    import hashlib

    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (fan_in, fan_out) in shapes.items():
        if "transformer_blocks." in module and min(fan_in, fan_out) >= rank:
            tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.01
            tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.01
    path = directory / f"rank{rank}-{seed}.safetensors"
    save_file(tensors, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--ranks", default="4,16,32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    from PIL import Image

    from runners.config import LoraSettings, ModelSettings
    from runners.lora.adapters import activate, deactivate, fuse, set_rows, unfuse
    from runners.lora.formats import linear_shapes
    from runners.pipeline.inpaint import Inpainter, InpaintInputs
    from runners.pipeline.model import load_model

    model = load_model(
        ModelSettings(model=args.model, max_sequence_length=64), LoraSettings(max_per_request=4, max_rank=1024)
    )
    transformer, layers = model.pipeline.transformer, model.lora_layers
    shapes = linear_shapes(transformer)
    ranks = [int(r) for r in args.ranks.split(",")]
    tmp = Path(tempfile.mkdtemp())
    files = {(rank, seed): make_lora(tmp, shapes, rank, seed) for rank in ranks for seed in range(4)}

    def adapter(rank, seed):
        path, sha = files[(rank, seed)]
        return model.adapters.get(path, sha, path.name)

    results: dict = {
        "device": str(model.device),
        "dtype": str(model.dtype),
        "model": args.model,
        "machine": platform.machine(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "size": args.size,
        "steps": args.steps,
        "repeats": args.repeats,
        "ranks": {},
    }
    tokens = (args.size // 16) ** 2
    hidden = torch.randn(
        1,
        tokens,
        64 if args.model == "tiny" else transformer.config.in_channels,
        device=model.device,
        dtype=model.dtype,
    )
    text = torch.randn(1, 64, transformer.config.joint_attention_dim, device=model.device, dtype=model.dtype)
    forward_args = dict(
        hidden_states=hidden,
        encoder_hidden_states=text,
        pooled_projections=torch.randn(
            1, transformer.config.pooled_projection_dim, device=model.device, dtype=model.dtype
        ),
        timestep=torch.tensor([0.5], device=model.device, dtype=model.dtype),
        guidance=torch.tensor([3.5], device=model.device),
        img_ids=torch.zeros(tokens, 3, device=model.device),
        txt_ids=torch.zeros(64, 3, device=model.device),
        return_dict=False,
    )

    def forward():
        with torch.inference_mode():
            transformer(**forward_args)

    set_rows(layers, torch.tensor([0], device=model.device))
    base = timed(forward, args.repeats)
    for rank in ranks:
        model.adapters._adapters.clear()
        load = timed(lambda rank=rank: (model.adapters._adapters.clear(), adapter(rank, 0)), args.repeats, warmup=0)
        request = [(adapter(rank, 0), 1.0)]
        swap = timed(lambda request=request: activate(layers, [request]), args.repeats)
        delta = timed(forward, args.repeats)
        deactivate(layers)
        fuse_unfuse = timed(
            lambda request=request: unfuse(layers, fuse(layers, request, keep_originals=True)), args.repeats
        )
        fused_state = fuse(layers, request, keep_originals=True)
        fused = timed(forward, args.repeats)
        unfuse(layers, fused_state)
        results["ranks"][rank] = {
            "load_from_disk": load,
            "hot_swap_activate": swap,
            "fuse_and_restore": fuse_unfuse,
            "forward_base": base,
            "forward_deltas": delta,
            "forward_fused": fused,
            "delta_over_fused": delta["median_s"] / fused["median_s"],
        }

    # Four requests, four different LoRAs: one mixed batch against four single-LoRA batches.
    inpainter = Inpainter(model)
    image = Image.new("RGB", (args.size, args.size), (120, 140, 160))
    mask = Image.new("L", (args.size, args.size), 255)
    rank = ranks[len(ranks) // 2]
    requests = [
        InpaintInputs(
            prompt=f"p{i}",
            image=image,
            mask=mask,
            width=args.size,
            height=args.size,
            seed=i,
            num_inference_steps=args.steps,
            strength=1.0,
            enable_safety_checker=False,
            loras=[(adapter(rank, i), 1.0)],
        )
        for i in range(4)
    ]
    mixed = timed(lambda: inpainter.run(requests), args.repeats)
    split = timed(lambda: [inpainter.run([r]) for r in requests], args.repeats)
    results["mixed_batch"] = {
        "rank": rank,
        "requests": 4,
        "mixed": mixed,
        "split": split,
        "images_per_s_mixed": 4 / mixed["median_s"],
        "images_per_s_split": 4 / split["median_s"],
        "speedup": split["median_s"] / mixed["median_s"],
    }
    write(results, args.out)
    return results


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = f"lora-{results['model'].replace('/', '_')}-{results['device']}"
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    ms = lambda entry: f"{entry['median_s'] * 1000:.2f}"  # noqa: E731
    lines = [
        f"# LoRA costs: {results['model']} on {results['gpu'] or results['cpu']} ({results['device']}, {results['dtype']})",
        "",
        f"{results['size']}x{results['size']}, {results['steps']} steps, medians of {results['repeats']} runs (ms).",
        "",
        "| rank | load from disk | hot-swap (activate) | fuse + restore | forward base | forward deltas | forward fused | deltas / fused |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rank, r in results["ranks"].items():
        lines.append(
            f"| {rank} | {ms(r['load_from_disk'])} | {ms(r['hot_swap_activate'])} | {ms(r['fuse_and_restore'])} | "
            f"{ms(r['forward_base'])} | {ms(r['forward_deltas'])} | {ms(r['forward_fused'])} | {r['delta_over_fused']:.2f} |"
        )
    m = results["mixed_batch"]
    lines += [
        "",
        f"Mixed batch (4 requests, 4 different rank-{m['rank']} LoRAs): {m['images_per_s_mixed']:.2f} images/s "
        f"in one batch, {m['images_per_s_split']:.2f} images/s split into four: {m['speedup']:.2f}x.",
        "",
    ]
    (out / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
