"""One way to serve service.py for a test or a benchmark: ``bentoml serve`` on a free loopback port,
waited for until ``/readyz`` answers 200, stopped with SIGTERM to its process group (it drains) and
SIGKILL after a grace period. The tests (tests/conftest.py ``bentoml_server``) and the benchmarks
(benchmarks/batching.py, benchmarks/device/run.py) all start their servers through here.

    with bentoml_serve(log_path, {"FLUX_BATCHING": "continuous"}) as server:
        httpx.post(server.url + "/fal-ai/flux-lora/inpainting", json=body)

Failures are exceptions that carry the end of the server's log: ``ServerExited`` when the process
ends before it is ready, ``ServerNotReady`` when time runs out.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
POLL_S = 0.2  # between readiness probes: a test server is ready within a fraction of a second of it


class ServerExited(RuntimeError):
    """The server's process ended before it was ready."""


class ServerNotReady(TimeoutError):
    """The server was not ready in its time."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(log_path: Path, chars: int = 3000) -> str:
    return log_path.read_text(errors="replace")[-chars:] if log_path.is_file() else "(no log)"


def wait_ready(
    url: str, process: subprocess.Popen, log_path: Path, name: str = "bentoml serve", timeout_s: float = 240
) -> None:
    """Poll ``url`` until it answers 200. Raises ``ServerExited`` if ``process`` ends first and
    ``ServerNotReady`` after ``timeout_s``, each with the tail of ``log_path``. Any HTTP server."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise ServerExited(f"{name} exited early ({process.returncode}):\n{log_tail(log_path)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise ServerNotReady(f"{name} not ready in {timeout_s:.0f} s:\n{log_tail(log_path)}")
        time.sleep(POLL_S)


def stop(process: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to the process group (the server drains, and its arbiter stops its workers), SIGKILL
    after ``grace_s``; waits for the exit. Then whatever the server had started and is still running
    is killed: BentoML's workers run in sessions of their own (circus calls ``setsid``), so neither
    the group nor the session reaches them, and one left behind keeps its memory, its port and the
    server's output open. Harmless on a server already stopped (a test may have signalled it)."""
    import psutil  # here, not above: benchmarks/device/run.py imports this module where only torch is sure

    try:
        started = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        started = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    _, left = psutil.wait_procs(started, timeout=0)
    for leftover in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            leftover.kill()
    psutil.wait_procs(left, timeout=10)


@dataclass(frozen=True)
class Server:
    """A ``bentoml serve`` process: its base URL, its log file and the process (group leader)."""

    url: str
    log_path: Path
    process: subprocess.Popen


def bentoml_command() -> list[str]:
    """The ``bentoml`` of this interpreter's environment (its script, or ``python -m bentoml``)."""
    script = Path(sys.executable).parent / "bentoml"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "bentoml"]


def start(log_path: Path, env: Mapping[str, str] | None = None, *, inherit_env: bool = True) -> Server:
    """Start ``bentoml serve service:FluxInpainting`` on a free loopback port, in its own process
    group, its output in ``log_path``; ``env`` over this process's environment (or alone, without
    ``inherit_env``), with ``HF_HUB_OFFLINE=1`` unless ``env`` says otherwise. Not waited for."""
    port = free_port()
    full_env = {**(os.environ if inherit_env else {}), "HF_HUB_OFFLINE": "1", **(env or {})}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:  # the child holds its own descriptor
        process = subprocess.Popen(
            [*bentoml_command(), "serve", "service:FluxInpainting", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(f"http://127.0.0.1:{port}", log_path, process)


@contextlib.contextmanager
def bentoml_serve(
    log_path: Path,
    env: Mapping[str, str] | None = None,
    *,
    ready_timeout_s: float = 240,
    stop_grace_s: float = 30,
    while_starting: Callable[[str], None] | None = None,
    inherit_env: bool = True,
) -> Iterator[Server]:
    """A started and ready server (``start`` then ``wait_ready`` on ``/readyz``), stopped on exit
    (``stop``), also when it failed to become ready. ``while_starting(url)``, if given, runs once
    the process is started and before it is waited for."""
    server = start(log_path, env, inherit_env=inherit_env)
    try:
        if while_starting is not None:
            while_starting(server.url)
        wait_ready(server.url + "/readyz", server.process, log_path, timeout_s=ready_timeout_s)
        yield server
    finally:
        stop(server.process, stop_grace_s)
