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


def test_the_batching_mode_is_read_from_flux_batching_and_a_bad_one_is_named(monkeypatch):
    monkeypatch.setenv("FLUX_BATCHING", "adaptive")
    assert BatchingSettings().mode == "adaptive"
    monkeypatch.setenv("FLUX_BATCHING", "eager")
    with pytest.raises(ValidationError) as error:
        BatchingSettings()
    assert "FLUX_BATCHING" in str(error.value)
    monkeypatch.delenv("FLUX_BATCHING")
    assert BatchingSettings().mode == "adaptive"  # the default: p95 at 80% load, benchmarks/results/batching.md
