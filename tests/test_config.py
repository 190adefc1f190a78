"""Settings read from the environment: a value BentoML or the service cannot run with stops the
server at start-up with the variable's name, instead of failing strangely later."""

from __future__ import annotations

import types

import pytest
from pydantic import ValidationError

from runners.config import BatchingSettings, LoraSettings, QueueSettings, ServerSettings, Settings, StoreSettings


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


def _outside_values(info) -> list[tuple[str, str]]:
    """(environment value, pydantic's words for the bound it breaks) for each bound declared on a
    field: read from the field's own metadata (ge/le, min/max length, pattern, Literal), never retyped."""
    import math
    import re
    import typing

    import annotated_types

    annotation = info.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None: the bounds are on X
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    is_list = typing.get_origin(annotation) is list
    default = info.get_default(call_default_factory=True)
    item = str(default[0]) if is_list and default else "a"
    cases = []
    for bound in info.metadata:
        if isinstance(bound, annotated_types.Ge):
            below = bound.ge - 1 if annotation is int else math.nextafter(bound.ge, -math.inf)
            cases.append((repr(below), "greater than or equal to"))
        elif isinstance(bound, annotated_types.Le):
            above = bound.le + 1 if annotation is int else math.nextafter(bound.le, math.inf)
            cases.append((repr(above), "less than or equal to"))
        elif isinstance(bound, annotated_types.MinLen) and bound.min_length > 0:
            short = ",".join([item] * (bound.min_length - 1)) if is_list else "a" * (bound.min_length - 1)
            cases.append((short, "at least"))
        elif isinstance(bound, annotated_types.MaxLen):
            if is_list:
                cases.append((",".join([item] * (bound.max_length + 1)), "at most"))
            else:  # as long as allowed plus one, in the field's own pattern when it has one
                pattern = next(
                    (getattr(m, "pattern", None) for m in info.metadata if getattr(m, "pattern", None)), None
                )
                long = "http://" + "a" * (bound.max_length + 1 - len("http://"))
                if not (pattern and re.fullmatch(pattern, long)):
                    long = "a" * (bound.max_length + 1)
                cases.append((long, "at most"))
        elif getattr(bound, "pattern", None):
            cases.append(
                (next(v for v in ("a b", "http://", "") if not re.fullmatch(bound.pattern, v)), "match pattern")
            )
    if typing.get_origin(annotation) is typing.Literal:
        cases.append(("-".join(typing.get_args(annotation)) + "-not-a-choice", "Input should be"))
    if annotation is bool:
        cases.append(("maybe", "valid boolean"))
    return cases


def _every_field():
    from runners.config import Settings, variable_name

    for group_info in Settings.model_fields.values():
        group = group_info.annotation
        for name, info in group.model_fields.items():
            yield group, name, info, variable_name(group, name)


BOUNDED = [
    pytest.param(variable, value, words, id=f"{variable}={value[:20]}")
    for _group, _name, info, variable in _every_field()
    for value, words in _outside_values(info)
]


@pytest.mark.parametrize("variable, value, words", BOUNDED)
def test_every_settings_field_refuses_a_value_just_outside_its_bounds_by_name(monkeypatch, variable, value, words):
    from runners.config import SettingsError, load_settings

    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert f"{variable}: " in str(error.value) and words in str(error.value), str(error.value)


def test_every_field_has_bounds_or_is_a_path():
    """A field the test above cannot reach must be one that has nothing to bound (a folder)."""
    unbounded = [
        variable
        for _group, _name, info, variable in _every_field()
        if not _outside_values(info) and "Path" not in str(info.annotation)
    ]
    assert unbounded == []
    assert len(BOUNDED) > 60  # every group contributed


@pytest.mark.parametrize("variable, value", [("FLUX_EXPORT_SIZES", "1024x1000"), ("FLUX_EXPORT_BATCH_SIZES", "1,65")])
def test_bounds_checked_by_validators_name_the_variable_too(monkeypatch, variable, value):
    from runners.config import SettingsError, load_settings

    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=f"{variable}: "):
        load_settings()


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


def test_the_batching_mode_is_read_from_flux_batching_and_a_bad_one_is_named(monkeypatch):
    monkeypatch.setenv("FLUX_BATCHING", "adaptive")
    assert BatchingSettings().mode == "adaptive"
    monkeypatch.setenv("FLUX_BATCHING", "eager")
    with pytest.raises(ValidationError) as error:
        BatchingSettings()
    assert "FLUX_BATCHING" in str(error.value)
    monkeypatch.delenv("FLUX_BATCHING")
    assert BatchingSettings().mode == "adaptive"  # the default: p95 at 80% load, benchmarks/results/batching.md


def test_variable_names_are_the_ones_pydantic_settings_reads():
    """Errors and docs/configuration.md name variables through runners.config.variable_names; this
    holds it to pydantic-settings' own computation (a private helper, so it lives in the test)."""
    from pydantic_settings import EnvSettingsSource

    from runners.config import variable_names
    from runners.worker.triton_server import TritonServerSettings

    groups = [info.annotation for info in Settings.model_fields.values()] + [TritonServerSettings]
    compared = 0
    for group in groups:
        source = EnvSettingsSource(group)
        for name, field in group.model_fields.items():
            read = list(dict.fromkeys(env.upper() for _, env, _ in source._extract_field_info(field, name)))
            assert variable_names(group, name) == read, (group.__name__, name)
            compared += 1
    assert compared > 70
    assert variable_names(LoraSettings, "fused") == ["FLUX_FUSED_LORAS", "FLUX_LORA_FUSED"]  # an alias, and by name


@pytest.mark.parametrize(
    "build, words",
    [
        # An idle feeder's blocking pop waits 0.5 s: a shorter timeout reads it as Redis unreachable.
        (lambda: Settings(queue=QueueSettings(redis_timeout_s=0.9, lease_s=30)), "FLUX_QUEUE_REDIS_TIMEOUT_S=0.9"),
        # One renewal may wait the whole timeout: a shorter lease hands a live replica's work away.
        (lambda: Settings(queue=QueueSettings(redis_timeout_s=5, lease_s=5.5)), "FLUX_QUEUE_LEASE_S=5.5"),
        # A kept result must not name images its store has deleted.
        (
            lambda: Settings(queue=QueueSettings(result_retention_s=7200), store=StoreSettings(ttl_s=3600)),
            "FLUX_STORE_TTL_S=3600",
        ),
        (lambda: Settings(server=ServerSettings(request_timeout_s=1800)), "FLUX_BATCH_TIMEOUT_S=900"),
    ],
    ids=["timeout-vs-blocking-pop", "lease-vs-timeout", "store-ttl-vs-retention", "batch-vs-request-timeout"],
)
def test_cross_field_rules_hold_for_settings_built_in_code(build, words):
    """The rules are model validators: a ``Settings()`` built in code (a test, a benchmark, an
    embedding) is checked as ``load_settings`` is, and the message names the variables."""
    with pytest.raises(ValidationError) as error:
        build()
    assert words in str(error.value)


def test_cross_field_rules_name_the_variables_at_start(monkeypatch):
    from runners.config import SettingsError, load_settings

    monkeypatch.setenv("FLUX_QUEUE_RESULT_RETENTION_S", "7200")
    monkeypatch.setenv("FLUX_STORE_TTL_S", "3600")
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert str(error.value).startswith("invalid settings: FLUX_STORE_TTL_S=3600 must be at least")
    monkeypatch.setenv("FLUX_STORE_TTL_S", "7200")
    monkeypatch.setenv("FLUX_QUEUE_REDIS_TIMEOUT_S", "0.5")
    with pytest.raises(SettingsError, match="FLUX_QUEUE_REDIS_TIMEOUT_S=0.5 must be at least 1"):
        load_settings()
    monkeypatch.setenv("FLUX_QUEUE_REDIS_TIMEOUT_S", "1")
    monkeypatch.setenv("FLUX_QUEUE_LEASE_S", "2")
    assert load_settings().queue.lease_s == 2  # at the bounds: accepted
