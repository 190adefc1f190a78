"""The fal route through a real ``bentoml serve`` process (started and stopped here, on a free port)."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import BATCH_ROUNDING_LEVELS, REPO, bentoml_server

ROUTE = "/fal-ai/flux-lora/inpainting"
MAX_BODY = 3_000_000
PUBLIC_URL = "https://flux.example.com/api"
EXAMPLE = json.loads((REPO / "examples" / "request.json").read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {"FLUX_MAX_BODY_BYTES": str(MAX_BODY), "FLUX_BATCH_MAX_SIZE": "4", "FLUX_PUBLIC_URL": PUBLIC_URL}
    with bentoml_server(tmp_path_factory.mktemp("serve"), **env) as running:
        yield running


def post(server, body, **kwargs) -> httpx.Response:
    base, _ = server
    return httpx.post(base + ROUTE, json=body, timeout=120, **kwargs)


def image_of(fal_image: dict) -> Image.Image:
    header, data = fal_image["url"].split(",", 1)
    assert header == f"data:{fal_image['content_type']};base64"
    raw = base64.b64decode(data)
    assert len(raw) == fal_image["file_size"]
    return Image.open(io.BytesIO(raw))


def test_example_request_returns_fal_output(server):
    response = post(server, EXAMPLE)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"images", "timings", "seed", "has_nsfw_concepts", "prompt"}
    assert body["seed"] == 42 and body["prompt"] == EXAMPLE["prompt"]
    assert body["has_nsfw_concepts"] == [False]
    assert {"preprocess", "inference", "decode", "total"} <= set(body["timings"])
    assert all(v >= 0 for v in body["timings"].values())
    (fal_image,) = body["images"]
    image = image_of(fal_image)
    assert image.format == "JPEG" and image.size == (256, 256) == (fal_image["width"], fal_image["height"])
    assert fal_image["file_name"].endswith(".jpg")
    assert "random weights" in response.headers["x-flux-model"]
    assert response.headers["x-fal-request-id"]


def test_png_custom_size_and_several_images(server):
    body = {
        **EXAMPLE,
        "output_format": "png",
        "num_images": 2,
        "image_size": {"width": 100, "height": 70},
        "num_inference_steps": 4,
    }
    response = post(server, body)
    assert response.status_code == 200, response.text
    images = [image_of(i) for i in response.json()["images"]]
    assert [(i.format, i.size) for i in images] == [("PNG", (96, 64))] * 2  # rounded down to 16
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_preset_size(server):
    response = post(server, {**EXAMPLE, "image_size": "landscape_16_9", "num_inference_steps": 1})
    assert response.status_code == 200, response.text
    assert image_of(response.json()["images"][0]).size == (1024, 576)


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def as_uri(data: bytes, content_type: str) -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode()}"


# AVIF at Pillow's lossless setting: AV1's lossless mode (quality 100) without chroma subsampling.
# Pillow writes YCbCr with BT.601 coefficients, so some RGB colours still move by a level: the scene
# below uses only colours that come back exactly, and grayscale (written as Y alone) always does.
AVIF_LOSSLESS = {"quality": 100, "subsampling": "4:4:4"}


def avif_exact_colours(count: int = 256) -> np.ndarray:
    """``count`` RGB colours that an AVIF at its lossless setting gives back exactly (about 8% do;
    libavif converts each pixel on its own, so a colour that survives once survives anywhere)."""
    candidates = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    back = np.asarray(Image.open(io.BytesIO(encoded(Image.fromarray(candidates), "AVIF", **AVIF_LOSSLESS))))
    exact = candidates[(back == candidates).all(axis=-1)]
    assert len(exact) >= count
    return exact[:count]


@pytest.fixture(scope="module")
def same_pixels_in_every_format():
    """One 64x48 scene and its mask as PNG, GIF, AVIF and an animated GIF whose first frame is the
    scene, each checked here to decode to exactly the same pixels (so a difference in the results is
    the server's)."""
    rng = np.random.default_rng(4)
    colours = avif_exact_colours()
    picture = Image.fromarray(rng.integers(0, len(colours), (48, 64), dtype=np.uint8), "P")
    picture.putpalette(colours.tobytes())
    scene = picture.convert("RGB")
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (12, 10, 44, 34))
    images = {
        "png": as_uri(encoded(scene, "PNG"), "image/png"),
        "gif": as_uri(encoded(picture, "GIF"), "image/gif"),
        "avif": as_uri(encoded(scene, "AVIF", **AVIF_LOSSLESS), "image/avif"),
        "animated gif": as_uri(
            encoded(picture, "GIF", save_all=True, append_images=[Image.new("RGB", (64, 48), (255, 0, 0))]),
            "image/gif",
        ),
    }
    masks = {
        "png": as_uri(encoded(mask, "PNG"), "image/png"),
        "gif": as_uri(encoded(mask, "GIF"), "image/gif"),
        "avif": as_uri(encoded(mask, "AVIF", **AVIF_LOSSLESS), "image/avif"),
    }
    for uri in images.values():
        decoded = Image.open(io.BytesIO(base64.b64decode(uri.partition(",")[2])))
        assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(scene))
    for uri in masks.values():
        decoded = Image.open(io.BytesIO(base64.b64decode(uri.partition(",")[2])))
        assert np.array_equal(np.asarray(decoded.convert("L")), np.asarray(mask))
    return images, masks


def test_gif_and_avif_inputs_give_the_image_of_the_same_pixels_as_png(server, same_pixels_in_every_format):
    """fal accepts GIF and AVIF for image_url and mask_url; so does this server, end to end: a GIF
    image with an AVIF mask, the other way round, and an animated GIF (its first frame) each give the
    image that the same pixels sent as PNG give, within the documented bound (BATCH_ROUNDING_LEVELS:
    a request's PNG output may move by one level with what it is batched with)."""
    images, masks = same_pixels_in_every_format

    def result(image: str, mask: str) -> np.ndarray:
        body = {**EXAMPLE, "image_url": images[image], "mask_url": masks[mask], "num_inference_steps": 2}
        response = post(server, {**body, "output_format": "png", "seed": 11})
        assert response.status_code == 200, (image, mask, response.text)
        output = image_of(response.json()["images"][0])
        assert output.size == (64, 48)
        return np.asarray(output).astype(int)

    reference = result("png", "png")
    for image, mask in (("gif", "avif"), ("avif", "gif"), ("animated gif", "avif")):
        difference = np.abs(result(image, mask) - reference).max()
        assert difference <= BATCH_ROUNDING_LEVELS, (image, mask, difference)


def test_seed_reproduces_and_a_missing_seed_is_drawn_and_returned(server):
    body = {**EXAMPLE, "num_inference_steps": 4, "output_format": "png"}
    first, second = post(server, body).json(), post(server, body).json()
    assert first["images"][0]["url"] == second["images"][0]["url"]
    unseeded = {k: v for k, v in body.items() if k != "seed"}
    drawn = [post(server, unseeded).json() for _ in range(2)]
    assert all(0 <= d["seed"] < 2**32 for d in drawn) and drawn[0]["seed"] != drawn[1]["seed"]
    replay = post(server, {**body, "seed": drawn[0]["seed"]}).json()
    assert replay["images"][0]["url"] == drawn[0]["images"][0]["url"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_inference_steps": 51}, "num_inference_steps"),
        ({"strength": 0}, "strength"),
        ({"guidance_scale": 36}, "guidance_scale"),
        ({"num_images": 5}, "num_images"),
        ({"output_format": "gif"}, "output_format"),
        ({"image_size": "huge"}, "image_size"),
        ({"seed": -1}, "seed"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"acceleration": "turbo"}, "acceleration"),
    ],
)
def test_invalid_fields_get_422_naming_the_field(server, change, field):
    response = post(server, {**EXAMPLE, **change})
    assert response.status_code == 422
    body = response.json()
    assert body["error_type"] == "validation_error"
    assert any(error["loc"][:2] == ["body", field] for error in body["detail"]), body
    assert "base64" not in response.text  # inputs are never echoed


def test_missing_fields_and_malformed_json(server):
    base, _ = server
    missing = post(server, {"prompt": "x"})
    assert missing.status_code == 422
    assert {tuple(e["loc"]) for e in missing.json()["detail"]} >= {("body", "image_url"), ("body", "mask_url")}
    for raw in (b"{not json", b"[1, 2]", b""):
        response = httpx.post(base + ROUTE, content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 422 and response.json()["error_type"] == "validation_error"


_NOISE = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8))
CUT_GIF = encoded(_NOISE.quantize(64), "GIF")[:-40]  # its last pixels lost
CUT_AVIF = encoded(_NOISE, "AVIF")[:-40]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"image_url": "http://127.0.0.1:1/cat.png"}, "image_url"),
        ({"image_url": "http://localhost/cat.png"}, "image_url"),
        ({"mask_url": "http://169.254.169.254/latest/meta-data/"}, "mask_url"),
        ({"mask_url": "http://10.0.0.1/mask.png"}, "mask_url"),
        ({"image_url": "http://100.64.0.1/x.png"}, "image_url"),
        ({"image_url": "http://[::1]/x.png"}, "image_url"),
        ({"image_url": "http://[::ffff:127.0.0.1]/x.png"}, "image_url"),
        ({"image_url": "http://[64:ff9b::7f00:1]/x.png"}, "image_url"),
        ({"mask_url": "file:///etc/passwd"}, "mask_url"),
        ({"mask_url": "ftp://example.com/mask.png"}, "mask_url"),
        ({"image_url": "gopher://example.com/x"}, "image_url"),
        ({"image_url": "data:image/png;base64,bm90IGFuIGltYWdl"}, "image_url"),
        ({"image_url": as_uri(CUT_GIF, "image/gif")}, "image_url"),
        ({"mask_url": as_uri(CUT_AVIF, "image/avif")}, "mask_url"),
        ({"image_size": {"width": 14000, "height": 14000}}, "image_size"),
    ],
)
def test_unusable_images_get_4xx_naming_the_field(server, change, field):
    response = post(server, {**EXAMPLE, **change})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", field]
    assert httpx.get(server[0] + "/readyz").status_code == 200  # and the server stays healthy


def test_lora_names_need_a_lora_directory_and_the_count_is_capped(server):
    response = post(server, {**EXAMPLE, "loras": [{"path": "style.safetensors", "scale": 0.8}]})
    assert response.status_code == 422 and response.json()["error_type"] == "lora_load_error"
    assert response.json()["detail"][0]["loc"] == ["body", "loras", 0, "path"]
    too_many_loras = [{"path": f"https://example.com/{i}.safetensors"} for i in range(5)]
    too_many = post(server, {**EXAMPLE, "loras": too_many_loras})
    assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"] == ["body", "loras"]
    assert "at most 4" in too_many.json()["detail"][0]["msg"]
    # The queue route refuses it at submit (422 now), not after accepting it (202, then a failed status).
    queued = httpx.post(server[0] + "/queue" + ROUTE, json={**EXAMPLE, "loras": too_many_loras}, timeout=60)
    assert queued.status_code == 422 and queued.json()["detail"][0]["loc"] == ["body", "loras"]


def test_body_over_the_limit_gets_413(server):
    response = post(server, {**EXAMPLE, "prompt": "x" * (MAX_BODY + 10)})
    assert response.status_code == 413 and response.json()["error_type"] == "request_too_large"


def test_burst_is_batched_and_images_match_the_lone_request(server):
    base, _ = server

    def body(seed):
        return {**EXAMPLE, "seed": seed, "prompt": f"shed {seed}", "num_inference_steps": 6, "output_format": "png"}

    async def scenario():
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            # BentoML's dispatcher runs its first calls one by one while it learns their latency.
            for seed in range(100, 112):
                assert (await client.post(ROUTE, json=body(seed))).status_code == 200
            alone = (await client.post(ROUTE, json=body(3))).json()
            burst = await asyncio.gather(*[client.post(ROUTE, json=body(seed)) for seed in range(12)])
            return alone, burst

    alone, burst = asyncio.run(scenario())
    assert [r.status_code for r in burst] == [200] * 12
    lone_pixels = np.asarray(image_of(alone["images"][0])).astype(int)
    burst_pixels = np.asarray(image_of(burst[3].json()["images"][0])).astype(int)
    assert np.abs(lone_pixels - burst_pixels).max() <= BATCH_ROUNDING_LEVELS
    metrics = httpx.get(base + "/metrics").text
    count = metric(metrics, "flux_samples_per_forward_count")
    singles = metric(metrics, 'flux_samples_per_forward_bucket{le="1.0"}')
    assert count > singles, "no forward denoised more than one request's image"


def metric(text: str, name: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{")]
    assert lines, f"{name} missing from /metrics"
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_metrics_health_and_logs(server):
    base, log_path = server
    assert post(server, {**EXAMPLE, "num_inference_steps": 2}).status_code == 200
    assert post(server, {**EXAMPLE, "num_images": 9}).status_code == 422
    metrics = httpx.get(base + "/metrics").text
    assert metric(metrics, 'flux_requests_total{outcome="success"}') >= 1
    assert metric(metrics, 'flux_requests_total{outcome="validation_error"}') >= 1
    assert metric(metrics, "flux_denoise_seconds_count") >= 1
    assert httpx.get(base + "/readyz").status_code == 200
    assert httpx.get(base + "/livez").status_code == 200
    log = log_path.read_text()
    assert "RANDOM WEIGHTS" in log  # said at start-up
    assert "FLUX_API_KEYS is not set" in log  # and that the API is open
    assert "[model=tiny (random weights)]" in log  # and in each request's log line
    assert "base64," not in log  # no data URI in the logs


def test_official_fal_client_works_by_changing_the_base_url(server, monkeypatch):
    import fal_client
    import fal_client.client

    base, _ = server
    monkeypatch.setenv("FAL_KEY", "local:any")  # the client insists on a key; this server is open
    monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", base + "/")
    output = fal_client.run("fal-ai/flux-lora/inpainting", arguments={**EXAMPLE, "num_inference_steps": 2})
    assert output["seed"] == 42 and output["images"][0]["width"] == 256
    with pytest.raises(fal_client.client.FalClientHTTPError) as error:
        fal_client.run("fal-ai/flux-lora/inpainting", arguments={**EXAMPLE, "num_images": 9})
    assert error.value.status_code == 422 and error.value.error_type == "validation_error"
    assert error.value.message[0]["loc"] == ["body", "num_images"]


def test_urls_handed_out_use_the_configured_public_url(server):
    base, _ = server
    submitted = httpx.post(f"{base}/queue{ROUTE}", json={**EXAMPLE, "num_inference_steps": 1}).json()
    assert submitted["status_url"] == f"{PUBLIC_URL}/queue/fal-ai/flux-lora/requests/{submitted['request_id']}/status"
    stored = post(server, {**EXAMPLE, "sync_mode": False, "num_inference_steps": 1}).json()
    url = stored["images"][0]["url"]
    assert url.startswith(f"{PUBLIC_URL}/files/")
    assert httpx.get(base + url.removeprefix(PUBLIC_URL)).status_code == 200  # the same file, served here


def test_load_benchmark_smoke(server, tmp_path):
    """python -m benchmarks load against this server: bounded, the figures consistent (no speed asserted)."""
    from benchmarks import load

    base, _ = server
    results = load.main(
        [
            "--url",
            base,
            "--concurrency",
            "1,3",
            "--duration",
            "600",  # an upper bound only: each level ends after its 6 requests, however loaded the machine
            "--requests",
            "6",
            "--steps",
            "2",
            "--sizes",
            "64x48,input",
            "--routes",
            "sync,queue",
            "--dollars-per-hour",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert json.loads((tmp_path / "load.json").read_text()) == results
    assert (tmp_path / "load.md").read_text().startswith("# Load test")
    for level in results["levels"]:
        assert level["requests"] == level["succeeded"] == 6 and level["error_rate"] == 0 and level["rate_429"] == 0
        assert level["images_per_s"] == 6 / level["seconds"]
        assert 0 < level["p50_s"] <= level["p95_s"] <= level["p99_s"]
        assert level["mean_samples_per_forward"] >= 1
        assert abs(level["cost_per_mp"] - 1 / 3600 / level["megapixels_per_s"]) < 1e-12
    with pytest.raises(SystemExit):
        load.main(["--url", "http://10.1.2.3:3000", "--duration", "1"])  # not loopback: refused


def test_open_loop_benchmark_smoke(server, tmp_path):
    """python -m benchmarks load --rate: Poisson arrivals through the queue route, bounded by the
    count, with time to first step from the worker's log and samples per forward from /metrics."""
    from benchmarks import load

    base, _ = server
    results = load.main(
        ["--url", base, "--rate", "2", "--duration", "30", "--requests", "4", "--steps", "2", "--sizes", "64x48"]
        + ["--out", str(tmp_path)]
    )
    assert json.loads((tmp_path / "load-open.json").read_text()) == results
    (figures,) = results["levels"]
    assert figures["requests"] == figures["succeeded"] == 4 and figures["error_rate"] == 0
    assert 0 < figures["first_step_p50_s"] <= figures["first_step_p95_s"] <= figures["p95_s"]
    assert 0 < figures["p50_s"] <= figures["p95_s"] <= figures["p99_s"]
    assert figures["mean_samples_per_forward"] >= 1 and figures["forwards"] >= 2  # 2 steps, maybe all batched
    assert "| arrivals/s |" in (tmp_path / "load-open.md").read_text()


def test_the_request_mix_crosses_steps_sizes_and_loras():
    from benchmarks.load import request_mix

    bodies = request_mix(["256x256", "384x256"], [[{"path": "style.safetensors", "scale": 1.0}]])
    combos = {(b["num_inference_steps"], json.dumps(b.get("image_size")), bool(b["loras"])) for b in bodies}
    assert len(bodies) == len(combos) == 3 * 2 * 2
    assert {b["num_inference_steps"] for b in bodies} == {8, 28, 50}
    assert len({b["seed"] for b in bodies}) == len(bodies)
