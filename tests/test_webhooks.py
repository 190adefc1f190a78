"""Webhook delivery: retries with backoff inside a bounded time, and the fetcher's URL rules."""

from __future__ import annotations

import asyncio
import json
import socket
from contextlib import contextmanager

from runners.config import WebhookSettings
from runners.fetch import FetchFailed, UrlRefused
from runners.front import webhooks
from runners.front.webhooks import deliver, webhook_body
from tests.conftest import LocalHandler, local_http_server


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


def test_gives_up_after_the_attempts_without_waiting_after_the_last(monkeypatch):
    clock = BackoffClock()
    monkeypatch.setattr(webhooks, "time", clock)
    monkeypatch.setattr(asyncio, "sleep", clock.sleep)
    fetcher = FakeFetcher([500] * 10)
    assert not run(deliver(fetcher, "https://hooks.example/x", BODY, WebhookSettings(attempts=3)))
    assert len(fetcher.calls) == 3
    assert clock.slept == [1.0, 2.0]  # between the attempts only (a wait of 4 s after the third once held a drain up)


def test_a_receiver_that_refuses_is_not_retried():
    fetcher = FakeFetcher([404])
    assert not run(deliver(fetcher, "https://hooks.example/x", BODY, WebhookSettings()))
    assert len(fetcher.calls) == 1


def test_a_refused_address_is_never_retried():
    fetcher = FakeFetcher([UrlRefused("host resolves to 10.0.0.1, a private address")])
    assert not run(deliver(fetcher, "http://10.0.0.1/hook", BODY, WebhookSettings()))
    assert len(fetcher.calls) == 1


def test_total_time_is_bounded(monkeypatch):
    """Backoff 1 s, then 2 s cut to the 1.5 s left of the 2.5 s deadline, and no attempt past it: on a
    clock that only the backoff moves, so a loaded machine's scheduling cannot change what is seen."""
    clock = BackoffClock()
    monkeypatch.setattr(webhooks, "time", clock)
    monkeypatch.setattr(asyncio, "sleep", clock.sleep)
    fetcher = FakeFetcher([500] * 20)
    assert not run(deliver(fetcher, "https://hooks.example/x", BODY, WebhookSettings(attempts=20, total_timeout_s=2.5)))
    assert clock.slept == [1.0, 1.5] and clock.now == 2.5
    assert [call[2] for call in fetcher.calls] == [2.5, 1.5]  # each attempt's timeout: what is left


class BackoffClock:
    """``time.monotonic`` for runners.front.webhooks, advanced only by its ``asyncio.sleep``."""

    def __init__(self):
        self.now, self.slept = 0.0, []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds
        await _real_sleep(0)


_real_sleep = asyncio.sleep


async def fast_sleep(seconds):
    await _real_sleep(0)


# ---- real receivers, over HTTP, through the real fetcher -------------------------------------


class FlakyReceiver(LocalHandler):
    """Answers 500, 500, then 200; keeps every body it was sent."""

    answers: list[int] = []
    bodies: list[dict] = []

    def do_POST(self):
        FlakyReceiver.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send(FlakyReceiver.answers.pop(0) if FlakyReceiver.answers else 200, b"", "text/plain")


def local_fetcher():
    from runners.config import FetchSettings
    from runners.fetch import HostPolicy, SafeFetcher

    return SafeFetcher(HostPolicy(["127.0.0.1"]), FetchSettings())


def test_a_real_receiver_answering_500_500_then_200_gets_the_body_three_times(monkeypatch):
    monkeypatch.setattr(asyncio, "sleep", fast_sleep)  # the backoff's length is test_total_time_is_bounded's
    FlakyReceiver.answers, FlakyReceiver.bodies = [500, 500], []
    with local_http_server(FlakyReceiver) as url:
        delivered = run(deliver(local_fetcher(), f"{url}/hook", BODY, WebhookSettings(attempts=5)))
    assert delivered
    assert FlakyReceiver.bodies == [BODY, BODY, BODY]  # retried after each 500, stopped at the 200


def test_a_receiver_that_is_always_down_is_tried_each_attempt_then_given_up(caplog, monkeypatch):
    import logging

    monkeypatch.setattr(asyncio, "sleep", fast_sleep)

    with closed_port() as port, caplog.at_level(logging.INFO, logger="runners.front.webhooks"):
        delivered = run(deliver(local_fetcher(), f"http://127.0.0.1:{port}/hook", BODY, WebhookSettings(attempts=3)))
    assert not delivered
    failed = [r.getMessage() for r in caplog.records if "attempt" in r.getMessage() and "failed" in r.getMessage()]
    assert len(failed) == 3, failed  # three real connection attempts, then the give-up
    assert "not delivered after 3 attempt(s)" in caplog.records[-1].getMessage()


@contextmanager
def closed_port():
    """A loopback port that refuses connections: bound and never listening, so that no other server
    (another test's, beside this one under pytest-xdist) can take it meanwhile, as a port that was
    only probed free could be."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]
