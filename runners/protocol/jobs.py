"""What travels between the HTTP front and the model worker.

The front sends an ``InpaintJob`` (the validated fields plus the decoded images re-encoded
losslessly); the worker answers a ``JobResult`` per job: encoded output images, or the error of
that job alone. Both are pydantic models, so BentoML's channel and the Triton tensors carry them.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field

from runners.errors import InpaintError, ReportedError
from runners.protocol.progress import LogLine
from runners.protocol.schema import InpaintRequest

# Images are raw bytes in Python and base64 in JSON, which is how they cross between processes.
BYTES_AS_BASE64 = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")


class JobLora(BaseModel):
    """A request's LoRA, resolved by the front to a local file the worker can load."""

    path: str  # local file (the front and the worker share the disk)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    scale: float
    name: str  # what the request called it (safe to log: no query string)


class InpaintJob(BaseModel):
    model_config = BYTES_AS_BASE64

    request_id: str = Field(min_length=1, max_length=128)
    request: InpaintRequest  # image_url and mask_url blanked: the pixels travel below
    width: int = Field(ge=16, le=14142)
    height: int = Field(ge=16, le=14142)
    seed: int = Field(ge=0)
    image_png: bytes
    mask_png: bytes
    loras: list[JobLora] = Field(default_factory=list)
    preprocess_s: float = 0.0  # time the front spent decoding
    deadline: float | None = None  # unix time: past it the loop drops the job (wall clock, valid across hosts)

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline


class EncodedImage(BaseModel):
    model_config = BYTES_AS_BASE64

    data: bytes
    content_type: str
    width: int
    height: int


class JobError(BaseModel):
    status: int
    error_type: str
    detail: str | list | dict

    def as_exception(self) -> ReportedError:
        return ReportedError(self.status, self.error_type, self.detail)


class JobResult(BaseModel):
    request_id: str
    images: list[EncodedImage] = Field(default_factory=list)
    has_nsfw_concepts: list[bool] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    logs: list[LogLine] = Field(default_factory=list)
    error: JobError | None = None

    @classmethod
    def failed(cls, request_id: str, exc: InpaintError) -> JobResult:
        return cls(
            request_id=request_id, error=JobError(status=exc.status, error_type=exc.error_type, detail=exc.detail())
        )
