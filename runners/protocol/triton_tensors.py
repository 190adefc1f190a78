"""The tensor contract of the Triton tier: one ``InpaintJob`` in, one ``JobResult`` out, as KServe v2 tensors.

Both ends import this module (the front with numpy 2, the Triton process with numpy 1), so a field
added here reaches both. One Triton request carries one job (batch dimension 1); Triton's dynamic
batcher gathers concurrent requests into one execution, which ``runners.worker.adaptive.run_jobs`` runs.

Inputs (batch dimension first, shown without it)::

    REQUEST_ID             BYTES [1]   the front's request id (for logs)
    PROMPT                 BYTES [1]   UTF-8
    IMAGE                  BYTES [1]   PNG, decoded and checked by the front (lossless)
    MASK                   BYTES [1]   PNG, single channel
    LORAS                  BYTES [1]   JSON list of {path, sha256, scale, name} (files on the shared disk)
    OUTPUT_FORMAT          BYTES [1]   "jpeg" | "png"
    ACCELERATION           BYTES [1]   fal's "none" | "regular"
    WIDTH, HEIGHT          INT32 [1]   output size (multiples of 16)
    SEED                   INT64 [1]
    NUM_INFERENCE_STEPS    INT32 [1]
    NUM_IMAGES             INT32 [1]
    STRENGTH               FP64  [1]   FP64 so that the same seed gives the same image as in-process
    GUIDANCE_SCALE         FP64  [1]
    ENABLE_SAFETY_CHECKER  BOOL  [1]
    DEADLINE               FP64  [1]   unix time past which the loop drops the job (504); 0: none

Outputs::

    IMAGES                 BYTES [n]   encoded in OUTPUT_FORMAT (one placeholder b"" on error)
    NSFW                   BOOL  [n]   has_nsfw_concepts
    SEED                   INT64 [1]
    TIMINGS                FP64  [3]   seconds: preprocess, inference, decode
    LOGS                   BYTES [1]   JSON list of the worker's log lines ("started", "step i/N", "done")
    ERROR                  BYTES [1]   "" or JSON {status, error_type, detail}: this request's failure alone
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from runners.protocol.images import CONTENT_TYPES
from runners.protocol.jobs import EncodedImage, InpaintJob, JobError, JobLora, JobResult
from runners.protocol.progress import LogLine
from runners.protocol.schema import InpaintRequest

MODEL_NAME = "flux_inpaint"
# The version of this tensor contract. The Triton tier serves its model as this version, and the
# front is ready only when Triton has exactly its own version loaded: a front and a Triton of
# different releases never exchange tensors they would read differently. Bump on any change below.
CONTRACT_VERSION = 1
TIMING_NAMES = ("preprocess", "inference", "decode")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # KServe v2 name
    shape: tuple[int, ...]  # without the batch dimension; -1 is variable


INPUTS = (
    TensorSpec("REQUEST_ID", "BYTES", (1,)),
    TensorSpec("PROMPT", "BYTES", (1,)),
    TensorSpec("IMAGE", "BYTES", (1,)),
    TensorSpec("MASK", "BYTES", (1,)),
    TensorSpec("LORAS", "BYTES", (1,)),
    TensorSpec("OUTPUT_FORMAT", "BYTES", (1,)),
    TensorSpec("ACCELERATION", "BYTES", (1,)),
    TensorSpec("WIDTH", "INT32", (1,)),
    TensorSpec("HEIGHT", "INT32", (1,)),
    TensorSpec("SEED", "INT64", (1,)),
    TensorSpec("NUM_INFERENCE_STEPS", "INT32", (1,)),
    TensorSpec("NUM_IMAGES", "INT32", (1,)),
    TensorSpec("STRENGTH", "FP64", (1,)),
    TensorSpec("GUIDANCE_SCALE", "FP64", (1,)),
    TensorSpec("ENABLE_SAFETY_CHECKER", "BOOL", (1,)),
    TensorSpec("DEADLINE", "FP64", (1,)),
)
OUTPUTS = (
    TensorSpec("IMAGES", "BYTES", (-1,)),
    TensorSpec("NSFW", "BOOL", (-1,)),
    TensorSpec("SEED", "INT64", (1,)),
    TensorSpec("TIMINGS", "FP64", (len(TIMING_NAMES),)),
    TensorSpec("LOGS", "BYTES", (1,)),
    TensorSpec("ERROR", "BYTES", (1,)),
)
NUMPY_TYPES = {
    "BYTES": np.object_,
    "BOOL": np.bool_,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP32": np.float32,
    "FP64": np.float64,
}


def _bytes(value: bytes | str) -> np.ndarray:
    return np.array([[value.encode() if isinstance(value, str) else value]], dtype=np.object_)


def _one(array: np.ndarray):
    """The single value of a [1, 1] request tensor."""
    value = array.reshape(-1)[0]
    return value.item() if isinstance(value, np.generic) else value


def _text(array: np.ndarray) -> str:
    value = _one(array)
    return value.decode() if isinstance(value, bytes) else str(value)


def job_tensors(job: InpaintJob) -> dict[str, np.ndarray]:
    """Front side: a job as the request's input tensors (batch dimension 1)."""
    request = job.request
    return {
        "REQUEST_ID": _bytes(job.request_id),
        "PROMPT": _bytes(request.prompt),
        "IMAGE": _bytes(job.image_png),
        "MASK": _bytes(job.mask_png),
        "LORAS": _bytes(json.dumps([lora.model_dump() for lora in job.loras])),
        "OUTPUT_FORMAT": _bytes(request.output_format),
        "ACCELERATION": _bytes(request.acceleration),
        "WIDTH": np.array([[job.width]], dtype=np.int32),
        "HEIGHT": np.array([[job.height]], dtype=np.int32),
        "SEED": np.array([[job.seed]], dtype=np.int64),
        "NUM_INFERENCE_STEPS": np.array([[request.num_inference_steps]], dtype=np.int32),
        "NUM_IMAGES": np.array([[request.num_images]], dtype=np.int32),
        "STRENGTH": np.array([[request.strength]], dtype=np.float64),
        "GUIDANCE_SCALE": np.array([[request.guidance_scale]], dtype=np.float64),
        "ENABLE_SAFETY_CHECKER": np.array([[request.enable_safety_checker]], dtype=np.bool_),
        "DEADLINE": np.array([[getattr(job, "deadline", None) or 0.0]], dtype=np.float64),
    }


def tensors_job(inputs: dict[str, np.ndarray]) -> InpaintJob:
    """Triton side: one request's input tensors back into the job the worker would have received.
    Raises pydantic's ValidationError (or ValueError) for values the contract does not allow."""
    request = InpaintRequest(
        prompt=_text(inputs["PROMPT"]),
        image_url="-",
        mask_url="-",
        num_inference_steps=_one(inputs["NUM_INFERENCE_STEPS"]),
        seed=_one(inputs["SEED"]),
        guidance_scale=_one(inputs["GUIDANCE_SCALE"]),
        strength=_one(inputs["STRENGTH"]),
        num_images=_one(inputs["NUM_IMAGES"]),
        enable_safety_checker=bool(_one(inputs["ENABLE_SAFETY_CHECKER"])),
        output_format=_text(inputs["OUTPUT_FORMAT"]),
        acceleration=_text(inputs["ACCELERATION"]),
    )
    deadline = float(_one(inputs["DEADLINE"])) if "DEADLINE" in inputs else 0.0
    extra = {"deadline": deadline} if deadline > 0 and "deadline" in InpaintJob.model_fields else {}
    return InpaintJob(
        **extra,
        request_id=_text(inputs["REQUEST_ID"]),
        request=request,
        width=_one(inputs["WIDTH"]),
        height=_one(inputs["HEIGHT"]),
        seed=_one(inputs["SEED"]),
        image_png=_one(inputs["IMAGE"]),
        mask_png=_one(inputs["MASK"]),
        loras=[JobLora.model_validate(lora) for lora in json.loads(_text(inputs["LORAS"]))],
    )


def result_tensors(result: JobResult, seed: int) -> dict[str, np.ndarray]:
    """Triton side: one job's result as that request's output tensors (batch dimension 1)."""
    error = "" if result.error is None else result.error.model_dump_json()
    images = [image.data for image in result.images] or [b""]
    nsfw = list(result.has_nsfw_concepts)[: len(result.images)] or [False]
    nsfw += [False] * (len(images) - len(nsfw))
    return {
        "IMAGES": np.array([images], dtype=np.object_),
        "NSFW": np.array([nsfw], dtype=np.bool_),
        "SEED": np.array([[seed]], dtype=np.int64),
        "TIMINGS": np.array([[result.timings.get(name, 0.0) for name in TIMING_NAMES]], dtype=np.float64),
        "LOGS": _bytes(json.dumps([line.model_dump(mode="json") for line in result.logs])),
        "ERROR": _bytes(error),
    }


def tensors_result(job: InpaintJob, outputs: dict[str, np.ndarray]) -> JobResult:
    """Front side: a request's output tensors as the ``JobResult`` the in-process worker returns."""
    error = _text(outputs["ERROR"])
    if error:
        return JobResult(request_id=job.request_id, error=JobError.model_validate_json(error))
    fmt = job.request.output_format
    images = [
        EncodedImage(data=bytes(data), content_type=CONTENT_TYPES[fmt], width=job.width, height=job.height)
        for data in outputs["IMAGES"].reshape(-1)
    ]
    return JobResult(
        request_id=job.request_id,
        images=images,
        has_nsfw_concepts=[bool(flag) for flag in outputs["NSFW"].reshape(-1)][: len(images)],
        timings=dict(zip(TIMING_NAMES, (float(t) for t in outputs["TIMINGS"].reshape(-1)))),
        logs=[LogLine.model_validate(line) for line in json.loads(_text(outputs["LOGS"]))],
    )
