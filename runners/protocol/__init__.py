"""What crosses tiers: fal's input and output schema, the job the front sends and the result the
worker returns, progress lines, and the Triton tensor contract. pydantic, numpy and Pillow only:
both tiers import this, and it imports no other tier."""

from runners.protocol.jobs import EncodedImage, InpaintJob, JobError, JobLora, JobResult
from runners.protocol.progress import JobProgress, LogLine, ProgressReport
from runners.protocol.schema import InpaintOutput, InpaintRequest

__all__ = [
    "EncodedImage",
    "InpaintJob",
    "InpaintOutput",
    "InpaintRequest",
    "JobError",
    "JobLora",
    "JobProgress",
    "JobResult",
    "LogLine",
    "ProgressReport",
]
