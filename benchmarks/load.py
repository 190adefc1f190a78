"""Load test of a running server over fal's routes: throughput, latency, rejections, and the batch
sizes the server ran (read from its /metrics), at each concurrency level, or at each arrival rate.

    python -m benchmarks load --url http://127.0.0.1:3000 --concurrency 1,4,8 --duration 30
    python -m benchmarks load --rate 0.2,0.4 --mix --duration 120 --requests 60   # open loop

Closed loop (``--concurrency``): every client loops (sync route, or queue submit + status polling +
result) until the duration or the request count is reached. Open loop (``--rate``): requests arrive
as a Poisson process at that many per second, whatever the server does, for ``--duration`` seconds
or ``--requests`` arrivals, each through the queue route; it adds time to first step (from the
worker's "step 1/N" log line) and the mean samples per transformer forward. ``--mix`` draws each
request from steps 8/28/50 x ``--sizes`` (two by default) x with and without ``--loras``. Either way
the run is bounded whatever the server does. Only loopback addresses are driven unless
``--allow-remote`` says otherwise.

Executors side by side: ``--targets inprocess=http://127.0.0.1:3000,triton=http://127.0.0.1:3001``
drives each front in turn with the same request mix at each level and writes load-executors.{json,md};
``--triton-metrics http://127.0.0.1:8002/metrics`` adds the Triton target's batch sizes (Triton's
inference count over its execution count).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import statistics
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from .stats import percentile

ROUTE = "fal-ai/flux-lora/inpainting"
REPO = Path(__file__).resolve().parent.parent
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def histogram(metrics: str, name: str) -> tuple[float, float, dict[str, float]]:
    """(count, sum, {le: cumulative}) of a Prometheus histogram, summed over label sets."""
    count = total = 0.0
    buckets: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith(f"{name}_count"):
            count += float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[le] = buckets.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
    return count, total, buckets


def request_body(size: str, steps: int, seed: int, loras: list[dict]) -> dict:
    uri = lambda name: "data:image/png;base64," + base64.b64encode((REPO / "examples" / name).read_bytes()).decode()  # noqa: E731
    body = {
        "prompt": f"load test {seed}",
        "image_url": uri("image.png"),
        "mask_url": uri("mask.png"),
        "seed": seed,
        "num_inference_steps": steps,
        "sync_mode": True,
        "loras": loras,
    }
    if size != "input":
        width, _, height = size.partition("x")
        body["image_size"] = size if not height else {"width": int(width), "height": int(height)}
    return body


def megapixels(body: dict) -> float:
    """Output megapixels of one request (fal bills width * height * num_images)."""
    from runners.protocol.schema import IMAGE_SIZE_PRESETS

    size = body.get("image_size")
    width, height = (
        (256, 256)
        if size is None
        else IMAGE_SIZE_PRESETS[size]
        if isinstance(size, str)
        else (size["width"], size["height"])
    )
    return width * height * body.get("num_images", 1) / 1e6


async def one_request(client: httpx.AsyncClient, body: dict, route: str) -> tuple[int, float]:
    started = time.perf_counter()
    if route == "sync":
        response = await client.post(f"/{ROUTE}", json=body)
        return response.status_code, time.perf_counter() - started
    submitted = await client.post(f"/queue/{ROUTE}", json=body)
    if submitted.status_code != 202:
        return submitted.status_code, time.perf_counter() - started
    # Paths from --url and the id, as fal_client.status(app, id) builds them: the URLs the server
    # hands out name its public address, which a load test on the node itself may not reach.
    request = f"/queue/fal-ai/flux-lora/requests/{submitted.json()['request_id']}"
    while (status := await client.get(f"{request}/status")).status_code == 202:
        await asyncio.sleep(0.05)
    result = await client.get(request) if status.status_code == 200 else status
    return result.status_code, time.perf_counter() - started


async def level(
    url: str,
    headers: dict,
    concurrency: int,
    bodies: list[dict],
    routes: list[str],
    duration: float,
    max_requests: int,
    timeout: float,
) -> dict:
    outcomes: list[tuple[int, float, float]] = []  # (status, latency, megapixels)
    deadline = time.monotonic() + duration
    counter = iter(range(10**9))

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline and (n := next(counter)) < max_requests:
            body, route = bodies[n % len(bodies)], routes[n % len(routes)]
            try:
                status, latency = await one_request(client, body, route)
            except httpx.HTTPError:
                status, latency = 0, timeout  # no answer within the timeout counts as an error
            outcomes.append((status, latency, megapixels(body)))

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout) as client:
        before = (await client.get("/metrics")).text
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        after = (await client.get("/metrics")).text
    count0, sum0, _ = histogram(before, "flux_batch_size")
    count1, sum1, buckets = histogram(after, "flux_batch_size")
    forwards0, samples0 = forward_samples(before)
    forwards1, samples1 = forward_samples(after)
    ok = [(latency, mp) for status, latency, mp in outcomes if status == 200]
    latencies = [latency for latency, _ in ok]

    def pct(q: float) -> float | None:
        return percentile(latencies, q) if latencies else None

    return {
        "concurrency": concurrency,
        "requests": len(outcomes),
        "succeeded": len(ok),
        "seconds": elapsed,
        "images_per_s": len(ok) / elapsed,
        "megapixels_per_s": sum(mp for _, mp in ok) / elapsed,
        "p50_s": pct(0.50),
        "p95_s": pct(0.95),
        "p99_s": pct(0.99),
        "mean_s": statistics.fmean(latencies) if latencies else None,
        "rate_429": sum(1 for s, _, _ in outcomes if s == 429) / max(1, len(outcomes)),
        "error_rate": sum(1 for s, _, _ in outcomes if s not in (200, 429)) / max(1, len(outcomes)),
        "batches_run": count1 - count0,
        "mean_batch_size": (sum1 - sum0) / (count1 - count0) if count1 > count0 else None,
        "mean_samples_per_forward": (samples1 - samples0) / (forwards1 - forwards0) if forwards1 > forwards0 else None,
    }


MIX_STEPS = (8, 28, 50)
MIX_SIZES = "256x256,384x384"


def request_mix(sizes: list[str], loras: list[list[dict]], steps: tuple[int, ...] = MIX_STEPS) -> list[dict]:
    """Every combination of steps, size and LoRA set (``[]``: none), each its own seed."""
    combos = [(size, n, lora) for n in steps for size in sizes for lora in ([[]] + [x for x in loras if x])]
    return [request_body(size, n, seed, lora) for seed, (size, n, lora) in enumerate(combos)]


async def queued_request(client: httpx.AsyncClient, body: dict, poll_s: float = 0.05) -> dict:
    """One request through the queue route: status, latency, and time to its first denoising step
    (the worker's "step 1/N" line: its timestamp is the worker's clock, the same host's as ours)."""
    submitted_at, started = time.time(), time.perf_counter()
    outcome = {"status": 0, "latency_s": None, "first_step_s": None, "megapixels": megapixels(body)}
    submitted = await client.post(f"/queue/{ROUTE}", json=body)
    if submitted.status_code != 202:
        return {**outcome, "status": submitted.status_code}
    request = f"/queue/fal-ai/flux-lora/requests/{submitted.json()['request_id']}"
    while (status := await client.get(f"{request}/status")).status_code == 202:
        await asyncio.sleep(poll_s)
    outcome["latency_s"] = time.perf_counter() - started
    final = await client.get(f"{request}/status", params={"logs": "1"})
    for line in final.json().get("logs") or []:
        if line["message"].startswith("step 1/"):
            outcome["first_step_s"] = datetime.fromisoformat(line["timestamp"]).timestamp() - submitted_at
            break
    result = await client.get(request) if status.status_code == 200 else status
    return {**outcome, "status": result.status_code}


def forward_samples(metrics: str) -> tuple[float, float]:
    count, total, _ = histogram(metrics, "flux_samples_per_forward")
    return count, total


async def open_loop(
    url: str,
    headers: dict,
    rate: float,
    bodies: list[dict],
    duration: float,
    max_requests: int,
    timeout: float,
    seed: int = 0,
) -> dict:
    """Poisson arrivals at ``rate`` per second for ``duration`` s (at most ``max_requests``), each a
    body drawn from ``bodies``; figures over the requests that arrived, once all have ended."""
    rng = random.Random(seed)  # the same arrival times and mix for every target at this rate
    schedule, at = [], 0.0
    while len(schedule) < max_requests:
        at += rng.expovariate(rate)
        if at > duration:
            break
        schedule.append((at, rng.choice(bodies)))

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout) as client:
        before = (await client.get("/metrics")).text
        started = time.perf_counter()

        async def arrive(at: float, body: dict) -> dict:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - started)))
            try:
                return await asyncio.wait_for(queued_request(client, body), timeout)
            except (httpx.HTTPError, asyncio.TimeoutError):
                return {"status": 0, "latency_s": None, "first_step_s": None, "megapixels": megapixels(body)}

        outcomes = await asyncio.gather(*(arrive(at, body) for at, body in schedule))
        elapsed = time.perf_counter() - started
        after = (await client.get("/metrics")).text
    ok = [o for o in outcomes if o["status"] == 200]
    latencies = [o["latency_s"] for o in ok]
    first_steps = [o["first_step_s"] for o in ok if o["first_step_s"] is not None]
    pct = lambda values, q: percentile(values, q) if values else None  # noqa: E731
    forwards0, samples0 = forward_samples(before)
    forwards1, samples1 = forward_samples(after)
    return {
        "rate_per_s": rate,
        "requests": len(outcomes),
        "succeeded": len(ok),
        "seconds": elapsed,
        "requests_per_s": len(ok) / elapsed,
        "megapixels_per_s": sum(o["megapixels"] for o in ok) / elapsed,
        "p50_s": pct(latencies, 0.50),
        "p95_s": pct(latencies, 0.95),
        "p99_s": pct(latencies, 0.99),
        "mean_s": statistics.fmean(latencies) if latencies else None,
        "first_step_p50_s": pct(first_steps, 0.50),
        "first_step_p95_s": pct(first_steps, 0.95),
        "error_rate": sum(1 for o in outcomes if o["status"] not in (200, 429)) / max(1, len(outcomes)),
        "rate_429": sum(1 for o in outcomes if o["status"] == 429) / max(1, len(outcomes)),
        "forwards": forwards1 - forwards0,
        "mean_samples_per_forward": (samples1 - samples0) / (forwards1 - forwards0) if forwards1 > forwards0 else None,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--key", default=None, help="an API key of the server (Authorization: Key ...)")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--rate", default="", help="open loop: Poisson arrivals per second, comma-separated levels")
    parser.add_argument("--mix", action="store_true", help="steps 8/28/50 x --sizes x with and without --loras")
    parser.add_argument("--seed", type=int, default=0, help="open loop: seed of the arrival times and the draws")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per concurrency level")
    parser.add_argument("--requests", type=int, default=10**6, help="at most this many requests per level")
    parser.add_argument(
        "--sizes", default="square", help="fal presets, WxH, or 'input' (the example's 256x256), rotated through"
    )
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--routes", default="sync,queue", help="sync, queue, or both (alternating)")
    parser.add_argument("--loras", default="", help="comma-separated LoRA paths, rotated through ('' = none)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--dollars-per-hour", type=float, default=2.99)
    parser.add_argument("--allow-remote", action="store_true", help="drive a host that is not loopback")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--targets", default="", help="NAME=URL,...: fronts to compare on the same mix (executors)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="--targets: cells per target and level, the targets' order alternating each round; with two "
        "targets the summary is the median over rounds of the second's added p50 and throughput ratio",
    )
    parser.add_argument(
        "--triton-metrics", default=None, help="Triton's /metrics, for the batch sizes of target 'triton'"
    )
    args = parser.parse_args(argv)
    if urlsplit(args.url).hostname not in LOOPBACK and not args.allow_remote:
        parser.error(f"{args.url} is not a loopback address; pass --allow-remote to drive it")
    loras = [[{"path": p, "scale": 1.0}] for p in args.loras.split(",") if p] or [[]]
    if args.mix and args.sizes == "square":
        args.sizes = MIX_SIZES
    sizes = args.sizes.split(",")
    bodies = (
        request_mix(sizes, loras)
        if args.mix
        else [
            request_body(size, args.steps, seed, loras[seed % len(loras)])
            for seed, size in enumerate(sizes * len(loras))
        ]
    )
    headers = {"Authorization": f"Key {args.key}"} if args.key else {}
    if args.rate:
        return run_open_loop(args, bodies, headers)
    if args.targets:
        targets = dict(target.split("=", 1) for target in args.targets.split(","))
        if any(urlsplit(url).hostname not in LOOPBACK for url in targets.values()) and not args.allow_remote:
            parser.error(f"{args.targets}: not all loopback addresses; pass --allow-remote to drive them")
        return compare(args, targets, bodies, headers)
    results = {
        "url": args.url,
        "sizes": sizes,
        "steps": args.steps,
        "routes": args.routes,
        "loras": args.loras,
        "dollars_per_hour": args.dollars_per_hour,
        "levels": [],
    }
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        figures = asyncio.run(
            level(
                args.url,
                headers,
                concurrency,
                bodies,
                args.routes.split(","),
                args.duration,
                args.requests,
                args.timeout,
            )
        )
        mps = figures["megapixels_per_s"]
        figures["cost_per_mp"] = args.dollars_per_hour / 3600 / mps if mps else None
        results["levels"].append(figures)
        print(
            f"concurrency {concurrency}: {figures['images_per_s']:.2f} images/s, p95 {figures['p95_s']} s, "
            f"429s {figures['rate_429']:.0%}, errors {figures['error_rate']:.0%}, mean batch {figures['mean_batch_size']}",
            flush=True,
        )
    write(results, args.out)
    return results


def run_open_loop(args, bodies: list[dict], headers: dict) -> dict:
    results = {
        "url": args.url,
        "mix": args.mix,
        "sizes": args.sizes.split(","),
        "steps": list(MIX_STEPS) if args.mix else [args.steps],
        "loras": args.loras,
        "duration_s": args.duration,
        "max_requests": args.requests,
        "levels": [],
    }
    for rate in [float(r) for r in args.rate.split(",")]:
        figures = asyncio.run(
            open_loop(args.url, headers, rate, bodies, args.duration, args.requests, args.timeout, args.seed)
        )
        results["levels"].append(figures)
        print(open_loop_line(figures), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load-open.json").write_text(json.dumps(results, indent=2))
    (args.out / "load-open.md").write_text("\n".join(open_loop_table(results["levels"])) + "\n")
    return results


def open_loop_line(f: dict) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    return (
        f"rate {f['rate_per_s']:.3f}/s: {f['succeeded']}/{f['requests']} ok, {f['requests_per_s']:.3f} req/s, "
        f"p50 {fmt(f['p50_s'])} p95 {fmt(f['p95_s'])} p99 {fmt(f['p99_s'])} s, first step p50 "
        f"{fmt(f['first_step_p50_s'])} s, {fmt(f['mean_samples_per_forward'])} samples/forward"
    )


def open_loop_table(levels: list[dict], label: str = "") -> list[str]:
    fmt = lambda v, spec=".2f": "n/a" if v is None else format(v, spec)  # noqa: E731
    lines = [
        f"| {label + ' | ' if label else ''}arrivals/s | requests | ok | req/s | p50 s | p95 s | p99 s | "
        "first step p50 s | first step p95 s | samples/forward | errors |",
        "|" + "---|" * (11 + bool(label)),
    ]
    for f in levels:
        lines.append(
            f"| {f['target'] + ' | ' if label else ''}{f['rate_per_s']:.3f} | {f['requests']} | {f['succeeded']} | "
            f"{f['requests_per_s']:.3f} | {fmt(f['p50_s'])} | {fmt(f['p95_s'])} | {fmt(f['p99_s'])} | "
            f"{fmt(f['first_step_p50_s'])} | {fmt(f['first_step_p95_s'])} | {fmt(f['mean_samples_per_forward'])} | "
            f"{f['error_rate']:.0%} |"
        )
    return lines


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps(results, indent=2))
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    lines = [
        f"# Load test of {results['url']}",
        "",
        f"Sizes {', '.join(results['sizes'])}, {results['steps']} steps, routes {results['routes']}, "
        f"LoRAs: {results['loras'] or 'none'}; cost at ${results['dollars_per_hour']}/hour.",
        "",
        "| concurrency | requests | ok | images/s | MP/s | p50 s | p95 s | p99 s | 429 | errors | mean batch | $/MP |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in results["levels"]:
        lines.append(
            f"| {f['concurrency']} | {f['requests']} | {f['succeeded']} | {f['images_per_s']:.2f} | "
            f"{f['megapixels_per_s']:.3f} | {fmt(f['p50_s'], '.2f')} | {fmt(f['p95_s'], '.2f')} | "
            f"{fmt(f['p99_s'], '.2f')} | {f['rate_429']:.0%} | {f['error_rate']:.0%} | "
            f"{fmt(f['mean_batch_size'], '.2f')} | {fmt(f['cost_per_mp'], '.5f')} |"
        )
    (out / "load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def triton_batches(metrics_url: str) -> tuple[float, float]:
    """(inference count, execution count) of Triton's models: requests, and batches that ran them."""
    text = httpx.get(metrics_url, timeout=10).text
    total = lambda name: sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))  # noqa: E731
    return total("nv_inference_count"), total("nv_inference_exec_count")


def compare(args, targets: dict[str, str], bodies: list[dict], headers: dict) -> dict:
    """Each target (an executor behind its own front) on the same bodies at each level, one after the
    other so they never share the machine; results side by side."""
    results = {
        "targets": targets,
        "sizes": args.sizes.split(","),
        "steps": args.steps,
        "routes": args.routes,
        "loras": args.loras,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "levels": [],
    }
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        # Rounds alternate the order (A B, B A, ...), so a machine that drifts (heat, a neighbour's
        # load) weighs on both targets alike; each round's pair is compared within itself.
        cells = [
            (r, name, url)
            for r in range(args.rounds)
            for name, url in (list(targets.items())[:: 1 if r % 2 == 0 else -1])
        ]
        for round_index, name, url in cells:
            on_triton = name == "triton" and args.triton_metrics
            before = triton_batches(args.triton_metrics) if on_triton else None
            figures = asyncio.run(
                level(
                    url,
                    headers,
                    concurrency,
                    bodies,
                    args.routes.split(","),
                    args.duration,
                    args.requests,
                    args.timeout,
                )
            )
            if on_triton:
                after = triton_batches(args.triton_metrics)
                executions = after[1] - before[1]
                figures["batches_run"] = executions
                figures["mean_batch_size"] = (after[0] - before[0]) / executions if executions else None
            results["levels"].append({"target": name, "round": round_index, **figures})
            print(
                f"{name} concurrency {concurrency} round {round_index + 1}: {figures['images_per_s']:.2f} images/s, p50 {figures['p50_s']} s, "
                f"p95 {figures['p95_s']} s, errors {figures['error_rate']:.0%}",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load-executors.json").write_text(json.dumps(results, indent=2))
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    lines = [
        "# Executors side by side: " + ", ".join(f"{name} ({url})" for name, url in targets.items()),
        "",
        f"Sizes {args.sizes}, {args.steps} steps, routes {args.routes}, {args.duration:.0f} s per cell, "
        "one target at a time.",
        "",
        "| concurrency | executor | requests | ok | images/s | p50 s | p95 s | p99 s | 429 | errors | mean batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in results["levels"]:
        lines.append(
            f"| {f['concurrency']} | {f['target']} | {f['requests']} | {f['succeeded']} | {f['images_per_s']:.2f} | "
            f"{fmt(f['p50_s'], '.2f')} | {fmt(f['p95_s'], '.2f')} | {fmt(f['p99_s'], '.2f')} | "
            f"{f['rate_429']:.0%} | {f['error_rate']:.0%} | {fmt(f['mean_batch_size'], '.2f')} |"
        )
    if len(targets) == 2:
        results["paired"] = paired(results["levels"], *targets)
        lines += ["", *paired_table(results["paired"], *targets)]
        (args.out / "load-executors.json").write_text(json.dumps(results, indent=2))
    (args.out / "load-executors.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


def paired(levels: list[dict], base: str, other: str) -> list[dict]:
    """Per concurrency: ``other`` against ``base`` in each round (p50 added, throughput ratio), and
    the median over the rounds of each."""
    summary = []
    for concurrency in sorted({f["concurrency"] for f in levels}):
        rounds = sorted({f["round"] for f in levels if f["concurrency"] == concurrency})
        added, ratio = [], []
        for r in rounds:
            cell = {f["target"]: f for f in levels if f["concurrency"] == concurrency and f["round"] == r}
            a, b = cell.get(base), cell.get(other)
            if a and b and a["p50_s"] is not None and b["p50_s"] is not None and a["images_per_s"]:
                added.append((b["p50_s"] - a["p50_s"]) * 1000)
                ratio.append(b["images_per_s"] / a["images_per_s"])
        summary.append(
            {
                "concurrency": concurrency,
                "rounds": len(added),
                "added_p50_ms_per_round": [round(x, 1) for x in added],
                "throughput_ratio_per_round": [round(x, 3) for x in ratio],
                "added_p50_ms_median": statistics.median(added) if added else None,
                "throughput_ratio_median": statistics.median(ratio) if ratio else None,
            }
        )
    return summary


def paired_table(summary: list[dict], base: str, other: str) -> list[str]:
    lines = [
        f"{other} against {base}, paired within each round (medians over rounds):",
        "",
        f"| concurrency | rounds | {other} p50 added, ms (median) | per round | throughput ratio (median) | per round |",
        "|---|---|---|---|---|---|",
    ]
    for f in summary:
        added = "n/a" if f["added_p50_ms_median"] is None else f"{f['added_p50_ms_median']:+.1f}"
        ratio = "n/a" if f["throughput_ratio_median"] is None else f"{f['throughput_ratio_median']:.3f}x"
        lines.append(
            f"| {f['concurrency']} | {f['rounds']} | {added} | {', '.join(f'{x:+.1f}' for x in f['added_p50_ms_per_round'])} "
            f"| {ratio} | {', '.join(f'{x:.3f}' for x in f['throughput_ratio_per_round'])} |"
        )
    return lines
