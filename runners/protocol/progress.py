"""Per-request progress as it crosses tiers: fal's log line shape and a job's progress."""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import BaseModel, Field


class LogLine(BaseModel):
    """fal's log entry shape."""

    message: str
    level: str = "INFO"
    source: str = "worker"
    timestamp: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())


class JobProgress(BaseModel):
    started: bool = False
    logs: list[LogLine] = Field(default_factory=list)


class ProgressReport(BaseModel):
    """The worker's answer to a progress call: each known job's progress by request id."""

    jobs: dict[str, JobProgress] = Field(default_factory=dict)
