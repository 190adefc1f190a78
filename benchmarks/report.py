"""python -m benchmarks report: PNG plots of the results under benchmarks/results.

- ``load-latency.png``: latency p50/p95/p99 against concurrency (from ``load.json``);
- ``loop-throughput.png``: megapixels per second and dollars per megapixel against batch size, one
  line per size, backend, LoRA mode and acceleration (from every ``loop-*.json``).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def plot_load(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    levels = results["levels"]
    concurrency = [level["concurrency"] for level in levels]
    figure, axis = plt.subplots(figsize=(6, 4))
    for key in ("p50_s", "p95_s", "p99_s"):
        axis.plot(concurrency, [level[key] for level in levels], marker="o", label=key.removesuffix("_s"))
    axis.set_xlabel("concurrent clients")
    axis.set_ylabel("latency (s)")
    axis.set_title(f"Latency against concurrency ({results['url']})", fontsize=9)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_loop(runs: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, (throughput, cost) = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        by_line = defaultdict(list)
        for cell in run["cells"]:  # one line per cell of the matrix but the batch size
            variant = (
                cell.get("backend", run["backend"]),
                cell.get("lora_mode", "none"),
                cell.get("acceleration", "none"),
                cell.get("threshold") or 0.0,
            )
            by_line[(*variant, cell["width"], cell["height"], cell["steps_run"])].append(cell)
        where = run["gpu"] or run["cpu"]
        for (backend, lora_mode, acceleration, threshold, width, height, steps), cells in sorted(by_line.items()):
            cells.sort(key=lambda c: c["batch"])
            label = f"{Path(run['model']).name} {backend} {where}: {width}x{height}, {steps} steps"
            label += f", LoRA {lora_mode}" if lora_mode != "none" else ""
            label += f", regular @{threshold:g}" if acceleration == "regular" else ""
            batches = [c["batch"] for c in cells]
            throughput.plot(batches, [c["megapixels_per_s"] for c in cells], marker="o", label=label)
            cost.plot(batches, [c["cost_per_mp"] for c in cells], marker="o", label=label)
    throughput.set_xlabel("batch size")
    throughput.set_ylabel("megapixels per second")
    cost.set_xlabel("batch size")
    cost.set_ylabel("$ per megapixel")
    cost.axhline(0.035, color="grey", linestyle="--", label="fal: $0.035/MP")
    cost.set_yscale("log")
    throughput.legend(fontsize=7)
    cost.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    written = []
    if (load := args.results / "load.json").exists():
        plot_load(json.loads(load.read_text()), args.results / "load-latency.png")
        written.append(args.results / "load-latency.png")
    runs = [json.loads(p.read_text()) for p in sorted(args.results.glob("loop-*.json"))]
    if runs:
        plot_loop(runs, args.results / "loop-throughput.png")
        written.append(args.results / "loop-throughput.png")
    for path in written:
        print(path)
    if not written:
        print(f"no results in {args.results}: run `python -m benchmarks run` or `load` first")
    return written
