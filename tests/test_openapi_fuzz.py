"""Schemathesis over the server's own ``/openapi.json``: every operation, against a real ``bentoml
serve``, with inputs generated from the schema (valid and invalid ones). No answer is a 5xx
(except a 503 with Retry-After, which clients retry), every error has fal's shape, and answers
conform to the document.

Bounded and repeatable: derandomized Hypothesis, no example database, about 150 cases in all.
Generated requests that pass validation would run the model, so the server here allows 64x64
outputs at most (larger sizes get 422); about half of the generated bodies get a real 64x64 image
and mask so that the model does run on generated sizes, steps, strengths and guidance.
No generated URL may reach past this machine: http(s) URLs in the bodies are pointed at a
loopback port, which this server refuses (no private hosts allowed).
"""

from __future__ import annotations

import base64
import io
import json
import re
import zlib
from collections import Counter
from urllib.parse import unquote

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode

from runners.front.fal_http import REQUESTS_PATH
from runners.front.openapi import openapi_document
from tests.conftest import REPO, bentoml_server, scene

KEY = "fuzz-key"
APP = "fal-ai/flux-lora/inpainting"
MAX_SIDE = 64
REFUSED_URL = "http://127.0.0.1:9/refused"  # loopback: refused by the server's address policy
EXAMPLES = {"run": 40, "submit": 40}  # per operationId; the other five routes get 15 each


def data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


IMAGE, MASK = (data_uri(i) for i in scene(MAX_SIDE, MAX_SIDE, seed=3))
UNROUTABLE = re.compile(r"[\r\n]")
OUTCOMES: Counter = Counter()  # (operation, status) of every generated request


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """The README's way to serve a model folder: ``make tiny DIR=x`` (this command) then FLUX_MODEL=x.
    It carries its own ``safety_checker/``; offline, the server must use that one, not the hub's."""
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("model") / "tiny-flux"
    subprocess.run([sys.executable, "-m", "runners.pipeline.tiny", str(folder)], cwd=REPO, check=True, timeout=600)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_folder):
    env = {
        "FLUX_MODEL": str(model_folder),  # the fuzzing runs on a served folder, offline (HF_HUB_OFFLINE=1)
        "FLUX_API_KEYS": KEY,
        "FLUX_MAX_OUTPUT_PIXELS": str(MAX_SIDE * MAX_SIDE),
        "FLUX_MAX_BODY_BYTES": "200000",
        "FLUX_BATCH_MAX_SIZE": "4",
    }
    with bentoml_server(tmp_path_factory.mktemp("fuzz"), **env) as (base, log_path):
        yield base, log_path


# The document depends on the code only: loaded here, and proven equal to what the server serves.
DOCUMENT = openapi_document(APP, REQUESTS_PATH)
schema = schemathesis.openapi.from_dict(
    json.loads(json.dumps(DOCUMENT)),
    config=schemathesis.Config.from_dict(
        {
            "request-timeout": 120,
            # The key as configured auth: schemathesis also sends each operation without it (expects 401).
            "headers": {"Authorization": f"Key {KEY}"},
            "generation": {"max-examples": 15, "deterministic": True, "database": "none", "no-shrink": True},
            "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
            # Valid bodies may still be refused (an unusable image, a LoRA that does not exist): 422, not 2xx.
            "checks": {"positive_data_acceptance": {"enabled": False}},
            "operations": [
                {"include-operation-id": op, "generation": {"max-examples": n}} for op, n in EXAMPLES.items()
            ],
        }
    ),
)


def keep_local(body: dict, valid: bool) -> None:
    """Give about half the valid bodies a usable image, and point any http(s) URL at a refused port."""
    if valid and zlib.crc32(json.dumps(body, sort_keys=True, default=str).encode()) % 2 == 0:
        body["image_url"], body["mask_url"] = IMAGE, MASK
        if isinstance(body.get("image_size"), str):
            del body["image_size"]  # every preset is over this server's 64x64 (those 422s come from the other half)
    for field in ("image_url", "mask_url"):
        if isinstance(body.get(field), str) and "://" in body[field]:
            body[field] = REFUSED_URL
    for lora in body.get("loras") or []:
        if isinstance(lora, dict) and isinstance(lora.get("path"), str) and "://" in lora["path"]:
            lora["path"] = REFUSED_URL


def assert_fal_answer(case, response) -> None:
    status = response.status_code
    headers = {name.lower(): values[0] for name, values in response.headers.items()}
    assert status < 500 or (status == 503 and "retry-after" in headers), (status, response.text[:500])
    if status < 400:
        return
    if status == 404 and UNROUTABLE.search(unquote(response.request.url.split("?")[0])):
        return  # BentoML's mount regex ('.*') stops at a line break: its plain 404, before our routes
    body = response.json()
    if case.method == "PUT" and body.get("status") in ("ALREADY_COMPLETED", "NOT_FOUND"):
        return  # cancel answers fal's {status} body, also on 400/404
    assert set(body) >= {"detail", "error_type"} and isinstance(body["error_type"], str), body
    assert headers["x-fal-error-type"] == body["error_type"]


def test_a_folder_model_serves_offline_with_its_own_safety_checker(server, model_folder):
    base, log_path = server
    body = {"prompt": "a shed", "image_url": IMAGE, "mask_url": MASK, "num_inference_steps": 2}
    response = httpx.post(
        f"{base}/{APP}",
        json={**body, "enable_safety_checker": True},
        headers={"Authorization": f"Key {KEY}"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.json()["has_nsfw_concepts"] == [False]  # the checker ran (the tiny one flags nothing)
    assert response.headers["x-flux-model"] == str(model_folder)
    assert f"loading safety checker from {model_folder / 'safety_checker'}" in log_path.read_text()


def test_the_server_serves_this_document_without_a_key(server):
    response = httpx.get(f"{server[0]}/openapi.json", timeout=30)
    assert response.status_code == 200 and response.json() == json.loads(json.dumps(DOCUMENT))
    assert response.json()["components"]["schemas"]["InpaintRequest"]["required"] == ["prompt", "image_url", "mask_url"]


def answers_in_fal_shape(operation_id: str):
    """The fuzz test of one operation. One test function per operation, not one ``schema.parametrize()``
    over all: schemathesis gives the items of one function the same node id, and pytest-xdist's
    ``--dist loadfile`` runs only the first item of a node id (the other six operations never ran)."""

    others = [op["operationId"] for item in DOCUMENT["paths"].values() for op in item.values()]
    others.remove(operation_id)  # (``include`` would not narrow it: the config's own filter matches all)

    @schema.exclude(operation_id=others).parametrize()
    def test(case, server):
        if isinstance(case.body, dict):
            keep_local(case.body, valid=case.meta.generation.mode is GenerationMode.POSITIVE)
        if case.query and isinstance(case.query.get("fal_webhook"), str) and "://" in case.query["fal_webhook"]:
            case.query["fal_webhook"] = REFUSED_URL
        assert case.meta is not None  # reading it revalidates the edited case, so the checks judge what is sent
        response = case.call(base_url=server[0])
        OUTCOMES[(case.operation.label, response.status_code)] += 1
        assert_fal_answer(case, response)
        case.validate_response(response)

    return test


test_run_answers_in_fal_shape = answers_in_fal_shape("run")
test_submit_answers_in_fal_shape = answers_in_fal_shape("submit")
test_status_answers_in_fal_shape = answers_in_fal_shape("status")
test_status_stream_answers_in_fal_shape = answers_in_fal_shape("statusStream")
test_result_answers_in_fal_shape = answers_in_fal_shape("result")
test_cancel_answers_in_fal_shape = answers_in_fal_shape("cancel")
test_file_answers_in_fal_shape = answers_in_fal_shape("file")


def test_every_operation_was_fuzzed():
    """Each operation of the document has its test above: a new route cannot go unfuzzed."""
    tested = {name.removeprefix("test_").removesuffix("_answers_in_fal_shape") for name in globals()}
    for item in DOCUMENT["paths"].values():
        for operation in item.values():
            assert re.sub(r"(?<!^)(?=[A-Z])", "_", operation["operationId"]).lower() in tested, operation


def test_the_fuzzing_reached_the_model():
    """Generated bodies got past validation and ran (not only refusals), on both inpainting routes.
    Reads what the tests above counted: they run first, in this file's order (in one process under
    pytest-xdist's ``--dist loadfile`` too)."""
    print(sorted(OUTCOMES.items()))
    assert OUTCOMES[(f"POST /{APP}", 200)] >= 3 and OUTCOMES[(f"POST /queue/{APP}", 202)] >= 3
    assert sum(OUTCOMES.values()) >= 150


GUARDED = [
    (method.upper(), path)
    for path, item in DOCUMENT["paths"].items()
    for method, operation in item.items()
    if operation.get("security", DOCUMENT["security"])
]


@pytest.mark.parametrize(("method", "path"), GUARDED)
@pytest.mark.parametrize("authorization", [None, "Key wrong", f"Bearer {KEY}"])
def test_every_guarded_operation_refuses_a_missing_or_wrong_key(server, method, path, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.request(
        method,
        server[0] + path.replace("{request_id}", "some-id"),
        headers=headers,
        json={"prompt": "x", "image_url": IMAGE, "mask_url": MASK},
        timeout=30,
    )
    assert response.status_code == 401
    assert response.json() == {"detail": "Unauthorized", "error_type": "unauthorized"}
