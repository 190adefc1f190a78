"""Settings read from the environment: a value BentoML or the service cannot run with stops the
server at start-up with the variable's name, instead of failing strangely later."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from runners.config import BatchingSettings, ServerSettings


def test_a_batch_size_of_one_is_refused_with_the_alternative_named(monkeypatch):
    # BentoML's batchable API raises deep inside its start-up for 1 (found by tests/test_production.py).
    monkeypatch.setenv("FLUX_BATCH_MAX_SIZE", "1")
    with pytest.raises(ValidationError) as error:
        BatchingSettings()
    assert "max_size" in str(error.value)
    monkeypatch.setenv("FLUX_BATCH_MAX_SIZE", "2")
    assert BatchingSettings().max_size == 2


@pytest.mark.parametrize(
    "name, value",
    [
        ("FLUX_REQUEST_TIMEOUT_S", "0"),
        ("FLUX_DRAIN_TIMEOUT_S", "-1"),
        ("FLUX_LOG_FORMAT", "xml"),
    ],
)
def test_limits_and_log_format_are_bounded(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        ServerSettings()


def test_production_defaults(monkeypatch):
    for name in ("FLUX_REQUEST_TIMEOUT_S", "FLUX_DRAIN_TIMEOUT_S", "FLUX_LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)
    settings = ServerSettings()
    assert (settings.request_timeout_s, settings.drain_timeout_s, settings.log_format) == (600.0, 120.0, "json")


def test_call_timeouts_must_outlast_the_request_deadline(monkeypatch):
    from runners.config import load_settings

    monkeypatch.setenv("FLUX_REQUEST_TIMEOUT_S", "1800")  # longer than the default batch timeout of 900
    with pytest.raises(ValueError, match="FLUX_BATCH_TIMEOUT_S"):
        load_settings()
    monkeypatch.setenv("FLUX_BATCH_TIMEOUT_S", "1830")
    monkeypatch.setenv("FLUX_TRITON_TIMEOUT_S", "1830")
    assert load_settings().server.request_timeout_s == 1800


@pytest.mark.parametrize(
    "name, value",
    [
        ("FLUX_QUEUE_URL", "http://127.0.0.1:6379"),  # not redis:// or rediss://
        ("FLUX_QUEUE_LEASE_S", "0"),
        ("FLUX_QUEUE_MAX_ATTEMPTS", "0"),
        ("FLUX_QUEUE_REDIS_PASSWORD_FILE", "/nonexistent/secret"),
        ("FLUX_QUEUE_KEY_PREFIX", "has space"),
    ],
)
def test_the_shared_queue_settings_are_checked_at_start(monkeypatch, name, value):
    from runners.config import QueueSettings

    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as error:
        QueueSettings()
    assert name.removeprefix("FLUX_QUEUE_").lower() in str(error.value)


def test_the_redis_password_comes_from_the_url_the_variable_or_a_mounted_file(monkeypatch, tmp_path):
    from runners.config import QueueSettings

    monkeypatch.setenv("FLUX_QUEUE_URL", "rediss://redis.example:6380/0")
    assert QueueSettings().redis_password_value() is None
    monkeypatch.setenv("FLUX_QUEUE_REDIS_PASSWORD", "from-env")
    assert QueueSettings().redis_password_value() == "from-env"
    secret = tmp_path / "password"
    secret.write_text("from-secret\n")
    monkeypatch.setenv("FLUX_QUEUE_REDIS_PASSWORD_FILE", str(secret))
    assert QueueSettings().redis_password_value() == "from-secret"
