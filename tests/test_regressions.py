"""Bugs the fuzzing found (tests/test_openapi_fuzz.py, tests/test_hostile_traffic.py), each pinned
by the smallest test that showed it. In process: fal's Starlette app without a model behind it."""

from __future__ import annotations

import pytest
from _bentoml_impl.server.mount import PassiveMount  # how service.py's @bentoml.asgi_app mounts the routes
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from runners.config import Settings
from runners.front.fal_http import FalApi


@pytest.fixture
def client():
    """fal's app mounted as BentoML mounts it, beside one of BentoML's own routes."""
    api = FalApi(context=lambda: None, settings=Settings(), reject=lambda reason: None, model_label="none")
    front = Starlette(routes=[Route("/readyz", lambda request: PlainTextResponse("ok")), PassiveMount("/", api.app())])
    return TestClient(front)


@pytest.mark.parametrize(
    "path",
    [
        "/queue/fal-ai/flux-lora/requests/a/b/status",  # a request id holding '/' (sent as %2F, decoded before routing)
        "/queue/fal-ai/flux-lora/requests/x/status/extra",
        "/files/a/b",
        "/fal-ai/flux-lora/other",
    ],
)
def test_an_unknown_path_answers_fal_shaped_404(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found", "error_type": "not_found"}
    assert response.headers["x-fal-error-type"] == "not_found"


def test_a_wrong_method_answers_fal_shaped_405_with_allow(client):
    response = client.delete("/fal-ai/flux-lora/inpainting")
    assert response.status_code == 405
    assert response.json() == {"detail": "Method Not Allowed", "error_type": "method_not_allowed"}
    assert response.headers["allow"] == "POST"
    response = client.get("/queue/fal-ai/flux-lora/requests/x/cancel")
    assert response.status_code == 405 and response.json()["error_type"] == "method_not_allowed"
    assert response.headers["allow"] == "PUT"


def test_bentoml_routes_and_paths_outside_fal_prefixes_are_left_to_bentoml(client):
    assert client.get("/readyz").text == "ok"
    assert client.get("/nothing-here").status_code == 404
