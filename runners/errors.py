"""Errors a request can end with, and their one mapping to fal-shaped HTTP answers.

fal answers errors as ``{"detail": ..., "error_type": ...}``; validation errors carry a list of
``{"loc": ["body", field], "msg": ..., "type": ...}`` so that clients can name the bad field.
Everything a user can cause is an ``InpaintError`` subclass with a message they can act on;
anything else is our fault and becomes a 500 without internals.
"""

from __future__ import annotations

from typing import Any

# The error types whose failure is the replica's, not the request's (see ``InpaintError.retry_elsewhere``),
# filled in by the classes that say so: an error reported across a tier keeps only its type.
RETRY_ELSEWHERE_TYPES: set[str] = set()


class InpaintError(Exception):
    """Base of every error the service answers on purpose.

    ``retry_elsewhere`` is the error's kind, read by the queues: True for a failure of this
    replica's model tier (not loaded yet, restarting, unreachable), which another replica may not
    have, so a fleet's queue puts the request back in the line instead of failing it. Everything
    else (bad input, a storage outage, a failure inside the model, a timeout) ends the request
    once, with its own type, whatever its HTTP status: a 503 is not a kind."""

    status: int = 500
    error_type: str = "internal_error"
    retry_elsewhere: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("retry_elsewhere"):
            RETRY_ELSEWHERE_TYPES.add(cls.error_type)

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def detail(self) -> Any:
        return self.message

    def to_body(self) -> dict[str, Any]:
        return {"detail": self.detail(), "error_type": self.error_type}


class InvalidField(InpaintError):
    """A field's value is unusable; the 422 names the field like FastAPI/fal do."""

    status = 422
    error_type = "validation_error"

    def __init__(self, field: str | tuple[str | int, ...], message: str, kind: str = "value_error"):
        self.loc = list(field) if isinstance(field, tuple) else [field]
        super().__init__(f"{'.'.join(map(str, self.loc))}: {message}")
        self.field = field
        self.kind = kind
        self.reason = message

    def detail(self) -> Any:
        return [{"loc": ["body", *self.loc], "msg": self.reason, "type": self.kind}]


class ImageLoadError(InvalidField):
    """An image or mask that cannot be used (bad encoding, format, size)."""

    error_type = "image_load_error"


class LoraLoadError(InvalidField):
    """A LoRA that cannot be fetched, read or applied: the 422 names it (``loras.<i>.path``) and why."""

    error_type = "lora_load_error"


class RequestNotFound(InpaintError):
    """A status, result or cancel for a request id the queue does not know (or no longer keeps)."""

    status = 404
    error_type = "request_not_found"

    def __init__(self) -> None:
        super().__init__("no such request (unknown, or its result has expired)")


class RequestTooLarge(InpaintError):
    status = 413
    error_type = "request_too_large"


class ModelNotReady(InpaintError):
    """The model is still loading or warming up; clients should retry."""

    status = 503
    error_type = "model_not_ready"
    retry_elsewhere = True


class InferenceFailed(InpaintError):
    """The model raised while running this request: our fault, reported without internals."""

    status = 500
    error_type = "inference_error"


def validation_error_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """fal's 422 body from pydantic's ``ValidationError.errors()``; never echoes inputs
    (a data URI or a prompt can be megabytes, and may be private)."""
    detail = [
        {"loc": ["body", *[str(p) for p in e.get("loc", ())]], "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in errors
    ]
    return {"detail": detail, "error_type": "validation_error"}


class ReportedError(InpaintError):
    """An error the model worker reported for one job, raised again at the HTTP front."""

    def __init__(self, status: int, error_type: str, detail: Any):
        super().__init__(str(detail))
        self.status = status
        self.error_type = error_type
        self._detail = detail
        self.retry_elsewhere = error_type in RETRY_ELSEWHERE_TYPES  # the kind of the class it stood for

    def detail(self) -> Any:
        return self._detail


class WorkerUnavailable(InpaintError):
    """The model worker could not take the job (overloaded, restarting, or gone)."""

    status = 503
    error_type = "worker_unavailable"
    retry_elsewhere = True


class StorageUnavailable(InpaintError):
    """The output store could not keep an image (object storage unreachable, credentials refused, no
    such bucket): this request fails, once, nothing else does (another replica shares the store, so
    running it again elsewhere would fail the same way). ``sync_mode`` needs no store."""

    status = 503
    error_type = "storage_unavailable"


class RequestCancelled(InpaintError):
    """Cancelled by its caller. 400, not 409: fal's client retries 408/409/429."""

    status = 400
    error_type = "request_cancelled"

    def __init__(self, message: str = "the request was cancelled"):
        super().__init__(message)


class QueueFull(InpaintError):
    """More requests waiting than the server keeps; the official client retries 429."""

    status = 429
    error_type = "queue_full"


class RequestInvalid(InpaintError):
    """The body failed validation: fal's 422 with one entry per bad field."""

    status = 422
    error_type = "validation_error"

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__("invalid request")
        self._detail = validation_error_body(errors)["detail"]

    def detail(self) -> Any:
        return self._detail


class RequestTimedOut(InpaintError):
    """Past ``FLUX_REQUEST_TIMEOUT_S``: the loop dropped it at a step boundary. 504 (without fal's
    ingress header, so the official client does not retry a request that has used its time)."""

    status = 504
    error_type = "request_timeout"

    def __init__(self, message: str = "the request ran past this server's time limit and was stopped"):
        super().__init__(message)

    @classmethod
    def while_waiting(cls) -> RequestTimedOut:
        """One that reached its deadline in the line, before any model tier took it."""
        return cls("the request waited past this server's time limit")


class ServerDraining(InpaintError):
    """The server is shutting down (SIGTERM): new work is refused, unfinished work is failed at the
    end of the grace period. Another replica can take the retry."""

    status = 503
    error_type = "server_draining"

    def __init__(self, message: str = "the server is shutting down; retry (another replica will answer)"):
        super().__init__(message)


class QueueUnavailable(InpaintError):
    """The shared queue (Redis, FLUX_QUEUE_URL) failed a call: unreachable, timed out, out of
    memory, read-only after a failover, a script error. Nothing can be accepted or looked up until
    it answers again; work already running goes on, and the server recovers by itself."""

    status = 503
    error_type = "queue_unavailable"

    def __init__(
        self,
        message: str = "the request queue (Redis) is unreachable or refusing writes (full, failing over); retry shortly",
    ) -> None:
        super().__init__(message)


class AttemptsExhausted(InpaintError):
    """The replicas that claimed this request stopped answering (killed, out of memory, cut off)
    ``FLUX_QUEUE_MAX_ATTEMPTS`` times; it is not run again."""

    status = 500
    error_type = "attempts_exhausted"


class ClientDisconnected(RequestCancelled):
    """The caller of the sync route hung up: nobody is waiting for the answer, so the work stops."""

    error_type = "client_disconnected"

    def __init__(self) -> None:
        super().__init__("the client disconnected before the answer")
