"""``fal_webhook``: POST a finished request's result to the caller's URL.

Delivered through the same ``SafeFetcher`` as image URLs (same host policy, pinned address), with
retries and exponential backoff inside a bounded total time. The body is fal's webhook shape:
``{request_id, gateway_request_id, status: "OK"|"ERROR", payload, error}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from runners.config import WebhookSettings
from runners.fetch import FetchFailed, SafeFetcher, UrlRefused

log = logging.getLogger(__name__)

# Answers that will not change by retrying (the receiver refuses the delivery itself).
PERMANENT_FAILURES = {400, 401, 403, 404, 405, 410, 413, 422}


def webhook_body(request_id: str, output: dict[str, Any] | None, error: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "gateway_request_id": request_id,
        "status": "OK" if error is None else "ERROR",
        "payload": output if error is None else error,
        "error": None if error is None else str(error.get("detail")),
    }


async def deliver(fetcher: SafeFetcher, url: str, body: dict[str, Any], settings: WebhookSettings) -> bool:
    """True once the receiver answered 2xx; False after the attempts or the time run out."""
    deadline = time.monotonic() + settings.total_timeout_s
    delay = 1.0
    for attempt in range(1, settings.attempts + 1):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            status = await fetcher.post_json(url, body, timeout_s=min(remaining, 30.0))
        except UrlRefused as exc:
            log.warning("webhook for %s refused: %s", body["request_id"], exc)
            return False
        except FetchFailed as exc:
            status, reason = None, str(exc)
        else:
            if 200 <= status < 300:
                log.info("webhook for %s delivered (attempt %d)", body["request_id"], attempt)
                return True
            reason = f"HTTP {status}"
            if status in PERMANENT_FAILURES:
                log.warning("webhook for %s rejected by the receiver: %s", body["request_id"], reason)
                return False
        log.info("webhook for %s attempt %d failed: %s", body["request_id"], attempt, reason)
        if attempt == settings.attempts:
            break  # no wait after the last attempt: it would only hold the finish hook (and a drain) up
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay *= 2
    log.warning("webhook for %s not delivered after %d attempt(s)", body["request_id"], attempt)
    return False
