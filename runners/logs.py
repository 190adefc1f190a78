"""Structured logs: one JSON object per event, with the request it belongs to.

Log pipelines (Loki, Cloud Logging, Elasticsearch) index fields, not prose, so every event of our
loggers is a JSON line with ``time``, ``level``, ``logger``, ``event`` and, when the event concerns
one request, ``request_id``. The id comes from the ``extra={"request_id": ...}`` of the call or,
failing that, from ``REQUEST_ID``, a context variable the front sets in the task serving a request
(asyncio copies context variables into the tasks it starts, so nothing needs threading through).
BentoML's own loggers (access log, server life cycle) keep BentoML's format.

Every module logs to ``logging.getLogger(__name__)``: the ``logger`` field then says which module
wrote an event (``runners.front.queue``), one tier's events can be kept or silenced by its package
(``runners.worker``), and configuring the one ``runners`` logger covers them all. The Triton
server spells its name out: its process is ``python -m runners.worker.triton_server``, where
``__name__`` is ``"__main__"``. tests/test_logs.py holds every module to this.
"""

from __future__ import annotations

import contextvars
import json
import logging
from datetime import datetime, timezone

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
OUR_LOGGERS = ("runners",)
# Attributes every LogRecord has: anything else on a record came from ``extra=`` and is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request_id:
            event["request_id"] = request_id
        event.update({k: v for k, v in vars(record).items() if k not in _STANDARD and k != "request_id"})
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # One event, one line: a path or name a client chose cannot forge a second log line.
        line = super().format(record).replace("\r", "\\r").replace("\n", "\\n")
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        return f"{line} [request_id={request_id}]" if request_id else line


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    """Our loggers write to stderr in ``log_format`` (json or text), not through BentoML's handlers.
    Idempotent: a second call replaces the handler instead of doubling every line."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.set_name("flux-inpaint")
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if h.get_name() != "flux-inpaint"] + [handler]
        logger.setLevel(level)
        logger.propagate = False
