"""WorkerConfig and its sections: one validated, immutable configuration object.

Loaded from keyword arguments and the environment (prefix ``WORKER_CORE_``,
nested with ``__``: ``WORKER_CORE_DATABASE__DSN``, ``WORKER_CORE_QUEUE__CONCURRENCY``).
Invalid values raise ``pydantic.ValidationError`` naming the field; inputs are
never echoed in errors, so a malformed DSN cannot leak its password.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ._console_settings import (
    AlertRule,
    AlertSettings,
    DashboardSettings,
    HistorySettings,
    _Section,
)
from .redact import mask_dsn

__all__ = [
    "AlertRule",
    "AlertSettings",
    "CircuitBreakerSettings",
    "DashboardSettings",
    "DatabaseSettings",
    "Dsn",
    "EmbeddingSettings",
    "HealthSettings",
    "HistorySettings",
    "IngestSettings",
    "LoggingSettings",
    "MaintenanceSettings",
    "QueueSettings",
    "RateLimitSettings",
    "RetrySettings",
    "StorageSettings",
    "WorkerConfig",
]

#: A plain SQL identifier; always used with ``fullmatch`` (``$`` lets a trailing newline in).
IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# Upper bounds of durations (seconds). A value beyond them is a typo or an attack,
# and a huge one overflows PostgreSQL's interval or timestamp arithmetic.
MINUTE = 60
HOUR = 3600
DAY = 86_400
YEAR = 365 * DAY
#: Bound of every count-like size setting (batch sizes, rows, calls).
MAX_COUNT = 1_000_000


class Dsn(SecretStr):
    """A PostgreSQL DSN whose ``repr``/``str`` show it with the password masked."""

    def _display(self) -> str:
        return mask_dsn(self.get_secret_value())


def _validate_dsn(value: str) -> str:
    from psycopg.conninfo import conninfo_to_dict  # psycopg is imported lazily

    text = value.strip()
    if not text:
        raise ValueError("must not be empty")
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme not in ("postgresql", "postgres"):
            raise ValueError(
                f"must be a postgresql:// or postgres:// URL or a key=value string, not {scheme}://"
            )
    elif "=" not in text:
        raise ValueError("must be a postgresql:// URL or a libpq key=value string")
    try:
        params = conninfo_to_dict(text)
    except Exception as exc:  # psycopg.ProgrammingError; its text may quote the DSN
        reason = str(exc).split('"', 1)[0].split(" in URI", 1)[0].strip().rstrip(":")
        raise ValueError(f"is not a valid PostgreSQL connection string ({reason})") from None
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"has an invalid port {port[:10]!r} (expected 1-65535)")
    return text


def _no_control_chars(value: str) -> str:
    if any(ord(c) < 32 or c == "\x7f" for c in value):
        raise ValueError("must not contain control characters (NUL, newline, ...)")
    return value


with warnings.catch_warnings():
    # A field called "schema" shadows a deprecated BaseModel classmethod; the contract
    # names it database.schema, and nothing in worker_core uses the old method.
    warnings.simplefilter("ignore", UserWarning)

    class DatabaseSettings(_Section):
        """Where the jobs live."""

        dsn: Dsn | None = Field(
            default=None, description="postgresql:// URL or libpq key=value string"
        )
        listen_dsn: Dsn | None = Field(
            default=None,
            description="DSN of the LISTEN connection only (a direct server address when "
            "dsn goes through PgBouncer in transaction mode); default: dsn",
        )
        schema: str = Field(  # type: ignore[assignment]
            default="worker_core",
            description="schema holding every table; two schemas are two isolated installs",
        )
        pool_min_size: int = Field(default=1, ge=1, le=10_000)
        pool_max_size: int = Field(default=10, ge=1, le=10_000)
        connect_timeout: float = Field(default=10.0, gt=0, le=10 * MINUTE)
        prepare_threshold: int | None = Field(
            default=5,
            ge=0,
            le=MAX_COUNT,
            description="psycopg auto-prepare threshold; None behind PgBouncer transaction mode",
        )
        application_name: str = Field(default="worker_core", max_length=63)

        @field_validator("application_name")
        @classmethod
        def _check_application_name(cls, value: str) -> str:
            return _no_control_chars(value)

        @field_validator("dsn", "listen_dsn", mode="before")
        @classmethod
        def _check_dsn(cls, value: Any) -> Any:
            if value is None or isinstance(value, SecretStr):
                return None if value is None else Dsn(_validate_dsn(value.get_secret_value()))
            if not isinstance(value, str):
                raise ValueError("must be a string")
            return Dsn(_validate_dsn(value))

        @field_validator("schema")
        @classmethod
        def _check_schema(cls, value: str) -> str:
            if not IDENTIFIER.fullmatch(value):
                raise ValueError(
                    "must be a plain SQL identifier (full match of [a-z_][a-z0-9_]*: "
                    "lower-case letters, digits and _, not starting with a digit, "
                    "at most 63 characters)"
                )
            if value.startswith("pg_"):
                raise ValueError("must not start with pg_ (reserved by PostgreSQL)")
            return value

        @model_validator(mode="after")
        def _check_pool(self) -> DatabaseSettings:
            if self.pool_min_size > self.pool_max_size:
                raise ValueError("pool_min_size must be <= pool_max_size")
            return self

        # TCP settings of every connection worker_core opens. A network path that dies
        # silently (a partition, a crashed host, a dropped NAT entry: no RST) is only
        # noticed by them; without them a connection waits ~15 min with data in flight
        # and forever when idle (LISTEN). docs/operations.md states the bound.
        keepalives_idle: int = Field(
            default=10, ge=1, le=3600, description="s of silence before the first TCP keepalive"
        )
        keepalives_interval: int = Field(
            default=5, ge=1, le=600, description="s between unanswered TCP keepalives"
        )
        keepalives_count: int = Field(
            default=3, ge=1, le=100, description="unanswered keepalives that drop the connection"
        )
        tcp_user_timeout: float = Field(
            default=30.0,
            ge=0,
            le=3600,
            description="s data may stay unacknowledged before the connection is dropped "
            "(Linux; also ends keepalive probing; 0: the OS default)",
        )

        def connection_params(self, dsn: str) -> dict[str, Any]:
            """libpq keywords for a connection to ``dsn``: connect timeout and TCP
            keepalives, except those the DSN sets itself (the DSN wins)."""
            from psycopg.conninfo import conninfo_to_dict

            given = conninfo_to_dict(dsn)
            params: dict[str, Any] = {
                "connect_timeout": max(1, math.ceil(self.connect_timeout)),
                "keepalives": 1,
                "keepalives_idle": self.keepalives_idle,
                "keepalives_interval": self.keepalives_interval,
                "keepalives_count": self.keepalives_count,
                "tcp_user_timeout": round(self.tcp_user_timeout * 1000),
            }
            return {k: v for k, v in params.items() if k not in given}


class QueueSettings(_Section):
    """Which queues a worker serves and how it paces itself."""

    name: Annotated[str | list[str], NoDecode] = Field(
        default="default",
        description="a queue name, or a list of names: the worker claims from all of them "
        "(priority, then run_at); enqueue defaults to the first",
    )
    concurrency: int = Field(default=10, ge=1, le=10_000, description="jobs in flight per worker")
    queue_concurrency: dict[str, int] = Field(
        default_factory=dict,
        description="per queue name: jobs of that queue in flight per worker at most "
        "(each within concurrency); queues not listed share concurrency",
    )
    max_running: int | dict[str, int] | None = Field(
        default=None,
        description="jobs of a queue running at once across the whole fleet: one number for "
        "each of the worker's queues, or per queue name; every worker of a queue should "
        "use the same value",
    )
    poll_interval: float = Field(
        default=1.0, gt=0, le=HOUR, description="fallback poll (s) without NOTIFY"
    )
    lease_seconds: float = Field(default=30.0, gt=0, le=DAY)
    heartbeat_seconds: float = Field(default=10.0, gt=0, le=DAY)
    shutdown_timeout: float = Field(default=30.0, ge=0, le=DAY)
    flush_interval: float = Field(
        default=0.0,
        ge=0,
        le=5,
        description="extra delay (s) to batch outcome writes; 0 writes at once and batches "
        "what arrives while a write is in flight (group commit)",
    )
    flush_max: int = Field(
        default=500, ge=1, le=100_000, description="completions written per statement"
    )
    prefetch: int = Field(
        default=0,
        ge=0,
        le=100_000,
        description="extra jobs claimed ahead of free slots (held under lease, released on stop)",
    )
    # jsonb values are limited to 255 MB by PostgreSQL itself.
    max_payload_bytes: int = Field(default=1 << 20, ge=1024, le=1 << 28)
    enqueue_batch_size: int = Field(default=10_000, ge=1, le=MAX_COUNT)
    max_state_bytes: int = Field(
        default=1 << 20,
        ge=1024,
        le=256 << 20,
        description="largest stage state (JSON bytes) a job may store; a job whose state "
        "grows past it is dead-lettered with the reason",
    )
    stall_warning_seconds: float | None = Field(
        default=1.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="log a warning naming the job and stage when the event loop is "
        "blocked this long (counted in metrics); None turns the watchdog off",
    )
    offload_processes: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="processes of the pool behind ctx.offload(..., process=True), "
        "started on first use; default: the CPU count",
    )

    @field_validator("name", mode="before")
    @classmethod
    def _parse_names(cls, value: Any) -> Any:
        # From the environment a list comes as JSON text (WORKER_CORE_QUEUE__NAME='["a", "b"]');
        # any other text is one name, taken as is (NoDecode: "1" stays the name "1").
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                parsed = json.loads(value)
            except ValueError:
                return value
            if isinstance(parsed, list):
                return parsed
        return value

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | list[str]) -> str | list[str]:
        names = [value] if isinstance(value, str) else value
        if not names:
            raise ValueError("must name at least one queue")
        if len(names) > MAX_QUEUES:
            raise ValueError(f"at most {MAX_QUEUES} queues")
        for name in names:
            _check_queue_name(name)
        if len(set(names)) != len(names):
            raise ValueError("names a queue twice")
        return value

    @field_validator("queue_concurrency")
    @classmethod
    def _check_queue_concurrency(cls, value: dict[str, int]) -> dict[str, int]:
        for name, n in value.items():
            _check_queue_name(name)
            if not 1 <= n <= 10_000:
                raise ValueError("each value must be between 1 and 10000")
        return value

    @field_validator("max_running")
    @classmethod
    def _check_max_running(cls, value: int | dict[str, int] | None) -> int | dict[str, int] | None:
        caps = value.values() if isinstance(value, dict) else [] if value is None else [value]
        if isinstance(value, dict):
            for name in value:
                _check_queue_name(name)
        for n in caps:
            if not 1 <= n <= 1_000_000:
                raise ValueError("must be between 1 and 1000000")
        return value

    @model_validator(mode="after")
    def _check_lease(self) -> QueueSettings:
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError("heartbeat_seconds must be < lease_seconds")
        names = set(self.names)
        for label, keys in (
            ("queue_concurrency", self.queue_concurrency),
            ("max_running", self.max_running if isinstance(self.max_running, dict) else {}),
        ):
            unknown = sorted(set(keys) - names)
            if unknown:
                raise ValueError(f"{label} names queues the worker does not serve: {unknown}")
        return self

    @property
    def names(self) -> tuple[str, ...]:
        """Every queue the worker claims from, in configured order."""
        return (self.name,) if isinstance(self.name, str) else tuple(self.name)

    @property
    def primary(self) -> str:
        """The first queue: where ``enqueue`` puts jobs unless told otherwise."""
        return self.names[0]

    def cap(self, name: str) -> int | None:
        """``max_running`` of queue ``name`` (None: no fleet-wide cap)."""
        if isinstance(self.max_running, dict):
            return self.max_running.get(name)
        return self.max_running


#: Queues one worker may serve.
MAX_QUEUES = 64


def _check_queue_name(name: object) -> None:
    if not isinstance(name, str):
        raise ValueError("a queue name must be a string")
    if not name.strip():
        raise ValueError("a queue name must not be blank")
    if len(name) > 200:
        raise ValueError("a queue name must be at most 200 characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError("a queue name must not contain control characters")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in name):
        raise ValueError("a queue name must not contain lone surrogates")


class RetrySettings(_Section):
    max_attempts: int = Field(default=5, ge=1, le=10_000)
    base_delay: float = Field(default=1.0, gt=0, le=30 * DAY)
    max_delay: float = Field(default=300.0, gt=0, le=30 * DAY)
    max_deferrals: int = Field(
        default=100, ge=0, le=MAX_COUNT, description="bound on rate-limit / open-circuit deferrals"
    )

    @model_validator(mode="after")
    def _check_delays(self) -> RetrySettings:
        if self.base_delay > self.max_delay:
            raise ValueError("base_delay must be <= max_delay")
        return self


class BreakerOverride(_Section):
    fail_max: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    reset_timeout: float | None = Field(default=None, gt=0, le=DAY)
    half_open_max_calls: int | None = Field(default=None, ge=1, le=10_000)
    fleet_wide: bool | None = None


class CircuitBreakerSettings(_Section):
    fail_max: int = Field(default=5, ge=1, le=MAX_COUNT)
    reset_timeout: float = Field(default=60.0, gt=0, le=DAY)
    half_open_max_calls: int = Field(default=1, ge=1, le=10_000)
    fleet_wide: bool = Field(
        default=True, description="share breaker state through PostgreSQL across workers"
    )
    sync_interval: float = Field(
        default=0.25,
        ge=0,
        le=MINUTE,
        description="max age (s) of the cached fleet breaker state before admitting a call; "
        "trips are also pushed at once with NOTIFY",
    )
    overrides: dict[str, BreakerOverride] = Field(default_factory=dict)


class RateLimitSettings(_Section):
    rate: float = Field(gt=0, le=MAX_COUNT, description="tokens per second")
    burst: int = Field(default=1, ge=1, le=MAX_COUNT)
    fleet_wide: bool = Field(
        default=False,
        description="false: per process; true: all workers of the schema together",
    )


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class StorageSettings(_Section):
    backend: Literal["local", "s3"] = "local"
    local_root: Path = Path("data")
    bucket: str | None = None
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    max_pool_connections: int = Field(default=20, ge=1, le=10_000)

    @model_validator(mode="after")
    def _check_backend(self) -> StorageSettings:
        if self.backend == "s3" and not self.bucket:
            raise ValueError("bucket is required when backend is 's3'")
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            raise ValueError("endpoint_url must be an http:// or https:// URL")
        return self


class EmbeddingSettings(_Section):
    provider: Literal["hashing", "http"] = "hashing"
    dimensions: int = Field(default=384, ge=1, le=16_000)
    endpoint: str | None = None
    api_key: SecretStr | None = None
    model: str = "text-embedding-3-small"
    batch_size: int = Field(default=64, ge=1, le=4096)
    timeout: float = Field(default=30.0, gt=0, le=HOUR)
    requests_per_second: float | None = Field(default=None, gt=0, le=MAX_COUNT)
    fallback_endpoints: list[str] = Field(
        default_factory=list,
        max_length=8,
        description="other endpoints serving the same model, tried in order while the "
        "breakers of those before them are open",
    )

    @model_validator(mode="after")
    def _check_provider(self) -> EmbeddingSettings:
        if self.provider == "http" and not self.endpoint:
            raise ValueError("endpoint is required when provider is 'http'")
        for url in (self.endpoint, *self.fallback_endpoints):
            if url and not url.startswith(("http://", "https://")):
                raise ValueError("endpoint and fallback_endpoints must be http(s):// URLs")
        if len({self.endpoint, *self.fallback_endpoints}) != 1 + len(self.fallback_endpoints):
            raise ValueError("fallback_endpoints must differ from endpoint and from each other")
        return self


class IngestSettings(_Section):
    """The reference DocumentWorker's chunking and batching."""

    chunk_size: int = Field(default=1000, ge=1, le=10_000_000, description="characters per chunk")
    chunk_overlap: int = Field(
        default=100, ge=0, le=10_000_000, description="characters shared by neighbours"
    )
    batch_size: int = Field(
        default=500, ge=1, le=100_000, description="chunks written per statement"
    )
    checkpoint_every: float = Field(
        default=1.0,
        ge=0,
        le=HOUR,
        description="seconds between cursor checkpoints of the chunk stage",
    )
    on_embedding_outage: Literal["defer", "finalize_pending"] = Field(
        default="defer",
        description="while the embedding service's breakers are open: defer documents, or "
        "finalize them searchable by text and backfill their embeddings later",
    )
    backfill_interval: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="seconds between sweeps for documents awaiting embeddings (also swept "
        "when an embeddings breaker closes)",
    )

    @model_validator(mode="after")
    def _check_overlap(self) -> IngestSettings:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError("chunk_overlap must be < chunk_size")
        return self


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    format: Literal["json", "console"] = "json"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class HealthSettings(_Section):
    """The HTTP endpoints beside a worker (``/healthz``, ``/readyz``, ``/metrics``)."""

    http_port: int | None = Field(
        default=None, ge=0, le=65535, description="a port turns the server on; 0 picks a free one"
    )
    # Loopback by default: the endpoints are unauthenticated and show host, pid,
    # schema and table statistics. In a container, set 0.0.0.0 (docs/operations.md).
    http_host: str = Field(
        default="127.0.0.1",
        min_length=1,
        max_length=253,
        description="interface to bind: loopback unless set (0.0.0.0 in a Kubernetes pod)",
    )
    database_timeout: float = Field(default=2.0, gt=0, le=MINUTE)

    @field_validator("http_host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        if value != value.strip() or any(c.isspace() or c in "/@?#" for c in value):
            raise ValueError("must be a host name or an IP address (no spaces, scheme or path)")
        return _no_control_chars(value)


class MaintenanceSettings(_Section):
    """Retention: finished jobs are pruned in batches by whichever worker holds the lock."""

    retention_seconds: float | None = Field(
        default=7 * 24 * 3600.0,
        gt=0,
        le=100 * YEAR,
        description="age after which succeeded/cancelled jobs go",
    )
    dead_retention_seconds: float | None = Field(
        default=None,
        gt=0,
        le=100 * YEAR,
        description="age after which dead jobs go; None keeps them",
    )
    interval: float = Field(default=60.0, gt=0, le=DAY)
    batch_size: int = Field(default=5000, ge=1, le=MAX_COUNT)
    vacuum_dead_rows: int | None = Field(
        default=100_000,
        ge=1000,
        le=10**12,
        description="dead rows on the jobs table above which one worker runs VACUUM on it "
        "(autovacuum wakes at most once per autovacuum_naptime, 1 min by default, too "
        "seldom for a busy queue); None leaves the table to autovacuum",
    )
    vacuum_check_interval: float = Field(
        default=2.0,
        gt=0,
        le=HOUR,
        description="how often a worker reads the jobs table's dead rows and size",
    )
    analyze_growth_factor: float | None = Field(
        default=2.0,
        ge=1.1,
        le=1000,
        description="ANALYZE the jobs table once it is this many times the pages it had at "
        "its last VACUUM or ANALYZE and over 128 pages: each connection's cached plans of the "
        "claim and outcome statements were made for that size or larger, and made on a "
        "near-empty table they read it whole; None leaves it to autovacuum",
    )
    reindex_claim_index_factor: float | None = Field(
        default=4.0,
        ge=1.5,
        le=1000,
        description="rebuild a claim index (REINDEX INDEX CONCURRENTLY, one worker of the "
        "fleet at a time) once it is this many times the size its live entries need and "
        "over 1 MiB: VACUUM empties its pages but rarely gives them back, and every claim "
        "starts at the emptied end; None never rebuilds them",
    )
    reindex_check_interval: float = Field(
        default=30.0,
        gt=0,
        le=DAY,
        description="how often a worker compares the claim indexes' sizes with their entries",
    )


class WorkerConfig(BaseSettings):
    """Everything a worker, a Queue or the command line needs, validated once."""

    model_config = SettingsConfigDict(
        env_prefix="WORKER_CORE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
        validate_default=True,
        allow_inf_nan=False,
    )

    environment: Literal["development", "test", "staging", "production"] = "development"
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    circuit_breaker: CircuitBreakerSettings = Field(default_factory=CircuitBreakerSettings)
    rate_limits: dict[str, RateLimitSettings] = Field(default_factory=dict)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    maintenance: MaintenanceSettings = Field(default_factory=MaintenanceSettings)
    dashboard: DashboardSettings = Field(default_factory=DashboardSettings)
    history: HistorySettings = Field(default_factory=HistorySettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)

    @model_validator(mode="after")
    def _refuse_insecure_production(self) -> WorkerConfig:
        if self.environment != "production":
            return self
        problems: list[str] = []
        if self.database.dsn is None:
            problems.append("database.dsn must be set (no implicit local database)")
        if self.logging.format != "json":
            problems.append("logging.format must be 'json' (console logs are for development)")
        if (
            self.storage.endpoint_url
            and self.storage.endpoint_url.startswith("http://")
            and not (_is_loopback(self.storage.endpoint_url))
        ):
            problems.append("storage.endpoint_url must use https:// (credentials in clear text)")
        if (
            self.embedding.endpoint
            and self.embedding.api_key is not None
            and self.embedding.endpoint.startswith("http://")
            and not _is_loopback(self.embedding.endpoint)
        ):
            problems.append("embedding.endpoint must use https:// when an api_key is set")
        hook = self.alerts.webhook_url
        url = "" if hook is None else hook.get_secret_value()
        if url.startswith("http://") and not _is_loopback(url):
            problems.append("alerts.webhook_url must use https://")
        if self.embedding.api_key is not None and any(
            url.startswith("http://") and not _is_loopback(url)
            for url in self.embedding.fallback_endpoints
        ):
            problems.append("embedding.fallback_endpoints must use https:// with an api_key")
        if problems:
            raise ValueError(
                "environment=production refuses insecure settings: " + "; ".join(problems)
            )
        return self

    def secrets(self) -> list[str]:
        """Every secret value in this config (for scrubbing text that may quote them)."""
        found: list[str] = []
        for dsn in (self.database.dsn, self.database.listen_dsn):
            if dsn is not None:
                from psycopg.conninfo import conninfo_to_dict

                password = conninfo_to_dict(dsn.get_secret_value()).get("password")
                if password:
                    found.append(str(password))
        for secret in (
            self.storage.secret_access_key,
            self.storage.access_key_id,
            self.embedding.api_key,
            self.dashboard.token,
            self.alerts.webhook_url,
        ):
            if secret is not None and secret.get_secret_value():
                found.append(secret.get_secret_value())
        return found

    def dsn(self) -> str:
        """The DSN to connect with; raises a clear ``ValueError`` when none is configured."""
        if self.database.dsn is None:
            raise ValueError(
                "database.dsn is not set: pass WorkerConfig(database={'dsn': ...}) "
                "or set WORKER_CORE_DATABASE__DSN"
            )
        return self.database.dsn.get_secret_value()

    def listen_dsn(self) -> str:
        """The DSN of the LISTEN connection: ``database.listen_dsn``, else ``dsn()``."""
        if self.database.listen_dsn is not None:
            return self.database.listen_dsn.get_secret_value()
        return self.dsn()
