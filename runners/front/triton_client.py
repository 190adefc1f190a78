"""The front's way to the Triton tier: one job as one KServe v2 HTTP inference request.

Tensors travel with the v2 binary-data extension (a JSON header, then raw bytes), so images are not
base64-inflated. Triton's answers become the errors the in-process path raises: a full queue or a
queue-timeout rejection is ``QueueFull`` (429, which fal clients retry), no connection or a Triton
shutting down is ``WorkerUnavailable`` (503), and a job's own failure (the ERROR tensor) comes back
as the same ``ReportedError`` (status and error_type) the in-process worker would have produced.

Limits of this tier: Triton reports no per-step progress (status answers IN_PROGRESS from the
moment Triton has the request, queued there or running, without "step i/N" logs), and a request
Triton has taken cannot be stopped mid-loop: cancel answers the caller at once, the request still
runs to its end on Triton. A request still queued in the front never reaches Triton.
"""

from __future__ import annotations

import json
import logging
import struct
import time

import httpx
import numpy as np

from runners.config import ExecutorSettings
from runners.errors import QueueFull, RequestTimedOut, WorkerUnavailable
from runners.protocol.jobs import InpaintJob, JobResult
from runners.protocol.progress import JobProgress, LogLine
from runners.protocol.triton_tensors import CONTRACT_VERSION, INPUTS, NUMPY_TYPES, OUTPUTS, job_tensors, tensors_result

log = logging.getLogger(__name__)
HEADER_LENGTH = "Inference-Header-Content-Length"
# Triton's words for a request its queue policy refused: the caller should retry later (429).
REJECTED = ("exceeds maximum queue size", "request timeout expired", "timeout expired")


def encode_tensor(array: np.ndarray, datatype: str) -> bytes:
    """The v2 binary form of one tensor: raw little-endian values; BYTES elements length-prefixed."""
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(item)) + item for item in array.reshape(-1))
    return np.ascontiguousarray(array, dtype=np.dtype(NUMPY_TYPES[datatype]).newbyteorder("<")).tobytes()


def decode_tensor(raw: bytes, datatype: str, shape: list[int]) -> np.ndarray:
    if datatype == "BYTES":
        items, offset = [], 0
        while offset < len(raw):
            (length,) = struct.unpack_from("<I", raw, offset)
            items.append(raw[offset + 4 : offset + 4 + length])
            offset += 4 + length
        return np.array(items, dtype=np.object_).reshape(shape)
    return np.frombuffer(raw, dtype=np.dtype(NUMPY_TYPES[datatype]).newbyteorder("<")).reshape(shape)


def infer_body(request_id: str, inputs: dict[str, np.ndarray]) -> tuple[bytes, int]:
    """(body, JSON header length) of a v2 inference request with every tensor as binary data."""
    header_inputs, blobs = [], []
    for spec in INPUTS:
        blob = encode_tensor(inputs[spec.name], spec.datatype)
        header_inputs.append(
            {
                "name": spec.name,
                "shape": list(inputs[spec.name].shape),
                "datatype": spec.datatype,
                "parameters": {"binary_data_size": len(blob)},
            }
        )
        blobs.append(blob)
    header = json.dumps(
        {
            "id": request_id,
            "parameters": {"binary_data_output": True},
            "inputs": header_inputs,
            "outputs": [{"name": spec.name, "parameters": {"binary_data": True}} for spec in OUTPUTS],
        }
    ).encode()
    return header + b"".join(blobs), len(header)


def parse_response(body: bytes, header_length: int | None) -> dict[str, np.ndarray]:
    header = json.loads(body[:header_length] if header_length else body)
    outputs, offset = {}, header_length or len(body)
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is None:  # sent as JSON data
            data = output["data"]
            if output["datatype"] == "BYTES":
                data = [item.encode() for item in data]
            outputs[output["name"]] = np.array(data, dtype=NUMPY_TYPES[output["datatype"]]).reshape(output["shape"])
            continue
        outputs[output["name"]] = decode_tensor(body[offset : offset + size], output["datatype"], output["shape"])
        offset += size
    return outputs


class TritonClient:
    """Inference, readiness and statistics of one model on one Triton server, over HTTP."""

    def __init__(self, settings: ExecutorSettings) -> None:
        self.settings = settings
        self.base = settings.triton_url.rstrip("/")
        self.model = settings.triton_model
        timeout = httpx.Timeout(settings.triton_timeout_s, connect=settings.triton_connect_timeout_s)
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        self.http = httpx.AsyncClient(timeout=timeout, limits=limits)
        self._ready: tuple[float, bool] = (float("-inf"), False)
        self.in_flight: dict[str, LogLine] = {}  # request id -> when it was sent

    async def infer(self, job: InpaintJob) -> JobResult:
        """One job on Triton. Raises QueueFull (429) or WorkerUnavailable (503); a job's own failure
        comes back in the result, as from the in-process worker."""
        body, header_length = infer_body(job.request_id, job_tensors(job))
        url = f"{self.base}/v2/models/{self.model}/versions/{CONTRACT_VERSION}/infer"
        headers = {HEADER_LENGTH: str(header_length), "Content-Type": "application/octet-stream"}
        self.in_flight[job.request_id] = LogLine(message="sent to the Triton model server", source="triton")
        try:
            response = await self._post(job, url, body, headers)
        finally:
            self.in_flight.pop(job.request_id, None)
        if response.status_code != 200:
            raise self._error(job.request_id, response)
        length = response.headers.get(HEADER_LENGTH)
        return tensors_result(job, parse_response(response.content, int(length) if length else None))

    async def _post(self, job: InpaintJob, url: str, body: bytes, headers: dict) -> httpx.Response:
        for attempt in (1, 2):
            try:
                return await self.http.post(url, content=body, headers=headers)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # never reached Triton: safe to try once more
                if attempt == 2:
                    self._ready = (float("-inf"), False)
                    log.warning("request %s: triton not reachable: %s", job.request_id, exc)
                    raise WorkerUnavailable("the Triton model server is not reachable; retry shortly") from None
            except httpx.TimeoutException as exc:
                # Triton has it and may still be running it: a retry by the caller would run it twice.
                log.warning("request %s: triton did not answer in time: %s", job.request_id, exc)
                raise RequestTimedOut("the Triton model server did not answer in time") from None
            except httpx.TransportError as exc:  # reached it, then lost it (Triton stopped mid-request)
                self._ready = (float("-inf"), False)
                log.warning("request %s: triton connection lost: %s", job.request_id, exc)
                raise WorkerUnavailable("the Triton model server went away during the request; retry shortly") from None
        raise AssertionError("unreachable")

    def _error(self, request_id: str, response: httpx.Response) -> Exception:
        try:
            message = str(response.json().get("error", ""))
        except ValueError:
            message = response.text[:500]
        log.warning("request %s: triton answered %d: %s", request_id, response.status_code, message)
        if any(words in message.lower() for words in REJECTED):
            return QueueFull(f"the model server's queue is full or its wait too long ({message}); retry shortly")
        if response.status_code in (429, 503) or "unavailable" in message.lower() or "not ready" in message.lower():
            return WorkerUnavailable("the Triton model server is not ready or is stopping; retry shortly")
        return WorkerUnavailable(f"the Triton model server failed the request ({response.status_code}); retry shortly")

    async def ready(self) -> bool:
        """Triton has our model loaded at this front's tensor contract version (CONTRACT_VERSION),
        cached for ready_cache_s. A Triton of another release is up but never ready for us."""
        checked, answer = self._ready
        if time.monotonic() - checked < self.settings.triton_ready_cache_s:
            return answer
        try:
            response = await self.http.get(
                f"{self.base}/v2/models/{self.model}/versions/{CONTRACT_VERSION}/ready", timeout=2.0
            )
            answer = response.status_code == 200
            if not answer and (await self.http.get(f"{self.base}/v2/health/ready", timeout=2.0)).status_code == 200:
                log.warning(
                    "Triton at %s is up but does not serve %s at tensor contract version %d: "
                    "run the Triton tier of this release",
                    self.base,
                    self.model,
                    CONTRACT_VERSION,
                )
        except httpx.HTTPError:
            answer = False
        self._ready = (time.monotonic(), answer)
        return answer

    async def progress(self, request_ids: list[str]) -> dict[str, JobProgress]:
        """IN_PROGRESS from the moment Triton has the request (queued there or running): Triton
        reports no per-request state, so there are no "step i/N" lines."""
        return {rid: JobProgress(started=True, logs=[line]) for rid in request_ids if (line := self.in_flight.get(rid))}

    async def cancel(self, request_id: str) -> None:
        log.info("request %s: cancel cannot stop a request Triton has taken; it runs to its end", request_id)

    async def drained(self) -> None:
        pass  # Triton is its own deployment: it drains on its own SIGTERM

    async def close(self) -> None:
        await self.http.aclose()
