"""The full fal contract against a real server: queue, status, stream, cancel, webhooks, stored
outputs, URL inputs and API keys, driven by the official ``fal-client`` and by raw HTTP.

This server allows private hosts for 127.0.0.1 only, so that a local HTTP server can serve images
and receive webhooks; test_service.py's server (no allow list) proves the refusals.
"""

from __future__ import annotations

import json
import time

import fal_client
import fal_client.client
import httpx
import pytest
from PIL import Image

from tests.conftest import (
    BATCH_ROUNDING_LEVELS,
    FAULT_PATH,
    REPO,
    SLOW_PROMPT,
    LocalHandler,
    bentoml_server,
    local_http_server,
)

KEY = "test-key-one"
APP = "fal-ai/flux-lora/inpainting"
EXAMPLE = json.loads((REPO / "examples" / "request.json").read_text())
FAST = {**EXAMPLE, "num_inference_steps": 3}
# 50 steps that sleep 0.3 s or more each (tests/faults): 15 s or more on any CPU, so a test can watch,
# cancel or queue behind it; every test that sends one cancels it.
SLOW = {**FAST, "prompt": f"a garden shed, {SLOW_PROMPT}", "num_inference_steps": 50}


class Assets(LocalHandler):
    """Images to fetch and a webhook receiver."""

    hooks: list[dict] = []
    files = {"/image.png": REPO / "examples" / "image.png", "/mask.png": REPO / "examples" / "mask.png"}
    gets: list[str] = []

    def do_GET(self):
        Assets.gets.append(self.path)
        if self.path in self.files:
            self.send(200, self.files[self.path].read_bytes(), "image/png")
        elif self.path == "/to-metadata":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
        elif self.path == "/huge":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
        elif self.path == "/text":
            self.send(200, b"<html>not an image</html>", "image/png")
        else:
            self.send(404, b"no", "text/plain")

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Assets.hooks.append({"path": self.path, "body": json.loads(body)})
        self.send(200, b"ok", "text/plain")


@pytest.fixture(scope="module")
def assets():
    with local_http_server(Assets) as url:
        yield url


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, tiny_model):
    """Two LoRAs for the tiny model in FLUX_LORA_DIR, a pickle posing as one, and a URL-served copy."""
    from runners.lora.formats import linear_shapes
    from tests.test_lora import write_lora

    directory = tmp_path_factory.mktemp("lora-dir")
    shapes = linear_shapes(tiny_model.pipeline.transformer)
    write_lora(directory, "style", 4, 1, shapes, alpha=8)
    write_lora(directory, "face", 2, 2, shapes)
    (directory / "pickled.safetensors").write_bytes(b"\x80\x04\x95" + b"cos\nsystem\n" * 10)
    write_one_lora_in_three_formats(directory, shapes)
    Assets.files["/style.safetensors"] = directory / "style.safetensors"
    return directory


def write_one_lora_in_three_formats(directory, shapes) -> None:
    """same-{diffusers,kohya,xlabs}.safetensors: one set of deltas on the double blocks' attention
    (all XLabs covers), written in each format's own key names and splits."""
    from safetensors.torch import save_file

    from tests.test_lora_formats import XLABS_DOUBLE, R, bfl_layers, diffusers_file, kohya_file, random_pairs

    layers = bfl_layers(shapes, names={f"double_blocks_{i}_{suffix}" for i in (0, 1) for suffix in XLABS_DOUBLE})
    pairs = random_pairs(layers, shapes, seed=7)
    xlabs = {}
    for name, (down, up, _) in pairs.items():
        _, _, block, suffix = name.split("_", 3)
        xlabs[f"double_blocks.{block}.processor.{XLABS_DOUBLE[suffix]}.down.weight"] = down.clone()
        xlabs[f"double_blocks.{block}.processor.{XLABS_DOUBLE[suffix]}.up.weight"] = up.clone()
    save_file(diffusers_file(pairs, layers), directory / "same-diffusers.safetensors")
    save_file(kohya_file(pairs, alpha=R), directory / "same-kohya.safetensors")  # alpha = rank: x1
    save_file(xlabs, directory / "same-xlabs.safetensors")


@pytest.fixture(scope="module")
def server_and_log(tmp_path_factory, lora_files):
    env = {
        "FLUX_LORA_DIR": str(lora_files),
        "FLUX_API_KEYS": f"{KEY},second-key",
        "FLUX_ALLOW_PRIVATE_HOSTS": "127.0.0.1",
        # Twice the batch size, the default relation: two jobs wait at the worker while one runs, so
        # the next batch is full. At concurrency == batch size the two calls alternate and batches of
        # one are as likely as batches of two.
        "FLUX_QUEUE_CONCURRENCY": "4",
        "FLUX_BATCH_MAX_SIZE": "2",
        "FLUX_QUEUE_MAX_LENGTH": "6",
        "FLUX_MAX_INPUT_BYTES": "1000000",
        "FLUX_FETCH_READ_TIMEOUT_S": "2",
        "PYTHONPATH": FAULT_PATH,  # SLOW's steps sleep
    }
    with bentoml_server(tmp_path_factory.mktemp("fal"), **env) as running:
        warm_the_dispatcher(running[0])
        yield running


def warm_the_dispatcher(server, calls=12):
    """BentoML's dispatcher runs its first ~11 batch calls one request each while it trains its
    latency model (docs/batching.md): make them now, so the batching tests see its steady state
    whichever tests ran before them."""
    for seed in range(calls):
        response = httpx.post(f"{server}/{APP}", json={**FAST, "seed": seed}, headers=auth(), timeout=60)
        assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def server(server_and_log):
    return server_and_log[0]


@pytest.fixture
def client(server, monkeypatch):
    """The official client, unmodified, pointed at the local server through its two URL globals."""
    monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", server + "/")
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", server + "/queue/")
    return fal_client.SyncClient(key=KEY)


def auth(key=KEY):
    return {"Authorization": f"Key {key}"}


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


# ---- the official client ------------------------------------------------------------------


def test_run(client):
    output = client.run(APP, arguments=FAST)
    assert output["seed"] == 42 and output["images"][0]["width"] == 256


def test_subscribe_with_logs_and_queue_updates(client):
    updates = []
    output = client.subscribe(
        APP,
        arguments={**FAST, "num_inference_steps": 20, "image_size": "square_hd"},
        with_logs=True,
        on_queue_update=updates.append,
    )
    assert output["images"][0]["width"] == 1024
    kinds = [type(u).__name__ for u in updates]
    assert kinds[-1] == "Completed" and "InProgress" in kinds
    assert kinds.index("InProgress") < kinds.index("Completed")
    messages = [line["message"] for line in updates[-1].logs]
    steps = [m for m in messages if m.startswith("step ")]
    assert steps == [f"step {i}/17" for i in range(1, 18)]  # 20 steps x strength 0.85 -> 17 run
    in_progress = [u for u in updates if type(u).__name__ == "InProgress"]
    assert any(
        line["message"].startswith("step ") for u in in_progress for line in u.logs or []
    )  # live, not only at the end


def test_submit_status_result(client):
    handle = client.submit(APP, arguments=FAST)
    first = handle.status(with_logs=True)
    # Just submitted (3 steps take far longer than one status call): waiting or started, never done,
    # and each state with what the client needs of it.
    if type(first).__name__ == "Queued":
        assert isinstance(first.position, int) and first.position >= 0
    else:
        assert type(first).__name__ == "InProgress", first
        messages = [line["message"] for line in first.logs]
        assert messages[0] == "queued" and not {"done", "completed"} & set(messages), messages
    output = handle.get()
    assert output["seed"] == 42
    done = handle.status(with_logs=True)
    assert type(done).__name__ == "Completed" and done.error is None
    assert done.metrics["inference_time"] > 0
    assert client.result(APP, handle.request_id) == output
    assert type(client.status(APP, handle.request_id)).__name__ == "Completed"


def test_cancel_a_running_request_stops_it_at_the_next_step(client, server_and_log):
    handle = client.submit(APP, arguments=SLOW)

    def steps_seen() -> list[str]:
        logs = getattr(handle.status(with_logs=True), "logs", None) or []
        return [line["message"] for line in logs if line["message"].startswith("step ")]

    seen = int(wait_for(steps_seen)[-1].split()[1].split("/")[0])
    started = time.monotonic()
    client.cancel(APP, handle.request_id)
    status = wait_for(lambda: (s := handle.status(with_logs=True)) and type(s).__name__ == "Completed" and s)
    assert time.monotonic() - started < 5
    assert status.error_type == "request_cancelled" and status.error
    with pytest.raises(fal_client.client.FalClientHTTPError) as error:
        handle.get()
    assert error.value.status_code == 400 and error.value.error_type == "request_cancelled"
    # The worker itself stopped denoising it, well before its 50 steps.
    log_path = server_and_log[1]
    line = wait_for(
        lambda: next(
            (line for line in log_path.read_text().splitlines() if f"request {handle.request_id} cancelled" in line),
            None,
        ),
        timeout=10,
    )
    step = int(line.split("after step ")[1].split("/")[0])
    # At the next step boundary after the cancel reached it: a few steps past the last one the status
    # showed (the cancel's trip and the step in progress), far from the 50th.
    assert seen <= step <= seen + 5, (seen, step)


def test_errors_surface_as_the_clients_exception(client, assets):
    with pytest.raises(fal_client.client.FalClientHTTPError) as error:
        client.run(APP, arguments={**FAST, "num_images": 9})
    assert error.value.status_code == 422 and error.value.message[0]["loc"] == ["body", "num_images"]
    with pytest.raises(fal_client.client.FalClientHTTPError) as error:
        client.subscribe(APP, arguments={**FAST, "mask_url": f"{assets}/text"})
    assert error.value.status_code == 422 and error.value.error_type == "image_load_error"


def test_a_wrong_key_is_refused(server, monkeypatch):
    monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", server + "/")
    with pytest.raises(fal_client.client.FalClientHTTPError) as error:
        fal_client.SyncClient(key="wrong").run(APP, arguments=FAST)
    assert error.value.status_code == 401


# ---- raw HTTP -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", f"/{APP}"),
        ("POST", f"/queue/{APP}"),
        ("GET", "/queue/fal-ai/flux-lora/requests/x/status"),
        ("GET", "/queue/fal-ai/flux-lora/requests/x/status/stream"),
        ("GET", "/queue/fal-ai/flux-lora/requests/x"),
        ("PUT", "/queue/fal-ai/flux-lora/requests/x/cancel"),
    ],
)
@pytest.mark.parametrize("header", [None, "Key wrong", "Bearer test-key-one", f"Key {KEY}x", "Key", "key test-key"])
def test_every_fal_route_needs_a_key(server, method, path, header):
    headers = {"Authorization": header} if header else {}
    response = httpx.request(method, server + path, json=FAST, headers=headers)
    assert response.status_code == 401
    assert response.json() == {"detail": "Unauthorized", "error_type": "unauthorized"}


def test_health_and_metrics_need_no_key_and_both_keys_work(server):
    for path in ("/readyz", "/livez", "/metrics"):
        assert httpx.get(server + path).status_code == 200
    for key in (KEY, "second-key"):
        assert httpx.post(f"{server}/{APP}", json=FAST, headers=auth(key), timeout=60).status_code == 200


def test_submit_answers_absolute_urls_and_status_moves_to_completed(server):
    response = httpx.post(f"{server}/queue/{APP}", json=FAST, headers=auth())
    assert response.status_code == 202
    body = response.json()
    request_id = body["request_id"]
    assert body["status"] == "IN_QUEUE" and isinstance(body["queue_position"], int)
    base = f"{server}/queue/fal-ai/flux-lora/requests/{request_id}"
    assert (body["response_url"], body["status_url"], body["cancel_url"]) == (base, base + "/status", base + "/cancel")
    seen = set()

    def completed():
        status = httpx.get(body["status_url"], params={"logs": "1"}, headers=auth())
        seen.add((status.json()["status"], status.status_code))
        return status.json() if status.status_code == 200 else None

    final = wait_for(completed)
    assert final["status"] == "COMPLETED" and final["request_id"] == request_id and "error" not in final
    assert all(code == 202 for state, code in seen if state != "COMPLETED")
    assert {"message", "level", "source", "timestamp"} <= set(final["logs"][0])
    without_logs = httpx.get(body["status_url"], params={"logs": "0"}, headers=auth()).json()
    assert without_logs["logs"] is None
    assert httpx.get(body["status_url"], params={"logs": "maybe"}, headers=auth()).status_code == 422
    result = httpx.get(body["response_url"], headers=auth())
    assert result.status_code == 200 and result.json()["seed"] == 42


def test_stored_outputs_are_served_from_the_file_route(server):
    stored = httpx.post(
        f"{server}/{APP}",
        json={**FAST, "sync_mode": False, "output_format": "png", "num_images": 2},
        headers=auth(),
        timeout=60,
    ).json()
    for image in stored["images"]:
        assert image["url"].startswith(f"{server}/files/") and image["url"].endswith(".png")
        fetched = httpx.get(image["url"])  # no key: unguessable names, like fal's CDN
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
        assert len(fetched.content) == image["file_size"]
        assert (
            Image.open(__import__("io").BytesIO(fetched.content)).size
            == (image["width"], image["height"])
            == (256, 256)
        )
    inline = httpx.post(f"{server}/{APP}", json={**FAST, "sync_mode": True}, headers=auth(), timeout=60).json()
    assert inline["images"][0]["url"].startswith("data:image/jpeg;base64,")
    assert httpx.get(f"{server}/files/{'a' * 32}.png").status_code == 404


@pytest.mark.parametrize(
    "raw_path",
    [
        "/files/../{secret}",
        "/files/%2e%2e/{secret}",
        "/files/..%2f{secret}",
        "/files/%2e%2e%2f{secret}",
        "/files/%2E%2E%2F{secret}",
        "/files/..%5c{secret}",
        "/files/%252e%252e%252f{secret}",
        "/files/..",
        "/files/%2e%2e",
        "/files/.",
        "/files/%2f{store}%2f..%2f{secret}",
        "/files//{parent}/{secret}",
        "/files/{secret}%00.png",
    ],
)
def test_the_file_route_serves_nothing_outside_the_store_for_raw_paths(server_and_log, raw_path):
    """httpx normalises ``..`` away before sending; these go out byte for byte (http.client), so
    the route itself sees the dots and the encoded slashes. A file planted next to the store, with a
    name the store would accept, must never come back."""
    import http.client
    from urllib.parse import urlsplit

    server, log_path = server_and_log
    store = log_path.parent / "cache" / "flux-inpaint" / "outputs"
    secret = f"{'s' * 32}.png"
    store.mkdir(parents=True, exist_ok=True)
    (store.parent / secret).write_bytes(b"SECRET-OUTSIDE-THE-STORE")
    address = urlsplit(server)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        connection.request("GET", raw_path.format(secret=secret, store=store, parent=store.parent.name))
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    assert response.status in (400, 404), (response.status, body[:200])
    assert b"SECRET-OUTSIDE-THE-STORE" not in body


def test_status_stream_sends_events_until_completed(server):
    from httpx_sse import connect_sse

    request_id = httpx.post(f"{server}/queue/{APP}", json=FAST, headers=auth()).json()["request_id"]
    url = f"{server}/queue/fal-ai/flux-lora/requests/{request_id}/status/stream"
    with (
        httpx.Client(headers=auth(), timeout=60) as http,
        connect_sse(http, "GET", url, params={"logs": "1"}) as source,
    ):
        assert source.response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(event.data) for event in source.iter_sse()]  # returns when the server ends it
    # One event per change of the status body (with logs=1 a new log line is a change), none repeated
    assert all(before != after for before, after in zip(events, events[1:]))
    statuses = [e["status"] for e in events]
    order = {"IN_QUEUE": 0, "IN_PROGRESS": 1, "COMPLETED": 2}
    assert [order[s] for s in statuses] == sorted(order[s] for s in statuses)
    assert statuses.count("COMPLETED") == 1 and statuses[-1] == "COMPLETED"  # and the stream ended there
    assert "IN_PROGRESS" in statuses
    steps = [line["message"] for line in events[-1]["logs"] if line["message"].startswith("step ")]
    assert steps == [f"step {i}/3" for i in range(1, 4)]  # FAST: 3 steps, each seen once
    in_progress = [e for e in events if e["status"] == "IN_PROGRESS"]
    assert len(in_progress) == len({json.dumps(e["logs"]) for e in in_progress})


def test_status_stream_without_logs_sends_one_event_per_status(server):
    """Without logs the body changes only with the status: a 30-step request stays IN_PROGRESS over
    several of the stream's reads, and each status must still come once."""
    from httpx_sse import connect_sse

    body = {**FAST, "num_inference_steps": 30}
    request_id = httpx.post(f"{server}/queue/{APP}", json=body, headers=auth()).json()["request_id"]
    url = f"{server}/queue/fal-ai/flux-lora/requests/{request_id}/status/stream"
    with httpx.Client(headers=auth(), timeout=60) as http, connect_sse(http, "GET", url) as source:
        events = [json.loads(event.data) for event in source.iter_sse()]
    statuses = [e["status"] for e in events]
    assert statuses[-2:] == ["IN_PROGRESS", "COMPLETED"] and len(statuses) == len(set(statuses)), statuses
    assert all(e["logs"] is None for e in events)


def test_queue_positions_cancel_of_a_queued_request_and_429(server):
    def submit(body):
        return httpx.post(f"{server}/queue/{APP}", json=body, headers=auth())

    running = [submit(SLOW).json() for _ in range(4)]  # all four feeders busy
    for body in running:
        wait_for(lambda body=body: httpx.get(body["status_url"], headers=auth()).json()["status"] == "IN_PROGRESS")
    waiting = [submit(SLOW).json() for _ in range(2)]
    positions = [httpx.get(w["status_url"], headers=auth()).json()["queue_position"] for w in waiting]
    assert positions == [0, 1]
    full = [submit(SLOW) for _ in range(5)]  # 4 in flight (not counted) and 2 waiting; the limit is 6 waiting
    assert [r.status_code for r in full] == [202, 202, 202, 202, 429]
    assert full[4].json()["error_type"] == "queue_full" and full[4].headers["retry-after"]
    cancel = httpx.put(waiting[1]["cancel_url"], headers=auth())
    assert cancel.status_code == 202 and cancel.json() == {"status": "CANCELLATION_REQUESTED"}
    cancelled = httpx.get(waiting[1]["status_url"], params={"logs": "1"}, headers=auth()).json()
    assert cancelled["status"] == "COMPLETED" and cancelled["error_type"] == "request_cancelled"
    assert not any(line["message"].startswith("started") for line in cancelled["logs"])  # it never ran
    assert httpx.get(waiting[1]["response_url"], headers=auth()).status_code == 400
    assert httpx.put(waiting[1]["cancel_url"], headers=auth()).json() == {"status": "ALREADY_COMPLETED"}
    for body in running + [waiting[0]] + [r.json() for r in full[:4]]:
        httpx.put(body["cancel_url"], headers=auth())
    unknown = f"{server}/queue/fal-ai/flux-lora/requests/nope"
    assert httpx.get(unknown + "/status", headers=auth()).status_code == 404
    assert httpx.get(unknown, headers=auth()).status_code == 404
    assert httpx.put(unknown + "/cancel", headers=auth()).json() == {"status": "NOT_FOUND"}


def test_result_of_a_running_request_is_not_ready(server):
    body = httpx.post(f"{server}/queue/{APP}", json=SLOW, headers=auth()).json()
    response = httpx.get(body["response_url"], headers=auth())
    assert response.status_code == 400 and response.json()["error_type"] == "request_in_progress"
    httpx.put(body["cancel_url"], headers=auth())


def test_image_and_mask_urls_are_fetched(server, assets):
    body = {**FAST, "image_url": f"{assets}/image.png", "mask_url": f"{assets}/mask.png"}
    response = httpx.post(f"{server}/{APP}", json=body, headers=auth(), timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["images"][0]["width"] == 256


@pytest.mark.parametrize(
    ("path", "field", "words"),
    [
        ("/to-metadata", "image_url", "169.254.169.254"),
        ("/huge", "image_url", "limit"),
        ("/text", "mask_url", "PNG, JPEG, WEBP, GIF or AVIF"),
        ("/missing", "mask_url", "404"),
    ],
)
def test_bad_urls_get_a_clear_4xx_and_the_server_stays_healthy(server, assets, path, field, words):
    response = httpx.post(f"{server}/{APP}", json={**FAST, field: assets + path}, headers=auth(), timeout=60)
    assert response.status_code == 422
    error = response.json()
    assert error["error_type"] == "image_load_error" and error["detail"][0]["loc"] == ["body", field]
    assert words in error["detail"][0]["msg"]
    assert httpx.get(server + "/readyz").status_code == 200
    assert httpx.post(f"{server}/{APP}", json=FAST, headers=auth(), timeout=60).status_code == 200


def test_webhooks_are_delivered_for_success_error_and_cancel(server, assets):
    Assets.hooks.clear()
    ok = httpx.post(
        f"{server}/queue/{APP}", params={"fal_webhook": f"{assets}/hook-ok"}, json=FAST, headers=auth()
    ).json()
    bad = httpx.post(
        f"{server}/queue/{APP}",
        params={"fal_webhook": f"{assets}/hook-bad"},
        json={**FAST, "image_url": f"{assets}/text"},
        headers=auth(),
    ).json()
    cancelled = httpx.post(
        f"{server}/queue/{APP}", params={"fal_webhook": f"{assets}/hook-cancelled"}, json=SLOW, headers=auth()
    ).json()
    wait_for(lambda: httpx.get(cancelled["status_url"], headers=auth()).json()["status"] == "IN_PROGRESS")
    assert httpx.put(cancelled["cancel_url"], headers=auth()).status_code == 202
    hooks = wait_for(lambda: len(Assets.hooks) >= 3 and {h["path"]: h["body"] for h in Assets.hooks})
    assert sorted(hooks) == ["/hook-bad", "/hook-cancelled", "/hook-ok"]  # one delivery each
    assert hooks["/hook-cancelled"]["request_id"] == cancelled["request_id"]
    assert hooks["/hook-cancelled"]["status"] == "ERROR"
    assert hooks["/hook-cancelled"]["payload"]["error_type"] == "request_cancelled"
    delivered = hooks["/hook-ok"]
    assert delivered["request_id"] == delivered["gateway_request_id"] == ok["request_id"]
    assert delivered["status"] == "OK" and delivered["error"] is None and delivered["payload"]["seed"] == 42
    failed = hooks["/hook-bad"]
    assert failed["request_id"] == bad["request_id"] and failed["status"] == "ERROR"
    assert failed["payload"]["error_type"] == "image_load_error" and failed["error"]


def test_a_webhook_url_that_is_not_http_is_refused(server):
    response = httpx.post(
        f"{server}/queue/{APP}", params={"fal_webhook": "file:///etc/passwd"}, json=FAST, headers=auth()
    )
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "fal_webhook"]


@pytest.mark.parametrize(
    "webhook", ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.7/hook", "http://[::1]:9/x"]
)
def test_a_webhook_to_a_private_address_is_refused_at_submit_not_dropped_after_the_work(server, webhook):
    response = httpx.post(f"{server}/queue/{APP}", params={"fal_webhook": webhook}, json=FAST, headers=auth())
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "fal_webhook"]


def forwards_of_more_than_one(server) -> float:
    """Transformer forwards that denoised more than one sample so far (either batching mode)."""
    text = httpx.get(server + "/metrics").text

    def metric(name):
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    return metric("flux_samples_per_forward_count") - metric('flux_samples_per_forward_bucket{le="1.0"}')


def batch_sizes_from_logs(server, bodies) -> list[int]:
    """Each started request's own batch size, from its status log line ``started: WxH, batch of N``."""
    sizes = []
    for body in bodies:
        logs = httpx.get(body["status_url"], params={"logs": 1}, headers=auth()).json()["logs"]
        sizes += [
            int(line["message"].rsplit("batch of ", 1)[1]) for line in logs if line["message"].startswith("started: ")
        ]
    return sizes


def test_queued_requests_are_batched(server):
    before = forwards_of_more_than_one(server)  # other tests batched already: count only this one's
    # A request whose 10 steps sleep (3 s or more on any CPU) holds the worker, so the four arrive
    # while it is busy and wait at the dispatcher together. Without it a fast CPU finishes each one
    # before the next is posted, and all four run alone (a CI failure, exit 2).
    holder = httpx.post(f"{server}/queue/{APP}", json={**SLOW, "num_inference_steps": 10}, headers=auth()).json()
    wait_for(lambda: batch_sizes_from_logs(server, [holder]))  # it has started
    bodies = [httpx.post(f"{server}/queue/{APP}", json={**FAST, "seed": s}, headers=auth()).json() for s in range(4)]
    for body in bodies:
        wait_for(lambda body=body: httpx.get(body["status_url"], headers=auth()).status_code == 200)
    assert forwards_of_more_than_one(server) > before
    assert 2 in batch_sizes_from_logs(server, bodies)  # FLUX_BATCH_MAX_SIZE=2: some of these shared one


def test_without_a_public_url_the_request_host_names_the_urls(server):
    response = httpx.post(f"{server}/queue/{APP}", json=FAST, headers={**auth(), "Host": "gateway.internal:8443"})
    body = response.json()
    assert (
        body["status_url"]
        == f"http://gateway.internal:8443/queue/fal-ai/flux-lora/requests/{body['request_id']}/status"
    )


# ---- LoRAs --------------------------------------------------------------------------------


def metric_sum(server, prefix):
    text = httpx.get(server + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def run_png(server, **fields):
    response = httpx.post(
        f"{server}/{APP}",
        json={**FAST, "output_format": "png", "sync_mode": True, **fields},
        headers=auth(),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.json()["images"][0]["url"]


def test_loras_by_local_name_and_by_url_change_the_image(server, assets):
    plain = run_png(server)
    local = run_png(server, loras=[{"path": "style.safetensors", "scale": 0.9}])
    assert local != plain
    Assets.gets.clear()
    downloads = metric_sum(server, "flux_lora_downloads_total")
    by_url = [run_png(server, loras=[{"path": f"{assets}/style.safetensors", "scale": 0.9}]) for _ in range(2)]
    assert by_url == [local, local]  # the same file, whichever way it came
    assert Assets.gets.count("/style.safetensors") == 1  # downloaded once, then a cache hit
    assert metric_sum(server, "flux_lora_downloads_total") == downloads + 1
    assert metric_sum(server, 'flux_lora_cache_total{cache="disk",result="hit"}') >= 1
    assert metric_sum(server, 'flux_lora_cache_total{cache="memory",result="hit"}') >= 1
    assert metric_sum(server, "flux_lora_load_seconds_total") > 0


def test_kohya_and_xlabs_files_serve_the_image_of_their_diffusers_equivalent(server):
    plain = run_png(server, seed=21)
    images = {
        fmt: run_png(server, seed=21, loras=[{"path": f"same-{fmt}.safetensors"}])
        for fmt in ("diffusers", "kohya", "xlabs")
    }
    assert images["diffusers"] != plain  # the LoRA does something
    assert images["kohya"] == images["diffusers"] and images["xlabs"] == images["diffusers"]  # PNG bytes


def test_several_loras_and_mixed_batches_through_the_queue(server):
    sets = [
        [],
        [{"path": "style.safetensors", "scale": 0.7}],
        [{"path": "face.safetensors", "scale": 1.2}],
        [{"path": "style.safetensors", "scale": 0.5}, {"path": "face.safetensors", "scale": -0.8}],
    ]
    alone = [run_png(server, seed=11, loras=loras) for loras in sets]
    assert len(set(alone)) == 4
    bodies = [
        httpx.post(
            f"{server}/queue/{APP}",
            json={**FAST, "output_format": "png", "sync_mode": True, "seed": 11, "loras": loras},
            headers=auth(),
        ).json()
        for loras in sets
    ]
    results = []
    for body in bodies:
        wait_for(lambda body=body: httpx.get(body["status_url"], headers=auth()).status_code == 200)
        result = httpx.get(body["response_url"], headers=auth()).json()
        assert "images" in result, result
        results.append(result["images"][0]["url"])

    def pixels(url):
        import base64
        import io

        import numpy as np

        return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))).astype(int)

    for batched, single in zip(results, alone):
        assert abs(pixels(batched) - pixels(single)).max() <= BATCH_ROUNDING_LEVELS
    # ... and these were mixed batches: requests with different LoRA sets shared one (status logs)
    assert batch_sizes_from_logs(server, bodies).count(2) >= 2


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("pickled.safetensors", "not a safetensors file"),
        ("../outside.safetensors", "escapes"),
        ("missing.safetensors", "not found"),
        ("black-forest-labs/some-lora", "hub is not reachable"),
        ("file:///etc/passwd", "not accepted"),
        ("http://10.0.0.1/x.safetensors", "private"),
    ],
)
def test_unusable_loras_get_a_422_naming_them_and_change_nothing(server, path, words):
    before = run_png(server, seed=21)
    response = httpx.post(
        f"{server}/{APP}",
        json={**FAST, "loras": [{"path": "face.safetensors"}, {"path": path}]},
        headers=auth(),
        timeout=60,
    )
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["error_type"] == "lora_load_error" and error["detail"][0]["loc"] == ["body", "loras", 1, "path"]
    assert words in error["detail"][0]["msg"]
    assert run_png(server, seed=21) == before  # nothing half-applied
