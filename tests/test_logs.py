"""Structured logs: one JSON object per event, carrying the request id it concerns."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re

from runners.logs import OUR_LOGGERS, REQUEST_ID, JsonFormatter, TextFormatter, configure_logging
from tests.conftest import REPO


def emit(formatter, message, *args, **kwargs) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("runners.test-logs")
    logger.handlers, logger.propagate = [handler], False
    try:
        logger.warning(message, *args, **kwargs)
    finally:
        logger.handlers, logger.propagate = [], True
    return stream.getvalue()


def test_a_json_line_per_event_with_the_request_id_from_extra_or_context():
    event = json.loads(emit(JsonFormatter(), "batch of %d", 3, extra={"request_id": "r-1", "batch": 3}))
    assert event["event"] == "batch of 3" and event["level"] == "WARNING" and event["logger"] == "runners.test-logs"
    assert event["request_id"] == "r-1" and event["batch"] == 3 and event["time"].endswith("+00:00")

    async def in_a_request_task():
        REQUEST_ID.set("r-2")  # what a feeder does; tasks do not leak it to each other
        return json.loads(emit(JsonFormatter(), "step"))

    assert asyncio.run(in_a_request_task())["request_id"] == "r-2"
    assert "request_id" not in json.loads(emit(JsonFormatter(), "idle"))


def test_exceptions_stay_inside_their_json_line():
    try:
        raise ValueError("boom")
    except ValueError:
        line = emit(JsonFormatter(), "failed", exc_info=True)
    assert line.count("\n") == 1 and "ValueError: boom" in json.loads(line)["exception"]


def test_text_format_names_the_request_too():
    assert emit(TextFormatter(), "done", extra={"request_id": "r-3"}).rstrip().endswith("done [request_id=r-3]")


def test_configuring_twice_does_not_double_lines():
    configure_logging("json")
    configure_logging("json")
    for name in OUR_LOGGERS:
        assert [h.get_name() for h in logging.getLogger(name).handlers].count("flux-inpaint") == 1


def test_every_module_logs_under_the_configured_logger():
    """One naming scheme: getLogger(__name__), or a module's own dotted name spelled out, so that
    configure_logging's loggers are the parents of every logger the server writes to."""
    configured = tuple(f"{name}." for name in OUR_LOGGERS)
    for path in sorted((REPO / "runners").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for argument in re.findall(r"logging\.getLogger\(([^)]*)\)", path.read_text()):
            if path.name == "logs.py" and argument == "name":
                continue  # configure_logging itself
            name = module if argument == "__name__" else argument.strip("\"'")
            assert name == module and name.startswith(configured), f"{path}: getLogger({argument})"


def test_a_text_line_cannot_be_split_by_what_a_client_sent():
    line = emit(TextFormatter(), "GET %s answered 404", "/queue/x\nFAKE ERROR admin logged in")
    assert line.count("\n") == 1 and "\\nFAKE ERROR" in line
