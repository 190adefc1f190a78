"""The Triton tier against real processes: Triton (PyTriton's bundled tritonserver, CPU, tiny model,
from .venv-triton) and the BentoML front with FLUX_EXECUTOR=triton in front of it.

Proof asked of this tier: the same images for the same seed as the in-process executor; concurrent
requests form Triton batches larger than 1 (Triton's own metrics); a full Triton queue is a 429 at the
front; a request that fails inside a Triton batch fails alone; Triton stopping under load fails
requests cleanly (fal-shaped 503s) and the front's /readyz goes false.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from runners.lora.formats import linear_shapes
from tests.conftest import REPO, bentoml_server, scene, wait_until_ready
from tests.test_lora import write_lora

TRITON_PYTHON = REPO / ".venv-triton" / "bin" / "python"
APP = "fal-ai/flux-lora/inpainting"
WIDTH, HEIGHT = 80, 48
FAULTS = REPO / "tests" / "faults"  # sitecustomize: a prompt with SLOW_PROMPT takes 0.3 s a step or more
SLOW_PROMPT = "take your time"


def triton_ports() -> tuple[int, int, int]:
    """Three distinct free ports (http, grpc, metrics): each one's probe socket is held until all are
    picked, so the kernel cannot hand the same port out twice."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(3)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return tuple(sock.getsockname()[1] for sock in sockets)


@contextmanager
def triton_server(tmp: Path, ports: tuple[int, int, int], **env_overrides: str):
    """``python -m runners.worker.triton_server`` on ``ports`` (http, grpc, metrics), ready
    (/v2/health/ready 200) when yielded. Yields (http URL, metrics URL, process); stopped with SIGTERM
    to the Python process (which must stop tritonserver itself), SIGKILL to the group after 60 s."""
    if not TRITON_PYTHON.exists():
        pytest.fail("no .venv-triton: run `make venv-triton` (make test builds it)")
    http, grpc, metrics = ports
    # PyTriton's workspace holds its Unix sockets, whose paths may not pass 107 bytes. Under the test's
    # folder (XDG_CACHE_HOME) they did once pytest-xdist added popen-gwN/ to it: Triton was ready, and
    # then failed every request with a 500. A short folder of its own instead.
    workspace = Path(tempfile.mkdtemp(prefix="pytriton-"))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "XDG_CACHE_HOME": str(tmp / "cache"),
        "PYTRITON_HOME": str(workspace),
        "FLUX_TRITON_HTTP_PORT": str(http),
        "FLUX_TRITON_GRPC_PORT": str(grpc),
        "FLUX_TRITON_METRICS_PORT": str(metrics),
        **env_overrides,
    }
    log_path = tmp / f"triton-{http}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(TRITON_PYTHON), "-m", "runners.worker.triton_server"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{http}"
    try:
        wait_until_ready(f"{base}/v2/health/ready", process, log_path, "triton server")
        yield base, f"http://127.0.0.1:{metrics}/metrics", process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        try:
            os.killpg(process.pid, signal.SIGKILL)  # tritonserver, had it outlived its parent
        except ProcessLookupError:
            pass
        shutil.rmtree(workspace, ignore_errors=True)


def data_uri(image) -> str:
    from runners.protocol.images import encode_lossless

    return "data:image/png;base64," + base64.b64encode(encode_lossless(image)).decode()


def body(seed: int, steps: int = 2, size: int | None = None, **extra) -> dict:
    """Non-square unless a size is given (80x48: a width/height swap shows), output = input size."""
    width, height = (size, size) if size else (WIDTH, HEIGHT)
    image, mask = scene(width, height, seed=seed)
    return {
        "prompt": f"a test {seed}",
        "image_url": data_uri(image),
        "mask_url": data_uri(mask),
        "seed": seed,
        "num_inference_steps": steps,
        "output_format": "png",
        "sync_mode": True,
        **extra,
    }


def counter(metrics_url: str, name: str) -> float:
    text = httpx.get(metrics_url, timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and 'model="flux_inpaint"' in line
    )


def post_all(base: str, bodies: list[dict]) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: httpx.post(f"{base}/{APP}", json=b, timeout=180), bodies))


@contextmanager
def started_together(*servers):
    """Enter the servers' context managers at once, so that their start-ups overlap; yields what each
    yields, in order. Every one that started is stopped on exit, also when another failed to start."""
    with contextlib.ExitStack() as running:
        with ThreadPoolExecutor(len(servers)) as pool:
            entered = [pool.submit(running.enter_context, server) for server in servers]
        yield [future.result() for future in entered]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model, tiny_dir):
    """One Triton (batches up to 4, a queue of 4, a short exit grace) and a front against it; beside
    them, started at the same time, the in-process front that the image comparison needs and a front
    with a 6 s deadline against the same Triton. The last test stops this Triton; module scope keeps
    the suite to one start of each."""
    tmp = tmp_path_factory.mktemp("triton")
    lora_dir = tmp / "loras"
    lora_dir.mkdir()
    (lora_dir / "broken.safetensors").write_bytes(b"not a safetensors file" * 10)
    write_lora(lora_dir, "style", 4, 1, linear_shapes(tiny_model.pipeline.transformer))
    # Every server reads the very same tiny model files (the image comparison counts on it), and
    # none spends its start-up building them: the session's copy, in the cache they all share.
    shutil.copytree(tiny_dir, tmp / "cache" / "flux-inpaint" / tiny_dir.name)
    triton_env = {
        "PYTHONPATH": os.pathsep.join([str(FAULTS), str(REPO)]),
        "FLUX_TRITON_MAX_BATCH_SIZE": "4",
        "FLUX_TRITON_PREFERRED_BATCH_SIZES": "2,4",
        "FLUX_TRITON_MAX_QUEUE_DELAY_MS": "200",
        "FLUX_TRITON_MAX_QUEUE_SIZE": "4",
        "FLUX_TRITON_EXIT_TIMEOUT_S": "2",
    }
    ports = triton_ports()
    triton_url = f"http://127.0.0.1:{ports[0]}"
    common = {"XDG_CACHE_HOME": str(tmp / "cache"), "FLUX_LORA_DIR": str(lora_dir), "FLUX_LOG_FORMAT": "text"}
    on_triton = {**common, "FLUX_EXECUTOR": "triton", "FLUX_TRITON_URL": triton_url}
    with started_together(
        triton_server(tmp, ports, **triton_env),
        bentoml_server(tmp / "front", **on_triton, FLUX_QUEUE_CONCURRENCY="32"),
        bentoml_server(tmp / "in-process", **common),
        bentoml_server(tmp / "deadline", **on_triton, FLUX_REQUEST_TIMEOUT_S="6"),
    ) as ((_, metrics_url, process), (front, front_log), (in_process, _), (deadline_front, _)):
        yield {
            "triton": triton_url,
            "metrics": metrics_url,
            "process": process,
            "front": front,
            "front_log": front_log,
            "in_process": in_process,
            "deadline_front": deadline_front,
            "triton_log": tmp / f"triton-{ports[0]}.log",
        }


def test_tensor_contract_round_trip():
    """Front and Triton encode and decode the same tensors, through the v2 binary form."""
    import asyncio

    from runners.config import ImageLimits
    from runners.errors import LoraLoadError
    from runners.front.preparation import prepare_job
    from runners.front.triton_client import decode_tensor, encode_tensor
    from runners.protocol.jobs import EncodedImage, JobLora, JobResult
    from runners.protocol.progress import LogLine
    from runners.protocol.schema import InpaintRequest
    from runners.protocol.triton_tensors import INPUTS, job_tensors, result_tensors, tensors_job, tensors_result

    raw = body(5, guidance_scale=3.3, strength=0.7, num_images=2, enable_safety_checker=False, acceleration="regular")
    job = asyncio.run(prepare_job(InpaintRequest(**raw), ImageLimits(), "rid-1"))
    job = job.model_copy(
        update={
            "loras": [JobLora(path="/x/a.safetensors", sha256="0" * 64, scale=0.5, name="a")],
            "deadline": time.time() + 100,
        }
    )
    tensors = job_tensors(job)
    wire = {
        spec.name: decode_tensor(encode_tensor(tensors[spec.name], spec.datatype), spec.datatype, [1, 1])
        for spec in INPUTS
    }
    back = tensors_job(wire)
    assert back.model_dump(exclude={"preprocess_s", "request"}) == job.model_dump(exclude={"preprocess_s", "request"})
    for field in (
        "prompt",
        "seed",
        "num_inference_steps",
        "guidance_scale",
        "strength",
        "num_images",
        "enable_safety_checker",
        "output_format",
        "acceleration",
    ):
        assert getattr(back.request, field) == getattr(job.request, field), field

    images = [
        EncodedImage(data=data, content_type="image/png", width=WIDTH, height=HEIGHT) for data in (b"\x89P1", b"\x89P2")
    ]
    result = JobResult(
        request_id="rid-1",
        images=images,
        has_nsfw_concepts=[False, True],
        timings={"preprocess": 0.1, "inference": 1.5, "decode": 0.2},
        logs=[LogLine(message="step 1/2")],
    )
    assert tensors_result(job, result_tensors(result, job.seed)) == result
    failed = JobResult.failed("rid-1", LoraLoadError(("loras", 0, "path"), "bad"))
    again = tensors_result(job, result_tensors(failed, job.seed))
    assert again.error == failed.error and again.error.status == 422


@pytest.mark.parametrize(
    ("failure", "error_type", "attempts"),
    [
        (httpx.ConnectTimeout, "worker_unavailable", 2),  # never reached Triton: tried once more, then 503
        (httpx.ReadTimeout, "request_timeout", 1),  # Triton has it and may still run it: 504, no second run
    ],
)
def test_triton_timeouts_become_fal_errors_without_running_a_job_twice(failure, error_type, attempts):
    import asyncio

    from runners.config import ExecutorSettings
    from runners.front.triton_client import TritonClient
    from runners.protocol.jobs import InpaintJob
    from runners.protocol.schema import InpaintRequest

    sent = []

    def handler(request):
        sent.append(request)
        raise failure("no answer", request=request)

    client = TritonClient(ExecutorSettings(executor="triton"))
    client.http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    job = InpaintJob(
        request_id="r",
        request=InpaintRequest(prompt="p", image_url="-", mask_url="-"),
        width=64,
        height=64,
        seed=1,
        image_png=b"i",
        mask_png=b"m",
    )
    with pytest.raises(Exception) as error:
        asyncio.run(client._post(job, "http://triton/v2/models/m/infer", b"", {}))
    assert error.value.error_type == error_type and len(sent) == attempts


@pytest.mark.parametrize(
    ("status", "message", "error_type"),
    [
        (503, "[request id: x] Exceeds maximum queue size", "queue_full"),
        (503, "Request timeout expired", "queue_full"),
        (400, "Server is not ready", "worker_unavailable"),
        (
            500,
            "Failed to process the request(s) for model 'flux_inpaint_0_0', message: stub process is not healthy",
            "worker_unavailable",
        ),
    ],
)
def test_triton_refusals_become_fal_errors(status, message, error_type):
    """Triton's own answers (not a job's ERROR tensor): its queue policy's two rejections are 429s that
    fal clients retry; anything else is the model tier being unavailable (503), never a 500 that
    blames the request."""
    from runners.config import ExecutorSettings
    from runners.front.triton_client import TritonClient

    client = TritonClient(ExecutorSettings(executor="triton"))
    error = client._error("r", httpx.Response(status, json={"error": message}))
    assert error.error_type == error_type
    assert error.status == (429 if error_type == "queue_full" else 503)


def test_same_images_as_the_in_process_executor_with_and_without_a_lora(stack):
    """One request alone on each executor, non-square, then the same with a LoRA: byte-identical
    PNGs, the same seed and NSFW flags; the LoRA works through Triton (it changes the image)."""
    requests = [body(11, steps=3), body(11, steps=3, loras=[{"path": "style.safetensors", "scale": 0.9}])]
    on_triton = [httpx.post(f"{stack['front']}/{APP}", json=request, timeout=180) for request in requests]
    assert [r.status_code for r in on_triton] == [200, 200], [r.text[:300] for r in on_triton]
    local = [httpx.post(f"{stack['in_process']}/{APP}", json=request, timeout=180) for request in requests]
    assert [r.status_code for r in local] == [200, 200], [r.text[:300] for r in local]
    for a, b in zip((r.json() for r in on_triton), (r.json() for r in local)):
        assert a["seed"] == b["seed"] == 11
        assert a["has_nsfw_concepts"] == b["has_nsfw_concepts"]
        assert [i["url"] for i in a["images"]] == [i["url"] for i in b["images"]]  # data URIs of the PNG bytes
        assert (a["images"][0]["width"], a["images"][0]["height"]) == (WIDTH, HEIGHT)
        assert set(a["timings"]) == set(b["timings"])
    assert on_triton[0].json()["images"][0]["url"] != on_triton[1].json()["images"][0]["url"]


def test_triton_runs_the_configured_batcher_and_queue_policy(stack):
    """What Triton itself reports for the model: the settings became its dynamic batcher and queue policy."""
    config = httpx.get(f"{stack['triton']}/v2/models/flux_inpaint/config", timeout=5).json()
    assert config["max_batch_size"] == 4
    batcher = config["dynamic_batching"]
    assert batcher["preferred_batch_size"] == [2, 4]
    assert int(batcher["max_queue_delay_microseconds"]) == 200_000
    policy = batcher["default_queue_policy"]
    assert int(policy["max_queue_size"]) == 4
    assert policy["timeout_action"] == "REJECT"
    assert int(policy["default_timeout_microseconds"]) == 600_000_000


def test_concurrent_requests_form_triton_batches(stack):
    count0 = counter(stack["metrics"], "nv_inference_count")
    exec0 = counter(stack["metrics"], "nv_inference_exec_count")
    responses = post_all(stack["front"], [body(seed, steps=3) for seed in range(4)])
    assert [r.status_code for r in responses] == [200] * 4, [r.text[:300] for r in responses]
    assert [r.json()["seed"] for r in responses] == [0, 1, 2, 3]
    assert {(r.json()["images"][0]["width"], r.json()["images"][0]["height"]) for r in responses} == {(WIDTH, HEIGHT)}
    inferences = counter(stack["metrics"], "nv_inference_count") - count0
    executions = counter(stack["metrics"], "nv_inference_exec_count") - exec0
    assert inferences == 4
    assert executions < inferences, f"{inferences} requests in {executions} Triton executions: no batch above 1"
    # Each request's own image: the batch did not mix them up (two seeds, two different images).
    assert responses[0].json()["images"][0]["url"] != responses[1].json()["images"][0]["url"]


def test_a_failing_request_fails_alone_inside_a_triton_batch(stack):
    bodies = [body(seed, steps=3) for seed in range(3)]
    bodies.insert(1, body(9, steps=3, loras=[{"path": "broken.safetensors", "scale": 1.0}]))
    responses = post_all(stack["front"], bodies)
    codes = [r.status_code for r in responses]
    assert codes == [200, 422, 200, 200], [r.text[:300] for r in responses]
    error = responses[1].json()
    assert error["error_type"] == "lora_load_error"
    assert error["detail"][0]["loc"] == ["body", "loras", 0, "path"]


def test_a_full_triton_queue_is_a_429_at_the_front(stack):
    # Heavier requests than the batching test: a batch runs for seconds while the rest arrive.
    responses = post_all(stack["front"], [body(seed, steps=8, size=384) for seed in range(16)])
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, [r.text[:300] for r in responses]
    assert codes.count(429) >= 1 and codes.count(200) >= 4, codes
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.json()["error_type"] == "queue_full"


def test_the_queue_routes_and_cancel_through_triton(stack):
    front = stack["front"]
    submitted = httpx.post(f"{front}/queue/{APP}", json=body(12, steps=3), timeout=30).json()

    def status(body):
        return httpx.get(body["status_url"], params={"logs": "1"}, timeout=30)

    deadline = time.monotonic() + 180
    while (answer := status(submitted)).status_code != 200:
        assert answer.status_code == 202 and answer.json()["status"] in ("IN_QUEUE", "IN_PROGRESS"), answer.text
        assert time.monotonic() < deadline, "not completed in time"
        time.sleep(0.2)
    done = answer.json()
    assert done["status"] == "COMPLETED" and "error_type" not in done, done
    messages = [line["message"] for line in done["logs"]]  # in the order they happened (docs/api.md)
    assert messages[0] == "queued" and messages[-1] == "completed", messages
    started = messages.index(f"started: {WIDTH}x{HEIGHT}, batch of 1")
    assert [m for m in messages[started:] if m.startswith("step ")] == ["step 1/3", "step 2/3", "step 3/3"]
    result = httpx.get(submitted["response_url"], timeout=30).json()
    assert result["seed"] == 12 and (result["images"][0]["width"], result["images"][0]["height"]) == (WIDTH, HEIGHT)

    # Cancel: the caller gets its answer at once; Triton runs what it has taken to its end (a limit of
    # this tier, docs/triton.md), so the request is a short slow one (10 steps of 0.3 s or more).
    inferences = counter(stack["metrics"], "nv_inference_count")
    running = httpx.post(f"{front}/queue/{APP}", json=body(13, steps=10, prompt=SLOW_PROMPT), timeout=30).json()
    while status(running).json()["status"] != "IN_PROGRESS":
        assert time.monotonic() < deadline, "never started"
        time.sleep(0.1)
    cancel = httpx.put(running["cancel_url"], timeout=30)
    assert cancel.status_code == 202 and cancel.json() == {"status": "CANCELLATION_REQUESTED"}
    ended = status(running)
    assert ended.status_code == 200 and ended.json()["error_type"] == "request_cancelled", ended.text
    assert httpx.get(running["response_url"], timeout=30).status_code == 400
    # Triton still ends it (the limit above): wait for that, so the next tests find Triton idle.
    while counter(stack["metrics"], "nv_inference_count") == inferences:
        assert time.monotonic() < deadline + 120, "Triton never finished the cancelled request"
        time.sleep(0.5)


def test_a_request_past_its_deadline_on_triton_answers_504_and_stops_there(stack):
    """A front with a 6 s deadline in front of the same Triton: the deadline travels with the job
    (DEADLINE), and Triton's loop stops the request at a step boundary, well before its 50 steps."""
    request = body(14, steps=50, strength=1.0, prompt=SLOW_PROMPT)  # all 50 steps run, unless stopped
    response = httpx.post(f"{stack['deadline_front']}/{APP}", json=request, timeout=120)
    assert response.status_code == 504 and response.json()["error_type"] == "request_timeout", response.text
    request_id = response.headers["x-fal-request-id"]
    prefix = f"request {request_id} out of time: left the batch after step "
    deadline = time.monotonic() + 60
    while not (lines := [line for line in stack["triton_log"].read_text().splitlines() if prefix in line]):
        assert time.monotonic() < deadline, "Triton's loop never said it stopped the request"
        time.sleep(0.5)
    # the Triton process logs JSON lines, the event text inside one: take the numbers, not a split
    step, steps = re.search(re.escape(prefix) + r"(\d+)/(\d+)", lines[0]).groups()
    assert int(steps) == 50 and 1 <= int(step) <= 25, lines[0]  # 6 s of 15+


def test_triton_stopping_under_load_fails_cleanly_and_readyz_goes_false(stack):
    """Runs last: it stops the module's Triton. SIGTERM reaches the Python process only; it must
    bring tritonserver down itself."""
    front, process = stack["front"], stack["process"]
    assert httpx.get(f"{front}/readyz", timeout=5).status_code == 200
    with ThreadPoolExecutor(6) as pool:
        # Enough work that Triton's 2 s exit grace cannot finish it all on any CPU: two batches (4 and
        # 2) of 17 steps that each sleep 0.3 s or more (tests/faults), 5 s a batch whatever the compute.
        futures = [
            pool.submit(httpx.post, f"{front}/{APP}", json=body(seed, steps=20, prompt=SLOW_PROMPT), timeout=180)
            for seed in range(6)
        ]
        deadline = time.monotonic() + 120
        while counter(stack["metrics"], "nv_inference_pending_request_count") == 0:
            assert time.monotonic() < deadline and not any(f.done() for f in futures), "no request reached Triton"
            time.sleep(0.1)
        time.sleep(0.2)  # the batcher's queue delay (FLUX_TRITON_MAX_QUEUE_DELAY_MS): the first batch is running
        process.send_signal(signal.SIGTERM)
        responses = [future.result() for future in futures]
    codes = [r.status_code for r in responses]
    # 429: on a loaded machine Triton may form a smaller first batch, so its queue of 4 overflows:
    # a clean refusal too (queue_full, which clients retry), never a 500 or a hang.
    assert set(codes) <= {200, 429, 503}, [r.text[:300] for r in responses]
    assert 503 in codes, codes
    for response in responses:
        if response.status_code in (429, 503):
            assert response.json()["error_type"] == {429: "queue_full", 503: "worker_unavailable"}[response.status_code]
    assert process.wait(timeout=60) is not None
    deadline = time.monotonic() + 15
    while True:  # no tritonserver (nor backend stub) left behind in the process group
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, (
            "processes of the Triton group outlived it:\n"
            + subprocess.run(
                ["ps", "-o", "pid,stat,etime,args", "-g", str(process.pid)], capture_output=True, text=True
            ).stdout
        )
        time.sleep(0.5)
    after = httpx.post(f"{front}/{APP}", json=body(1), timeout=60)
    assert after.status_code == 503 and after.json()["error_type"] == "worker_unavailable"
    deadline = time.monotonic() + 10
    while httpx.get(f"{front}/readyz", timeout=5).status_code == 200:
        assert time.monotonic() < deadline, "/readyz still 200 with Triton gone"
        time.sleep(0.5)


# --- deploy/k8s/triton: the Component that puts the model on Triton ---------------------------

K8S = REPO / "deploy" / "k8s"
TRITON_K8S = K8S / "triton"


def json_patch(doc: dict, ops: list[dict]) -> dict:
    """The add/remove/replace subset of RFC 6902 the Component's patches use (so this test needs no
    kustomize binary); a path that does not exist fails like kustomize does."""
    import copy

    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [int(p) if p.isdigit() else p for p in op["path"].strip("/").split("/")]
        node = doc
        for part in parents:
            node = node[part]
        if op["op"] == "remove" or op["op"] == "replace":
            assert last in node if isinstance(node, dict) else last < len(node), f"{op['path']} not in the base"
        if op["op"] == "remove":
            del node[last]
        else:
            node[last] = op["value"]
    return doc


def overlay_objects() -> dict[tuple[str, str], dict]:
    """What the base plus the Component produce, by (kind, name)."""
    import yaml

    objects = {}
    for name in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    component = yaml.safe_load((TRITON_K8S / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    for name in component["resources"]:
        for doc in yaml.safe_load_all((TRITON_K8S / name).read_text()):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    for patch in component["patches"]:
        key = (patch["target"]["kind"], patch["target"]["name"])
        objects[key] = json_patch(objects[key], yaml.safe_load(patch["patch"]))
    return objects


def test_k8s_component_is_valid_and_points_the_front_at_triton(tmp_path):
    import shutil

    import kubernetes_validate

    from runners.config import ExecutorSettings
    from runners.worker.triton_server import TritonServerSettings

    objects = overlay_objects()
    for doc in objects.values():
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    config = objects[("ConfigMap", "flux-inpaint-config")]["data"]
    executor = ExecutorSettings(
        **{k.removeprefix("FLUX_").lower(): v for k, v in config.items() if k in ("FLUX_EXECUTOR", "FLUX_TRITON_URL")}
    )
    assert executor.executor == "triton"
    service = objects[("Service", "flux-inpaint-triton")]
    host, port = executor.triton_url.removeprefix("http://").split(":")
    assert host == service["metadata"]["name"]
    http = next(p for p in service["spec"]["ports"] if p["name"] == "http")
    assert int(port) == http["port"]

    triton = objects[("Deployment", "flux-inpaint-triton")]["spec"]["template"]
    front = objects[("Deployment", "flux-inpaint")]["spec"]["template"]
    # Each Service selects its own pods only: the front's Service must never reach Triton's pods.
    assert service["spec"]["selector"].items() <= triton["metadata"]["labels"].items()
    assert not service["spec"]["selector"].items() <= front["metadata"]["labels"].items()
    front_service = objects[("Service", "flux-inpaint")]
    assert not front_service["spec"]["selector"].items() <= triton["metadata"]["labels"].items()
    (container,) = triton["spec"]["containers"]
    names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= names.keys()
    env = {e["name"]: e.get("value") for e in container["env"]}
    server = TritonServerSettings(
        **{k.removeprefix("FLUX_TRITON_").lower(): v for k, v in env.items() if k.startswith("FLUX_TRITON_")}
    )
    assert (server.http_port, server.grpc_port, server.metrics_port) == (names["http"], names["grpc"], names["metrics"])
    assert server.address == "0.0.0.0"
    assert triton["spec"]["terminationGracePeriodSeconds"] > server.exit_timeout_s
    # The model on the GPU, the front without one; both mount the cache at the same path (LoRA files).
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in str(front["spec"]["containers"][0]["resources"])

    def cache_mount(pod: dict) -> str:
        return {m["name"]: m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}["cache"]

    assert cache_mount(triton) == cache_mount(front) == env["FLUX_CACHE_DIR"]
    if shutil.which("kubectl"):  # where kubectl is installed, kustomize itself renders the same
        import os
        import subprocess

        import yaml

        relative = os.path.relpath(REPO / "deploy", tmp_path)
        overlay = f"resources: [{relative}/k8s]\ncomponents: [{relative}/k8s/triton]\n"
        (tmp_path / "kustomization.yaml").write_text(overlay)
        rendered = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, check=True)
        kinds = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(rendered.stdout)}
        assert kinds == set(objects)


def test_the_triton_process_stops_what_it_left_running_even_a_child_that_ignores_sigterm():
    import psutil

    from runners.worker.triton_server import descendants, stop_processes

    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"]
    )
    try:
        time.sleep(0.3)  # its handler is set
        (child,) = [p for p in descendants() if p.pid == stubborn.pid]
        started = time.monotonic()
        stop_processes([child], grace_s=0.5)
        took = time.monotonic() - started
        assert not psutil.pid_exists(stubborn.pid)  # gone, and reaped (stop_processes waits on it)
        assert 0.5 <= took < 5  # SIGTERM ignored: it waited out the grace, then killed it
    finally:
        stubborn.kill()


def test_a_pytriton_home_too_long_for_its_sockets_is_refused_at_start():
    """Under a long PYTRITON_HOME (by default inside XDG_CACHE_HOME) Triton answered ready and failed
    every request; the server now refuses to start, naming the setting."""
    from runners.worker.triton_server import UNIX_SOCKET_PATH_MAX, socket_path_problem

    assert socket_path_problem("/tmp/pytriton", "flux_inpaint") is None
    room = UNIX_SOCKET_PATH_MAX - len("/workspace_XXXXXXXX/flux_inpaint_0_0-server.sock")
    assert socket_path_problem("/" + "a" * (room - 1), "flux_inpaint") is None  # exactly at the limit
    problem = socket_path_problem("/" + "a" * room, "flux_inpaint")
    assert problem and "PYTRITON_HOME" in problem and f"{UNIX_SOCKET_PATH_MAX + 1} bytes" in problem
    if not TRITON_PYTHON.exists():
        pytest.fail("no .venv-triton: run `make venv-triton` (make test builds it)")
    environment = {**os.environ, "PYTRITON_HOME": "/tmp/" + "a" * room, "FLUX_LOG_FORMAT": "text"}
    ended = subprocess.run(
        [str(TRITON_PYTHON), "-m", "runners.worker.triton_server"],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ended.returncode == 2 and "set PYTRITON_HOME to a shorter folder" in ended.stdout + ended.stderr
    assert "loading model" not in ended.stdout + ended.stderr  # refused before the model loads
