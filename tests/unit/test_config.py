"""WorkerConfig: every rule of DESIGN.md section 2, env loading and secret hiding."""

from __future__ import annotations

import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from worker_core.config import WorkerConfig

DSN = "postgresql://app:s3cr3t-pw@db.internal:5432/ingest"


def error_fields(exc: ValidationError) -> set[str]:
    return {".".join(str(p) for p in err["loc"]) for err in exc.errors()}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("WORKER_CORE_"):
            monkeypatch.delenv(key)


def test_defaults_match_the_contract() -> None:
    c = WorkerConfig()
    assert c.environment == "development"
    assert c.database.dsn is None
    assert c.database.schema == "worker_core"
    assert (c.database.pool_min_size, c.database.pool_max_size) == (1, 10)
    assert c.queue.name == "default"
    assert c.queue.concurrency == 10
    assert c.queue.poll_interval == 1.0
    assert (c.queue.lease_seconds, c.queue.heartbeat_seconds) == (30, 10)
    assert c.queue.shutdown_timeout == 30
    assert c.retry.max_attempts == 5
    assert (c.retry.base_delay, c.retry.max_delay) == (1.0, 300.0)
    assert c.retry.max_deferrals == 100
    assert (c.circuit_breaker.fail_max, c.circuit_breaker.reset_timeout) == (5, 60.0)
    assert c.storage.backend == "local"
    assert (c.embedding.provider, c.embedding.dimensions) == ("hashing", 384)
    assert c.embedding.batch_size == 64
    assert (c.logging.level, c.logging.format) == ("INFO", "json")
    assert c.health.http_port is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"environment": "prod"}, "environment"),
        ({"database": {"dsn": "mysql://u:p@h/db"}}, "database.dsn"),
        ({"database": {"dsn": "just words"}}, "database.dsn"),
        ({"database": {"dsn": "postgresql://u:p@[broken/db"}}, "database.dsn"),
        ({"database": {"dsn": 42}}, "database.dsn"),
        ({"database": {"schema": "Bad"}}, "database.schema"),
        ({"database": {"schema": "1abc"}}, "database.schema"),
        ({"database": {"schema": "x; DROP TABLE jobs"}}, "database.schema"),
        ({"database": {"schema": "a" * 64}}, "database.schema"),
        ({"database": {"schema": "pg_catalog"}}, "database.schema"),
        ({"database": {"pool_min_size": 0}}, "database.pool_min_size"),
        ({"database": {"pool_min_size": 5, "pool_max_size": 2}}, "database"),
        ({"queue": {"name": ""}}, "queue.name"),
        ({"queue": {"name": "   "}}, "queue.name"),
        ({"queue": {"name": "a\nb"}}, "queue.name"),
        ({"queue": {"concurrency": 0}}, "queue.concurrency"),
        ({"queue": {"poll_interval": 0}}, "queue.poll_interval"),
        ({"queue": {"lease_seconds": 10, "heartbeat_seconds": 10}}, "queue"),
        ({"queue": {"shutdown_timeout": -1}}, "queue.shutdown_timeout"),
        ({"retry": {"max_attempts": 0}}, "retry.max_attempts"),
        ({"retry": {"base_delay": 0}}, "retry.base_delay"),
        ({"retry": {"base_delay": 10, "max_delay": 5}}, "retry"),
        ({"retry": {"max_deferrals": -1}}, "retry.max_deferrals"),
        ({"circuit_breaker": {"fail_max": 0}}, "circuit_breaker.fail_max"),
        ({"circuit_breaker": {"reset_timeout": 0}}, "circuit_breaker.reset_timeout"),
        ({"storage": {"backend": "ftp"}}, "storage.backend"),
        ({"storage": {"backend": "s3"}}, "storage"),
        ({"storage": {"endpoint_url": "ftp://x"}}, "storage"),
        ({"embedding": {"provider": "magic"}}, "embedding.provider"),
        ({"embedding": {"provider": "http"}}, "embedding"),
        ({"embedding": {"dimensions": 0}}, "embedding.dimensions"),
        ({"logging": {"format": "xml"}}, "logging.format"),
        ({"logging": {"level": "LOUD"}}, "logging.level"),
        ({"health": {"http_port": 70000}}, "health.http_port"),
        ({"queue": {"unknown_option": 1}}, "queue.unknown_option"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        WorkerConfig(**kwargs)
    assert field in error_fields(info.value)


def test_valid_dsn_forms_are_accepted() -> None:
    for dsn in (
        DSN,
        "postgres://app@localhost/db",
        "postgresql://user:@/db?host=/var/run/postgresql",
        "host=/tmp dbname=ingest user=app password=pw",
        "  postgresql://u@h/db  ",
    ):
        assert WorkerConfig(database={"dsn": dsn}).database.dsn is not None


def test_dsn_password_never_in_repr_str_or_dump() -> None:
    c = WorkerConfig(database={"dsn": DSN})
    assert c.database.dsn is not None
    for text in (repr(c), str(c), repr(c.database), str(c.database.dsn), c.model_dump_json()):
        assert "s3cr3t-pw" not in text
    assert "app:***@db.internal" in repr(c)
    assert c.dsn() == DSN


def test_key_value_dsn_password_hidden() -> None:
    c = WorkerConfig(database={"dsn": "host=/tmp password=hunter2222 dbname=x"})
    assert "hunter2222" not in repr(c)
    assert "password=***" in repr(c)


def test_validation_errors_never_echo_secrets() -> None:
    with pytest.raises(ValidationError) as info:
        WorkerConfig(database={"dsn": "postgresql://u:topsecret99@[h/db"})
    assert "topsecret99" not in str(info.value)
    with pytest.raises(ValidationError) as info:
        WorkerConfig(storage={"secret_access_key": 123})
    assert "123" not in str(info.value).split("\n", 1)[1]


def test_other_secrets_are_secretstr() -> None:
    c = WorkerConfig(
        storage={
            "backend": "s3",
            "bucket": "b",
            "access_key_id": "AKIAEXAMPLE",
            "secret_access_key": "wJalrXUtnFEMI",
        },
        embedding={"provider": "http", "endpoint": "http://localhost:9/v1", "api_key": "sk-live-1"},
    )
    text = repr(c) + str(c) + c.model_dump_json()
    for secret in ("AKIAEXAMPLE", "wJalrXUtnFEMI", "sk-live-1"):
        assert secret not in text
    assert set(c.secrets()) == {"AKIAEXAMPLE", "wJalrXUtnFEMI", "sk-live-1"}


def test_env_loading_with_prefix_and_nesting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_CORE_DATABASE__DSN", DSN)
    monkeypatch.setenv("WORKER_CORE_QUEUE__CONCURRENCY", "20")
    monkeypatch.setenv("WORKER_CORE_QUEUE__NAME", "docs")
    monkeypatch.setenv("WORKER_CORE_LOGGING__LEVEL", "debug")
    monkeypatch.setenv("WORKER_CORE_ENVIRONMENT", "staging")
    c = WorkerConfig()
    assert c.queue.concurrency == 20
    assert c.queue.name == "docs"
    assert c.logging.level == "DEBUG"
    assert c.environment == "staging"
    assert c.dsn() == DSN


def test_keyword_arguments_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_CORE_QUEUE__CONCURRENCY", "20")
    monkeypatch.setenv("WORKER_CORE_QUEUE__NAME", "from-env")
    c = WorkerConfig(queue={"name": "docs"})
    assert c.queue.name == "docs"
    assert c.queue.concurrency == 20


def test_invalid_env_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_CORE_QUEUE__CONCURRENCY", "zero")
    with pytest.raises(ValidationError) as info:
        WorkerConfig()
    assert "queue.concurrency" in error_fields(info.value)


def test_production_refuses_insecure_defaults() -> None:
    with pytest.raises(ValidationError) as info:
        WorkerConfig(environment="production")
    assert "database.dsn must be set" in str(info.value)
    with pytest.raises(ValidationError) as info:
        WorkerConfig(environment="production", database={"dsn": DSN}, logging={"format": "console"})
    assert "logging.format must be 'json'" in str(info.value)
    with pytest.raises(ValidationError) as info:
        WorkerConfig(
            environment="production",
            database={"dsn": DSN},
            embedding={"provider": "http", "endpoint": "http://api.example.com", "api_key": "k"},
        )
    assert "https" in str(info.value)
    ok = WorkerConfig(
        environment="production",
        database={"dsn": DSN},
        embedding={"provider": "http", "endpoint": "http://127.0.0.1:8080", "api_key": "k"},
    )
    assert ok.environment == "production"


def test_config_is_immutable() -> None:
    c = WorkerConfig()
    with pytest.raises(ValidationError):
        c.queue.concurrency = 3  # type: ignore[misc]


def test_dsn_helper_explains_missing_dsn() -> None:
    with pytest.raises(ValueError, match="WORKER_CORE_DATABASE__DSN"):
        WorkerConfig().dsn()


identifiers = st.from_regex(r"[a-z_][a-z0-9_]{0,62}", fullmatch=True).filter(
    lambda s: not s.startswith("pg_")
)


@settings(max_examples=200, deadline=None)
@given(identifiers)
def test_property_identifier_schemas_accepted(schema: str) -> None:
    assert WorkerConfig(database={"schema": schema}).database.schema == schema


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=80))
def test_property_schema_accepted_iff_plain_identifier(schema: str) -> None:
    import re

    plain = bool(re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema)) and not schema.startswith("pg_")
    try:
        WorkerConfig(database={"schema": schema})
    except ValidationError as exc:
        assert not plain
        assert "database.schema" in error_fields(exc)
    else:
        assert plain


@settings(max_examples=200, deadline=None)
@given(st.floats(0.001, 1e4), st.floats(0.001, 1e4))
def test_property_heartbeat_must_be_below_lease(lease: float, heartbeat: float) -> None:
    try:
        c = WorkerConfig(queue={"lease_seconds": lease, "heartbeat_seconds": heartbeat})
    except ValidationError:
        assert heartbeat >= lease
    else:
        assert c.queue.heartbeat_seconds < c.queue.lease_seconds


@settings(max_examples=200, deadline=None)
@given(st.integers(-5, 50), st.integers(-5, 50))
def test_property_pool_sizes(min_size: int, max_size: int) -> None:
    try:
        c = WorkerConfig(database={"pool_min_size": min_size, "pool_max_size": max_size})
    except ValidationError:
        assert not (1 <= min_size <= max_size)
    else:
        assert 1 <= c.database.pool_min_size <= c.database.pool_max_size


@settings(max_examples=100, deadline=None)
@given(
    st.text(
        alphabet=string.ascii_letters + string.digits + "!@#%^&*()-_+=~", min_size=4, max_size=30
    )
)
def test_property_any_password_hidden(password: str) -> None:
    from urllib.parse import quote

    dsn = f"postgresql://user:{quote(password, safe='')}@host:5432/db"
    c = WorkerConfig(database={"dsn": dsn})
    masked = "postgresql://user:***@host:5432/db"
    assert c.database.dsn is not None
    assert str(c.database.dsn) == masked
    assert repr(c.database.dsn) == f"Dsn({masked!r})"
    assert masked in repr(c)
    assert c.dsn() == dsn


# -- operations console sections (dashboard, history, alerts) ------------------------
def test_console_defaults_match_the_contract() -> None:
    c = WorkerConfig()
    assert (c.dashboard.token, c.dashboard.read_only) == (None, False)
    assert (c.dashboard.host, c.dashboard.port) == ("127.0.0.1", 8787)
    assert (c.history.enabled, c.history.retention_days) == (True, 14)
    assert c.alerts.webhook_url is None and c.alerts.rules() == {}


# -- finite floats and upper bounds (issue 12) -----------------------------------------
def _section_fields() -> list[tuple[str, str, Any]]:
    """``(section, field, FieldInfo)`` for every field of every section model."""
    from pydantic import BaseModel

    out: list[tuple[str, str, Any]] = []
    for section, info in WorkerConfig.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += [(section, name, sub) for name, sub in annotation.model_fields.items()]
    return out


def _accepts(info: Any, kind: type) -> bool:
    import types
    import typing

    annotation = info.annotation
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    return annotation is kind or kind in args


def _section(section: str, values: dict[str, Any]) -> dict[str, Any]:
    return {section: values}


FLOAT_FIELDS = [(s, f) for s, f, info in _section_fields() if _accepts(info, float)]
NUMERIC_FIELDS = [
    (s, f) for s, f, info in _section_fields() if _accepts(info, float) or _accepts(info, int)
]
NOT_FINITE = ["inf", "-inf", "nan", "NaN", "Infinity", "1e999"]


def test_the_float_field_list_is_complete() -> None:
    # The walk below must see the fields the issue named, or the tests prove nothing.
    for field in (
        ("queue", "lease_seconds"),
        ("queue", "poll_interval"),
        ("queue", "shutdown_timeout"),
        ("retry", "max_delay"),
        ("circuit_breaker", "reset_timeout"),
        ("maintenance", "retention_seconds"),
    ):
        assert field in FLOAT_FIELDS
    assert len(FLOAT_FIELDS) >= 15


@pytest.mark.parametrize(("section", "field"), FLOAT_FIELDS)
def test_every_float_setting_refuses_inf_and_nan_from_code(section: str, field: str) -> None:
    for value in [*NOT_FINITE, float("inf"), float("-inf"), float("nan")]:
        with pytest.raises(ValidationError) as info:
            WorkerConfig(**_section(section, {field: value}))
        assert f"{section}.{field}" in error_fields(info.value), value


@pytest.mark.parametrize(("section", "field"), FLOAT_FIELDS)
def test_every_float_setting_refuses_inf_and_nan_from_env(
    section: str, field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for value in NOT_FINITE:
        monkeypatch.setenv(f"WORKER_CORE_{section.upper()}__{field.upper()}", value)
        with pytest.raises(ValidationError) as info:
            WorkerConfig()
        assert f"{section}.{field}" in error_fields(info.value), value
        assert "finite" in str(info.value) or "less than" in str(info.value)


def test_lease_seconds_inf_from_env_names_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_CORE_QUEUE__LEASE_SECONDS", "inf")
    with pytest.raises(ValidationError, match="finite number"):
        WorkerConfig()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate_limits": {"api": {"rate": float("inf")}}},
        {"rate_limits": {"api": {"rate": float("nan")}}},
        {"circuit_breaker": {"overrides": {"api": {"reset_timeout": float("inf")}}}},
    ],
)
def test_floats_inside_named_entries_are_finite(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="finite number"):
        WorkerConfig(**kwargs)


def test_json_env_with_infinity_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Python's json module reads the bare word Infinity as a float.
    monkeypatch.setenv("WORKER_CORE_RATE_LIMITS", '{"api": {"rate": Infinity}}')
    with pytest.raises(ValidationError, match="finite number"):
        WorkerConfig()


#: Numeric settings whose type is a union with a mapping (a number, or one per queue).
BOUNDED_BY_VALIDATOR = {("queue", "max_running")}


@pytest.mark.parametrize(("section", "field"), NUMERIC_FIELDS)
def test_every_numeric_setting_has_an_upper_bound(section: str, field: str) -> None:
    info = dict(((s, f), i) for s, f, i in _section_fields())[(section, field)]
    bounds = [
        getattr(meta, name)
        for meta in info.metadata
        for name in ("le", "lt")
        if getattr(meta, name, None) is not None
    ]
    if (section, field) in BOUNDED_BY_VALIDATOR:
        # A union of a number and a mapping: the bound is checked by its validator.
        with pytest.raises(ValidationError, match="must be between") as exc:
            WorkerConfig(**_section(section, {field: 10**12}))
        assert f"{section}.{field}" in error_fields(exc.value)
        return
    assert bounds, f"{section}.{field} has no upper bound"
    with pytest.raises(ValidationError) as exc:
        WorkerConfig(**_section(section, {field: bounds[0] * 10 + 10}))
    assert f"{section}.{field}" in error_fields(exc.value)
    assert "less than" in str(exc.value)  # the rule is named in the error


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dashboard": {"token": "short"}}, "dashboard.token"),
        ({"dashboard": {"refresh_seconds": float("nan")}}, "dashboard.refresh_seconds"),
        ({"dashboard": {"refresh_seconds": float("inf")}}, "dashboard.refresh_seconds"),
        ({"dashboard": {"port": 70000}}, "dashboard.port"),
        ({"history": {"retention_days": float("inf")}}, "history.retention_days"),
        ({"history": {"retention_days": 0}}, "history.retention_days"),
        ({"alerts": {"interval": float("nan")}}, "alerts.interval"),
        ({"alerts": {"webhook_url": "ftp://x/y"}}, "alerts.webhook_url"),
        (
            {"alerts": {"dead_letters": {"threshold": float("inf")}}},
            "alerts.dead_letters.threshold",
        ),
        ({"alerts": {"failure_ratio": {"window": -1}}}, "alerts.failure_ratio.window"),
        ({"alerts": {"no_workers_seconds": {"bogus": 1}}}, "alerts.no_workers_seconds.bogus"),
    ],
)
def test_console_settings_are_finite_and_bounded(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        WorkerConfig(**kwargs)
    assert field in str(info.value)


def test_console_secrets_are_hidden_and_scrubbed() -> None:
    c = WorkerConfig(
        dashboard={"token": "dashboard-token-0123456789"},
        alerts={"webhook_url": "https://hooks.example/T0/B0/webhooksecret"},
    )
    text = f"{c!r} {c} {c.model_dump()}"
    assert "dashboard-token-0123456789" not in text and "webhooksecret" not in text
    assert "dashboard-token-0123456789" in c.secrets()
    assert "https://hooks.example/T0/B0/webhooksecret" in c.secrets()


def test_console_env_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_CORE_DASHBOARD__TOKEN", "from-the-environment-123")
    monkeypatch.setenv("WORKER_CORE_ALERTS__DEAD_LETTERS__THRESHOLD", "3")
    monkeypatch.setenv("WORKER_CORE_ALERTS__INTERVAL", "NaN")
    with pytest.raises(ValidationError, match=r"alerts\.interval"):
        WorkerConfig()
    monkeypatch.setenv("WORKER_CORE_ALERTS__INTERVAL", "5")
    c = WorkerConfig()
    assert c.dashboard.token is not None
    assert c.dashboard.token.get_secret_value() == "from-the-environment-123"
    assert c.alerts.rules()["dead_letters"].threshold == 3


def test_production_refuses_a_plain_http_webhook() -> None:
    base: dict[str, Any] = {
        "environment": "production",
        "database": {"dsn": "postgresql://u:p@db/x"},
    }
    with pytest.raises(ValidationError, match=r"webhook_url must use https"):
        WorkerConfig(**base, alerts={"webhook_url": "http://hooks.example/x"})
    WorkerConfig(**base, alerts={"webhook_url": "http://127.0.0.1:9/x"})
    WorkerConfig(**base, alerts={"webhook_url": "https://hooks.example/x"})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"queue": {"lease_seconds": 10 * 86_400}}, "queue.lease_seconds"),
        ({"queue": {"poll_interval": 1e9}}, "queue.poll_interval"),
        ({"queue": {"max_payload_bytes": 1 << 40}}, "queue.max_payload_bytes"),
        ({"retry": {"max_delay": 1e12}}, "retry.max_delay"),
        ({"maintenance": {"retention_seconds": 1e15}}, "maintenance.retention_seconds"),
        ({"database": {"connect_timeout": 1e6}}, "database.connect_timeout"),
        ({"database": {"application_name": "a\x00b"}}, "database.application_name"),
        ({"health": {"http_host": "0.0.0.0 "}}, "health.http_host"),
        ({"health": {"http_host": "http://x/"}}, "health.http_host"),
        ({"health": {"http_host": ""}}, "health.http_host"),
    ],
)
def test_huge_or_malformed_values_are_refused(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        WorkerConfig(**kwargs)
    assert field in error_fields(info.value)


@pytest.mark.parametrize("schema", ["_\n", "abc\n", "abc\r", "\nabc", "a\x00", "abc "])
def test_schema_is_a_full_match(schema: str) -> None:
    with pytest.raises(ValidationError, match=r"full match") as info:
        WorkerConfig(database={"schema": schema})
    assert "database.schema" in error_fields(info.value)


def test_health_server_binds_loopback_unless_configured() -> None:
    assert WorkerConfig().health.http_host == "127.0.0.1"
    assert WorkerConfig(health={"http_host": "0.0.0.0"}).health.http_host == "0.0.0.0"
    assert WorkerConfig(health={"http_host": "::"}).health.http_host == "::"
