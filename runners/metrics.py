"""What both tiers share of their metrics: the LoRA cache series (the front counts the disk cache,
the worker the memory cache) and the feed from cumulative cache counts to Prometheus increments.
Declared once, as every process imports service.py and a series may be registered only once."""

from __future__ import annotations

import bentoml

LORA_CACHE = bentoml.metrics.Counter(
    name="flux_lora_cache",
    documentation="LoRA lookups by cache (memory: loaded adapters; disk: downloaded files) and result",
    labelnames=["cache", "result"],
)


class CounterFeed:
    """Publishes the growth of cumulative counts (kept by the caches) to Prometheus counters."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def publish(self, counts: dict[str, float], counters: dict) -> None:
        for key, counter in counters.items():
            grown = counts.get(key, 0) - self.last.get(key, 0)
            if grown > 0:
                counter.inc(grown)
            self.last[key] = counts.get(key, 0)
