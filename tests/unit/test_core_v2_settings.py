"""The settings core v2 adds: database.listen_dsn, queue.max_state_bytes,
queue.stall_warning_seconds, queue.offload_processes."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from worker_core import WorkerConfig

DSN = "postgresql://app:pool-pw-1@pgbouncer:6432/app"
DIRECT = "host=db-primary port=5432 dbname=app user=app password=direct-pw-2"


def test_listen_dsn_defaults_to_the_dsn() -> None:
    config = WorkerConfig.model_validate({"database": {"dsn": DSN}})
    assert config.database.listen_dsn is None
    assert config.listen_dsn() == DSN


def test_listen_dsn_is_a_masked_secret() -> None:
    config = WorkerConfig.model_validate({"database": {"dsn": DSN, "listen_dsn": DIRECT}})
    assert config.listen_dsn() == DIRECT
    assert "direct-pw-2" not in repr(config) and "direct-pw-2" not in str(config.database)
    assert {"pool-pw-1", "direct-pw-2"} <= set(config.secrets())


@pytest.mark.parametrize("bad", ["mysql://u:p@h/db", "", "not a dsn", 42])
def test_listen_dsn_is_validated_like_the_dsn(bad: object) -> None:
    with pytest.raises(ValidationError, match="listen_dsn"):
        WorkerConfig.model_validate({"database": {"dsn": DSN, "listen_dsn": bad}})


def test_queue_settings_of_core_v2() -> None:
    queue = WorkerConfig().queue
    assert (queue.max_state_bytes, queue.stall_warning_seconds, queue.offload_processes) == (
        1 << 20,
        1.0,
        None,
    )
    off = WorkerConfig.model_validate(
        {"queue": {"stall_warning_seconds": None, "offload_processes": 3}}
    ).queue
    assert (off.stall_warning_seconds, off.offload_processes) == (None, 3)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stall_warning_seconds", math.nan),
        ("stall_warning_seconds", math.inf),
        ("stall_warning_seconds", 0),
        ("stall_warning_seconds", 7200),
        ("max_state_bytes", 10),
        ("max_state_bytes", 1 << 40),
        ("offload_processes", 0),
    ],
)
def test_queue_settings_of_core_v2_are_bounded(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        WorkerConfig.model_validate({"queue": {field: value}})


def test_stall_warning_from_the_environment_refuses_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_CORE_QUEUE__STALL_WARNING_SECONDS", "nan")
    with pytest.raises(ValidationError, match="stall_warning_seconds"):
        WorkerConfig()
