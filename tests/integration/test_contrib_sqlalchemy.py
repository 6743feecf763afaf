"""worker_core.contrib.sqlalchemy with real engines (psycopg dialect, sync and async)
on the test database: committed leaves exactly one job, rolled back none."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from worker_core import Queue, WorkerConfig
from worker_core.contrib.sqlalchemy import (
    enqueue,
    enqueue_async,
    enqueue_many,
    enqueue_many_async,
)


def sa_url(dsn: str, driver: str = "psycopg") -> sa.URL:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    return sa.URL.create(
        f"postgresql+{driver}",
        username=str(params.get("user") or "") or None,
        password=str(params.get("password") or "") or None,
        database=str(params.get("dbname") or "") or None,
        port=int(str(params["port"])) if params.get("port") else None,
        query={"host": str(params["host"])} if params.get("host") else {},
    )


@pytest.fixture
async def migrated(queue: Queue) -> Queue:
    return queue


@pytest.fixture
def engine(pg_dsn: str, migrated: Queue) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sa_url(pg_dsn))
    yield engine
    engine.dispose()


@pytest.fixture
async def async_engine(pg_dsn: str, migrated: Queue) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(sa_url(pg_dsn))
    yield engine
    await engine.dispose()


def queued(engine: sa.Engine, config: WorkerConfig) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    f"SELECT count(*) FROM \"{config.database.schema}\".jobs WHERE status = 'queued'"
                )
            ).scalar_one()
        )


def test_session_commit_leaves_exactly_one_job(engine: sa.Engine, config: WorkerConfig) -> None:
    with Session(engine) as session, session.begin():
        job_id = enqueue(session, {"upload": 1}, config=config, correlation_id="req-1")
        row = session.execute(
            sa.text(f'SELECT payload FROM "{config.database.schema}".jobs WHERE id = :id'),
            {"id": job_id},
        ).one()
        assert row.payload == {"upload": 1}  # visible in the session's own transaction
    assert queued(engine, config) == 1


def test_session_rollback_leaves_none(engine: sa.Engine, config: WorkerConfig) -> None:
    with Session(engine) as session:
        enqueue(session, {"upload": 1}, config=config)
        enqueue_many(session, [{"n": i} for i in range(3)], config=config)
        session.rollback()
    with Session(engine) as session:  # closed without commit: rolled back too
        enqueue(session, {"upload": 2}, config=config)
    assert queued(engine, config) == 0


def test_connection_and_batches(engine: sa.Engine, make_config: Any) -> None:
    small = make_config(queue={"name": "test", "enqueue_batch_size": 2})
    with engine.connect() as conn:
        ids = enqueue_many(conn, [{"n": i} for i in range(5)], config=small)
        assert len(ids) == 5
        conn.rollback()
    with engine.begin() as conn:
        enqueue_many(conn, [{"n": i} for i in range(5)], config=small)
    assert queued(engine, small) == 5


def test_from_a_plain_thread(engine: sa.Engine, config: WorkerConfig) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            with Session(engine) as session, session.begin():
                enqueue(session, {"n": n}, config=config)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert queued(engine, config) == 4


async def test_async_session(
    async_engine: AsyncEngine, engine: sa.Engine, config: WorkerConfig
) -> None:
    async with AsyncSession(async_engine) as session, session.begin():
        job_id = await enqueue_async(session, {"upload": 1}, config=config)
        assert job_id > 0
    async with AsyncSession(async_engine) as session:
        await enqueue_async(session, {"upload": 2}, config=config)
        await enqueue_many_async(session, [{"n": 1}, {"n": 2}], config=config)
        await session.rollback()
    async with async_engine.begin() as conn:
        assert len(await enqueue_many_async(conn, [{"n": 1}, {"n": 2}], config=config)) == 2
    assert queued(engine, config) == 3


def test_other_drivers_and_objects_get_a_clear_error(config: WorkerConfig) -> None:
    sqlite = sa.create_engine("sqlite://")
    with Session(sqlite) as session, pytest.raises(TypeError, match="this engine uses sqlite"):
        enqueue(session, {"x": 1}, config=config)
    with pytest.raises(TypeError, match="expected a SQLAlchemy Session or Connection"):
        enqueue(sqlite, {"x": 1}, config=config)  # type: ignore[arg-type]
    sqlite.dispose()
