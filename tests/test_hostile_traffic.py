"""Bad input under load changes nothing for the normal requests (docs/security.md, issue 7).

One real ``bentoml serve``: first each normal request alone on the quiet server (the baseline), then
the same normal requests again, all at once, interleaved with every hostile case of the security
file. Every hostile request gets its documented 4xx in fal's shape (never a 5xx); every normal one
succeeds with exactly the baseline's image bytes (same seed, same inputs: same image, whatever it
was batched with); the server is still ready afterwards. Every request sent is accounted for, each
with its own time limit.

The server allows private hosts for 127.0.0.1 only, so that a local asset server can serve images
and redirect elsewhere; every other private, loopback or metadata address stays refused, and no
request leaves this machine.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import zlib
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import BATCH_ROUNDING_LEVELS, LocalHandler, bentoml_server, local_http_server, scene

KEY = "hostile-key"
ROUTE = "/fal-ai/flux-lora/inpainting"
QUEUE_ROUTE = "/queue/fal-ai/flux-lora/inpainting"
MAX_BODY = 3_000_000
MAX_LORAS = 4
REQUEST_TIMEOUT_S = 180.0
NORMAL_SEEDS = (11, 22, 33, 44)
NORMAL_REPEATS = 2  # each normal request runs this many times in the mix
# A request batched with others may differ from itself run alone by float rounding (PNG outputs:
# conftest's BATCH_ROUNDING_LEVELS, docs/api.md "Seeds"). Hostile requests never reach the model,
# proven separately below.
BATCH_ROUNDING = BATCH_ROUNDING_LEVELS


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes, content_type: str = "image/png") -> str:
    return f"data:{content_type};base64," + base64.b64encode(data).decode()


def claims_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (CRC fixed, so only the size lies)."""
    data = bytearray(png(Image.new("L", (1, 1))))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


IMAGE, MASK = (png(i) for i in scene(64, 64, seed=5))
SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>'


class Assets(LocalHandler):
    """Images to fetch, and redirects to where the server must not go."""

    def do_GET(self):
        if self.path == "/image.png":
            self.send(200, IMAGE, "image/png")
        elif self.path in ("/to-metadata", "/to-private"):
            target = {
                "/to-metadata": "http://169.254.169.254/latest/meta-data/",
                "/to-private": "http://10.0.0.7/x.png",
            }
            self.send_response(302)
            self.send_header("Location", target[self.path])
            self.end_headers()
        elif self.path == "/huge":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
        elif self.path == "/svg-as-png":
            self.send(200, SVG, "image/png")
        else:
            self.send(404, b"no", "text/plain")


@pytest.fixture(scope="module")
def assets():
    with local_http_server(Assets) as url:
        yield url


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    lora_dir = tmp_path_factory.mktemp("loras")
    env = {
        "FLUX_API_KEYS": KEY,
        "FLUX_ALLOW_PRIVATE_HOSTS": "127.0.0.1",
        "FLUX_MAX_BODY_BYTES": str(MAX_BODY),
        "FLUX_MAX_INPUT_BYTES": "1000000",
        "FLUX_FETCH_READ_TIMEOUT_S": "2",
        "FLUX_LORA_DIR": str(lora_dir),
        "FLUX_LORA_MAX_PER_REQUEST": str(MAX_LORAS),
        "FLUX_BATCH_MAX_SIZE": "4",
    }
    with bentoml_server(tmp_path_factory.mktemp("hostile"), **env) as running:
        yield running[0], running[1]


def normal_body(seed: int) -> dict:
    return {
        "prompt": f"a garden shed, take {seed}",
        "image_url": data_uri(IMAGE),
        "mask_url": data_uri(MASK),
        "num_inference_steps": 4,
        "seed": seed,
        "sync_mode": True,
        "output_format": "png",
    }


@dataclass
class Hostile:
    name: str
    status: int
    error_type: str
    body: dict | bytes | None = None  # dict: JSON; bytes: sent as they are
    names: str | None = None  # the field a 422 must name (detail[0].loc[1])
    path: str = ROUTE
    headers: dict = field(default_factory=dict)


def hostile_cases(assets: str) -> list[Hostile]:
    base = normal_body(7)
    image_cases = {
        "bomb-100-megapixels": data_uri(png(Image.new("1", (10000, 10000), 1))),
        "header-claims-65535x65535": data_uri(claims_size(65535, 65535)),
        "truncated-png": data_uri(IMAGE[: len(IMAGE) // 2]),
        "svg": data_uri(SVG, "image/svg+xml"),
        "svg-served-as-png": f"{assets}/svg-as-png",
        "gif": data_uri(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "image/gif"),
        "1x1": data_uri(png(Image.new("RGB", (1, 1)))),
        "private-ip": "http://10.0.0.7/image.png",
        "loopback-not-allowed": "http://127.0.0.2/image.png",
        "metadata-ip": "http://169.254.169.254/latest/meta-data/",
        "ipv4-mapped-ipv6": "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "file-scheme": "file:///etc/passwd",
        "ftp-scheme": "ftp://example.com/image.png",
        "redirect-to-metadata": f"{assets}/to-metadata",
        "redirect-to-private": f"{assets}/to-private",
        "content-length-over-cap": f"{assets}/huge",
    }
    cases = [
        Hostile(f"image_url {name}", 422, "image_load_error", {**base, "image_url": url}, "image_url")
        for name, url in image_cases.items()
    ]
    cases.append(
        Hostile(
            "mask_url metadata-ip", 422, "image_load_error", {**base, "mask_url": "http://169.254.169.254/"}, "mask_url"
        )
    )
    json_cases = {
        "wrong type steps": ({"num_inference_steps": "many"}, "num_inference_steps"),
        "negative seed": ({"seed": -1}, "seed"),
        "huge seed": ({"seed": 2**80}, "seed"),
        "huge steps": ({"num_inference_steps": 10**30}, "num_inference_steps"),
        "negative num_images": ({"num_images": -3}, "num_images"),
        "huge guidance": ({"guidance_scale": 1e308}, "guidance_scale"),
        "huge image_size": ({"image_size": {"width": 10**9, "height": 10**9}}, "image_size"),
        "prompt of 1 MB": ({"prompt": "x" * 1_000_000}, "prompt"),
        "blank prompt": ({"prompt": "   "}, "prompt"),
        "image_url a number": ({"image_url": 12}, "image_url"),
        "loras over the cap": ({"loras": [{"path": f"l{i}.safetensors"} for i in range(MAX_LORAS + 1)]}, "loras"),
        "loras over the schema cap": ({"loras": [{"path": "x.safetensors"}] * 17}, "loras"),
    }
    cases += [
        Hostile(name, 422, "validation_error", {**base, **change}, name_field)
        for name, (change, name_field) in json_cases.items()
    ]
    for name, path in {
        "dotdot": "../../etc/passwd.safetensors",
        "absolute": "/etc/passwd",
        "dotdot inside": "sub/../../x.safetensors",
        "pickle": "model.bin",
    }.items():
        cases.append(
            Hostile(
                f"lora path {name}", 422, "lora_load_error", {**base, "loras": [{"path": path, "scale": 1.0}]}, "loras"
            )
        )
    raw = json.dumps(base)
    cases += [
        Hostile("malformed JSON", 422, "validation_error", raw[: len(raw) // 2].encode()),
        Hostile(
            "NaN guidance",
            422,
            "validation_error",
            raw.replace('"seed": 7', '"seed": 7, "guidance_scale": NaN').encode(),
        ),
        Hostile("not an object", 422, "validation_error", b"[1, 2, 3]"),
        Hostile("body over the limit", 413, "request_too_large", b'{"prompt": "' + b"x" * (MAX_BODY + 1000) + b'"}'),
        Hostile(
            "webhook file scheme",
            422,
            "validation_error",
            base,
            "fal_webhook",
            path=f"{QUEUE_ROUTE}?fal_webhook=file:///etc/passwd",
        ),
        Hostile(
            "webhook gopher scheme",
            422,
            "validation_error",
            base,
            "fal_webhook",
            path=f"{QUEUE_ROUTE}?fal_webhook=gopher://127.0.0.1:70/",
        ),
        Hostile("no key", 401, "unauthorized", base, headers={"Authorization": ""}),
        Hostile("wrong key", 401, "unauthorized", base, headers={"Authorization": "Key not-the-key"}),
    ]
    return cases


async def send(client: httpx.AsyncClient, path: str, body, headers: dict | None = None):
    """One request with its own time limit; the answer, or the exception that ended it."""
    kwargs = (
        {"json": body} if isinstance(body, dict) else {"content": body, "headers": {"content-type": "application/json"}}
    )
    if headers:
        kwargs["headers"] = {**kwargs.get("headers", {}), **headers}
    try:
        return await asyncio.wait_for(client.post(path, **kwargs), REQUEST_TIMEOUT_S)
    except Exception as exc:  # counted as an outcome, never lost
        return exc


def image_bytes(response: httpx.Response) -> list[bytes]:
    return [base64.b64decode(image["url"].split(",", 1)[1]) for image in response.json()["images"]]


def largest_difference(response: httpx.Response, alone: httpx.Response) -> int:
    """0 when the PNG bytes are identical; else the largest pixel difference (255 if the sizes differ)."""
    if image_bytes(response) == image_bytes(alone):
        return 0
    (ours,), (theirs,) = (
        [np.asarray(Image.open(io.BytesIO(b))).astype(int) for b in image_bytes(r)] for r in (response, alone)
    )
    return int(np.abs(ours - theirs).max()) if ours.shape == theirs.shape else 255


def batched_requests(base: str) -> float:
    """Requests the model worker has run so far: those in adaptive batches (the sum of the
    flux_batch_size histogram) plus those admitted into the continuous loop (its wait's count)."""
    total = 0.0
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith(("flux_batch_size_sum", "flux_admission_wait_seconds_count")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_hostile_requests_mixed_into_load_change_nothing_for_normal_ones(server, assets):
    server, log_path = server
    cases = hostile_cases(assets)

    async def scenario():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(
            base_url=server, headers={"Authorization": f"Key {KEY}"}, timeout=REQUEST_TIMEOUT_S, limits=limits
        ) as client:
            baseline = {seed: await send(client, ROUTE, normal_body(seed)) for seed in NORMAL_SEEDS}
            batched_before, log_before = await asyncio.to_thread(batched_requests, server), log_path.stat().st_size
            mix: list[tuple[str, object]] = []  # (label, case or seed) in sending order: interleaved
            normals = [seed for _ in range(NORMAL_REPEATS) for seed in NORMAL_SEEDS]
            step = max(1, len(cases) // len(normals))
            for i, case in enumerate(cases):
                if i % step == 0 and normals:
                    mix.append(("normal", normals.pop()))
                mix.append(("hostile", case))
            mix += [("normal", seed) for seed in normals]
            answers = await asyncio.gather(
                *[
                    send(client, ROUTE, normal_body(item))
                    if kind == "normal"
                    else send(client, item.path, item.body, item.headers)
                    for kind, item in mix
                ]
            )
            batched = await asyncio.to_thread(batched_requests, server) - batched_before
            with open(log_path, "rb") as log:
                added = log.read()[log_before:]
                retried = sum(
                    added.count(f"worker {api} call lost its connection".encode()) for api in ("inpaint", "inpaint_one")
                )
            ready = await client.get("/readyz")
            after = await send(client, ROUTE, normal_body(NORMAL_SEEDS[0]))
            return baseline, list(zip(mix, answers)), (batched, retried), ready, after

    baseline, results, (batched, retried), ready, after = asyncio.run(scenario())

    for seed, response in baseline.items():
        assert isinstance(response, httpx.Response) and response.status_code == 200, (seed, response)
    assert len(results) == len(cases) + len(NORMAL_SEEDS) * NORMAL_REPEATS  # every request sent has an outcome
    failures, exact = [], 0
    for (kind, item), response in results:
        label = f"normal seed {item}" if kind == "normal" else item.name
        if not isinstance(response, httpx.Response):
            failures.append(f"{label}: no answer ({type(response).__name__}: {response})")
            continue
        if kind == "normal":
            if response.status_code != 200:
                failures.append(f"{label}: {response.status_code} {response.text[:300]}")
            elif (difference := largest_difference(response, baseline[item])) > BATCH_ROUNDING:
                failures.append(f"{label}: image differs from the same request sent alone by {difference} levels")
            else:
                exact += difference == 0
            continue
        body = response.json() if response.headers.get("content-type", "").startswith("application/json") else None
        if response.status_code != item.status or not body or body.get("error_type") != item.error_type:
            failures.append(
                f"{label}: expected {item.status} {item.error_type}, got {response.status_code} {response.text[:300]}"
            )
        elif "detail" not in body or response.headers.get("x-fal-error-type") != item.error_type:
            failures.append(f"{label}: not in fal's error shape: {body}")
        elif item.names and body["detail"][0]["loc"][1] != item.names:
            failures.append(f"{label}: 422 names {body['detail'][0]['loc']}, not {item.names}")
    assert not failures, "\n".join(failures)
    print(
        f"{len(cases)} hostile requests refused as documented; {exact} of {len(NORMAL_SEEDS) * NORMAL_REPEATS} "
        f"normal images byte-identical to the lone run, the rest within {BATCH_ROUNDING} levels"
    )
    # The model ran the normal requests and nothing else: every hostile one was stopped at the front.
    # (A job whose worker connection dropped is sent again, and may then run twice.)
    normals = len(NORMAL_SEEDS) * NORMAL_REPEATS
    assert normals <= batched <= normals + retried, (batched, retried)
    assert ready.status_code == 200
    assert isinstance(after, httpx.Response) and after.status_code == 200
    assert image_bytes(after) == image_bytes(baseline[NORMAL_SEEDS[0]])  # alone again: bit for bit
