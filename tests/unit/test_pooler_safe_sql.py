"""Nothing worker_core sends keeps state in the database session, so every
statement works through a transaction pooler (PgBouncer ``pool_mode=transaction``),
where consecutive transactions of one client may run on different server
connections. (LISTEN is the one exception; the notifier and the waiter of
``Queue.wait`` use it, and both refuse a pooled target.) tests/scale/test_pgbouncer.py runs the real thing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from worker_core.config import DatabaseSettings

PACKAGE = Path(__file__).parents[2] / "worker_core"
SOURCES = sorted([*PACKAGE.rglob("*.sql"), *PACKAGE.rglob("*.py")])

# What would tie a client to one server session, and what to use instead. SQL
# keywords are upper case throughout worker_core, so the patterns are too.
SESSION_STATE = {
    r"pg_(try_)?advisory_lock(_shared)?\s*\(": "a session advisory lock (use pg_advisory_xact_lock)",
    r"pg_advisory_unlock": "a session advisory lock",
    r"(\A|;|[\"'])\s*SET\s+(?!LOCAL\b)(SESSION\s+)?[a-z_.]+\s*(=|TO\b)": "a session SET (use SET LOCAL)",
    r"set_config\s*\([^)]*,\s*false\s*\)": "a session set_config (pass is_local = true)",
    r"\bPREPARE\s+[a-z_]": "a named prepared statement",
    r"WITH\s+HOLD": "a cursor that outlives its transaction",
    r"CREATE\s+TEMP(ORARY)?\s+TABLE(?![^;]*ON\s+COMMIT\s+DROP)": "a temporary table (add ON COMMIT DROP)",
}


def _without_comments(text: str) -> str:
    return "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith(("--", "#"))
    )


def _chunks(path: Path) -> list[str]:
    """What to check: each SQL statement of a .sql file (named queries and
    migrations have no terminating semicolon), or a whole Python module."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".sql":
        parts = re.split(r"^-- name: .*$|;", text, flags=re.MULTILINE)
        return [_without_comments(part).strip() for part in parts]
    return [_without_comments(text)]


#: Session state set only after ``behind_pooler(conn)`` said the connection is direct.
GUARDED = {"dashboard/_guard.py": "behind_pooler(conn)", "_runtime.py": "behind_pooler(conn)"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_session_state(path: Path) -> None:
    guard = GUARDED.get(str(path.relative_to(PACKAGE)))
    for chunk in _chunks(path):
        for pattern, what in SESSION_STATE.items():
            match = re.search(pattern, chunk)
            if match is not None and guard is not None:
                before = chunk[: match.start()].rsplit("\n", 3)
                assert any(f"if not await {guard}" in line for line in before), path.name
                continue
            assert match is None, f"{path.name}: {what}: {match.group(0)!r}"


def test_listen_only_where_a_pooler_is_refused() -> None:
    # LISTEN never delivers through a pooler: each user checks behind_pooler first.
    users = [p for p in SOURCES if re.search(r"[\"']LISTEN \{", p.read_text())]
    assert sorted(p.name for p in users) == ["_notifier.py", "_waiter.py"]
    for path in users:
        assert "behind_pooler(conn)" in path.read_text(), path.name


@pytest.mark.parametrize(
    ("text", "session"),
    [
        ("SET statement_timeout = '1s'", True),
        ('conn.execute("SET search_path TO x")', True),
        ("SET LOCAL lock_timeout = '15s'", False),
        ("UPDATE t\nSET status = 'queued'", False),
        ('"set database.listen_dsn to the server"', False),
        ("SELECT pg_advisory_lock(1)", True),
        ("SELECT pg_advisory_xact_lock(1)", False),
        ("CREATE TEMP TABLE s (a int)", True),
        ("CREATE TEMP TABLE s (a int) ON COMMIT DROP", False),
    ],
)
def test_the_patterns_catch_session_state(text: str, session: bool) -> None:
    found = any(re.search(p, text) for p in SESSION_STATE)
    assert found is session


def test_connection_params_bound_a_dead_path_and_yield_to_the_dsn() -> None:
    db = DatabaseSettings(keepalives_idle=7, tcp_user_timeout=2.5, connect_timeout=3.2)
    params = db.connection_params("postgresql://u@db.example/app")
    assert params == {
        "connect_timeout": 4,
        "keepalives": 1,
        "keepalives_idle": 7,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": 2500,
    }
    # What the DSN says wins: an operator can tune one connection string.
    given = db.connection_params("host=db port=5432 keepalives_idle=60 tcp_user_timeout=0")
    assert "keepalives_idle" not in given and "tcp_user_timeout" not in given
    assert given["keepalives_interval"] == 5


@pytest.mark.parametrize(
    "bad",
    [
        {"keepalives_idle": 0},
        {"keepalives_interval": 10_000},
        {"keepalives_count": 0},
        {"tcp_user_timeout": -1},
        {"tcp_user_timeout": float("inf")},
        {"tcp_user_timeout": float("nan")},
        {"tcp_user_timeout": 10_000},
    ],
)
def test_tcp_settings_are_bounded(bad: dict[str, float]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        DatabaseSettings(**bad)
