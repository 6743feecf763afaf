"""Enqueue from SQLAlchemy, on the session's connection and inside its transaction.

::

    from worker_core.contrib.sqlalchemy import enqueue

    with Session(engine) as session, session.begin():
        session.add(upload)
        enqueue(session, {"upload_id": upload.id}, config=config)  # commits with it

``enqueue_async`` does the same for an ``AsyncSession`` or ``AsyncConnection``.
The engine must use the psycopg (3) dialect: ``postgresql+psycopg://...``; any
other raises ``TypeError``. Only ``database.schema``, ``queue`` and ``retry`` of
the configuration matter here, since the database connection is the engine's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from worker_core.config import WorkerConfig

from . import async_queue, config_from, sync_queue

__all__ = [
    "async_psycopg_connection",
    "enqueue",
    "enqueue_async",
    "enqueue_many",
    "enqueue_many_async",
    "psycopg_connection",
]


def enqueue(
    bind: Session | Connection,
    payload: Mapping[str, Any],
    *,
    config: WorkerConfig | Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> int:
    """``SyncQueue.enqueue`` in the transaction of ``bind`` (a Session or Connection)."""
    conn = psycopg_connection(bind)
    return sync_queue(_config(config)).enqueue(payload, connection=conn, **kwargs)


def enqueue_many(
    bind: Session | Connection,
    payloads: Sequence[Mapping[str, Any]],
    *,
    config: WorkerConfig | Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> list[int]:
    """``SyncQueue.enqueue_many`` in the transaction of ``bind``, all or none."""
    conn = psycopg_connection(bind)
    return sync_queue(_config(config)).enqueue_many(payloads, connection=conn, **kwargs)


async def enqueue_async(
    bind: AsyncSession | AsyncConnection,
    payload: Mapping[str, Any],
    *,
    config: WorkerConfig | Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> int:
    """``Queue.enqueue`` in the transaction of ``bind`` (an AsyncSession or
    AsyncConnection)."""
    conn = await async_psycopg_connection(bind)
    return await async_queue(_config(config)).enqueue(payload, connection=conn, **kwargs)


async def enqueue_many_async(
    bind: AsyncSession | AsyncConnection,
    payloads: Sequence[Mapping[str, Any]],
    *,
    config: WorkerConfig | Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> list[int]:
    """``Queue.enqueue_many`` in the transaction of ``bind``, all or none."""
    conn = await async_psycopg_connection(bind)
    return await async_queue(_config(config)).enqueue_many(payloads, connection=conn, **kwargs)


def psycopg_connection(bind: Session | Connection) -> psycopg.Connection[Any]:
    """The psycopg connection under ``bind``; a Session begins its transaction."""
    if isinstance(bind, Session):
        bind = bind.connection()
    if not isinstance(bind, Connection):
        raise TypeError(
            f"expected a SQLAlchemy Session or Connection, not {type(bind).__name__} "
            "(use enqueue_async for an AsyncSession)"
        )
    raw = bind.connection.driver_connection
    if not isinstance(raw, psycopg.Connection):
        raise TypeError(_wrong_driver(bind.dialect.name, bind.dialect.driver))
    return raw


async def async_psycopg_connection(
    bind: AsyncSession | AsyncConnection,
) -> psycopg.AsyncConnection[Any]:
    """The psycopg async connection under ``bind``; a session begins its transaction."""
    if isinstance(bind, AsyncSession):
        bind = await bind.connection()
    if not isinstance(bind, AsyncConnection):
        raise TypeError(
            f"expected a SQLAlchemy AsyncSession or AsyncConnection, not {type(bind).__name__}"
        )
    raw = (await bind.get_raw_connection()).driver_connection
    if not isinstance(raw, psycopg.AsyncConnection):
        dialect = bind.sync_connection.dialect if bind.sync_connection else None
        raise TypeError(
            _wrong_driver(getattr(dialect, "name", "?"), getattr(dialect, "driver", "?"))
        )
    return raw


def _wrong_driver(name: str, driver: str) -> str:
    return (
        "worker_core.contrib.sqlalchemy needs the psycopg (3) dialect "
        f"(postgresql+psycopg://...); this engine uses {name}+{driver}"
    )


def _config(config: WorkerConfig | Mapping[str, Any] | None) -> WorkerConfig:
    return config_from(config)
