"""The console's configuration sections (dashboard, history, alerts) and the base
every section of ``WorkerConfig`` shares; ``worker_core.config`` exports them all."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

__all__ = ["AlertRule", "AlertSettings", "DashboardSettings", "HistorySettings"]


class _Section(BaseModel):
    # allow_inf_nan=False: inf and NaN are refused in every float field of every
    # section, from code and from the environment ("inf" as text too).
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
        validate_default=True,
        allow_inf_nan=False,
    )


def _finite(
    default: float,
    *,
    gt: float | None = None,
    ge: float | None = None,
    le: float,
    description: str | None = None,
) -> Any:
    return Field(default=default, gt=gt, ge=ge, le=le, allow_inf_nan=False, description=description)


class DashboardSettings(_Section):
    """The operations console (``worker-core dashboard``)."""

    token: SecretStr | None = Field(
        default=None,
        min_length=16,
        max_length=512,
        description="required to bind a non-loopback address; the browser logs in with it "
        "once, API clients send it as Authorization: Bearer",
    )
    read_only: bool = Field(default=False, description="no action at all (pause, requeue, ...)")
    host: str = Field(default="127.0.0.1", min_length=1, max_length=253)
    port: int = Field(default=8787, ge=0, le=65535)
    refresh_seconds: float = _finite(
        2.0,
        ge=0.2,
        le=60,
        description="live updates; the shared snapshot is read at most this often, and less "
        "often when reading it is slow",
    )
    session_hours: float = _finite(12.0, gt=0, le=24 * 30)
    max_streams: int = Field(default=100, ge=1, le=10_000, description="live-update connections")
    statement_timeout: float = _finite(5.0, gt=0, le=300, description="per dashboard query (s)")


class HistorySettings(_Section):
    """Per-minute metrics persisted by every worker (the dashboard's charts)."""

    enabled: bool = True
    retention_days: float = _finite(14.0, gt=0, le=3650)
    flush_seconds: float = _finite(10.0, ge=0.05, le=300, description="rollup write interval")


class AlertRule(_Section):
    """One alert rule: fires when a subject's value stays above ``threshold``."""

    threshold: float = _finite(0.0, ge=0, le=1e12)
    window: float = _finite(
        300.0, gt=0, le=7 * 86400, description="seconds looked back (dead_letters, failure_ratio)"
    )
    for_seconds: float = _finite(0.0, ge=0, le=86400, description="condition held before firing")
    min_count: int = Field(
        default=10, ge=1, le=10**9, description="failure_ratio: attempts needed in the window"
    )
    queues: list[str] | None = Field(
        default=None, max_length=1000, description="subjects watched (default: all)"
    )


class AlertSettings(_Section):
    """Alert rules evaluated by one worker of the fleet at a time (DESIGN section 13)."""

    webhook_url: SecretStr | None = Field(default=None, max_length=2048)
    interval: float = _finite(15.0, ge=0.05, le=3600, description="seconds between evaluations")
    resolve_after: float = _finite(
        60.0, ge=0, le=86400, description="a firing alert resolves once clear this long"
    )
    webhook_timeout: float = _finite(5.0, gt=0, le=60)
    webhook_retries: int = Field(default=3, ge=0, le=10)
    dead_letters: AlertRule | None = Field(
        default=None, description="rule (threshold, window, for_seconds, queues): jobs gone "
        "dead within window > threshold"
    )  # fmt: skip
    oldest_ready_seconds: AlertRule | None = Field(
        default=None, description="rule: the oldest ready job waited > threshold seconds"
    )
    breaker_open_seconds: AlertRule | None = Field(
        default=None, description="rule: a fleet breaker open > threshold seconds"
    )
    no_workers_seconds: AlertRule | None = Field(
        default=None, description="rule: ready jobs and no live worker for > threshold seconds"
    )
    failure_ratio: AlertRule | None = Field(
        default=None, description="rule: failed / all attempts within window > threshold "
        "(at least min_count attempts)"
    )  # fmt: skip

    @field_validator("webhook_url")
    @classmethod
    def _check_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    def rules(self) -> dict[str, AlertRule]:
        """The configured rules by name."""
        names = (
            "dead_letters",
            "oldest_ready_seconds",
            "breaker_open_seconds",
            "no_workers_seconds",
            "failure_ratio",
        )
        return {n: rule for n in names if (rule := getattr(self, n)) is not None}
