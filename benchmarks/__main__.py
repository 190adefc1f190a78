"""python -m benchmarks <command>: ``run`` measures the inpainting loop directly (benchmarks/loop.py);
``load`` drives a running server over HTTP (benchmarks/load.py); ``batching`` serves each
``FLUX_BATCHING`` mode in turn and compares them under open-loop load (benchmarks/batching.py);
``report`` plots the results; ``device`` is the prepared GPU run (benchmarks/device/run.py, started
by benchmarks/device/run.sh).
LoRA costs have their own module: ``python -m benchmarks.lora``."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    commands = {
        "run": "benchmarks.loop",
        "load": "benchmarks.load",
        "batching": "benchmarks.batching",
        "report": "benchmarks.report",
        "device": "benchmarks.device.run",
    }
    if not argv or argv[0] not in commands:
        print(f"usage: python -m benchmarks {{{','.join(commands)}}} [--help]\n\n{__doc__}", file=sys.stderr)
        return 2
    import importlib

    importlib.import_module(commands[argv[0]]).main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
