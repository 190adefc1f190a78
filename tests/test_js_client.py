"""The official JavaScript client, ``@fal-ai/client`` (pinned by tests/js/package-lock.json;
``make test`` runs ``npm ci`` there), with node against a real ``bentoml serve`` with an API key.

The README's JavaScript snippet runs as written, its server URL alone changed to this server's
port and its "..." images to the example's: its ``requestMiddleware`` config, then its
``fal.subscribe``. tests/js/client.mjs then goes on with that same configured client: subscribe
with logs and onQueueUpdate (polling and streaming), ``fal.run``, ``fal.queue.submit`` / ``status``
/ ``result`` / ``cancel`` and ``fal.queue.streamStatus``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tests.conftest import FAULT_PATH, REPO, bentoml_server, require

JS = REPO / "tests" / "js"
README_SERVER = 'const SERVER = "http://127.0.0.1:3000";'
NODE = shutil.which("node")


@pytest.fixture(scope="module", autouse=True)
def node():
    """Skipped without node or the pinned client, failed under CI=true (conftest.require)."""
    require(NODE, "the JavaScript client tests need node (Debian's nodejs)")
    require((JS / "node_modules" / "@fal-ai" / "client").is_dir(), "the JavaScript client tests need `make js-client`")


def readme_snippet() -> str:
    readme = (REPO / "README.md").read_text()
    (snippet,) = re.findall(r"```js\n(.*?)```", readme, re.S)
    return snippet


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The README's snippet, then client.mjs, in one node process; their output, one JSON line per check."""
    snippet = readme_snippet()
    key = re.search(r'credentials: "([^"]+)"', snippet).group(1)
    example = json.loads((REPO / "examples" / "request.json").read_text())
    assert snippet.count(README_SERVER) == 1 and snippet.count('image_url: "...", mask_url: "..."') == 1
    # PYTHONPATH=FAULT_PATH: SLOW_PROMPT's steps sleep (client.mjs)
    with bentoml_server(tmp_path_factory.mktemp("js-client"), FLUX_API_KEYS=key, PYTHONPATH=FAULT_PATH) as (
        base,
        log_path,
    ):
        script = (
            snippet.replace(README_SERVER, f'const SERVER = "{base}";')
            .replace(
                'image_url: "...", mask_url: "..."',
                f"image_url: {json.dumps(example['image_url'])}, mask_url: {json.dumps(example['mask_url'])}",
            )
            .replace("const result =", "const readmeResult =")
            .replace("result.data.images", "readmeResult.data.images")
        )
        script += '\nawait import("./client.mjs");\n'
        done = subprocess.run(
            [NODE, "--input-type=module"], input=script, cwd=JS, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log_path.read_text()[-3000:]
    lines = done.stdout.splitlines()
    checks = {c["check"]: c for c in (json.loads(line) for line in lines if line.startswith('{"check"'))}
    return base, lines, checks


def test_the_readme_snippet_runs_as_written(run):
    base, lines, _ = run
    # its onQueueUpdate prints each status, then it prints the image's URL, served by this server
    assert "IN_PROGRESS" in lines and "COMPLETED" in lines
    assert any(re.fullmatch(rf"{re.escape(base)}/files/[\w-]+\.jpg", line) for line in lines), lines


def test_subscribe_reports_progress_through_on_queue_update(run):
    subscribe = run[2]["subscribe"]
    assert "IN_PROGRESS" in subscribe["statuses"] and subscribe["statuses"][-1] == "COMPLETED"
    assert subscribe["steps"] == ["step 1/3", "step 2/3", "step 3/3"]
    assert subscribe["seed"] == 5 and subscribe["size"] == [256, 256] and subscribe["requestId"]
    streaming = run[2]["subscribe_streaming"]
    assert "IN_PROGRESS" in streaming["statuses"] and streaming["statuses"][-1] == "COMPLETED"
    assert streaming["steps"] == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]
    assert streaming["stepsWhileInProgress"], streaming  # progress streamed while it ran, not only at the end
    assert streaming["images"] == 1


def test_run_and_the_queue_routes(run):
    checks = run[2]
    assert checks["run"]["seed"] == 9 and checks["run"]["images"] == 2 and checks["run"]["requestId"]
    queue = checks["queue"]
    assert queue["submitted"] == "IN_QUEUE" and queue["completed"] == "COMPLETED"
    assert "step 3/3" in queue["logs"] and queue["requestId"] and queue["images"] == 1


def test_the_status_stream(run):
    stream = run[2]["stream_status"]
    assert stream["last"] == "COMPLETED" and stream["seen"][-1] == "COMPLETED" and len(stream["seen"]) >= 2


def test_cancel(run):
    cancel = run[2]["cancel"]
    assert cancel["error_type"] == "request_cancelled"
    assert cancel["result_error"] == {"status": 400, "error_type": "request_cancelled"}
