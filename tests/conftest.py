"""Shared fixtures: one tiny model on disk and in memory for the whole session."""

from __future__ import annotations

import os

# One OpenMP thread for torch's CPU kernels, here and in every server a test starts (they inherit
# this environment): set before anything imports torch or numpy. The tiny model's ops gain little
# from a second thread, and the suite runs several processes at once (pytest-xdist's workers, each
# server's front and model worker, Triton): on 2 cores their OpenMP threads, spinning while they
# wait for one another, made `-n 2` slower than one process (docs/architecture.md, "Tests").
# An explicit setting wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import serving
from benchmarks.serving import free_port  # noqa: F401  (tests import it from here)

# Nothing in the suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent

# How far a request's image may move with what it is batched with: one 8-bit level per pixel, in a
# lossless (PNG) output. Measured (docs/api.md, "Seeds"): on this CPU, MKL's fp32 matmul gives a row
# different low bits depending on how many rows are multiplied with it (1 row against 2: up to 7e-7
# relative to the inputs' scale); the transformer's output then differs by at most 5e-7 and the
# decoded image by less than one level, which 8-bit rounding turns into 0 or 1. JPEG re-quantises
# 8x8 blocks, so one level in can become several out (3 measured): batch tests compare PNGs.
BATCH_ROUNDING_LEVELS = 1

# tests/faults/sitecustomize.py, for servers started with ``PYTHONPATH=FAULT_PATH`` (its constants are
# repeated here: importing it would patch this process too). A request whose prompt holds SLOW_PROMPT
# sleeps 0.3 s or more each step, so it is as long on any CPU; one whose prompt holds FAULT_PROMPT
# makes the model raise after its second step.
FAULT_PATH = os.pathsep.join([str(REPO / "tests" / "faults"), str(REPO)])
SLOW_PROMPT = "take your time"
FAULT_PROMPT = "raise inside the model"

# Test files that run in the process of another under pytest-xdist (pytest_xdist_make_scheduler):
# both read the session's ONNX export of the tiny model (tiny_onnx).
SAME_PROCESS = {"tests/test_onnx_export.py": "tests/test_export.py"}


def pytest_xdist_make_scheduler(config, log):
    """``make test`` spreads the test files over processes (pytest-xdist, ``--dist loadfile``): a
    file's tests run in one process, with its module fixtures (a served server starts once). Here,
    files named in ``SAME_PROCESS`` count as part of another, so that a session fixture only they
    use (``tiny_onnx``) is built once instead of once in each process. Other modes: xdist's own."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class LoadFileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return SAME_PROCESS.get(path, path)

    return LoadFileScheduling(config, log)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("flux-cache")


@pytest.fixture(scope="session")
def tiny_dir(cache_dir) -> Path:
    from runners.pipeline.tiny import ensure_tiny_model

    return ensure_tiny_model(cache_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    """The tiny model loaded through the real loader, from its folder (FLUX_MODEL=<folder>)."""
    from runners.config import ModelSettings
    from runners.pipeline.model import load_model

    return load_model(
        ModelSettings(model=str(tiny_dir), max_sequence_length=32, safety_checker=str(tiny_dir / "safety_checker"))
    )


@pytest.fixture(scope="session")
def inpainter(tiny_model):
    from runners.pipeline.inpaint import Inpainter

    return Inpainter(tiny_model)


def scene(width: int = 64, height: int = 48, seed: int = 0) -> tuple[Image.Image, Image.Image]:
    """A random RGB image and a mask repainting a rectangle in its middle."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return image, mask


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def require(available: object, what: str) -> None:
    """Skip the test when a tool it drives is missing (``what`` says which, and how to get it),
    except under ``CI=true``, where it fails instead: ``make test`` installs them all, so a missing
    one there is a broken environment, not a reason to pass in silence."""
    if available:
        return
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(f"CI=true and {what}", pytrace=False)
    pytest.skip(what)


def wait_for(predicate, timeout: float = 180.0, every: float = 0.2, seen=lambda: ""):
    """Poll ``predicate`` every ``every`` s until it returns something true, and return that; fail
    after ``timeout`` s, with what ``seen()`` says of the state then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every)
    raise AssertionError(f"condition not reached in {timeout:.0f} s {seen()}")


def wait_until_ready(url: str, process: subprocess.Popen, log_path: Path, name: str, timeout_s: float = 240) -> None:
    """Poll a readiness URL until it answers 200; fail with the log's tail if the process exits or time runs out."""
    try:
        serving.wait_ready(url, process, log_path, name, timeout_s)
    except (serving.ServerExited, serving.ServerNotReady) as exc:
        pytest.fail(str(exc))


class Served(tuple):
    """(base URL, log file path) of a served test server, and its ``bentoml serve`` process."""

    process: subprocess.Popen


@contextmanager
def bentoml_server(tmp: Path, while_starting=None, **env_overrides: str):
    """A real ``bentoml serve`` of service.py on a free port, ready (``/readyz`` 200) when yielded.
    Yields a ``Served`` (base URL, log file path); stopped with SIGTERM (SIGKILL after 30 s) on exit.
    ``while_starting(base URL)``, if given, runs once the process is started and before it is ready.
    The serving itself is benchmarks/serving.py's, which the benchmarks use too."""
    env = {"XDG_CACHE_HOME": str(tmp / "cache"), "BENTOML_HOME": str(tmp / "bentoml"), **env_overrides}
    try:
        with serving.bentoml_serve(tmp / "serve.log", env, while_starting=while_starting) as server:
            served = Served((server.url, server.log_path))
            served.process = server.process
            yield served
    except (serving.ServerExited, serving.ServerNotReady) as exc:
        pytest.fail(str(exc))


class LocalHandler(BaseHTTPRequestHandler):
    """Base of the tests' own HTTP servers (image assets, webhook receivers): quiet, with ``send``."""

    def send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class QuietHTTPServer(ThreadingHTTPServer):
    """A threaded test server that does not print a traceback when a client hangs up early: the
    server under test and several tests do that on purpose (a body over its limit, a slow read)."""

    def handle_error(self, request, client_address):
        pass


@contextmanager
def local_http_server(handler: type[BaseHTTPRequestHandler]):
    """A threaded HTTP server on 127.0.0.1 (a free port) for the server under test to call; yields its URL."""
    httpd = QuietHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextmanager
def moto_s3_server(tmp: Path, **env_overrides: str):
    """moto's standalone server (a real S3 API over HTTP, ``moto_server``) on a free loopback port,
    ready when yielded; yields its endpoint URL. ``INITIAL_NO_AUTH_ACTION_COUNT=N`` makes it check
    request signatures after its first N calls (by default it accepts any credentials)."""
    port = free_port()
    log_path = tmp / f"moto-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            env={**os.environ, **env_overrides},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{endpoint}/moto-api/data.json", process, log_path, "moto_server", timeout_s=120)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def shipped_redis_setting(name: str) -> str:
    """A setting of the Redis that deploy/k8s/fleet/redis-statefulset.yaml ships (``--name value``
    in its args), so that the tests' Redis persists as the shipped one does."""
    import yaml

    manifest = yaml.safe_load((REPO / "deploy" / "k8s" / "fleet" / "redis-statefulset.yaml").read_text())
    args = manifest["spec"]["template"]["spec"]["containers"][0]["args"]
    return args[args.index(f"--{name}") + 1]


class RedisServer:
    """A real ``redis-server`` on a free loopback port, its data (AOF on, fsynced as the shipped
    manifest does) in a temp directory, so a test can stop it and start it again on the same port
    with what it had written. ``extra``: more ``redis-server`` arguments (``--replicaof``)."""

    def __init__(self, directory: Path, extra: list[str] = ()) -> None:
        self.directory, self.port, self.extra = directory, free_port(), list(extra)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        require(shutil.which("redis-server"), "redis-server is needed (make test installs Debian's package)")
        fsync = shipped_redis_setting("appendfsync")
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
            + ["--save", "", "--appendonly", "yes", "--appendfsync", fsync, "--daemonize", "no", *self.extra],
            stdout=open(self.directory / "redis.log", "ab"),  # noqa: SIM115 (the child keeps it)
            stderr=subprocess.STDOUT,
        )
        import redis

        deadline = time.monotonic() + 30
        while True:
            with suppress(redis.RedisError):
                if redis.Redis.from_url(self.url, socket_timeout=1).ping():
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start:\n{(self.directory / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: Redis writes its AOF and exits (a restart then finds what it held). SIGKILL:
        it dies at once, with what its AOF had on disk (``appendfsync``)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)
        self.process = None


@contextmanager
def redis_server(directory: Path):
    """A started ``RedisServer``; stopped on exit. Needs the ``redis-server`` binary (``make test``
    installs Debian's package when it is missing)."""
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model, cache_dir, tmp_path_factory):
    """The tiny model's ONNX artifact, built once for the session in this process by the exporter's
    own build (export.build.onnx_artifact: three graphs, each validated at three shapes) from
    ``tiny_model``: tests/test_export.py and tests/test_onnx_export.py read the same graphs instead
    of exporting the same networks twice. Returns (settings: the tiny model with 32 text tokens and
    this artifact's engine folder, the artifact, {network: (inputs, its torch output before the
    export)}). Its files share a process under pytest-xdist (``SAME_PROCESS``): built once."""
    import torch

    from export.build import onnx_artifact
    from export.networks import SPECS
    from runners.config import Settings

    settings = Settings.model_validate(
        {
            "model": {"cache_dir": cache_dir, "max_sequence_length": 32},  # FLUX_MODEL=tiny: tiny_dir
            "backend": {"engine_dir": tmp_path_factory.mktemp("engines")},
        }
    )
    before = {}
    for name, spec in SPECS.items():
        inputs = spec.sample_inputs(tiny_model, 2, 48, 32, tiny_model.max_sequence_length, seed=7)
        with torch.inference_mode():
            before[name] = (inputs, spec.module(tiny_model)(*inputs))
    artifact, _ = onnx_artifact(tiny_model, settings, build=True, progress=lambda message: None)
    return settings, artifact, before
