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

import re
from typing import TYPE_CHECKING

from psycopg import AsyncConnection

from .redact import mask_dsn, redact_text

if TYPE_CHECKING:
    from .config import WorkerConfig

__all__ = ["connect_failure_hint", "connect_once", "server_message"]

_DSN_SETTING = "database.dsn (WORKER_CORE_DATABASE__DSN)"
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
    config: WorkerConfig, *, dsn: str | None = None, timeout: float | None = None
) -> str | None:
    """Open and close one connection.

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
            connect_timeout=max(1, int(timeout or db.connect_timeout)),
        )
    except Exception as exc:
        message = redact_text(server_message(exc), config.secrets())
        hint = connect_failure_hint(exc)
        if hint is not None:
            raise ConnectionError(
                f"cannot connect to PostgreSQL at {mask_dsn(conninfo)}: {message} (hint: {hint})"
            ) from None
        return message
    await conn.close()
    return None
