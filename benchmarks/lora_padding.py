"""What padded LoRA deltas cost at FLUX.1-dev's real size, counted on the ``meta`` device (no weights,
no GPU): the transformer's forward FLOPs at 1024x1024 (4096 image tokens, 512 text tokens, one
sample) with deltas of each total rank on all its Linear layers, against none, and the bytes those
deltas take in bf16. A compiled transformer pads a LoRA batch to the smallest rank bucket that holds
it (runners/backends/compiled.py); a batch without LoRAs has no deltas at all.

    python -m benchmarks.lora_padding [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

RANKS = (0, 16, 32, 64, 128, 256, 512)


def count(width_tokens: int = 1024, text_tokens: int = 512) -> dict:
    from diffusers import FluxTransformer2DModel

    from runners.lora.adapters import Adapter, activate, deactivate, enable_lora, set_rows
    from runners.lora.formats import LoraLayer
    from runners.pipeline.random_model import FLUX_DEV

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX_DEV["transformer"]).to(torch.bfloat16).eval()
    layers = enable_lora(transformer)
    image_tokens = (width_tokens // 16) ** 2
    config = transformer.config
    inputs = dict(
        hidden_states=torch.empty(1, image_tokens, config.in_channels, device="meta", dtype=torch.bfloat16),
        encoder_hidden_states=torch.empty(
            1, text_tokens, config.joint_attention_dim, device="meta", dtype=torch.bfloat16
        ),
        pooled_projections=torch.empty(1, config.pooled_projection_dim, device="meta", dtype=torch.bfloat16),
        timestep=torch.empty(1, device="meta", dtype=torch.bfloat16),
        guidance=torch.empty(1, device="meta", dtype=torch.float32),
        img_ids=torch.empty(image_tokens, 3, device="meta", dtype=torch.bfloat16),
        txt_ids=torch.empty(text_tokens, 3, device="meta", dtype=torch.bfloat16),
        return_dict=False,
    )
    set_rows(layers, torch.zeros(1, dtype=torch.long, device="meta"))
    rows = []
    for rank in RANKS:
        if rank:
            adapter = Adapter(
                "padding",
                "padding",
                {
                    name: LoraLayer(
                        torch.empty(rank, m.in_features, device="meta", dtype=torch.bfloat16),
                        torch.empty(m.out_features, rank, device="meta", dtype=torch.bfloat16),
                        1.0,
                    )
                    for name, m in layers.items()
                },
                "meta",
            )
            activate(layers, [[(adapter, 1.0)]], pad_to=rank)
        else:
            deactivate(layers)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            transformer(**inputs)
        delta_bytes = sum(
            (m.lora_down.numel() + m.lora_up.numel()) * 2 for m in layers.values() if m.lora_down is not None
        )
        rows.append({"rank": rank, "tflop": counter.get_total_flops() / 1e12, "delta_bytes": delta_bytes})
    base = rows[0]["tflop"]
    for row in rows:
        row["extra_compute"] = row["tflop"] / base - 1
    return {
        "model": "FLUX.1-dev transformer (meta device)",
        "linear_layers": len(layers),
        "image_tokens": image_tokens,
        "text_tokens": text_tokens,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lora_padding", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    results = count()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora-padding-flux-dev.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"# Padded LoRA deltas on {results['model']}",
        "",
        f"One forward at 1024x1024 ({results['image_tokens']} image + {results['text_tokens']} text tokens, one "
        f"sample), deltas of the given total rank on all {results['linear_layers']} Linear layers; bytes in bf16. "
        "Counted with torch.utils.flop_counter on the meta device (`python -m benchmarks.lora_padding`).",
        "",
        "| total rank | TFLOP per forward | extra compute | delta bytes |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['rank'] or 'none'} | {r['tflop']:.2f} | {r['extra_compute']:+.1%} | {r['delta_bytes'] / 2**30:.2f} GiB |"
        for r in results["rows"]
    ]
    (args.out / "lora-padding-flux-dev.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
