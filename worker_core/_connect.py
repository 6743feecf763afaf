"""Connection failures that waiting cannot fix, told apart from those it can.

A connection that fails because the database does not exist, the password is wrong
or the server refuses the SSL mode fails the same way on every retry; waiting out
``connect_timeout`` and then reporting "cannot connect" hides the server's own
message. ``queue.open_pool`` therefore makes one direct connection first
(``connect_once``): a failure that
retrying cannot fix is raised at once with the server's message and a hint; any
other (server down, still starting, too many connections) is retried by the pool
until ``connect_timeout``, and then reported with the last server message.

``connect_failure_hint`` is the classification, for any code that opens its own
connection (the worker's LISTEN connection).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from psycopg import AsyncConnection
from psycopg.types.json import set_json_loads

from .logs import StructuredLogger
from .redact import mask_dsn, redact_text
from .sql import load_queries

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

    from .config import WorkerConfig

__all__ = ["behind_pooler", "connect_failure_hint", "connect_once", "open_pool", "server_message"]

_DSN_SETTING = "database.dsn (WORKER_CORE_DATABASE__DSN)"

# How long one series of reconnect attempts of a pool lasts before it gives up (and
# the next request for a connection starts a new series). psycopg_pool waits 1 s,
# then doubles the wait at every failure up to this bound: with its own default of
# minutes, a server back after a 30 s outage was only tried again some 30 s later.
# Short series keep the wait between two attempts at 2 s whatever the outage; when
# one gives up, the next starts at once (reconnect_failed). A pool being opened
# runs one long series instead: the server may still be starting.
RECONNECT_SERIES_SECONDS = 4.0


def opening_series_seconds(connect_timeout: float) -> float:
    """The reconnect series of a pool being opened: as long as the wait for it (a
    server still starting up), switched to ``RECONNECT_SERIES_SECONDS`` once open."""
    return max(60.0, connect_timeout)


#: Failures no retry can fix, by libpq's or the server's (English) message, each with
#: what to do. A server whose lc_messages is another language falls back to retrying.
_PERMANENT: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), hint)
    for pattern, hint in (
        (
            r'database "[^"]*" does not exist',
            f"create the database or fix its name in {_DSN_SETTING}",
        ),
        (r'role "[^"]*" does not exist', f"create the role or fix the user name in {_DSN_SETTING}"),
        (
            r"password authentication failed|no password supplied|password is too long",
            f"check the user and password in {_DSN_SETTING} (or PGPASSWORD, ~/.pgpass)",
        ),
        (
            r"(peer|ident|scram|md5|cert|gss|sspi|ldap|radius|pam)\S* authentication failed"
            r"|authentication method \S+ (not supported|requirement)",
            "the server's pg_hba.conf asks for an authentication this user cannot pass",
        ),
        (
            r"no pg_hba\.conf entry",
            "the server's pg_hba.conf admits no such host, user, database and SSL "
            "combination: ask its administrator, or try sslmode=require",
        ),
        (
            r"server does not support SSL, but SSL was required",
            "this server has no SSL: use sslmode=prefer (or disable), or enable SSL on it",
        ),
        (
            r"SSL (is )?required|SSL connection is required|SSL off",
            f"the server requires SSL: add sslmode=require to {_DSN_SETTING}",
        ),
        (
            r"certificate verify failed|root certificate file .* does not exist"
            r"|certificate .* does not match host name|invalid sslmode value",
            f"fix the SSL settings (sslmode, sslrootcert) of {_DSN_SETTING}",
        ),
        (r"is not permitted to log in", "the role has NOLOGIN: ALTER ROLE ... LOGIN"),
        (
            r"permission denied for database",
            "GRANT CONNECT ON DATABASE ... TO this role",
        ),
        (r"invalid (connection option|integer value|port)", f"fix {_DSN_SETTING}"),
    )
)


def server_message(exc: BaseException) -> str:
    """The useful part of a connection error: the server's ``FATAL: ...`` line, or
    libpq's reason, on one line."""
    text = " ".join(str(exc).split())
    for marker in ("FATAL:", "ERROR:"):
        if marker in text:
            return marker + " " + text.split(marker, 1)[1].strip()
    for prefix in ("connection failed:", "connection is bad:"):
        if text.startswith(prefix):
            text = text[len(prefix) :].strip()
    return text or type(exc).__name__


def connect_failure_hint(exc: BaseException) -> str | None:
    """What to do when ``exc`` is a connection failure that retrying cannot fix;
    ``None`` when a retry may succeed (server down, starting up, overloaded)."""
    text = " ".join(str(exc).split())
    for pattern, hint in _PERMANENT:
        if pattern.search(text):
            return hint
    return None


async def connect_once(
    config: WorkerConfig,
    *,
    dsn: str | None = None,
    timeout: float | None = None,
    probe: Callable[[AsyncConnection[Any]], Awaitable[bool]] | None = None,
) -> str | None:
    """Open and close one connection (running ``probe`` on it in between, so what
    else a caller wants to learn from the server costs no connection of its own; a
    probe that returns True keeps the connection, and must close it).

    Returns ``None`` when it worked and the server's message when it failed in a
    way a retry may fix. Raises ``ConnectionError`` with the server's message and
    a hint when it cannot (unknown database or role, authentication, SSL).
    """
    conninfo = dsn or config.dsn()
    db = config.database
    try:
        conn = await AsyncConnection.connect(
            conninfo,
            autocommit=True,
            application_name=db.application_name,
            **{
                **db.connection_params(conninfo),
                "connect_timeout": max(1, int(timeout or db.connect_timeout)),
            },
        )
    except Exception as exc:
        message = redact_text(server_message(exc), config.secrets())
        hint = connect_failure_hint(exc)
        if hint is not None:
            raise ConnectionError(
                f"cannot connect to PostgreSQL at {mask_dsn(conninfo)}: {message} (hint: {hint})"
            ) from None
        return message
    kept = False
    try:
        if probe is not None:
            kept = await probe(conn)
    finally:
        if not kept:
            await conn.close()
    return None


async def open_pool(
    config: WorkerConfig,
    *,
    min_size: int | None = None,
    max_size: int | None = None,
    probe: Callable[[AsyncConnection[Any]], Awaitable[bool]] | None = None,
) -> AsyncConnectionPool:
    """Open an autocommit connection pool for ``config``, or fail with one clear line.

    A first connection of its own tells a failure no retry fixes at once (with the
    server's reason); ``probe`` runs on it when it works (see ``connect_once``).
    """
    from psycopg_pool import AsyncConnectionPool, PoolTimeout

    db = config.database
    dsn = config.dsn()
    started = time.monotonic()
    last_error = await connect_once(config, probe=probe)
    told: list[bool] = []  # the pooler is logged once per pool, not per connection

    async def configure(conn: AsyncConnection[Any]) -> None:
        await _configure_connection(conn)
        if conn.prepare_threshold is not None and await behind_pooler(conn):
            # A transaction pooler runs each transaction on any server connection,
            # where psycopg's prepared statements do not exist ("prepared statement
            # _pg3_0 does not exist"); PgBouncer < 1.21 cannot carry them at all.
            conn.prepare_threshold = None
            if not told:
                told.append(True)
                StructuredLogger("worker_core.queue").info(
                    "connection pooler detected: prepared statements are off",
                    dsn=mask_dsn(dsn),
                )

    pool = AsyncConnectionPool(
        dsn,
        min_size=min_size or db.pool_min_size,
        max_size=max(max_size or db.pool_max_size, min_size or db.pool_min_size),
        open=False,
        kwargs={
            "autocommit": True,
            "prepare_threshold": db.prepare_threshold,
            "application_name": db.application_name,
            **db.connection_params(dsn),
        },
        name=f"worker_core.{db.schema}",
        configure=configure,
        timeout=db.connect_timeout,
        reconnect_timeout=opening_series_seconds(db.connect_timeout),
        reconnect_failed=_new_series,
    )
    remaining = max(0.1, db.connect_timeout - (time.monotonic() - started))
    try:
        await pool.open(wait=True, timeout=remaining if last_error else db.connect_timeout)
        pool.reconnect_timeout = RECONNECT_SERIES_SECONDS  # from now on: short series
    except PoolTimeout:
        await pool.close()
        if last_error is None or not last_error.strip():
            last_error = "no connection was made"
        raise ConnectionError(
            f"cannot connect to PostgreSQL at {mask_dsn(config.dsn())} "
            f"within {db.connect_timeout:g}s: {last_error}"
        ) from None
    return pool


async def _new_series(pool: AsyncConnectionPool) -> None:
    """A series of reconnect attempts gave up: start the next one now, instead of
    at the next request for a connection (one may be waiting already)."""
    if not pool.closed:
        with contextlib.suppress(Exception):
            await pool.check()  # grows an empty pool by one: a new series


async def behind_pooler(conn: AsyncConnection[Any]) -> bool:
    """Whether ``conn`` reaches PostgreSQL through a connection pooler (PgBouncer).

    A pooler answers the connection with a cancel key of its own, so the backend
    pid the client was given is not the server process that runs its statements.
    """
    cur = await conn.execute(_BACKEND_PID, prepare=False)
    row = await cur.fetchone()
    return row is not None and int(row[0]) != conn.info.backend_pid


async def _configure_connection(conn: AsyncConnection[Any]) -> None:
    # jsonb columns (payload, state, errors) are parsed on every claim: orjson, when
    # installed (the `fast` extra), parses them several times faster than json.
    if _ORJSON_LOADS is not None:
        set_json_loads(_ORJSON_LOADS, conn)


def _orjson_loads() -> Any:
    try:
        import orjson
    except ImportError:
        return None
    return orjson.loads


_ORJSON_LOADS = _orjson_loads()
_BACKEND_PID = load_queries()["backend_pid"].encode()
