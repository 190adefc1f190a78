"""What the queue itself costs per request, without the model: the in-memory queue against the Redis
queue (runners/front/redis_queue.py), each driving an executor that answers at once, so the only
time measured is the queue's (submit, claim, finish, wake the waiting caller).

    python -m benchmarks.queue --redis-url redis://127.0.0.1:6379/15 --requests 400 --concurrency 1,4,8

Every client submits and waits, like the sync route; medians and p95 per level, and the added time of
the Redis queue at the median. It writes and deletes keys under a prefix of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from .stats import percentile


class InstantExecutor:
    async def run(self, record):
        from runners.front.queue import Outcome

        return Outcome(output={"images": [], "seed": 0}, logs=[], inference_time=0.0)

    async def cancel(self, request_id):
        pass

    async def progress(self, request_ids):
        return {}


async def reported(record) -> None:
    """The front's finish hook without a webhook: with it the Redis queue also takes and drops
    each request's report claim, as in production."""


async def level(queue, concurrency: int, requests: int) -> dict:
    from runners.protocol.schema import InpaintRequest

    request = InpaintRequest(prompt="p", image_url="data:,", mask_url="data:,")
    latencies: list[float] = []
    counter = iter(range(requests))

    async def client() -> None:
        for _ in counter:
            started = time.perf_counter()
            record = await queue.submit(request, "http://bench/")
            await queue.wait(record)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": percentile(latencies, 0.95) * 1000,
        "per_s": len(latencies) / elapsed,
    }


async def measure(kind: str, redis_url: str, concurrencies: list[int], requests: int) -> list[dict]:
    from runners.config import QueueSettings

    if kind == "memory":
        from runners.front.memory_queue import MemoryQueue

        queue = MemoryQueue(QueueSettings(max_length=1000), max(concurrencies), InstantExecutor(), reported)
    else:
        from runners.front.redis_queue import RedisQueue

        settings = QueueSettings(url=redis_url, key_prefix=f"bench-{time.time_ns()}:", max_length=1000)
        queue = RedisQueue(settings, max(concurrencies), InstantExecutor(), reported)
    queue.ensure_started()
    await level(queue, 1, 20)  # warm: connections, scripts loaded
    rows = [{"queue": kind, **await level(queue, c, requests)} for c in concurrencies]
    if kind == "redis":
        keys = [key async for key in queue.redis.scan_iter(match=settings.key_prefix + "*")]
        if keys:
            await queue.redis.delete(*keys)
    await queue.stop()
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.queue", description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--requests", type=int, default=400, help="per level and queue")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    rows = []
    for kind in ("memory", "redis"):
        rows += asyncio.run(measure(kind, args.redis_url, concurrencies, args.requests))
    by = {(r["queue"], r["concurrency"]): r for r in rows}
    lines = [
        "# The queue's own cost per request: in memory against Redis (no model)",
        "",
        f"`python -m benchmarks.queue {' '.join(sys.argv[1:] if argv is None else argv)}`; "
        "clients and queue share one Python process.",
        "",
        "| concurrency | memory p50 ms | Redis p50 ms | added at the median, ms | Redis p95 ms | memory req/s | Redis req/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in concurrencies:
        m, r = by[("memory", c)], by[("redis", c)]
        lines.append(
            f"| {c} | {m['p50_ms']:.2f} | {r['p50_ms']:.2f} | {r['p50_ms'] - m['p50_ms']:+.2f} | {r['p95_ms']:.2f} | "
            f"{m['per_s']:.0f} | {r['per_s']:.0f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "queue-overhead.json").write_text(json.dumps(rows, indent=2))
    (args.out / "queue-overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"rows": rows}


if __name__ == "__main__":
    main()
