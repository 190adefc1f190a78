"""Webhook delivery: retries with backoff inside a bounded time, and the fetcher's URL rules."""

from __future__ import annotations

import asyncio
import time

from runners.config import WebhookSettings
from runners.fetch import FetchFailed, UrlRefused
from runners.front.webhooks import deliver, webhook_body


class FakeFetcher:
    def __init__(self, answers):
        self.answers = list(answers)
        self.calls = []

    async def post_json(self, url, payload, timeout_s):
        self.calls.append((url, payload, timeout_s))
        answer = self.answers.pop(0) if self.answers else 200
        if isinstance(answer, Exception):
            raise answer
        return answer


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


BODY = webhook_body("rid", {"images": []}, None)


def test_body_shapes():
    assert BODY == {
        "request_id": "rid",
        "gateway_request_id": "rid",
        "status": "OK",
        "payload": {"images": []},
        "error": None,
    }
    failed = webhook_body("rid", None, {"detail": "broken", "error_type": "image_load_error"})
    assert failed["status"] == "ERROR" and failed["error"] == "broken"
    assert failed["payload"] == {"detail": "broken", "error_type": "image_load_error"}


def test_retries_until_delivered(monkeypatch):
    monkeypatch.setattr(asyncio, "sleep", fast_sleep)
    fetcher = FakeFetcher([500, FetchFailed("connection refused"), 503, 204])
    assert run(deliver(fetcher, "https://hooks.example/x", BODY, WebhookSettings(attempts=5)))
    assert len(fetcher.calls) == 4 and all(call[1] == BODY for call in fetcher.calls)


def test_gives_up_after_the_attempts(monkeypatch):
    monkeypatch.setattr(asyncio, "sleep", fast_sleep)
    fetcher = FakeFetcher([500] * 10)
    assert not run(deliver(fetcher, "https://hooks.example/x", BODY, WebhookSettings(attempts=3)))
    assert len(fetcher.calls) == 3


def test_a_receiver_that_refuses_is_not_retried():
    fetcher = FakeFetcher([404])
    assert not run(deliver(fetcher, "https://hooks.example/x", BODY, WebhookSettings()))
    assert len(fetcher.calls) == 1


def test_a_refused_address_is_never_retried():
    fetcher = FakeFetcher([UrlRefused("host resolves to 10.0.0.1, a private address")])
    assert not run(deliver(fetcher, "http://10.0.0.1/hook", BODY, WebhookSettings()))
    assert len(fetcher.calls) == 1


def test_total_time_is_bounded():
    fetcher = FakeFetcher([500] * 20)
    started = time.monotonic()
    assert not run(deliver(fetcher, "https://hooks.example/x", BODY, WebhookSettings(attempts=20, total_timeout_s=2.5)))
    assert time.monotonic() - started < 3.5  # backoff 1 s, 2 s, ... cut at the deadline
    assert 2 <= len(fetcher.calls) <= 3
    assert all(call[2] <= 2.5 for call in fetcher.calls)


_real_sleep = asyncio.sleep


async def fast_sleep(seconds):
    await _real_sleep(0)
