"""Issue 12: every enqueue argument is checked before any SQL, and connections that
no retry can fix fail at once with the server's message and a hint."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import make_conninfo

from worker_core import Queue, WorkerConfig
from worker_core._connect import connect_failure_hint
from worker_core.errors import PayloadError

CENTURY = 100 * 365.25 * 86_400


async def _nothing_stored(queue: Queue) -> None:
    assert sum((await queue.stats()).values()) == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"run_at": math.inf}, ValueError, "run_at .* finite"),
        ({"run_at": -math.inf}, ValueError, "finite"),
        ({"run_at": math.nan}, ValueError, "finite"),
        ({"run_at": 1e300}, ValueError, "between"),
        ({"run_at": 10**400}, ValueError, "between"),
        ({"run_at": CENTURY + 86_400}, ValueError, "between"),
        ({"run_at": timedelta(days=365 * 101)}, ValueError, "100 years"),
        ({"run_at": timedelta(days=-365 * 101)}, ValueError, "100 years"),
        ({"run_at": datetime(9999, 12, 31, tzinfo=UTC)}, ValueError, "100 years"),
        ({"run_at": datetime(1, 1, 1, tzinfo=UTC)}, ValueError, "100 years"),
        ({"run_at": datetime(2030, 1, 1)}, ValueError, "timezone-aware"),
        ({"run_at": True}, TypeError, "run_at"),
        ({"run_at": "soon"}, TypeError, "run_at"),
        ({"priority": 2**31}, ValueError, "priority"),
        ({"priority": 1.5}, TypeError, "priority"),
        ({"priority": math.inf}, TypeError, "priority"),
        ({"max_attempts": 0}, ValueError, "max_attempts"),
        ({"max_attempts": 10**6}, ValueError, "max_attempts"),
        ({"max_attempts": math.nan}, TypeError, "max_attempts"),
        ({"dedupe_key": ""}, ValueError, "dedupe_key"),
        ({"dedupe_key": "a\x00b"}, ValueError, "NUL"),
        ({"dedupe_key": "\ud800"}, ValueError, "surrogate"),
        ({"dedupe_key": "k" * 2000}, ValueError, "over the limit"),
        ({"dedupe_key": 42}, TypeError, "dedupe_key"),
        ({"correlation_id": "c" * 201}, ValueError, "correlation_id"),
        ({"correlation_id": "\udfff"}, ValueError, "surrogate"),
        ({"queue": "\ud800"}, ValueError, "surrogate"),
    ],
)
async def test_bad_arguments_are_refused_and_nothing_is_stored(
    queue: Queue, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        await queue.enqueue({"doc": 1}, **kwargs)
    # The same argument through enqueue_many (per-job keys become lists).
    many: dict[str, Any] = {
        (k + "s" if k in ("dedupe_key", "correlation_id") else k): (
            [v, None] if k in ("dedupe_key", "correlation_id") else v
        )
        for k, v in kwargs.items()
    }
    with pytest.raises(error, match=message):
        await queue.enqueue_many([{"doc": 1}, {"doc": 2}], **many)
    await _nothing_stored(queue)


async def test_lone_surrogates_in_payloads_name_the_item(queue: Queue) -> None:
    with pytest.raises(PayloadError, match=r"^payload\['text'\] contains a lone UTF-16 surrogate"):
        await queue.enqueue({"text": "broken \ud83d half"})
    with pytest.raises(
        PayloadError, match=r"^payloads\[2\]\['c'\]\[0\] contains a lone UTF-16 surrogate"
    ):
        await queue.enqueue_many([{"a": "é"}, {"b": 1}, {"c": ["\udc00"]}])
    await _nothing_stored(queue)


async def test_sane_run_at_values_are_accepted_and_read_back(queue: Queue) -> None:
    now = datetime.now(UTC)
    ids = [
        await queue.enqueue({}, run_at=CENTURY - 86_400),
        await queue.enqueue({}, run_at=-3600.0),
        await queue.enqueue({}, run_at=timedelta(days=365 * 99)),
        await queue.enqueue({}, run_at=now + timedelta(days=365 * 99)),
        await queue.enqueue({}, run_at=now - timedelta(days=365 * 99)),
    ]
    for job_id in ids:
        job = await queue.get(job_id)  # each row can be read back
        assert job is not None and job.run_at is not None and job.run_at.year < 2200


async def test_operator_ids_and_limits_are_checked(queue: Queue) -> None:
    with pytest.raises(ValueError, match="job_id"):
        await queue.get(2**63)
    with pytest.raises(TypeError, match="job_id"):
        await queue.cancel(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="job_id"):
        await queue.requeue([1, -1])
    with pytest.raises(ValueError, match="limit"):
        await queue.dead_letters(limit=-1)


async def test_an_infinite_lease_is_refused_before_any_claim(queue: Queue) -> None:
    await queue.enqueue({"doc": 1})
    for lease in (math.inf, -math.inf, math.nan, 10 * 86_400.0, -10 * 86_400.0):
        with pytest.raises(ValueError, match="lease_seconds"):
            await queue.claim("w1", 10, lease_seconds=lease)
    assert (await queue.stats())["queued"] == 1  # nothing was claimed and stranded


async def test_prune_refuses_infinite_retention(queue: Queue) -> None:
    with pytest.raises(ValueError, match="retention_seconds"):
        await queue.prune(retention_seconds=math.inf)


# -- connections that retrying cannot fix ------------------------------------------------
async def _open(config: WorkerConfig) -> float:
    started = time.monotonic()
    async with Queue(config):
        pass
    return time.monotonic() - started


async def test_unknown_database_fails_fast_with_the_servers_message(pg_dsn: str) -> None:
    config = WorkerConfig(
        database={"dsn": make_conninfo(pg_dsn, dbname="no_such_db_x1"), "connect_timeout": 30}
    )
    started = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        await _open(config)
    assert time.monotonic() - started < 10  # not the 30 s connect_timeout
    text = str(info.value)
    assert 'database "no_such_db_x1" does not exist' in text
    assert "hint: create the database" in text
    assert "WORKER_CORE_DATABASE__DSN" in text


async def test_unknown_role_fails_fast(pg_dsn: str) -> None:
    config = WorkerConfig(
        database={"dsn": make_conninfo(pg_dsn, user="no_such_role_x1"), "connect_timeout": 30}
    )
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=r'role "no_such_role_x1" does not exist.*hint'):
        await _open(config)
    assert time.monotonic() - started < 10


@pytest.fixture
def scram_role(pg_server: Any, pg_dsn: str) -> Iterator[str]:
    """A role that must authenticate with scram-sha-256: a pg_hba.conf line for it
    alone is added to the session's embedded server."""
    if pg_server is None:
        pytest.skip("needs the embedded server (edits its pg_hba.conf)")
    import psycopg

    role = "wc_pw_role"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        row = conn.execute("SHOW hba_file").fetchone()
        assert row is not None
        hba = Path(row[0])
        conn.execute(f"DROP ROLE IF EXISTS {role}")
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'right-pass-1'")
        line = f"local all {role} scram-sha-256\nhost all {role} 127.0.0.1/32 scram-sha-256\n"
        text = hba.read_text(encoding="utf-8")
        if line not in text:
            hba.write_text(line + text, encoding="utf-8")
        conn.execute("SELECT pg_reload_conf()")
    try:
        yield role
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"DROP ROLE IF EXISTS {role}")


async def test_wrong_password_fails_fast_and_never_shows_it(scram_role: str, pg_dsn: str) -> None:
    wrong = make_conninfo(pg_dsn, user=scram_role, password="wrong-pass-9876")
    config = WorkerConfig(database={"dsn": wrong, "connect_timeout": 30})
    started = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        await _open(config)
    assert time.monotonic() - started < 10
    text = str(info.value)
    assert "password authentication failed" in text and "hint: check the user" in text
    assert "wrong-pass-9876" not in text
    right = make_conninfo(pg_dsn, user=scram_role, password="right-pass-1")
    await _open(WorkerConfig(database={"dsn": right}))  # the same role gets in


async def test_ssl_required_but_unsupported_fails_fast() -> None:
    """A listener that answers the SSL request with 'N', as a PostgreSQL server with
    ssl=off does; libpq with sslmode=require must give up at once."""

    done = asyncio.Event()

    async def refuse_ssl(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readexactly(8)  # SSLRequest
            writer.write(b"N")
            await writer.drain()
            await reader.read()  # until libpq hangs up
        finally:
            writer.close()
            await writer.wait_closed()
            done.set()

    server = await asyncio.start_server(refuse_ssl, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        dsn = f"postgresql://u:ssl-pw-5555@127.0.0.1:{port}/db?sslmode=require"
        config = WorkerConfig(database={"dsn": dsn, "connect_timeout": 30})
        started = time.monotonic()
        with pytest.raises(ConnectionError) as info:
            await _open(config)
        assert time.monotonic() - started < 10
        assert "server does not support SSL, but SSL was required" in str(info.value)
        assert "hint: this server has no SSL" in str(info.value)
        assert "ssl-pw-5555" not in str(info.value)
        await asyncio.wait_for(done.wait(), 10)
    finally:
        server.close()
        await server.wait_closed()


async def test_unreachable_server_is_retried_then_reported_with_its_reason(tmp_path: Any) -> None:
    config = WorkerConfig(
        database={"dsn": f"postgresql://u:pw9876@/db?host={tmp_path}", "connect_timeout": 1}
    )
    with pytest.raises(ConnectionError) as info:
        await _open(config)
    text = str(info.value)
    assert "within 1s" in text and "No such file or directory" in text
    assert "hint" not in text and "pw9876" not in text


@pytest.mark.parametrize(
    ("message", "permanent"),
    [
        ('FATAL:  database "x" does not exist', True),
        ('FATAL:  role "x" does not exist', True),
        ('FATAL:  password authentication failed for user "u"', True),
        ("fe_sendauth: no password supplied", True),
        ('FATAL:  no pg_hba.conf entry for host "10.0.0.1", user "u", database "d", SSL off', True),
        ("server does not support SSL, but SSL was required", True),
        ('FATAL:  role "u" is not permitted to log in', True),
        ("FATAL:  the database system is starting up", False),
        ("FATAL:  sorry, too many clients already", False),
        ("Connection refused\n\tIs the server running on that host", False),
        ("timeout expired", False),
    ],
)
def test_connect_failure_classification(message: str, permanent: bool) -> None:
    assert (connect_failure_hint(Exception(message)) is not None) is permanent
