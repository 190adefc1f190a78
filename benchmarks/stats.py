"""The one percentile definition every benchmark reports (nearest rank over the sorted samples)."""

from __future__ import annotations


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]
