"""The model tier on Triton Inference Server: the same loop as the in-process worker, behind Triton.

    .venv-triton/bin/python -m runners.worker.triton_server      # or: make serve-triton

PyTriton starts the ``tritonserver`` binary its wheel bundles and binds ``infer`` below as a
Python-backend model. Triton owns the queue and the batching (dynamic batcher: preferred batch
sizes, max queue delay; queue policy: max queue size, default timeout with reject); this process
owns the model. Each Triton request is one job (runners/protocol/triton_tensors.py); a Triton batch is run by
``runners.worker.adaptive.run_jobs``, so grouping by size, LoRAs and the one-job-fails-alone rule are the
in-process worker's own code. A failed job answers an ERROR tensor, never a failed batch.

Runs in its own environment (.venv-triton: PyTriton needs numpy < 2). The model loads and warms up
before Triton starts, so ``/v2/health/ready`` answering means the model is ready. SIGTERM stops
Triton (in-flight requests get ``FLUX_TRITON_EXIT_TIMEOUT_S``) and then this process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import sysconfig
import threading
import time
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from runners.config import SettingsGroup, load_settings
from runners.errors import InpaintError, InvalidField
from runners.logs import configure_logging
from runners.protocol.jobs import InpaintJob, JobResult
from runners.protocol.triton_tensors import (
    CONTRACT_VERSION,
    INPUTS,
    MODEL_NAME,
    NUMPY_TYPES,
    OUTPUTS,
    result_tensors,
    tensors_job,
)

# Named as __name__ would be on import: run with ``python -m`` this module's __name__ is "__main__".
log = logging.getLogger("runners.worker.triton_server")


class TritonServerSettings(SettingsGroup):
    """Read by the Triton process only (``python -m runners.worker.triton_server``): its ports, and Triton's
    batching and queue policy for the model. That process reads every other group too (the model, the
    backend, LoRAs, acceleration), as the in-process worker does."""

    model_config = SettingsConfigDict(env_prefix="FLUX_TRITON_", extra="ignore")

    address: str = Field("127.0.0.1", min_length=1, max_length=255)
    """Address the HTTP, gRPC and metrics endpoints bind to (``0.0.0.0`` in a container)."""
    http_port: int = Field(8000, ge=1, le=65535)
    """KServe v2 HTTP: what the front calls (FLUX_TRITON_URL), and /v2/health/ready."""
    grpc_port: int = Field(8001, ge=1, le=65535)
    """KServe v2 gRPC (the front does not use it; Triton always opens it)."""
    metrics_port: int = Field(8002, ge=1, le=65535)
    """Prometheus /metrics: nv_inference_count (requests) against nv_inference_exec_count (batches)."""
    model: str = Field(MODEL_NAME, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """Name the model is served under; the front reads the same variable to call it."""
    max_batch_size: int = Field(4, ge=1, le=64)
    """Most requests Triton hands the model in one execution."""
    preferred_batch_sizes: Annotated[list[int], NoDecode] = Field(default_factory=lambda: [2, 4], max_length=8)
    """Batch sizes (each from 1 to ``FLUX_TRITON_MAX_BATCH_SIZE``) the dynamic batcher forms without
    waiting further."""
    max_queue_delay_ms: float = Field(100.0, ge=0.0, le=60_000.0)
    """How long the batcher holds a request to gather a preferred batch. Generation takes seconds,
    so a tenth of a second costs little and lets concurrent requests share a loop."""
    max_queue_size: int = Field(64, ge=1, le=100_000)
    """Requests waiting in Triton's queue; past it Triton rejects (the front answers 429)."""
    queue_timeout_s: float = Field(600.0, ge=0.0, le=7200.0)
    """A request still queued after this is rejected (the front answers 429); 0: no timeout."""
    exit_timeout_s: int = Field(30, ge=0, le=3600)
    """On SIGTERM: how long Triton lets in-flight executions finish."""
    log_verbose: int = Field(0, ge=0, le=4)
    """Triton's own ``--log-verbose`` level (0: off; higher: more of Triton's internals)."""

    @field_validator("preferred_batch_sizes", mode="before")
    @classmethod
    def _sizes(cls, value):
        if isinstance(value, str):
            value = [int(v) for v in value.split(",") if v.strip()]
        return value

    @field_validator("preferred_batch_sizes")
    @classmethod
    def _bounded(cls, value, info):
        top = info.data.get("max_batch_size", 64)
        if any(not 1 <= size <= top for size in value):
            raise ValueError(f"preferred batch sizes are between 1 and max_batch_size ({top})")
        return value


class TritonModel:
    """Decodes Triton requests into jobs, runs them with ``run_jobs``, encodes one answer each."""

    def __init__(self, inpainter) -> None:
        self.inpainter = inpainter
        self.lock = threading.Lock()  # one execution at a time: the model has one set of weights

    def infer(self, requests: list) -> list[dict]:
        from runners.worker.adaptive import run_jobs

        started = time.perf_counter()
        jobs: list[tuple[int, InpaintJob]] = []
        answers: dict[int, dict] = {}
        for position, request in enumerate(requests):
            try:
                rows = len(request["PROMPT"])
                if rows != 1:
                    raise InvalidField("inputs", f"one job per Triton request (batch dimension 1), got {rows}")
                jobs.append((position, tensors_job(request.data)))
            except InpaintError as exc:
                answers[position] = result_tensors(JobResult.failed("-", exc), 0)
            except Exception as exc:  # a request that breaks the contract fails alone, with a 422
                error = InvalidField("inputs", f"{type(exc).__name__}: {str(exc)[:500]}")
                answers[position] = result_tensors(JobResult.failed("-", error), 0)
        with self.lock:
            results = run_jobs(self.inpainter, [job for _, job in jobs]) if jobs else []
        for (position, job), result in zip(jobs, results):
            answers[position] = result_tensors(result, job.seed)
        log.info(
            "batch of %d request(s) (%d runnable) in %.2f s", len(requests), len(jobs), time.perf_counter() - started
        )
        return [answers[position] for position in range(len(requests))]


def triton_tensor(spec, Tensor):
    return Tensor(name=spec.name, dtype=NUMPY_TYPES[spec.datatype], shape=spec.shape)


def triton_model_config(server: TritonServerSettings):
    from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, TimeoutAction

    return ModelConfig(
        max_batch_size=server.max_batch_size,
        batcher=DynamicBatcher(
            max_queue_delay_microseconds=int(server.max_queue_delay_ms * 1000),
            preferred_batch_size=server.preferred_batch_sizes or None,
            default_queue_policy=QueuePolicy(
                max_queue_size=server.max_queue_size,
                default_timeout_microseconds=int(server.queue_timeout_s * 1_000_000),
                timeout_action=TimeoutAction.REJECT,
            ),
        ),
    )


# A Unix socket's path holds at most 107 bytes (108 with its NUL). PyTriton makes its sockets in a
# folder ``PYTRITON_HOME/workspace_XXXXXXXX`` (tempfile's 8 characters), the longest of them
# ``<model>_0_<i>-server.sock`` for the i-th bound function (one here). Past the limit Triton still
# starts and answers ready, and then fails every request: refused at start instead.
UNIX_SOCKET_PATH_MAX = 107


def socket_path_problem(pytriton_home: str, model: str) -> str | None:
    """Why PyTriton's sockets cannot be made under ``pytriton_home`` (resolved), or None."""
    longest = os.path.join(os.path.realpath(pytriton_home), "workspace_XXXXXXXX", f"{model}_0_0-server.sock")
    if len(longest.encode()) <= UNIX_SOCKET_PATH_MAX:
        return None
    return (
        f"PyTriton's Unix sockets under PYTRITON_HOME={pytriton_home} would have paths of "
        f"{len(longest.encode())} bytes, past the {UNIX_SOCKET_PATH_MAX} a socket path may have (Triton would "
        "answer ready and fail every request): set PYTRITON_HOME to a shorter folder, e.g. /tmp/pytriton"
    )


def load_inpainter(settings):
    """The model through the same code as the in-process worker: load, backend, warm-up."""
    from runners.worker.loading import load_inpainter as load

    return load(settings)


def main() -> None:
    # PyTriton's and Triton's own lines as plain text; ours as FLUX_LOG_FORMAT says, as in the BentoML processes.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    settings = load_settings()
    configure_logging(settings.server.log_format)
    server = TritonServerSettings()
    # The Python backend stub is linked against libpython3.x: with a pyenv (or any non-system)
    # interpreter it must find this interpreter's library first, not the system's.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p)
    # Without a handler SIGTERM kills this process at once and leaves tritonserver running: turn it
    # into the KeyboardInterrupt that Triton.serve() answers by stopping the server.
    # The processes below us are noted first: tritonserver's backend stubs are re-parented once it
    # exits, and would no longer be found as ours.
    below_us: list = []

    def on_sigterm(*_):
        below_us.extend(descendants())
        signal.default_int_handler(signal.SIGINT, None)

    signal.signal(signal.SIGTERM, on_sigterm)

    from pytriton.constants import PYTRITON_HOME
    from pytriton.model_config import Tensor
    from pytriton.triton import Triton, TritonConfig

    if problem := socket_path_problem(str(PYTRITON_HOME), server.model):
        log.error("%s", problem)
        raise SystemExit(2)  # before the model loads: the fix is a setting, not a wait

    model = TritonModel(load_inpainter(settings))
    config = TritonConfig(
        http_address=server.address,
        http_port=server.http_port,
        grpc_address=server.address,
        grpc_port=server.grpc_port,
        metrics_address=server.address,
        metrics_port=server.metrics_port,
        allow_gpu_metrics=False,
        strict_readiness=True,
        exit_timeout_secs=server.exit_timeout_s,
        log_verbose=server.log_verbose,
    )
    try:
        with Triton(config=config) as triton:
            triton.bind(
                model_name=server.model,
                infer_func=model.infer,
                model_version=CONTRACT_VERSION,
                inputs=[triton_tensor(spec, Tensor) for spec in INPUTS],
                outputs=[triton_tensor(spec, Tensor) for spec in OUTPUTS],
                config=triton_model_config(server),
                strict=False,
            )
            log.info(
                "serving %s on http://%s:%d (metrics :%d)",
                server.model,
                server.address,
                server.http_port,
                server.metrics_port,
            )
            triton.serve()
    except KeyboardInterrupt:
        pass
    stop_processes(below_us + descendants())
    log.info("triton stopped")


def descendants() -> list:
    import psutil

    return psutil.Process().children(recursive=True)


def stop_processes(processes: list, grace_s: float = 5.0) -> None:
    """No process of ours outlives us: PyTriton waits for tritonserver (and kills it after 30 s),
    but the Python backend stubs end only when they next notice their parent gone, which on a
    loaded machine was seen to take longer than the 15 s the suite allows (Kubernetes' grace is
    the same kind of limit). SIGTERM, a short grace, then SIGKILL."""
    import psutil

    alive = [p for p in {p.pid: p for p in processes}.values() if p.is_running() and not _resource_tracker(p)]
    if not alive:
        return
    log.info("stopping %d process(es) Triton left: %s", len(alive), ", ".join(_names(alive)))
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(alive, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def _command_line(process) -> str | None:
    """Its command line, or None when it is gone meanwhile (or not ours to read)."""
    try:
        return " ".join(process.cmdline())
    except Exception:
        return None


def _resource_tracker(process) -> bool:
    """multiprocessing's resource tracker ignores SIGTERM by design and exits when we do, after it
    has removed the shared memory PyTriton leaked: leave it to that."""
    return "multiprocessing.resource_tracker" in (_command_line(process) or "")


def _names(processes) -> list[str]:
    names = []
    for process in processes:
        command = _command_line(process)
        names.append(str(process.pid) if command is None else f"{process.pid}: {command[:160]}")
    return names


if __name__ == "__main__":
    main()
