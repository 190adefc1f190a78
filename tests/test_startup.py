"""Start-up faults end ``bentoml serve`` itself, non-zero and with the reason, instead of leaving a
server up and unready: a bad setting (read when service.py is imported) and a model that cannot load
(the worker exits; BentoML's arbiter, which service.py tells not to respawn it, then stops)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import httpx

from benchmarks import serving


def poll_readyz(url: str, process: subprocess.Popen) -> None:
    while process.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(f"{url}/readyz", timeout=2)
        time.sleep(0.5)


class Ended(NamedTuple):
    code: int
    output: str
    at: datetime  # on the clock of the log lines


def logged_at(output: str, event: str) -> datetime:
    """When the first of our JSON log lines whose event holds ``event`` was written."""
    for line in output.splitlines():
        with contextlib.suppress(ValueError):
            if line.startswith("{") and event in (entry := json.loads(line))["event"]:
                return datetime.fromisoformat(entry["time"])
    raise AssertionError(f"no log line with {event!r}:\n{output[-3000:]}")


def seconds_from_the_sigterm_to_the_exit(ended: Ended) -> float:
    """How long ``bentoml serve`` ran on after its front was told to stop (BentoML's arbiter does so
    when the model worker exits: a pod that cannot start should restart in seconds), with checks
    of the two delays it once had."""
    # The front's shutdown ends by itself, not by lifecycle's watchdog 15 s after the drain: a probe
    # in flight held it (BentoML's readiness check raised on a worker that no longer answers).
    output = ended.output
    assert "shutdown not finished" not in output, output[-3000:]
    # The drain does not wait WORKER_DRAINED_TIMEOUT_S (10 s) on a worker that never became ready.
    drain = logged_at(output, "front: drained") - logged_at(output, "front: SIGTERM")
    assert drain.total_seconds() < 6, f"the front drained for {drain}:\n{output[-3000:]}"
    return (ended.at - logged_at(output, "front: SIGTERM")).total_seconds()


def serve_until_it_exits(tmp: Path, timeout_s: float = 240, probe: bool = False, **env: str) -> Ended:
    """Run ``bentoml serve`` as conftest's bentoml_server does (benchmarks/serving.py); wait for it
    to end by itself. With ``probe``, /readyz is polled meanwhile, as Kubernetes does (a probe in
    flight once held the front's shutdown, and so the whole server, up forever). Its output goes to
    a file, not a pipe: a worker that outlived it would hold a pipe open, and reading it to its end
    would then wait forever, where this fails in ``timeout_s``."""
    environment = {"XDG_CACHE_HOME": str(tmp / "cache"), "BENTOML_HOME": str(tmp / "bentoml"), **env}
    server = serving.start(tmp / "serve.log", environment)
    if probe:
        threading.Thread(target=poll_readyz, args=(server.url, server.process), daemon=True).start()
    try:
        server.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:  # the fault this file guards against: up, unready, forever
        serving.stop(server.process)
        raise AssertionError(
            f"bentoml serve still running after {timeout_s} s:\n{serving.log_tail(server.log_path)}"
        ) from None
    return Ended(server.process.returncode, server.log_path.read_text(errors="replace"), datetime.now(timezone.utc))


def test_a_bad_setting_stops_bentoml_serve_naming_the_variable(tmp_path):
    code, output, _ = serve_until_it_exits(tmp_path, timeout_s=120, FLUX_QUEUE_MAX_LENGTH="0")
    assert code != 0
    assert "FLUX_QUEUE_MAX_LENGTH: Input should be greater than or equal to 1" in output, output[-3000:]


def test_a_model_that_cannot_load_stops_bentoml_serve_with_the_reason(tmp_path):
    broken = tmp_path / "broken-model"  # a folder with no model in it: from_pretrained cannot load it
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    ended = serve_until_it_exits(tmp_path, probe=True, FLUX_MODEL=str(broken))
    code, output, _ = ended
    assert code != 0
    assert "model failed to load" in output and "stopping the server" in output, output[-3000:]
    assert "model_index.json" in output or "JSON" in output, output[-3000:]  # the reason, not only that it failed
    # A few seconds on any machine (what is left is wall-clock: a 2 s check of the worker, a probe
    # in flight for 5 s at most); it took 25 s (a 10 s drain, then lifecycle's 15 s watchdog).
    assert seconds_from_the_sigterm_to_the_exit(ended) < 15, output[-3000:]
